"""Triton kernels of relative-position (Transformer-XL) attention, flash style.

Shapes follow :mod:`fastformers.ops.xl.naive`: ``L`` queries, ``K = M + L`` keys
(memory first), window tables ``pos_emb [W, H, d]`` and ``pos_bias [W, H]``
(``W = K + L - 1``) indexed by ``r = L - 1 - i + j``.

The positional term runs on tensor cores as a band product, the C++ kernel's
band GEMM: the ``[BLOCK_M, BLOCK_N]`` score tile at ``(m_start, n_start)``
reads the ``BLOCK_M + BLOCK_N - 1`` window rows from
``band_row0 = L - m_start - BLOCK_M + n_start``, score ``(ii, jj)`` the one at
band column ``t = BLOCK_M - 1 - ii + jj``. The band is taken in chunks of
``BLOCK_N`` rows (``tl.dot`` wants power-of-2 sides, and ``BLOCK_M + BLOCK_N -
1`` is not one): ``Q_tile · chunkᵀ`` plus the chunk's biases is a
``[BLOCK_M, BLOCK_N]`` product, skewed into score coordinates with
``tl.gather`` along its rows (:func:`_skew`). The band of key tile ``n + 1``
is that of tile ``n`` moved by one chunk, so a key loop that keeps its last
products (``SLIDE_BAND``, :func:`_slid_positional`) computes one new band
product a tile, as many as content products. The backward skews the score
gradient back into band coordinates the same way (:func:`_unskew`), which gives
the query gradient through the band (``dT · chunk``) and the band's gradient
(``dTᵀ · Q``) as products too.

The positional-table gradient takes no atomics: a second launch of the dq
kernel's loop (``TABLE_GRAD``; one launch doing both needed more registers
than a thread has) has each (batch, head, query tile) program write its own
partial sums over the window rows it touches, a "slab" of scratch in one
layer per band chunk (band chunk ``c`` of key tile ``n`` lands on chunk ``n +
c`` of layer ``c``, so every element is stored once, from registers), and
:func:`rel_attention_pos_grad_reduce_kernel` sums the slabs per window row in
a fixed order: two identical backward calls give bit-identical gradients. On
tensor cores that second launch also adds the query gradient's band part
(``DQ_BAND``) to the first launch's ``dS·K``, so that the first fits wgmma's
64- and 128-row tiles (:func:`_variant_splits_dq`).

Attention dropout (``DROPOUT``, a constexpr, so the kernels without it are
unchanged) regenerates the keep bit of probability ``(b, h, i, j)`` from
Philox element ``((b·H + h)·L + i)·K + j`` wherever a kernel needs it: the
forward applies it to the probabilities it multiplies with V (the softmax
statistics stay those of the undropped scores), the backward to ``dO·Vᵀ`` and
to the probabilities of ``dV``.

An explicit bool mask (``[L or 1, K, B or 1]``) is passed as bits, 32 keys to
an int32 word (:func:`_mask_args`), and read per score tile where ``has_mask``
says so (a runtime flag: one compilation serves masked and unmasked calls). A query row that sees no key gives NaN output and
``-inf`` log-sum-exp, as the reference does; the online softmax guards its
running maximum so that a fully masked key tile before visible ones does no harm.

``PRECISION`` (constexpr) is the float32 products' ``input_precision``: "tf32"
when torch allows TF32 matmuls, "ieee" at "highest"; 16-bit products are exact
in float32 accumulation either way.

Launchers take CUDA tensors (bfloat16, float16 and float32 as TF32 with d <=
128, float32 as IEEE with d <= 64, with and without dropout: the configurations of
``AOT_SPECS``, see ``_TILES``, whose tiles differ per arch; the forward
autotuned among them), or CPU tensors of any float dtype when ``TRITON_INTERPRET=1`` was set
before import (the Triton interpreter; how they are tested without a GPU).
"""
import itertools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ...triton_utils import AotSpec, interpreter_enabled
from ..dropout import naive as dropout_naive
from ..dropout.triton_kernel import keep
from ..triton_dot import mma


@triton.jit
def _dot(a, b, ACC: tl.constexpr, UPCAST_DOTS: tl.constexpr):
    """``a @ b`` accumulated in ACC; float32 products in full IEEE precision
    (Triton's default for float32 would be TF32)."""
    return mma(a, b, ACC, UPCAST_DOTS, "ieee")


@triton.jit
def _tile_offsets(rows, stride_rows, cols):
    """Element offsets of a ``[rows, cols]`` tile of a ``[seq, B, H, d]``
    tensor from its (batch, head) base: the sequence part in int64, since
    ``rows * stride_rows`` passes 2^31 on large inputs (stride_rows is
    ``B·H·d`` when contiguous); the feature part stays int32."""
    return rows.to(tl.int64)[:, None] * stride_rows + cols[None, :]


@triton.jit
def _band_chunk(pe_head, pb_head, stride_pe_r, stride_pb_r, first_row, W, offs_d, d_ok,
                BLOCK_N: tl.constexpr):
    """Window rows ``first_row .. first_row + BLOCK_N`` of pos_emb ``[BLOCK_N, BLOCK_D]``
    and pos_bias ``[BLOCK_N]`` of one head, zero outside the window."""
    rows = first_row + tl.arange(0, BLOCK_N)
    row_ok = (rows >= 0) & (rows < W)
    band = tl.load(
        pe_head + rows[:, None] * stride_pe_r + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    band_bias = tl.load(pb_head + rows * stride_pb_r, mask=row_ok, other=0.0)
    return band, band_bias


@triton.constexpr_function
def band_chunks(block_m, block_n):
    """Chunks of ``block_n`` window rows that cover a tile's ``block_m + block_n - 1``."""
    return (block_m + block_n - 2) // block_n + 1


@triton.jit
def _band_column(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Band column ``t = BLOCK_M - 1 - ii + jj`` of score ``(ii, jj)``."""
    return (BLOCK_M - 1 - tl.arange(0, BLOCK_M))[:, None] + tl.arange(0, BLOCK_N)[None, :]


@triton.jit
def _skew(band_scores, chunk: tl.constexpr, positional, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``positional`` with the products of band chunk ``chunk`` (``[BLOCK_M,
    BLOCK_N]``, band columns ``chunk·BLOCK_N ..``) moved to the scores that read
    them: score ``(ii, jj)`` reads band column ``t``, chunk ``t // BLOCK_N``.

    Every chunk gathers with the same index (``t mod BLOCK_N``) and the chunks
    are told apart by one comparison each: the compiler keeps such loop
    invariants in registers for the whole key loop, one register per thread
    and score each, so the fewer the better."""
    column = _band_column(BLOCK_M, BLOCK_N)
    picked = tl.gather(band_scores, column & (BLOCK_N - 1), axis=1)
    if chunk == 0:
        return picked
    return tl.where(column >= chunk * BLOCK_N, picked, positional)


@triton.jit
def _unskew(grad_scores, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The score gradient ``[BLOCK_M, BLOCK_N]`` in band coordinates, the
    inverse of :func:`_skew`: band column ``c·BLOCK_N + tt`` of row ii comes
    from score column ``jj = c·BLOCK_N + tt - (BLOCK_M - 1 - ii)``, inside the
    tile for at most one chunk ``c``. The gather index ``jj mod BLOCK_N`` is
    the same for every chunk, so one gather serves them all: ``(gathered,
    source)`` with ``source = tt - (BLOCK_M - 1 - ii)``, which
    :func:`_band_chunk_of` turns into each chunk."""
    shift = (BLOCK_M - 1 - tl.arange(0, BLOCK_M))[:, None]
    source = tl.arange(0, BLOCK_N)[None, :] - shift
    return tl.gather(grad_scores, source & (BLOCK_N - 1), axis=1), source


@triton.jit
def _band_chunk_of(gathered, source, chunk: tl.constexpr, BLOCK_N: tl.constexpr):
    """Chunk ``chunk`` of :func:`_unskew`'s gradient: its entries whose score
    column ``source + chunk·BLOCK_N`` lies in the tile, zero elsewhere."""
    column = source + chunk * BLOCK_N
    return tl.where((column >= 0) & (column < BLOCK_N), gathered, 0.0)


@triton.jit
def _band_scores(q, pe_head, pb_head, stride_pe_r, stride_pb_r, first_row, W, offs_d, d_ok, BLOCK_N: tl.constexpr,
                 ACC: tl.constexpr, UPCAST_DOTS: tl.constexpr, PRECISION: tl.constexpr):
    """``q · chunkᵀ + chunk bias`` ``[BLOCK_M, BLOCK_N]`` for the ``BLOCK_N``
    window rows from ``first_row``: one band chunk's products, unskewed."""
    band, band_bias = _band_chunk(pe_head, pb_head, stride_pe_r, stride_pb_r, first_row, W, offs_d, d_ok, BLOCK_N)
    return mma(q, tl.trans(band), ACC, UPCAST_DOTS, PRECISION) + band_bias.to(ACC)[None, :]


@triton.jit
def _tile_positional(q, pe_head, pb_head, stride_pe_r, stride_pb_r, m_start, n_start, L, K, offs_d, d_ok,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr, UPCAST_DOTS: tl.constexpr,
                     PRECISION: tl.constexpr):
    """The positional scores ``[BLOCK_M, BLOCK_N]`` of the tile at ``(m_start,
    n_start)``, every band chunk of it computed here."""
    positional = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    band_row0 = L - m_start - BLOCK_M + n_start
    for chunk in tl.static_range(band_chunks(BLOCK_M, BLOCK_N)):
        band_scores = _band_scores(
            q, pe_head, pb_head, stride_pe_r, stride_pb_r, band_row0 + chunk * BLOCK_N, K + L - 1, offs_d, d_ok,
            BLOCK_N, ACC, UPCAST_DOTS, PRECISION,
        )  # fmt: skip
        positional = _skew(band_scores, chunk, positional, BLOCK_M, BLOCK_N)
    return positional


@triton.jit
def _slid_positional(older, old, newest, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(positional scores of this key tile, the products the next tile
    keeps)`` from the band products the previous tiles kept and the one
    computed for this tile. The band of key tile ``n`` is window rows ``L -
    m_start - BLOCK_M + n·BLOCK_N`` onwards: it slides by one chunk a tile, so
    chunk ``c`` of tile ``n`` is chunk ``c - 1`` of tile ``n + 1``, and a tile
    needs one new product (its last chunk), not one per chunk. ``older``,
    ``old``: chunks 0 and 1 (``old`` unused with two chunks)."""
    positional = _skew(older, 0, older, BLOCK_M, BLOCK_N)
    if band_chunks(BLOCK_M, BLOCK_N) == 3:
        positional = _skew(old, 1, positional, BLOCK_M, BLOCK_N)
        return _skew(newest, 2, positional, BLOCK_M, BLOCK_N), old, newest
    return _skew(newest, 1, positional, BLOCK_M, BLOCK_N), newest, old


@triton.jit
def _first_kept_band(q, pe_head, pb_head, stride_pe_r, stride_pb_r, m_start, L, K, offs_d, d_ok,
                     SLIDE_BAND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
                     UPCAST_DOTS: tl.constexpr, PRECISION: tl.constexpr):
    """What a key loop keeps before its first tile: ``(older, old)``, key tile
    0's chunks 0 and 1 (its last one the loop computes); zeros the loop never
    reads without ``SLIDE_BAND``."""
    if SLIDE_BAND:
        # The kept products, one [BLOCK_M, BLOCK_N] tile of registers each: two at most.
        tl.static_assert(band_chunks(BLOCK_M, BLOCK_N) <= 3)
        band_first = L - m_start - BLOCK_M
        older = _band_scores(q, pe_head, pb_head, stride_pe_r, stride_pb_r, band_first, K + L - 1, offs_d, d_ok,
                             BLOCK_N, ACC, UPCAST_DOTS, PRECISION)
        old = older
        if band_chunks(BLOCK_M, BLOCK_N) == 3:
            old = _band_scores(q, pe_head, pb_head, stride_pe_r, stride_pb_r, band_first + BLOCK_N, K + L - 1, offs_d,
                               d_ok, BLOCK_N, ACC, UPCAST_DOTS, PRECISION)
        return older, old
    return tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC), tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)


@triton.jit
def _key_tile_positional(kept_older, kept_old, q, pe_head, pb_head, stride_pe_r, stride_pb_r, m_start, n_start, L, K,
                         offs_d, d_ok, SLIDE_BAND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         ACC: tl.constexpr, UPCAST_DOTS: tl.constexpr, PRECISION: tl.constexpr):
    """``(positional scores of the key tile at n_start, what the loop keeps
    for the next tile)``: with ``SLIDE_BAND`` from the kept products and the
    tile's last chunk (:func:`_slid_positional`), else every chunk anew."""
    if SLIDE_BAND:
        last_chunk_row = L - m_start - BLOCK_M + n_start + (band_chunks(BLOCK_M, BLOCK_N) - 1) * BLOCK_N
        newest = _band_scores(q, pe_head, pb_head, stride_pe_r, stride_pb_r, last_chunk_row, K + L - 1, offs_d, d_ok,
                              BLOCK_N, ACC, UPCAST_DOTS, PRECISION)
        return _slid_positional(kept_older, kept_old, newest, BLOCK_M, BLOCK_N)
    positional = _tile_positional(q, pe_head, pb_head, stride_pe_r, stride_pb_r, m_start, n_start, L, K, offs_d, d_ok,
                                  BLOCK_M, BLOCK_N, ACC, UPCAST_DOTS, PRECISION)
    return positional, kept_older, kept_old


@triton.jit
def _masked_scores(
    qu,  # [BLOCK_M, BLOCK_D] query + query_pos_bias, input dtype
    k,  # [BLOCK_N, BLOCK_D] keys, input dtype
    positional,  # [BLOCK_M, BLOCK_N] ACC: the positional scores of the tile
    mask_batch,  # the explicit mask of this batch (read only when has_mask)
    stride_mask_l,
    m_start,
    n_start,
    L,
    K,
    scale,
    causal,
    has_mask,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Scaled scores ``[BLOCK_M, BLOCK_N]``, -inf where not visible."""
    tl.static_assert(BLOCK_N % 32 == 0)  # whole words of the mask bits
    offs_i = m_start + tl.arange(0, BLOCK_M)
    offs_j = n_start + tl.arange(0, BLOCK_N)
    # Padded query rows (i >= L) stay visible so that their softmax is defined;
    # they are never stored.
    visible = (offs_j[None, :] < K) & (offs_i[:, None] >= 0)
    if causal:
        visible = visible & (offs_j[None, :] <= K - L + offs_i[:, None])
    # The mask as bits, 32 keys a word: a [BLOCK_M, BLOCK_N / 32] load (a byte
    # or a pointer per score cost more registers than the rest of the tile),
    # predicated rather than branched on: without a mask (has_mask = 0) no row
    # is below L · has_mask and no lane reads.
    offs_word = n_start // 32 + tl.arange(0, BLOCK_N // 32)
    words = tl.load(
        mask_batch + (offs_i[:, None] * stride_mask_l + offs_word[None, :]),
        mask=(offs_i[:, None] < L * has_mask) & (offs_word[None, :] < tl.cdiv(K, 32)),
        other=-1,
    )
    bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
    visible = visible & (tl.reshape(bits, [BLOCK_M, BLOCK_N]) != 0)
    scores = mma(qu, tl.trans(k), ACC, UPCAST_DOTS, PRECISION) + positional
    return tl.where(visible, scores * scale, -float("inf"))


@triton.jit
def _key_tile(k_head, v_head, stride_k_l, stride_v_l, qu, q, kept_older, kept_old, pe_head, pb_head, mask_batch,
              stride_pe_r, stride_pb_r, stride_mask_l, m_start, n_start, L, K, offs_d, d_ok, scale, causal, has_mask,
              SLIDE_BAND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
              UPCAST_DOTS: tl.constexpr, PRECISION: tl.constexpr):
    """One step of a key loop: the tile's key indices, keys and values, its
    masked scores, and what the loop keeps for the next tile:
    ``(offs_j, k, v, scores, kept_older, kept_old)``."""
    offs_j = n_start + tl.arange(0, BLOCK_N)
    kv_mask = (offs_j[:, None] < K) & d_ok[None, :]
    k = tl.load(k_head + _tile_offsets(offs_j, stride_k_l, offs_d), mask=kv_mask, other=0.0)
    v = tl.load(v_head + _tile_offsets(offs_j, stride_v_l, offs_d), mask=kv_mask, other=0.0)
    positional, kept_older, kept_old = _key_tile_positional(
        kept_older, kept_old, q, pe_head, pb_head, stride_pe_r, stride_pb_r, m_start, n_start, L, K, offs_d, d_ok,
        SLIDE_BAND, BLOCK_M, BLOCK_N, ACC, UPCAST_DOTS, PRECISION,
    )  # fmt: skip
    scores = _masked_scores(
        qu, k, positional, mask_batch, stride_mask_l, m_start, n_start, L, K, scale, causal, has_mask,
        BLOCK_M, BLOCK_N, ACC, UPCAST_DOTS, PRECISION,
    )  # fmt: skip
    return offs_j, k, v, scores, kept_older, kept_old


@triton.jit
def _kept(seed, offset, threshold, batch_head, L, K, offs_i, offs_j):
    """Keep bits of the ``[BLOCK_M, BLOCK_N]`` tile's (b, h, i, j) probabilities."""
    index = (batch_head.to(tl.int64) * L + offs_i.to(tl.int64))[:, None] * K + offs_j.to(tl.int64)[None, :]
    return keep(seed, offset, index, threshold)


# Scalars that change from call to call: no specialisation on their values.
_RUNTIME_ARGS = ["causal", "has_mask", "seed", "offset", "threshold", "L_bucket", "K_bucket"]


@triton.jit
def _online_softmax_step(scores, row_max, row_sum):
    """One key tile of the online softmax: ``(probs, rescale, new row_max, new
    row_sum)``; a row with nothing visible so far keeps max -inf and sum 0
    (its probabilities 0, not the NaN of ``exp(-inf - -inf)``)."""
    new_max = tl.maximum(row_max, tl.max(scores, axis=1))
    finite_max = tl.where(new_max == -float("inf"), 0.0, new_max)
    rescale = tl.exp(row_max - finite_max)
    probs = tl.exp(scores - finite_max[:, None])
    return probs, rescale, new_max, row_sum * rescale + tl.sum(probs, axis=1)


@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def rel_attention_fwd_kernel(
    q_ptr,  # [L, B, H, d]
    k_ptr,  # [K, B, H, d]
    v_ptr,  # [K, B, H, d]
    pe_ptr,  # [K + L - 1, H, d]
    pb_ptr,  # [K + L - 1, H]
    u_ptr,  # [H, d]
    mask_ptr,  # [B or 1, L or 1, cdiv(K, 32)] int32 bits (bit j % 32 of word j // 32: key j visible); read only when has_mask
    out_ptr,  # [L, B, H, d]
    lse_ptr,  # [B, H, L] contiguous, ACC
    stride_q_l,
    stride_q_b,
    stride_q_h,
    stride_k_l,
    stride_k_b,
    stride_k_h,
    stride_v_l,
    stride_v_b,
    stride_v_h,
    stride_pe_r,
    stride_pe_h,
    stride_pb_r,
    stride_pb_h,
    stride_u_h,
    stride_mask_b,
    stride_mask_l,
    stride_o_l,
    stride_o_b,
    stride_o_h,
    L,
    K,
    H,
    d,
    scale,
    causal,  # 1: query i sees keys j <= K - L + i; 0: every key
    has_mask,  # 1: mask_ptr hides keys as well
    seed,  # attention dropout: Philox key and stream offset,
    offset,
    threshold,  # dropout_naive.threshold(p)
    dropout_scale,  # and 1 / (1 - p); read only with DROPOUT
    L_bucket,  # the autotuning key (powers of 2 of L and K); unused by the kernel
    K_bucket,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,  # accumulation dtype: float64 for float64 inputs, else float32
    UPCAST_DOTS: tl.constexpr,  # 16-bit floats under the interpreter, see _dot_in
    PRECISION: tl.constexpr,  # input_precision of float32 products
    DROPOUT: tl.constexpr,  # dropout_p > 0
    SLIDE_BAND: tl.constexpr,  # keep band products for the next key tiles (_slid_positional)
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

    q = tl.load(
        q_ptr + b * stride_q_b + h * stride_q_h + _tile_offsets(offs_i, stride_q_l, offs_d),
        mask=i_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    u = tl.load(u_ptr + h * stride_u_h + offs_d, mask=d_ok, other=0.0)
    qu = (q.to(ACC) + u.to(ACC)[None, :]).to(q.dtype)
    k_head = k_ptr + b * stride_k_b + h * stride_k_h
    v_head = v_ptr + b * stride_v_b + h * stride_v_h
    pe_head = pe_ptr + h * stride_pe_h
    pb_head = pb_ptr + h * stride_pb_h
    mask_batch = mask_ptr + b * stride_mask_b

    row_max = tl.full([BLOCK_M], -float("inf"), dtype=ACC)
    row_sum = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    n_end = K
    if causal:
        # Keys after the tile's last query (j > M + i) are all masked: skip their tiles.
        n_end = tl.minimum(K, K - L + m_start + BLOCK_M)
    kept_older, kept_old = _first_kept_band(
        q, pe_head, pb_head, stride_pe_r, stride_pb_r, m_start, L, K, offs_d, d_ok,
        SLIDE_BAND, BLOCK_M, BLOCK_N, ACC, UPCAST_DOTS, PRECISION,
    )  # fmt: skip
    for n_start in range(0, n_end, BLOCK_N):
        offs_j, k, v, scores, kept_older, kept_old = _key_tile(
            k_head, v_head, stride_k_l, stride_v_l, qu, q, kept_older, kept_old, pe_head, pb_head, mask_batch,
            stride_pe_r, stride_pb_r, stride_mask_l, m_start, n_start, L, K, offs_d, d_ok, scale, causal, has_mask,
            SLIDE_BAND, BLOCK_M, BLOCK_N, ACC, UPCAST_DOTS, PRECISION,
        )  # fmt: skip
        probs, rescale, row_max, row_sum = _online_softmax_step(scores, row_max, row_sum)
        if DROPOUT:
            kept = _kept(seed, offset, threshold, batch_head, L, K, offs_i, offs_j)
            probs = tl.where(kept, probs * dropout_scale, 0.0)
        acc = acc * rescale[:, None] + mma(probs.to(v.dtype), v, ACC, UPCAST_DOTS, PRECISION)

    # A row that saw no key: 0 / 0 = NaN output and log(0) = -inf log-sum-exp.
    out = acc / row_sum[:, None]
    out_tile = out_ptr + b * stride_o_b + h * stride_o_h + _tile_offsets(offs_i, stride_o_l, offs_d)
    tl.store(out_tile, out.to(out_ptr.dtype.element_ty), mask=i_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + (batch_head.to(tl.int64) * L + offs_i), row_max + tl.log(row_sum), mask=i_ok)


@triton.jit
def _store_slab_chunk(slab_pe_tile, slab_pb_tile, slab_row, grad_band, grad_band_bias, d, offs_d, d_ok,
                      BLOCK_N: tl.constexpr):
    rows = slab_row + tl.arange(0, BLOCK_N)
    # int64 per element: the slabs of large calls pass 2^31 elements.
    tl.store(slab_pe_tile + (rows.to(tl.int64)[:, None] * d + offs_d[None, :]), grad_band, mask=d_ok[None, :])
    tl.store(slab_pb_tile + rows, grad_band_bias)


@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def rel_attention_bwd_dq_kernel(
    q_ptr,  # [L, B, H, d]
    k_ptr,  # [K, B, H, d]
    v_ptr,  # [K, B, H, d]
    pe_ptr,  # [K + L - 1, H, d]
    pb_ptr,  # [K + L - 1, H]
    u_ptr,  # [H, d]
    mask_ptr,  # [B or 1, L or 1, cdiv(K, 32)] int32 bits; read only when has_mask
    out_ptr,  # [L, B, H, d]
    do_ptr,  # [L, B, H, d] gradient of out
    lse_ptr,  # [B, H, L] contiguous, ACC
    delta_ptr,  # [B, H, L] contiguous, ACC: written by the dq launch, read by the table one and dk/dv
    dq_content_ptr,  # [L, B, H, d] contiguous, ACC: dS·K, when the table launch adds dT·band (read only then)
    dq_ptr,  # [L, B, H, d] contiguous: dS·K + dT·band, written by the launch with DQ_BAND
    slab_pe_ptr,  # [B, H, n_query_tiles, 2, slab_rows, d] contiguous, ACC: every element written with TABLE_GRAD
    slab_pb_ptr,  # [B, H, n_query_tiles, 2, slab_rows] contiguous, ACC: every element written with TABLE_GRAD
    stride_q_l,
    stride_q_b,
    stride_q_h,
    stride_k_l,
    stride_k_b,
    stride_k_h,
    stride_v_l,
    stride_v_b,
    stride_v_h,
    stride_pe_r,
    stride_pe_h,
    stride_pb_r,
    stride_pb_h,
    stride_u_h,
    stride_mask_b,
    stride_mask_l,
    stride_o_l,
    stride_o_b,
    stride_o_h,
    stride_do_l,
    stride_do_b,
    stride_do_h,
    L,
    K,
    B,
    H,
    d,
    slab_rows,  # (cdiv(K, BLOCK_N) + n_chunks - 1) · BLOCK_N: window rows L - m_start - BLOCK_M onwards
    scale,
    causal,
    has_mask,
    seed,
    offset,
    threshold,
    dropout_scale,
    L_bucket,
    K_bucket,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
    PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr,
    SLIDE_BAND: tl.constexpr,  # keep band products for the next key tiles (_slid_positional)
    TABLE_GRAD: tl.constexpr,  # False: dS·K and delta; True: the positional-table slabs (delta read)
    DQ_BAND: tl.constexpr,  # this launch adds dT·band and stores the final dq
):
    batch_head = tl.program_id(0)
    m_start = tl.program_id(1) * BLOCK_M
    b = (batch_head // H).to(tl.int64)
    h = (batch_head % H).to(tl.int64)
    offs_i = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    i_ok = offs_i < L
    d_ok = offs_d < d
    tile_mask = i_ok[:, None] & d_ok[None, :]

    q = tl.load(
        q_ptr + b * stride_q_b + h * stride_q_h + _tile_offsets(offs_i, stride_q_l, offs_d),
        mask=tile_mask,
        other=0.0,
    )
    u = tl.load(u_ptr + h * stride_u_h + offs_d, mask=d_ok, other=0.0)
    qu = (q.to(ACC) + u.to(ACC)[None, :]).to(q.dtype)
    do = tl.load(
        do_ptr + b * stride_do_b + h * stride_do_h + _tile_offsets(offs_i, stride_do_l, offs_d),
        mask=tile_mask,
        other=0.0,
    )
    stats_offset = batch_head.to(tl.int64) * L + offs_i
    if TABLE_GRAD:
        delta = tl.load(delta_ptr + stats_offset, mask=i_ok, other=0.0)
    else:
        out = tl.load(
            out_ptr + b * stride_o_b + h * stride_o_h + _tile_offsets(offs_i, stride_o_l, offs_d),
            mask=tile_mask,
            other=0.0,
        )
        delta = tl.sum(do.to(ACC) * out.to(ACC), axis=1)
        tl.store(delta_ptr + stats_offset, delta, mask=i_ok)
    # +inf on padded rows makes their probabilities exactly zero.
    lse = tl.load(lse_ptr + stats_offset, mask=i_ok, other=float("inf"))

    k_head = k_ptr + b * stride_k_b + h * stride_k_h
    v_head = v_ptr + b * stride_v_b + h * stride_v_h
    pe_head = pe_ptr + h * stride_pe_h
    pb_head = pb_ptr + h * stride_pb_h
    mask_batch = mask_ptr + b * stride_mask_b
    n_chunks: tl.constexpr = band_chunks(BLOCK_M, BLOCK_N)
    slab_tile = (batch_head.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * n_chunks * slab_rows
    slab_pe_tile = slab_pe_ptr + slab_tile * d
    slab_pb_tile = slab_pb_ptr + slab_tile
    band_first = L - m_start - BLOCK_M  # window row of slab row 0

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    n_end = K
    if causal:
        n_end = tl.minimum(K, K - L + m_start + BLOCK_M)
    kept_older, kept_old = _first_kept_band(
        q, pe_head, pb_head, stride_pe_r, stride_pb_r, m_start, L, K, offs_d, d_ok,
        SLIDE_BAND, BLOCK_M, BLOCK_N, ACC, UPCAST_DOTS, PRECISION,
    )  # fmt: skip
    for n_start in range(0, n_end, BLOCK_N):
        offs_j, k, v, scores, kept_older, kept_old = _key_tile(
            k_head, v_head, stride_k_l, stride_v_l, qu, q, kept_older, kept_old, pe_head, pb_head, mask_batch,
            stride_pe_r, stride_pb_r, stride_mask_l, m_start, n_start, L, K, offs_d, d_ok, scale, causal, has_mask,
            SLIDE_BAND, BLOCK_M, BLOCK_N, ACC, UPCAST_DOTS, PRECISION,
        )  # fmt: skip
        probs = tl.exp(scores - lse[:, None])
        grad_probs = mma(do, tl.trans(v), ACC, UPCAST_DOTS, PRECISION)
        if DROPOUT:
            kept = _kept(seed, offset, threshold, batch_head, L, K, offs_i, offs_j)
            grad_probs = tl.where(kept, grad_probs * dropout_scale, 0.0)
        # Gradient of the unscaled score (content + positional + bias).
        grad_scores = probs * (grad_probs - delta[:, None]) * scale
        if not TABLE_GRAD:
            dq += mma(grad_scores.to(k.dtype), k, ACC, UPCAST_DOTS, PRECISION)
        if TABLE_GRAD or DQ_BAND:
            gathered, source = _unskew(grad_scores, BLOCK_M, BLOCK_N)
            for chunk in tl.static_range(n_chunks):
                grad_band_scores = _band_chunk_of(gathered, source, chunk, BLOCK_N)
                if TABLE_GRAD:
                    # As qᵀ·dT ([BLOCK_D, BLOCK_N]): BLOCK_D rows are enough for wgmma at any tile.
                    grad_band = mma(tl.trans(q), grad_band_scores.to(q.dtype), ACC, UPCAST_DOTS, PRECISION)
                    _store_slab_chunk(
                        slab_pe_tile, slab_pb_tile, chunk * slab_rows + n_start + chunk * BLOCK_N, tl.trans(grad_band),
                        tl.sum(grad_band_scores, axis=0), d, offs_d, d_ok, BLOCK_N,
                    )  # fmt: skip
                if DQ_BAND:
                    band, _ = _band_chunk(
                        pe_head, pb_head, stride_pe_r, stride_pb_r, band_first + n_start + chunk * BLOCK_N,
                        K + L - 1, offs_d, d_ok, BLOCK_N,
                    )  # fmt: skip
                    dq += mma(grad_band_scores.to(band.dtype), band, ACC, UPCAST_DOTS, PRECISION)

    if TABLE_GRAD:
        # Zeros over the slab chunks of each layer that no key tile wrote: before
        # the layer's first and after its last (causal attention stops early).
        n_done = tl.cdiv(n_end, BLOCK_N) * BLOCK_N
        for chunk in tl.static_range(n_chunks):
            for rest in range(0, slab_rows, BLOCK_N):
                if (rest < chunk * BLOCK_N) | (rest >= n_done + chunk * BLOCK_N):
                    _store_slab_chunk(
                        slab_pe_tile, slab_pb_tile, chunk * slab_rows + rest, tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC),
                        tl.zeros([BLOCK_N], dtype=ACC), d, offs_d, d_ok, BLOCK_N,
                    )  # fmt: skip
    dq_offsets = ((offs_i[:, None] * B + b) * H + h) * d + offs_d[None, :]
    if TABLE_GRAD and DQ_BAND:
        dq += tl.load(dq_content_ptr + dq_offsets, mask=tile_mask, other=0.0)
    if DQ_BAND:
        tl.store(dq_ptr + dq_offsets, dq.to(dq_ptr.dtype.element_ty), mask=tile_mask)
    elif not TABLE_GRAD:
        tl.store(dq_content_ptr + dq_offsets, dq, mask=tile_mask)


@triton.jit
def rel_attention_pos_grad_reduce_kernel(
    slab_pe_ptr,  # [B, H, n_query_tiles, n_chunks, slab_rows, d] contiguous, ACC
    slab_pb_ptr,  # [B, H, n_query_tiles, n_chunks, slab_rows] contiguous, ACC
    grad_pe_ptr,  # [W, H, d] contiguous, ACC
    grad_pb_ptr,  # [W, H] contiguous, ACC
    L,
    B,
    H,
    d,
    W,
    n_query_tiles,
    slab_rows,
    QUERY_TILE: tl.constexpr,  # the dq kernel's BLOCK_M
    KEY_TILE: tl.constexpr,  # and BLOCK_N
    BLOCK_W: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Sum of the dq kernel's slabs per window row, batch after batch, query
    tile after query tile, chunk after chunk: the same order on every call."""
    n_chunks: tl.constexpr = band_chunks(QUERY_TILE, KEY_TILE)
    # Row blocks on grid axis 0: their count grows with the sequence (axis 1
    # stops at 65535 blocks), heads on axis 1.
    rows = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < d
    grad_pe = tl.zeros([BLOCK_W, BLOCK_D], dtype=grad_pe_ptr.dtype.element_ty)
    grad_pb = tl.zeros([BLOCK_W], dtype=grad_pb_ptr.dtype.element_ty)
    for b in range(B):
        for tile in range(n_query_tiles):
            slab_row = rows - (L - (tile + 1) * QUERY_TILE)
            row_ok = (slab_row >= 0) & (slab_row < slab_rows) & (rows < W)
            for chunk in tl.static_range(n_chunks):
                slab = (((b * H + h) * n_query_tiles + tile) * n_chunks + chunk).to(tl.int64) * slab_rows + slab_row
                grad_pe += tl.load(
                    slab_pe_ptr + (slab[:, None] * d + offs_d[None, :]), mask=row_ok[:, None] & d_ok[None, :], other=0.0
                )
                grad_pb += tl.load(slab_pb_ptr + slab, mask=row_ok, other=0.0)
    row_ok = rows < W
    tl.store(grad_pe_ptr + (rows[:, None] * H + h) * d + offs_d[None, :], grad_pe, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(grad_pb_ptr + rows * H + h, grad_pb, mask=row_ok)


@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def rel_attention_bwd_dkdv_kernel(
    q_ptr,  # [L, B, H, d]
    k_ptr,  # [K, B, H, d]
    v_ptr,  # [K, B, H, d]
    pe_ptr,  # [K + L - 1, H, d]
    pb_ptr,  # [K + L - 1, H]
    u_ptr,  # [H, d]
    mask_ptr,  # [B or 1, L or 1, cdiv(K, 32)] int32 bits; read only when has_mask
    do_ptr,  # [L, B, H, d] gradient of out
    lse_ptr,  # [B, H, L] contiguous, ACC
    delta_ptr,  # [B, H, L] contiguous, ACC
    dk_ptr,  # [K, B, H, d] contiguous
    dv_ptr,  # [K, B, H, d] contiguous
    grad_u_partial_ptr,  # [B, H, key_tile_slots, d] contiguous, ACC, zeroed
    stride_q_l,
    stride_q_b,
    stride_q_h,
    stride_k_l,
    stride_k_b,
    stride_k_h,
    stride_v_l,
    stride_v_b,
    stride_v_h,
    stride_pe_r,
    stride_pe_h,
    stride_pb_r,
    stride_pb_h,
    stride_u_h,
    stride_mask_b,
    stride_mask_l,
    stride_do_l,
    stride_do_b,
    stride_do_h,
    L,
    K,
    B,
    H,
    d,
    key_tile_slots,  # key tiles of the narrowest autotuned BLOCK_N: room for any config's
    scale,
    causal,
    has_mask,
    seed,
    offset,
    threshold,
    dropout_scale,
    L_bucket,
    K_bucket,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
    PRECISION: tl.constexpr,
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
        k_ptr + b * stride_k_b + h * stride_k_h + _tile_offsets(offs_j, stride_k_l, offs_d),
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        v_ptr + b * stride_v_b + h * stride_v_h + _tile_offsets(offs_j, stride_v_l, offs_d),
        mask=kv_mask,
        other=0.0,
    )
    u = tl.load(u_ptr + h * stride_u_h + offs_d, mask=d_ok, other=0.0)
    q_head = q_ptr + b * stride_q_b + h * stride_q_h
    do_head = do_ptr + b * stride_do_b + h * stride_do_h
    pe_head = pe_ptr + h * stride_pe_h
    pb_head = pb_ptr + h * stride_pb_h
    mask_batch = mask_ptr + b * stride_mask_b

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
        q = tl.load(q_head + _tile_offsets(offs_i, stride_q_l, offs_d), mask=tile_mask, other=0.0)
        qu = (q.to(ACC) + u.to(ACC)[None, :]).to(q.dtype)
        do = tl.load(
            do_head + _tile_offsets(offs_i, stride_do_l, offs_d), mask=tile_mask, other=0.0
        )
        stats_offset = batch_head.to(tl.int64) * L + offs_i
        lse = tl.load(lse_ptr + stats_offset, mask=i_ok, other=float("inf"))
        delta = tl.load(delta_ptr + stats_offset, mask=i_ok, other=0.0)
        positional = _tile_positional(
            q, pe_head, pb_head, stride_pe_r, stride_pb_r, m_start, n_start, L, K, offs_d, d_ok,
            BLOCK_M, BLOCK_N, ACC, UPCAST_DOTS, PRECISION,
        )  # fmt: skip
        scores = _masked_scores(
            qu, k, positional, mask_batch, stride_mask_l, m_start, n_start, L, K, scale, causal, has_mask,
            BLOCK_M, BLOCK_N, ACC, UPCAST_DOTS, PRECISION,
        )  # fmt: skip
        probs = tl.exp(scores - lse[:, None])
        grad_probs = mma(do, tl.trans(v), ACC, UPCAST_DOTS, PRECISION)
        if DROPOUT:
            kept = _kept(seed, offset, threshold, batch_head, L, K, offs_i, offs_j)
            grad_probs = tl.where(kept, grad_probs * dropout_scale, 0.0)
            dropped_probs = tl.where(kept, probs * dropout_scale, 0.0)
        else:
            dropped_probs = probs
        dv += mma(tl.trans(dropped_probs.to(do.dtype)), do, ACC, UPCAST_DOTS, PRECISION)
        grad_scores = probs * (grad_probs - delta[:, None]) * scale
        dk += mma(tl.trans(grad_scores.to(qu.dtype)), qu, ACC, UPCAST_DOTS, PRECISION)
        grad_scores_colsum += tl.sum(grad_scores, axis=0)

    out_offset = ((offs_j[:, None] * B + b) * H + h) * d + offs_d[None, :]
    tl.store(dk_ptr + out_offset, dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out_offset, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(
        grad_u_partial_ptr + ((batch_head.to(tl.int64) * key_tile_slots + tl.program_id(1)) * d + offs_d),
        tl.sum(grad_scores_colsum[:, None] * k.to(ACC), axis=0),
        mask=d_ok,
    )


def _acc_dtype(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


class Tile(NamedTuple):
    """One launch configuration of ``_TILES``: the tile, warps, pipeline
    stages, and for the kernels that loop over keys (all but dk/dv, which
    loops over queries) whether the loop keeps band products (``SLIDE_BAND``:
    one band product a key tile instead of ``band_chunks(block_m, block_n)``,
    for a tile of registers per kept one)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    slide_band: bool = False


def _entries(tile_classes, block_d: int, **tiles_by_kernel) -> dict:
    """The same tiles for several tile classes at one BLOCK_D."""
    return {(name, tile_class, block_d): tuple(Tile(*tile) for tile in tiles)
            for tile_class in tile_classes for name, tiles in tiles_by_kernel.items()}


# The configurations the GPU launches, every one of them in AOT_SPECS, per
# arch: {arch: {(kernel, tile class, BLOCK_D): the (BLOCK_M, BLOCK_N,
# num_warps, num_stages) that ``triton.autotune`` picks from}}, keyed on (L, K)
# rounded up to powers of 2. A GPU launches its arch's table (:func:`_arch`),
# and each entry is a tile that compiles without spills on that arch
# (``python -m fastformers.gpu_report --kernel rel_attention``). Classes:
# "16bit" (bfloat16, float16), "tf32" and "ieee" (float32 at "highest"
# precision, whose products run on CUDA cores), each with ",dropout" (the
# Philox bits cost registers). A (class, BLOCK_D) runs on the kernels only
# where all four launches have an entry; the rest runs the reference with a
# reason (:func:`gpu_unsupported_reason`). "dq" and "table" are the two
# launches of the dq kernel (TABLE_GRAD off and on, :func:`_mode`); "table" is
# not autotuned (its scratch depends on the tile). Registers are those of the
# variant the launchers guarantee (``_ALIGNMENT``).
#
# float32: 16-row query tiles, 4 warps, 1 stage (32-row TF32 forwards at d
# 64); dk/dv 32x32 on 8 warps at d 64 (4 spilled). TF32 products take HMMA on
# both archs (wgmma wants 64-row tiles; the 64x32 TF32 forward with dropout
# spilled on sm_90), IEEE ones CUDA-core FMAs, which hold both operands in
# registers: IEEE stops at d 64 (at d 128 the smallest tiles, 16x32, spilled
# 250-600 B on 4 or 8 warps). TF32 at d 128: 16x32 tiles, 8 warps for the
# table and dk/dv launches (2 stages for dk/dv: 1 spilled 8 B on sm_80).
#
# The key loops keep their band products (Tile.slide_band) wherever that
# compiled without spills on both archs, and not elsewhere (8-344 B spilled):
# so not at d 128 but in sm_80's 16-bit forward and dq launches, nor the TF32
# forward with dropout, the IEEE dq launch, sm_90's 16-bit table launch with
# dropout and its 16-bit forwards with dropout but the 64x32 one at d 64.
_FLOAT32_TILES = {
    **_entries(("tf32",), 64, fwd=((32, 32, 4, 1, True),)),
    **_entries(("tf32,dropout",), 64, fwd=((32, 32, 4, 1),)),
    **_entries(("tf32", "tf32,dropout"), 64, dq=((16, 32, 4, 1, True),), table=((16, 32, 4, 1, True),),
               dkdv=((32, 32, 8, 1),)),
    **_entries(("tf32", "tf32,dropout"), 128, fwd=((16, 32, 4, 1),), dq=((16, 32, 4, 1),), table=((16, 32, 8, 1),),
               dkdv=((16, 32, 8, 2),)),
    **_entries(("ieee", "ieee,dropout"), 64, fwd=((16, 32, 4, 1, True),), dq=((16, 32, 4, 1),),
               table=((16, 32, 4, 1, True),), dkdv=((32, 32, 8, 1),)),
}
_TILES_SM80 = {
    # The 128x32 forward reads five band chunks a tile, more than it keeps.
    **_entries(("16bit", "16bit,dropout"), 64, fwd=((64, 32, 8, 2, True), (128, 32, 8, 2)),
               dq=((32, 64, 8, 1, True),), table=((32, 32, 8, 1, True),), dkdv=((32, 32, 8, 1),)),
    # d = 128: 32-row forward tiles on 8 warps (64 rows, or 4 warps, spilled),
    # 16-row dq and dk/dv tiles (32 rows spilled 8-80 B).
    **_entries(("16bit", "16bit,dropout"), 128, fwd=((32, 32, 8, 1, True),), dq=((16, 32, 4, 1, True),),
               table=((32, 32, 8, 1),), dkdv=((16, 32, 8, 1),)),
    **_FLOAT32_TILES,
}
_TILES_SM90 = {
    # wgmma (HGMMA) takes 64 rows a warpgroup. d = 64: every product of the
    # forward, dq and table launches on 64- and 128-row tiles; dk/dv on 32x64,
    # whose 64-key products (dV, dK) run on wgmma and its 32-query ones (the
    # recomputed scores) on mma.sync (64x64 spilled). The 128x32 dq tiles read
    # five band chunks a tile, more than they keep.
    **_entries(("16bit",), 64, fwd=((64, 32, 8, 2, True), (64, 64, 8, 2, True)), table=((64, 32, 8, 1, True),)),
    **_entries(("16bit,dropout",), 64, fwd=((64, 32, 8, 2, True), (64, 64, 8, 2)), table=((64, 32, 8, 1),)),
    **_entries(("16bit", "16bit,dropout"), 64, dkdv=((32, 64, 8, 1),)),
    ("dq", "16bit", 64): (Tile(64, 64, 8, 1, True), Tile(128, 32, 8, 1)),
    ("dq", "16bit,dropout", 64): (Tile(64, 32, 4, 1, True), Tile(128, 32, 8, 1)),
    # d = 128: forward and dq on wgmma (128-row dq tiles: 64-row ones spilled
    # with dropout); the table launch on 32x64, whose qᵀ·dT products (BLOCK_D
    # rows) run on wgmma; dk/dv as at d 64, 16 queries a tile with dropout.
    **_entries(("16bit",), 128, fwd=((64, 32, 8, 1, True),)),
    **_entries(("16bit,dropout",), 128, fwd=((64, 32, 8, 1),)),
    **_entries(("16bit", "16bit,dropout"), 128, dq=((128, 32, 8, 1),), table=((32, 64, 8, 1),)),
    ("dkdv", "16bit", 128): (Tile(32, 64, 8, 1),),
    ("dkdv", "16bit,dropout", 128): (Tile(16, 64, 8, 1),),
    **_FLOAT32_TILES,
    # IEEE dk/dv with dropout: 32x32 spilled 72 B on sm_90, 16x32 on 8 warps 48 B.
    ("dkdv", "ieee,dropout", 64): (Tile(16, 32, 4, 1),),
}
_TILES = {"sm80": _TILES_SM80, "sm90": _TILES_SM90}
_ARCH_NUMBERS = {"sm80": 80, "sm90": 90}
# GPU dtype -> (name in kernel labels, AOT pointer type); float32 splits by precision.
_GPU_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_VARIANTS = {"fp32": ("fp32", "ieee"), "tf32": ("fp32", "tf32"), "bf16": ("bf16", "ieee"), "fp16": ("fp16", "ieee")}
_BLOCK_DS = (64, 128)
_KERNELS = {
    "fwd": rel_attention_fwd_kernel,
    "dq": rel_attention_bwd_dq_kernel,
    "table": rel_attention_bwd_dq_kernel,
    "dkdv": rel_attention_bwd_dkdv_kernel,
}


def _kernel(kernel_name: str):
    """The kernel by its module-level name at launch time (which
    :mod:`fastformers.testing.launch_check` swaps for recorders)."""
    return globals()[_KERNELS[kernel_name].fn.__name__]
# The interpreter's tiles: small (BLOCK_N a whole mask word), so that tiny test
# shapes span several tiles; tests swap in others (e.g. BLOCK_M > BLOCK_N,
# three band chunks per tile).
INTERPRETER_TILES = {"fwd": (16, 32), "dq": (16, 32), "table": (16, 32), "dkdv": (16, 32)}
# Which launch adds dT·band to dq under the interpreter (tests run both ways).
INTERPRETER_SPLITS_DQ = True
# Whether the interpreter's forwards keep band products (where they read at most three chunks).
INTERPRETER_SLIDES_BAND = True
# Window rows per program of the positional-gradient reduction, and its launch
# options (4 warps spilled on sm_90).
_REDUCE_ROWS = 32
_REDUCE_LAUNCH = dict(num_warps=8, num_stages=1)


def _tile_class(variant: str, dropout: bool) -> str:
    """The ``_TILES`` class of a dtype variant: dropout's Philox bits need registers too."""
    return {"fp32": "ieee", "tf32": "tf32"}.get(variant, "16bit") + (",dropout" if dropout else "")


def float32_precision() -> str:
    """``input_precision`` of float32 products: TF32 when torch allows it for matmuls."""
    allowed = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return "tf32" if allowed else "ieee"


def _variant(dtype: torch.dtype) -> str:
    name = _GPU_DTYPES[dtype]
    return "tf32" if name == "fp32" and float32_precision() == "tf32" else name


def _variant_splits_dq(variant: str) -> bool:
    """Whether the table launch, not the dq one, adds dT·band to the query
    gradient (which then goes through a float32 scratch): so on tensor cores,
    where the dq launch with both parts needed more registers than a thread
    has at wgmma's 64-row tiles. Not for IEEE float32, whose products on CUDA
    cores hold their operands in registers: there the table launch has no room
    for dq, and the dq launch has room for the band."""
    return variant != "fp32"


def _mode(kernel_name: str, splits_dq: bool) -> tuple:
    """``(constexprs, AOT label suffix)`` of a launch: the dq kernel's two
    launches differ in ``TABLE_GRAD`` and in which adds dT·band (``DQ_BAND``)."""
    if kernel_name == "dq":
        return dict(TABLE_GRAD=False, DQ_BAND=not splits_dq), "" if splits_dq else ",dq-band"
    if kernel_name == "table":
        return dict(TABLE_GRAD=True, DQ_BAND=splits_dq), ",table" + (",dq-band" if splits_dq else "")
    return {}, ""


def _splits_dq(query: torch.Tensor) -> bool:
    if interpreter_enabled():
        return INTERPRETER_SPLITS_DQ
    return _variant_splits_dq(_variant(query.dtype))


def _arch(device: Optional[torch.device]) -> str:
    """The ``_TILES`` table a GPU launches: sm_90's on compute capability 9.x,
    sm_80's on every other (and where no GPU says, e.g. meta tensors)."""
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability(device)
        return "sm90" if major == 9 else "sm80"
    return "sm80"


def _block_ds(arch: str, tile_class: str) -> list:
    """The BLOCK_Ds at which all four launches of ``tile_class`` have tiles on ``arch``."""
    return [
        block_d for block_d in _BLOCK_DS
        if all((name, tile_class, block_d) in _TILES[arch] for name in _KERNELS)
    ]  # fmt: skip


def gpu_unsupported_reason(dtype: torch.dtype, head_dim: int, dropout: bool = False,
                           device: Optional[torch.device] = None) -> Optional[str]:
    """Why no checked GPU configuration takes queries of ``dtype`` with head dim
    ``head_dim`` (with attention dropout if ``dropout``) on ``device`` (a CUDA
    device; None: the current one), and what to change (None if one does)."""
    if dtype not in _GPU_DTYPES:
        return (
            f"the Triton rel_attention kernels run float32, bfloat16 and float16 on GPUs, got {dtype}: use one of "
            "those (or torch.autocast('cuda'))"
        )
    arch = _arch(device)
    variant = _variant(dtype)
    widths = _block_ds(arch, _tile_class(variant, dropout))
    what = (
        f"{dtype}" + {"fp32": " at 'highest' matmul precision", "tf32": " as TF32"}.get(variant, "")
        + (" with dropout" if dropout else "") + f" on {arch}"
    )  # fmt: skip
    if not widths:
        return (
            f"the Triton rel_attention kernels have no checked GPU configuration for {what} (every tile tried "
            "spilled registers): use torch.autocast('cuda', dtype=torch.bfloat16)"
        )
    if head_dim > max(widths):
        return (
            f"the Triton rel_attention kernels take head dim d <= {max(widths)} for {what}, got d={head_dim}: use "
            "more heads" + ("" if variant in ("bf16", "fp16") else " or torch.autocast('cuda', dtype=torch.bfloat16)")
        )
    return None


def _gpu_block_d(arch: str, tile_class: str, head_dim: int) -> int:
    return next(block_d for block_d in _block_ds(arch, tile_class) if head_dim <= block_d)


def _tile_constexprs(kernel_name: str, tile: Tile) -> dict:
    """The constexprs a tile sets: its sides, and for the key loops (all but dk/dv's) SLIDE_BAND."""
    sides = dict(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n)
    return sides if kernel_name == "dkdv" else {**sides, "SLIDE_BAND": tile.slide_band}


def _config(kernel_name: str, tile: Tile, block_d: int) -> dict:
    return dict(**_tile_constexprs(kernel_name, tile), BLOCK_D=block_d, num_warps=tile.num_warps,
                num_stages=tile.num_stages)


def _gpu_tiles(kernel_name: str, query: torch.Tensor, dropout: bool) -> tuple:
    """``(the _TILES entry, BLOCK_D)`` the GPU of ``query`` launches ``kernel_name`` with."""
    reason = gpu_unsupported_reason(query.dtype, query.shape[-1], dropout, query.device)
    if reason is not None:
        raise (TypeError if query.dtype not in _GPU_DTYPES else ValueError)(reason + " (or backend='reference')")
    arch, tile_class = _arch(query.device), _tile_class(_variant(query.dtype), dropout)
    block_d = _gpu_block_d(arch, tile_class, query.shape[-1])
    return _TILES[arch][kernel_name, tile_class, block_d], block_d


_AUTOTUNED = {}


def _autotuned(kernel_name: str, arch: str, variant: str, block_d: int, dropout: bool):
    """The kernel autotuned over its ``_TILES`` entry (one autotuner, and cache, per entry)."""
    key = (kernel_name, arch, variant, block_d, dropout)
    if key not in _AUTOTUNED:
        configs = [
            triton.Config(_tile_constexprs(kernel_name, tile), num_warps=tile.num_warps, num_stages=tile.num_stages)
            for tile in _TILES[arch][kernel_name, _tile_class(variant, dropout), block_d]
        ]
        _AUTOTUNED[key] = triton.autotune(configs=configs, key=["L_bucket", "K_bucket"])(_KERNELS[kernel_name])
    return _AUTOTUNED[key]


def _launch(kernel_name: str, query: torch.Tensor, grid, *args, **constexprs):
    """Launch ``kernel_name``: on a GPU autotuned over its ``_TILES`` entry, under
    the interpreter with :data:`INTERPRETER_TILES`. ``grid`` maps the chosen
    constexprs to the grid."""
    arg_names = _KERNELS[kernel_name].arg_names
    L, K = args[arg_names.index("L")], args[arg_names.index("K")]
    buckets = dict(L_bucket=max(16, triton.next_power_of_2(L)), K_bucket=max(16, triton.next_power_of_2(K)))
    acc_tl, _ = _acc_dtype(query.dtype)
    options = dict(ACC=acc_tl, PRECISION="ieee" if query.dtype != torch.float32 else float32_precision(), **constexprs,
                   **_mode(kernel_name, _splits_dq(query))[0])
    if interpreter_enabled():
        block_m, block_n = INTERPRETER_TILES[kernel_name]
        slide_band = INTERPRETER_SLIDES_BAND and band_chunks(block_m, block_n) <= 3
        options.update(
            **_tile_constexprs(kernel_name, Tile(block_m, block_n, 0, 0, slide_band)),
            BLOCK_D=max(16, triton.next_power_of_2(query.shape[-1])),
            UPCAST_DOTS=query.dtype in (torch.bfloat16, torch.float16),
        )  # fmt: skip
        _kernel(kernel_name)[grid(options)](*args, **buckets, **options)
        return
    dropout = constexprs["DROPOUT"]
    tiles, block_d = _gpu_tiles(kernel_name, query, dropout)
    options.update(UPCAST_DOTS=False)
    # Autotuning times launches, which needs a GPU; elsewhere (meta tensors of
    # the launch check) the first tile stands for them all.
    if len(tiles) == 1 or not query.is_cuda:
        config = _config(kernel_name, tiles[0], block_d)
        _kernel(kernel_name)[grid(config)](*args, **buckets, **options, **config)
        return
    _autotuned(kernel_name, _arch(query.device), _variant(query.dtype), block_d, dropout)[grid](
        *args, **buckets, **options, BLOCK_D=block_d
    )


def _tile_shape(kernel_name: str, query: torch.Tensor, dropout: bool) -> tuple:
    """(BLOCK_M, BLOCK_N) of a kernel that is not autotuned, as :func:`_launch` launches it."""
    if interpreter_enabled():
        return INTERPRETER_TILES[kernel_name]
    tiles, _ = _gpu_tiles(kernel_name, query, dropout)
    (tile,) = tiles
    return tile.block_m, tile.block_n


def _min_block_n(kernel_name: str, query: torch.Tensor, dropout: bool) -> int:
    if interpreter_enabled():
        return INTERPRETER_TILES[kernel_name][1]
    tiles, _ = _gpu_tiles(kernel_name, query, dropout)
    return min(tile.block_n for tile in tiles)


def _mask_args(mask: Optional[torch.Tensor], device) -> tuple:
    """``(mask bits, (batch, query) strides, has_mask)`` for the kernels: the
    bool ``[L or 1, K, B or 1]`` mask as ``[B or 1, L or 1, cdiv(K, 32)]`` int32
    words (bit ``j % 32`` of word ``j // 32`` says whether key ``j`` is
    visible), broadcast dimensions with stride 0; a one-word stand-in without a mask."""
    if mask is None:
        return torch.full((1,), -1, dtype=torch.int32, device=device), (0, 0), 0
    K = mask.shape[1]
    padded = torch.nn.functional.pad(mask.permute(2, 0, 1), (0, -K % 32))
    weights = torch.ones((), dtype=torch.int64, device=device) << torch.arange(32, device=device)
    words = (padded.unflatten(-1, (-1, 32)).to(torch.int64) * weights).sum(-1)
    # Bit 31 set is a negative int32: keep the low 32 bits.
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()
    strides = tuple(0 if words.shape[dim] == 1 else words.stride(dim) for dim in (0, 1))
    return words, strides, 1


def _dropout_args(dropout_p: float, seed: int, offset: int) -> tuple:
    """The kernels' runtime dropout arguments and their ``DROPOUT`` constexpr."""
    active = dropout_p > 0
    scale = 1.0 / (1.0 - dropout_p) if active else 1.0
    return (int(seed), int(offset), dropout_naive.threshold(dropout_p), scale), dict(DROPOUT=active)


# Triton compiles what it can prove about a launch's integers and pointers into
# the kernel: 16-divisible sizes and strides, 16-byte aligned pointers, unit
# strides. The kernels take every ``[..., d]`` tensor with a unit stride along d,
# d a multiple of 16 and its other strides multiples of 16 (:func:`_kernel_layout`
# makes it so), which lets loads and stores move 16 bytes at a time; AOT_SPECS
# compiles that variant (``AotSpec.divisible``), so its register counts are the
# ones a GPU gets.
_ALIGNMENT = 16
# Integer arguments the launchers make 16-divisible: the strides of the [..., d]
# tensors and d itself.
_DIVISIBLE_ARGS = tuple(
    f"stride_{tensor}_{dim}" for tensor, dims in (("q", "lbh"), ("k", "lbh"), ("v", "lbh"), ("o", "lbh"),
                                                  ("do", "lbh"), ("pe", "rh"), ("u", "h")) for dim in dims
) + ("d",)


def _kernel_layout(tensor: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``tensor [..., d]`` as the kernels take it (see ``_ALIGNMENT``): d padded
    with zeros to ``head_dim`` (zeros add nothing to any product), unit stride
    along it, every other stride a multiple of 16 elements and a 16-byte aligned
    start; ``tensor`` itself when it already is, else a copy."""
    if tensor.shape[-1] != head_dim:
        return torch.nn.functional.pad(tensor, (0, head_dim - tensor.shape[-1]))
    aligned = (
        tensor.stride(-1) == 1 and all(stride % _ALIGNMENT == 0 for stride in tensor.stride()[:-1])
        and tensor.data_ptr() % _ALIGNMENT == 0
    )  # fmt: skip
    return tensor if aligned else tensor.clone(memory_format=torch.contiguous_format)


def _kernel_head_dim(head_dim: int) -> int:
    return triton.cdiv(head_dim, _ALIGNMENT) * _ALIGNMENT


def _row_strides(tensor: torch.Tensor) -> tuple:
    """Strides of every dimension but the unit-stride last one."""
    return tensor.stride()[:-1]


def rel_attention_forward(query, key, value, pos_emb, pos_bias, query_pos_bias, scale: float, causal: bool,
                          dropout_p: float = 0.0, seed: int = 0, offset: int = 0, mask: Optional[torch.Tensor] = None):
    """Forward of relative-position attention.

    query ``[L, B, H, d]``, key and value ``[K, B, H, d]`` (``K = M + L``),
    pos_emb ``[K + L - 1, H, d]``, pos_bias ``[K + L - 1, H]``, query_pos_bias
    ``[H, d]``; any strides. ``dropout_p``, ``seed``, ``offset``: attention
    dropout (mask layout ``[B, H, L, K]``). ``mask``: bool ``[L or 1, K, B or
    1]`` (True = visible) besides ``causal``, or None. Returns ``out [L, B, H,
    d]`` (query's dtype) and the row log-sum-exp ``lse [B, H, L]`` (float32,
    float64 for float64 inputs) of the undropped scores.
    """
    L, B, H, head_dim = query.shape
    K = key.shape[0]
    d = _kernel_head_dim(head_dim)
    query, key, value, pos_emb, query_pos_bias = (
        _kernel_layout(tensor, d) for tensor in (query, key, value, pos_emb, query_pos_bias)
    )
    _, acc_torch = _acc_dtype(query.dtype)
    out = query.new_empty((L, B, H, d))
    lse = torch.empty((B, H, L), dtype=acc_torch, device=query.device)
    mask_bytes, mask_strides, has_mask = _mask_args(mask, query.device)
    dropout_args, dropout_flag = _dropout_args(dropout_p, seed, offset)
    _launch(
        "fwd", query, lambda meta: (B * H, triton.cdiv(L, meta["BLOCK_M"])),
        query, key, value, pos_emb, pos_bias, query_pos_bias, mask_bytes, out, lse,
        *_row_strides(query), *_row_strides(key), *_row_strides(value), *_row_strides(pos_emb), *pos_bias.stride(),
        *_row_strides(query_pos_bias), *mask_strides, *_row_strides(out),
        L, K, H, d, float(scale), int(causal), has_mask, *dropout_args,
        **dropout_flag,
    )  # fmt: skip
    return _unpadded(out, head_dim), lse


def _unpadded(tensor: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``tensor`` without the zero padding :func:`_kernel_layout` added to its last dimension."""
    return tensor if tensor.shape[-1] == head_dim else tensor[..., :head_dim].contiguous()


def rel_attention_backward(
    grad_out, query, key, value, pos_emb, pos_bias, query_pos_bias, out, lse, scale: float, causal: bool,
    dropout_p: float = 0.0, seed: int = 0, offset: int = 0, mask: Optional[torch.Tensor] = None,
):
    """Gradients of :func:`rel_attention_forward` from ``grad_out [L, B, H, d]``.

    Returns grad_query ``[L, B, H, d]``, grad_key and grad_value ``[K, B, H, d]``,
    grad_pos_emb ``[K + L - 1, H, d]``, grad_pos_bias ``[K + L - 1, H]`` and
    grad_query_pos_bias ``[H, d]``, all summed in a fixed order: identical
    calls give bit-identical gradients. The positional gradients go through a
    scratch of ``B·H·cdiv(L, BLOCK_M)·(K + 2·BLOCK_N)·d`` accumulation-dtype
    elements (each query tile's partial sums over its window rows), and (when
    the table launch adds dT·band, :func:`_variant_splits_dq`) the query
    gradient through one of ``L·B·H·d``.
    """
    L, B, H, head_dim = query.shape
    K = key.shape[0]
    W = K + L - 1
    d = _kernel_head_dim(head_dim)
    grad_out, query, key, value, pos_emb, query_pos_bias, out = (
        _kernel_layout(tensor, d) for tensor in (grad_out, query, key, value, pos_emb, query_pos_bias, out)
    )
    _, acc_torch = _acc_dtype(query.dtype)
    device = query.device
    mask_bytes, mask_strides, has_mask = _mask_args(mask, device)
    dropout_args, dropout_flag = _dropout_args(dropout_p, seed, offset)
    common = (L, K, B, H, d)
    runtime = (float(scale), int(causal), has_mask, *dropout_args)
    input_strides = (
        *_row_strides(query), *_row_strides(key), *_row_strides(value), *_row_strides(pos_emb), *pos_bias.stride(),
        *_row_strides(query_pos_bias), *mask_strides,
    )  # fmt: skip

    grad_query = query.new_empty((L, B, H, d))
    # dS·K of the dq launch, when the table launch adds dT·band to it.
    content_shape = (L, B, H, d) if _splits_dq(query) else (1,)
    grad_query_content = torch.empty(content_shape, dtype=acc_torch, device=device)
    delta = torch.empty((B, H, L), dtype=acc_torch, device=device)
    dq_block_m, dq_block_n = _tile_shape("table", query, dropout_flag["DROPOUT"])
    n_query_tiles = triton.cdiv(L, dq_block_m)
    n_chunks = band_chunks(dq_block_m, dq_block_n)
    slab_rows = (triton.cdiv(K, dq_block_n) + n_chunks - 1) * dq_block_n
    slab_pe = torch.empty((B, H, n_query_tiles, n_chunks, slab_rows, d), dtype=acc_torch, device=device)
    slab_pb = torch.empty((B, H, n_query_tiles, n_chunks, slab_rows), dtype=acc_torch, device=device)
    # The same loop twice: one launch with dS·K and delta, one with the
    # table's partial sums; one of them adds dT·band (_variant_splits_dq). All
    # in one launch needed more registers than a thread has.
    for kernel_name in ("dq", "table"):
        _launch(
            kernel_name, query, lambda meta: (B * H, triton.cdiv(L, meta["BLOCK_M"])),
            query, key, value, pos_emb, pos_bias, query_pos_bias, mask_bytes, out, grad_out, lse, delta,
            grad_query_content, grad_query, slab_pe, slab_pb, *input_strides, *_row_strides(out),
            *_row_strides(grad_out), *common, slab_rows, *runtime,
            **dropout_flag,
        )  # fmt: skip

    grad_pos_emb = torch.empty((W, H, d), dtype=acc_torch, device=device)
    grad_pos_bias = torch.empty((W, H), dtype=acc_torch, device=device)
    rel_attention_pos_grad_reduce_kernel[(triton.cdiv(W, _REDUCE_ROWS), H)](
        slab_pe, slab_pb, grad_pos_emb, grad_pos_bias, L, B, H, d, W, n_query_tiles, slab_rows,
        QUERY_TILE=dq_block_m, KEY_TILE=dq_block_n, BLOCK_W=_REDUCE_ROWS, BLOCK_D=_reduce_block_d(query, dropout_flag["DROPOUT"]), **_REDUCE_LAUNCH,
    )  # fmt: skip

    grad_key = key.new_empty((K, B, H, d))
    grad_value = value.new_empty((K, B, H, d))
    key_tile_slots = triton.cdiv(K, _min_block_n("dkdv", query, dropout_flag["DROPOUT"]))
    # Zeroed: a wider autotuned key tile fills fewer slots than there are.
    grad_u_partial = torch.zeros((B, H, key_tile_slots, d), dtype=acc_torch, device=device)
    _launch(
        "dkdv", query, lambda meta: (B * H, triton.cdiv(K, meta["BLOCK_N"])),
        query, key, value, pos_emb, pos_bias, query_pos_bias, mask_bytes, grad_out, lse, delta,
        grad_key, grad_value, grad_u_partial, *input_strides, *_row_strides(grad_out),
        *common, key_tile_slots, *runtime,
        **dropout_flag,
    )  # fmt: skip
    grad_query_pos_bias = grad_u_partial.sum(dim=(0, 2))
    return (
        _unpadded(grad_query, head_dim),
        _unpadded(grad_key, head_dim),
        _unpadded(grad_value, head_dim),
        _unpadded(grad_pos_emb, head_dim).to(pos_emb.dtype),
        grad_pos_bias.to(pos_bias.dtype),
        _unpadded(grad_query_pos_bias, head_dim).to(query_pos_bias.dtype),
    )


def _reduce_block_d(query: torch.Tensor, dropout: bool) -> int:
    """BLOCK_D of the reduction: the table launch's."""
    if interpreter_enabled():
        return max(16, triton.next_power_of_2(query.shape[-1]))
    _, block_d = _gpu_tiles("table", query, dropout)
    return block_d


_POINTERS = {
    rel_attention_fwd_kernel: ("q", "k", "v", "pe", "pb", "u", ("mask", "i32"), "out", ("lse", "acc")),
    rel_attention_bwd_dq_kernel: (
        "q", "k", "v", "pe", "pb", "u", ("mask", "i32"), "out", "do", ("lse", "acc"), ("delta", "acc"),
        ("dq_content", "acc"), "dq", ("slab_pe", "acc"), ("slab_pb", "acc"),
    ),
    rel_attention_bwd_dkdv_kernel: (
        "q", "k", "v", "pe", "pb", "u", ("mask", "i32"), "do", ("lse", "acc"), ("delta", "acc"), "dk", "dv",
        ("grad_u_partial", "acc"),
    ),
    rel_attention_pos_grad_reduce_kernel: (
        ("slab_pe", "acc"), ("slab_pb", "acc"), ("grad_pe", "acc"), ("grad_pb", "acc"),
    ),
}  # fmt: skip
_CONSTEXPRS = (
    "BLOCK_M", "BLOCK_N", "BLOCK_D", "ACC", "UPCAST_DOTS", "PRECISION", "DROPOUT", "SLIDE_BAND", "TABLE_GRAD", "DQ_BAND",
    "QUERY_TILE", "KEY_TILE", "BLOCK_W",
)  # fmt: skip
_FLOAT_SCALARS = ("scale", "dropout_scale")
_INT64_SCALARS = ("seed", "offset", "threshold")


def _signature(kernel, dtype: str) -> dict:
    pointer_types = {}
    for entry in _POINTERS[kernel]:
        name, kind = entry if isinstance(entry, tuple) else (entry, "input")
        pointer_types[f"{name}_ptr"] = "*" + {"acc": "fp32", "i32": "i32", "input": dtype}[kind]
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
    """Every configuration a GPU launches, for the arch it launches on: each
    kernel at each tile of its ``_TILES`` entry for every dtype variant, in
    each of its modes, without and with dropout (``causal`` and ``has_mask``
    are runtime arguments, so one compilation serves causal, full and
    explicitly masked attention), and the reduction for each table tile."""
    specs = []
    for arch, tiles_of in _TILES.items():
        on_arch = dict(archs=(_ARCH_NUMBERS[arch],))
        for variant, (dtype, precision) in _VARIANTS.items():
            for block_d, (name, kernel), dropout in itertools.product(_BLOCK_DS, _KERNELS.items(), (False, True)):
                for tile in tiles_of.get((name, _tile_class(variant, dropout), block_d), ()):
                    config = _config(name, tile, block_d)
                    launch = {key: config.pop(key) for key in ("num_warps", "num_stages")}
                    mode, mode_label = _mode(name, _variant_splits_dq(variant))
                    constexprs = dict(ACC=tl.float32, UPCAST_DOTS=False, PRECISION=precision, DROPOUT=dropout,
                                      **mode, **config)
                    label = _aot_label(arch, variant, block_d, tile, mode_label, dropout)
                    specs.append(AotSpec(kernel, _signature(kernel, dtype), constexprs, label=label, **launch,
                                         divisible=_DIVISIBLE_ARGS, **on_arch))
        kernel = rel_attention_pos_grad_reduce_kernel
        table_tiles = {(block_d, m, n) for (name, _, block_d), tiles in tiles_of.items() if name == "table"
                       for m, n, *_ in tiles}
        for block_d, query_tile, key_tile in sorted(table_tiles):
            constexprs = dict(QUERY_TILE=query_tile, KEY_TILE=key_tile, BLOCK_W=_REDUCE_ROWS, BLOCK_D=block_d)
            label = f"{arch},d{block_d},m{query_tile}n{key_tile}"
            specs.append(AotSpec(kernel, _signature(kernel, "fp32"), constexprs, label=label, **_REDUCE_LAUNCH,
                                 divisible=("d",), **on_arch))
    return specs


def _aot_label(arch: str, variant: str, block_d: int, tile: tuple, mode_label: str, dropout: bool) -> str:
    """The AOT spec label of a launch configuration (tests find a launch's spec by it)."""
    return (f"{arch},{variant},d{block_d},m{tile.block_m}n{tile.block_n}{mode_label}" + (",dropout" if dropout else "")
            + (",slide" if tile.slide_band else ""))


AOT_SPECS = _aot_specs()
