"""Benchmark cases shared by ``fastformers bench`` and the pytest-benchmark
suite in ``bench/``.

Every case times the labml-style reference and each fused backend in the same
process, one after the other, so only ratios are meaningful.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Iterable, Optional

import torch

from . import _backend
from .ops.feedback.op import feedback_memory


@dataclasses.dataclass
class Case:
    """One op at one shape: ``make_inputs()`` builds leaf tensors, ``run(inputs, backend)`` the output."""

    op: str
    shape: str
    make_inputs: Callable[[], tuple]
    run: Callable[[tuple, str], torch.Tensor]
    dtype: torch.dtype = torch.float32


@dataclasses.dataclass
class Result:
    op: str
    shape: str
    dtype: str
    backend: str
    device: str
    forward_ms: float
    forward_backward_ms: float
    forward_speedup: Optional[float] = None
    forward_backward_speedup: Optional[float] = None


def _labml_feedback_memory(inputs, backend):
    layer_outputs, weights = inputs
    if backend == "reference":
        # labml_nn's FeedbackTransformer: einsum over the stacked layer outputs.
        return torch.einsum("lbd,l->bd", layer_outputs, torch.softmax(weights, 0))
    return feedback_memory(layer_outputs, weights, backend=backend)


def feedback_memory_cases(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[Case]:
    # (n_layers + 1, batch, d_model): tiny per-token decode, labml's experiment
    # (6 layers, batch 64, d_model 512) and a large batch.
    shapes = [(3, 1, 32), (7, 64, 512), (7, 256, 1024)]

    def maker(L, B, D):
        def make():
            x = torch.randn(L, B, D, device=device, dtype=dtype, requires_grad=True)
            w = torch.randn(L, device=device, dtype=dtype, requires_grad=True)
            return x, w

        return make

    return [
        Case("feedback_memory", f"L={L} B={B} D={D}", maker(L, B, D), _labml_feedback_memory, dtype)
        for L, B, D in shapes
    ]


def _median_ms(fn: Callable[[], object], min_time: float, max_repeat: int) -> float:
    fn()  # warm-up: allocator, lazy init
    times = []
    deadline = time.perf_counter() + min_time
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < max_repeat):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def time_case(case: Case, backend: str, min_time: float = 0.2, max_repeat: int = 200) -> tuple[float, float]:
    """Median (forward ms, forward+backward ms) of ``case`` on ``backend``."""
    inputs = case.make_inputs()
    grad = torch.randn_like(case.run(inputs, backend))

    def forward():
        with torch.no_grad():
            case.run(inputs, backend)

    def forward_backward():
        out = case.run(inputs, backend)
        torch.autograd.backward(out, grad)
        for tensor in inputs:
            tensor.grad = None

    return _median_ms(forward, min_time, max_repeat), _median_ms(forward_backward, min_time, max_repeat)


def fused_backends(device: str) -> list[str]:
    available = _backend.available_backends()
    if device == "cuda":
        return [name for name in ("triton",) if name in available]
    return [name for name in ("cpp",) if name in available]


def run(cases: Iterable[Case], device: str, min_time: float = 0.2) -> list[Result]:
    results = []
    for case in cases:
        ref_fwd, ref_fb = time_case(case, "reference", min_time)
        results.append(
            Result(case.op, case.shape, str(case.dtype).replace("torch.", ""), "reference", device, ref_fwd, ref_fb, 1.0, 1.0)
        )
        for backend in fused_backends(device):
            fwd, fb = time_case(case, backend, min_time)
            results.append(
                Result(
                    case.op,
                    case.shape,
                    str(case.dtype).replace("torch.", ""),
                    backend,
                    device,
                    fwd,
                    fb,
                    ref_fwd / fwd,
                    ref_fb / fb,
                )
            )
    return results


def format_table(results: list[Result]) -> str:
    header = ("op", "shape", "dtype", "device", "backend", "fwd ms", "fwd+bwd ms", "fwd x", "fwd+bwd x")
    rows = [
        (
            r.op,
            r.shape,
            r.dtype,
            r.device,
            r.backend,
            f"{r.forward_ms:.4f}",
            f"{r.forward_backward_ms:.4f}",
            f"{r.forward_speedup:.2f}",
            f"{r.forward_backward_speedup:.2f}",
        )
        for r in results
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join(lines)


ALL_CASES = {"feedback_memory": feedback_memory_cases}

