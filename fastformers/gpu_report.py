"""Registers, shared memory and spills of every Triton kernel, compiled ahead of
time for NVIDIA GPUs (no GPU needed)::

    python -m fastformers.gpu_report [--json PATH] [--arch 80 90]

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
_COLUMNS = ("kernel", "arch", "warps", "registers", "shared", "spills", "status")


def _bytes(value) -> str:
    return "-" if value is None else f"{value} B"


def _summary(error: str) -> str:
    # Compiler errors quote the kernel source between where they happened (first
    # line) and why (last line); the JSON keeps them whole.
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def format_table(records: list[dict]) -> str:
    """The report as an aligned text table; ``records`` are ``AotResult.as_dict()`` rows."""
    rows = [
        (
            record["kernel"],
            f"sm_{record['arch']}",
            str(record["num_warps"]),
            "-" if record["registers"] is None else str(record["registers"]),
            _bytes(record["shared_bytes"]),
            _bytes(record["spill_bytes"]),
            "ok" if record["ok"] else "FAIL: " + _summary(record["error"]),
        )
        for record in records
    ]
    widths = [max(len(cell) for cell in column) for column in zip(_COLUMNS, *rows)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in (_COLUMNS, *rows)]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastformers.gpu_report", description=__doc__.split("::")[0])
    parser.add_argument("--json", metavar="PATH", help="also write every result, with full error text, as JSON")
    parser.add_argument(
        "--arch", type=int, nargs="+", default=DEFAULT_ARCHS, help="compute capabilities (default: 80 90)"
    )
    parser.add_argument("--jobs", type=int, default=0, help="compiler processes (default: by the amount of work, at most one per CPU)")
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
        results = aot.run_aot_check(args.arch, jobs=args.jobs)
    except ValueError as error:
        parser.error(str(error))
    records = [result.as_dict() for result in results]
    print(format_table(records))
    if args.json:
        with open(args.json, "w") as report:
            json.dump(records, report, indent=2)

    failures = [record for record in records if not record["ok"]]
    if failures:
        print(f"\n{len(failures)} of {len(records)} kernel compilations failed the check", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
