"""The ``fastformers`` command line."""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import inspect
import io
import json
import math
import sys
import textwrap
import tokenize
from typing import Callable, Dict, Optional

import torch


class UsageError(Exception):
    """A command-line argument is invalid: reported in one line, exit code 2, before any work."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage dump) through :class:`UsageError`."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def _number(kind: Callable, low=None, strict: bool = False, what: str = "") -> Callable[[str], object]:
    """argparse ``type`` parsing a finite ``kind`` (int or float) ``>= low`` (``> low`` if strict)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        if low is not None and (value < low or (strict and value == low)):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}{what}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, 1)
nonnegative_int = _number(int, 0)
finite_float = _number(float)


def _bench(args: argparse.Namespace) -> int:
    from . import _backend, benchmarks
    from .benchmarks import lm, timing, training

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if device == "cuda" or args.dry_run:
        return _bench_cuda(args, dtype)
    ops = args.ops or sorted(benchmarks.ALL_CASES)
    choices = sorted(benchmarks.ALL_CASES) + sorted(lm.LM_FAMILIES) + ["training", "recipes"]
    unknown = [op for op in ops if op not in choices]
    if unknown:
        print(f"unknown op(s) {unknown}; choose from {choices}", file=sys.stderr)
        return 2
    print(
        f"fastformers bench: torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
        f"backends available: {', '.join(_backend.available_backends())}"
    )
    print("times are medians in one run; ratios (x) are the first row's time / this row's time\n")
    results = []
    for op in ops:
        if op == "recipes":
            from .benchmarks.recipes import recipes_report
            from .models import MODEL_NAMES

            print(recipes_report(MODEL_NAMES, torch.get_num_threads(), args.time_limit, args.data) + "\n", flush=True)
            continue
        if op == "training":
            print(f"training: {training.__doc__.splitlines()[0]}")
            training_rows = training.training_results(device, min_time=max(args.min_time, 1.0),
                                                      large=args.large)
            print(training.format_training_table(training_rows) + "\n", flush=True)
            results += training_rows
            continue
        if op in lm.LM_FAMILIES:
            print(f"{op}: {lm.describe()}")
            lm_results = lm.LM_FAMILIES[op](device, min_time=max(args.min_time, 1.0))
            print(lm.format_lm_table(lm_results) + "\n", flush=True)
            results += lm_results
            continue
        make_cases = benchmarks.ALL_CASES[op]
        options = {"large": True} if args.large and "large" in inspect.signature(make_cases).parameters else {}
        cases = make_cases(device, dtype, **options)
        if not args.large:
            cases = timing.quick_cases(cases)
        op_results = timing.run(cases, device, min_time=args.min_time)
        print(timing.format_table(op_results) + "\n", flush=True)
        if op == "feedback_model":
            print(benchmarks.feedback.feedback_model_report(op_results, dtype) + "\n", flush=True)
        results += op_results
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([dataclasses.asdict(r) for r in results], handle, indent=2)
        print(f"wrote {args.json}")
    return 0


def _bench_cuda(args: argparse.Namespace, dtype: torch.dtype) -> int:
    from .benchmarks import gpu
    from .triton_utils import interpreter_enabled

    if args.dry_run and args.device != "cuda":
        print("fastformers bench: --dry-run rehearses the GPU benchmark: pass --device cuda", file=sys.stderr)
        return 2
    if args.dry_run and not interpreter_enabled():
        print("fastformers bench --dry-run runs the Triton kernels through the interpreter: "
              "set TRITON_INTERPRET=1 before starting it", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("fastformers bench --device cuda: no CUDA GPU here (--dry-run rehearses it on CPU)", file=sys.stderr)
        return 2
    ops = args.ops or list(gpu.DEFAULT_ORDER)
    try:
        gpu.check_ops(ops)
    except ValueError as error:
        print(f"fastformers bench: {error}", file=sys.stderr)
        return 2
    environment = ", ".join(f"{key} {value}" for key, value in gpu.environment().items() if value)
    print(f"fastformers bench --device cuda{' (dry run: CPU, Triton interpreter, tiny shapes)' if args.dry_run else ''}: "
          f"{environment}")
    print("times are medians in one run; x: the first row's time / this row's; TFLOP/s from analytic FLOPs "
          "(fastformers.benchmarks.gpu.work)\n", flush=True)
    gpu.bench(ops, dtype, args.min_time, dry_run=args.dry_run, json_path=args.json)
    if args.json:
        print(f"wrote {args.json}")
    return 0


@functools.cache
def field_docs(cls) -> Dict[str, str]:
    """Each field's documentation in the source of dataclass ``cls``: the comment lines right
    above the field, else the comment at the end of its line (none without the source: an
    install of bytecode only)."""
    try:
        lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    except OSError:
        return {}
    docs = {}
    for node in ast.parse("\n".join(lines)).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, row = [], node.lineno - 2
        while row >= 0 and lines[row].lstrip().startswith("#"):
            above.insert(0, lines[row].strip().lstrip("#").strip())
            row -= 1
        after = [token.string.lstrip("#").strip() for token in
                 tokenize.generate_tokens(io.StringIO(lines[node.lineno - 1]).readline)
                 if token.type == tokenize.COMMENT]
        docs[node.target.id] = " ".join(above) or " ".join(after)
    return docs


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip: set[str],
                         choices: Optional[Dict[str, tuple]] = None) -> None:
    """One ``--field-name`` flag per field of ``cls`` (default None: the model's default applies),
    its help the field's documentation (:func:`field_docs`)."""
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = str(field.type).replace("Optional[", "").rstrip("]")
        documentation = field_docs(cls).get(field.name)
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=documentation)
        elif field.name in (choices or {}):
            parser.add_argument(flag, choices=choices[field.name], default=None, help=documentation)
        else:
            # ranges are the dataclasses' own checks, run before any work (_check_configs)
            parser.add_argument(flag, type={"int": _number(int), "float": finite_float}.get(kind, str), default=None,
                                help=documentation)


def _train(args: argparse.Namespace) -> int:
    from . import distributed

    if args.threads:
        torch.set_num_threads(args.threads)
    # under torchrun every process runs this; rank 0 reports
    launched = distributed.launched_by_torchrun()
    rank = 0
    if launched:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        distributed.init_process_group(args.dist_timeout or distributed.DEFAULT_TIMEOUT, device)
        rank = torch.distributed.get_rank()
    try:
        return _run_training(args, rank)
    finally:
        if launched:
            torch.distributed.destroy_process_group()


def _check_configs(model: str, train_options: dict, model_options: dict) -> None:
    """The training and model configurations the flags give, checked before any data is read
    (the vocabulary size is not known yet: a stand-in of 1 is checked)."""
    from .models import default_model_config
    from .train import default_train_config, require_tensorboard

    try:
        default_train_config(model, **train_options)
        default_model_config(model, 1, **model_options)
        if train_options.get("tensorboard"):
            require_tensorboard()
    except ValueError as error:
        raise UsageError(f"fastformers train: {error}") from None
    if train_options.get("device") == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"fastformers train: --device cuda: no CUDA GPU is available to torch {torch.__version__} "
                         "here (a CPU-only build, or no GPU)")
    for name, low, high in (("dropout", 0.0, 1.0),):
        value = model_options.get(name)
        if value is not None and not low <= value < high:
            raise UsageError(f"fastformers train: --{name} must be in [{low:g}, {high:g}), got {value}")
    for name in ("capacity_factor", "load_balancing_coef"):
        value = model_options.get(name)
        if value is not None and value < 0:
            raise UsageError(f"fastformers train: --{name.replace('_', '-')} must be >= 0, got {value}")


def _run_training(args: argparse.Namespace, rank: int) -> int:
    from . import distributed
    from .data import DataError, check_text_file
    from .models import ModelConfig
    from .train import (CHECKPOINT_NAME, CheckpointError, OutputDirError, OutputLock, Trainer, TrainConfig,
                        TrainingDiverged, default_train_config, prepare_output_dir)

    who = f"fastformers train (rank {rank})" if distributed.launched_by_torchrun() else "fastformers train"
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"model", "n_tokens"}
    train_options = {name: getattr(args, name) for name in train_fields}
    model_options = {name: getattr(args, name) for name in model_fields}
    out = args.out or f"runs/{args.model}"
    try:
        if args.resume and any(value is not None for value in model_options.values()):
            raise UsageError(f"{who}: --resume continues the saved model; drop the model flags")
        if args.resume and args.preset is not None:
            raise UsageError(f"{who}: --resume continues the saved run with its settings; drop --preset")
        _check_configs(args.model, train_options, model_options)
        if args.data is not None:
            check_text_file(args.data)
        lock = contextlib.nullcontext()
        if rank == 0:
            prepare_output_dir(out)
            lock = OutputLock(out)
        with lock:
            if args.resume:
                trainer = Trainer.resume(f"{out}/{CHECKPOINT_NAME}", **train_options)
                if trainer.config.model != args.model:
                    raise UsageError(f"{who}: the checkpoint in {out} is a {trainer.config.model} model, "
                                     f"not {args.model}")
                if rank == 0:
                    print(f"resuming {out}/{CHECKPOINT_NAME} at step {trainer.step}")
            else:
                trainer = Trainer.start(default_train_config(args.model, **train_options), **model_options)
            trainer.run()
    except (UsageError, OutputDirError) as error:
        message = str(error)
        print(message if message.startswith(who) else f"{who}: {message}", file=sys.stderr)
        return 2
    except (DataError, CheckpointError, ValueError, TrainingDiverged, distributed.CollectiveError) as error:
        print(f"{who}: {error}", file=sys.stderr)
        return 1
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .generate import generate
    from .train import CheckpointError

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.prompt:
        print("fastformers generate: --prompt must have at least one character", file=sys.stderr)
        return 2
    try:
        sys.stdout.write(args.prompt)
        for char in generate(args.checkpoint, args.prompt, args.tokens, args.temperature, args.top_k,
                             args.seed, args.backend, args.device):
            sys.stdout.write(char)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except (CheckpointError, ValueError) as error:
        print(f"\nfastformers generate: {error}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv``; returns the exit code (2: a bad argument, reported in one line)."""
    try:
        args = _parser().parse_args(argv)
        return args.handler(args)
    except UsageError as error:
        print(error, file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastformers")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    bench = commands.add_parser("bench", help="time the fused ops against their references")
    bench.add_argument("ops", nargs="*", help="ops to time (default: every op); 'train' and 'generate' "
                       "time the language models (training and generation tokens/s); 'training' times each model's "
                       "forward+backward against labml_nn with dropout 0/0.1 in float32 and bf16 autocast; "
                       "'recipes' trains each model with its default recipe and reports the wall time to a "
                       "validation loss")
    bench.add_argument("--device", choices=["cpu", "cuda"], default=None,
                       help="where to time (default: cuda when a GPU is available, else cpu)")
    bench.add_argument("--dtype", choices=["float32", "float64", "bfloat16"], default="float32",
                       help="dtype of the op benchmarks' inputs")
    bench.add_argument("--min-time", type=_number(float, 0), default=0.2,
                       help="seconds spent timing each case and backend (0: the minimum number of repeats)")
    bench.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads")
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    bench.add_argument("--large", action="store_true",
                       help="the full comparison: add the heavy shapes (e.g. rel_attention L=M=512, switch T=4096 "
                       "d=512 d_ff=2048) and the torch.compile(reference) peer")
    bench.add_argument("--dry-run", action="store_true",
                       help="with --device cuda: run the GPU benchmark's code on CPU through the Triton interpreter "
                       "at tiny shapes (needs TRITON_INTERPRET=1; proves it runs, measures nothing)")
    bench.add_argument("--time-limit", type=_number(float, 0, strict=True), default=300.0, metavar="SECONDS",
                       help="bench recipes: the longest each model trains (default 300)")
    bench.add_argument("--data", metavar="PATH", default=None,
                       help="bench recipes: the text to train on (default: Tiny Shakespeare)")
    bench.set_defaults(handler=_bench)

    from .models import MODEL_NAMES, ModelConfig
    from .recipes import PRESETS
    from .train import BACKEND_CHOICES, DEVICE_CHOICES, PRECISION_CHOICES, TrainConfig

    train = commands.add_parser(
        "train", help="train a character-level language model",
        description="Train MODEL on --data (default: Tiny Shakespeare, downloaded once). Unset flags take the "
                    "--preset's settings for MODEL. Writes OUT/checkpoint.pt, OUT/best.pt, OUT/loss.png and "
                    "OUT/metrics.jsonl.")
    train.add_argument("model", choices=MODEL_NAMES, help="the language model to train")
    train.add_argument("--preset", choices=PRESETS, default=None,
                       help=f"the settings unset flags take: {', '.join(PRESETS)} (default {PRESETS[0]}; labml: "
                       "labml_nn's experiment settings)")
    train.add_argument("--resume", action="store_true", help="continue the run saved in --out exactly")
    train.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads")
    _add_dataclass_flags(train, TrainConfig, skip={"model", "time_limit", "preset"},
                         choices={"optimizer": ("noam", "adamw"), "backend": BACKEND_CHOICES,
                                  "device": DEVICE_CHOICES, "precision": PRECISION_CHOICES})
    train.add_argument("--time-limit", type=_number(float, 0, strict=True), default=None, metavar="MINUTES",
                       help=field_docs(TrainConfig)["time_limit"])
    _add_dataclass_flags(train, ModelConfig, skip={"model", "n_tokens"})
    train.set_defaults(handler=_train)

    gen = commands.add_parser("generate", help="sample text from a trained checkpoint")
    gen.add_argument("checkpoint", help="a checkpoint.pt or best.pt written by fastformers train")
    gen.add_argument("--prompt", default="It is", help="the text to continue (at least one character)")
    gen.add_argument("--tokens", type=positive_int, default=200, help="characters to generate")
    gen.add_argument("--temperature", type=_number(float, 0), default=1.0,
                     help="0 = always the most likely character")
    gen.add_argument("--top-k", type=nonnegative_int, default=0, help="sample among the k most likely (0 = all)")
    gen.add_argument("--seed", type=_number(int, 0), default=None, help="seed of the sampling (default: random)")
    gen.add_argument("--backend", choices=BACKEND_CHOICES, default="fused",
                     help="fused: the fastest kernels available; reference: plain PyTorch")
    gen.add_argument("--device", choices=["cpu", "cuda"], default=None,
                     help="where to run (default: cuda when a GPU is available, else cpu)")
    gen.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads")
    gen.set_defaults(handler=_generate)
    return parser


if __name__ == "__main__":
    sys.exit(main())
