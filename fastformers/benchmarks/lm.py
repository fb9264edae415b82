"""Language-model benchmarks shared by ``fastformers bench train|generate`` and ``bench/test_training.py``.

``train``: training tokens/s of each model in one LM shell, with labml_nn's
modules (when installed), fastformers.nn on the reference backend and on the
automatic (fused) backend, one after the other in the same process.
``generate``: generation tokens/s with the cached step API against
recomputing the whole sequence for every new token.
Only ratios within one run mean anything: these machines are shared.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, List, Optional, Sequence

import torch

from .. import nn as ffnn
from ..models import MODEL_NAMES, build_model, default_model_config, labml_modules
from ..train import backend_context, cross_entropy
from .timing import markdown_table

VOCAB = 65
# Small enough to time on a CPU in seconds; the same for every model so rows compare.
BENCH_MODEL = dict(d_model=128, heads=4, d_ff=256, n_layers=2, mem_len=32, c_mem_len=32, compression_rate=2)
BENCH_SHAPE = dict(seq_len=32, batch_size=8)


@dataclasses.dataclass
class LMResult:
    family: str
    model: str
    variant: str
    device: str
    tokens_per_second: float
    speedup: Optional[float] = None


def _timed(fn: Callable[[], int], min_time: float, min_repeat: int = 2) -> float:
    """Tokens per second of ``fn`` (which returns the tokens it processed), after one warm-up call."""
    fn()
    tokens, start = 0, time.perf_counter()
    repeats = 0
    while repeats < min_repeat or time.perf_counter() - start < min_time:
        tokens += fn()
        repeats += 1
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start)


def training_step_fn(model_name: str, variant: str, device: str) -> Callable[[], int]:
    """One optimizer step of ``model_name`` built from ``variant``'s modules ('labml_nn', 'reference', 'fused')."""
    torch.manual_seed(0)
    config = default_model_config(model_name, VOCAB, **BENCH_MODEL)
    model = build_model(config, labml_modules() if variant == "labml_nn" else ffnn).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    seq_len, batch = BENCH_SHAPE["seq_len"], BENCH_SHAPE["batch_size"]
    state = {"memory": None}

    def step() -> int:
        x = torch.randint(0, VOCAB, (seq_len + 1, batch), device=device)
        with backend_context("reference" if variant == "reference" else "fused"):
            output = model(x[:-1], state["memory"])
            loss = cross_entropy(output.logits, x[1:])
            if output.aux_loss is not None:
                loss = loss + output.aux_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        state["memory"] = output.memory
        return seq_len * batch

    return step


def generation_fn(model_name: str, cached: bool, device: str, prompt_len: int = 16,
                  new_tokens: int = 32) -> Callable[[], int]:
    """Greedy generation of ``new_tokens`` after a random prompt: with the step API, or by
    running the model on the whole sequence for every token."""
    torch.manual_seed(0)
    model = build_model(default_model_config(model_name, VOCAB, **BENCH_MODEL)).to(device).eval()
    prompt = torch.randint(0, VOCAB, (prompt_len, 1), device=device)

    @torch.no_grad()
    def run() -> int:
        if cached:
            logits, state = model.step(prompt)
            for _ in range(new_tokens):
                token = logits[-1].argmax(-1).view(1, 1)
                logits, state = model.step(token, state)
        else:
            sequence = prompt
            for _ in range(new_tokens):
                logits = model.step(sequence)[0]
                sequence = torch.cat((sequence, logits[-1].argmax(-1).view(1, 1)))
        return new_tokens

    return run


def labml_available() -> bool:
    try:
        labml_modules()
    except ImportError:
        return False
    return True


def train_results(device: str, models: Sequence[str] = MODEL_NAMES, min_time: float = 2.0) -> List[LMResult]:
    variants = (["labml_nn"] if labml_available() else []) + ["reference", "fused"]
    results = []
    for name in models:
        baseline = None
        for variant in variants:
            rate = _timed(training_step_fn(name, variant, device), min_time)
            baseline = baseline or rate
            results.append(LMResult("train", name, variant, device, rate, rate / baseline))
    return results


def generate_results(device: str, models: Sequence[str] = MODEL_NAMES, min_time: float = 2.0) -> List[LMResult]:
    results = []
    for name in models:
        full = _timed(generation_fn(name, cached=False, device=device), min_time, min_repeat=1)
        cached = _timed(generation_fn(name, cached=True, device=device), min_time, min_repeat=1)
        results.append(LMResult("generate", name, "full recompute", device, full, 1.0))
        results.append(LMResult("generate", name, "cached step", device, cached, cached / full))
    return results


def format_lm_table(results: List[LMResult]) -> str:
    header = ("family", "model", "variant", "device", "tokens/s", "x")
    rows = [(r.family, r.model, r.variant, r.device, f"{r.tokens_per_second:,.0f}", f"{r.speedup:.2f}")
            for r in results]
    return markdown_table(header, rows)


def describe() -> str:
    shape = ", ".join(f"{k} {v}" for k, v in {**BENCH_MODEL, **BENCH_SHAPE}.items())
    return f"language models at {shape}; x is relative to the first row of each model"


LM_FAMILIES = {"train": train_results, "generate": generate_results}
