"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90.

Runs ``python -m fastformers.gpu_report`` in subprocesses: this process has
TRITON_INTERPRET set (conftest.py), under which Triton cannot compile kernels.
The full report run starts in the background when the tests are collected
(tests/aot_report.py).
"""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fastformers
from fastformers.benchmarks import gpu
from fastformers.gpu_report import format_table
from fastformers.testing.aot import SASS_OPCODES, collect_specs, run_aot_check
from aot_report import ARCHS, STASH_KEY, TENSOR_CORE_FAMILIES, TIMEOUT_S, environment

FEEDBACK_KERNELS = {
    f"feedback_memory_{direction}_kernel[{dtype}]" for direction in ("fwd", "bwd") for dtype in ("fp32", "bf16", "fp64")
}


def _run(args, *, interpret=False, cwd=None):
    return subprocess.run([sys.executable, *args], env=environment(interpret), cwd=cwd, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def _in_gated_family(record):
    return record["module"].startswith(TENSOR_CORE_FAMILIES)


@pytest.fixture(scope="module")
def report(request):
    """The exit code, output and JSON records of one full report run (started
    by conftest.py when the tests were collected)."""
    background = request.config.stash[STASH_KEY]
    process = background.result()
    output = f"exit code {process.returncode}\nstdout:\n{process.stdout}\nstderr:\n{process.stderr}"
    assert background.json_path.exists(), f"gpu_report wrote no JSON report; {output}"
    return process, json.loads(background.json_path.read_text())["kernels"], output


def test_every_kernel_compiles_without_spills(report):
    process, records, output = report
    failed = [record for record in records if not record["ok"]]
    assert not failed, "kernels failing the AOT check:\n" + format_table(failed) + "\n\nfull errors:\n" + "\n\n".join(
        f"{record['kernel']} sm_{record['arch']}: {record['error']}" for record in failed
    )
    assert all(record["spill_bytes"] == 0 for record in records), format_table(records)
    assert process.returncode == 0, output


def test_report_covers_every_spec_on_every_arch(report):
    _, records, _ = report
    table = format_table(records)
    reported = sorted((record["kernel"], record["arch"]) for record in records)
    # each spec on the archs it is for (AotSpec.archs: a launcher's per-arch tiles)
    expected = sorted((spec.name, arch) for arch in ARCHS for _, spec in collect_specs(arch))
    assert len(records) == len(expected), f"expected {len(expected)} compilations, got {len(records)}:\n{table}"
    assert reported == expected, table
    for arch in ARCHS:
        compiled = {record["kernel"] for record in records if record["arch"] == arch}
        assert FEEDBACK_KERNELS <= compiled, f"missing on sm_{arch}: {FEEDBACK_KERNELS - compiled}\n{table}"


def test_every_triton_kernel_file_is_discovered(report):
    _, records, _ = report
    package_root = Path(fastformers.__file__).parent
    on_disk = {
        ".".join(("fastformers", *path.relative_to(package_root).with_suffix("").parts))
        for path in package_root.glob("ops/**/triton_kernel.py")
    }
    assert on_disk == {record["module"] for record in records}


def test_check_catches_spills_and_compile_errors(tmp_path):
    (tmp_path / "bad_kernels.py").write_text(
        textwrap.dedent(
            '''
            import triton
            import triton.language as tl
            from fastformers.triton_utils import AotSpec


            @triton.jit
            def spilling_kernel(x_ptr, BLOCK: tl.constexpr):
                # One warp holding 16384 floats across a reduction cannot fit them in registers.
                offs = tl.arange(0, BLOCK)
                x = tl.load(x_ptr + offs)
                tl.store(x_ptr + offs, x * tl.sum(x, axis=0))


            @triton.jit
            def broken_kernel(x_ptr):
                tl.store(x_ptr, undefined_name)


            SPECS = [
                AotSpec(spilling_kernel, {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 16384}, num_warps=1),
                AotSpec(broken_kernel, {"x_ptr": "*fp32"}, {}),
            ]
            '''
        )
    )
    script = (
        "import json, tempfile, bad_kernels\n"
        "from fastformers.testing.aot import compile_spec\n"
        "with tempfile.TemporaryDirectory() as workdir:\n"
        "    print(json.dumps([compile_spec('bad_kernels', spec, 80, workdir).as_dict() for spec in bad_kernels.SPECS]))\n"
    )
    process = _run(["-c", script], cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    spilling, broken = json.loads(process.stdout)
    assert not spilling["ok"] and spilling["spill_bytes"] > 0 and "spills" in spilling["error"], spilling
    assert not broken["ok"] and "undefined_name" in broken["error"], broken


def test_refuses_under_the_interpreter():
    process = _run(["-m", "fastformers.gpu_report"], interpret=True)
    assert process.returncode == 2 and "TRITON_INTERPRET" in process.stderr, process.stderr


def test_explains_missing_triton():
    # A None entry in sys.modules makes `import triton` raise ImportError.
    script = "import sys; sys.modules['triton'] = None; from fastformers.gpu_report import main; sys.exit(main([]))"
    process = _run(["-c", script])
    assert process.returncode == 2 and "Triton" in process.stderr and "not installed" in process.stderr, process.stderr


def test_report_counts_sass_instructions_and_models_the_roofline(report):
    process, records, output = report
    for record in filter(_in_gated_family, records):
        assert set(record["sass"]) == set(SASS_OPCODES), record["kernel"]
    # the bf16 dots of the attention kernels run on tensor cores
    assert any(record["sass"]["HMMA"] + record["sass"]["HGMMA"] > 0 for record in records
               if record["kernel"].startswith("rel_attention") and "bf16" in record["kernel"]), format_table(records)
    assert "HMMA" in process.stdout and "ROOFLINE MODEL, not a measurement" in process.stdout, output
    for op in gpu.SHAPES:
        assert op in process.stdout.split("ROOFLINE MODEL")[1], op


def _sass_cells(table: str, record) -> list:
    """The HMMA, HGMMA, atomics and FFMA cells of ``record``'s row of a printed
    table (by the header's column positions: kernel names hold spaces)."""
    header, *rows = table.splitlines()
    row = next(row for row in rows if row.startswith(record["kernel"] + " ") and f" sm_{record['arch']} " in row)
    return row[header.index("HMMA"):header.index("status")].split()


def test_report_leaves_the_other_modules_undisassembled_and_shows_a_dash(report):
    process, records, output = report
    others = [record for record in records if not _in_gated_family(record)]
    assert others, "every kernel is in a disassembled family: nothing checks that --sass leaves the others out"
    for record in others:
        assert record["sass"] is None and record["atomics"] is None, record
        assert record["registers"] is not None and record["spill_bytes"] is not None, record
    assert _sass_cells(process.stdout, others[0]) == ["-"] * 4, output
    assert _sass_cells(format_table(others), others[-1]) == ["-"] * 4
    gated = next(filter(_in_gated_family, records))
    assert all(cell.isdigit() for cell in _sass_cells(process.stdout, gated)), output


def test_sass_modules_refuses_a_name_no_kernel_module_has_and_a_bare_string():
    # both raise before any compilation, so they run here, under the interpreter
    with pytest.raises(ValueError, match="no_such_module"):
        run_aot_check(ARCHS, sass_modules=("fastformers.ops.xl.", "no_such_module"))
    with pytest.raises(TypeError, match="sass_modules"):
        run_aot_check(ARCHS, sass_modules="fastformers.ops.xl.")


def _half_precision_products(records):
    half = [record for record in filter(_in_gated_family, records)
            if record["arch"] == 90 and any(dtype in record["kernel"] for dtype in ("bf16", "fp16"))]
    assert half
    # a kernel with no product at all (a reduction) has nothing to put on tensor cores
    return [record for record in half if record["sass"]["HMMA"] + record["sass"]["HGMMA"] > 0]


def test_half_precision_expert_and_attention_products_use_wgmma_on_hopper(report):
    _, records, _ = report
    without = [record for record in _half_precision_products(records) if record["sass"]["HGMMA"] == 0]
    assert not without, "bf16/fp16 kernels on sm_90 without HGMMA:\n" + format_table(without)


def test_attention_forward_and_query_gradient_products_all_on_wgmma(report):
    """rel_attention's forward and query-gradient launches (not the table one)
    have every product on wgmma, none on mma.sync (README: what the static
    evidence says, for the launches that keep 16- and 32-row products)."""
    _, records, _ = report
    launches = [record for record in _half_precision_products(records)
                if record["kernel"].startswith(("rel_attention_fwd_kernel", "rel_attention_bwd_dq_kernel"))
                and ",table" not in record["kernel"]]
    assert launches
    mixed = [record for record in launches if record["sass"]["HMMA"]]
    assert not mixed, "products on mma.sync:\n" + format_table(mixed)


def test_attention_and_expert_kernels_use_no_atomics(report):
    _, records, _ = report
    atomic = [record for record in filter(_in_gated_family, records) if record["atomics"]]
    assert not atomic, "kernels with atomics (run-to-run different sums):\n" + format_table(atomic)
