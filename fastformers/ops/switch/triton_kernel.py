"""Triton kernels of the Switch Transformer's grouped expert FFN
(``switch_mlp`` and ``switch_mlp_backward`` on CUDA), scattermoe style.

Tokens stay where they are: ``order`` groups them by expert (segment
``offsets[e] : offsets[e + 1]``, its first ``kept[e]`` kept) and every kernel
reads and writes token rows through it, so no gathered or scattered copy of x,
y or their gradients exists. A tile is ``BLOCK_M`` consecutive positions of
one expert's segment; the tile schedule (expert, first position, end of the
kept rows, end of the segment) is built on the device from ``offsets`` and
``kept`` by a few torch ops, and the grid is its upper bound ``T // BLOCK_M +
min(E, T)`` tiles, so nothing waits for the host to learn the counts. Tiles
past the end, and the GEMM part of tiles with no kept row, do no work.

Forward, two grouped GEMMs:

- ``switch_in_kernel``: ``hidden[p] = x[order[p]] · W1[e]ᵀ + b1[e]`` (and the
  gate ``x · Wgᵀ + bg`` in the second half of the row), the rows of x gathered
  by index inside the loads; zero on dropped rows. ``hidden`` (order layout) is
  the op's saved pre-activation.
- ``switch_out_kernel``: ``y[order[p]] = scale · dropout(act(h) [· v]) · W2[e]ᵀ + b2[e]``,
  the activation (and the dropout mask) applied in registers to the A operand
  as it is loaded, the bias, scale and scatter to the token's row in the
  epilogue; dropped rows write ``scale · x``.

Dropout (``threshold`` > 0) keeps hidden element ``(t, f)`` of token row
``t`` by Philox bit ``t · d_ff + f`` of the call's ``(seed, offset)`` (mask
layout ``[T, d_ff]`` by token row, as the reference and the C++ kernel); the
three kernels that read the activations regenerate it, nothing is stored. It
is a branch on the runtime ``threshold`` (uniform over the grid), not a
constexpr: a DROPOUT constexpr doubled these kernels' builds to 180, which
took the AOT check of the package past its time limit on a 2-core machine;
the p = 0 path skips the Philox rounds all the same (the gradient kernel
multiplies by an exact 1.0 instead). The multiplier ``1 / (1 - p)`` is read
from a one-element tensor of the accumulator dtype: a float argument would
reach the kernel as float32, too coarse for float64 parity.

Backward, four kernels: ``switch_grad_hidden_kernel`` (``G = grad_y · W2[e]``
per position, then the activation's backward into ``grad_hidden`` and the
scale's gradient ``Σ_f G·a + grad_y·b2`` as per-column-block partial sums),
``switch_grad_x_kernel`` (``grad_hidden · [W1; Wg]`` scattered to token rows;
``scale · grad_y`` for dropped ones) and, per expert, the weight gradients
``switch_grad_w_in_kernel`` (``grad_hiddenᵀ · x``) and
``switch_grad_w_out_kernel`` (``(scale · grad_y)ᵀ · a``) with the bias
gradients as row sums of the same tiles. Every gradient is written by exactly
one program: no atomics, deterministic.

Weights arrive as lists of per-expert tensors (the op's schema). The kernels
index one ``[E, ...]`` buffer, which the launchers get without copying when
the list is ``E`` consecutive views of one (``stacked.unbind(0)``, what the
functional :func:`fastformers.ops.switch.switch_mlp` passes for stacked
weights), and from ``torch.stack`` otherwise (``SwitchFeedForward``'s one
``nn.Linear`` per expert): a copy of every expert weight per forward and again
per backward, ``2 or 3 · E · d · d_ff`` elements each. At labml's size (E = 64,
d 128, d_ff 256, T = 2048, float32) that is 16.8 MB read and 16.8 MB written,
where the two GEMMs read the weights once (16.8 MB) and about 9 MB of
activations: the copy roughly doubles the forward's memory traffic, not its
FLOPs (unmeasured: no GPU here). Keeping the module's weights as views of one
stacked buffer would remove it but changes how its parameters are stored;
not done. Absent biases are zero buffers ``[E, ·]``.

Dots are IEEE float32 for float32 (not TF32, to match the reference), bf16
products accumulated in float32, float64 for float64. Launchers take CUDA
tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before import (the
Triton interpreter; how they are tested without a GPU). The Triton path does
not validate ``order`` (a device check would cost a host sync): it must be a
permutation grouped by ``offsets``, as :func:`route` makes it.
"""
from typing import List, Sequence

import torch
import triton
import triton.language as tl

from ...triton_utils import AotSpec, interpreter_enabled
from ..dropout import naive as dropout_naive
from ..dropout.triton_kernel import keep
from ..xl.triton_kernel import _dot
from .naive import hidden_dtype

ACTIVATIONS = {"relu": 0, "gelu": 1, "silu": 2, "sigmoid": 3, "identity": 4}
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _activate(h, ACTIVATION: tl.constexpr):
    """``act(h)`` and ``act'(h)``: ReLU (0), exact GELU (1), SiLU (2), sigmoid (3) or identity (4)."""
    if ACTIVATION == 0:
        value = tl.maximum(h, 0.0)
        slope = tl.where(h > 0, 1.0, 0.0).to(h.dtype)
    elif ACTIVATION == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(h * _SQRT1_2))
        value = h * cdf
        slope = cdf + h * tl.exp(-0.5 * h * h) * _INV_SQRT_2PI
    elif ACTIVATION == 2:
        sig = 1.0 / (1.0 + tl.exp(-h))
        value = h * sig
        slope = sig * (1.0 + h * (1.0 - sig))
    elif ACTIVATION == 3:
        value = 1.0 / (1.0 + tl.exp(-h))
        slope = value * (1.0 - value)
    else:
        value = h
        slope = tl.zeros_like(h) + 1.0
    return value, slope


@triton.jit
def _keep_scale(tokens, feats, d_ff, seed, offset, threshold, keep_scale):
    """Dropout multipliers (``keep_scale`` or 0) of hidden elements ``tokens × feats`` (mask ``[T, d_ff]``)."""
    index = tokens[:, None].to(tl.int64) * d_ff + feats[None, :]
    return tl.where(keep(seed, offset, index, threshold), keep_scale, 0.0)


@triton.jit
def _tile(sched_ptr, BLOCK_M: tl.constexpr):
    """Expert of this program's tile, its positions in ``order``, and which are in the segment / kept."""
    tile = sched_ptr + tl.program_id(0) * 4
    expert = tl.load(tile)
    start = tl.load(tile + 1)
    kept_end = tl.load(tile + 2)
    seg_end = tl.load(tile + 3)
    rows = start + tl.arange(0, BLOCK_M)
    return expert.to(tl.int64), rows, rows < seg_end, rows < kept_end, start < kept_end


@triton.jit
def switch_in_kernel(
    x_ptr,  # [T, d]
    order_ptr,  # [T] int64
    sched_ptr,  # [n_tiles, 4] int32: expert, start, kept end, segment end
    w1_ptr,  # [E, d_ff, d]
    wg_ptr,  # [E, d_ff, d] (w1_ptr when there is no gate)
    b1_ptr,  # [E, d_ff]
    bg_ptr,  # [E, d_ff]
    hidden_ptr,  # [T, width] out, order layout
    d,
    d_ff,
    width,  # n_halves * d_ff
    n_col_blocks,  # cdiv(d_ff, BLOCK_N): program_id(1) // n_col_blocks is the half (0 layer1, 1 gate)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
):
    expert, rows, in_segment, kept, any_kept = _tile(sched_ptr, BLOCK_M)
    half = tl.program_id(1) // n_col_blocks
    cols = (tl.program_id(1) % n_col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < d_ff
    if half == 0:
        w_ptr = w1_ptr
        b_ptr = b1_ptr
    else:
        w_ptr = wg_ptr
        b_ptr = bg_ptr
    w_ptr += expert * d_ff * d
    tokens = tl.load(order_ptr + rows, mask=kept, other=0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k in range(0, tl.where(any_kept, d, 0), BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_ok = ks < d
        a = tl.load(x_ptr + (tokens[:, None] * d + ks[None, :]), mask=kept[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + (cols[None, :].to(tl.int64) * d + ks[:, None]), mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += _dot(a, w, ACC, UPCAST_DOTS)
    acc += tl.load(b_ptr + expert * d_ff + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    acc = tl.where(kept[:, None], acc, 0.0)
    # hidden passes 2^31 elements on large inputs: one int64 offset per element.
    out = hidden_ptr + (rows[:, None].to(tl.int64) * width + half * d_ff + cols[None, :])
    tl.store(out, acc.to(hidden_ptr.dtype.element_ty), mask=in_segment[:, None] & col_ok[None, :])


@triton.jit
def _activated(hidden_ptr, rows, ks, mask, d_ff, ACTIVATION: tl.constexpr, GATED: tl.constexpr):
    """``act(h) [· v]`` of the saved pre-activations at positions ``rows``, features ``ks``; then
    ``act(h)``, ``act'(h)`` and ``v`` (``act(h)`` again without a gate)."""
    width = 2 * d_ff if GATED else d_ff
    at = rows[:, None].to(tl.int64) * width + ks[None, :]
    h = tl.load(hidden_ptr + at, mask=mask, other=0.0)
    a, slope = _activate(h, ACTIVATION)
    if GATED:
        v = tl.load(hidden_ptr + (at + d_ff), mask=mask, other=0.0)
        return a * v, a, slope, v
    return a, a, slope, a


@triton.jit
def switch_out_kernel(
    x_ptr,  # [T, d]
    order_ptr,  # [T] int64
    sched_ptr,  # [n_tiles, 4] int32
    hidden_ptr,  # [T, n_halves * d_ff], order layout
    w2_ptr,  # [E, d, d_ff]
    b2_ptr,  # [E, d]
    scale_ptr,  # [T]
    y_ptr,  # [T, d] out, token layout
    keep_scale_ptr,  # [1] ACC: 1 / (1 - p), read with dropout only
    d,
    d_ff,
    seed,
    offset,
    threshold,  # dropout_naive.threshold(p): 0 without dropout
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
):
    expert, rows, in_segment, kept, any_kept = _tile(sched_ptr, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < d
    tokens = tl.load(order_ptr + rows, mask=in_segment, other=0)
    w_ptr = w2_ptr + expert * d * d_ff
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k in range(0, tl.where(any_kept, d_ff, 0), BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_ok = ks < d_ff
        a, _, _, _ = _activated(hidden_ptr, rows, ks, kept[:, None] & k_ok[None, :], d_ff, ACTIVATION, GATED)
        if threshold > 0:
            a = a * _keep_scale(tokens, ks, d_ff, seed, offset, threshold, tl.load(keep_scale_ptr))
        w = tl.load(w_ptr + (cols[None, :].to(tl.int64) * d_ff + ks[:, None]), mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc += _dot(a.to(w.dtype), w, ACC, UPCAST_DOTS)
    acc += tl.load(b2_ptr + expert * d + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    at = tokens[:, None] * d + cols[None, :]
    mask = in_segment[:, None] & col_ok[None, :]
    passed = tl.load(x_ptr + at, mask=mask & ~kept[:, None], other=0.0).to(ACC)
    scale = tl.load(scale_ptr + tokens, mask=in_segment, other=0.0).to(ACC)
    out = tl.where(kept[:, None], acc, passed) * scale[:, None]
    tl.store(y_ptr + at, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def switch_grad_hidden_kernel(
    grad_y_ptr,  # [T, d]
    x_ptr,  # [T, d]
    order_ptr,  # [T] int64
    sched_ptr,  # [n_tiles, 4] int32
    hidden_ptr,  # [T, n_halves * d_ff], order layout
    w2_ptr,  # [E, d, d_ff]
    b2_ptr,  # [E, d]
    scale_ptr,  # [T]
    grad_hidden_ptr,  # [T, n_halves * d_ff] out, order layout: grads of h (and v)
    partial_ptr,  # [cdiv(d_ff, BLOCK_N), T] out, ACC: this column block's share of grad(scale)
    keep_scale_ptr,  # [1] ACC: 1 / (1 - p), read with dropout only
    n_tokens,
    d,
    d_ff,
    seed,
    offset,
    threshold,  # dropout_naive.threshold(p): 0 without dropout
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
):
    expert, rows, in_segment, kept, any_kept = _tile(sched_ptr, BLOCK_M)
    col_block = tl.program_id(1)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < d_ff
    tokens = tl.load(order_ptr + rows, mask=in_segment, other=0)
    w_ptr = w2_ptr + expert * d * d_ff
    # G = grad_y · W2[e], unscaled: the scale's gradient needs G · a
    g = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k in range(0, tl.where(any_kept, d, 0), BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_ok = ks < d
        gy = tl.load(grad_y_ptr + (tokens[:, None] * d + ks[None, :]), mask=kept[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + (ks[:, None].to(tl.int64) * d_ff + cols[None, :]), mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)
        g += _dot(gy, w, ACC, UPCAST_DOTS)
    # the rest of grad(scale), once per row: grad_y · b2 for kept rows, grad_y · x for dropped ones
    rest = tl.zeros([BLOCK_M], dtype=ACC)
    for k in range(0, tl.where(col_block == 0, d, 0), BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_ok = ks < d
        at = tokens[:, None] * d + ks[None, :]
        mask = in_segment[:, None] & k_ok[None, :]
        gy = tl.load(grad_y_ptr + at, mask=mask, other=0.0).to(ACC)
        b2 = tl.load(b2_ptr + expert * d + ks, mask=k_ok, other=0.0).to(ACC)
        passed = tl.load(x_ptr + at, mask=mask & ~kept[:, None], other=0.0).to(ACC)
        rest += tl.sum(gy * tl.where(kept[:, None], b2[None, :], passed), axis=1)
    mask = kept[:, None] & col_ok[None, :]
    a, act, slope, v = _activated(hidden_ptr, rows, cols, mask, d_ff, ACTIVATION, GATED)
    # G is the gradient of the activations after dropout: the mask scales a (for grad(scale)) and G
    if threshold > 0:
        multiplier = _keep_scale(tokens, cols, d_ff, seed, offset, threshold, tl.load(keep_scale_ptr))
    else:
        multiplier = tl.full([BLOCK_M, BLOCK_N], 1.0, ACC)
    a = a.to(ACC) * multiplier
    tl.store(partial_ptr + (col_block.to(tl.int64) * n_tokens + tokens), tl.sum(g * a, axis=1) + rest, mask=in_segment)
    g *= tl.load(scale_ptr + tokens, mask=in_segment, other=0.0).to(ACC)[:, None] * multiplier
    width = 2 * d_ff if GATED else d_ff
    out = rows[:, None].to(tl.int64) * width + cols[None, :]
    store_mask = in_segment[:, None] & col_ok[None, :]
    if GATED:
        tl.store(grad_hidden_ptr + out, (g * v.to(ACC) * slope.to(ACC)).to(grad_hidden_ptr.dtype.element_ty),
                 mask=store_mask)
        tl.store(grad_hidden_ptr + (out + d_ff), (g * act.to(ACC)).to(grad_hidden_ptr.dtype.element_ty), mask=store_mask)
    else:
        tl.store(grad_hidden_ptr + out, (g * slope.to(ACC)).to(grad_hidden_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def switch_grad_x_kernel(
    grad_y_ptr,  # [T, d]
    order_ptr,  # [T] int64
    sched_ptr,  # [n_tiles, 4] int32
    grad_hidden_ptr,  # [T, n_halves * d_ff], order layout
    w1_ptr,  # [E, d_ff, d]
    wg_ptr,  # [E, d_ff, d] (unused without a gate)
    scale_ptr,  # [T]
    grad_x_ptr,  # [T, d] out, token layout
    d,
    d_ff,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GATED: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
):
    expert, rows, in_segment, kept, any_kept = _tile(sched_ptr, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < d
    tokens = tl.load(order_ptr + rows, mask=in_segment, other=0)
    width = 2 * d_ff if GATED else d_ff
    gh_rows = rows[:, None].to(tl.int64) * width
    weights = expert * d_ff * d
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k in range(0, tl.where(any_kept, d_ff, 0), BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_ok = ks < d_ff
        a_mask = kept[:, None] & k_ok[None, :]
        w_at = weights + ks[:, None].to(tl.int64) * d + cols[None, :]
        w_mask = k_ok[:, None] & col_ok[None, :]
        gh = tl.load(grad_hidden_ptr + (gh_rows + ks[None, :]), mask=a_mask, other=0.0)
        acc += _dot(gh, tl.load(w1_ptr + w_at, mask=w_mask, other=0.0), ACC, UPCAST_DOTS)
        if GATED:
            gv = tl.load(grad_hidden_ptr + (gh_rows + d_ff + ks[None, :]), mask=a_mask, other=0.0)
            acc += _dot(gv, tl.load(wg_ptr + w_at, mask=w_mask, other=0.0), ACC, UPCAST_DOTS)
    at = tokens[:, None] * d + cols[None, :]
    mask = in_segment[:, None] & col_ok[None, :]
    gy = tl.load(grad_y_ptr + at, mask=mask & ~kept[:, None], other=0.0).to(ACC)
    scale = tl.load(scale_ptr + tokens, mask=in_segment, other=0.0).to(ACC)
    out = tl.where(kept[:, None], acc, gy * scale[:, None])
    tl.store(grad_x_ptr + at, out.to(grad_x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kept_range(offsets_ptr, kept_ptr):
    """This program's expert and the positions of its kept tokens, ``begin .. end``."""
    expert = tl.program_id(0).to(tl.int64)
    begin = tl.load(offsets_ptr + expert)
    return expert, begin, begin + tl.load(kept_ptr + expert)


@triton.jit
def _store_weight_grad(grad_w_ptr, grad_b_ptr, block, rows, cols, n_rows, n_cols, acc, bias):
    """Tile ``[rows, cols]`` of gradient ``block`` (``[n_rows, n_cols]`` each) and, from
    the programs of the first column block, the bias gradient ``[n_rows]``."""
    out = grad_w_ptr + (block * n_rows + rows[:, None]) * n_cols + cols[None, :]
    tl.store(out, acc.to(grad_w_ptr.dtype.element_ty), mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :])
    tl.store(grad_b_ptr + block * n_rows + rows, bias.to(grad_b_ptr.dtype.element_ty),
             mask=rows < tl.where(tl.program_id(2) == 0, n_rows, 0))


@triton.jit
def switch_grad_w_in_kernel(
    x_ptr,  # [T, d]
    order_ptr,  # [T] int64
    offsets_ptr,  # [E + 1] int64
    kept_ptr,  # [E] int64
    grad_hidden_ptr,  # [T, width], order layout
    grad_w_ptr,  # [n_halves, E, d_ff, d] out: grad of W1 (and Wg)
    grad_b_ptr,  # [n_halves, E, d_ff] out: grad of b1 (and bg)
    n_experts,
    d,
    d_ff,
    width,  # n_halves * d_ff
    n_row_blocks,  # cdiv(d_ff, BLOCK_M): program_id(1) // n_row_blocks is the half
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
):
    expert, begin, end = _kept_range(offsets_ptr, kept_ptr)
    half = tl.program_id(1) // n_row_blocks
    feats = (tl.program_id(1) % n_row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    feat_ok = feats < d_ff
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < d
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    bias = tl.zeros([BLOCK_M], dtype=ACC)
    for p in range(begin, end, BLOCK_K):
        ps = p + tl.arange(0, BLOCK_K)
        p_ok = ps < end
        tokens = tl.load(order_ptr + ps, mask=p_ok, other=0)
        gh = tl.load(grad_hidden_ptr + (ps[None, :] * width + half * d_ff + feats[:, None]),
                     mask=feat_ok[:, None] & p_ok[None, :], other=0.0)
        xs = tl.load(x_ptr + (tokens[:, None] * d + cols[None, :]), mask=p_ok[:, None] & col_ok[None, :], other=0.0)
        acc += _dot(gh, xs, ACC, UPCAST_DOTS)
        bias += tl.sum(gh.to(ACC), axis=1)
    _store_weight_grad(grad_w_ptr, grad_b_ptr, half * n_experts + expert, feats, cols, d_ff, d, acc, bias)


@triton.jit
def switch_grad_w_out_kernel(
    grad_y_ptr,  # [T, d]
    order_ptr,  # [T] int64
    offsets_ptr,  # [E + 1] int64
    kept_ptr,  # [E] int64
    hidden_ptr,  # [T, n_halves * d_ff], order layout
    scale_ptr,  # [T]
    grad_w2_ptr,  # [E, d, d_ff] out
    grad_b2_ptr,  # [E, d] out
    keep_scale_ptr,  # [1] ACC: 1 / (1 - p), read with dropout only
    d,
    d_ff,
    seed,
    offset,
    threshold,  # dropout_naive.threshold(p): 0 without dropout
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
):
    expert, begin, end = _kept_range(offsets_ptr, kept_ptr)
    outs = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    out_ok = outs < d
    feats = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    feat_ok = feats < d_ff
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    bias = tl.zeros([BLOCK_M], dtype=ACC)
    for p in range(begin, end, BLOCK_K):
        ps = p + tl.arange(0, BLOCK_K)
        p_ok = ps < end
        tokens = tl.load(order_ptr + ps, mask=p_ok, other=0)
        scale = tl.load(scale_ptr + tokens, mask=p_ok, other=0.0).to(ACC)
        gy = tl.load(grad_y_ptr + (tokens[None, :] * d + outs[:, None]), mask=out_ok[:, None] & p_ok[None, :], other=0.0)
        gy = gy.to(ACC) * scale[None, :]
        a, _, _, _ = _activated(hidden_ptr, ps, feats, p_ok[:, None] & feat_ok[None, :], d_ff, ACTIVATION, GATED)
        if threshold > 0:
            a = a * _keep_scale(tokens, feats, d_ff, seed, offset, threshold, tl.load(keep_scale_ptr))
        acc += _dot(gy.to(grad_y_ptr.dtype.element_ty), a.to(grad_y_ptr.dtype.element_ty), ACC, UPCAST_DOTS)
        bias += tl.sum(gy, axis=1)
    _store_weight_grad(grad_w2_ptr, grad_b2_ptr, expert, outs, feats, d, d_ff, acc, bias)


# ---------------------------------------------------------------- launchers

# float16 is left out: each dtype adds 16 compilations to the AOT check, and
# Switch models train in bfloat16 or float32 (float16 inputs raise).
_GPU_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp64"}

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) per kernel and element size (8: float64,
# else 16- and 32-bit floats): every configuration the GPU launches is in
# AOT_SPECS, measured with ``python -m fastformers.gpu_report`` to compile
# without spills on sm_80 and sm_90. The gathered A operands (64-bit pointers
# per element) and float32 "ieee" dots on CUDA cores are what run out of
# registers: 64 x 64 tiles spilled in every kernel but the first GEMM. The
# three kernels that regenerate the dropout mask run 8 warps (and grad_hidden
# a K step of 32): with the Philox rounds their 4-warp tiles spilled 8-24 B
# of stack per thread.
_TILES = {
    "switch_in_kernel": {8: (32, 32, 16, 4), 4: (64, 64, 32, 4)},
    "switch_out_kernel": {8: (32, 32, 8, 8), 4: (64, 32, 16, 8)},
    "switch_grad_hidden_kernel": {8: (32, 32, 16, 8), 4: (64, 32, 32, 8)},
    "switch_grad_x_kernel": {8: (32, 32, 16, 4), 4: (64, 32, 16, 4)},
    "switch_grad_w_in_kernel": {8: (32, 32, 16, 4), 4: (64, 64, 32, 4)},
    "switch_grad_w_out_kernel": {8: (32, 32, 16, 8), 4: (64, 64, 16, 8)},
}
_NUM_STAGES = 2
_INTERPRETER_BLOCK = 64


def _tile_config(kernel_name: str, dtype: torch.dtype) -> dict:
    """Constexprs and launch options of ``kernel_name`` for inputs of ``dtype``."""
    block_m, block_n, block_k, num_warps = _TILES[kernel_name][8 if dtype == torch.float64 else 4]
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=_NUM_STAGES)


def _config(kernel, dtype: torch.dtype) -> dict:
    """The GPU's ``_TILES`` configuration; under the interpreter, where
    registers are no concern but every loop step and program costs Python
    time, the same BLOCK_M (the tile schedule) with BLOCK_N = BLOCK_K = 64."""
    if dtype not in _GPU_DTYPES:
        raise TypeError(f"the Triton switch kernels take {tuple(_GPU_DTYPES)}, got {dtype} (use backend='reference')")
    config = _tile_config(kernel.fn.__name__, dtype)
    config["ACC"] = tl.float64 if dtype == torch.float64 else tl.float32
    # The interpreter multiplies bf16 tensors as raw 16-bit patterns (see xl's _dot)
    config["UPCAST_DOTS"] = dtype == torch.bfloat16 and interpreter_enabled()
    if interpreter_enabled():
        config.update(BLOCK_N=_INTERPRETER_BLOCK, BLOCK_K=_INTERPRETER_BLOCK)
    return config


def stacked(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[E, ...]`` of the per-expert ``tensors``: a view when they are
    consecutive contiguous slices of one buffer, else a ``torch.stack`` copy."""
    first = tensors[0]
    size = first.numel()
    same_buffer = all(
        t.is_contiguous()
        and t.shape == first.shape
        and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and t.storage_offset() == first.storage_offset() + e * size
        for e, t in enumerate(tensors)
    )
    if same_buffer and first.is_contiguous():
        return first.as_strided((len(tensors), *first.shape), (size, *first.stride()), first.storage_offset())
    return torch.stack(list(tensors))


def _bias(biases: Sequence[torch.Tensor], n_experts: int, width: int, like: torch.Tensor) -> torch.Tensor:
    return stacked(biases) if biases else like.new_zeros(n_experts, width)


def tile_schedule(offsets: torch.Tensor, kept: torch.Tensor, n_tokens: int, block_m: int) -> torch.Tensor:
    """``[T // block_m + min(E, T), 4]`` int32 rows (expert, first position,
    end of its kept rows, end of its segment) covering every segment in tiles
    of ``block_m`` positions; rows past the last tile are empty (all zero).
    Device ops only: no host sync."""
    n_experts = kept.shape[0]
    counts = offsets[1:] - offsets[:-1]
    blocks = (counts + block_m - 1) // block_m
    block_end = blocks.cumsum(0)
    tile = torch.arange(n_tokens // block_m + min(n_experts, n_tokens), device=offsets.device)
    expert = torch.searchsorted(block_end, tile, right=True)
    valid = expert < n_experts
    expert = expert.clamp(max=n_experts - 1)
    start = offsets[expert] + (tile - block_end[expert] + blocks[expert]) * block_m
    seg_end = offsets[expert + 1]
    kept_end = torch.minimum(offsets[expert] + kept[expert], seg_end)
    schedule = torch.stack([expert, start, kept_end, seg_end], dim=1)
    return torch.where(valid[:, None], schedule, 0).to(torch.int32)


def _dims(x, w1, w_gate):
    return x.shape[0], x.shape[1], w1[0].shape[0], len(w1), 2 if w_gate else 1


class _Schedules:
    """Tile schedules of one call, one per BLOCK_M the kernels use."""

    def __init__(self, offsets: torch.Tensor, kept: torch.Tensor, n_tokens: int):
        self.offsets, self.kept, self.n_tokens, self.built = offsets, kept, n_tokens, {}

    def __call__(self, config: dict) -> torch.Tensor:
        block_m = config["BLOCK_M"]
        if block_m not in self.built:
            self.built[block_m] = tile_schedule(self.offsets, self.kept, self.n_tokens, block_m)
        return self.built[block_m]


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")


def _dropout_arguments(dropout_p: float, seed: int, offset: int, hidden: torch.Tensor) -> dict:
    """The dropout arguments of the kernels that read the activations; with
    p = 0, threshold 0 and an unread pointer (hidden, of the same dtype)."""
    if dropout_p == 0:
        return dict(keep_scale_ptr=hidden, seed=0, offset=0, threshold=0)
    keep_scale = torch.full((1,), 1.0 / (1.0 - dropout_p), dtype=hidden.dtype, device=hidden.device)
    return dict(keep_scale_ptr=keep_scale, seed=seed, offset=offset, threshold=dropout_naive.threshold(dropout_p))


def switch_mlp_forward(x, order, offsets, kept, w1, b1, w2, b2, w_gate, b_gate, scale, activation: str,
                       dropout_p: float = 0.0, seed: int = 0, offset: int = 0):
    """The op ``switch_mlp`` (shapes in :func:`fastformers.ops.switch.naive.switch_mlp`):
    ``y [T, d]`` and the pre-activations ``hidden [T, n · d_ff]`` in order layout."""
    _check_activation(activation)
    T, d, d_ff, E, n_halves = _dims(x, w1, w_gate)
    in_config, out_config = _config(switch_in_kernel, x.dtype), _config(switch_out_kernel, x.dtype)
    x, scale = x.contiguous(), scale.contiguous()
    y = torch.empty_like(x)
    hidden = x.new_empty((T, n_halves * d_ff), dtype=hidden_dtype(x.dtype))
    if T == 0:
        return y, hidden
    schedule = _Schedules(offsets, kept, T)
    w1s = stacked(w1)
    n_col_blocks = triton.cdiv(d_ff, in_config["BLOCK_N"])
    switch_in_kernel[(schedule(in_config).shape[0], n_halves * n_col_blocks)](
        x, order, schedule(in_config), w1s, stacked(w_gate) if w_gate else w1s, _bias(b1, E, d_ff, x),
        _bias(b_gate, E, d_ff, x) if w_gate else x, hidden, d, d_ff, n_halves * d_ff, n_col_blocks, **in_config
    )
    switch_out_kernel[(schedule(out_config).shape[0], triton.cdiv(d, out_config["BLOCK_N"]))](
        x, order, schedule(out_config), hidden, stacked(w2), _bias(b2, E, d, x), scale, y, d=d, d_ff=d_ff,
        ACTIVATION=ACTIVATIONS[activation], GATED=bool(w_gate), **_dropout_arguments(dropout_p, seed, offset, hidden),
        **out_config
    )
    return y, hidden


def switch_mlp_backward(grad_y, x, order, offsets, kept, w1, b1, w2, b2, w_gate, b_gate, scale, hidden,
                        activation: str, dropout_p: float = 0.0, seed: int = 0, offset: int = 0):
    """The op ``switch_mlp_backward``: grads of x, w1, b1, w2, b2, w_gate,
    b_gate (per-expert lists, empty where the input is) and scale. The
    weight gradients of a group are views of one ``[E, ...]`` buffer."""
    _check_activation(activation)
    T, d, d_ff, E, n_halves = _dims(x, w1, w_gate)
    if tuple(hidden.shape) != (T, n_halves * d_ff) or hidden.dtype != hidden_dtype(x.dtype):
        raise ValueError(f"hidden must be {hidden_dtype(x.dtype)} [{T}, {n_halves * d_ff}] as switch_mlp returned "
                         f"it, got {hidden.dtype} {list(hidden.shape)}")
    configs = {kernel: _config(kernel, x.dtype) for kernel in (
        switch_grad_hidden_kernel, switch_grad_x_kernel, switch_grad_w_in_kernel, switch_grad_w_out_kernel)}
    gated = bool(w_gate)
    grad_y, x, scale, hidden = grad_y.contiguous(), x.contiguous(), scale.contiguous(), hidden.contiguous()
    flags = dict(ACTIVATION=ACTIVATIONS[activation], GATED=gated, **_dropout_arguments(dropout_p, seed, offset, hidden))
    w1s = stacked(w1)
    grad_x = torch.empty_like(x)
    grad_hidden = x.new_empty((T, n_halves * d_ff))
    grad_w_in = x.new_empty((n_halves, E, d_ff, d))
    grad_b_in = x.new_empty((n_halves, E, d_ff))
    grad_w2 = x.new_empty((E, d, d_ff))
    grad_b2 = x.new_empty((E, d))
    config = configs[switch_grad_hidden_kernel]
    n_col_blocks = triton.cdiv(d_ff, config["BLOCK_N"])
    partial = x.new_empty((n_col_blocks, T), dtype=hidden_dtype(x.dtype))
    if T > 0:
        schedule = _Schedules(offsets, kept, T)
        switch_grad_hidden_kernel[(schedule(config).shape[0], n_col_blocks)](
            grad_y, x, order, schedule(config), hidden, stacked(w2), _bias(b2, E, d, x), scale, grad_hidden, partial,
            n_tokens=T, d=d, d_ff=d_ff, **flags, **config
        )
        config = configs[switch_grad_x_kernel]
        switch_grad_x_kernel[(schedule(config).shape[0], triton.cdiv(d, config["BLOCK_N"]))](
            grad_y, order, schedule(config), grad_hidden, w1s, stacked(w_gate) if gated else w1s, scale, grad_x, d,
            d_ff, GATED=gated, **config
        )
    config = configs[switch_grad_w_in_kernel]
    n_row_blocks = triton.cdiv(d_ff, config["BLOCK_M"])
    switch_grad_w_in_kernel[(E, n_halves * n_row_blocks, triton.cdiv(d, config["BLOCK_N"]))](
        x, order, offsets, kept, grad_hidden, grad_w_in, grad_b_in, E, d, d_ff, n_halves * d_ff, n_row_blocks,
        **config
    )
    config = configs[switch_grad_w_out_kernel]
    switch_grad_w_out_kernel[(E, triton.cdiv(d, config["BLOCK_M"]), triton.cdiv(d_ff, config["BLOCK_N"]))](
        grad_y, order, offsets, kept, hidden, scale, grad_w2, grad_b2, d=d, d_ff=d_ff, **flags, **config
    )

    def per_expert(buffer: torch.Tensor, present) -> List[torch.Tensor]:
        return list(buffer.unbind(0)) if present else []

    return (grad_x, per_expert(grad_w_in[0], True), per_expert(grad_b_in[0], b1), per_expert(grad_w2, True),
            per_expert(grad_b2, b2), per_expert(grad_w_in[-1], gated), per_expert(grad_b_in[-1], b_gate),
            partial.sum(0).to(scale.dtype))


# ---------------------------------------------------------------- AOT specs

def _signature(kernel, dtype: str, acc: str) -> dict:
    """Pointers in ``dtype`` except the int indices and ACC buffers; i32 scalars but the dropout's i64."""
    index_pointers = {"order_ptr": "*i64", "offsets_ptr": "*i64", "kept_ptr": "*i64", "sched_ptr": "*i32",
                      "partial_ptr": f"*{acc}", "keep_scale_ptr": f"*{acc}"}
    dropout_scalars = ("seed", "offset", "threshold")
    hidden = acc if dtype == "bf16" else dtype
    signature = {}
    for name in kernel.arg_names:
        if name in index_pointers:
            signature[name] = index_pointers[name]
        elif name == "hidden_ptr":
            signature[name] = f"*{hidden}"
        elif name.endswith("_ptr"):
            signature[name] = f"*{dtype}"
        elif name.isupper():
            signature[name] = "constexpr"
        elif name in dropout_scalars:
            signature[name] = "i64"
        else:
            signature[name] = "i32"
    return signature


def _aot_specs():
    """Every kernel for every dtype the GPU launches, each activation/gating variant it compiles."""
    variants = {
        switch_in_kernel: [{}],
        switch_grad_w_in_kernel: [{}],
        switch_grad_x_kernel: [dict(GATED=False), dict(GATED=True)],
    }
    for kernel in (switch_out_kernel, switch_grad_hidden_kernel, switch_grad_w_out_kernel):
        variants[kernel] = [dict(ACTIVATION=a, GATED=g) for a in ACTIVATIONS.values() for g in (False, True)]
    specs = []
    for torch_dtype, dtype in _GPU_DTYPES.items():
        acc = "fp64" if dtype == "fp64" else "fp32"
        for kernel, flag_sets in variants.items():
            config = _tile_config(kernel.fn.__name__, torch_dtype)
            launch = {key: config.pop(key) for key in ("num_warps", "num_stages")}
            constexprs = dict(config, ACC=tl.float64 if acc == "fp64" else tl.float32, UPCAST_DOTS=False)
            for flags in flag_sets:
                label = ",".join([dtype] + [f"{k.lower()}={int(v)}" for k, v in flags.items()])
                specs.append(AotSpec(kernel, _signature(kernel, dtype, acc), {**constexprs, **flags}, label=label,
                                     **launch))
    return specs


AOT_SPECS = _aot_specs()
