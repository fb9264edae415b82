"""Benchmark cases shared by ``fastformers bench`` and the pytest-benchmark
suite in ``bench/``.

Every case times the labml-style reference and each fused backend in the same
process, one after the other, so only ratios are meaningful.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import time
from typing import Callable, Iterable, Optional

import torch

from . import _backend
from .ops.feedback.op import feedback_memory
from .ops.xl import naive as xl_naive
from .ops.xl.op import rel_attention


@dataclasses.dataclass
class Case:
    """One op at one shape: ``make_inputs()`` builds leaf tensors, ``run(inputs, backend)`` the output."""

    op: str
    shape: str
    make_inputs: Callable[[], tuple]
    run: Callable[[tuple, str], torch.Tensor]
    dtype: torch.dtype = torch.float32
    # Further implementations ``run`` understands, timed beside the reference (e.g. torch.compile of it).
    peers: tuple = ()
    # Also measure the peak memory of forward+backward (see peak_memory_mb).
    measure_memory: bool = False


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
    peak_memory_mb: Optional[float] = None


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


def _shift_right(x: torch.Tensor) -> torch.Tensor:
    """labml's shift: row i of ``x [L, N, ...]`` moves i columns right, by padding
    a zero column and re-reading the buffer with one more row."""
    padded = torch.cat((x, x.new_zeros(x.shape[0], 1, *x.shape[2:])), dim=1)
    return padded.view(x.shape[1] + 1, x.shape[0], *x.shape[2:])[:-1].view_as(x)


def labml_style_rel_attention(query, key, value, pos_emb_full, pos_bias_full, query_pos_bias, scale):
    """Relative attention the way labml_nn computes it: positional scores for all
    ``K + L`` table rows ``P - K .. P + L - 1`` (``pos_emb_full [K + L, H, d]``),
    shifted by pad-and-reshape, then masked softmax over ``[L, K, B, H]``."""
    L, K = query.shape[0], key.shape[0]
    content = torch.einsum("ibhd,jbhd->ijbh", query + query_pos_bias, key)
    position = torch.einsum("ibhd,jhd->ijbh", query, pos_emb_full) + pos_bias_full[None, :, None, :]
    scores = (content + _shift_right(position)[:, -K:]) * scale
    visible = xl_naive.causal_mask(L, K, query.device)[:, :, None, None]
    attn = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=1)
    return torch.einsum("ijbh,jbhd->ibhd", attn, value)


_compiled_labml_rel_attention = None


def _run_rel_attention(inputs, backend):
    global _compiled_labml_rel_attention
    q, k, v, pos_emb_full, pos_bias_full, u = inputs
    scale = q.shape[-1] ** -0.5
    if backend == "reference":
        return labml_style_rel_attention(q, k, v, pos_emb_full, pos_bias_full, u, scale)
    if backend == "torch.compile(reference)":
        if _compiled_labml_rel_attention is None:
            _compiled_labml_rel_attention = torch.compile(labml_style_rel_attention, dynamic=False)
        return _compiled_labml_rel_attention(q, k, v, pos_emb_full, pos_bias_full, u, scale)
    # The op's window is rows P - K + 1 .. P + L - 1: all but the first of labml's.
    return rel_attention(q, k, v, pos_emb_full[1:], pos_bias_full[1:], u, scale, causal=True, backend=backend)


def rel_attention_cases(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[Case]:
    # (L, M, B, H, d): labml's Transformer-XL experiment size, a long segment
    # with long memory, and one decode step over 512 memories.
    shapes = [(128, 128, 32, 4, 32), (512, 512, 8, 8, 64), (1, 512, 32, 8, 64)]

    def maker(L, M, B, H, d):
        def make():
            K = M + L

            def leaf(*shape):
                return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

            return leaf(L, B, H, d), leaf(K, B, H, d), leaf(K, B, H, d), leaf(K + L, H, d), leaf(K + L, H), leaf(H, d)

        return make

    return [
        Case("rel_attention", f"L={L} M={M} B={B} H={H} d={d}", maker(L, M, B, H, d), _run_rel_attention, dtype,
             peers=("torch.compile(reference)",), measure_memory=device == "cpu")
        for L, M, B, H, d in shapes
    ]


def transformer_xl_step(implementation: str, device: str = "cpu", *, seq_len: int = 128, mem_len: int = 128,
                        batch: int = 32, d_model: int = 128, heads: int = 4, n_layers: int = 6) -> Callable[[], None]:
    """One training step (forward, backward, SGD update) of a TransformerXL at
    labml's experiment size, without dropout as labml's experiment runs it.
    ``implementation``: ``"labml_nn"``, or a fastformers backend for ours with
    the same weights. Returns the step as a closure."""
    torch.manual_seed(0)
    if implementation == "labml_nn":
        from labml import tracker
        from labml_nn.transformers import feed_forward as ff_ns
        from labml_nn.transformers import xl as xl_ns

        if not hasattr(tracker, "debug"):  # labml 0.5.3 lacks what labml_nn 0.5.1 calls
            tracker.debug = lambda *args, **kwargs: None
        attention_class = xl_ns.RelativeMultiHeadAttention
    else:
        from . import nn as xl_ns

        ff_ns = xl_ns
        attention_class = xl_ns.RelativeMultiHeadAttention
    layer = xl_ns.TransformerXLLayer(d_model=d_model, self_attn=attention_class(heads, d_model, 0.0),
                                     feed_forward=ff_ns.FeedForward(d_model, 2 * d_model, 0.0), dropout_prob=0.0)
    model = xl_ns.TransformerXL(layer, n_layers).to(device)
    if implementation != "labml_nn":
        for module in model.modules():
            if hasattr(module, "last_backend"):
                module.backend = implementation
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = torch.randn(seq_len, batch, d_model, device=device)
    mem = [torch.randn(mem_len, batch, d_model, device=device) for _ in range(n_layers)]
    mask = torch.cat((torch.ones(seq_len, mem_len, 1, dtype=torch.bool),
                      torch.tril(torch.ones(seq_len, seq_len, 1)).bool()), dim=1).to(device)
    target = torch.randn(seq_len, batch, d_model, device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        out, _ = model(x, mem, mask)
        torch.nn.functional.mse_loss(out, target).backward()
        optimizer.step()

    return step


def peak_memory_mb(case: Case, backend: str) -> float:
    """Peak CPU memory allocated by one forward+backward of ``case`` beyond what
    existed before it (inputs, output gradient), in MiB: the maximum of the
    allocator's running total in a ``torch.profiler`` trace with
    ``profile_memory=True``. Counts every tensor the step allocates, saved
    activations and transients alike (not the allocator's cache, not Python objects)."""
    inputs = case.make_inputs()
    grad = torch.randn_like(case.run(inputs, backend))
    for tensor in inputs:
        tensor.grad = None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.autograd.backward(case.run(inputs, backend), grad)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as handle:
            events = [e for e in json.load(handle)["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        return 0.0
    events.sort(key=lambda e: e["ts"])
    before = events[0]["args"]["Total Allocated"] - events[0]["args"]["Bytes"]
    return (max(e["args"]["Total Allocated"] for e in events) - before) / 2**20


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
        dtype = str(case.dtype).replace("torch.", "")
        ref_fwd, ref_fb = time_case(case, "reference", min_time)
        ref_memory = peak_memory_mb(case, "reference") if case.measure_memory else None
        results.append(Result(case.op, case.shape, dtype, "reference", device, ref_fwd, ref_fb, 1.0, 1.0, ref_memory))
        for backend in (*case.peers, *fused_backends(device)):
            fwd, fb = time_case(case, backend, min_time)
            memory = peak_memory_mb(case, backend) if case.measure_memory else None
            results.append(
                Result(case.op, case.shape, dtype, backend, device, fwd, fb, ref_fwd / fwd, ref_fb / fb, memory)
            )
    return results


def format_table(results: list[Result]) -> str:
    header = ("op", "shape", "dtype", "device", "backend", "fwd ms", "fwd+bwd ms", "fwd x", "fwd+bwd x", "peak MiB")
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
            "-" if r.peak_memory_mb is None else f"{r.peak_memory_mb:.1f}",
        )
        for r in results
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join(lines)


ALL_CASES = {"feedback_memory": feedback_memory_cases, "rel_attention": rel_attention_cases}

