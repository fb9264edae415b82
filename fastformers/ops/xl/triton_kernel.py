"""Triton kernels of relative-position (Transformer-XL) attention, flash style.

Shapes follow :mod:`fastformers.ops.xl.naive`: ``L`` queries, ``K = M + L`` keys
(memory first), window tables ``pos_emb [K + L - 1, H, d]`` and
``pos_bias [K + L - 1, H]`` indexed by ``r = L - 1 - i + j``.

The positional term of a ``[BLOCK_M, BLOCK_N]`` score tile (queries from
``m_start``, keys from ``n_start``) only reads the band of window rows
``r0 .. r0 + BLOCK_M + BLOCK_N - 2`` with ``r0 = L - m_start - BLOCK_M + n_start``;
within the tile ``r - r0 = BLOCK_M - 1 - ii + jj`` is the same for every tile.
So each tile computes ``T = Q_tile · bandᵀ`` (``[BLOCK_M, BLOCK_R]``) and gathers
the skewed diagonal ``T[ii, BLOCK_M - 1 - ii + jj]``: the shift trick as index
arithmetic, with no ``[L, K]`` tensor anywhere. The backward runs the skew the
other way: the score gradient is gathered into band coordinates, which gives
the query gradient through the band and the band's gradient (``dTᵀ · Q``).

Launchers take CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set
before import (the Triton interpreter; how they are tested without a GPU).
"""
import torch
import triton
import triton.language as tl

from ...triton_utils import AotSpec, interpreter_enabled


@triton.jit
def _dot(a, b, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr):
    if UPCAST_DOTS:
        # The interpreter multiplies bf16 tensors as their raw 16-bit patterns;
        # bf16 -> float32 is exact and so are bf16 products in float32, so this
        # computes what the GPU's bf16 dot with float32 accumulation does.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, out_dtype=ACC, input_precision=DOT_PRECISION)


@triton.jit
def _tile_scores(
    qu,  # [BLOCK_M, BLOCK_D] query + query_pos_bias, input dtype
    q,  # [BLOCK_M, BLOCK_D] query, input dtype
    k,  # [BLOCK_N, BLOCK_D] keys, input dtype
    pe_ptr,  # pos_emb of this head
    pb_ptr,  # pos_bias of this head
    stride_pe_r,
    stride_pe_d,
    stride_pb_r,
    m_start,
    n_start,
    L,
    K,
    d,
    scale,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
):
    """Scaled scores ``[BLOCK_M, BLOCK_N]`` (-inf where not visible), the
    positional band ``[BLOCK_R, BLOCK_D]``, its first window row and visibility."""
    offs_i = m_start + tl.arange(0, BLOCK_M)
    offs_j = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    band_row0 = L - m_start - BLOCK_M + n_start
    rows = band_row0 + tl.arange(0, BLOCK_R)
    row_ok = (rows >= 0) & (rows < K + L - 1)
    band = tl.load(
        pe_ptr + rows[:, None] * stride_pe_r + offs_d[None, :] * stride_pe_d,
        mask=row_ok[:, None] & (offs_d[None, :] < d),
        other=0.0,
    )
    content = _dot(qu, tl.trans(k), ACC, DOT_PRECISION, UPCAST_DOTS)
    band_scores = _dot(q, tl.trans(band), ACC, DOT_PRECISION, UPCAST_DOTS)
    in_band = (BLOCK_M - 1 - tl.arange(0, BLOCK_M))[:, None] + tl.arange(0, BLOCK_N)[None, :]
    positional = tl.gather(band_scores, in_band, axis=1)

    # Padded query rows (i >= L) stay visible so that no row is all -inf
    # (which would turn the online softmax into NaN); they are never stored.
    visible = offs_j[None, :] < K
    if CAUSAL:
        visible = visible & (offs_j[None, :] <= K - L + offs_i[:, None])
    bias = tl.load(
        pb_ptr + (band_row0 + in_band) * stride_pb_r, mask=visible & (offs_i[:, None] < L), other=0.0
    ).to(ACC)
    scores = (content + positional + bias) * scale
    scores = tl.where(visible, scores, -float("inf"))
    return scores, band, band_row0


@triton.jit
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
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,  # accumulation dtype: float64 for float64 inputs, else float32
    DOT_PRECISION: tl.constexpr,  # see _dot_precision
    UPCAST_DOTS: tl.constexpr,  # bf16 under the interpreter, see _dot
):
    m_start = tl.program_id(0) * BLOCK_M
    batch_head = tl.program_id(1)
    b = (batch_head // H).to(tl.int64)
    h = (batch_head % H).to(tl.int64)
    offs_i = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    i_ok = offs_i < L
    d_ok = offs_d < d

    q_tile = q_ptr + b * stride_q_b + h * stride_q_h + offs_i[:, None] * stride_q_l + offs_d[None, :] * stride_q_d
    q = tl.load(q_tile, mask=i_ok[:, None] & d_ok[None, :], other=0.0)
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
    if CAUSAL:
        # Keys after the tile's last query (j > M + i) are all masked: skip their tiles.
        n_end = tl.minimum(K, K - L + m_start + BLOCK_M)
    for n_start in range(0, n_end, BLOCK_N):
        offs_j = n_start + tl.arange(0, BLOCK_N)
        kv_mask = (offs_j[:, None] < K) & d_ok[None, :]
        k = tl.load(k_head + offs_j[:, None] * stride_k_l + offs_d[None, :] * stride_k_d, mask=kv_mask, other=0.0)
        v = tl.load(v_head + offs_j[:, None] * stride_v_l + offs_d[None, :] * stride_v_d, mask=kv_mask, other=0.0)
        scores, band, band_row0 = _tile_scores(
            qu, q, k, pe_head, pb_head, stride_pe_r, stride_pe_d, stride_pb_r, m_start, n_start,
            L, K, d, scale, CAUSAL, BLOCK_M, BLOCK_N, BLOCK_R, BLOCK_D, ACC, DOT_PRECISION, UPCAST_DOTS,
        )  # fmt: skip
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        rescale = tl.exp(row_max - new_max)
        probs = tl.exp(scores - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + _dot(probs.to(v.dtype), v, ACC, DOT_PRECISION, UPCAST_DOTS)
        row_max = new_max

    out = acc / row_sum[:, None]
    out_tile = out_ptr + b * stride_o_b + h * stride_o_h + offs_i[:, None] * stride_o_l + offs_d[None, :] * stride_o_d
    tl.store(out_tile, out.to(out_ptr.dtype.element_ty), mask=i_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + batch_head.to(tl.int64) * L + offs_i, row_max + tl.log(row_sum), mask=i_ok)


@triton.jit
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
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
):
    m_start = tl.program_id(0) * BLOCK_M
    batch_head = tl.program_id(1)
    b = (batch_head // H).to(tl.int64)
    h = (batch_head % H).to(tl.int64)
    offs_i = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_band = tl.arange(0, BLOCK_R)
    i_ok = offs_i < L
    d_ok = offs_d < d
    tile_mask = i_ok[:, None] & d_ok[None, :]

    q = tl.load(
        q_ptr + b * stride_q_b + h * stride_q_h + offs_i[:, None] * stride_q_l + offs_d[None, :] * stride_q_d,
        mask=tile_mask,
        other=0.0,
    )
    u = tl.load(u_ptr + h * stride_u_h + offs_d * stride_u_d, mask=d_ok, other=0.0)
    qu = (q.to(ACC) + u.to(ACC)[None, :]).to(q.dtype)
    do = tl.load(
        do_ptr + b * stride_do_b + h * stride_do_h + offs_i[:, None] * stride_do_l + offs_d[None, :] * stride_do_d,
        mask=tile_mask,
        other=0.0,
    )
    out = tl.load(
        out_ptr + b * stride_o_b + h * stride_o_h + offs_i[:, None] * stride_o_l + offs_d[None, :] * stride_o_d,
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
    # Where band column t of query row ii came from in the score tile: jj = t - (BLOCK_M - 1 - ii).
    score_column = offs_band[None, :] - (BLOCK_M - 1 - tl.arange(0, BLOCK_M))[:, None]
    from_tile = (score_column >= 0) & (score_column < BLOCK_N)
    score_column = tl.minimum(tl.maximum(score_column, 0), BLOCK_N - 1)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    n_end = K
    if CAUSAL:
        n_end = tl.minimum(K, K - L + m_start + BLOCK_M)
    for n_start in range(0, n_end, BLOCK_N):
        offs_j = n_start + tl.arange(0, BLOCK_N)
        kv_mask = (offs_j[:, None] < K) & d_ok[None, :]
        k = tl.load(k_head + offs_j[:, None] * stride_k_l + offs_d[None, :] * stride_k_d, mask=kv_mask, other=0.0)
        v = tl.load(v_head + offs_j[:, None] * stride_v_l + offs_d[None, :] * stride_v_d, mask=kv_mask, other=0.0)
        scores, band, band_row0 = _tile_scores(
            qu, q, k, pe_head, pb_head, stride_pe_r, stride_pe_d, stride_pb_r, m_start, n_start,
            L, K, d, scale, CAUSAL, BLOCK_M, BLOCK_N, BLOCK_R, BLOCK_D, ACC, DOT_PRECISION, UPCAST_DOTS,
        )  # fmt: skip
        probs = tl.exp(scores - lse[:, None])
        grad_probs = _dot(do, tl.trans(v), ACC, DOT_PRECISION, UPCAST_DOTS)
        # Gradient of the unscaled score (content + positional + bias).
        grad_scores = probs * (grad_probs - delta[:, None]) * scale
        dq += _dot(grad_scores.to(k.dtype), k, ACC, DOT_PRECISION, UPCAST_DOTS)

        grad_band_scores = tl.where(from_tile, tl.gather(grad_scores, score_column, axis=1), 0.0)
        dq += _dot(grad_band_scores.to(band.dtype), band, ACC, DOT_PRECISION, UPCAST_DOTS)
        grad_band = _dot(tl.trans(grad_band_scores.to(q.dtype)), q, ACC, DOT_PRECISION, UPCAST_DOTS)
        rows = band_row0 + offs_band
        row_ok = (rows >= 0) & (rows < K + L - 1)
        tl.atomic_add(
            grad_pe_ptr + (rows[:, None] * H + h) * d + offs_d[None, :],
            grad_band,
            mask=row_ok[:, None] & d_ok[None, :],
            sem="relaxed",
        )
        tl.atomic_add(grad_pb_ptr + rows * H + h, tl.sum(grad_band_scores, axis=0), mask=row_ok, sem="relaxed")

    dq_tile = dq_ptr + ((offs_i[:, None] * B + b) * H + h) * d + offs_d[None, :]
    tl.store(dq_tile, dq.to(dq_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
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
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
):
    n_start = tl.program_id(0) * BLOCK_N
    batch_head = tl.program_id(1)
    b = (batch_head // H).to(tl.int64)
    h = (batch_head % H).to(tl.int64)
    offs_j = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < d
    kv_mask = (offs_j[:, None] < K) & d_ok[None, :]

    k = tl.load(
        k_ptr + b * stride_k_b + h * stride_k_h + offs_j[:, None] * stride_k_l + offs_d[None, :] * stride_k_d,
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        v_ptr + b * stride_v_b + h * stride_v_h + offs_j[:, None] * stride_v_l + offs_d[None, :] * stride_v_d,
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
    if CAUSAL:
        # Queries before the tile's first key's own position (i < n_start - M) see none of it.
        m_begin = tl.maximum(n_start - (K - L), 0) // BLOCK_M * BLOCK_M
    for m_start in range(m_begin, L, BLOCK_M):
        offs_i = m_start + tl.arange(0, BLOCK_M)
        i_ok = offs_i < L
        tile_mask = i_ok[:, None] & d_ok[None, :]
        q = tl.load(q_head + offs_i[:, None] * stride_q_l + offs_d[None, :] * stride_q_d, mask=tile_mask, other=0.0)
        qu = (q.to(ACC) + u.to(ACC)[None, :]).to(q.dtype)
        do = tl.load(
            do_head + offs_i[:, None] * stride_do_l + offs_d[None, :] * stride_do_d, mask=tile_mask, other=0.0
        )
        stats_offset = batch_head.to(tl.int64) * L + offs_i
        lse = tl.load(lse_ptr + stats_offset, mask=i_ok, other=float("inf"))
        delta = tl.load(delta_ptr + stats_offset, mask=i_ok, other=0.0)
        scores, band, band_row0 = _tile_scores(
            qu, q, k, pe_head, pb_head, stride_pe_r, stride_pe_d, stride_pb_r, m_start, n_start,
            L, K, d, scale, CAUSAL, BLOCK_M, BLOCK_N, BLOCK_R, BLOCK_D, ACC, DOT_PRECISION, UPCAST_DOTS,
        )  # fmt: skip
        probs = tl.exp(scores - lse[:, None])
        dv += _dot(tl.trans(probs.to(do.dtype)), do, ACC, DOT_PRECISION, UPCAST_DOTS)
        grad_probs = _dot(do, tl.trans(v), ACC, DOT_PRECISION, UPCAST_DOTS)
        grad_scores = probs * (grad_probs - delta[:, None]) * scale
        dk += _dot(tl.trans(grad_scores.to(qu.dtype)), qu, ACC, DOT_PRECISION, UPCAST_DOTS)
        grad_scores_colsum += tl.sum(grad_scores, axis=0)

    out_offset = ((offs_j[:, None] * B + b) * H + h) * d + offs_d[None, :]
    tl.store(dk_ptr + out_offset, dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out_offset, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)
    n_key_tiles = tl.num_programs(0)
    tl.store(
        grad_u_partial_ptr + (batch_head.to(tl.int64) * n_key_tiles + tl.program_id(0)) * d + offs_d,
        tl.sum(grad_scores_colsum[:, None] * k.to(ACC), axis=0),
        mask=d_ok,
    )


def _acc_dtype(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 products as three TF32 tensor-core products (float32-level error;
    plain "ieee" float32 dots run on CUDA cores and spill at these tiles); bf16
    products are exact in float32 either way; float64 only has "ieee"."""
    return "tf32x3" if dtype == torch.float32 else "ieee"


def _dot_options(dtype: torch.dtype) -> dict:
    return dict(
        DOT_PRECISION=_dot_precision(dtype),
        UPCAST_DOTS=dtype == torch.bfloat16 and interpreter_enabled(),
    )


def _block_config(kernel_name: str, n_queries: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes, warps and stages of one kernel launch; tl.dot needs every
    dimension >= 16.

    Tiles are smaller than plain flash attention's: the band product is
    ``BLOCK_M x BLOCK_R`` with ``BLOCK_R ~ BLOCK_M + BLOCK_N`` and the skew
    gather keeps whole band rows live, so 64-row tiles spill on sm_80/sm_90
    (measured with ``python -m fastformers.gpu_report``). The dq kernel, which
    also scatters the band gradient, gets the smallest tiles; float32 products
    run as three TF32 products (see :func:`_dot_precision`) and get 16-row tiles.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    tile = 16 if kernel_name == "dq" or dtype != torch.bfloat16 else 32
    block_m = min(tile, max(16, triton.next_power_of_2(n_queries)))
    block_n = tile
    return dict(
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_R=triton.next_power_of_2(block_m + block_n - 1),
        BLOCK_D=block_d,
        num_warps=4 if block_d <= 64 else 8,
        num_stages=2,
    )


def _strides4(tensor: torch.Tensor):
    return tuple(tensor.stride())


def rel_attention_forward(query, key, value, pos_emb, pos_bias, query_pos_bias, scale: float, causal: bool):
    """Forward of relative-position attention.

    query ``[L, B, H, d]``, key and value ``[K, B, H, d]`` (``K = M + L``),
    pos_emb ``[K + L - 1, H, d]``, pos_bias ``[K + L - 1, H]``, query_pos_bias
    ``[H, d]``; any strides. Returns ``out [L, B, H, d]`` (query's dtype) and the
    row log-sum-exp ``lse [B, H, L]`` (float32, float64 for float64 inputs).
    """
    L, B, H, d = query.shape
    K = key.shape[0]
    acc_tl, acc_torch = _acc_dtype(query.dtype)
    out = query.new_empty((L, B, H, d))
    lse = torch.empty((B, H, L), dtype=acc_torch, device=query.device)
    config = _block_config("fwd", L, d, query.dtype)
    grid = (triton.cdiv(L, config["BLOCK_M"]), B * H)
    rel_attention_fwd_kernel[grid](
        query, key, value, pos_emb, pos_bias, query_pos_bias, out, lse,
        *_strides4(query), *_strides4(key), *_strides4(value),
        *pos_emb.stride(), *pos_bias.stride(), *query_pos_bias.stride(), *_strides4(out),
        L, K, H, d, float(scale),
        CAUSAL=bool(causal), ACC=acc_tl, **_dot_options(query.dtype), **config,
    )  # fmt: skip
    return out, lse


def rel_attention_backward(
    grad_out, query, key, value, pos_emb, pos_bias, query_pos_bias, out, lse, scale: float, causal: bool
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
    dq_config = _block_config("dq", L, d, query.dtype)
    dkdv_config = _block_config("dkdv", L, d, query.dtype)
    n_query_tiles = triton.cdiv(L, dq_config["BLOCK_M"])
    n_key_tiles = triton.cdiv(K, dkdv_config["BLOCK_N"])
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
    rel_attention_bwd_dq_kernel[(n_query_tiles, B * H)](
        query, key, value, pos_emb, pos_bias, query_pos_bias, out, grad_out, lse, delta,
        grad_query, grad_pos_emb, grad_pos_bias,
        *common_strides, *_strides4(out), *_strides4(grad_out),
        L, K, B, H, d, float(scale),
        CAUSAL=bool(causal), ACC=acc_tl, **_dot_options(query.dtype), **dq_config,
    )  # fmt: skip
    rel_attention_bwd_dkdv_kernel[(n_key_tiles, B * H)](
        query, key, value, pos_emb, pos_bias, query_pos_bias, grad_out, lse, delta,
        grad_key, grad_value, grad_u_partial,
        *common_strides, *_strides4(grad_out),
        L, K, B, H, d, float(scale),
        CAUSAL=bool(causal), ACC=acc_tl, **_dot_options(query.dtype), **dkdv_config,
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
_CONSTEXPRS = ("CAUSAL", "BLOCK_M", "BLOCK_N", "BLOCK_R", "BLOCK_D", "ACC", "DOT_PRECISION", "UPCAST_DOTS")


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
        elif name == "scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def _aot_specs():
    """Every kernel at each tile configuration the launchers pick for fp32 and
    bf16 with d = 32, 64, 128: training (L >= 32) and, where it differs, decode
    (L = 1) query tiles; causal (the key-tile loop bounds are its only difference)."""
    kernels = {name: kernel for name, kernel in zip(_KERNEL_NAMES, _POINTERS)}
    specs = []
    for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for head_dim in (32, 64, 128):
            for name, kernel in kernels.items():
                configs = {phase: _block_config(name, n_queries, head_dim, torch_dtype) for phase, n_queries in (("train", 64), ("decode", 1))}
                if configs["decode"] == configs["train"]:
                    del configs["decode"]
                for phase, config in configs.items():
                    launch = {key: config.pop(key) for key in ("num_warps", "num_stages")}
                    constexprs = {"CAUSAL": True, "ACC": tl.float32, "UPCAST_DOTS": False, **config}
                    constexprs["DOT_PRECISION"] = _dot_precision(torch_dtype)
                    label = f"{dtype},d{head_dim},{phase}"
                    specs.append(AotSpec(kernel, _signature(kernel, dtype, "fp32"), constexprs, label=label, **launch))
    return specs


AOT_SPECS = _aot_specs()
