"""Benchmark cases of Transformer-XL's relative-position attention against
labml's pad-and-reshape formulation, its compiled form and FlexAttention, and
a whole Transformer-XL training step."""
from __future__ import annotations

from typing import Callable

import torch

from ..ops.xl import naive as xl_naive
from ..ops.xl.op import rel_attention
from .timing import COMPILED_REFERENCE, Case, compile_on_first_call

# Peer of rel_attention: torch's FlexAttention with the positional term passed
# as a materialised bias tensor (the only way it takes XL attention), forward only.
FLEX_ATTENTION = "flex_attention"



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


_compiled_labml_rel_attention = compile_on_first_call(labml_style_rel_attention)


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


def flex_attention_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _compiled_flex_attention(*args, **kwargs):
    from torch.nn.attention.flex_attention import flex_attention

    return compile_on_first_call(flex_attention, dynamic=False)(*args, **kwargs)


def run_rel_attention(inputs, backend):
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
    flex = (FLEX_ATTENTION,) if flex_attention_available() else ()

    def maker(L, M, B, H, d):
        def make():
            K = M + L

            def leaf(*shape):
                return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

            return leaf(L, B, H, d), leaf(K, B, H, d), leaf(K, B, H, d), leaf(K + L, H, d), leaf(K + L, H), leaf(H, d)

        return make

    return [
        Case("rel_attention", f"L={L} M={M} B={B} H={H} d={d}", maker(L, M, B, H, d), run_rel_attention, dtype,
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
        from .. import nn as xl_ns

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
