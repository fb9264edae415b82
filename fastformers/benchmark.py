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
    """One op at one shape: ``make_inputs()`` builds leaf tensors, ``run(inputs, backend)`` the output.

    ``baseline`` is timed first and every ratio is relative to it; ``peers``
    are other implementations timed in the same run (e.g. labml_nn, torch's
    grouped GEMM); ``zero_grad(backend)`` clears gradients a run left outside
    the inputs (module parameters)."""

    op: str
    shape: str
    make_inputs: Callable[[], tuple]
    run: Callable[[tuple, str], torch.Tensor]
    dtype: torch.dtype = torch.float32
    baseline: str = "reference"
    peers: tuple = ()
    zero_grad: Optional[Callable[[str], None]] = None


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
        if case.zero_grad is not None:
            case.zero_grad(backend)

    return _median_ms(forward, min_time, max_repeat), _median_ms(forward_backward, min_time, max_repeat)


def fused_backends(device: str) -> list[str]:
    available = _backend.available_backends()
    if device == "cuda":
        return [name for name in ("triton",) if name in available]
    return [name for name in ("cpp",) if name in available]


def run(cases: Iterable[Case], device: str, min_time: float = 0.2) -> list[Result]:
    results = []
    for case in cases:
        ref_fwd, ref_fb = time_case(case, case.baseline, min_time)
        results.append(
            Result(case.op, case.shape, str(case.dtype).replace("torch.", ""), case.baseline, device, ref_fwd, ref_fb,
                   1.0, 1.0)
        )
        for backend in [*case.peers, *fused_backends(device)]:
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


class _SwitchImplementations:
    """The Switch FFN (capacity factor 1, drop_tokens, is_scale_prob, ReLU
    experts without dropout, labml drop policy) of ``T`` tokens ``[64, T/64, d]``
    as labml's experiment lays them out, built from the same seeded weights by
    every implementation:

    - ``labml_nn``: labml_nn's ``SwitchFeedForward`` (Python loop over experts);
    - ``reference``: :class:`fastformers.nn.SwitchFeedForward` on the reference backend;
    - ``grouped_mm``: routing, then ``torch.nn.functional.grouped_mm`` over the
      kept tokens sorted by expert, with weights stored stacked ``[E, ...]``;
    - ``dense``: one FFN d → d_ff → d over all T tokens (the same active parameters);
    - ``cpp`` / ``triton``: :class:`fastformers.nn.SwitchFeedForward` on that backend.

    One implementation's module is alive at a time (at T=4096, d=512, E=64 the
    expert weights alone take 0.5 GB).
    """

    def __init__(self, n_tokens: int, d_model: int, d_ff: int, n_experts: int, device: str, dtype: torch.dtype):
        self.shape = (64, n_tokens // 64, d_model)
        self.d_model, self.d_ff, self.n_experts = d_model, d_ff, n_experts
        self.device, self.dtype = device, dtype
        self.current: Optional[tuple] = None

    def make_inputs(self) -> tuple:
        return (torch.randn(self.shape, device=self.device, dtype=self.dtype, requires_grad=True),)

    def module(self, backend: str) -> torch.nn.Module:
        if self.current is None or self.current[0] != backend:
            self.current = None
            self.current = (backend, self._build(backend).to(self.device, self.dtype))
        return self.current[1]

    def _build(self, backend: str) -> torch.nn.Module:
        from . import nn as ffnn

        torch.manual_seed(0)
        if backend == "dense":
            return ffnn.FeedForward(self.d_model, self.d_ff, dropout=0.0)
        if backend == "labml_nn":
            from labml_nn.transformers.feed_forward import FeedForward
            from labml_nn.transformers.switch import SwitchFeedForward
        else:
            FeedForward, SwitchFeedForward = ffnn.FeedForward, ffnn.SwitchFeedForward
        module = SwitchFeedForward(capacity_factor=1.0, drop_tokens=True, is_scale_prob=True,
                                   n_experts=self.n_experts, expert=FeedForward(self.d_model, self.d_ff, 0.0),
                                   d_model=self.d_model)
        if backend == "grouped_mm":
            return _GroupedMMSwitch(module)
        if backend != "labml_nn":
            module.backend = backend
        return module

    def run(self, inputs: tuple, backend: str) -> torch.Tensor:
        out = self.module(backend)(inputs[0])
        return out if backend == "dense" else out[0]

    def zero_grad(self, backend: str) -> None:
        self.module(backend).zero_grad(set_to_none=True)


class _GroupedMMSwitch(torch.nn.Module):
    """The Switch FFN written with torch's grouped GEMM: expert weights stacked
    ``[E, ...]``, kept tokens gathered in expert order, two
    ``torch.nn.functional.grouped_mm`` calls, biases added per row, scattered back."""

    def __init__(self, labml_layout: torch.nn.Module):
        super().__init__()
        experts = labml_layout.experts
        self.switch = labml_layout.switch
        self.capacity_factor = labml_layout.capacity_factor
        stack = lambda get: torch.nn.Parameter(torch.stack([get(e).detach() for e in experts]))  # noqa: E731
        self.w1 = stack(lambda e: e.layer1.weight)
        self.b1 = stack(lambda e: e.layer1.bias)
        self.w2 = stack(lambda e: e.layer2.weight)
        self.b2 = stack(lambda e: e.layer2.bias)

    def forward(self, x: torch.Tensor):
        from .ops.switch import route

        tokens = x.reshape(-1, x.shape[-1])
        routing = route(self.switch(tokens), self.capacity_factor, True, "labml")
        expert_of_position = routing.route[routing.order]
        position_in_segment = torch.arange(len(tokens), device=x.device) - routing.offsets[expert_of_position]
        is_kept = position_in_segment < routing.kept[expert_of_position]
        rows = routing.order[is_kept]
        row_expert = expert_of_position[is_kept]
        group_ends = torch.cumsum(routing.kept, 0).to(torch.int32)
        hidden = torch.nn.functional.grouped_mm(tokens[rows], self.w1.transpose(1, 2), offs=group_ends)
        hidden = torch.relu(hidden + self.b1[row_expert])
        out = torch.nn.functional.grouped_mm(hidden, self.w2.transpose(1, 2), offs=group_ends) + self.b2[row_expert]
        out = tokens.index_copy(0, rows, out) * routing.route_prob_max.unsqueeze(1)
        return (out.view_as(x),)


def grouped_mm_available(device: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` exists and runs on ``device`` in ``dtype``
    (on CPU in torch 2.13: float32, bfloat16 and float16, not float64)."""
    grouped_mm = getattr(torch.nn.functional, "grouped_mm", None)
    if grouped_mm is None:
        return False
    try:
        a = torch.zeros(4, 8, device=device, dtype=dtype)
        b = torch.zeros(2, 8, 8, device=device, dtype=dtype)
        grouped_mm(a, b, offs=torch.tensor([2, 4], device=device, dtype=torch.int32))
    except RuntimeError:
        return False
    return True


def labml_nn_available() -> bool:
    try:
        import labml_nn.transformers.switch  # noqa: F401
    except ImportError:
        return False
    return True


SWITCH_SHAPES = [(2048, 128, 256, 4), (2048, 128, 256, 16), (2048, 128, 256, 64)]
SWITCH_LARGE_SHAPES = [(4096, 512, 2048, 8), (4096, 512, 2048, 64)]


def switch_cases(device: str = "cpu", dtype: torch.dtype = torch.float32, large: bool = False) -> list[Case]:
    """``SwitchFeedForward`` forward+backward at labml's experiment size
    (T = seq 64 × batch 32, d_model 128, d_ff 256) for E = 4, 16, 64, and with
    ``large`` at the compute-heavy T = 4096, d_model 512, d_ff 2048, E = 8, 64.
    The baseline is labml_nn when importable (else our reference module); the
    peers are torch's grouped GEMM (when it runs here) and the dense FFN."""
    baseline = "labml_nn" if labml_nn_available() else "reference"
    peers = (["grouped_mm"] if grouped_mm_available(device, dtype) else []) + ["dense"]
    cases = []
    for n_tokens, d_model, d_ff, n_experts in SWITCH_SHAPES + (SWITCH_LARGE_SHAPES if large else []):
        impl = _SwitchImplementations(n_tokens, d_model, d_ff, n_experts, device, dtype)
        cases.append(Case("switch", f"T={n_tokens} d={d_model} d_ff={d_ff} E={n_experts}", impl.make_inputs,
                          impl.run, dtype, baseline, tuple(peers), impl.zero_grad))
    return cases


ALL_CASES = {"feedback_memory": feedback_memory_cases, "switch": switch_cases}

