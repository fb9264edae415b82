"""Benchmark cases of the Feedback Transformer ops (memory sum, attention
step) and whole models against labml_nn, and cached generation."""
from __future__ import annotations

import dataclasses
import os
import time

import torch

from ..ops.feedback import naive as feedback_naive
from ..ops.feedback.op import feedback_memory
from ..ops.feedback.step_op import feedback_attention_step
from .timing import Case, Result


def labml_feedback_memory(inputs, backend):
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
        Case("feedback_memory", f"L={L} B={B} D={D}", maker(L, B, D), labml_feedback_memory, dtype)
        for L, B, D in shapes
    ]


def feedback_attention_step_cases(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[Case]:
    """The attention step alone at the last step of the small model and of labml's
    experiment: (steps, batch, heads, d_k), P = 4096. Forward+backward goes
    through the op's own autograd formula, which scatters into full-size
    gradients; the fused modules use the accumulating backward instead."""
    shapes = [(64, 8, 4, 64), (128, 64, 8, 64)]

    def maker(steps, B, H, d):
        def make():
            def leaf(*shape):
                return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

            return leaf(B, H, d), leaf(steps, B, H, d), leaf(steps, B, H, d), leaf(4096, H, d), leaf(4096, H), leaf(H, d)

        return make

    def run(inputs, backend):
        q, k, v, r, s, u = inputs
        steps = k.shape[0]
        scale = q.shape[-1] ** -0.5
        if backend == "reference":
            # labml_nn's FeedbackAttention.get_scores + softmax + weighted sum.
            return feedback_naive.feedback_attention_step(q, k, v, steps, r, s, u, scale)
        return feedback_attention_step(q, k, v, steps, r, s, u, scale, backend=backend)

    return [Case("feedback_attention_step", f"t={t} B={B} H={H} d={d}", maker(t, B, H, d), run, dtype,
                 baseline="reference")
            for t, B, H, d in shapes]


@dataclasses.dataclass(frozen=True)
class FeedbackModelSize:
    seq: int
    batch: int
    d_model: int
    heads: int
    d_ff: int
    n_layers: int

    @property
    def label(self) -> str:
        return f"T={self.seq} B={self.batch} D={self.d_model} H={self.heads} F={self.d_ff} L={self.n_layers}"

    def gflop_fwd_bwd(self, shared_kv: bool) -> float:
        """Matrix-product GFLOP of one forward+backward (3x the forward's 2 flop per
        weight per token); the O(T^2) attention terms are left out."""
        D, F, L = self.d_model, self.d_ff, self.n_layers
        per_token = L * (2 * D * D + 2 * D * F) + (2 * D * D if shared_kv else 2 * L * D * D)
        return 3 * 2 * per_token * self.seq * self.batch / 1e9


SMALL = FeedbackModelSize(64, 8, 256, 4, 1024, 4)
LABML_EXPERIMENT = FeedbackModelSize(128, 64, 512, 8, 2048, 6)


def _labml_namespace():
    """labml_nn's feedback modules (labml 0.5.3 lacks ``tracker.debug``, which labml_nn 0.5.1 calls)."""
    from labml import tracker

    if not hasattr(tracker, "debug"):
        tracker.debug = lambda *args, **kwargs: None
    from labml_nn.transformers import feedback
    from labml_nn.transformers.feed_forward import FeedForward

    return feedback, FeedForward


def build_feedback_model(size: FeedbackModelSize, shared_kv: bool, labml: bool, device="cpu", dtype=torch.float32):
    """labml_nn's model or ours (dropout 0, as labml's experiment), same random weights for the same seed."""
    if labml:
        ns, feed_forward = _labml_namespace()
    else:
        from .. import nn as ns

        feed_forward = ns.FeedForward
    torch.manual_seed(0)
    D, H = size.d_model, size.heads
    layer = ns.FeedbackTransformerLayer(
        d_model=D, attn=ns.FeedbackAttention(H, D, 0.0, is_kv_precomputed=shared_kv),
        feed_forward=feed_forward(D, size.d_ff, 0.0), dropout_prob=0.0)
    model = ns.FeedbackTransformerKV(layer, size.n_layers, D, H) if shared_kv else ns.FeedbackTransformer(layer, size.n_layers)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() == 1 else p.shape[-1] ** -0.5))
    return model.to(device=device, dtype=dtype)


def feedback_model_sizes() -> list[FeedbackModelSize]:
    """The small size always; labml's experiment size (~30 s per labml fwd+bwd here)
    only with ``FASTFORMERS_BENCH_LARGE=1``."""
    sizes = [SMALL]
    if os.environ.get("FASTFORMERS_BENCH_LARGE") == "1":
        sizes.append(LABML_EXPERIMENT)
    return sizes


def feedback_model_cases(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[Case]:
    """Whole models, forward+backward, against labml_nn's module itself (the baseline)."""
    cases = []
    for size in feedback_model_sizes():
        for shared_kv in (True, False):
            models = {}

            def make(size=size):
                return (torch.randn(size.seq, size.batch, size.d_model, device=device, dtype=dtype,
                                    requires_grad=True),)

            def model(backend, size=size, shared_kv=shared_kv, models=models):
                if backend not in models:
                    models[backend] = build_feedback_model(size, shared_kv, backend == "labml_nn", device, dtype)
                    if backend != "labml_nn":
                        models[backend].backend = backend
                return models[backend]

            def run(inputs, backend, shared_kv=shared_kv, model=model):
                out = model(backend)(inputs[0])
                if backend == "labml_nn" and shared_kv:
                    model(backend).free()
                return out

            def zero_grad(backend, model=model):
                model(backend).zero_grad(set_to_none=True)

            name = "FeedbackTransformerKV" if shared_kv else "FeedbackTransformer"
            cases.append(Case(f"{name} vs labml", size.label, make, run, dtype, baseline="labml_nn",
                              zero_grad=zero_grad))
    return cases


def gemm_gflops(n: int = 2048, dtype: torch.dtype = torch.float32, repeat: int = 5) -> float:
    """GFLOP/s of one large ``n x n x n`` GEMM, the machine's practical peak."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / min(times) / 1e9


def generation_tokens_per_s(size: FeedbackModelSize = SMALL, prompt: int = 16, new_tokens: int = 256,
                            backend: str = "cpp") -> dict:
    """Batch-1 continuation of ``new_tokens`` after a ``prompt``: ours with the cached
    state (one step per token) against labml_nn, which re-runs the whole prefix for
    every token. labml's cost grows linearly with the prefix, so it is measured at
    three prefix lengths (first, middle, last token) and integrated (trapezoid)."""
    small = dataclasses.replace(size, batch=1)
    ours = build_feedback_model(small, True, labml=False)
    ours.backend = backend
    labml = build_feedback_model(small, True, labml=True)
    x = torch.randn(prompt + new_tokens, 1, small.d_model)
    with torch.no_grad():
        _, state = ours.forward_with_state(x[:prompt])
        start = time.perf_counter()
        for t in range(prompt, prompt + new_tokens):
            _, state = ours.forward_with_state(x[t:t + 1], state)
        ours_s = time.perf_counter() - start
        lengths = [prompt + 1, prompt + new_tokens // 2, prompt + new_tokens]
        costs = []
        for length in lengths:
            start = time.perf_counter()
            labml(x[:length])
            costs.append(time.perf_counter() - start)
            labml.free()
    # Per-token cost is linear in the prefix length: integrate the two segments.
    labml_s = ((costs[0] + costs[1]) / 2 * (lengths[1] - lengths[0]) + (costs[1] + costs[2]) / 2 * (lengths[2] - lengths[1])
               + costs[0])
    return dict(ours_tokens_per_s=new_tokens / ours_s, labml_tokens_per_s=new_tokens / labml_s,
                speedup=labml_s / ours_s, labml_measured_lengths=lengths, labml_measured_s=costs)


def feedback_model_report(results: list[Result], dtype: torch.dtype = torch.float32) -> str:
    """GFLOP/s of each model result against one large GEMM measured now, and cached generation."""
    peak = gemm_gflops(dtype=dtype)
    sizes = {size.label: size for size in (SMALL, LABML_EXPERIMENT)}
    lines = [f"large {dtype} GEMM (2048^3), measured now: {peak:.1f} GFLOP/s"]
    for r in results:
        size = sizes.get(r.shape)
        if size is None:
            continue
        gflop = size.gflop_fwd_bwd(shared_kv=r.op.startswith("FeedbackTransformerKV"))
        rate = gflop / (r.forward_backward_ms / 1000)
        lines.append(f"{r.op} [{r.backend}] {r.shape}: {gflop:.1f} GFLOP fwd+bwd, {rate:.1f} GFLOP/s "
                     f"= {100 * rate / peak:.0f}% of the GEMM")
    gen = generation_tokens_per_s()
    lines.append(
        f"generation (batch 1, 16-token prompt, 256 new tokens, small size): ours cached "
        f"{gen['ours_tokens_per_s']:.1f} tok/s, labml_nn recompute {gen['labml_tokens_per_s']:.2f} tok/s "
        f"(integrated from prefixes {gen['labml_measured_lengths']}), {gen['speedup']:.1f}x")
    return "\n".join(lines)
