"""The ``fastformers`` command line."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch


def _bench(args: argparse.Namespace) -> int:
    from . import _backend, benchmark

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    ops = args.ops or sorted(benchmark.ALL_CASES)
    unknown = [op for op in ops if op not in benchmark.ALL_CASES]
    if unknown:
        print(f"unknown op(s) {unknown}; choose from {sorted(benchmark.ALL_CASES)}", file=sys.stderr)
        return 2
    print(
        f"fastformers bench: torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
        f"backends available: {', '.join(_backend.available_backends())}"
    )
    print("times are medians in one run; ratios (x) are reference time / backend time\n")
    results = []
    for op in ops:
        op_results = benchmark.run(benchmark.ALL_CASES[op](device, dtype), device, min_time=args.min_time)
        print(benchmark.format_table(op_results) + "\n", flush=True)
        if op == "feedback_model":
            print(benchmark.feedback_model_report(op_results, dtype) + "\n", flush=True)
        results += op_results
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([dataclasses.asdict(r) for r in results], handle, indent=2)
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastformers")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="time the fused ops against their references")
    bench.add_argument("ops", nargs="*", help="ops to time (default: all)")
    bench.add_argument("--device", choices=["cpu", "cuda"], default=None)
    bench.add_argument("--dtype", choices=["float32", "float64", "bfloat16"], default="float32")
    bench.add_argument("--min-time", type=float, default=0.2, help="seconds spent timing each case and backend")
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    bench.set_defaults(handler=_bench)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
