"""Triton kernels of relative-position (Transformer-XL) attention, flash style.

Shapes follow :mod:`fastformers.ops.xl.naive`: ``L`` queries, ``K = M + L`` keys
(memory first), window tables ``pos_emb [K + L - 1, H, d]`` and
``pos_bias [K + L - 1, H]`` indexed by ``r = L - 1 - i + j``.

The positional term ``q_i · pos_emb[r]`` of a score tile is skewed: along a
tile row, ``r`` moves with ``j``, and from row to row it shifts by one. Every
score tile (forward, and recomputed in both backward kernels) loads each
(i, j)'s window row by pointer arithmetic, a few features at a time, and
reduces on CUDA cores, so no skewed tensor is held in registers and
no ``[L, K]`` tensor exists anywhere. The backward needs the skew the other way
for the positional gradients: the score gradient of a ``[BLOCK_M, BLOCK_N]``
tile is moved into band coordinates (``t = BLOCK_M - 1 - ii + jj`` over the
``BLOCK_M + BLOCK_N - 1`` window rows the tile touches) by a one-hot sum,
which gives the query gradient through the band (``dT · band``) and the band's
gradient (``dTᵀ · Q``). (``tl.gather`` did the same with fewer instructions
but spilled registers at every tile size tried.)

Attention dropout (``DROPOUT``, a constexpr, so the kernels without it are
unchanged) regenerates the keep bit of probability ``(b, h, i, j)`` from
Philox element ``((b·H + h)·L + i)·K + j`` wherever a kernel needs it: the
forward applies it to the probabilities it multiplies with V (the softmax
statistics stay those of the undropped scores), the backward to ``dO·Vᵀ`` and
to the probabilities of ``dV``.

Content dots are IEEE: float32 products in float32, bf16 products exact in
float32 accumulation, float64 for float64 (interpreter only).

Launchers take CUDA tensors (float32 with d <= 64, bfloat16 with d <= 128:
the configurations of ``AOT_SPECS``; others raise), or CPU tensors of any
float dtype when ``TRITON_INTERPRET=1`` was set before import (the Triton
interpreter; how they are tested without a GPU).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ...triton_utils import AotSpec, interpreter_enabled
from ..dropout import naive as dropout_naive
from ..dropout.triton_kernel import keep


@triton.jit
def _dot(a, b, ACC: tl.constexpr, UPCAST_DOTS: tl.constexpr):
    """``a @ b`` accumulated in ACC; float32 products in full IEEE precision
    (Triton's default for float32 would be TF32)."""
    if UPCAST_DOTS:
        # The interpreter multiplies bf16 tensors as their raw 16-bit patterns;
        # bf16 -> float32 is exact and so are bf16 products in float32, so this
        # computes what the GPU's bf16 dot with float32 accumulation does.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, out_dtype=ACC, input_precision="ieee")


@triton.jit
def _tile_offsets(rows, stride_rows, cols, stride_cols):
    """Element offsets of a ``[rows, cols]`` tile of a ``[seq, B, H, d]``
    tensor from its (batch, head) base: the sequence part in int64, since
    ``rows * stride_rows`` passes 2^31 on large inputs (stride_rows is
    ``B·H·d`` when contiguous); the feature part stays int32."""
    return rows.to(tl.int64)[:, None] * stride_rows + (cols * stride_cols)[None, :]


@triton.jit
def _positional_scores(
    q_head,  # query of this (batch, head)
    pe_head,  # pos_emb of this head
    stride_q_l,
    stride_q_d,
    stride_pe_r,
    stride_pe_d,
    m_start,
    n_start,
    L,
    K,
    d,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_CHUNK: tl.constexpr,
    ACC: tl.constexpr,
):
    """``q_i · pos_emb[L - 1 - i + j]`` for the ``[BLOCK_M, BLOCK_N]`` tile, in ACC.

    Each (i, j) loads its own window row by pointer arithmetic, ``D_CHUNK``
    features at a time, so no skewed tensor is ever held in registers; the
    products run on CUDA cores in the accumulation dtype.
    """
    offs_i = m_start + tl.arange(0, BLOCK_M)
    offs_j = n_start + tl.arange(0, BLOCK_N)
    rows = (L - 1 - offs_i)[:, None] + offs_j[None, :]
    row_ok = (rows >= 0) & (rows < K + L - 1) & (offs_i < L)[:, None]
    positional = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for chunk in range(0, BLOCK_D, D_CHUNK):
        offs_c = chunk + tl.arange(0, D_CHUNK)
        c_ok = offs_c < d
        q = tl.load(
            q_head + _tile_offsets(offs_i, stride_q_l, offs_c, stride_q_d),
            mask=(offs_i < L)[:, None] & c_ok[None, :],
            other=0.0,
        ).to(ACC)
        pe = tl.load(
            pe_head + rows[:, :, None] * stride_pe_r + offs_c[None, None, :] * stride_pe_d,
            mask=row_ok[:, :, None] & c_ok[None, None, :],
            other=0.0,
        ).to(ACC)
        positional += tl.sum(q[:, None, :] * pe, axis=2)
    return positional


@triton.jit
def _tile_scores(
    qu,  # [BLOCK_M, BLOCK_D] query + query_pos_bias, input dtype
    k,  # [BLOCK_N, BLOCK_D] keys, input dtype
    q_head,
    pe_head,
    pb_head,
    stride_q_l,
    stride_q_d,
    stride_pe_r,
    stride_pe_d,
    stride_pb_r,
    m_start,
    n_start,
    L,
    K,
    d,
    scale,
    causal,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_CHUNK: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
):
    """Scaled scores ``[BLOCK_M, BLOCK_N]``, -inf where not visible."""
    offs_i = m_start + tl.arange(0, BLOCK_M)
    offs_j = n_start + tl.arange(0, BLOCK_N)
    content = _dot(qu, tl.trans(k), ACC, UPCAST_DOTS)
    positional = _positional_scores(
        q_head, pe_head, stride_q_l, stride_q_d, stride_pe_r, stride_pe_d, m_start, n_start,
        L, K, d, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNK, ACC,
    )  # fmt: skip
    # Padded query rows (i >= L) stay visible so that no row is all -inf
    # (which would turn the online softmax into NaN); they are never stored.
    visible = (offs_j[None, :] < K) & (offs_i[:, None] >= 0)
    if causal:
        visible = visible & (offs_j[None, :] <= K - L + offs_i[:, None])
    rows = (L - 1 - offs_i)[:, None] + offs_j[None, :]
    bias = tl.load(pb_head + rows * stride_pb_r, mask=visible & (offs_i[:, None] < L), other=0.0).to(ACC)
    scores = (content + positional + bias) * scale
    return tl.where(visible, scores, -float("inf"))


@triton.jit
def _kept(seed, offset, threshold, batch_head, L, K, offs_i, offs_j):
    """Keep bits of the ``[BLOCK_M, BLOCK_N]`` tile's (b, h, i, j) probabilities."""
    index = (batch_head.to(tl.int64) * L + offs_i.to(tl.int64))[:, None] * K + offs_j.to(tl.int64)[None, :]
    return keep(seed, offset, index, threshold)


# Scalars that change from call to call: no specialisation on their values.
_RUNTIME_ARGS = ["causal", "seed", "offset", "threshold"]


@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def rel_attention_fwd_kernel(
    q_ptr,  # [L, B, H, d]
    k_ptr,  # [K, B, H, d]
    v_ptr,  # [K, B, H, d]
    pe_ptr,  # [K + L - 1, H, d]
    pb_ptr,  # [K + L - 1, H]
    u_ptr,  # [H, d]
    out_ptr,  # [L, B, H, d]
    lse_ptr,  # [B, H, L] contiguous, ACC
    stride_q_l,
    stride_q_b,
    stride_q_h,
    stride_q_d,
    stride_k_l,
    stride_k_b,
    stride_k_h,
    stride_k_d,
    stride_v_l,
    stride_v_b,
    stride_v_h,
    stride_v_d,
    stride_pe_r,
    stride_pe_h,
    stride_pe_d,
    stride_pb_r,
    stride_pb_h,
    stride_u_h,
    stride_u_d,
    stride_o_l,
    stride_o_b,
    stride_o_h,
    stride_o_d,
    L,
    K,
    H,
    d,
    scale,
    causal,  # 1: query i sees keys j <= K - L + i; 0: every key
    seed,  # attention dropout: Philox key and stream offset,
    offset,
    threshold,  # dropout_naive.threshold(p)
    dropout_scale,  # and 1 / (1 - p); read only with DROPOUT
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_CHUNK: tl.constexpr,  # features per step of the positional term, see _positional_scores
    ACC: tl.constexpr,  # accumulation dtype: float64 for float64 inputs, else float32
    UPCAST_DOTS: tl.constexpr,  # bf16 under the interpreter, see _dot
    DROPOUT: tl.constexpr,  # dropout_p > 0
):
    # B·H on axis 0: axes 1 and 2 of a CUDA grid stop at 65535 blocks.
    batch_head = tl.program_id(0)
    m_start = tl.program_id(1) * BLOCK_M
    b = (batch_head // H).to(tl.int64)
    h = (batch_head % H).to(tl.int64)
    offs_i = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    i_ok = offs_i < L
    d_ok = offs_d < d

    q_head = q_ptr + b * stride_q_b + h * stride_q_h
    q = tl.load(
        q_head + _tile_offsets(offs_i, stride_q_l, offs_d, stride_q_d),
        mask=i_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    u = tl.load(u_ptr + h * stride_u_h + offs_d * stride_u_d, mask=d_ok, other=0.0)
    qu = (q.to(ACC) + u.to(ACC)[None, :]).to(q.dtype)
    k_head = k_ptr + b * stride_k_b + h * stride_k_h
    v_head = v_ptr + b * stride_v_b + h * stride_v_h
    pe_head = pe_ptr + h * stride_pe_h
    pb_head = pb_ptr + h * stride_pb_h

    row_max = tl.full([BLOCK_M], -float("inf"), dtype=ACC)
    row_sum = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    n_end = K
    if causal:
        # Keys after the tile's last query (j > M + i) are all masked: skip their tiles.
        n_end = tl.minimum(K, K - L + m_start + BLOCK_M)
    for n_start in range(0, n_end, BLOCK_N):
        offs_j = n_start + tl.arange(0, BLOCK_N)
        kv_mask = (offs_j[:, None] < K) & d_ok[None, :]
        k = tl.load(k_head + _tile_offsets(offs_j, stride_k_l, offs_d, stride_k_d), mask=kv_mask, other=0.0)
        v = tl.load(v_head + _tile_offsets(offs_j, stride_v_l, offs_d, stride_v_d), mask=kv_mask, other=0.0)
        scores = _tile_scores(
            qu, k, q_head, pe_head, pb_head, stride_q_l, stride_q_d, stride_pe_r, stride_pe_d, stride_pb_r,
            m_start, n_start, L, K, d, scale, causal,
            BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNK, ACC, UPCAST_DOTS,
        )  # fmt: skip
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        rescale = tl.exp(row_max - new_max)
        probs = tl.exp(scores - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(probs, axis=1)
        if DROPOUT:
            kept = _kept(seed, offset, threshold, batch_head, L, K, offs_i, offs_j)
            probs = tl.where(kept, probs * dropout_scale, 0.0)
        acc = acc * rescale[:, None] + _dot(probs.to(v.dtype), v, ACC, UPCAST_DOTS)
        row_max = new_max

    out = acc / row_sum[:, None]
    out_tile = out_ptr + b * stride_o_b + h * stride_o_h + _tile_offsets(offs_i, stride_o_l, offs_d, stride_o_d)
    tl.store(out_tile, out.to(out_ptr.dtype.element_ty), mask=i_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + (batch_head.to(tl.int64) * L + offs_i), row_max + tl.log(row_sum), mask=i_ok)


@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def rel_attention_bwd_dq_kernel(
    q_ptr,  # [L, B, H, d]
    k_ptr,  # [K, B, H, d]
    v_ptr,  # [K, B, H, d]
    pe_ptr,  # [K + L - 1, H, d]
    pb_ptr,  # [K + L - 1, H]
    u_ptr,  # [H, d]
    out_ptr,  # [L, B, H, d]
    do_ptr,  # [L, B, H, d] gradient of out
    lse_ptr,  # [B, H, L] contiguous, ACC
    delta_ptr,  # [B, H, L] contiguous, ACC: written here, read by the dk/dv kernel
    dq_ptr,  # [L, B, H, d] contiguous
    grad_pe_ptr,  # [K + L - 1, H, d] contiguous, ACC, zeroed: atomically accumulated
    grad_pb_ptr,  # [K + L - 1, H] contiguous, ACC, zeroed: atomically accumulated
    stride_q_l,
    stride_q_b,
    stride_q_h,
    stride_q_d,
    stride_k_l,
    stride_k_b,
    stride_k_h,
    stride_k_d,
    stride_v_l,
    stride_v_b,
    stride_v_h,
    stride_v_d,
    stride_pe_r,
    stride_pe_h,
    stride_pe_d,
    stride_pb_r,
    stride_pb_h,
    stride_u_h,
    stride_u_d,
    stride_o_l,
    stride_o_b,
    stride_o_h,
    stride_o_d,
    stride_do_l,
    stride_do_b,
    stride_do_h,
    stride_do_d,
    L,
    K,
    B,
    H,
    d,
    scale,
    causal,
    seed,
    offset,
    threshold,
    dropout_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,  # window rows one score tile reads: next power of 2 >= BLOCK_M + BLOCK_N - 1
    BLOCK_D: tl.constexpr,
    D_CHUNK: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    # B·H on axis 0: axes 1 and 2 of a CUDA grid stop at 65535 blocks.
    batch_head = tl.program_id(0)
    m_start = tl.program_id(1) * BLOCK_M
    b = (batch_head // H).to(tl.int64)
    h = (batch_head % H).to(tl.int64)
    offs_i = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_band = tl.arange(0, BLOCK_R)
    i_ok = offs_i < L
    d_ok = offs_d < d
    tile_mask = i_ok[:, None] & d_ok[None, :]

    q_head = q_ptr + b * stride_q_b + h * stride_q_h
    q = tl.load(
        q_head + _tile_offsets(offs_i, stride_q_l, offs_d, stride_q_d),
        mask=tile_mask,
        other=0.0,
    )
    u = tl.load(u_ptr + h * stride_u_h + offs_d * stride_u_d, mask=d_ok, other=0.0)
    qu = (q.to(ACC) + u.to(ACC)[None, :]).to(q.dtype)
    do = tl.load(
        do_ptr + b * stride_do_b + h * stride_do_h + _tile_offsets(offs_i, stride_do_l, offs_d, stride_do_d),
        mask=tile_mask,
        other=0.0,
    )
    out = tl.load(
        out_ptr + b * stride_o_b + h * stride_o_h + _tile_offsets(offs_i, stride_o_l, offs_d, stride_o_d),
        mask=tile_mask,
        other=0.0,
    )
    delta = tl.sum(do.to(ACC) * out.to(ACC), axis=1)
    stats_offset = batch_head.to(tl.int64) * L + offs_i
    tl.store(delta_ptr + stats_offset, delta, mask=i_ok)
    # +inf on padded rows makes their probabilities exactly zero.
    lse = tl.load(lse_ptr + stats_offset, mask=i_ok, other=float("inf"))

    k_head = k_ptr + b * stride_k_b + h * stride_k_h
    v_head = v_ptr + b * stride_v_b + h * stride_v_h
    pe_head = pe_ptr + h * stride_pe_h
    pb_head = pb_ptr + h * stride_pb_h
    # Score column jj of query row ii lands on band column t = BLOCK_M - 1 - ii + jj.
    score_column = offs_band[None, :] - (BLOCK_M - 1 - tl.arange(0, BLOCK_M))[:, None]  # [BLOCK_M, BLOCK_R]
    lands_on = score_column[:, :, None] == tl.arange(0, BLOCK_N)[None, None, :]  # [BLOCK_M, BLOCK_R, BLOCK_N]

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    n_end = K
    if causal:
        n_end = tl.minimum(K, K - L + m_start + BLOCK_M)
    for n_start in range(0, n_end, BLOCK_N):
        offs_j = n_start + tl.arange(0, BLOCK_N)
        kv_mask = (offs_j[:, None] < K) & d_ok[None, :]
        k = tl.load(k_head + _tile_offsets(offs_j, stride_k_l, offs_d, stride_k_d), mask=kv_mask, other=0.0)
        v = tl.load(v_head + _tile_offsets(offs_j, stride_v_l, offs_d, stride_v_d), mask=kv_mask, other=0.0)
        scores = _tile_scores(
            qu, k, q_head, pe_head, pb_head, stride_q_l, stride_q_d, stride_pe_r, stride_pe_d, stride_pb_r,
            m_start, n_start, L, K, d, scale, causal,
            BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNK, ACC, UPCAST_DOTS,
        )  # fmt: skip
        probs = tl.exp(scores - lse[:, None])
        grad_probs = _dot(do, tl.trans(v), ACC, UPCAST_DOTS)
        if DROPOUT:
            kept = _kept(seed, offset, threshold, batch_head, L, K, offs_i, offs_j)
            grad_probs = tl.where(kept, grad_probs * dropout_scale, 0.0)
        # Gradient of the unscaled score (content + positional + bias).
        grad_scores = probs * (grad_probs - delta[:, None]) * scale
        dq += _dot(grad_scores.to(k.dtype), k, ACC, UPCAST_DOTS)

        # The skew into band coordinates as a one-hot sum: register-only, unlike
        # tl.gather, whose lowering spilled at every tile size tried.
        grad_band_scores = tl.sum(tl.where(lands_on, grad_scores[:, None, :], 0.0), axis=2)
        band_row0 = L - m_start - BLOCK_M + n_start
        rows = band_row0 + offs_band
        row_ok = (rows >= 0) & (rows < K + L - 1)
        band = tl.load(
            pe_head + rows[:, None] * stride_pe_r + offs_d[None, :] * stride_pe_d,
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        dq += _dot(grad_band_scores.to(band.dtype), band, ACC, UPCAST_DOTS)
        grad_band = _dot(tl.trans(grad_band_scores.to(q.dtype)), q, ACC, UPCAST_DOTS)
        tl.atomic_add(
            grad_pe_ptr + (rows[:, None] * H + h) * d + offs_d[None, :],
            grad_band,
            mask=row_ok[:, None] & d_ok[None, :],
            sem="relaxed",
        )
        tl.atomic_add(grad_pb_ptr + rows * H + h, tl.sum(grad_band_scores, axis=0), mask=row_ok, sem="relaxed")

    dq_tile = dq_ptr + (((offs_i[:, None] * B + b) * H + h) * d + offs_d[None, :])
    tl.store(dq_tile, dq.to(dq_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def rel_attention_bwd_dkdv_kernel(
    q_ptr,  # [L, B, H, d]
    k_ptr,  # [K, B, H, d]
    v_ptr,  # [K, B, H, d]
    pe_ptr,  # [K + L - 1, H, d]
    pb_ptr,  # [K + L - 1, H]
    u_ptr,  # [H, d]
    do_ptr,  # [L, B, H, d] gradient of out
    lse_ptr,  # [B, H, L] contiguous, ACC
    delta_ptr,  # [B, H, L] contiguous, ACC
    dk_ptr,  # [K, B, H, d] contiguous
    dv_ptr,  # [K, B, H, d] contiguous
    grad_u_partial_ptr,  # [B, H, n_key_tiles, d] contiguous, ACC
    stride_q_l,
    stride_q_b,
    stride_q_h,
    stride_q_d,
    stride_k_l,
    stride_k_b,
    stride_k_h,
    stride_k_d,
    stride_v_l,
    stride_v_b,
    stride_v_h,
    stride_v_d,
    stride_pe_r,
    stride_pe_h,
    stride_pe_d,
    stride_pb_r,
    stride_pb_h,
    stride_u_h,
    stride_u_d,
    stride_do_l,
    stride_do_b,
    stride_do_h,
    stride_do_d,
    L,
    K,
    B,
    H,
    d,
    scale,
    causal,
    seed,
    offset,
    threshold,
    dropout_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_CHUNK: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    batch_head = tl.program_id(0)
    n_start = tl.program_id(1) * BLOCK_N
    b = (batch_head // H).to(tl.int64)
    h = (batch_head % H).to(tl.int64)
    offs_j = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < d
    kv_mask = (offs_j[:, None] < K) & d_ok[None, :]

    k = tl.load(
        k_ptr + b * stride_k_b + h * stride_k_h + _tile_offsets(offs_j, stride_k_l, offs_d, stride_k_d),
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        v_ptr + b * stride_v_b + h * stride_v_h + _tile_offsets(offs_j, stride_v_l, offs_d, stride_v_d),
        mask=kv_mask,
        other=0.0,
    )
    u = tl.load(u_ptr + h * stride_u_h + offs_d * stride_u_d, mask=d_ok, other=0.0)
    q_head = q_ptr + b * stride_q_b + h * stride_q_h
    do_head = do_ptr + b * stride_do_b + h * stride_do_h
    pe_head = pe_ptr + h * stride_pe_h
    pb_head = pb_ptr + h * stride_pb_h

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    # query_pos_bias meets key j in every score of column j: its gradient is
    # sum_j (sum_i dS[i, j]) k_j, so only the column sums are carried.
    grad_scores_colsum = tl.zeros([BLOCK_N], dtype=ACC)
    m_begin = 0
    if causal:
        # Queries before the tile's first key's own position (i < n_start - M) see none of it.
        m_begin = tl.maximum(n_start - (K - L), 0) // BLOCK_M * BLOCK_M
    for m_start in range(m_begin, L, BLOCK_M):
        offs_i = m_start + tl.arange(0, BLOCK_M)
        i_ok = offs_i < L
        tile_mask = i_ok[:, None] & d_ok[None, :]
        q = tl.load(q_head + _tile_offsets(offs_i, stride_q_l, offs_d, stride_q_d), mask=tile_mask, other=0.0)
        qu = (q.to(ACC) + u.to(ACC)[None, :]).to(q.dtype)
        do = tl.load(
            do_head + _tile_offsets(offs_i, stride_do_l, offs_d, stride_do_d), mask=tile_mask, other=0.0
        )
        stats_offset = batch_head.to(tl.int64) * L + offs_i
        lse = tl.load(lse_ptr + stats_offset, mask=i_ok, other=float("inf"))
        delta = tl.load(delta_ptr + stats_offset, mask=i_ok, other=0.0)
        scores = _tile_scores(
            qu, k, q_head, pe_head, pb_head, stride_q_l, stride_q_d, stride_pe_r, stride_pe_d, stride_pb_r,
            m_start, n_start, L, K, d, scale, causal,
            BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNK, ACC, UPCAST_DOTS,
        )  # fmt: skip
        probs = tl.exp(scores - lse[:, None])
        grad_probs = _dot(do, tl.trans(v), ACC, UPCAST_DOTS)
        if DROPOUT:
            kept = _kept(seed, offset, threshold, batch_head, L, K, offs_i, offs_j)
            grad_probs = tl.where(kept, grad_probs * dropout_scale, 0.0)
            dv += _dot(tl.trans(tl.where(kept, probs * dropout_scale, 0.0).to(do.dtype)), do, ACC, UPCAST_DOTS)
        else:
            dv += _dot(tl.trans(probs.to(do.dtype)), do, ACC, UPCAST_DOTS)
        grad_scores = probs * (grad_probs - delta[:, None]) * scale
        dk += _dot(tl.trans(grad_scores.to(qu.dtype)), qu, ACC, UPCAST_DOTS)
        grad_scores_colsum += tl.sum(grad_scores, axis=0)

    out_offset = ((offs_j[:, None] * B + b) * H + h) * d + offs_d[None, :]
    tl.store(dk_ptr + out_offset, dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out_offset, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)
    n_key_tiles = tl.num_programs(1)
    tl.store(
        grad_u_partial_ptr + ((batch_head.to(tl.int64) * n_key_tiles + tl.program_id(1)) * d + offs_d),
        tl.sum(grad_scores_colsum[:, None] * k.to(ACC), axis=0),
        mask=d_ok,
    )


def _acc_dtype(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _interpreter_options(dtype: torch.dtype) -> dict:
    return dict(UPCAST_DOTS=dtype == torch.bfloat16 and interpreter_enabled())


# The configurations the GPU launches, every one of them in AOT_SPECS:
# (kernel, dtype, BLOCK_D) -> (BLOCK_M, BLOCK_N, num_warps, D_CHUNK). Measured
# with ``python -m fastformers.gpu_report`` as tiles that compile without
# spills on sm_80 and sm_90; float32 with BLOCK_D = 128 spilled at every tile
# tried (its "ieee" dots run on CUDA cores, which replicate the d-long operand
# rows per thread), so it is not offered.
_TILES = {
    ("fwd", "fp32", 32): (32, 32, 8, 2),
    ("fwd", "fp32", 64): (32, 32, 8, 2),
    ("fwd", "bf16", 32): (32, 32, 8, 2),
    ("fwd", "bf16", 64): (32, 32, 8, 2),
    ("fwd", "bf16", 128): (32, 32, 8, 2),
    ("dq", "fp32", 32): (16, 16, 8, 8),
    ("dq", "fp32", 64): (16, 16, 8, 8),
    ("dq", "bf16", 32): (16, 16, 8, 8),
    ("dq", "bf16", 64): (16, 16, 8, 8),
    ("dq", "bf16", 128): (16, 16, 8, 4),
    ("dkdv", "fp32", 32): (32, 32, 8, 2),
    ("dkdv", "fp32", 64): (16, 16, 8, 8),
    ("dkdv", "bf16", 32): (32, 32, 4, 1),
    ("dkdv", "bf16", 64): (32, 32, 8, 2),
    ("dkdv", "bf16", 128): (16, 32, 8, 4),
}
_GPU_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
_MIN_BLOCK_D = 32


def _widest_block_d(dtype_name: str) -> int:
    return max(block_d for _, name, block_d in _TILES if name == dtype_name)


def _tile_config(kernel_name: str, dtype_name: str, block_d: int) -> dict:
    """Constexprs and launch options of one ``_TILES`` entry."""
    block_m, block_n, num_warps, d_chunk = _TILES[kernel_name, dtype_name, block_d]
    config = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, D_CHUNK=d_chunk)
    if kernel_name == "dq":
        config["BLOCK_R"] = triton.next_power_of_2(block_m + block_n - 1)
    return dict(config, num_warps=num_warps, num_stages=2)


def gpu_unsupported_reason(dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """Why no checked GPU configuration takes queries of ``dtype`` with head dim
    ``head_dim``, and what to change (None if one does)."""
    dtype_name = _GPU_DTYPES.get(dtype)
    if dtype_name is None:
        return (
            f"the Triton rel_attention kernels run float32 and bfloat16 on GPUs, got {dtype}: use float32 or "
            "torch.autocast('cuda', dtype=torch.bfloat16)"
        )
    block_d = max(_MIN_BLOCK_D, triton.next_power_of_2(head_dim))
    if (dtype_name, block_d) not in {(name, width) for _, name, width in _TILES}:
        widest = _widest_block_d(dtype_name)
        advice = "use more heads" if dtype_name == "bf16" else "use bfloat16 autocast (d <= 128) or more heads"
        return (
            f"the Triton rel_attention kernels take head dim d <= {widest} for {dtype} on GPUs, got d={head_dim}: "
            f"{advice}"
        )
    return None


def _block_config(kernel_name: str, query: torch.Tensor) -> dict:
    """The launch configuration of ``kernel_name`` for ``query [L, B, H, d]``.

    On a GPU only the ``_TILES`` configurations launch (float32 with d <= 64,
    bfloat16 with d <= 128; d is padded to a power of 2 >= 32), each compiled
    and checked for spills by the AOT check; anything else is refused here
    rather than compiled unchecked. The interpreter takes every dtype (float64
    is how the kernels are verified) and head dim, with the float32 tiles of
    the widest entry for wider heads, and steps through the positional term in
    two chunks: registers are no concern there, but each loop step costs
    interpreter time (the second chunk is partly masked when d is not a power
    of 2, which the tests rely on).
    """
    head_dim = query.shape[-1]
    block_d = max(_MIN_BLOCK_D, triton.next_power_of_2(head_dim))
    dtype_name = _GPU_DTYPES.get(query.dtype)
    if not interpreter_enabled():
        if dtype_name is None:
            raise TypeError(
                f"the Triton rel_attention kernels run float32 and bfloat16 on GPUs, got {query.dtype}"
                " (use backend='reference')"
            )
        if (kernel_name, dtype_name, block_d) not in _TILES:
            raise ValueError(
                f"the Triton rel_attention kernels take head dim d <= {_widest_block_d(dtype_name)} for {query.dtype}"
                f" on GPUs, got d={head_dim} (use backend='reference')"
            )
        return _tile_config(kernel_name, dtype_name, block_d)
    dtype_name = dtype_name or "fp32"
    config = _tile_config(kernel_name, dtype_name, min(block_d, _widest_block_d(dtype_name)))
    config.update(BLOCK_D=block_d, D_CHUNK=block_d // 2)
    return config


def _strides4(tensor: torch.Tensor):
    return tuple(tensor.stride())


def _dropout_args(dropout_p: float, seed: int, offset: int) -> tuple:
    """The kernels' runtime dropout arguments and their ``DROPOUT`` constexpr."""
    active = dropout_p > 0
    scale = 1.0 / (1.0 - dropout_p) if active else 1.0
    return (int(seed), int(offset), dropout_naive.threshold(dropout_p), scale), dict(DROPOUT=active)


def rel_attention_forward(query, key, value, pos_emb, pos_bias, query_pos_bias, scale: float, causal: bool,
                          dropout_p: float = 0.0, seed: int = 0, offset: int = 0):
    """Forward of relative-position attention.

    query ``[L, B, H, d]``, key and value ``[K, B, H, d]`` (``K = M + L``),
    pos_emb ``[K + L - 1, H, d]``, pos_bias ``[K + L - 1, H]``, query_pos_bias
    ``[H, d]``; any strides. ``dropout_p``, ``seed``, ``offset``: attention
    dropout (mask layout ``[B, H, L, K]``). Returns ``out [L, B, H, d]``
    (query's dtype) and the row log-sum-exp ``lse [B, H, L]`` (float32, float64
    for float64 inputs) of the undropped scores.
    """
    L, B, H, d = query.shape
    K = key.shape[0]
    acc_tl, acc_torch = _acc_dtype(query.dtype)
    out = query.new_empty((L, B, H, d))
    lse = torch.empty((B, H, L), dtype=acc_torch, device=query.device)
    config = _block_config("fwd", query)
    dropout_args, dropout_flag = _dropout_args(dropout_p, seed, offset)
    grid = (B * H, triton.cdiv(L, config["BLOCK_M"]))
    rel_attention_fwd_kernel[grid](
        query, key, value, pos_emb, pos_bias, query_pos_bias, out, lse,
        *_strides4(query), *_strides4(key), *_strides4(value),
        *pos_emb.stride(), *pos_bias.stride(), *query_pos_bias.stride(), *_strides4(out),
        L, K, H, d, float(scale), int(causal), *dropout_args,
        ACC=acc_tl, **_interpreter_options(query.dtype), **dropout_flag, **config,
    )  # fmt: skip
    return out, lse


def rel_attention_backward(
    grad_out, query, key, value, pos_emb, pos_bias, query_pos_bias, out, lse, scale: float, causal: bool,
    dropout_p: float = 0.0, seed: int = 0, offset: int = 0,
):
    """Gradients of :func:`rel_attention_forward` from ``grad_out [L, B, H, d]``.

    Returns grad_query ``[L, B, H, d]``, grad_key and grad_value ``[K, B, H, d]``,
    grad_pos_emb ``[K + L - 1, H, d]``, grad_pos_bias ``[K + L - 1, H]`` and
    grad_query_pos_bias ``[H, d]``. The positional gradients are summed with
    atomic adds in the accumulation dtype (float32, float64 for float64 inputs),
    so their last bits may vary between runs; every other gradient is
    deterministic.
    """
    L, B, H, d = query.shape
    K = key.shape[0]
    acc_tl, acc_torch = _acc_dtype(query.dtype)
    dq_config = _block_config("dq", query)
    dkdv_config = _block_config("dkdv", query)
    n_query_tiles = triton.cdiv(L, dq_config["BLOCK_M"])
    n_key_tiles = triton.cdiv(K, dkdv_config["BLOCK_N"])
    dropout_args, dropout_flag = _dropout_args(dropout_p, seed, offset)
    device = query.device

    grad_query = query.new_empty((L, B, H, d))
    grad_key = key.new_empty((K, B, H, d))
    grad_value = value.new_empty((K, B, H, d))
    # Only the window's rows, never the full [2P, H, d] table.
    grad_pos_emb = torch.zeros((K + L - 1, H, d), dtype=acc_torch, device=device)
    grad_pos_bias = torch.zeros((K + L - 1, H), dtype=acc_torch, device=device)
    grad_u_partial = torch.empty((B, H, n_key_tiles, d), dtype=acc_torch, device=device)
    delta = torch.empty((B, H, L), dtype=acc_torch, device=device)

    common_strides = (
        *_strides4(query), *_strides4(key), *_strides4(value),
        *pos_emb.stride(), *pos_bias.stride(), *query_pos_bias.stride(),
    )  # fmt: skip
    rel_attention_bwd_dq_kernel[(B * H, n_query_tiles)](
        query, key, value, pos_emb, pos_bias, query_pos_bias, out, grad_out, lse, delta,
        grad_query, grad_pos_emb, grad_pos_bias,
        *common_strides, *_strides4(out), *_strides4(grad_out),
        L, K, B, H, d, float(scale), int(causal), *dropout_args,
        ACC=acc_tl, **_interpreter_options(query.dtype), **dropout_flag, **dq_config,
    )  # fmt: skip
    rel_attention_bwd_dkdv_kernel[(B * H, n_key_tiles)](
        query, key, value, pos_emb, pos_bias, query_pos_bias, grad_out, lse, delta,
        grad_key, grad_value, grad_u_partial,
        *common_strides, *_strides4(grad_out),
        L, K, B, H, d, float(scale), int(causal), *dropout_args,
        ACC=acc_tl, **_interpreter_options(query.dtype), **dropout_flag, **dkdv_config,
    )  # fmt: skip
    grad_query_pos_bias = grad_u_partial.sum(dim=(0, 2))
    return (
        grad_query,
        grad_key,
        grad_value,
        grad_pos_emb.to(pos_emb.dtype),
        grad_pos_bias.to(pos_bias.dtype),
        grad_query_pos_bias.to(query_pos_bias.dtype),
    )


_KERNEL_NAMES = {"fwd": "rel_attention_fwd_kernel", "dq": "rel_attention_bwd_dq_kernel", "dkdv": "rel_attention_bwd_dkdv_kernel"}
_POINTERS = {
    rel_attention_fwd_kernel: ("q", "k", "v", "pe", "pb", "u", "out", ("lse", "acc")),
    rel_attention_bwd_dq_kernel: (
        "q", "k", "v", "pe", "pb", "u", "out", "do", ("lse", "acc"), ("delta", "acc"),
        "dq", ("grad_pe", "acc"), ("grad_pb", "acc"),
    ),
    rel_attention_bwd_dkdv_kernel: ("q", "k", "v", "pe", "pb", "u", "do", ("lse", "acc"), ("delta", "acc"), "dk", "dv", ("grad_u_partial", "acc")),
}  # fmt: skip
_CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "BLOCK_R", "BLOCK_D", "D_CHUNK", "ACC", "UPCAST_DOTS", "DROPOUT")
_FLOAT_SCALARS = ("scale", "dropout_scale")
_INT64_SCALARS = ("seed", "offset", "threshold")


def _signature(kernel, dtype: str, acc: str) -> dict:
    pointer_types = {}
    for entry in _POINTERS[kernel]:
        name, kind = entry if isinstance(entry, tuple) else (entry, "input")
        pointer_types[f"{name}_ptr"] = f"*{acc if kind == 'acc' else dtype}"
    signature = {}
    for name in kernel.arg_names:
        if name in pointer_types:
            signature[name] = pointer_types[name]
        elif name in _CONSTEXPRS:
            signature[name] = "constexpr"
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        elif name in _INT64_SCALARS:
            signature[name] = "i64"
        else:
            signature[name] = "i32"
    return signature


def _aot_specs():
    """Every configuration the GPU launches: each kernel at each ``_TILES``
    entry, with the launchers' precision options, without and with dropout
    (``causal`` is a runtime argument, so one compilation serves causal and
    full attention)."""
    kernels = dict(zip(_KERNEL_NAMES, _POINTERS))
    specs = []
    for (name, dtype_name, block_d) in _TILES:
        config = _tile_config(name, dtype_name, block_d)
        launch = {key: config.pop(key) for key in ("num_warps", "num_stages")}
        kernel = kernels[name]
        for dropout in (False, True):
            constexprs = {"ACC": tl.float32, "UPCAST_DOTS": False, "DROPOUT": dropout, **config}
            label = f"{dtype_name},d{block_d}" + (",dropout" if dropout else "")
            specs.append(AotSpec(kernel, _signature(kernel, dtype_name, "fp32"), constexprs, label=label, **launch))
    return specs


AOT_SPECS = _aot_specs()
