"""``fastformers bench training``: each model's training forward+backward in the
configurations people train with — dropout 0 and 0.1, float32 and bfloat16
autocast — labml_nn's modules against the same model after
:func:`fastformers.convert`, alternating in one process.

Each model runs at labml's experiment size and at one larger size (``large``
adds the sizes that take minutes on a CPU: the Feedback model at labml's size,
whose labml_nn step alone takes ~15 s). Memory-carrying models (XL,
Compressive) run with their memories pre-filled by a warm-up step: the steady
state of training. Only ratios within one run mean anything.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import statistics
import time
from typing import Callable, List, Optional

import torch

from ..models import build_model, default_model_config, labml_modules
from ..train import cross_entropy
from .timing import markdown_table

VOCAB = 65


@dataclasses.dataclass(frozen=True)
class TrainingSize:
    model: str
    label: str
    seq_len: int
    batch_size: int
    overrides: dict
    large: bool = False

    def describe(self) -> str:
        parts = [f"T {self.seq_len}", f"B {self.batch_size}"] + [f"{k} {v}" for k, v in self.overrides.items()]
        return ", ".join(parts)


SIZES = [
    TrainingSize("xl", "labml", 2, 32, dict(mem_len=32)),
    TrainingSize("xl", "larger", 80, 12, dict(mem_len=144, n_layers=4)),
    TrainingSize("compressive", "labml", 8, 32, dict(mem_len=8, c_mem_len=128, compression_rate=2)),
    TrainingSize("compressive", "larger", 32, 16, dict(mem_len=32, c_mem_len=64, compression_rate=4, d_model=256,
                                                      heads=8, d_ff=1024, n_layers=4)),
    TrainingSize("feedback", "smaller", 40, 8, dict(d_model=256, heads=4, d_ff=1024, n_layers=3)),
    TrainingSize("feedback", "labml", 128, 64, dict(), large=True),
    TrainingSize("switch", "labml", 64, 32, dict()),
    TrainingSize("switch", "larger", 128, 16, dict(d_model=256, d_ff=1024, n_experts=16, n_layers=4)),
]

DROPOUTS = (0.0, 0.1)
PRECISIONS = ("float32", "bf16")


@dataclasses.dataclass
class TrainingResult:
    model: str
    size: str
    dropout: float
    precision: str
    labml_ms: Optional[float]  # None: labml_nn's model cannot run this configuration (labml_error says why)
    fastformers_ms: float
    labml_error: str = ""

    @property
    def speedup(self) -> Optional[float]:
        return None if self.labml_ms is None else self.labml_ms / self.fastformers_ms


def _autocast(precision: str, device: str):
    if precision == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_fn(model: torch.nn.Module, size: TrainingSize, precision: str, device: str) -> Callable[[], None]:
    """Training forward+backward of ``model`` on one fixed random batch, memories pre-filled."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (size.seq_len + 1, size.batch_size), generator=generator).to(device)
    model.train()
    with _autocast(precision, device):
        memory = model(x[:-1], None).memory

    def step() -> None:
        with _autocast(precision, device):
            output = model(x[:-1], memory)
            loss = cross_entropy(output.logits, x[1:])
            if output.aux_loss is not None:
                loss = loss + output.aux_loss
        loss.backward()
        for parameter in model.parameters():
            parameter.grad = None

    return step


def models(size: TrainingSize, dropout: float, device: str):
    """labml_nn's model and its converted copy, from the same seeded weights."""
    import fastformers

    torch.manual_seed(0)
    config = default_model_config(size.model, VOCAB, **{**size.overrides, "dropout": dropout})
    labml = build_model(config, labml_modules()).to(device)
    fused = fastformers.convert(copy.deepcopy(labml))
    return labml, fused


def median_ms(steps: List[Callable[[], None]], min_time: float, min_repeat: int = 3) -> List[float]:
    """Median ms of each step, timed in alternation so that load changes hit all alike."""
    for step in steps:
        step()
    times: List[List[float]] = [[] for _ in steps]
    deadline = time.perf_counter() + min_time
    while len(times[0]) < min_repeat or time.perf_counter() < deadline:
        for index, step in enumerate(steps):
            start = time.perf_counter()
            step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[index].append(time.perf_counter() - start)
    return [1000 * statistics.median(t) for t in times]


def training_results(device: str = "cpu", min_time: float = 1.0, large: bool = False,
                     model_names: Optional[List[str]] = None) -> List[TrainingResult]:
    results = []
    for size in SIZES:
        if (size.large and not large) or (model_names and size.model not in model_names):
            continue
        for dropout in DROPOUTS:
            labml, fused = models(size, dropout, device)
            for precision in PRECISIONS:
                label = f"{size.label} ({size.describe()})"
                fused_step = step_fn(fused, size, precision, device)
                try:
                    labml_step = step_fn(labml, size, precision, device)
                    labml_step()
                except (RuntimeError, TypeError) as error:  # e.g. labml_nn's Switch under CPU autocast (index_put dtypes)
                    fused_ms, = median_ms([fused_step], min_time)
                    results.append(TrainingResult(size.model, label, dropout, precision, None, fused_ms,
                                                  str(error).splitlines()[0]))
                    continue
                labml_ms, fused_ms = median_ms([labml_step, fused_step], min_time)
                results.append(TrainingResult(size.model, label, dropout, precision, labml_ms, fused_ms))
    return results


def format_training_table(results: List[TrainingResult]) -> str:
    """The measured table, then per (model, size, precision) the dropout-0.1
    speedup as a share of the dropout-0 speedup, and bf16 against float32."""
    header = ("model", "size", "dropout", "precision", "labml_nn ms", "fastformers ms", "speedup")
    rows = [(r.model, r.size, f"{r.dropout:g}", r.precision,
             f"{r.labml_ms:.1f}" if r.labml_ms is not None else "fails", f"{r.fastformers_ms:.1f}",
             f"{r.speedup:.2f}x" if r.speedup is not None else "-") for r in results]
    lines = [markdown_table(header, rows)]
    failures = sorted({(r.model, r.precision, r.labml_error) for r in results if r.labml_error})
    lines += [f"labml_nn {model} under {precision}: {error}" for model, precision, error in failures]
    by_key = {(r.model, r.size, r.dropout, r.precision): r for r in results}
    summary = []
    for (model, size, dropout, precision), r in by_key.items():
        base = by_key.get((model, size, DROPOUTS[0], precision))
        f32 = by_key.get((model, size, dropout, "float32"))
        kept = "-"
        if dropout != DROPOUTS[0] and base and r.speedup is not None and base.speedup is not None:
            kept = f"{r.speedup / base.speedup:.0%}"
        bf16_vs_f32 = f"{f32.fastformers_ms / r.fastformers_ms:.2f}x" if f32 and precision == "bf16" else "-"
        summary.append((model, size, f"{dropout:g}", precision, kept, bf16_vs_f32))
    lines += ["", "kept: the dropout-0.1 speedup as a share of the dropout-0 speedup (target >= 85%); "
                  "bf16 vs f32: fastformers' float32 time / its bf16 time (>1: bf16 faster)"]
    lines.append(markdown_table(("model", "size", "dropout", "precision", "kept", "bf16 vs f32"), summary))
    return "\n".join(lines)

