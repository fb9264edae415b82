"""Benchmark cases shared by ``fastformers bench`` and the pytest-benchmark
suite in ``bench/``.

Every case times the labml-style reference and each fused backend in the same
process, one after the other, so only ratios are meaningful.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import statistics
import time
from typing import Callable, Iterable, Optional

import torch

from . import _backend
from .ops.compressive import naive as compressive_naive
from .ops.compressive.op import attention_reconstruction_loss, conv_compress
from .ops.feedback import naive as feedback_naive
from .ops.feedback.op import feedback_memory
from .ops.feedback.step_op import feedback_attention_step
from .ops.xl import naive as xl_naive
from .ops.xl.op import rel_attention

# Peer backend: the reference under torch.compile, compiled once (on the first,
# untimed call) and then timed like the others.
COMPILED_REFERENCE = "compile(reference)"
# Peer of rel_attention: torch's FlexAttention with the positional term passed
# as a materialised bias tensor (the only way it takes XL attention), forward only.
FLEX_ATTENTION = "flex_attention"


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
    # Implementation the ratios are taken against (labml_nn's module where one exists).
    baseline: str = "reference"
    peers: tuple = ()
    # Peers timed for the forward pass only (their backward does not run here).
    forward_only_peers: tuple = ()
    measure_memory: bool = False
    # Clears gradients a case keeps outside its inputs (module parameters).
    zero_grad: Optional[Callable[[str], None]] = None
    # Runs after each timed backward (e.g. an optimizer step): whole training-step cases.
    update: Optional[Callable[[str], None]] = None
    # Seconds per repetition or more: timed only in a full run (``quick_cases`` skips it).
    heavy: bool = False


@dataclasses.dataclass
class Result:
    op: str
    shape: str
    dtype: str
    backend: str
    device: str
    forward_ms: float
    forward_backward_ms: Optional[float]
    forward_speedup: Optional[float] = None
    forward_backward_speedup: Optional[float] = None
    peak_mib: Optional[float] = None
    peak_memory_ratio: Optional[float] = None


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
        from . import nn as ns

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


@functools.cache
def _compiled(fn: Callable, **options) -> Callable:
    """``torch.compile(fn, **options)``, compiled on the first call (bench runs only)."""
    compiled = None

    def run(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn, **options)
        return compiled(*args, **kwargs)

    return run


def conv_compress_cases(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[Case]:
    # (M, B, D, c): the memory labml's experiment compresses each step (the
    # segment of 8 that falls out, batch 32, d_model 128, rate 2) and a larger one.
    shapes = [(8, 32, 128, 2), (128, 16, 512, 4)]
    cases = []
    for M, B, D, c in shapes:
        reference = compressive_naive.conv_compress
        compiled = _compiled(reference)

        def make(M=M, B=B, D=D, c=c):
            mem = torch.randn(M, B, D, device=device, dtype=dtype, requires_grad=True)
            weight = (torch.randn(D, D, c, device=device, dtype=dtype) / math.sqrt(D * c)).requires_grad_()
            bias = torch.randn(D, device=device, dtype=dtype, requires_grad=True)
            return mem, weight, bias

        def run(inputs, backend, compiled=compiled):
            if backend == "reference":
                return compressive_naive.conv_compress(*inputs)  # labml: permute, nn.Conv1d, permute
            if backend == COMPILED_REFERENCE:
                return compiled(*inputs)
            return conv_compress(*inputs, backend=backend)

        cases.append(Case("conv_compress", f"M={M} B={B} D={D} c={c}", make, run, dtype,
                          peers=(COMPILED_REFERENCE,), measure_memory=True))
    return cases


def attention_reconstruction_loss_cases(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[Case]:
    # (L, M, c, B, D, H): labml's experiment (h [8, 32, 128] against the 8
    # memories being compressed at rate 2, 4 heads) and a larger layer.
    shapes = [(8, 8, 2, 32, 128, 4), (32, 128, 4, 16, 256, 4)]
    cases = []
    for L, M, c, B, D, H in shapes:
        gen = torch.Generator().manual_seed(0)
        rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(device, dtype)  # noqa: E731
        layer = (1 + rand(D, scale=0.1), rand(D, scale=0.1), 1e-5, rand(D, D, scale=D**-0.5), None,
                 rand(D, D, scale=D**-0.5), None, rand(D, D, scale=D**-0.5), rand(D, scale=0.1), H, (D // H) ** -0.5)
        compiled = _compiled(compressive_naive.attention_reconstruction_loss)

        def make(L=L, M=M, c=c, B=B, D=D):
            h = torch.randn(L, B, D, device=device, dtype=dtype)
            mem = torch.randn(M, B, D, device=device, dtype=dtype)
            return h, mem, torch.randn(M // c, B, D, device=device, dtype=dtype, requires_grad=True)

        def run(inputs, backend, layer=layer, compiled=compiled):
            h, mem, c_mem = inputs
            norm_w, norm_b, eps, *rest = layer
            args = (h, mem, c_mem, norm_w, norm_b, eps, *rest)
            if backend == "reference":
                return compressive_naive.attention_reconstruction_loss(*args)  # labml's formulation
            if backend == COMPILED_REFERENCE:
                return compiled(*args)
            return attention_reconstruction_loss(*args, backend=backend)

        cases.append(Case("attention_reconstruction_loss", f"L={L} M={M} c={c} B={B} D={D} H={H}", make, run, dtype,
                          peers=(COMPILED_REFERENCE,), measure_memory=True))
    return cases


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


_compiled_labml_rel_attention = _compiled(labml_style_rel_attention)


def flex_rel_attention(query, key, value, pos_emb_full, pos_bias_full, query_pos_bias, scale):
    """XL attention through ``flex_attention``: the positional term is computed
    and shifted as labml does, then handed over as a ``[B, H, L, K]`` bias that
    ``score_mod`` reads, with the causal-with-memory mask in ``score_mod`` too.
    Forward only: FlexAttention has no CPU backward, and refuses inputs that
    require grad even under ``no_grad``, so they are detached."""
    query, key, value, pos_emb_full, pos_bias_full, query_pos_bias = (
        x.detach() for x in (query, key, value, pos_emb_full, pos_bias_full, query_pos_bias))
    L, K = query.shape[0], key.shape[0]
    M = K - L
    position = torch.einsum("ibhd,jhd->ijbh", query, pos_emb_full) + pos_bias_full[None, :, None, :]
    bias = (_shift_right(position)[:, -K:] * scale).permute(2, 3, 0, 1)

    def score_mod(score, b, h, q_index, k_index):
        return torch.where(k_index <= q_index + M, score + bias[b, h, q_index, k_index], -float("inf"))

    def heads_first(x):
        return x.permute(1, 2, 0, 3)

    out = _compiled_flex_attention(heads_first(query + query_pos_bias), heads_first(key), heads_first(value),
                                   score_mod=score_mod, scale=scale)
    return out.permute(2, 0, 1, 3)


def _flex_attention_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _compiled_flex_attention(*args, **kwargs):
    from torch.nn.attention.flex_attention import flex_attention

    return _compiled(flex_attention, dynamic=False)(*args, **kwargs)


def _run_rel_attention(inputs, backend):
    q, k, v, pos_emb_full, pos_bias_full, u = inputs
    scale = q.shape[-1] ** -0.5
    if backend == "reference":
        return labml_style_rel_attention(q, k, v, pos_emb_full, pos_bias_full, u, scale)
    if backend == COMPILED_REFERENCE:
        return _compiled_labml_rel_attention(q, k, v, pos_emb_full, pos_bias_full, u, scale)
    if backend == FLEX_ATTENTION:
        return flex_rel_attention(q, k, v, pos_emb_full, pos_bias_full, u, scale)
    # The op's window is rows P - K + 1 .. P + L - 1: all but the first of labml's.
    return rel_attention(q, k, v, pos_emb_full[1:], pos_bias_full[1:], u, scale, causal=True, backend=backend)


def rel_attention_cases(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[Case]:
    # (L, M, B, H, d): labml's Transformer-XL experiment size, a long segment
    # with long memory, and one decode step over 512 memories.
    shapes = [(128, 128, 32, 4, 32), (512, 512, 8, 8, 64), (1, 512, 32, 8, 64)]
    flex = (FLEX_ATTENTION,) if _flex_attention_available() else ()

    def maker(L, M, B, H, d):
        def make():
            K = M + L

            def leaf(*shape):
                return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

            return leaf(L, B, H, d), leaf(K, B, H, d), leaf(K, B, H, d), leaf(K + L, H, d), leaf(K + L, H), leaf(H, d)

        return make

    return [
        Case("rel_attention", f"L={L} M={M} B={B} H={H} d={d}", maker(L, M, B, H, d), _run_rel_attention, dtype,
             peers=(COMPILED_REFERENCE,), forward_only_peers=flex, measure_memory=device == "cpu", heavy=L > 128)
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


class CompressiveTrainingStep:
    """Training steps of the Compressive Transformer language model at labml_nn's
    experiment configuration (seq 8, mem 8, c_mem 128, compression rate 2,
    batch 32, d_model 128, 4 heads, d_ff 256, 6 layers, no dropout): forward,
    memory merge and compression, cross-entropy plus the attention-reconstruction
    loss, backward, then (:meth:`update`) gradient clipping at 1 and AdamW
    (lr 2.5e-4), as labml's experiment steps. Every implementation runs the same
    optimizer, torch's fused AdamW (labml's experiment uses its own Python
    ``AdamWarmup``): the ~6.3M parameters of the positional tables
    (``[2P, H, d_k]`` per layer) make the update a fixed cost the model's
    kernels cannot change, so the fastest stock update keeps it from hiding them.

    Implementations: ``labml_nn`` (labml's modules, labml's whole-history
    ``cat``/``split`` merge), ``reference`` (fastformers.nn on the reference
    backend), a fused backend (``cpp`` on CPU), and that fused backend with the
    relative attention on the reference (:attr:`without_rel_attention`), which
    isolates what the ``rel_attention`` kernel adds. Each keeps its own model,
    optimizer and memory; memories start full (random ``mem`` and ``c_mem``),
    so every timed step is the steady state: 8 steps fall out and 4 compressed
    ones evict the oldest.
    """

    def __init__(self, device: str = "cpu", dtype: torch.dtype = torch.float32, n_tokens: int = 65):
        from .models import default_model_config

        self.device, self.dtype = device, dtype
        self.config = default_model_config("compressive", n_tokens)
        self.seq_len, self.batch = 8, 32
        self._states: dict = {}

    @staticmethod
    def without_rel_attention(backend: str) -> str:
        return f"{backend}, rel_attention on reference"

    def label(self) -> str:
        c = self.config
        return (f"L={self.seq_len} M={c.mem_len} N={c.c_mem_len} c={c.compression_rate} B={self.batch} "
                f"D={c.d_model} H={c.heads} F={c.d_ff} layers={c.n_layers}")

    def make_inputs(self) -> tuple:
        """Token ids ``[L + 1, B]``: the segment and its targets."""
        return (torch.randint(0, self.config.n_tokens, (self.seq_len + 1, self.batch), device=self.device),)

    def _state(self, implementation: str) -> dict:
        if implementation in self._states:
            return self._states[implementation]
        from . import nn as ffnn
        from .models import build_model, labml_modules

        c = self.config
        torch.manual_seed(0)
        lm = build_model(c, labml_modules() if implementation == "labml_nn" else ffnn)
        lm = lm.to(device=self.device, dtype=self.dtype).train()
        gen = torch.Generator().manual_seed(1)
        full = lambda length: [  # noqa: E731
            torch.randn(length, self.batch, c.d_model, generator=gen).to(self.device, self.dtype)
            for _ in range(c.n_layers)
        ]
        mem, c_mem = full(c.mem_len), full(c.c_mem_len)
        if implementation == "labml_nn":
            memory = (mem, c_mem)
        else:
            # The fused rows leave every op on the automatic choice (the named
            # backend where the op has a kernel for it, its reference otherwise).
            backend, _, without_rel_attention = implementation.partition(", ")
            chosen = "reference" if backend == "reference" else None
            for module in lm.modules():
                if hasattr(module, "last_backend"):
                    module.backend = chosen
                if without_rel_attention and isinstance(module, ffnn.RelativeMultiHeadAttention):
                    module.backend = "reference"
            lm.reconstruction_loss.backend = chosen
            memory = lm.new_memory()
            memory.load_state_dict({"mem": mem, "c_mem": c_mem})
        state = dict(lm=lm, memory=memory, optimizer=torch.optim.AdamW(lm.parameters(), lr=2.5e-4, fused=True))
        self._states[implementation] = state
        return state

    def run(self, inputs: tuple, implementation: str) -> torch.Tensor:
        """The step's loss (scalar) on ``inputs``; advances that implementation's memory."""
        from .models.language_models import causal_mask
        from .nn.compressive import cat_split_merge
        from .train import cross_entropy

        state = self._state(implementation)
        lm, tokens = state["lm"], inputs[0]
        x, targets = tokens[:-1], tokens[1:]
        if implementation != "labml_nn":
            output = lm(x, state["memory"])
            loss = cross_entropy(output.logits, targets)
            return loss if output.aux_loss is None else loss + output.aux_loss
        c = self.config
        mem, c_mem = state["memory"]
        mask = causal_mask(x.shape[0], mem[0].shape[0] + c_mem[0].shape[0], x.device)
        hidden, new_mem = lm.transformer(lm.src_embed(x), mem, c_mem, mask)
        loss = cross_entropy(lm.generator(hidden), targets)
        compress = [layer.compress for layer in lm.transformer.layers]
        mem, c_mem, old = cat_split_merge(mem, c_mem, new_mem, compress, c.mem_len, c.c_mem_len, c.compression_rate)
        state["memory"] = (mem, c_mem)
        return loss + lm.reconstruction_loss(new_mem, old) if old else loss

    def update(self, implementation: str) -> None:
        """Clip the gradients at norm 1, take the AdamW step, clear the gradients."""
        state = self._state(implementation)
        torch.nn.utils.clip_grad_norm_(state["lm"].parameters(), max_norm=1.0)
        state["optimizer"].step()
        state["optimizer"].zero_grad(set_to_none=True)


def compressive_model_cases(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[Case]:
    """The whole Compressive training step against labml_nn's (the baseline); the
    fused backend with and without the ``rel_attention`` kernel. "fwd" is the
    forward with the memory merge and both losses; "fwd+bwd" the whole step
    (backward, clipping, AdamW)."""
    if not labml_nn_available():
        return []
    steps = CompressiveTrainingStep(device, dtype)
    peers = ["reference", *(steps.without_rel_attention(name) for name in fused_backends(device))]
    return [Case("Compressive training step vs labml", steps.label(), steps.make_inputs, steps.run, dtype,
                 baseline="labml_nn", peers=tuple(peers), update=steps.update)]


def compressive_training_step(implementation: str, device: str = "cpu") -> Callable[[], None]:
    """One :class:`CompressiveTrainingStep` of ``implementation`` as a closure (for pytest-benchmark)."""
    steps = CompressiveTrainingStep(device)
    inputs = steps.make_inputs()

    def step():
        steps.run(inputs, implementation).backward()
        steps.update(implementation)

    return step


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of bytes allocated minus bytes freed while ``fn`` runs, from the
    allocator events torch.profiler records (CPU tensors, every op incl. C++)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


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


def time_case(case: Case, backend: str, min_time: float = 0.2, max_repeat: int = 200, forward_only: bool = False):
    """Median (forward ms, forward+backward ms) of ``case`` on ``backend``, and the
    peak bytes of one forward+backward when ``case.measure_memory`` (else None).
    With ``forward_only`` the forward+backward time and the peak are None."""
    inputs = case.make_inputs()

    def forward():
        with torch.no_grad():
            case.run(inputs, backend)

    fwd = _median_ms(forward, min_time, max_repeat)
    if forward_only:
        return fwd, None, None
    grad = torch.randn_like(case.run(inputs, backend))

    def forward_backward():
        out = case.run(inputs, backend)
        torch.autograd.backward(out, grad)
        if case.update is not None:
            case.update(backend)
        for tensor in inputs:
            tensor.grad = None
        if case.zero_grad is not None:
            case.zero_grad(backend)

    fb = _median_ms(forward_backward, min_time, max_repeat)
    peak = peak_bytes(forward_backward) if case.measure_memory and inputs[0].device.type == "cpu" else None
    return fwd, fb, peak


def fused_backends(device: str) -> list[str]:
    available = _backend.available_backends()
    if device == "cuda":
        return [name for name in ("triton",) if name in available]
    return [name for name in ("cpp",) if name in available]


def run(cases: Iterable[Case], device: str, min_time: float = 0.2) -> list[Result]:
    results = []
    for case in cases:
        dtype = str(case.dtype).replace("torch.", "")
        ref_fwd, ref_fb, ref_peak = time_case(case, case.baseline, min_time)
        mib = lambda peak: None if peak is None else peak / 2**20  # noqa: E731
        results.append(Result(case.op, case.shape, dtype, case.baseline, device, ref_fwd, ref_fb, 1.0, 1.0,
                              mib(ref_peak), 1.0 if ref_peak else None))
        timed = [(backend, False) for backend in [*case.peers, *fused_backends(device)]]
        timed += [(backend, True) for backend in case.forward_only_peers]
        for backend, forward_only in timed:
            fwd, fb, peak = time_case(case, backend, min_time, forward_only=forward_only)
            results.append(
                Result(case.op, case.shape, dtype, backend, device, fwd, fb, ref_fwd / fwd,
                       None if fb is None else ref_fb / fb, mib(peak),
                       peak / ref_peak if peak is not None and ref_peak else None)
            )
    return results


def format_table(results: list[Result]) -> str:
    header = ("op", "shape", "dtype", "device", "backend", "fwd ms", "fwd+bwd ms", "fwd x", "fwd+bwd x")
    with_memory = any(r.peak_mib is not None for r in results)
    if with_memory:
        header += ("peak MiB", "peak / ref")
    rows = []
    for r in results:
        row = (r.op, r.shape, r.dtype, r.device, r.backend, f"{r.forward_ms:.4f}",
               "-" if r.forward_backward_ms is None else f"{r.forward_backward_ms:.4f}",
               f"{r.forward_speedup:.2f}",
               "-" if r.forward_backward_speedup is None else f"{r.forward_backward_speedup:.2f}")
        if with_memory:
            row += ("-" if r.peak_mib is None else f"{r.peak_mib:.3f}",
                    "-" if r.peak_memory_ratio is None else f"{r.peak_memory_ratio:.2f}")
        rows.append(row)
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
                          impl.run, dtype, baseline=baseline, peers=tuple(peers), zero_grad=impl.zero_grad))
    return cases


def transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


# switch-base-8's widths; fewer layers (one sparse layer in the encoder and one in the decoder) for a CPU run
SWITCH_BASE_8 = dict(d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_experts=8, expert_capacity=64,
                     vocab_size=32128, num_layers=2, num_decoder_layers=2, encoder_sparse_step=2,
                     decoder_sparse_step=2, decoder_start_token_id=0, pad_token_id=0)


class _HFSwitch:
    """Hugging Face ``SwitchTransformersForConditionalGeneration`` from a config
    with switch-base-8's widths (random weights) and the same model after
    :func:`fastformers.convert`; implementation ``"hf"`` is HF's, a fused
    backend name the converted one on that backend. ``sparse_mlp`` times the
    first sparse MLP alone on ``[batch, seq, d_model]`` activations instead
    of the whole model. One implementation's model is alive at a time."""

    def __init__(self, device: str, dtype: torch.dtype, batch: int, seq_len: int, target_len: int,
                 sparse_mlp: bool):
        self.device, self.dtype = device, dtype
        self.batch, self.seq_len, self.target_len, self.sparse_mlp = batch, seq_len, target_len, sparse_mlp
        self.current: Optional[tuple] = None

    def label(self) -> str:
        config = SWITCH_BASE_8
        what = "sparse MLP" if self.sparse_mlp else (f"{config['num_layers']}+{config['num_decoder_layers']} layers, "
                                                     f"target {self.target_len}")
        return (f"B={self.batch} S={self.seq_len} d={config['d_model']} d_ff={config['d_ff']} "
                f"E={config['num_experts']} ({what})")

    def _build(self, implementation: str) -> tuple:
        import transformers

        from . import convert

        torch.manual_seed(0)
        model = transformers.SwitchTransformersForConditionalGeneration(
            transformers.SwitchTransformersConfig(**SWITCH_BASE_8)).to(self.device, self.dtype)
        if self.sparse_mlp:
            model = next(m for m in model.modules() if type(m).__name__ == "SwitchTransformersSparseMLP")
        if implementation != "hf":
            model = convert(model, backend=implementation)
        # built after convert, which gives the experts new Parameters
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        return model, optimizer

    def _state(self, implementation: str) -> tuple:
        if self.current is None or self.current[0] != implementation:
            self.current = None
            self.current = (implementation, *self._build(implementation))
        return self.current[1:]

    def make_inputs(self) -> tuple:
        generator = torch.Generator().manual_seed(1)
        if self.sparse_mlp:
            x = torch.randn(self.batch, self.seq_len, SWITCH_BASE_8["d_model"], generator=generator)
            return (x.to(self.device, self.dtype).requires_grad_(),)
        vocab = SWITCH_BASE_8["vocab_size"]
        return (torch.randint(1, vocab, (self.batch, self.seq_len), generator=generator).to(self.device),
                torch.randint(1, vocab, (self.batch, self.target_len), generator=generator).to(self.device))

    def run(self, inputs: tuple, implementation: str) -> torch.Tensor:
        model, _ = self._state(implementation)
        if self.sparse_mlp:
            # the router jitters its float32 input in place, which a leaf cannot take
            return model.train()(inputs[0].clone())
        # timed without gradients ("fwd"): the eval forward; with them ("fwd+bwd"): a training step
        model.train(torch.is_grad_enabled())
        return model(input_ids=inputs[0], labels=inputs[1], output_router_logits=True).loss

    def zero_grad(self, implementation: str) -> None:
        self._state(implementation)[0].zero_grad(set_to_none=True)

    def update(self, implementation: str) -> None:
        model, optimizer = self._state(implementation)
        if not self.sparse_mlp:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def switch_hf_cases(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[Case]:
    """Hugging Face Switch Transformers (switch-base-8 widths: d_model 768,
    d_ff 3072, 8 experts, capacity 64, dropout 0.1, jitter 0.01) against the
    same model after :func:`fastformers.convert`, in the same run: the sparse
    MLP alone (forward, forward+backward, training mode), and the whole
    ``SwitchTransformersForConditionalGeneration`` with two encoder and two
    decoder layers, where "fwd" is the eval forward and "fwd+bwd" one
    training step (forward with the router losses, backward, AdamW). Empty
    without ``transformers``."""
    if not transformers_available():
        return []
    cases = []
    for sparse_mlp in (True, False):
        impl = _HFSwitch(device, dtype, batch=4, seq_len=128, target_len=32, sparse_mlp=sparse_mlp)
        op = "HF SwitchTransformersSparseMLP" if sparse_mlp else "HF Switch model (fwd: eval, fwd+bwd: train step)"
        cases.append(Case(op, impl.label(), impl.make_inputs, impl.run, dtype, baseline="hf",
                          zero_grad=impl.zero_grad, update=impl.update))
    return cases


def quick_cases(cases: list[Case]) -> list[Case]:
    """``cases`` without the heavy shapes and the compiled peers (torch.compile of
    the reference, FlexAttention: compilation alone takes tens of seconds): the
    default ``fastformers bench``."""
    return [
        dataclasses.replace(case, peers=tuple(p for p in case.peers if p != COMPILED_REFERENCE), forward_only_peers=())
        for case in cases
        if not case.heavy
    ]


ALL_CASES = {
    "feedback_memory": feedback_memory_cases,
    "feedback_attention_step": feedback_attention_step_cases,
    "feedback_model": feedback_model_cases,
    "conv_compress": conv_compress_cases,
    "attention_reconstruction_loss": attention_reconstruction_loss_cases,
    "rel_attention": rel_attention_cases,
    "compressive_model": compressive_model_cases,
    "switch": switch_cases,
    "switch_hf": switch_hf_cases,
}

