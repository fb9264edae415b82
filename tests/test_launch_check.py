"""The launch-arithmetic check (fastformers.testing.launch_check): every Triton
launcher at shapes whose index products pass 2^31 elements, and at a grid
past CUDA's 65535 blocks on axis 1, read from the launches themselves (meta
tensors) and from each kernel's Triton IR (which offsets are i32).

Issue 17 item 5: every kernel computes the offsets that can pass 2^31 in
int64 and puts B·H on grid axis 0. The IR verdict is conservative: it flags
every i32 offset added to a pointer whose tensor passes 2^31, so the kernels
add one int64 offset per element to such pointers (the index cast to
tl.int64 before it meets a stride, the int32 feature part added to it before
the pointer)."""
import json
import os
import subprocess
import sys

import pytest

from fastformers.testing import launch_check

@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The check of every stress shape, with each kernel's IR, in a process
    without the interpreter (the IR needs Triton's compiler)."""
    path = tmp_path_factory.mktemp("launch_check") / "report.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    process = subprocess.run([sys.executable, "-m", "fastformers.testing.launch_check", "--json", str(path)],
                             env=env, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr
    return json.loads(path.read_text()), process.stdout


@pytest.mark.parametrize("op", list(launch_check.STRESS_SHAPES))
def test_launches_stay_within_int32_offsets_and_grid_limits(report, op):
    checks, text = report
    for check in (c for c in checks if c["op"] == op):
        assert not check["error"], f"{op} {check['shape']}: the launcher did not run on meta tensors: {check['error']}"
        assert check["launches"], f"{op} {check['shape']} launched nothing"
        bad = [f"{launch['kernel']}: {launch['verdict']}" for launch in check["launches"] if launch["verdict"] != "ok"]
        assert not bad, f"{op} {check['shape']}:\n" + "\n".join(bad)


def test_every_launcher_is_traced(report):
    checks, _ = report
    traced = {launch["kernel"] for check in checks for launch in check["launches"]}
    from fastformers.testing.aot import collect_specs

    launched_on_gpu = {spec.kernel.fn.__name__ for _, spec in collect_specs()} - {"_keep_mask_kernel"}
    assert launched_on_gpu <= traced, launched_on_gpu - traced


def test_flags_a_grid_past_the_axis_limit():
    # No launcher puts B·H on axis 1 any more (the stress shape B·H = 131072 passes above): a launch that would.
    launch = launch_check.Launch("k", (2, 131072, 1), [], kernel_uses_int64=True)
    assert launch.verdict == "GRID TOO LARGE (axis 1: 131072 > 65535)"
    # The stress shape's launches: B·H (131072) only ever on axis 0, whatever
    # else a grid spans (the positional-gradient reduction runs over window
    # rows and heads, not B·H).
    batch_heads = 8192 * 16
    check = launch_check.check("rel_attention", (64, 64, 8192, 16, 64))
    report = launch_check.format_report([check])
    # (offset widths need each kernel's IR, which the module-level report reads)
    assert check.launches and not any(launch.grid_overflow for launch in check.launches), report
    assert all(batch_heads not in launch.grid[1:] for launch in check.launches), report
    assert any(launch.grid[0] == batch_heads for launch in check.launches), report


def test_measures_offsets_from_shapes_and_strides():
    check = launch_check.check("feedback_memory", (3, 2**15, 2**15))
    forward = next(launch for launch in check.launches if launch.kernel == "feedback_memory_fwd_kernel")
    assert forward.max_offset == 3 * 2**30 - 1
    assert forward.offset_overflow == ["x_ptr"]


def test_reads_offset_widths_from_the_ir():
    ttir = """
  tt.func public @k(%x_ptr: !tt.ptr<bf16> loc(#loc), %y_ptr: !tt.ptr<f32> loc(#loc), %n: i32) {
    %a = tt.splat %x_ptr : !tt.ptr<bf16> -> tensor<8x!tt.ptr<bf16>>
    %b = tt.addptr %a, %offs : tensor<8x!tt.ptr<bf16>>, tensor<8xi32>
    %c = tt.addptr %y_ptr, %wide : !tt.ptr<f32>, i64
    %r:2 = scf.for %i = %c0 to %n step %c1 iter_args(%p = %c, %acc = %z) -> (!tt.ptr<f32>, f32) : i32 {
      %q = tt.addptr %p, %i : !tt.ptr<f32>, i32
    }
"""
    assert launch_check.addptr_offset_widths(ttir) == {"x_ptr": [32], "y_ptr": [32, 64]}
