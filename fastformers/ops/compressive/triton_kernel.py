"""Triton kernels of the Compressive Transformer ops: the CUDA implementations of
``conv_compress`` and ``attention_reconstruction_loss`` (schemas in :mod:`.op`).

conv_compress is one GEMM of ``[G·B, c·D]`` (the memory ``[M, B, D]`` read by
strides: row ``(g, b)``, column ``(k, i)`` at ``mem[g·c + k, b, i]``) by
``[c·D, D_out]`` (the weight, repacked tap-major ``[c, D, D_out]`` once per
call, as the C++ kernel does). Its backward is two kernels: the memory gradient
(``grad [G·B, D_out]`` by ``W_kᵀ`` per tap) and the weight and bias gradients,
which reduce over the ``G·B`` rows in ``splits`` row chunks written to partial
buffers and summed afterwards: no atomics, so every gradient is deterministic.

attention_reconstruction_loss splits the work the way the C++ kernel does:
layer norm and the detached Q/K/V projections are GEMMs (here torch's, in the
accumulation dtype), and the fused kernel is the flash-style pass: per query
tile, online softmax over the memory's and the compressed memory's keys, the
difference of the two attentions and its square, with no ``[L, M]`` score
matrix anywhere. Its backward recomputes the ``h``-vs-``c_mem`` probabilities
from the saved log-sum-exp, per key tile of ``c_mem``, and yields the key and
value gradients of ``c_mem`` only; back through the projections and the layer
norm is again torch's.

Precision: accumulation in float32 (float64 for float64 inputs). conv_compress
runs bfloat16 dots with float32 accumulation; the loss kernels take their
projections in the accumulation dtype (bfloat16 inputs are projected in
float32, as in the C++ kernel). float32 dots are IEEE, not TF32.

Launchers take CUDA tensors in the configurations of ``AOT_SPECS``: float32,
float64 and bfloat16, loss heads of ``d_k <= 128`` (others raise; the op routes
them to the reference, see :func:`gpu_unsupported_reason`), or CPU tensors of
those dtypes when ``TRITON_INTERPRET=1`` was set before import.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ...triton_utils import AotSpec, interpreter_enabled
from ..xl.triton_kernel import _dot
from . import naive

# ------------------------------------------------------------------ conv_compress


@triton.jit
def conv_compress_fwd_kernel(
    mem_ptr,  # [M, B, D]
    taps_ptr,  # [c, D, D_out]: weight[o, i, k] at taps[k, i, o]
    bias_ptr,  # [D_out]; not read without HAS_BIAS
    out_ptr,  # [G, B, D_out] contiguous
    rows,  # G * B
    B,
    D,
    D_out,
    rate,
    stride_m_t,
    stride_m_b,
    stride_m_d,
    stride_w_k,
    stride_w_i,
    stride_w_o,
    stride_bias,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    r_ok = offs_r < rows
    o_ok = offs_o < D_out
    # Row (g, b) reads mem[g * c + k, b]: the first tap's address, then + k * stride_m_t.
    row_base = (offs_r // B * rate).to(tl.int64) * stride_m_t + (offs_r % B).to(tl.int64) * stride_m_b
    acc = tl.zeros([BLOCK_R, BLOCK_O], dtype=ACC)
    for k in range(rate):
        for i_start in range(0, D, BLOCK_I):
            offs_i = i_start + tl.arange(0, BLOCK_I)
            i_ok = offs_i < D
            a = tl.load(
                mem_ptr + ((row_base + k * stride_m_t)[:, None] + offs_i[None, :] * stride_m_d),
                mask=r_ok[:, None] & i_ok[None, :],
                other=0.0,
            )
            w = tl.load(
                taps_ptr + k * stride_w_k + offs_i[:, None] * stride_w_i + offs_o[None, :] * stride_w_o,
                mask=i_ok[:, None] & o_ok[None, :],
                other=0.0,
            )
            acc += _dot(a, w, ACC, UPCAST_DOTS)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o * stride_bias, mask=o_ok, other=0.0).to(ACC)[None, :]
    out = out_ptr + (offs_r.to(tl.int64)[:, None] * D_out + offs_o[None, :])
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & o_ok[None, :])


@triton.jit
def conv_compress_bwd_mem_kernel(
    grad_ptr,  # [G, B, D_out]
    taps_ptr,  # [c, D, D_out]
    grad_mem_ptr,  # [M, B, D] contiguous
    rows,  # G * B
    B,
    D,
    D_out,
    rate,
    stride_g_g,
    stride_g_b,
    stride_g_o,
    stride_w_k,
    stride_w_i,
    stride_w_o,
    BLOCK_R: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_O: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
):
    # grad_mem[g * c + k, b] = grad[g, b] @ W_k, W_k = weight[:, :, k] as [D_out, D].
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    k = tl.program_id(2)
    r_ok = offs_r < rows
    i_ok = offs_i < D
    g = offs_r // B
    b = offs_r % B
    grad_rows = g.to(tl.int64) * stride_g_g + b.to(tl.int64) * stride_g_b
    acc = tl.zeros([BLOCK_R, BLOCK_I], dtype=ACC)
    for o_start in range(0, D_out, BLOCK_O):
        offs_o = o_start + tl.arange(0, BLOCK_O)
        o_ok = offs_o < D_out
        grad = tl.load(
            grad_ptr + (grad_rows[:, None] + offs_o[None, :] * stride_g_o),
            mask=r_ok[:, None] & o_ok[None, :],
            other=0.0,
        )
        w_t = tl.load(
            taps_ptr + k * stride_w_k + offs_o[:, None] * stride_w_o + offs_i[None, :] * stride_w_i,
            mask=o_ok[:, None] & i_ok[None, :],
            other=0.0,
        )
        acc += _dot(grad, w_t, ACC, UPCAST_DOTS)
    mem_rows = (g * rate + k).to(tl.int64) * B + b
    out = grad_mem_ptr + (mem_rows[:, None] * D + offs_i[None, :])
    tl.store(out, acc.to(grad_mem_ptr.dtype.element_ty), mask=r_ok[:, None] & i_ok[None, :])


@triton.jit
def conv_compress_bwd_weight_kernel(
    grad_ptr,  # [G, B, D_out]
    mem_ptr,  # [M, B, D]
    grad_taps_partial_ptr,  # [splits, c, D_out, D] contiguous, ACC
    grad_bias_partial_ptr,  # [splits, D_out] contiguous, ACC; not written without HAS_BIAS
    rows,  # G * B
    rows_per_split,  # a multiple of BLOCK_R
    splits,
    B,
    D,
    D_out,
    rate,
    stride_g_g,
    stride_g_b,
    stride_g_o,
    stride_m_t,
    stride_m_b,
    stride_m_d,
    HAS_BIAS: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
):
    # grad W_k[o, i] = sum over rows (g, b) of grad[g, b, o] * mem[g * c + k, b, i],
    # this program's share: the rows of one split.
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    k = tl.program_id(2) // splits
    split = tl.program_id(2) % splits
    o_ok = offs_o < D_out
    i_ok = offs_i < D
    acc = tl.zeros([BLOCK_O, BLOCK_I], dtype=ACC)
    bias_acc = tl.zeros([BLOCK_O], dtype=ACC)
    r_begin = split * rows_per_split
    r_end = tl.minimum(r_begin + rows_per_split, rows)
    for r_start in range(r_begin, r_end, BLOCK_R):
        offs_r = r_start + tl.arange(0, BLOCK_R)
        r_ok = offs_r < r_end
        g = (offs_r // B).to(tl.int64)
        b = (offs_r % B).to(tl.int64)
        # The int32 part is a feature offset (< D_out · stride_g_o); one int64
        # sum of both made ptxas give the float64 sm_80 build an 8 B stack frame.
        grad_t = tl.load(
            grad_ptr + offs_o[:, None] * stride_g_o + (g * stride_g_g + b * stride_g_b)[None, :],
            mask=o_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        mem = tl.load(
            mem_ptr + (((g * rate + k) * stride_m_t + b * stride_m_b)[:, None] + offs_i[None, :] * stride_m_d),
            mask=r_ok[:, None] & i_ok[None, :],
            other=0.0,
        )
        acc += _dot(grad_t, mem, ACC, UPCAST_DOTS)
        if HAS_BIAS:
            bias_acc += tl.sum(grad_t.to(ACC), axis=1)
    partial = grad_taps_partial_ptr + (((split * rate + k).to(tl.int64) * D_out + offs_o[:, None]) * D + offs_i[None, :])
    tl.store(partial, acc, mask=o_ok[:, None] & i_ok[None, :])
    if HAS_BIAS:
        # Every (tap, feature tile) program summed the same grad rows: one of them stores.
        if (k == 0) & (tl.program_id(1) == 0):
            tl.store(grad_bias_partial_ptr + (split.to(tl.int64) * D_out + offs_o), bias_acc, mask=o_ok)


# ------------------------------------------------- attention_reconstruction_loss


@triton.jit
def _attend(q, key_head, value_head, n_keys, stride_row, offs_d, d_ok,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    """Softmax attention of the pre-scaled query tile ``q [BLOCK_M, BLOCK_D]`` over
    ``n_keys`` keys/values (rows ``stride_row`` apart), online over key tiles:
    ``(out [BLOCK_M, BLOCK_D], lse [BLOCK_M])``."""
    row_max = tl.full([BLOCK_M], -float("inf"), dtype=ACC)
    row_sum = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros(q.shape, dtype=ACC)
    for n_start in range(0, n_keys, BLOCK_N):
        offs_j = n_start + tl.arange(0, BLOCK_N)
        j_ok = offs_j < n_keys
        rows = offs_j.to(tl.int64)[:, None] * stride_row + offs_d[None, :]
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(key_head + rows, mask=kv_mask, other=0.0)
        v = tl.load(value_head + rows, mask=kv_mask, other=0.0)
        scores = tl.where(j_ok[None, :], _dot(q, tl.trans(k), ACC, False), -float("inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        rescale = tl.exp(row_max - new_max)
        probs = tl.exp(scores - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + _dot(probs, v, ACC, False)
        row_max = new_max
    return acc / row_sum[:, None], row_max + tl.log(row_sum)


@triton.jit
def _head(B, H, d_k):
    """This program's (batch, head) of a ``[rows, B, H · d_k]`` tensor: the
    head's offset, the row stride, and b, h (from program axis 0: axes 1 and
    2 of a CUDA grid stop at 65535 blocks)."""
    batch_head = tl.program_id(0)
    b = batch_head // H
    h = batch_head % H
    return (b * H * d_k + h * d_k).to(tl.int64), B * H * d_k, b, h


@triton.jit
def reconstruction_loss_fwd_kernel(
    query_ptr,  # [L, B, E] contiguous, E = H * d_k, times the score scale
    key_m_ptr,  # [M, B, E] contiguous: projections of the memory
    value_m_ptr,  # [M, B, E] contiguous
    key_c_ptr,  # [N, B, E] contiguous: projections of the compressed memory
    value_c_ptr,  # [N, B, E] contiguous
    diff_ptr,  # [L, B, E] contiguous: attn(h, c_mem) - attn(h, mem)
    stats_ptr,  # [2, L, B, H] contiguous: lse of the h-vs-c_mem scores, sum_d diff * attn(h, c_mem)
    partial_ptr,  # [B * H, n_query_tiles] contiguous: sum of diff^2 of each program
    L,
    M,
    N,
    B,
    H,
    d_k,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    head, stride_row, b, h = _head(B, H, d_k)
    offs_i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    i_ok = offs_i < L
    d_ok = offs_d < d_k
    tile_mask = i_ok[:, None] & d_ok[None, :]
    tile = head + offs_i.to(tl.int64)[:, None] * stride_row + offs_d[None, :]
    # Padded query rows (i >= L) are zeros: finite scores, never stored.
    q = tl.load(query_ptr + tile, mask=tile_mask, other=0.0)
    attn_m, _ = _attend(q, key_m_ptr + head, value_m_ptr + head, M, stride_row, offs_d, d_ok, BLOCK_M, BLOCK_N, ACC)
    attn_c, lse_c = _attend(q, key_c_ptr + head, value_c_ptr + head, N, stride_row, offs_d, d_ok, BLOCK_M, BLOCK_N, ACC)
    diff = tl.where(tile_mask, attn_c - attn_m, 0.0)
    tl.store(diff_ptr + tile, diff, mask=tile_mask)
    stat = (offs_i.to(tl.int64) * B + b) * H + h
    tl.store(stats_ptr + stat, lse_c, mask=i_ok)
    tl.store(stats_ptr + L * B * H + stat, tl.sum(diff * attn_c, axis=1), mask=i_ok)
    tl.store(partial_ptr + (tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)), tl.sum(diff * diff))


@triton.jit
def reconstruction_loss_bwd_kernel(
    query_ptr,  # [L, B, E] contiguous, times the score scale
    key_c_ptr,  # [N, B, E] contiguous
    value_c_ptr,  # [N, B, E] contiguous
    diff_ptr,  # [L, B, E] contiguous, from the forward
    stats_ptr,  # [2, L, B, H] contiguous, from the forward
    coef_ptr,  # [] d loss / d attn(h, c_mem) = coef * diff
    grad_key_ptr,  # [N, B, E] contiguous
    grad_value_ptr,  # [N, B, E] contiguous
    L,
    N,
    B,
    H,
    d_k,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    # With q pre-scaled, P = exp(q kᵀ - lse) and dA = diff (coef applied at the end):
    # dV = Pᵀ dA, dS = P * (dA vᵀ - delta), dK = dSᵀ q. Computed transposed
    # (key rows, query columns), with the query-side tiles loaded transposed,
    # so that no register tile is transposed (which spilled for float32).
    head, stride_row, b, h = _head(B, H, d_k)
    offs_j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < d_k
    kv_mask = (offs_j < N)[:, None] & d_ok[None, :]
    kv_tile = head + offs_j.to(tl.int64)[:, None] * stride_row + offs_d[None, :]
    k = tl.load(key_c_ptr + kv_tile, mask=kv_mask, other=0.0)
    v = tl.load(value_c_ptr + kv_tile, mask=kv_mask, other=0.0)
    grad_key = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    grad_value = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    for m_start in range(0, L, BLOCK_M):
        offs_i = m_start + tl.arange(0, BLOCK_M)
        i_ok = offs_i < L
        rows = head + offs_i.to(tl.int64) * stride_row
        tile_mask = i_ok[:, None] & d_ok[None, :]
        tile = rows[:, None] + offs_d[None, :]
        tile_t = rows[None, :] + offs_d[:, None]
        tile_mask_t = d_ok[:, None] & i_ok[None, :]
        q = tl.load(query_ptr + tile, mask=tile_mask, other=0.0)
        q_t = tl.load(query_ptr + tile_t, mask=tile_mask_t, other=0.0)
        grad_attn = tl.load(diff_ptr + tile, mask=tile_mask, other=0.0)
        grad_attn_t = tl.load(diff_ptr + tile_t, mask=tile_mask_t, other=0.0)
        stat = (offs_i.to(tl.int64) * B + b) * H + h
        # +inf on padded rows makes their probabilities exactly zero.
        lse = tl.load(stats_ptr + stat, mask=i_ok, other=float("inf"))
        delta = tl.load(stats_ptr + L * B * H + stat, mask=i_ok, other=0.0)
        probs_t = tl.exp(_dot(k, q_t, ACC, False) - lse[None, :])
        grad_value += _dot(probs_t, grad_attn, ACC, False)
        grad_scores_t = probs_t * (_dot(v, grad_attn_t, ACC, False) - delta[None, :])
        grad_key += _dot(grad_scores_t, q, ACC, False)
    coef = tl.load(coef_ptr)
    tl.store(grad_key_ptr + kv_tile, grad_key * coef, mask=kv_mask)
    tl.store(grad_value_ptr + kv_tile, grad_value * coef, mask=kv_mask)


# ------------------------------------------------------------------ configurations

# The configurations the GPU launches, every one of them in AOT_SPECS, checked
# by ``python -m fastformers.gpu_report`` to compile without spills on sm_80
# and sm_90. conv: (kernel, dtype) -> (BLOCK_R, BLOCK_O, BLOCK_I, num_warps),
# the row tile, the output-feature tile and the input-feature tile.
_CONV_TILES = {
    ("fwd", "fp32"): (64, 32, 16, 4),
    ("fwd", "bf16"): (64, 64, 32, 4),
    ("fwd", "fp64"): (64, 32, 16, 4),
    ("bwd_mem", "fp32"): (64, 64, 16, 8),
    ("bwd_mem", "bf16"): (64, 64, 32, 4),
    ("bwd_mem", "fp64"): (32, 32, 16, 4),
    ("bwd_weight", "fp32"): (64, 64, 16, 8),
    ("bwd_weight", "bf16"): (64, 64, 32, 4),
    ("bwd_weight", "fp64"): (32, 32, 16, 4),
}
# loss: (kernel, dtype of the projections, BLOCK_D) -> (BLOCK_M, BLOCK_N, num_warps).
# float32 dots are IEEE (CUDA-core FMAs, register-hungry), float64 dots DMMA.
_LOSS_TILES = {
    ("fwd", "fp32", 32): (32, 32, 4),
    ("fwd", "fp32", 64): (32, 32, 8),
    ("fwd", "fp32", 128): (32, 32, 8),
    ("fwd", "fp64", 32): (32, 32, 4),
    ("fwd", "fp64", 64): (32, 32, 8),
    ("fwd", "fp64", 128): (16, 16, 8),
    ("bwd", "fp32", 32): (32, 32, 8),
    ("bwd", "fp32", 64): (32, 32, 8),
    ("bwd", "fp32", 128): (16, 32, 8),
    ("bwd", "fp64", 32): (16, 32, 4),
    ("bwd", "fp64", 64): (32, 32, 8),
    ("bwd", "fp64", 128): (16, 32, 8),
}
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp64"}
_TL_DTYPES = {"fp32": tl.float32, "fp64": tl.float64}
# Heads narrower than 32 features are padded to 32: one configuration fewer to
# compile and check per kernel, for heads too small to matter.
_MIN_BLOCK_D = 32
# Programs the weight-gradient kernel aims for: rows are split until the
# (feature tile, tap, split) grid has about this many, enough to fill a GPU.
_WEIGHT_GRAD_PROGRAMS = 256


def _acc_dtype(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _loss_block_d(d_k: int) -> int:
    return max(_MIN_BLOCK_D, triton.next_power_of_2(d_k))


def gpu_unsupported_reason(op: str, dtype: torch.dtype, d_k: int = 0) -> Optional[str]:
    """Why no checked GPU configuration of ``op`` (``conv_compress`` or
    ``attention_reconstruction_loss``, with head size ``d_k``) takes ``dtype``
    (None if one does)."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        return (f"the Triton {op} kernels run {list(_DTYPE_NAMES)} on GPUs, got {dtype}: use float32 or "
                "torch.autocast('cuda', dtype=torch.bfloat16)")
    if op == "attention_reconstruction_loss":
        acc_name = _DTYPE_NAMES[_acc_dtype(dtype)[1]]
        widest = max(block_d for _, dtype_name, block_d in _LOSS_TILES if dtype_name == acc_name)
        if _loss_block_d(d_k) > widest:
            return (f"the Triton {op} kernels take heads of d_k <= {widest} for {dtype} on GPUs, got d_k={d_k}: "
                    "use more heads")
    return None


def _check_config(op: str, dtype: torch.dtype, d_k: int = 0) -> None:
    """Raise for a dtype the kernels have no tiles for; on a GPU also for a
    configuration the AOT check has not seen (the interpreter takes any head size)."""
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"the Triton {op} kernels run {list(_DTYPE_NAMES)}, got {dtype} (use backend='reference')")
    reason = None if interpreter_enabled() else gpu_unsupported_reason(op, dtype, d_k)
    if reason is not None:
        raise ValueError(f"{reason} (use backend='reference')")


def _conv_config(kernel: str, dtype: torch.dtype) -> dict:
    """Tiles of ``dtype``; the interpreter runs every dtype with the largest
    (bfloat16's), as its cost grows with the number of tile steps."""
    name = "bf16" if interpreter_enabled() else _DTYPE_NAMES[dtype]
    block_r, block_o, block_i, num_warps = _CONV_TILES[kernel, name]
    return dict(BLOCK_R=block_r, BLOCK_O=block_o, BLOCK_I=block_i, num_warps=num_warps, num_stages=2)


def _loss_config(kernel: str, dtype: torch.dtype, d_k: int) -> dict:
    """Tiles for projections of ``dtype`` (float32 or float64). The interpreter
    takes any head size, with the tiles of the widest checked entry."""
    name = _DTYPE_NAMES[dtype]
    block_d = _loss_block_d(d_k)
    widest = max(width for _, dtype_name, width in _LOSS_TILES if dtype_name == name)
    block_m, block_n, num_warps = _LOSS_TILES[kernel, name, min(block_d, widest)]
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps, num_stages=2)


def _interpreter_options(dtype: torch.dtype) -> dict:
    # The interpreter multiplies bf16 tensors as raw 16-bit patterns; see xl's _dot.
    return dict(UPCAST_DOTS=dtype == torch.bfloat16 and interpreter_enabled())


# ------------------------------------------------------------------ launchers


def _taps(weight: torch.Tensor) -> torch.Tensor:
    """weight ``[D_out, D, c]`` -> ``[c, D, D_out]``: unit stride along the output features."""
    return weight.permute(2, 1, 0).contiguous()


def conv_compress_forward(mem: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """mem ``[M, B, D]`` (any strides), weight ``[D_out, D, c]``, bias ``[D_out]``
    or None -> ``[M / c, B, D_out]``."""
    _check_config("conv_compress", mem.dtype)
    M, B, D = mem.shape
    d_out, _, rate = weight.shape
    G = M // rate
    taps = _taps(weight)
    out = mem.new_empty((G, B, d_out))
    config = _conv_config("fwd", mem.dtype)
    grid = (triton.cdiv(G * B, config["BLOCK_R"]), triton.cdiv(d_out, config["BLOCK_O"]))
    conv_compress_fwd_kernel[grid](
        mem, taps, taps if bias is None else bias, out,
        G * B, B, D, d_out, rate, *mem.stride(), *taps.stride(), 0 if bias is None else bias.stride(0),
        HAS_BIAS=bias is not None, ACC=_acc_dtype(mem.dtype)[0], **_interpreter_options(mem.dtype), **config,
    )  # fmt: skip
    return out


def _row_splits(rows: int, block_r: int, tiles: int):
    """``(rows_per_split, splits)``: row chunks of whole ``block_r`` tiles, enough
    of them that ``tiles · splits`` programs approach ``_WEIGHT_GRAD_PROGRAMS``."""
    row_tiles = triton.cdiv(rows, block_r)
    wanted = max(1, min(row_tiles, _WEIGHT_GRAD_PROGRAMS // tiles))
    rows_per_split = triton.cdiv(row_tiles, wanted) * block_r
    return rows_per_split, triton.cdiv(rows, rows_per_split)


def conv_compress_backward(grad: torch.Tensor, mem: torch.Tensor, weight: torch.Tensor, has_bias: bool):
    """Gradients of :func:`conv_compress_forward` from ``grad [M / c, B, D_out]``:
    ``(grad_mem [M, B, D], grad_weight [D_out, D, c], grad_bias [D_out]``, or
    ``[0]`` without bias). Deterministic: no atomics."""
    _check_config("conv_compress", mem.dtype)
    M, B, D = mem.shape
    d_out, _, rate = weight.shape
    G = M // rate
    rows = G * B
    acc_tl, acc_torch = _acc_dtype(mem.dtype)
    options = dict(ACC=acc_tl, **_interpreter_options(mem.dtype))
    taps = _taps(weight)

    grad_mem = mem.new_empty((M, B, D))
    config = _conv_config("bwd_mem", mem.dtype)
    grid = (triton.cdiv(rows, config["BLOCK_R"]), triton.cdiv(D, config["BLOCK_I"]), rate)
    conv_compress_bwd_mem_kernel[grid](
        grad, taps, grad_mem, rows, B, D, d_out, rate, *grad.stride(), *taps.stride(), **options, **config,
    )  # fmt: skip

    config = _conv_config("bwd_weight", mem.dtype)
    feature_tiles = triton.cdiv(d_out, config["BLOCK_O"]) * triton.cdiv(D, config["BLOCK_I"])
    rows_per_split, splits = _row_splits(rows, config["BLOCK_R"], feature_tiles * rate)
    grad_taps = torch.empty((splits, rate, d_out, D), dtype=acc_torch, device=mem.device)
    grad_bias = torch.empty((splits, d_out if has_bias else 0), dtype=acc_torch, device=mem.device)
    grid = (triton.cdiv(d_out, config["BLOCK_O"]), triton.cdiv(D, config["BLOCK_I"]), rate * splits)
    conv_compress_bwd_weight_kernel[grid](
        grad, mem, grad_taps, grad_bias if has_bias else grad_taps, rows, rows_per_split, splits,
        B, D, d_out, rate, *grad.stride(), *mem.stride(),
        HAS_BIAS=has_bias, **options, **config,
    )  # fmt: skip
    # Fixed-order sums of the per-split partials keep the gradients deterministic.
    grad_weight = grad_taps.sum(0).permute(1, 2, 0).to(weight.dtype).contiguous()
    return grad_mem, grad_weight, grad_bias.sum(0).to(weight.dtype)


def attention_reconstruction_loss_forward(
    h, mem, c_mem, norm_weight, norm_bias, eps, query_weight, query_bias, key_weight, key_bias, value_weight,
    value_bias, heads, scale,
):
    """The registered op's forward: ``(loss [], diff [L, B, E], stats [2, L, B, H])``
    as :func:`naive.attention_reconstruction_loss_forward` defines them; ``h [L, B, D]``,
    ``mem [M, B, D]``, ``c_mem [N, B, D]``, the layer's norm and projections."""
    L, B, _ = h.shape
    M, N = mem.shape[0], c_mem.shape[0]
    E = query_weight.shape[0]
    d_k = E // heads
    _check_config("attention_reconstruction_loss", h.dtype, d_k)
    acc_tl, acc = _acc_dtype(h.dtype)
    layer = (norm_weight, norm_bias, eps, query_weight, query_bias, key_weight, key_bias, value_weight, value_bias)
    query, key_c, value_c = naive.projections(h, c_mem, *layer, acc)
    query.mul_(scale)
    key_m, value_m = naive.key_value(mem, norm_weight, norm_bias, eps, key_weight, key_bias, value_weight,
                                      value_bias, acc)
    diff = torch.empty((L, B, E), dtype=acc, device=h.device)
    stats = torch.empty((2, L, B, heads), dtype=acc, device=h.device)
    config = _loss_config("fwd", acc, d_k)
    query_tiles = triton.cdiv(L, config["BLOCK_M"])
    partial = torch.empty((B * heads, query_tiles), dtype=acc, device=h.device)
    reconstruction_loss_fwd_kernel[(B * heads, query_tiles)](
        query, key_m, value_m, key_c, value_c, diff, stats, partial,
        L, M, N, B, heads, d_k, ACC=acc_tl, **config,
    )  # fmt: skip
    loss = (partial.sum() / diff.numel()).to(h.dtype)
    return loss, diff, stats


def attention_reconstruction_loss_backward(
    grad, h, c_mem, norm_weight, norm_bias, eps, query_weight, query_bias, key_weight, key_bias, value_weight,
    value_bias, heads, scale, diff, stats,
):
    """The registered backward: gradient of the loss for ``c_mem [N, B, D]``
    from ``grad []`` and the forward's ``diff`` and ``stats``."""
    L, B, _ = h.shape
    N = c_mem.shape[0]
    E = query_weight.shape[0]
    d_k = E // heads
    _check_config("attention_reconstruction_loss", h.dtype, d_k)
    acc_tl, acc = _acc_dtype(h.dtype)
    layer = (norm_weight, norm_bias, eps, query_weight, query_bias, key_weight, key_bias, value_weight, value_bias)
    query, key_c, value_c = naive.projections(h, c_mem, *layer, acc)
    query.mul_(scale)
    coef = (grad.to(acc) * (2.0 / (L * B * E))).reshape(())
    grad_key = torch.empty((N, B, E), dtype=acc, device=h.device)
    grad_value = torch.empty((N, B, E), dtype=acc, device=h.device)
    config = _loss_config("bwd", acc, d_k)
    reconstruction_loss_bwd_kernel[(B * heads, triton.cdiv(N, config["BLOCK_N"]))](
        query, key_c, value_c, diff.to(acc).contiguous(), stats.to(acc).contiguous(), coef, grad_key, grad_value,
        L, N, B, heads, d_k, ACC=acc_tl, **config,
    )  # fmt: skip
    return naive.grad_c_mem(grad_key, grad_value, c_mem, norm_weight, eps, key_weight, value_weight)


# ------------------------------------------------------------------ AOT specs


def _signature(kernel, constexprs: dict, dtype: str, acc: str) -> dict:
    """Pointers to ``dtype`` (the ``*_partial_ptr`` buffers to ``acc``), the
    ``constexprs`` as such, every other argument i32."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_partial_ptr"):
            signature[name] = f"*{acc}"
        elif name.endswith("_ptr"):
            signature[name] = f"*{dtype}"
        else:
            signature[name] = "i32"
    return signature


def _aot_specs():
    """Every configuration the GPU launches: each kernel at each tile entry, with
    and without bias for the conv kernels that take one."""
    conv_kernels = {
        "fwd": conv_compress_fwd_kernel,
        "bwd_mem": conv_compress_bwd_mem_kernel,
        "bwd_weight": conv_compress_bwd_weight_kernel,
    }
    specs = []
    for (name, dtype_name), (block_r, block_o, block_i, num_warps) in _CONV_TILES.items():
        kernel = conv_kernels[name]
        acc_name = "fp64" if dtype_name == "fp64" else "fp32"
        constexprs = dict(BLOCK_R=block_r, BLOCK_O=block_o, BLOCK_I=block_i, ACC=_TL_DTYPES[acc_name],
                          UPCAST_DOTS=False)
        for has_bias in ((False, True) if "HAS_BIAS" in kernel.arg_names else (None,)):
            flags = {} if has_bias is None else {"HAS_BIAS": has_bias}
            label = dtype_name + ("" if has_bias is None else ",bias" if has_bias else ",no bias")
            constexprs = {**constexprs, **flags}
            specs.append(AotSpec(kernel, _signature(kernel, constexprs, dtype_name, acc_name), constexprs,
                                 label=label, num_warps=num_warps, num_stages=2))
    loss_kernels = {"fwd": reconstruction_loss_fwd_kernel, "bwd": reconstruction_loss_bwd_kernel}
    for (name, dtype_name, block_d), (block_m, block_n, num_warps) in _LOSS_TILES.items():
        kernel = loss_kernels[name]
        constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, ACC=_TL_DTYPES[dtype_name])
        specs.append(AotSpec(kernel, _signature(kernel, constexprs, dtype_name, dtype_name), constexprs,
                             label=f"{dtype_name},d{block_d}", num_warps=num_warps, num_stages=2))
    return specs


AOT_SPECS = _aot_specs()
