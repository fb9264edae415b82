"""Triton kernels of the Switch Transformer's grouped expert FFN
(``switch_mlp`` and ``switch_mlp_backward`` on CUDA), scattermoe style.

Tokens stay where they are: ``order`` groups them by expert (segment
``offsets[e] : offsets[e + 1]``, its first ``kept[e]`` kept) and every kernel
reads and writes token rows through it, so no gathered or scattered copy of x,
y or their gradients exists. A tile is ``BLOCK_M`` consecutive positions of
one expert's segment; each program finds its tile (expert, first position,
end of the kept rows, end of the segment) from ``offsets`` and ``kept`` (see
``_tile``), and the grid is the upper bound ``T // BLOCK_M + min(E, T)``
tiles, so nothing waits for the host to learn the counts and the autotuner
may pick BLOCK_M. Tiles past the end, and the GEMM part of tiles with no
kept row, do no work.

Forward, two grouped GEMMs:

- ``switch_in_kernel``: ``hidden[p] = x[order[p]] · W1[e]ᵀ + b1[e]`` (and the
  gate ``x · Wgᵀ + bg`` in the second half of the row), the rows of x gathered
  by index inside the loads; zero on dropped rows. ``hidden`` (order layout,
  input dtype: float32 accumulators rounded once) is the op's saved
  pre-activation.
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

Tiles: ``triton.autotune`` over a few configurations per tile class (see
``_TILES``: 128 x 128 x 32 and 64 x 128 x 32 tiles, 3-4 stages, for bf16,
float16 and TF32 with d and d_ff multiples of 16), keyed on (d, d_ff, gating,
precision, dtypes), never on T or the expert loads. The activation is a
runtime argument, so each tile compiles once per dtype and gating.

Dots: bf16 / float16 products accumulated in float32, float64 for float64;
float32 in TF32 when torch allows TF32 matmuls and IEEE otherwise (see
:func:`matmul_precision`), decided per call by the launcher. Launchers take CUDA
tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before import (the
Triton interpreter; how they are tested without a GPU). The Triton path does
not validate ``order`` (a device check would cost a host sync): it must be a
permutation grouped by ``offsets``, as :func:`route` makes it.
"""
import inspect
from typing import List, Sequence

import torch
import triton
import triton.language as tl

from ...triton_utils import AotSpec, interpreter_enabled
from ..dropout import naive as dropout_naive
from ..dropout.triton_kernel import keep
from ..triton_dot import mma

ACTIVATIONS = {"relu": 0, "gelu": 1, "silu": 2, "sigmoid": 3, "identity": 4}
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
# experts whose segment offsets one step of a tile's expert search reads
_EXPERT_SCAN = tl.constexpr(128)
# Scalars that change from call to call (or batch to batch): Triton would
# otherwise specialise (and recompile) on a value of 1 or a multiple of 16,
# variants the AOT specs do not list. d, d_ff and width keep their
# specialisation: the "mma" tiles rely on it (see _TILES).
_RUNTIME_ARGS = ("n_experts", "n_tokens", "activation", "seed", "offset", "threshold")


def _jit(fn):
    """``triton.jit`` with no value specialisation of the kernel's _RUNTIME_ARGS."""
    return triton.jit(fn, do_not_specialize=[name for name in _RUNTIME_ARGS
                                             if name in inspect.signature(fn).parameters])


@triton.jit
def _activate(h, activation):
    """``act(h)`` and ``act'(h)``: ReLU (0), exact GELU (1), SiLU (2), sigmoid (3) or identity (4).

    A runtime argument, not a constexpr: one build serves every activation
    (five times fewer AOT compilations); the branch is uniform over the grid.
    Ordered comparisons, not ``==``: LLVM turns an ``==`` chain into a jump
    table (``brx.idx``), after which ptxas gave switch_out on sm_80 32
    registers and 3.4 KB of stack per thread."""
    if activation < 2:
        if activation < 1:
            value = tl.maximum(h, 0.0)
            slope = tl.where(h > 0, 1.0, 0.0).to(h.dtype)
        else:
            cdf = 0.5 * (1.0 + tl.math.erf(h * _SQRT1_2))
            value = h * cdf
            slope = cdf + h * tl.exp(-0.5 * h * h) * _INV_SQRT_2PI
    elif activation < 4:
        sig = 1.0 / (1.0 + tl.exp(-h))
        if activation < 3:
            value = h * sig
            slope = sig * (1.0 + h * (1.0 - sig))
        else:
            value = sig
            slope = sig * (1.0 - sig)
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
def _tile(offsets_ptr, kept_ptr, n_experts, BLOCK_M: tl.constexpr):
    """Expert of this program's tile, its positions in ``order``, which are in
    the segment / kept, and whether any is kept.

    Tile ``t`` of the grid is block ``t - Σ_{e' < e} blocks(e')`` of expert
    ``e``'s segment, ``blocks(e) = cdiv(count(e), BLOCK_M)``: the first expert
    whose cumulative block count passes ``t``, found from ``offsets`` in steps
    of _EXPERT_SCAN experts. Computed here rather than as a schedule tensor so
    that the autotuner may choose BLOCK_M; tiles past the last expert get no rows."""
    tile = tl.program_id(0)
    expert = 0
    blocks_before = 0  # of the experts before this tile's
    blocks_scanned = 0  # of every expert scanned so far
    for first in range(0, n_experts, _EXPERT_SCAN):
        experts = first + tl.arange(0, _EXPERT_SCAN)
        valid = experts < n_experts
        begin = tl.load(offsets_ptr + experts, mask=valid, other=0)
        end = tl.load(offsets_ptr + experts + 1, mask=valid, other=0)
        blocks = ((end - begin + BLOCK_M - 1) // BLOCK_M).to(tl.int32)
        # cumulative block counts only grow: the experts entirely before the tile are a prefix
        before = valid & (blocks_scanned + tl.cumsum(blocks, 0) <= tile)
        expert += tl.sum(before.to(tl.int32), 0)
        blocks_before += tl.sum(tl.where(before, blocks, 0), 0)
        blocks_scanned += tl.sum(blocks, 0)
    found = expert < n_experts
    expert = tl.minimum(expert, n_experts - 1).to(tl.int64)
    seg_begin = tl.load(offsets_ptr + expert)
    seg_end = tl.where(found, tl.load(offsets_ptr + expert + 1), 0)
    start = tl.where(found, seg_begin + (tile - blocks_before).to(tl.int64) * BLOCK_M, 0)
    kept_end = tl.minimum(seg_begin + tl.load(kept_ptr + expert), seg_end)
    rows = start + tl.arange(0, BLOCK_M)
    return expert, rows, rows < seg_end, rows < kept_end, start < kept_end


# ---------------------------------------------------------------- tiles

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) the autotuner chooses
# from, per kernel and tile class (see tile_class): "mma" (bfloat16, float16
# and TF32 float32 on tensor cores, d and d_ff multiples of 16), "mma-odd"
# (the same with other sizes), "ieee" (float32 in full precision, CUDA-core
# FMAs) and "fp64". For the token-tiled kernels BLOCK_M is the tokens of one
# expert per tile; for the weight gradients it is the gradient's rows
# (features of W1 / outputs of W2) and BLOCK_K the tokens summed over. Every
# configuration is in AOT_SPECS and compiles without spills on sm_80 and
# sm_90 (``python -m fastformers.gpu_report --kernel switch``).
#
# What Triton 3.9 needs to emit Hopper wgmma (HGMMA) and keep it fed:
# num_warps a multiple of 4 (one warpgroup per 64 rows of the tile), BLOCK_M
# 64 or 128, 16-bit (or TF32) operands; B goes through shared memory, A may
# come from registers (the activated hidden of switch_out). The software
# pipeline (cp.async into num_stages shared buffers) needs rows that start
# 16-byte aligned, which Triton knows only when it specialises d and d_ff as
# multiples of 16: with other sizes every load is a masked 2-byte load held
# in registers, and the 128-row tiles spill over 1 KB per thread (64-row
# tiles of 4 warps, 350-530 B). Hence the "mma-odd" class: 64 x 64 tiles of 8
# warps (two warpgroups side by side, still HGMMA) without the pipeline.
_TILES = {
    "switch_in_kernel": {
        "mma": [(128, 128, 32, 8, 3), (64, 128, 32, 4, 4)],
        "mma-odd": [(64, 64, 32, 8, 1)],
        "ieee": [(64, 64, 32, 4, 2)],
        "fp64": [(32, 32, 16, 4, 2)],
    },
    # 128 x 64 / 64 x 128 of 8 warps: at 128 x 128 (or 4 warps) the activated
    # TF32 A operand (4-byte, in registers) spilled 8-32 B per thread, and so did
    # grad_x's two gated products on sm_80
    "switch_out_kernel": {
        "mma": [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3)],
        "mma-odd": [(64, 64, 32, 8, 1)],
        "ieee": [(32, 32, 16, 8, 2)],
        "fp64": [(32, 32, 8, 8, 2)],
    },
    # 64 x 64 tiles of 8 warps: the epilogue holds G, h, v, act, act', the
    # dropout's Philox state and the stores per element, and 128-row tiles (or
    # 4 warps) spilled 136-352 B per thread at any num_stages
    "switch_grad_hidden_kernel": {
        "mma": [(64, 64, 64, 8, 3), (64, 64, 32, 8, 3)],
        "mma-odd": [(64, 64, 32, 8, 1)],
        "ieee": [(64, 32, 32, 8, 2)],
        "fp64": [(32, 32, 16, 8, 2)],
    },
    "switch_grad_x_kernel": {
        "mma": [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3)],
        "mma-odd": [(64, 64, 32, 8, 1)],
        "ieee": [(64, 32, 16, 8, 2)],
        "fp64": [(32, 32, 16, 4, 2)],
    },
    "switch_grad_w_in_kernel": {
        "mma": [(128, 128, 32, 8, 3), (64, 128, 32, 4, 3)],
        "mma-odd": [(64, 64, 32, 8, 1)],
        "ieee": [(64, 64, 32, 4, 2)],
        "fp64": [(32, 32, 16, 4, 2)],
    },
    "switch_grad_w_out_kernel": {
        "mma": [(128, 128, 32, 8, 3), (64, 128, 32, 8, 3)],
        "mma-odd": [(64, 64, 16, 8, 1)],
        "ieee": [(64, 64, 16, 8, 2)],
        "fp64": [(32, 32, 16, 8, 2)],
    },
}
# Under the interpreter registers are no concern but every loop step and
# program costs Python time; 16-token tiles put several tiles in the small
# test problems' experts, partial ones included.
_INTERPRETER_TILE = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)


def tile_class(dtype: torch.dtype, precision: str, d: int, d_ff: int) -> str:
    """Which ``_TILES`` entry serves operands of ``dtype`` multiplied at
    ``precision`` (see :func:`matmul_precision`) with model sizes ``d``, ``d_ff``."""
    if dtype == torch.float64:
        return "fp64"
    if dtype == torch.float32 and precision == "ieee":
        return "ieee"
    return "mma" if d % _ALIGNED == 0 and d_ff % _ALIGNED == 0 else "mma-odd"


# Triton compiles an integer argument divisible by this as such (its 16-byte alignment knowledge)
_ALIGNED = 16


def _tile_configs(kernel_name: str) -> dict:
    return {
        group: [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), num_warps=warps, num_stages=stages)
                for m, n, k, warps, stages in tiles]
        for group, tiles in _TILES[kernel_name].items()
    }


def _autotune(kernel_name: str, key: List[str]):
    """``triton.autotune`` over the kernel's ``_TILES`` of the call's tile
    class (the dtype of its first pointer, which is x or grad_y, its
    PRECISION, d and d_ff), keyed on shape arguments that do not change from
    batch to batch: the token count and the expert loads never cause a retune."""
    configs = _tile_configs(kernel_name)

    def prune(_all_configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        dtype = next(value.dtype for value in named_args.values() if isinstance(value, torch.Tensor))
        return configs[tile_class(dtype, args["PRECISION"], args["d"], args["d_ff"])]

    return triton.autotune([c for group in configs.values() for c in group], key=key,
                           prune_configs_by={"early_config_prune": prune})


@_autotune("switch_in_kernel", key=["d", "d_ff", "width", "PRECISION"])
@_jit
def switch_in_kernel(
    x_ptr,  # [T, d]
    order_ptr,  # [T] int64
    offsets_ptr,  # [E + 1] int64
    kept_ptr,  # [E] int64
    w1_ptr,  # [E, d_ff, d]
    wg_ptr,  # [E, d_ff, d] (w1_ptr when there is no gate)
    b1_ptr,  # [E, d_ff]
    bg_ptr,  # [E, d_ff]
    hidden_ptr,  # [T, width] out, order layout
    n_experts,
    d,
    d_ff,
    width,  # n_halves * d_ff: program_id(1) // cdiv(d_ff, BLOCK_N) is the half (0 layer1, 1 gate)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
):
    expert, rows, in_segment, kept, any_kept = _tile(offsets_ptr, kept_ptr, n_experts, BLOCK_M)
    n_col_blocks = tl.cdiv(d_ff, BLOCK_N)
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
        acc += mma(a, w, ACC, UPCAST_DOTS, PRECISION)
    acc += tl.load(b_ptr + expert * d_ff + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    acc = tl.where(kept[:, None], acc, 0.0)
    # hidden passes 2^31 elements on large inputs: one int64 offset per element.
    out = hidden_ptr + (rows[:, None].to(tl.int64) * width + half * d_ff + cols[None, :])
    tl.store(out, acc.to(hidden_ptr.dtype.element_ty), mask=in_segment[:, None] & col_ok[None, :])


@triton.jit
def _activated(hidden_ptr, rows, ks, mask, d_ff, activation, GATED: tl.constexpr, ACC: tl.constexpr):
    """``act(h) [· v]`` of the saved pre-activations at positions ``rows``, features ``ks``, in ACC; then
    ``act(h)``, ``act'(h)`` and ``v`` (``act(h)`` again without a gate)."""
    width = 2 * d_ff if GATED else d_ff
    at = rows[:, None].to(tl.int64) * width + ks[None, :]
    h = tl.load(hidden_ptr + at, mask=mask, other=0.0).to(ACC)
    a, slope = _activate(h, activation)
    if GATED:
        v = tl.load(hidden_ptr + (at + d_ff), mask=mask, other=0.0).to(ACC)
        return a * v, a, slope, v
    return a, a, slope, a


@_autotune("switch_out_kernel", key=["d", "d_ff", "GATED", "PRECISION"])
@_jit
def switch_out_kernel(
    x_ptr,  # [T, d]
    order_ptr,  # [T] int64
    offsets_ptr,  # [E + 1] int64
    kept_ptr,  # [E] int64
    hidden_ptr,  # [T, n_halves * d_ff], order layout
    w2_ptr,  # [E, d, d_ff]
    b2_ptr,  # [E, d]
    scale_ptr,  # [T]
    y_ptr,  # [T, d] out, token layout
    keep_scale_ptr,  # [1] ACC: 1 / (1 - p), read with dropout only
    n_experts,
    d,
    d_ff,
    activation,  # ACTIVATIONS
    seed,
    offset,
    threshold,  # dropout_naive.threshold(p): 0 without dropout
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GATED: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
):
    expert, rows, in_segment, kept, any_kept = _tile(offsets_ptr, kept_ptr, n_experts, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < d
    tokens = tl.load(order_ptr + rows, mask=in_segment, other=0)
    w_ptr = w2_ptr + expert * d * d_ff
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k in range(0, tl.where(any_kept, d_ff, 0), BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_ok = ks < d_ff
        a, _, _, _ = _activated(hidden_ptr, rows, ks, kept[:, None] & k_ok[None, :], d_ff, activation, GATED, ACC)
        if threshold > 0:
            a = a * _keep_scale(tokens, ks, d_ff, seed, offset, threshold, tl.load(keep_scale_ptr))
        w = tl.load(w_ptr + (cols[None, :].to(tl.int64) * d_ff + ks[:, None]), mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc += mma(a.to(w.dtype), w, ACC, UPCAST_DOTS, PRECISION)
    acc += tl.load(b2_ptr + expert * d + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    at = tokens[:, None] * d + cols[None, :]
    mask = in_segment[:, None] & col_ok[None, :]
    passed = tl.load(x_ptr + at, mask=mask & ~kept[:, None], other=0.0).to(ACC)
    scale = tl.load(scale_ptr + tokens, mask=in_segment, other=0.0).to(ACC)
    out = tl.where(kept[:, None], acc, passed) * scale[:, None]
    tl.store(y_ptr + at, out.to(y_ptr.dtype.element_ty), mask=mask)


@_autotune("switch_grad_hidden_kernel", key=["d", "d_ff", "GATED", "PRECISION"])
@_jit
def switch_grad_hidden_kernel(
    grad_y_ptr,  # [T, d]
    x_ptr,  # [T, d]
    order_ptr,  # [T] int64
    offsets_ptr,  # [E + 1] int64
    kept_ptr,  # [E] int64
    hidden_ptr,  # [T, n_halves * d_ff], order layout
    w2_ptr,  # [E, d, d_ff]
    b2_ptr,  # [E, d]
    scale_ptr,  # [T]
    grad_hidden_ptr,  # [T, n_halves * d_ff] out, order layout: grads of h (and v)
    partial_ptr,  # [>= cdiv(d_ff, BLOCK_N), T] out, ACC: row c is column block c's share of grad(scale)
    keep_scale_ptr,  # [1] ACC: 1 / (1 - p), read with dropout only
    n_experts,
    n_tokens,
    d,
    d_ff,
    activation,  # ACTIVATIONS
    seed,
    offset,
    threshold,  # dropout_naive.threshold(p): 0 without dropout
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GATED: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
):
    expert, rows, in_segment, kept, any_kept = _tile(offsets_ptr, kept_ptr, n_experts, BLOCK_M)
    col_block = tl.program_id(1)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < d_ff
    tokens = tl.load(order_ptr + rows, mask=in_segment, other=0)
    w_ptr = w2_ptr + expert * d * d_ff
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
    # G = grad_y · W2[e], unscaled: the scale's gradient needs G · a
    g = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k in range(0, tl.where(any_kept, d, 0), BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_ok = ks < d
        gy = tl.load(grad_y_ptr + (tokens[:, None] * d + ks[None, :]), mask=kept[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + (ks[:, None].to(tl.int64) * d_ff + cols[None, :]), mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)
        g += mma(gy, w, ACC, UPCAST_DOTS, PRECISION)
    mask = kept[:, None] & col_ok[None, :]
    a, act, slope, v = _activated(hidden_ptr, rows, cols, mask, d_ff, activation, GATED, ACC)
    # G is the gradient of the activations after dropout: the mask scales a (for grad(scale)) and G
    if threshold > 0:
        multiplier = _keep_scale(tokens, cols, d_ff, seed, offset, threshold, tl.load(keep_scale_ptr))
    else:
        multiplier = tl.full([BLOCK_M, BLOCK_N], 1.0, ACC)
    tl.store(partial_ptr + (col_block.to(tl.int64) * n_tokens + tokens), tl.sum(g * a * multiplier, axis=1) + rest,
             mask=in_segment)
    g *= tl.load(scale_ptr + tokens, mask=in_segment, other=0.0).to(ACC)[:, None] * multiplier
    width = 2 * d_ff if GATED else d_ff
    out = rows[:, None].to(tl.int64) * width + cols[None, :]
    store_mask = in_segment[:, None] & col_ok[None, :]
    if GATED:
        tl.store(grad_hidden_ptr + out, (g * v * slope).to(grad_hidden_ptr.dtype.element_ty), mask=store_mask)
        tl.store(grad_hidden_ptr + (out + d_ff), (g * act).to(grad_hidden_ptr.dtype.element_ty), mask=store_mask)
    else:
        tl.store(grad_hidden_ptr + out, (g * slope).to(grad_hidden_ptr.dtype.element_ty), mask=store_mask)


@_autotune("switch_grad_x_kernel", key=["d", "d_ff", "GATED", "PRECISION"])
@_jit
def switch_grad_x_kernel(
    grad_y_ptr,  # [T, d]
    order_ptr,  # [T] int64
    offsets_ptr,  # [E + 1] int64
    kept_ptr,  # [E] int64
    grad_hidden_ptr,  # [T, n_halves * d_ff], order layout
    w1_ptr,  # [E, d_ff, d]
    wg_ptr,  # [E, d_ff, d] (unused without a gate)
    scale_ptr,  # [T]
    grad_x_ptr,  # [T, d] out, token layout
    n_experts,
    d,
    d_ff,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GATED: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
):
    expert, rows, in_segment, kept, any_kept = _tile(offsets_ptr, kept_ptr, n_experts, BLOCK_M)
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
        acc += mma(gh, tl.load(w1_ptr + w_at, mask=w_mask, other=0.0), ACC, UPCAST_DOTS, PRECISION)
        if GATED:
            gv = tl.load(grad_hidden_ptr + (gh_rows + d_ff + ks[None, :]), mask=a_mask, other=0.0)
            acc += mma(gv, tl.load(wg_ptr + w_at, mask=w_mask, other=0.0), ACC, UPCAST_DOTS, PRECISION)
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


@_autotune("switch_grad_w_in_kernel", key=["d", "d_ff", "width", "PRECISION"])
@_jit
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
    width,  # n_halves * d_ff: program_id(1) // cdiv(d_ff, BLOCK_M) is the half
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
):
    expert, begin, end = _kept_range(offsets_ptr, kept_ptr)
    n_row_blocks = tl.cdiv(d_ff, BLOCK_M)
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
        acc += mma(gh, xs, ACC, UPCAST_DOTS, PRECISION)
        bias += tl.sum(gh.to(ACC), axis=1)
    _store_weight_grad(grad_w_ptr, grad_b_ptr, half * n_experts + expert, feats, cols, d_ff, d, acc, bias)


@_autotune("switch_grad_w_out_kernel", key=["d", "d_ff", "GATED", "PRECISION"])
@_jit
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
    activation,  # ACTIVATIONS
    seed,
    offset,
    threshold,  # dropout_naive.threshold(p): 0 without dropout
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GATED: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
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
        a, _, _, _ = _activated(hidden_ptr, ps, feats, p_ok[:, None] & feat_ok[None, :], d_ff, activation, GATED, ACC)
        if threshold > 0:
            a = a * _keep_scale(tokens, feats, d_ff, seed, offset, threshold, tl.load(keep_scale_ptr))
        operand = grad_y_ptr.dtype.element_ty
        acc += mma(gy.to(operand), a.to(operand), ACC, UPCAST_DOTS, PRECISION)
        bias += tl.sum(gy, axis=1)
    _store_weight_grad(grad_w2_ptr, grad_b2_ptr, expert, outs, feats, d, d_ff, acc, bias)


# ---------------------------------------------------------------- launchers

_GPU_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def matmul_precision(dtype: torch.dtype) -> str:
    """How the kernels multiply ``dtype`` operands: ``"tf32"`` for float32 when
    torch allows TF32 matmuls (``torch.backends.cuda.matmul.allow_tf32`` or
    ``torch.set_float32_matmul_precision("high" | "medium")``), else ``"ieee"``
    (16-bit and float64 operands multiply exactly whatever it says)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return "tf32" if dtype == torch.float32 and tf32 else "ieee"


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _constexprs(dtype: torch.dtype) -> dict:
    """The constexprs every kernel takes for inputs of ``dtype``, tiles aside."""
    if dtype not in _GPU_DTYPES:
        raise TypeError(f"the Triton switch kernels take {tuple(_GPU_DTYPES)}, got {dtype} (use backend='reference')")
    return dict(ACC=tl.float64 if dtype == torch.float64 else tl.float32, PRECISION=matmul_precision(dtype),
                UPCAST_DOTS=dtype in (torch.bfloat16, torch.float16) and interpreter_enabled())


def _launch(kernel, grid, *args, **kwargs) -> dict:
    """``kernel[grid](*args, **kwargs)`` at the tile the autotuner picks (the
    tile constexprs returned), or at _INTERPRETER_TILE under the interpreter,
    which has no GPU timer to tune with."""
    if interpreter_enabled():
        kernel.fn[grid](*args, **kwargs, **_INTERPRETER_TILE)
        return _INTERPRETER_TILE
    kernel[grid](*args, **kwargs)
    return kernel.best_config.kwargs


def _token_tiles(n_tokens: int, n_experts: int, column_blocks):
    """Grid of a token-tiled kernel: every tile :func:`_tile` can find, an
    upper bound ``T // BLOCK_M + min(E, T)`` known without reading the
    expert counts (no host sync), by ``column_blocks(meta)``."""
    return lambda meta: (n_tokens // meta["BLOCK_M"] + min(n_experts, n_tokens), column_blocks(meta))


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


def _dims(x, w1, w_gate):
    return x.shape[0], x.shape[1], w1[0].shape[0], len(w1), 2 if w_gate else 1


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")


def _dropout_arguments(dropout_p: float, seed: int, offset: int, x: torch.Tensor) -> dict:
    """The dropout arguments of the kernels that read the activations; with
    p = 0, threshold 0 and an empty (unread) multiplier of the accumulator dtype."""
    if dropout_p == 0:
        return dict(keep_scale_ptr=x.new_empty(0, dtype=_accumulator(x.dtype)), seed=0, offset=0, threshold=0)
    keep_scale = torch.full((1,), 1.0 / (1.0 - dropout_p), dtype=_accumulator(x.dtype), device=x.device)
    return dict(keep_scale_ptr=keep_scale, seed=seed, offset=offset, threshold=dropout_naive.threshold(dropout_p))


def switch_mlp_forward(x, order, offsets, kept, w1, b1, w2, b2, w_gate, b_gate, scale, activation: str,
                       dropout_p: float = 0.0, seed: int = 0, offset: int = 0):
    """The op ``switch_mlp`` (shapes in :func:`fastformers.ops.switch.naive.switch_mlp`):
    ``y [T, d]`` and the pre-activations ``hidden [T, n · d_ff]`` in order
    layout, in the input dtype (see ``naive.hidden_dtype``)."""
    _check_activation(activation)
    T, d, d_ff, E, n_halves = _dims(x, w1, w_gate)
    constexprs = _constexprs(x.dtype)
    x, scale = x.contiguous(), scale.contiguous()
    y = torch.empty_like(x)
    hidden = x.new_empty((T, n_halves * d_ff))
    if T == 0:
        return y, hidden
    w1s = stacked(w1)
    _launch(switch_in_kernel, _token_tiles(T, E, lambda meta: n_halves * triton.cdiv(d_ff, meta["BLOCK_N"])),
            x, order, offsets, kept, w1s, stacked(w_gate) if w_gate else w1s, _bias(b1, E, d_ff, x),
            _bias(b_gate, E, d_ff, x) if w_gate else x, hidden, E, d, d_ff, n_halves * d_ff, **constexprs)
    _launch(switch_out_kernel, _token_tiles(T, E, lambda meta: triton.cdiv(d, meta["BLOCK_N"])),
            x, order, offsets, kept, hidden, stacked(w2), _bias(b2, E, d, x), scale, y, n_experts=E, d=d, d_ff=d_ff,
            activation=ACTIVATIONS[activation], GATED=bool(w_gate), **_dropout_arguments(dropout_p, seed, offset, x),
            **constexprs)
    return y, hidden


# grad_hidden_kernel's column blocks: the rows of grad(scale)'s partial sums it may write
_NARROWEST_GRAD_HIDDEN_BLOCK_N = min(
    [tile[1] for tiles in _TILES["switch_grad_hidden_kernel"].values() for tile in tiles]
    + [_INTERPRETER_TILE["BLOCK_N"]]
)


def switch_mlp_backward(grad_y, x, order, offsets, kept, w1, b1, w2, b2, w_gate, b_gate, scale, hidden,
                        activation: str, dropout_p: float = 0.0, seed: int = 0, offset: int = 0):
    """The op ``switch_mlp_backward``: grads of x, w1, b1, w2, b2, w_gate,
    b_gate (per-expert lists, empty where the input is) and scale. The
    weight gradients of a group are views of one ``[E, ...]`` buffer."""
    _check_activation(activation)
    T, d, d_ff, E, n_halves = _dims(x, w1, w_gate)
    if tuple(hidden.shape) != (T, n_halves * d_ff) or hidden.dtype != x.dtype:
        raise ValueError(f"hidden must be {x.dtype} [{T}, {n_halves * d_ff}] as switch_mlp returned it, got "
                         f"{hidden.dtype} {list(hidden.shape)}")
    constexprs = _constexprs(x.dtype)
    gated = bool(w_gate)
    grad_y, x, scale, hidden = grad_y.contiguous(), x.contiguous(), scale.contiguous(), hidden.contiguous()
    flags = dict(activation=ACTIVATIONS[activation], GATED=gated, **_dropout_arguments(dropout_p, seed, offset, x))
    w1s = stacked(w1)
    grad_x = torch.empty_like(x)
    grad_hidden = x.new_empty((T, n_halves * d_ff))
    grad_w_in = x.new_empty((n_halves, E, d_ff, d))
    grad_b_in = x.new_empty((n_halves, E, d_ff))
    grad_w2 = x.new_empty((E, d, d_ff))
    grad_b2 = x.new_empty((E, d))
    partial = x.new_empty((triton.cdiv(d_ff, _NARROWEST_GRAD_HIDDEN_BLOCK_N), T), dtype=_accumulator(x.dtype))
    if T > 0:
        tile = _launch(switch_grad_hidden_kernel, _token_tiles(T, E, lambda meta: triton.cdiv(d_ff, meta["BLOCK_N"])),
                       grad_y, x, order, offsets, kept, hidden, stacked(w2), _bias(b2, E, d, x), scale, grad_hidden,
                       partial, n_experts=E, n_tokens=T, d=d, d_ff=d_ff, **flags, **constexprs)
        partial = partial[: triton.cdiv(d_ff, tile["BLOCK_N"])]
        _launch(switch_grad_x_kernel, _token_tiles(T, E, lambda meta: triton.cdiv(d, meta["BLOCK_N"])),
                grad_y, order, offsets, kept, grad_hidden, w1s, stacked(w_gate) if gated else w1s, scale, grad_x,
                E, d, d_ff, GATED=gated, **constexprs)
    _launch(switch_grad_w_in_kernel,
            lambda meta: (E, n_halves * triton.cdiv(d_ff, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_N"])),
            x, order, offsets, kept, grad_hidden, grad_w_in, grad_b_in, E, d, d_ff, n_halves * d_ff, **constexprs)
    _launch(switch_grad_w_out_kernel,
            lambda meta: (E, triton.cdiv(d, meta["BLOCK_M"]), triton.cdiv(d_ff, meta["BLOCK_N"])),
            grad_y, order, offsets, kept, hidden, scale, grad_w2, grad_b2, d=d, d_ff=d_ff, **flags, **constexprs)

    def per_expert(buffer: torch.Tensor, present) -> List[torch.Tensor]:
        return list(buffer.unbind(0)) if present else []

    return (grad_x, per_expert(grad_w_in[0], True), per_expert(grad_b_in[0], b1), per_expert(grad_w2, True),
            per_expert(grad_b2, b2), per_expert(grad_w_in[-1], gated), per_expert(grad_b_in[-1], b_gate),
            partial.sum(0).to(scale.dtype))


# ---------------------------------------------------------------- AOT specs

def _signature(kernel, dtype: str, acc: str) -> dict:
    """Pointers in ``dtype`` except the int indices and ACC buffers; i32 scalars but the dropout's i64."""
    index_pointers = {"order_ptr": "*i64", "offsets_ptr": "*i64", "kept_ptr": "*i64", "partial_ptr": f"*{acc}",
                      "keep_scale_ptr": f"*{acc}"}
    dropout_scalars = ("seed", "offset", "threshold")
    signature = {}
    for name in kernel.arg_names:
        if name in index_pointers:
            signature[name] = index_pointers[name]
        elif name.endswith("_ptr"):
            signature[name] = f"*{dtype}"
        elif name.isupper():
            signature[name] = "constexpr"
        elif name in dropout_scalars:
            signature[name] = "i64"
        else:
            signature[name] = "i32"
    return signature


class _AlignedSpec(AotSpec):
    """A spec compiled as Triton specialises a launch whose ``d``, ``d_ff``
    (and ``width``) are multiples of 16: the variant the "mma" tiles run."""

    @property
    def attrs(self) -> dict:
        divisible = [["tt.divisibility", _ALIGNED]]
        sizes = {(self.kernel.arg_names.index(name),): divisible
                 for name in ("d", "d_ff", "width") if name in self.signature}
        return {**super().attrs, **sizes}


def _aot_specs():
    """Every tile the autotuner may pick, for every dtype and float32 precision
    the GPU launches, each gating variant (the activation is a runtime
    argument); "mma" tiles with the sizes they are chosen for (multiples of 16)."""
    variants = {switch_in_kernel: [{}], switch_grad_w_in_kernel: [{}]}
    for kernel in (switch_out_kernel, switch_grad_hidden_kernel, switch_grad_x_kernel, switch_grad_w_out_kernel):
        variants[kernel] = [dict(GATED=False), dict(GATED=True)]
    specs = []
    for torch_dtype, dtype in _GPU_DTYPES.items():
        acc = "fp64" if dtype == "fp64" else "fp32"
        for precision in ("ieee", "tf32") if torch_dtype == torch.float32 else ("ieee",):
            operands = dtype if precision == "ieee" else f"{dtype}-tf32"
            classes = {tile_class(torch_dtype, precision, d, d) for d in (_ALIGNED, _ALIGNED + 1)}
            for autotuned, flag_sets in variants.items():
                kernel = autotuned.fn
                for group in sorted(classes):
                    spec_type = _AlignedSpec if group == "mma" else AotSpec
                    for m, n, k, warps, stages in _TILES[kernel.__name__][group]:
                        constexprs = dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, PRECISION=precision, UPCAST_DOTS=False,
                                          ACC=tl.float64 if acc == "fp64" else tl.float32)
                        for flags in flag_sets:
                            label = ",".join([operands, group, f"{m}x{n}x{k}", f"w{warps}s{stages}"]
                                             + [f"{key.lower()}={int(value)}" for key, value in flags.items()])
                            specs.append(spec_type(kernel, _signature(kernel, dtype, acc), {**constexprs, **flags},
                                                   label=label, num_warps=warps, num_stages=stages))
    return specs


AOT_SPECS = _aot_specs()
