"""Triton kernels of the Feedback Transformer: the feedback-memory weighted sum,
the attention step over the key/value cache, and the fused recurrence's row
kernels.

Attention step: one program per (batch, head) streams the cache in blocks of
``BLOCK_T`` memory steps with an online softmax; the backward recomputes the
scores (two passes: softmax statistics, then gradients) and adds into the
cache-gradient rows it owns. When B·H programs would leave most of a GPU idle
the walk is split flash-decoding style (:func:`memory_chunk`): program
``(pair, split)`` covers one chunk of memory steps and writes a partial (max,
normaliser, weighted values); a merge kernel combines the partials of a pair in
split order, and the backward's per-split query gradients are summed in split
order too, so results do not depend on scheduling. With ``DROPOUT`` the
probability of step ``j`` of pair ``pid = b · H + h`` is kept iff element
``pid · steps + j`` of the Philox stream is (the ``[B, H, steps]`` mask of the
C++ and reference steps). Positional-table gradients are summed over the batch
by a second kernel, one program per (head, block of steps), so no two programs
write the same row.

Row kernels (:func:`residual_norm`, :func:`ffn_hidden`, their backwards): the
per-token work of the recurrence around its GEMMs, one program per batch row
(:mod:`.recurrence`, ``_TritonRows``).

Launchers take CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set
before import (the Triton interpreter; how they are tested without a GPU).
"""
import itertools

import torch
import triton
import triton.language as tl

from ...triton_utils import AotSpec
from ..dropout import naive as dropout_naive
from ..dropout.triton_kernel import keep
from ..switch.triton_kernel import ACTIVATIONS, _activate  # the labml activations and their slopes, shared

BLOCK_N = 1024


@triton.jit
def _softmax_stats(w_ptr, L, BLOCK_L: tl.constexpr, ACC: tl.constexpr):
    offs = tl.arange(0, BLOCK_L)
    w = tl.load(w_ptr + offs, mask=offs < L, other=-float("inf")).to(ACC)
    w_max = tl.max(w, axis=0)
    denom = tl.sum(tl.exp(w - w_max), axis=0)
    return w_max, denom


@triton.jit
def feedback_memory_fwd_kernel(
    x_ptr,  # [L, N]
    w_ptr,  # [L]
    out_ptr,  # [N]
    L,
    N,
    BLOCK_L: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,  # accumulation dtype: float64 for float64 inputs, else float32
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    w_max, denom = _softmax_stats(w_ptr, L, BLOCK_L, ACC)
    # l * N passes 2^31 on large inputs: the row stride is int64.
    row_stride = N.to(tl.int64)
    acc = tl.zeros([BLOCK_N], dtype=ACC)
    for l in range(L):
        p = tl.exp(tl.load(w_ptr + l).to(ACC) - w_max) / denom
        x = tl.load(x_ptr + (l * row_stride + offs), mask=mask, other=0.0).to(ACC)
        acc += p * x
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def feedback_memory_bwd_kernel(
    grad_ptr,  # [N]
    x_ptr,  # [L, N]
    w_ptr,  # [L]
    grad_x_ptr,  # [L, N]
    partial_ptr,  # [n_blocks, L] in ACC: per-block sum_n grad[n] * x[l, n]
    L,
    N,
    BLOCK_L: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,  # accumulation dtype: float64 for float64 inputs, else float32
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    w_max, denom = _softmax_stats(w_ptr, L, BLOCK_L, ACC)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC)
    row_stride = N.to(tl.int64)
    for l in range(L):
        p = tl.exp(tl.load(w_ptr + l).to(ACC) - w_max) / denom
        x = tl.load(x_ptr + (l * row_stride + offs), mask=mask, other=0.0).to(ACC)
        tl.store(grad_x_ptr + (l * row_stride + offs), (p * g).to(grad_x_ptr.dtype.element_ty), mask=mask)
        tl.store(partial_ptr + pid * L + l, tl.sum(g * x, axis=0))


def _block_l(L: int) -> int:
    return max(triton.next_power_of_2(L), 2)


def _acc_dtype(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def feedback_memory_forward(layer_outputs: torch.Tensor, weights: torch.Tensor, *, out=None) -> torch.Tensor:
    """layer_outputs ``[L, B, D]``, weights ``[L]`` -> ``[B, D]`` (written into a contiguous ``out`` when given)."""
    layer_outputs = layer_outputs.contiguous()
    weights = weights.contiguous()
    L = layer_outputs.shape[0]
    if out is None:
        out = layer_outputs.new_empty(layer_outputs.shape[1:])
    if L == 0:  # the sum over no layers (the kernel's softmax of nothing would be NaN)
        return out.zero_()
    N = layer_outputs[0].numel()
    grid = (triton.cdiv(N, BLOCK_N),)
    feedback_memory_fwd_kernel[grid](
        layer_outputs, weights, out, L, N, BLOCK_L=_block_l(L), BLOCK_N=BLOCK_N, ACC=_acc_dtype(out.dtype)[0]
    )
    return out


def feedback_memory_backward(grad: torch.Tensor, layer_outputs: torch.Tensor, weights: torch.Tensor):
    """Gradients for ``layer_outputs [L, B, D]`` and ``weights [L]``."""
    grad = grad.contiguous()
    layer_outputs = layer_outputs.contiguous()
    weights = weights.contiguous()
    L = layer_outputs.shape[0]
    if L == 0:
        return torch.empty_like(layer_outputs), torch.empty_like(weights)
    N = layer_outputs[0].numel()
    n_blocks = triton.cdiv(N, BLOCK_N)
    grad_layer_outputs = torch.empty_like(layer_outputs)
    acc_tl, acc_torch = _acc_dtype(layer_outputs.dtype)
    partial = torch.empty((n_blocks, L), dtype=acc_torch, device=layer_outputs.device)
    feedback_memory_bwd_kernel[(n_blocks,)](
        grad, layer_outputs, weights, grad_layer_outputs, partial, L, N, BLOCK_L=_block_l(L), BLOCK_N=BLOCK_N, ACC=acc_tl
    )
    # The [L]-sized softmax backward is too small to deserve a kernel.
    probs = torch.softmax(weights.to(acc_torch), dim=0)
    grad_probs = partial.sum(0)
    grad_weights = probs * (grad_probs - (probs * grad_probs).sum())
    return grad_layer_outputs, grad_weights.to(weights.dtype)


def _aot_specs():
    specs = []
    for dtype, acc in (("fp32", "fp32"), ("bf16", "fp32"), ("fp64", "fp64")):
        common = {"L": "i32", "N": "i32", "BLOCK_L": "constexpr", "BLOCK_N": "constexpr", "ACC": "constexpr"}
        constexprs = {"BLOCK_L": 8, "BLOCK_N": BLOCK_N, "ACC": getattr(tl, {"fp32": "float32", "fp64": "float64"}[acc])}
        specs.append(
            AotSpec(
                feedback_memory_fwd_kernel,
                {"x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", **common},
                constexprs,
                label=dtype,
            )
        )
        specs.append(
            AotSpec(
                feedback_memory_bwd_kernel,
                {
                    "grad_ptr": f"*{dtype}",
                    "x_ptr": f"*{dtype}",
                    "w_ptr": f"*{dtype}",
                    "grad_x_ptr": f"*{dtype}",
                    "partial_ptr": f"*{acc}",
                    **common,
                },
                constexprs,
                label=dtype,
            )
        )
    return specs


# ---------------------------------------------------------------- attention step

# Memory steps per block: [BLOCK_T, BLOCK_D] tiles of keys, values, positional
# rows and their gradients must fit in registers (checked by the AOT report).
_TILE_ELEMENTS = {4: 1024, 2: 1024, 8: 512}


def _block_t(block_d: int, element_size: int, dropout: bool = False) -> int:
    # The Philox rounds of a block's keep bits need registers of their own: with
    # dropout the blocks are halved (the float32 d=32 and float64 d=128 backwards
    # spilled on sm_80 at the plain sizes).
    if dropout:
        return max(_TILE_ELEMENTS[element_size] // (2 * block_d), 2)
    return max(_TILE_ELEMENTS[element_size] // block_d, 4)


@triton.jit
def _scores(q, qu, k_ptr, r_ptr, s_ptr, offs_j, offs_d, mask_j, mask_d, k_time, H, d, scale, ACC: tl.constexpr):
    """Scaled scores of one block of memory steps (-inf beyond ``steps``) and the keys."""
    mask = mask_j[:, None] & mask_d[None, :]
    # A cache passes 2^31 elements on large inputs: time offsets are int64.
    k = tl.load(k_ptr + (offs_j[:, None].to(tl.int64) * k_time + offs_d[None, :]), mask=mask, other=0.0).to(ACC)
    r = tl.load(r_ptr + offs_j[:, None].to(tl.int64) * (H * d) + offs_d[None, :], mask=mask, other=0.0).to(ACC)
    bias = tl.load(s_ptr + offs_j * H, mask=mask_j, other=0.0).to(ACC)
    s = (tl.sum(k * qu[None, :], axis=1) + tl.sum(r * q[None, :], axis=1) + bias) * scale
    return tl.where(mask_j, s, -float("inf")), k, r


@triton.jit
def _keep_multipliers(seed, offset, threshold, keep_scale, pair, steps, offs_j, DROPOUT: tl.constexpr):
    """Dropout multipliers (``1/(1-p)`` kept, 0 dropped) of one block of memory steps; 1 without dropout."""
    if DROPOUT:
        kept = keep(seed, offset, pair.to(tl.int64) * steps + offs_j, threshold)
        return tl.where(kept, keep_scale, 0.0)
    else:
        return tl.full(offs_j.shape, 1.0, tl.float32)


@triton.jit
def _softmax_pass(q, qu, k_ptr, v_ptr, r_ptr, s_ptr, lo, hi, steps, k_time, v_time, H, d, scale,
                  pair, seed, offset, threshold, keep_scale,
                  BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, DROPOUT: tl.constexpr):
    """Online softmax over memory steps ``lo .. hi-1`` (of ``steps``): running max,
    normaliser (without dropout) and the sum of values weighted by the kept probabilities."""
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < d
    m = tl.full([1], -float("inf"), ACC)
    norm = tl.zeros([1], ACC)
    acc = tl.zeros([BLOCK_D], ACC)
    for start in range(lo, hi, BLOCK_T):
        offs_j = start + tl.arange(0, BLOCK_T)
        mask_j = offs_j < hi
        s, k, r = _scores(q, qu, k_ptr, r_ptr, s_ptr, offs_j, offs_d, mask_j, mask_d, k_time, H, d, scale, ACC)
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        v = tl.load(v_ptr + (offs_j[:, None].to(tl.int64) * v_time + offs_d[None, :]),
                    mask=mask_j[:, None] & mask_d[None, :], other=0.0).to(ACC)
        norm = norm * alpha + tl.sum(p, axis=0)
        kept_p = p * _keep_multipliers(seed, offset, threshold, keep_scale, pair, steps, offs_j, DROPOUT).to(ACC)
        acc = acc * alpha + tl.sum(kept_p[:, None] * v, axis=0)
        m = m_new
    return m, norm, acc


@triton.jit
def attention_step_fwd_kernel(
    q_ptr,  # [B, H, d]
    k_ptr,  # [T_max, B, H, d], strides (k_time, k_batch, d, 1)
    v_ptr,  # [T_max, B, H, d], strides (v_time, v_batch, d, 1)
    r_ptr,  # [P, H, d]
    s_ptr,  # [P, H]
    u_ptr,  # [H, d]
    out_ptr,  # [B, H, d]; with SPLIT [n_splits, B · H, d] in ACC: unnormalised partial sums
    part_stats_ptr,  # with SPLIT [n_splits, B · H, 2] in ACC: partial (max, normaliser); unused otherwise
    steps, chunk, H, d, first_row, k_time, k_batch, v_time, v_batch, scale,
    seed, offset, threshold, keep_scale,  # dropout of the probabilities (read only with DROPOUT)
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,  # accumulation dtype: float64 for float64 inputs, else float32
    DROPOUT: tl.constexpr,
    SPLIT: tl.constexpr,  # program (pid, split) covers memory steps split · chunk .. (split + 1) · chunk - 1
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // H
    h = pid % H
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < d
    q = tl.load(q_ptr + pid * d + offs_d, mask=mask_d, other=0.0).to(ACC)
    qu = q + tl.load(u_ptr + h * d + offs_d, mask=mask_d, other=0.0).to(ACC)
    lo = split * chunk
    m, norm, acc = _softmax_pass(
        q, qu, k_ptr + (b.to(tl.int64) * k_batch + h * d), v_ptr + (b.to(tl.int64) * v_batch + h * d),
        r_ptr + first_row * H * d + h * d, s_ptr + first_row * H + h, lo, tl.minimum(lo + chunk, steps),
        steps, k_time, v_time, H, d, scale, pid, seed, offset, threshold, keep_scale, BLOCK_T, BLOCK_D, ACC, DROPOUT,
    )
    if SPLIT:
        row = split * tl.num_programs(0) + pid
        tl.store(out_ptr + row.to(tl.int64) * d + offs_d, acc, mask=mask_d)
        stat = tl.arange(0, 1)
        tl.store(part_stats_ptr + row * 2 + stat, m)
        tl.store(part_stats_ptr + row * 2 + 1 + stat, norm)
    else:
        tl.store(out_ptr + pid * d + offs_d, (acc / norm).to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def attention_step_merge_kernel(
    part_acc_ptr,  # [n_splits, B · H, d] in ACC
    part_stats_ptr,  # [n_splits, B · H, 2] in ACC
    out_ptr,  # [B, H, d]: the normalised output; with BACKWARD [B · H, 2] in ACC: (log normaliser, g · output)
    g_ptr,  # [B, H, d] gradient of the output (BACKWARD only)
    n_splits, d,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    BACKWARD: tl.constexpr,  # the statistics the split backward kernel needs instead of the output
):
    pid = tl.program_id(0)
    n_pairs = tl.num_programs(0)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < d
    stat = tl.arange(0, 1)
    m = tl.full([1], -float("inf"), ACC)
    norm = tl.zeros([1], ACC)
    acc = tl.zeros([BLOCK_D], ACC)
    # In split order, whatever order the partials were written in: deterministic.
    for split in range(n_splits):
        row = split * n_pairs + pid
        m_split = tl.load(part_stats_ptr + row * 2 + stat)
        m_new = tl.maximum(m, m_split)
        alpha = tl.exp(m - m_new)
        beta = tl.exp(m_split - m_new)
        norm = norm * alpha + tl.load(part_stats_ptr + row * 2 + 1 + stat) * beta
        acc = acc * alpha + tl.load(part_acc_ptr + row.to(tl.int64) * d + offs_d, mask=mask_d, other=0.0) * beta
        m = m_new
    if BACKWARD:
        # sum_j p_j m_j (g . V_j) = g . out (m_j the dropout multipliers)
        g = tl.load(g_ptr + pid * d + offs_d, mask=mask_d, other=0.0).to(ACC)
        tl.store(out_ptr + pid * 2 + stat, m + tl.log(norm))
        tl.store(out_ptr + pid * 2 + 1 + stat, tl.sum(g * acc, axis=0) / norm)
    else:
        tl.store(out_ptr + pid * d + offs_d, (acc / norm).to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def attention_step_bwd_kernel(
    g_ptr,  # [B, H, d] gradient of the output
    q_ptr, k_ptr, v_ptr, r_ptr, s_ptr, u_ptr,  # as in the forward
    gq_ptr,  # [B, H, d] out; with SPLIT [n_splits, B · H, d] in ACC: this chunk's share
    gk_ptr,  # [>= steps, B, H, d] accumulated, strides (gk_time, gk_batch, d, 1)
    gv_ptr,  # [>= steps, B, H, d] accumulated, strides (gv_time, gv_batch, d, 1)
    gu_part_ptr,  # [n_splits, B · H, d] in ACC: this (b, h, split)'s share of grad(query_pos_bias)
    ds_ptr,  # [steps, B * H] in ACC: gradients of the scaled scores
    stats_ptr,  # with SPLIT [B · H, 2] in ACC: log of the softmax normaliser, g · output; unused otherwise
    steps, chunk, H, d, first_row, k_time, k_batch, v_time, v_batch, gk_time, gk_batch, gv_time, gv_batch, scale,
    seed, offset, threshold, keep_scale,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    DROPOUT: tl.constexpr,
    SPLIT: tl.constexpr,  # the softmax statistics come from the split forward instead of a first pass
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_pairs = tl.num_programs(0)
    b = pid // H
    h = pid % H
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < d
    q = tl.load(q_ptr + pid * d + offs_d, mask=mask_d, other=0.0).to(ACC)
    qu = q + tl.load(u_ptr + h * d + offs_d, mask=mask_d, other=0.0).to(ACC)
    g = tl.load(g_ptr + pid * d + offs_d, mask=mask_d, other=0.0).to(ACC)
    k_ptr += b.to(tl.int64) * k_batch + h * d
    v_ptr += b.to(tl.int64) * v_batch + h * d
    r_ptr += first_row * H * d + h * d
    s_ptr += first_row * H + h
    gk_ptr += b.to(tl.int64) * gk_batch + h * d
    gv_ptr += b.to(tl.int64) * gv_batch + h * d
    if SPLIT:
        log_norm = tl.load(stats_ptr + pid * 2)
        delta = tl.load(stats_ptr + pid * 2 + 1)
    else:
        m, norm, acc = _softmax_pass(q, qu, k_ptr, v_ptr, r_ptr, s_ptr, 0, steps, steps, k_time, v_time, H, d, scale,
                                     pid, seed, offset, threshold, keep_scale, BLOCK_T, BLOCK_D, ACC, DROPOUT)
        log_norm = m + tl.log(norm)
        # sum_j p_j m_j (g . V_j) = g . out (m_j the dropout multipliers)
        delta = tl.sum(g * acc, axis=0) / norm
    gq = tl.zeros([BLOCK_D], ACC)
    gu = tl.zeros([BLOCK_D], ACC)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, steps)
    for start in range(lo, hi, BLOCK_T):
        offs_j = start + tl.arange(0, BLOCK_T)
        mask_j = offs_j < hi
        mask = mask_j[:, None] & mask_d[None, :]
        s, k, r = _scores(q, qu, k_ptr, r_ptr, s_ptr, offs_j, offs_d, mask_j, mask_d, k_time, H, d, scale, ACC)
        p = tl.exp(s - log_norm)
        rows_j = offs_j[:, None].to(tl.int64)
        v = tl.load(v_ptr + (rows_j * v_time + offs_d[None, :]), mask=mask, other=0.0).to(ACC)
        multipliers = _keep_multipliers(seed, offset, threshold, keep_scale, pid, steps, offs_j, DROPOUT).to(ACC)
        ds = tl.where(mask_j, p * (multipliers * tl.sum(v * g[None, :], axis=1) - delta) * scale, 0.0)
        gq += tl.sum(ds[:, None] * (k + r), axis=0)
        gu += tl.sum(ds[:, None] * k, axis=0)
        gk_rows = gk_ptr + (rows_j * gk_time + offs_d[None, :])
        gk = tl.load(gk_rows, mask=mask, other=0.0).to(ACC) + ds[:, None] * qu[None, :]
        tl.store(gk_rows, gk.to(gk_ptr.dtype.element_ty), mask=mask)
        gv_rows = gv_ptr + (rows_j * gv_time + offs_d[None, :])
        gv = tl.load(gv_rows, mask=mask, other=0.0).to(ACC) + (p * multipliers)[:, None] * g[None, :]
        tl.store(gv_rows, gv.to(gv_ptr.dtype.element_ty), mask=mask)
        tl.store(ds_ptr + (offs_j.to(tl.int64) * n_pairs + pid), ds, mask=mask_j)
    row = (split * n_pairs + pid).to(tl.int64)
    tl.store(gq_ptr + row * d + offs_d, gq.to(gq_ptr.dtype.element_ty), mask=mask_d)
    tl.store(gu_part_ptr + row * d + offs_d, gu, mask=mask_d)


@triton.jit
def attention_step_pos_grad_kernel(
    ds_ptr,  # [steps, B * H] in ACC
    q_ptr,  # [B, H, d]
    gr_ptr,  # [P_buffer, H, d] accumulated, rows first_row .. first_row + steps - 1
    gs_ptr,  # [P_buffer, H] accumulated
    steps, B, H, d, first_row,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    # Step blocks on grid axis 0: their count grows with the memory (axis 1 stops at 65535 blocks).
    offs_j = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask_j = offs_j < steps
    mask_d = offs_d < d
    mask = mask_j[:, None] & mask_d[None, :]
    acc_r = tl.zeros([BLOCK_T, BLOCK_D], ACC)
    acc_s = tl.zeros([BLOCK_T], ACC)
    for b in range(B):
        ds = tl.load(ds_ptr + (offs_j.to(tl.int64) * (B * H) + b * H + h), mask=mask_j, other=0.0)
        q = tl.load(q_ptr + (b * H + h) * d + offs_d, mask=mask_d, other=0.0).to(ACC)
        acc_r += ds[:, None] * q[None, :]
        acc_s += ds
    rows = (first_row + offs_j).to(tl.int64)
    gr_rows = gr_ptr + (rows[:, None] * (H * d) + h * d + offs_d[None, :])
    gr = tl.load(gr_rows, mask=mask, other=0.0).to(ACC) + acc_r
    tl.store(gr_rows, gr.to(gr_ptr.dtype.element_ty), mask=mask)
    gs_rows = gs_ptr + (rows * H + h)
    gs = tl.load(gs_rows, mask=mask_j, other=0.0).to(ACC) + acc_s
    tl.store(gs_rows, gs.to(gs_ptr.dtype.element_ty), mask=mask_j)


def _block_d(d: int) -> int:
    return max(triton.next_power_of_2(d), 16)


# Fewer (batch, head) programs than this leave SMs idle (an H100 has 132; two
# programs per SM hide the latency of the cache loads): the memory walk is split.
SPLIT_TARGET_PROGRAMS = 264


def memory_chunk(pairs: int, steps: int, block_t: int) -> int:
    """Memory steps per program: all ``steps`` when ``pairs`` programs fill the GPU,
    else whole blocks of ``block_t`` steps, enough chunks to reach
    :data:`SPLIT_TARGET_PROGRAMS` programs (never an empty chunk)."""
    if pairs >= SPLIT_TARGET_PROGRAMS or steps <= block_t:
        return steps
    splits = min(triton.cdiv(SPLIT_TARGET_PROGRAMS, pairs), triton.cdiv(steps, block_t))
    return triton.cdiv(triton.cdiv(steps, splits), block_t) * block_t


def _backward_warps(element_size: int, block_d: int, dropout: bool, split: bool) -> int:
    """Warps of :func:`attention_step_bwd_kernel`: with 4 warps the float64 d=64 split
    variant with dropout spills one register on sm_80 (ptxas holds it at 64
    registers); with 2 it takes 128 and spills none (AOT report)."""
    return 2 if (element_size, block_d, dropout, split) == (8, 64, True, True) else 4


def _inner_contiguous(cache: torch.Tensor) -> torch.Tensor:
    """Caches may be strided over time and batch (one buffer holding several caches); [H, d] must be dense."""
    return cache if cache.stride(3) == 1 and cache.stride(2) == cache.shape[3] else cache.contiguous()


def _dropout_args(dropout_p: float, seed: int, offset: int):
    """Kernel arguments ``(seed, offset, threshold, keep_scale)`` and the ``DROPOUT`` flag."""
    active = dropout_p > 0
    keep_scale = 1.0 / (1.0 - dropout_p) if active else 1.0
    return (int(seed), int(offset), dropout_naive.threshold(dropout_p), keep_scale), active


def _forward_launch(query, key_cache, value_cache, steps, R, S, u, scale, dropout_args, dropout_active, out,
                    grad=None):
    """Writes the step's output into ``out [B, H, d]``: one launch, or partials per chunk
    and their merge. With ``grad`` (the backward's statistics pass) the merge writes
    ``out [B · H, 2]``: each pair's log softmax normaliser and ``grad · output``."""
    B, H, d = query.shape
    pairs = B * H
    block_d = _block_d(d)
    block_t = _block_t(block_d, query.element_size(), dropout_active)
    chunk = memory_chunk(pairs, steps, block_t)
    n_splits = triton.cdiv(steps, chunk)
    split = n_splits > 1 or grad is not None
    acc_tl, acc_torch = _acc_dtype(query.dtype)
    if split:
        part_acc = torch.empty((n_splits, pairs, d), dtype=acc_torch, device=query.device)
        part_stats = torch.empty((n_splits, pairs, 2), dtype=acc_torch, device=query.device)
    else:
        part_acc, part_stats = out, out
    attention_step_fwd_kernel[(pairs, n_splits)](
        query, key_cache, value_cache, R, S, u, part_acc, part_stats,
        steps, chunk, H, d, R.shape[0] - steps, key_cache.stride(0), key_cache.stride(1),
        value_cache.stride(0), value_cache.stride(1), float(scale), *dropout_args,
        BLOCK_T=block_t, BLOCK_D=block_d, ACC=acc_tl, DROPOUT=dropout_active, SPLIT=split,
    )
    if split:
        attention_step_merge_kernel[(pairs,)](
            part_acc, part_stats, out, out if grad is None else grad, n_splits, d,
            BLOCK_D=block_d, ACC=acc_tl, BACKWARD=grad is not None,
        )
    return chunk


def attention_step_forward(query, key_cache, value_cache, steps, key_pos_embeddings, key_pos_bias, query_pos_bias,
                           scale, dropout_p=0.0, seed=0, offset=0, *, out=None):
    """``query [B, H, d]`` over cache entries ``0 .. steps-1`` -> ``[B, H, d]`` (written into
    ``out`` when given: a contiguous ``[B, H, d]`` view of a recurrence's record buffer)."""
    query = query.contiguous()
    key_cache, value_cache = _inner_contiguous(key_cache), _inner_contiguous(value_cache)
    R, S, u = key_pos_embeddings.contiguous(), key_pos_bias.contiguous(), query_pos_bias.contiguous()
    out = torch.empty_like(query) if out is None else out
    dropout_args, dropout_active = _dropout_args(dropout_p, seed, offset)
    _forward_launch(query, key_cache, value_cache, steps, R, S, u, scale, dropout_args, dropout_active, out)
    return out


def attention_step_backward_accumulate(grad, query, key_cache, value_cache, steps, key_pos_embeddings, key_pos_bias,
                                       query_pos_bias, scale, dropout_p, seed, offset, grad_key_cache,
                                       grad_value_cache, grad_key_pos_embeddings, grad_key_pos_bias,
                                       grad_query_pos_bias):
    """Adds this step's gradients into the buffers (cache rows ``0 .. steps-1``, the
    last ``steps`` table rows, all of ``grad_query_pos_bias``); returns grad(query)."""
    for name, buffer in (("grad_key_cache", grad_key_cache), ("grad_value_cache", grad_value_cache)):
        if buffer.stride(3) != 1 or buffer.stride(2) != buffer.shape[3]:
            raise ValueError(f"{name} must have its [H, d] slice contiguous, got strides {buffer.stride()}")
    for name, buffer in (("grad_key_pos_embeddings", grad_key_pos_embeddings), ("grad_key_pos_bias", grad_key_pos_bias)):
        if not buffer.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    # bfloat16/half steps may add into float32 buffers (a recurrence sums thousands of steps).
    allowed = (query.dtype, torch.float32) if query.dtype in (torch.bfloat16, torch.float16) else (query.dtype,)
    buffers = (grad_key_cache, grad_value_cache, grad_key_pos_embeddings, grad_key_pos_bias, grad_query_pos_bias)
    if grad_key_cache.dtype not in allowed or any(b.dtype != grad_key_cache.dtype for b in buffers):
        raise TypeError(f"gradient buffers must share one dtype among {allowed} for {query.dtype} queries, "
                        f"got {[b.dtype for b in buffers]}")
    grad, query = grad.contiguous(), query.contiguous()
    key_cache, value_cache = _inner_contiguous(key_cache), _inner_contiguous(value_cache)
    R, S, u = key_pos_embeddings.contiguous(), key_pos_bias.contiguous(), query_pos_bias.contiguous()
    B, H, d = query.shape
    pairs = B * H
    acc_tl, acc_torch = _acc_dtype(query.dtype)
    block_d = _block_d(d)
    dropout_args, dropout_active = _dropout_args(dropout_p, seed, offset)
    block_t = _block_t(block_d, query.element_size(), dropout_active)
    chunk = memory_chunk(pairs, steps, block_t)
    n_splits = triton.cdiv(steps, chunk)
    split = n_splits > 1
    if split:
        # The softmax statistics of the whole walk come first (split forward and merge),
        # then each chunk's gradients; per-split query gradients are summed in split order.
        stats = torch.empty((pairs, 2), dtype=acc_torch, device=query.device)
        _forward_launch(query, key_cache, value_cache, steps, R, S, u, scale, dropout_args, dropout_active, stats, grad)
        grad_query = torch.empty((n_splits, B, H, d), dtype=acc_torch, device=query.device)
    else:
        stats = grad_query = torch.empty_like(query)
    gu_part = torch.empty((n_splits, B, H, d), dtype=acc_torch, device=query.device)
    score_grads = torch.empty((steps, pairs), dtype=acc_torch, device=query.device)
    attention_step_bwd_kernel[(pairs, n_splits)](
        grad, query, key_cache, value_cache, R, S, u, grad_query, grad_key_cache, grad_value_cache, gu_part,
        score_grads, stats, steps, chunk, H, d, R.shape[0] - steps, key_cache.stride(0), key_cache.stride(1),
        value_cache.stride(0), value_cache.stride(1), grad_key_cache.stride(0), grad_key_cache.stride(1),
        grad_value_cache.stride(0), grad_value_cache.stride(1), float(scale), *dropout_args,
        BLOCK_T=block_t, BLOCK_D=block_d, ACC=acc_tl, DROPOUT=dropout_active, SPLIT=split,
        num_warps=_backward_warps(query.element_size(), block_d, dropout_active, split),
    )
    pos_block_t = _block_t(block_d, query.element_size())
    attention_step_pos_grad_kernel[(triton.cdiv(steps, pos_block_t), H)](
        score_grads, query, grad_key_pos_embeddings, grad_key_pos_bias,
        steps, B, H, d, grad_key_pos_embeddings.shape[0] - steps,
        BLOCK_T=pos_block_t, BLOCK_D=block_d, ACC=acc_tl,
    )
    if split:
        grad_query = grad_query.sum(0).to(query.dtype)
    # [n_splits, B, H, d] -> [H, d]: too small to deserve a kernel (torch sums in a fixed order).
    grad_query_pos_bias += gu_part.sum((0, 1)).to(grad_query_pos_bias.dtype)
    return grad_query


def attention_step_backward(grad, query, key_cache, value_cache, steps, key_pos_embeddings, key_pos_bias,
                            query_pos_bias, scale, dropout_p=0.0, seed=0, offset=0):
    """Gradients of the rows the step used: query, key/value ``[steps, B, H, d]``,
    key_pos_embeddings ``[steps, H, d]``, key_pos_bias ``[steps, H]``, query_pos_bias."""
    B, H, d = query.shape
    zeros = lambda *shape: torch.zeros(shape, dtype=query.dtype, device=query.device)  # noqa: E731
    grad_key, grad_value = zeros(steps, B, H, d), zeros(steps, B, H, d)
    grad_pos_emb, grad_pos_bias, grad_query_pos_bias = zeros(steps, H, d), zeros(steps, H), zeros(H, d)
    grad_query = attention_step_backward_accumulate(
        grad, query, key_cache, value_cache, steps, key_pos_embeddings, key_pos_bias, query_pos_bias, scale,
        dropout_p, seed, offset, grad_key, grad_value, grad_pos_emb, grad_pos_bias, grad_query_pos_bias,
    )
    return grad_query, grad_key, grad_value, grad_pos_emb, grad_pos_bias, grad_query_pos_bias


def _step_aot_specs():
    specs = []
    ints = ("steps", "chunk", "H", "d", "first_row", "k_time", "k_batch", "v_time", "v_batch")
    dropout_types = {"seed": "i64", "offset": "i64", "threshold": "i64", "keep_scale": "fp32"}
    flags = {"BLOCK_T": "constexpr", "BLOCK_D": "constexpr", "ACC": "constexpr", "DROPOUT": "constexpr",
             "SPLIT": "constexpr"}
    for dtype, acc, element_size in (("fp32", "fp32", 4), ("bf16", "fp32", 2), ("fp64", "fp64", 8)):
        acc_tl = getattr(tl, {"fp32": "float32", "fp64": "float64"}[acc])
        inputs = {name: f"*{dtype}" for name in ("q_ptr", "k_ptr", "v_ptr", "r_ptr", "s_ptr", "u_ptr")}
        for block_d in (32, 64, 128):
            # The merge writes the forward's output (query dtype) or the backward's statistics (ACC).
            for out_dtype, backward in ((dtype, False), (acc, True)):
                specs.append(AotSpec(
                    attention_step_merge_kernel,
                    {"part_acc_ptr": f"*{acc}", "part_stats_ptr": f"*{acc}", "out_ptr": f"*{out_dtype}",
                     "g_ptr": f"*{dtype}", "n_splits": "i32", "d": "i32", "BLOCK_D": "constexpr", "ACC": "constexpr",
                     "BACKWARD": "constexpr"},
                    {"BLOCK_D": block_d, "ACC": acc_tl, "BACKWARD": backward},
                    label=f"{dtype},d{block_d}" + (",backward" if backward else ""),
                ))
            for dropout, split in itertools.product((False, True), (False, True)):
                constexprs = {"BLOCK_T": _block_t(block_d, element_size, dropout), "BLOCK_D": block_d,
                              "ACC": acc_tl, "DROPOUT": dropout, "SPLIT": split}
                label = f"{dtype},d{block_d}" + (",dropout" if dropout else "") + (",split" if split else "")
                # Split programs write partials in ACC.
                out_dtype = acc if split else dtype
                specs.append(AotSpec(
                    attention_step_fwd_kernel,
                    {**inputs, "out_ptr": f"*{out_dtype}", "part_stats_ptr": f"*{out_dtype}",
                     **{n: "i32" for n in ints}, "scale": "fp32", **dropout_types, **flags},
                    constexprs, label=label,
                ))
                # bfloat16 steps also run with float32 gradient buffers, as the fused recurrence uses them.
                for grad_dtype in ((dtype, "fp32") if dtype == "bf16" else (dtype,)):
                    grad_label = label if grad_dtype == dtype else f"{label},grad {grad_dtype}"
                    specs.append(AotSpec(
                        attention_step_bwd_kernel,
                        {"g_ptr": f"*{dtype}", **inputs, "gq_ptr": f"*{out_dtype}", "gk_ptr": f"*{grad_dtype}",
                         "gv_ptr": f"*{grad_dtype}", "gu_part_ptr": f"*{acc}", "ds_ptr": f"*{acc}",
                         "stats_ptr": f"*{out_dtype}",
                         **{n: "i32" for n in (*ints, "gk_time", "gk_batch", "gv_time", "gv_batch")}, "scale": "fp32",
                         **dropout_types, **flags},
                        constexprs, label=grad_label, num_warps=_backward_warps(element_size, block_d, dropout, split),
                    ))
                    if dropout or split:  # the positional-gradient kernel reads score gradients only
                        continue
                    specs.append(AotSpec(
                        attention_step_pos_grad_kernel,
                        {"ds_ptr": f"*{acc}", "q_ptr": f"*{dtype}", "gr_ptr": f"*{grad_dtype}",
                         "gs_ptr": f"*{grad_dtype}", **{n: "i32" for n in ("steps", "B", "H", "d", "first_row")},
                         **{n: "constexpr" for n in ("BLOCK_T", "BLOCK_D", "ACC")}},
                        {n: constexprs[n] for n in ("BLOCK_T", "BLOCK_D", "ACC")}, label=grad_label,
                    ))
    return specs


# ---------------------------------------------------------------- recurrence row epilogues
#
# The recurrence's per-token work around its GEMMs (cuBLAS) and attention step:
# one program per batch row holds the whole model row (BLOCK_D >= d_model), so a
# residual add, its dropout, the bias and the next layer norm are one launch.

def max_row_block(element_size: int) -> int:
    """Widest model row one program holds (registers: checked by the AOT report; a
    float64 row of 4096 with Philox bits spilled even on 16 warps)."""
    return 2048 if element_size == 8 else 4096


def _row_warps(block_d: int) -> int:
    """Warps of a row program: at most 8 float64 elements (and their Philox bits) per thread."""
    return max(4, block_d // 256)


def _hidden_block(element_size: int) -> int:
    """Hidden features per program (4 warps): float64 gated with dropout spilled at 1024 on sm_80."""
    return 512 if element_size == 8 else 1024


@triton.jit
def _row_block(width, BLOCK: tl.constexpr):
    """``(row, offsets, mask, element index)`` of this program's block of a
    row-major ``[rows, width]`` tensor: the row is program 0's index, the
    block program 1's (0 where a block spans the row). The index is int64:
    rows of big batches pass 2^31 elements."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < width
    return row, offs, mask, row * width + offs


@triton.jit
def residual_norm_kernel(
    x_ptr,  # [B, D] residual input, or the layer-norm input without RESIDUAL
    y_ptr,  # [B, D] branch output before bias (RESIDUAL only)
    bias_ptr,  # [D] branch bias (zeros when the layer has none)
    out_ptr,  # [B, D]: x + dropout(y + bias) (RESIDUAL only)
    norm_w_ptr, norm_b_ptr,  # [D] layer norm of the row (NORM only)
    z_ptr,  # [B, D] normalised row (NORM only)
    mean_ptr, rstd_ptr,  # [B] its statistics (NORM only)
    D, eps,
    seed, offset, threshold, keep_scale,  # dropout of the branch (DROPOUT only): mask [B, D] row-major
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    RESIDUAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    NORM: tl.constexpr,
):
    row, offs, mask, index = _row_block(D, BLOCK_D)
    x = tl.load(x_ptr + index, mask=mask, other=0.0).to(ACC)
    if RESIDUAL:
        branch = tl.load(y_ptr + index, mask=mask, other=0.0).to(ACC)
        branch += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(ACC)
        if DROPOUT:
            branch *= tl.where(keep(seed, offset, index, threshold), keep_scale, 0.0).to(ACC)
        x += branch
        tl.store(out_ptr + index, x.to(out_ptr.dtype.element_ty), mask=mask)
        # The layer norm reads the row as stored, like the unfused loop.
        x = x.to(out_ptr.dtype.element_ty).to(ACC)
    if NORM:
        mean = tl.sum(x, axis=0) / D
        centred = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / D + eps)
        weight = tl.load(norm_w_ptr + offs, mask=mask, other=0.0).to(ACC)
        shift = tl.load(norm_b_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(z_ptr + index, (centred * rstd * weight + shift).to(z_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + row, mean.to(mean_ptr.dtype.element_ty))
        tl.store(rstd_ptr + row, rstd.to(rstd_ptr.dtype.element_ty))


@triton.jit
def ffn_hidden_kernel(
    h_ptr,  # [B, F] first linear's output (bias included)
    gate_ptr,  # [B, F] gate linear's output (GATED only)
    out_ptr,  # [B, F]: dropout(act(h) [· gate])
    F,
    seed, offset, threshold, keep_scale,  # dropout of the hidden (DROPOUT only): mask [B, F] row-major
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
    ACTIVATION: tl.constexpr,  # ACTIVATIONS[name]
    GATED: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    _, offs, mask, index = _row_block(F, BLOCK)
    h, _ = _activate(tl.load(h_ptr + index, mask=mask, other=0.0).to(ACC), ACTIVATION)
    if GATED:
        h *= tl.load(gate_ptr + index, mask=mask, other=0.0).to(ACC)
    if DROPOUT:
        h *= tl.where(keep(seed, offset, index, threshold), keep_scale, 0.0).to(ACC)
    tl.store(out_ptr + index, h.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def ffn_hidden_backward_kernel(
    grad_ptr,  # [B, F] gradient of the second linear's input
    h_ptr,  # [B, F] first linear's output
    gate_ptr,  # [B, F] gate linear's output (GATED only)
    grad_h_ptr,  # [B, F] out: gradient of the first linear's output
    grad_gate_ptr,  # [B, F] out: gradient of the gate's output (GATED only)
    F,
    seed, offset, threshold, keep_scale,  # the forward's hidden dropout (DROPOUT only)
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    _, offs, mask, index = _row_block(F, BLOCK)
    grad = tl.load(grad_ptr + index, mask=mask, other=0.0).to(ACC)
    if DROPOUT:
        grad *= tl.where(keep(seed, offset, index, threshold), keep_scale, 0.0).to(ACC)
    value, slope = _activate(tl.load(h_ptr + index, mask=mask, other=0.0).to(ACC), ACTIVATION)
    if GATED:
        tl.store(grad_gate_ptr + index, (grad * value).to(grad_gate_ptr.dtype.element_ty), mask=mask)
        grad *= tl.load(gate_ptr + index, mask=mask, other=0.0).to(ACC)
    tl.store(grad_h_ptr + index, (grad * slope).to(grad_h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def norm_backward_kernel(
    grad_z_ptr,  # [B, D] gradient of a layer norm's output
    x_ptr,  # [B, D] its input
    mean_ptr, rstd_ptr,  # [B] its statistics
    weight_ptr,  # [D] its weight
    residual_ptr,  # [B, D] gradient reaching the input along the residual path
    memory_ptr,  # [B, D] gradient of the token's memory (MEMORY only)
    memory_weight_ptr,  # [L] in ACC: softmax of the memory mixing logits (MEMORY only)
    out_ptr,  # [B, D]: input gradient of the norm + residual [+ memory_weight[layer] · memory]
    masked_ptr,  # [B, D]: out times the dropout multipliers of a residual branch (MASKED only)
    D, layer,
    seed, offset, threshold, keep_scale,  # the branch's dropout (DROPOUT only): mask [B, D] row-major
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    MEMORY: tl.constexpr,
    MASKED: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    row, offs, mask, index = _row_block(D, BLOCK_D)
    x = tl.load(x_ptr + index, mask=mask, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + row).to(ACC)
    rstd = tl.load(rstd_ptr + row).to(ACC)
    normed = tl.where(mask, (x - mean) * rstd, 0.0)
    grad_normed = tl.load(grad_z_ptr + index, mask=mask, other=0.0).to(ACC) * \
        tl.load(weight_ptr + offs, mask=mask, other=0.0).to(ACC)
    grad = rstd * (grad_normed - tl.sum(grad_normed, axis=0) / D - normed * (tl.sum(grad_normed * normed, axis=0) / D))
    grad += tl.load(residual_ptr + index, mask=mask, other=0.0).to(ACC)
    if MEMORY:
        grad += tl.load(memory_weight_ptr + layer) * tl.load(memory_ptr + index, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + index, grad.to(out_ptr.dtype.element_ty), mask=mask)
    if MASKED:
        if DROPOUT:
            grad *= tl.where(keep(seed, offset, index, threshold), keep_scale, 0.0).to(ACC)
        tl.store(masked_ptr + index, grad.to(masked_ptr.dtype.element_ty), mask=mask)


def _check_rows(**tensors):
    for name, tensor in tensors.items():
        if tensor is not None and not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous (rows of the recurrence's record buffers)")


def row_block(D: int, element_size: int) -> int:
    """BLOCK_D of the row kernels for rows of ``D`` features (ValueError beyond :func:`max_row_block`)."""
    block = max(triton.next_power_of_2(D), 16)
    if block > max_row_block(element_size):
        raise ValueError(f"d_model {D} exceeds the {max_row_block(element_size)} features one recurrence row "
                         f"program holds for {element_size}-byte elements")
    return block


def residual_norm(x, branch, bias, dropout_p, seed, offset, out, norm=None):
    """``out = x + dropout(branch + bias)`` and, with ``norm = (weight, bias, eps, z, mean, rstd)``,
    the layer norm of ``out`` into ``z, mean, rstd``; ``branch`` None: only the norm of ``x``.
    ``bias`` must be a tensor (zeros for none)."""
    B, D = x.shape
    residual = branch is not None
    norm_weight, norm_bias, eps, z, mean, rstd = norm if norm is not None else (x,) * 2 + (0.0,) + (x,) * 3
    _check_rows(x=x, branch=branch, out=out, z=z)
    dropout_args, dropout_active = _dropout_args(dropout_p, seed, offset)
    block_d = row_block(D, x.element_size())
    residual_norm_kernel[(B,)](
        x, branch if residual else x, bias, out if residual else x, norm_weight, norm_bias, z, mean, rstd,
        D, float(eps), *dropout_args,
        BLOCK_D=block_d, ACC=_acc_dtype(x.dtype)[0], RESIDUAL=residual, DROPOUT=dropout_active,
        NORM=norm is not None, num_warps=_row_warps(block_d),
    )


def ffn_hidden(h, gate, activation, dropout_p, seed, offset, out):
    """``out = dropout(act(h) [· gate])`` over ``[B, F]`` rows."""
    B, F = h.shape
    _check_rows(h=h, gate=gate, out=out)
    dropout_args, dropout_active = _dropout_args(dropout_p, seed, offset)
    block = _hidden_block(h.element_size())
    ffn_hidden_kernel[(B, triton.cdiv(F, block))](
        h, h if gate is None else gate, out, F, *dropout_args,
        BLOCK=block, ACC=_acc_dtype(h.dtype)[0], ACTIVATION=ACTIVATIONS[activation],
        GATED=gate is not None, DROPOUT=dropout_active,
    )


def ffn_hidden_backward(grad, h, gate, activation, dropout_p, seed, offset, grad_h, grad_gate):
    """``grad_h`` (and ``grad_gate``) from the gradient ``grad`` of :func:`ffn_hidden`'s output."""
    B, F = h.shape
    _check_rows(grad=grad, h=h, gate=gate, grad_h=grad_h, grad_gate=grad_gate)
    dropout_args, dropout_active = _dropout_args(dropout_p, seed, offset)
    block = _hidden_block(h.element_size())
    ffn_hidden_backward_kernel[(B, triton.cdiv(F, block))](
        grad, h, h if gate is None else gate, grad_h, grad_h if grad_gate is None else grad_gate, F, *dropout_args,
        BLOCK=block, ACC=_acc_dtype(h.dtype)[0], ACTIVATION=ACTIVATIONS[activation],
        GATED=gate is not None, DROPOUT=dropout_active,
    )


def norm_backward(grad_z, x, mean, rstd, weight, residual, out, memory=None, masked=None):
    """``out`` = input gradient of a layer norm + ``residual`` (+ ``weights[layer] · grad_memory``
    with ``memory = (grad_memory, weights, layer)``); with ``masked = ((p, seed, offset), masked_out)``
    also ``masked_out = out · dropout multipliers`` of that site."""
    B, D = x.shape
    _check_rows(grad_z=grad_z, x=x, residual=residual, out=out)
    memory_grad, memory_weights, layer = memory if memory is not None else (x, x, 0)
    (dropout_p, seed, offset), masked_out = masked if masked is not None else ((0.0, 0, 0), out)
    dropout_args, dropout_active = _dropout_args(dropout_p, seed, offset)
    block_d = row_block(D, x.element_size())
    norm_backward_kernel[(B,)](
        grad_z, x, mean, rstd, weight, residual, memory_grad, memory_weights, out, masked_out, D, layer,
        *dropout_args, BLOCK_D=block_d, ACC=_acc_dtype(x.dtype)[0], MEMORY=memory is not None,
        MASKED=masked is not None, DROPOUT=dropout_active, num_warps=_row_warps(block_d),
    )
    return out


def _row_aot_specs():
    specs = []
    dropout_types = {"seed": "i64", "offset": "i64", "threshold": "i64", "keep_scale": "fp32"}
    for dtype, acc, element_size in (("fp32", "fp32", 4), ("bf16", "fp32", 2), ("fp64", "fp64", 8)):
        acc_tl = getattr(tl, {"fp32": "float32", "fp64": "float64"}[acc])
        # (RESIDUAL, DROPOUT, NORM): the layer's first norm, the attention residual + feed-forward norm,
        # the feed-forward residual.
        for (residual, dropout, norm), block_d in itertools.product(
                ((False, False, True), (True, False, True), (True, True, True), (True, False, False),
                 (True, True, False)), (128, 1024, max_row_block(element_size))):
            signature = {name: f"*{dtype}" for name in ("x_ptr", "y_ptr", "bias_ptr", "out_ptr", "norm_w_ptr",
                                                        "norm_b_ptr", "z_ptr", "mean_ptr", "rstd_ptr")}
            signature.update({"D": "i32", "eps": "fp32", **dropout_types,
                              **{n: "constexpr" for n in ("BLOCK_D", "ACC", "RESIDUAL", "DROPOUT", "NORM")}})
            label = f"{dtype},D{block_d}" + (",residual" if residual else "") + (",dropout" if dropout else "") + (
                ",norm" if norm else "")
            specs.append(AotSpec(residual_norm_kernel, signature,
                                 {"BLOCK_D": block_d, "ACC": acc_tl, "RESIDUAL": residual, "DROPOUT": dropout,
                                  "NORM": norm}, label=label, num_warps=_row_warps(block_d)))
        # (MEMORY, MASKED, DROPOUT): the feed-forward norm with memory (step 0) or with the attention
        # residual's mask, the attention norm with memory and the next feed-forward residual's mask or none.
        for (memory, masked, dropout), block_d in itertools.product(
                ((True, False, False), (False, True, False), (False, True, True), (True, True, False),
                 (True, True, True)), (128, 1024, max_row_block(element_size))):
            label = f"{dtype},D{block_d}" + (",memory" if memory else "") + (",masked" if masked else "") + (
                ",dropout" if dropout else "")
            signature = {name: f"*{dtype}" for name in ("grad_z_ptr", "x_ptr", "mean_ptr", "rstd_ptr", "weight_ptr",
                                                        "residual_ptr", "memory_ptr", "out_ptr", "masked_ptr")}
            signature.update({"memory_weight_ptr": f"*{acc}", "D": "i32", "layer": "i32", **dropout_types,
                              **{n: "constexpr" for n in ("BLOCK_D", "ACC", "MEMORY", "MASKED", "DROPOUT")}})
            specs.append(AotSpec(norm_backward_kernel, signature,
                                 {"BLOCK_D": block_d, "ACC": acc_tl, "MEMORY": memory, "MASKED": masked,
                                  "DROPOUT": dropout}, label=label, num_warps=_row_warps(block_d)))
        for (activation, code), gated, dropout in itertools.product(ACTIVATIONS.items(), (False, True), (False, True)):
            label = f"{dtype},{activation}" + (",gated" if gated else "") + (",dropout" if dropout else "")
            constexprs = {"BLOCK": _hidden_block(element_size), "ACC": acc_tl, "ACTIVATION": code, "GATED": gated, "DROPOUT": dropout}
            flags = {n: "constexpr" for n in constexprs}
            specs.append(AotSpec(
                ffn_hidden_kernel,
                {"h_ptr": f"*{dtype}", "gate_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "F": "i32", **dropout_types,
                 **flags},
                constexprs, label=label,
            ))
            specs.append(AotSpec(
                ffn_hidden_backward_kernel,
                {**{name: f"*{dtype}" for name in ("grad_ptr", "h_ptr", "gate_ptr", "grad_h_ptr", "grad_gate_ptr")},
                 "F": "i32", **dropout_types, **flags},
                constexprs, label=label,
            ))
    return specs


AOT_SPECS = _aot_specs() + _step_aot_specs() + _row_aot_specs()
