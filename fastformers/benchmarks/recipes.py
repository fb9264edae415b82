"""Time to loss: how fast each model's default recipe learns Tiny Shakespeare.

:func:`recipes_report` trains each model with its default recipe
(:data:`fastformers.recipes.DEFAULT_PRESET`) on ``threads`` CPU threads and
reports the wall time until the validation loss first reaches
:data:`TARGET_NATS`, and the best validation loss within the time limit. The
clock runs from building the run (data, model) to each evaluation's end, so
evaluation time counts: it is what a user waits. The process CPU time to the
target is reported beside it: on a machine shared with other jobs the wall
time mostly measures the others, the CPU time much less so.
"""
from __future__ import annotations

import contextlib
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional

import torch

from ..recipes import DEFAULT_PRESET
from ..train import Trainer, default_train_config

TARGET_NATS = 1.9
DEFAULT_TIME_LIMIT_S = 300.0


@dataclass
class RecipeRun:
    """One model's run: ``time_to_target_s`` None when the target was not reached."""

    model: str
    parameters: int
    steps: int
    tokens_per_s: float
    time_to_target_s: Optional[float]
    cpu_to_target_s: Optional[float]
    best_valid: float
    best_step: int
    checkpoint: Optional[Path]


@contextlib.contextmanager
def _threads(threads: int):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def train_recipe(model: str, time_limit_s: float, data_path: Optional[str] = None,
                 out: Optional[str] = None) -> RecipeRun:
    """Train ``model`` with its default recipe until its last step or ``time_limit_s`` seconds,
    evaluating at the recipe's interval (and at the end). With ``out``, the run's checkpoint is
    written there (for ``fastformers generate``); otherwise into a temporary directory."""
    if not (math.isfinite(time_limit_s) and time_limit_s > 0):
        raise ValueError(f"time_limit_s must be a positive number of seconds, got {time_limit_s}")
    with tempfile.TemporaryDirectory() as scratch:
        started, cpu_started = time.monotonic(), time.process_time()
        trainer = Trainer.start(default_train_config(model, data=data_path, out=out or scratch),
                                log=lambda line: None)
        config = trainer.config
        time_to_target, cpu_to_target, training_s = None, None, 0.0
        while trainer.step < config.steps:
            step_started = time.monotonic()
            trainer.train_step()
            training_s += time.monotonic() - step_started
            out_of_time = time.monotonic() - started >= time_limit_s
            if trainer.step % config.eval_interval == 0 or trainer.step == config.steps or out_of_time:
                valid = trainer.evaluate()
                trainer.history["valid"].append((trainer.step, valid))
                if time_to_target is None and valid <= TARGET_NATS:
                    time_to_target = time.monotonic() - started
                    cpu_to_target = time.process_time() - cpu_started
            if out_of_time:
                break
        best_step, best_valid = min(trainer.history["valid"], key=lambda pair: pair[1])
        checkpoint = trainer.save() if out else None
    return RecipeRun(model, sum(p.numel() for p in trainer.model.parameters()), trainer.step,
                     trainer.step * config.seq_len * config.batch_size / training_s, time_to_target, cpu_to_target, best_valid,
                     best_step, checkpoint)


def format_report(runs: List[RecipeRun], threads: int, time_limit_s: float) -> str:
    """The runs as a Markdown table."""
    lines = [f"Time to {TARGET_NATS} nats validation, preset {DEFAULT_PRESET!r}, {threads} thread(s), "
             f"limit {time_limit_s:g} s",
             "",
             f"| model | parameters | steps | tokens/s | time to {TARGET_NATS} nats | CPU time to it | "
             "best valid (step) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        reached, cpu = "not reached", "-"
        if run.time_to_target_s is not None:
            reached, cpu = f"{run.time_to_target_s:.0f} s", f"{run.cpu_to_target_s:.0f} s"
        lines.append(f"| {run.model} | {run.parameters:,} | {run.steps} | {run.tokens_per_s:,.0f} | {reached} | "
                     f"{cpu} | {run.best_valid:.3f} ({run.best_step}) |")
    return "\n".join(lines)


def recipes_report(models: Iterable[str], threads: int, time_limit_s: float = DEFAULT_TIME_LIMIT_S,
                   data_path: Optional[str] = None) -> str:
    """Train each of ``models`` with its default recipe on ``threads`` threads for at most
    ``time_limit_s`` seconds each (text from ``data_path``, else Tiny Shakespeare from the data
    cache, downloaded once) and report, as a table, the wall time to reach 1.9 nats validation
    and the best validation loss within the limit."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    with _threads(threads):
        runs = [train_recipe(model, time_limit_s, data_path) for model in models]
    return format_report(runs, threads, time_limit_s)


__all__ = ["DEFAULT_TIME_LIMIT_S", "TARGET_NATS", "RecipeRun", "format_report", "recipes_report", "train_recipe"]
