"""Static evidence about the GPU kernels, no GPU needed::

    python -m fastformers.gpu_report [--json PATH] [--arch 80 90] [--kernel NAME] [--sass MODULE ...] [--jobs N]

1. Every Triton kernel configuration compiled ahead of time: registers, shared
   memory, spills, and from its SASS the tensor-core instructions (HMMA =
   mma.sync, HGMMA = Hopper wgmma), atomics (RED/REDG/ATOM/ATOMG/ATOMS) and
   CUDA-core FMAs (FFMA, DFMA). ``--sass`` disassembles only the kernels of the
   named modules (a third of a second saved per other kernel, whose SASS
   columns show "-").
2. A roofline MODEL of every ``fastformers bench --device cuda`` shape: analytic
   FLOPs and bytes (``fastformers.benchmarks.gpu.work``) and the ideal H100 time at
   its peaks. Computed, not measured.

Exits 1 if any kernel fails to compile, spills registers or exceeds the shared
memory of an arch; 2 if the check cannot run here.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import _backend
from .triton_utils import interpreter_enabled

DEFAULT_ARCHS = (80, 90)
_COLUMNS = ("kernel", "arch", "warps", "registers", "shared", "spills", "HMMA", "HGMMA", "atomics", "FFMA", "status")


def _bytes(value) -> str:
    return "-" if value is None else f"{value} B"


def _summary(error: str) -> str:
    # Compiler errors quote the kernel source between where they happened (first
    # line) and why (last line); the JSON keeps them whole.
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def _count(record: dict, opcode: str) -> str:
    sass = record.get("sass")
    return "-" if sass is None else str(sass[opcode] if opcode != "FFMA" else sass["FFMA"] + sass["DFMA"])


def _aligned(header: tuple, rows: list) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in (header, *rows)]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_table(records: list[dict]) -> str:
    """The kernels as an aligned text table; ``records`` are ``AotResult.as_dict()``
    rows. FFMA counts FFMA and DFMA (the float64 configurations' FMAs)."""
    rows = [
        (
            record["kernel"],
            f"sm_{record['arch']}",
            str(record["num_warps"]),
            "-" if record["registers"] is None else str(record["registers"]),
            _bytes(record["shared_bytes"]),
            _bytes(record["spill_bytes"]),
            _count(record, "HMMA"),
            _count(record, "HGMMA"),
            "-" if record.get("atomics") is None else str(record["atomics"]),
            _count(record, "FFMA"),
            "ok" if record["ok"] else "FAIL: " + _summary(record["error"]),
        )
        for record in records
    ]
    return _aligned(_COLUMNS, rows)


# Which peak bounds a dtype's products in the model: bf16 dots run on tensor
# cores; the float32 kernels ask Triton for IEEE dots, which run on CUDA cores.
_PEAK_OF_DTYPE = {"bfloat16": "bf16_tensor_tflops", "float32": "fp32_tflops"}


def roofline() -> list[dict]:
    """One modelled line per (op, GPU benchmark shape, dtype, pass)."""
    from .benchmarks import gpu

    lines = []
    for op, shapes in gpu.SHAPES.items():
        for shape in shapes:
            for dtype, element_bytes in (("bfloat16", 2), ("float32", 4)):
                model = gpu.work(op, shape, element_bytes)
                peak = gpu.H100_PEAKS[_PEAK_OF_DTYPE[dtype]]
                for name, flops, moved in (("fwd", model.forward_flops, model.forward_bytes),
                                           ("fwd+bwd", model.forward_backward_flops, model.forward_backward_bytes)):
                    compute_s = flops / (peak * 1e12)
                    memory_s = moved / (gpu.H100_PEAKS["hbm_tb_s"] * 1e12)
                    lines.append(dict(op=op, shape=gpu._label(op, shape), dtype=dtype, passes=name,
                                      flops=flops, bytes=moved, peak_tflops=peak,
                                      compute_us=compute_s * 1e6, memory_us=memory_s * 1e6,
                                      ideal_us=max(compute_s, memory_s) * 1e6,
                                      bound="compute" if compute_s >= memory_s else "memory"))
    return lines


def format_roofline(lines: list[dict]) -> str:
    from .benchmarks.gpu import H100_PEAKS

    header = ("op", "shape", "dtype", "pass", "GFLOP", "MB", "FLOP/B", "ideal us", "bound")
    rows = [(line["op"], line["shape"], line["dtype"], line["passes"], f"{line['flops'] / 1e9:.3f}",
             f"{line['bytes'] / 1e6:.2f}", f"{line['flops'] / line['bytes']:.1f}", f"{line['ideal_us']:.2f}",
             f"{line['bound']} ({line['peak_tflops']:g} TFLOP/s)" if line["bound"] == "compute" else "memory")
            for line in lines]
    title = (f"ROOFLINE MODEL, not a measurement: analytic FLOPs and bytes (fastformers.benchmarks.gpu.work) at H100 SXM "
             f"peaks ({H100_PEAKS['bf16_tensor_tflops']:g} TFLOP/s dense bf16, {H100_PEAKS['fp32_tflops']:g} fp32 "
             f"CUDA-core for the IEEE float32 kernels, {H100_PEAKS['hbm_tb_s']:g} TB/s)")
    return title + "\n" + _aligned(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastformers.gpu_report", description=__doc__.split("::")[0])
    parser.add_argument("--json", metavar="PATH", help="also write every result, with full error text, as JSON")
    parser.add_argument(
        "--arch", type=int, nargs="+", default=DEFAULT_ARCHS, help="compute capabilities (default: 80 90)"
    )
    parser.add_argument("--jobs", type=int, default=0, help="compiler processes (default: by the amount of work, at most one per CPU)")
    parser.add_argument("--kernel", default="", metavar="NAME", help="only the kernel specs whose name contains NAME")
    parser.add_argument(
        "--sass",
        nargs="+",
        metavar="MODULE",
        help="count SASS instructions only in the kernel modules whose name contains one of these"
        " (e.g. fastformers.ops.xl.); the others show '-' (default: every kernel)",
    )
    args = parser.parse_args(argv)

    if not _backend.triton_available():
        print("gpu_report needs Triton, which is not installed: pip install triton", file=sys.stderr)
        return 2
    # Refuse rather than re-exec: main() may run inside a caller's process,
    # which an exec would replace.
    if interpreter_enabled():
        print(
            "gpu_report cannot compile kernels built for the Triton interpreter (TRITON_INTERPRET is set);"
            " run it without: env -u TRITON_INTERPRET python -m fastformers.gpu_report",
            file=sys.stderr,
        )
        return 2

    # Imports Triton's compiler, hence only once Triton is known to be installed.
    from .testing import aot

    try:
        results = aot.run_aot_check(args.arch, jobs=args.jobs, kernel_filter=args.kernel, sass_modules=args.sass)
    except ValueError as error:
        parser.error(str(error))
    records = [result.as_dict() for result in results]
    model = roofline()
    print(format_table(records))
    print("\n" + format_roofline(model))
    if args.json:
        with open(args.json, "w") as report:
            json.dump({"kernels": records, "roofline_model": model}, report, indent=2)

    failures = [record for record in records if not record["ok"]]
    if failures:
        print(f"\n{len(failures)} of {len(records)} kernel compilations failed the check", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
