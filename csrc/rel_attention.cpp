// CPU kernels of Transformer-XL relative-position attention and its backward.
// Schemas live in fastformers/ops/xl/op.py; the math is in fastformers/ops/xl/naive.py:
//
//   s[i, j] = scale * ((q_i + u) . k_j + q_i . R[r] + S[r]),   r = L - 1 - i + j
//   out_i   = sum_j softmax_j(s[i, :]) v_j,                     lse_i = logsumexp_j s[i, j]
//
// query [L, B, H, d], key/value [K, B, H, d] (K = M + L, memory first), the
// position window R = pos_emb [K + L - 1, H, d], S = pos_bias [K + L - 1, H],
// u = query_pos_bias [H, d]. Work is split per (batch, head) and per tile of
// kQueryTile queries. A tile's positional term is one GEMM of the query tile
// against the band of window rows it touches (BM + kv - 1 rows), from which each
// score picks its skewed diagonal by index arithmetic: the padded / shifted
// [L, K, B, H] tensors of the reference never exist. Under causal masking a
// tile only visits the keys its last query can see (kv = M + i0 + BM), so fully
// masked key blocks cost nothing. The tile's whole visible key row (BM x kv
// scores) stays in a per-thread scratch buffer, so the softmax is exact in two
// passes rather than flash-style rescaling: on a CPU this keeps every dense
// product one large BLAS call. Backward recomputes probabilities from the saved
// log-sum-exp.
//
// Attention dropout: probability (b, h, i, j) is kept iff Philox element
// n = ((b·H + h)·L + i)·K + j of (seed, offset) says so (philox.h). Each kernel
// draws the bits of one query row at a time, only for its causally visible
// keys, inside its parallel loop; backward draws the same bits again.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "cpu_utils.h"
#include "philox.h"

namespace fastformers {
namespace {

constexpr int64_t kQueryTile = 64;

using cpu::exp_of;
using cpu::gemm;

// One (batch, head) slice of a [N, B, H, d] tensor with unit stride along d.
template <typename T>
struct Slices {
  T* data;
  int64_t row, batch, head;  // strides
  T* at(int64_t b, int64_t h) const { return data + b * batch + h * head; }
};

template <typename T>
Slices<T> slices(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename T>
struct Problem {
  int64_t L, K, M, B, H, d, W;
  T scale;
  bool causal;
  Slices<const T> q, k, v;
  const T* pos_emb;  // [W, H, d]
  int64_t pe_row, pe_head;
  const T* pos_bias;  // [W, H]
  int64_t pb_row, pb_head;
  const T* u;  // [H, d]
  int64_t u_head;
  const bool* mask;  // [L, K, B] (broadcast strides) or nullptr
  int64_t mask_i, mask_j, mask_b;
  philox::Dropout dropout;

  // Keys query i sees causally: the only ones that get keep bits.
  int64_t causal_keys(int64_t i) const { return causal ? std::min(K, M + i + 1) : K; }
  // Keep bits of query i's first `len` keys in (b, h).
  void keep_bits(int64_t b, int64_t h, int64_t i, int64_t len, uint8_t* keep) const {
    philox::keep_bits(dropout, ((b * H + h) * L + i) * K, len, keep);
  }

  // Keys a tile of queries [i0, i0 + rows) can see: the causal limit of its last query.
  int64_t visible_keys(int64_t i0, int64_t rows) const { return causal ? std::min(K, M + i0 + rows) : K; }
};

// bias[r] = pos_bias[r, h]: one contiguous column per head so the score loop reads it with unit stride.
template <typename T>
void bias_column(const Problem<T>& p, int64_t h, T* bias) {
  for (int64_t r = 0; r < p.W; ++r) bias[r] = p.pos_bias[r * p.pb_row + h * p.pb_head];
}

// scores[ii, j] += band[ii, rows - 1 - ii + j] + bias[band_start + rows - 1 - ii + j], times scale,
// then -inf where masked; for one query row.
template <typename T>
FASTFORMERS_VECTOR_CLONES void combine_row(T* __restrict__ scores, const T* __restrict__ band,
                                           const T* __restrict__ bias, int64_t kv, int64_t last_visible, T scale) {
  const int64_t visible = std::min(kv, last_visible + 1);
  for (int64_t j = 0; j < visible; ++j) scores[j] = scale * (scores[j] + band[j] + bias[j]);
  for (int64_t j = visible; j < kv; ++j) scores[j] = -std::numeric_limits<T>::infinity();
}

// Unnormalised probabilities in place, exp(s - max); returns (max, sum).
template <typename T>
FASTFORMERS_VECTOR_CLONES void softmax_row(T* __restrict__ scores, int64_t kv, T* max_out, T* sum_out) {
  T max = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < kv; ++j) max = std::max(max, scores[j]);
  T sum = 0;
  for (int64_t j = 0; j < kv; ++j) {
    const T e = exp_of(scores[j] - max);
    scores[j] = e;
    sum += e;
  }
  *max_out = max;
  *sum_out = sum;
}

// scores[j] <- scale * exp(s[j] - lse) * (dprob[j] - delta): the gradient of the pre-scale scores.
template <typename T>
FASTFORMERS_VECTOR_CLONES void grad_scores_row(T* __restrict__ scores, T* __restrict__ dprob, int64_t kv, T lse,
                                               T delta, T scale) {
  for (int64_t j = 0; j < kv; ++j) {
    const T prob = exp_of(scores[j] - lse);
    scores[j] = prob;
    dprob[j] = scale * prob * (dprob[j] - delta);
  }
}

// row[j] *= keep[j] / (1 - p): the dropped probabilities the output is made of.
template <typename T>
FASTFORMERS_VECTOR_CLONES void drop_row(T* __restrict__ row, const uint8_t* __restrict__ keep, int64_t len,
                                        T dropout_scale) {
  for (int64_t j = 0; j < len; ++j) row[j] *= static_cast<T>(keep[j]) * dropout_scale;
}

// grad_scores_row with dropout multiplier z = keep / (1 - p): scores[j] <- P z (for dV),
// dprob[j] <- scale * P * (z * dprob[j] - delta).
template <typename T>
FASTFORMERS_VECTOR_CLONES void grad_scores_row_dropout(T* __restrict__ scores, T* __restrict__ dprob,
                                                       const uint8_t* __restrict__ keep, int64_t kv, T lse, T delta,
                                                       T scale, T dropout_scale) {
  for (int64_t j = 0; j < kv; ++j) {
    const T prob = exp_of(scores[j] - lse);
    const T z = static_cast<T>(keep[j]) * dropout_scale;
    scores[j] = prob * z;
    dprob[j] = scale * prob * (z * dprob[j] - delta);
  }
}

// Scores of queries [i0, i0 + rows) of (b, h) against keys [0, kv): scaled, masked, into
// scores [rows, kv]. qu [rows, d] receives q + u; band [rows, kv + rows - 1] the positional GEMM.
template <typename T>
void tile_scores(const Problem<T>& p, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t kv, const T* bias,
                 T* qu, T* band, T* scores) {
  const int64_t d = p.d;
  const T* q = p.q.at(b, h) + i0 * p.q.row;
  const T* u = p.u + h * p.u_head;
  for (int64_t ii = 0; ii < rows; ++ii)
    for (int64_t c = 0; c < d; ++c) qu[ii * d + c] = q[ii * p.q.row + c] + u[c];
  gemm<T>(false, true, rows, kv, d, T(1), qu, d, p.k.at(b, h), p.k.row, T(0), scores, kv);
  // Row r = L - 1 - i + j: the tile spans rows band_start .. band_start + kv + rows - 2.
  const int64_t band_start = p.L - i0 - rows;
  const int64_t width = kv + rows - 1;
  gemm<T>(false, true, rows, width, d, T(1), q, p.q.row, p.pos_emb + band_start * p.pe_row + h * p.pe_head, p.pe_row,
          T(0), band, width);
  for (int64_t ii = 0; ii < rows; ++ii) {
    const int64_t offset = rows - 1 - ii;
    const int64_t last_visible = p.causal ? p.M + i0 + ii : p.K - 1;
    T* row = scores + ii * kv;
    combine_row(row, band + ii * width + offset, bias + band_start + offset, kv, last_visible, p.scale);
    if (p.mask != nullptr) {
      const bool* mask = p.mask + (i0 + ii) * p.mask_i + b * p.mask_b;
      for (int64_t j = 0; j < kv; ++j)
        if (!mask[j * p.mask_j]) row[j] = -std::numeric_limits<T>::infinity();
    }
  }
}

template <typename T>
void forward_kernel(const Problem<T>& p, T* out, int64_t out_row, int64_t out_batch, int64_t out_head, T* lse) {
  const int64_t tile = std::min(kQueryTile, p.L);
  at::parallel_for(0, p.B * p.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> qu(tile * p.d), band(tile * (p.K + tile)), scores(tile * p.K), bias(p.W), inv_sum(tile);
    std::vector<uint8_t> keep(p.dropout.active() ? p.K : 0);
    const T dropout_scale = static_cast<T>(p.dropout.scale());
    int64_t bias_head = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.H, h = task % p.H;
      if (h != bias_head) {
        bias_column(p, h, bias.data());
        bias_head = h;
      }
      T* out_bh = out + b * out_batch + h * out_head;
      T* lse_bh = lse + (b * p.H + h) * p.L;
      for (int64_t i0 = 0; i0 < p.L; i0 += tile) {
        const int64_t rows = std::min(tile, p.L - i0);
        const int64_t kv = p.visible_keys(i0, rows);
        tile_scores(p, b, h, i0, rows, kv, bias.data(), qu.data(), band.data(), scores.data());
        for (int64_t ii = 0; ii < rows; ++ii) {
          T max, sum;
          T* row = scores.data() + ii * kv;
          softmax_row(row, kv, &max, &sum);
          lse_bh[i0 + ii] = max + std::log(sum);
          inv_sum[ii] = T(1) / sum;
          if (p.dropout.active()) {
            // Keys past the causal limit already hold exp(-inf) = 0.
            const int64_t visible = std::min(kv, p.causal_keys(i0 + ii));
            p.keep_bits(b, h, i0 + ii, visible, keep.data());
            drop_row(row, keep.data(), visible, dropout_scale);
          }
        }
        T* out_tile = out_bh + i0 * out_row;
        gemm<T>(false, false, rows, p.d, kv, T(1), scores.data(), kv, p.v.at(b, h), p.v.row, T(0), out_tile, out_row);
        for (int64_t ii = 0; ii < rows; ++ii)
          for (int64_t c = 0; c < p.d; ++c) out_tile[ii * out_row + c] *= inv_sum[ii];
      }
    }
  });
}

template <typename T>
struct Grads {
  Slices<T> q, k, v;  // contiguous [N, B, H, d]
  T* pos_emb;         // [W, H, d]
  T* pos_bias;        // [W, H]
  T* u;               // [H, d]
};

// Parallel over heads, batches in order inside: the window and query_pos_bias
// gradients are sums over the batch, so each head's sums have one owner (no
// atomics, and results independent of the thread count).
template <typename T>
void backward_kernel(const Problem<T>& p, Slices<const T> grad_out, Slices<const T> out, const T* lse,
                     const Grads<T>& g) {
  const int64_t tile = std::min(kQueryTile, p.L);
  const int64_t d = p.d;
  at::parallel_for(0, p.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> qu(tile * d), band(tile * (p.K + tile)), scores(tile * p.K), dprob(tile * p.K),
        dband(tile * (p.K + tile)), bias(p.W), grad_bias(p.W), grad_u(d), delta(tile);
    std::vector<uint8_t> keep(p.dropout.active() ? p.K : 0);
    const T dropout_scale = static_cast<T>(p.dropout.scale());
    for (int64_t h = begin; h < end; ++h) {
      bias_column(p, h, bias.data());
      std::fill(grad_bias.begin(), grad_bias.end(), T(0));
      std::fill(grad_u.begin(), grad_u.end(), T(0));
      const T* pos_emb_h = p.pos_emb + h * p.pe_head;
      T* grad_pos_emb_h = g.pos_emb + h * d;
      const int64_t grad_pe_row = p.H * d;
      for (int64_t b = 0; b < p.B; ++b) {
        const T* lse_bh = lse + (b * p.H + h) * p.L;
        const T* q_bh = p.q.at(b, h);
        const T* k_bh = p.k.at(b, h);
        const T* v_bh = p.v.at(b, h);
        T* gq_bh = g.q.at(b, h);
        T* gk_bh = g.k.at(b, h);
        T* gv_bh = g.v.at(b, h);
        // dK and dV arrive uninitialised (a zero-fill would be one more pass over
        // [K, B, H, d] twice, page-faulting memory the GEMMs then write again): the
        // first tile overwrites its keys, later tiles zero only the keys they add.
        int64_t keys_written = 0;
        for (int64_t i0 = 0; i0 < p.L; i0 += tile) {
          const int64_t rows = std::min(tile, p.L - i0);
          const int64_t kv = p.visible_keys(i0, rows);
          const int64_t band_start = p.L - i0 - rows;
          const int64_t width = kv + rows - 1;
          tile_scores(p, b, h, i0, rows, kv, bias.data(), qu.data(), band.data(), scores.data());
          const T* go = grad_out.at(b, h) + i0 * grad_out.row;
          const T* o = out.at(b, h) + i0 * out.row;
          for (int64_t ii = 0; ii < rows; ++ii) {
            T dot = 0;
            for (int64_t c = 0; c < d; ++c) dot += go[ii * grad_out.row + c] * o[ii * out.row + c];
            delta[ii] = dot;
          }
          // dprob = dO V^T, then the probabilities and dS = scale * P * (dprob - delta)
          // (with dropout, P * (z * dprob - delta)).
          gemm<T>(false, true, rows, kv, d, T(1), go, grad_out.row, v_bh, p.v.row, T(0), dprob.data(), kv);
          for (int64_t ii = 0; ii < rows; ++ii) {
            T* row = scores.data() + ii * kv;
            T* grad_row = dprob.data() + ii * kv;
            if (p.dropout.active()) {
              const int64_t visible = std::min(kv, p.causal_keys(i0 + ii));
              p.keep_bits(b, h, i0 + ii, visible, keep.data());
              std::fill(keep.begin() + visible, keep.begin() + kv, uint8_t(0));
              grad_scores_row_dropout(row, grad_row, keep.data(), kv, lse_bh[i0 + ii], delta[ii], p.scale,
                                      dropout_scale);
            } else {
              grad_scores_row(row, grad_row, kv, lse_bh[i0 + ii], delta[ii], p.scale);
            }
          }
          const T accumulate = keys_written == 0 ? T(0) : T(1);
          for (int64_t j = keys_written; j < kv && keys_written > 0; ++j) {
            std::fill_n(gk_bh + j * g.k.row, d, T(0));
            std::fill_n(gv_bh + j * g.v.row, d, T(0));
          }
          keys_written = kv;
          // dV += P^T dO
          gemm<T>(true, false, kv, d, rows, T(1), scores.data(), kv, go, grad_out.row, accumulate, gv_bh, g.v.row);
          // dQ = dS K (content part; its column sums are dU), dK += dS^T (Q + u)
          T* gq = gq_bh + i0 * g.q.row;
          gemm<T>(false, false, rows, d, kv, T(1), dprob.data(), kv, k_bh, p.k.row, T(0), gq, g.q.row);
          for (int64_t ii = 0; ii < rows; ++ii)
            for (int64_t c = 0; c < d; ++c) grad_u[c] += gq[ii * g.q.row + c];
          gemm<T>(true, false, kv, d, rows, T(1), dprob.data(), kv, qu.data(), d, accumulate, gk_bh, g.k.row);
          // Positional part: scatter dS onto its skewed diagonals of the band.
          std::fill(dband.begin(), dband.begin() + rows * width, T(0));
          for (int64_t ii = 0; ii < rows; ++ii) {
            const int64_t offset = rows - 1 - ii;
            const T* ds = dprob.data() + ii * kv;
            T* db = dband.data() + ii * width + offset;
            T* gb = grad_bias.data() + band_start + offset;
            for (int64_t j = 0; j < kv; ++j) {
              db[j] = ds[j];
              gb[j] += ds[j];
            }
          }
          // dQ += dBand R_band, dR_band += dBand^T Q
          gemm<T>(false, false, rows, d, width, T(1), dband.data(), width, pos_emb_h + band_start * p.pe_row, p.pe_row,
                  T(1), gq, g.q.row);
          gemm<T>(true, false, width, d, rows, T(1), dband.data(), width, q_bh + i0 * p.q.row, p.q.row, T(1),
                  grad_pos_emb_h + band_start * grad_pe_row, grad_pe_row);
        }
      }
      for (int64_t r = 0; r < p.W; ++r) g.pos_bias[r * p.H + h] = grad_bias[r];
      for (int64_t c = 0; c < d; ++c) g.u[h * d + c] = grad_u[c];
    }
  });
}

// ---- Decode step (L = 1) ----
// One query per (batch, head). The tiled kernels walk each (b, h) down its K
// keys, which lie B·H·d elements apart in [K, B, H, d]; with a single query
// there is no reuse to pay for that, so these kernels walk the keys in memory
// order for all (b, h) at once and split the keys across threads
// (flash-decoding): every byte of K and V is read once, and every byte of dK
// and dV written once. For L = 1 the window row of key j is j and every key is
// causally visible; only an explicit mask can hide one. Dropout bits of a
// chunk are drawn per (b, h) for its key range (element (b·H + h)·K + j).

// The simd reduction lets the compiler reassociate the sum into vector lanes.
template <typename T>
FASTFORMERS_VECTOR_CLONES T dot(const T* __restrict__ a, const T* __restrict__ b, int64_t d) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < d; ++c) sum += a[c] * b[c];
  return sum;
}

// y += alpha * x
template <typename T>
FASTFORMERS_VECTOR_CLONES void axpy(T alpha, const T* __restrict__ x, T* __restrict__ y, int64_t d) {
  for (int64_t c = 0; c < d; ++c) y[c] += alpha * x[c];
}

// y = alpha * x
template <typename T>
FASTFORMERS_VECTOR_CLONES void scaled_copy(T alpha, const T* __restrict__ x, T* __restrict__ y, int64_t d) {
  for (int64_t c = 0; c < d; ++c) y[c] = alpha * x[c];
}

// The query rows, packed [B·H, d]: q, and q + u for the content term.
template <typename T>
struct DecodeQueries {
  std::vector<T> q, qu;

  explicit DecodeQueries(const Problem<T>& p) : q(p.B * p.H * p.d), qu(p.B * p.H * p.d) {
    for (int64_t b = 0; b < p.B; ++b)
      for (int64_t h = 0; h < p.H; ++h) {
        const T* src = p.q.at(b, h);
        const T* u = p.u + h * p.u_head;
        T* row = q.data() + (b * p.H + h) * p.d;
        for (int64_t c = 0; c < p.d; ++c) {
          row[c] = src[c];
          qu[(b * p.H + h) * p.d + c] = src[c] + u[c];
        }
      }
  }
};

// Scaled score of key j for (b, h), -inf where the mask hides it.
template <typename T>
T decode_score(const Problem<T>& p, const DecodeQueries<T>& queries, int64_t j, int64_t b, int64_t h) {
  if (p.mask != nullptr && !p.mask[j * p.mask_j + b * p.mask_b]) return -std::numeric_limits<T>::infinity();
  const int64_t n = b * p.H + h;
  const T content = dot(queries.qu.data() + n * p.d, p.k.at(b, h) + j * p.k.row, p.d);
  const T position = dot(queries.q.data() + n * p.d, p.pos_emb + j * p.pe_row + h * p.pe_head, p.d);
  return p.scale * (content + position + p.pos_bias[j * p.pb_row + h * p.pb_head]);
}

// Dropout multipliers keep / (1 - p) of keys [j0, j1) for every (b, h) (n = b·H + h): 1 without dropout.
template <typename T>
struct DecodeKeep {
  const Problem<T>& p;
  int64_t j0, len;
  std::vector<uint8_t> bits;  // [N, len]
  T dropout_scale;

  DecodeKeep(const Problem<T>& problem, int64_t first, int64_t last)
      : p(problem), j0(first), len(last - first), dropout_scale(static_cast<T>(problem.dropout.scale())) {
    if (!p.dropout.active()) return;
    bits.resize(p.B * p.H * len);
    for (int64_t n = 0; n < p.B * p.H; ++n) philox::keep_bits(p.dropout, n * p.K + j0, len, bits.data() + n * len);
  }
  T multiplier(int64_t n, int64_t j) const {
    if (!p.dropout.active()) return T(1);
    return bits[n * len + j - j0] ? dropout_scale : T(0);
  }
};

// Contiguous key ranges, one per thread.
inline int64_t key_chunks(int64_t K) { return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), K)); }

template <typename T>
void decode_forward_kernel(const Problem<T>& p, T* out, int64_t out_batch, int64_t out_head, T* lse) {
  const int64_t N = p.B * p.H, d = p.d, chunks = key_chunks(p.K);
  const DecodeQueries<T> queries(p);
  // Per chunk: running max and sum of exp, and the unnormalised output, per (b, h).
  std::vector<T> chunk_max(chunks * N), chunk_sum(chunks * N), chunk_out(chunks * N * d);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t j0 = p.K * chunk / chunks, j1 = p.K * (chunk + 1) / chunks;
      std::vector<T> scores((j1 - j0) * N);
      const DecodeKeep<T> keep(p, j0, j1);
      T* max = chunk_max.data() + chunk * N;
      T* sum = chunk_sum.data() + chunk * N;
      T* acc = chunk_out.data() + chunk * N * d;
      std::fill_n(max, N, -std::numeric_limits<T>::infinity());
      std::fill_n(sum, N, T(0));
      std::fill_n(acc, N * d, T(0));
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t b = 0; b < p.B; ++b)
          for (int64_t h = 0; h < p.H; ++h) {
            const int64_t n = b * p.H + h;
            const T s = decode_score(p, queries, j, b, h);
            scores[(j - j0) * N + n] = s;
            max[n] = std::max(max[n], s);
          }
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t b = 0; b < p.B; ++b)
          for (int64_t h = 0; h < p.H; ++h) {
            const int64_t n = b * p.H + h;
            if (max[n] == -std::numeric_limits<T>::infinity()) continue;
            const T e = exp_of(scores[(j - j0) * N + n] - max[n]);
            sum[n] += e;
            axpy(e * keep.multiplier(n, j), p.v.at(b, h) + j * p.v.row, acc + n * d, d);
          }
    }
  });
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.H; ++h) {
      const int64_t n = b * p.H + h;
      T max = -std::numeric_limits<T>::infinity();
      for (int64_t chunk = 0; chunk < chunks; ++chunk) max = std::max(max, chunk_max[chunk * N + n]);
      T sum = 0;
      T* o = out + b * out_batch + h * out_head;
      std::fill_n(o, d, T(0));
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const T chunk_m = chunk_max[chunk * N + n];
        if (chunk_m == -std::numeric_limits<T>::infinity()) continue;
        const T weight = exp_of(chunk_m - max);
        sum += weight * chunk_sum[chunk * N + n];
        axpy(weight, chunk_out.data() + (chunk * N + n) * d, o, d);
      }
      for (int64_t c = 0; c < d; ++c) o[c] /= sum;  // all keys masked: 0 / 0, as the tiled kernel gives
      lse[n] = max + std::log(sum);
    }
}

// Single pass over the keys: the saved log-sum-exp gives each probability
// directly, so dK, dV, the window gradients and this chunk's share of dQ come
// out of one read of K and V.
template <typename T>
void decode_backward_kernel(const Problem<T>& p, Slices<const T> grad_out, Slices<const T> out, const T* lse,
                            const Grads<T>& g) {
  const int64_t N = p.B * p.H, d = p.d, chunks = key_chunks(p.K);
  const DecodeQueries<T> queries(p);
  std::vector<T> go(N * d), delta(N);
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.H; ++h) {
      const int64_t n = b * p.H + h;
      std::copy_n(grad_out.at(b, h), d, go.data() + n * d);
      delta[n] = dot(grad_out.at(b, h), out.at(b, h), d);
    }
  // Per chunk: dQ's content part (whose sum over the batch is dU) and positional part.
  std::vector<T> grad_q_content(chunks * N * d, T(0)), grad_q_position(chunks * N * d, T(0));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t j0 = p.K * chunk / chunks, j1 = p.K * (chunk + 1) / chunks;
      T* gq_content = grad_q_content.data() + chunk * N * d;
      T* gq_position = grad_q_position.data() + chunk * N * d;
      const DecodeKeep<T> keep(p, j0, j1);
      for (int64_t j = j0; j < j1; ++j) {
        T* grad_window = g.pos_emb + j * p.H * d;
        std::fill_n(grad_window, p.H * d, T(0));
        std::fill_n(g.pos_bias + j * p.H, p.H, T(0));
        for (int64_t b = 0; b < p.B; ++b)
          for (int64_t h = 0; h < p.H; ++h) {
            const int64_t n = b * p.H + h;
            const T s = decode_score(p, queries, j, b, h);
            const T prob = s == -std::numeric_limits<T>::infinity() ? T(0) : exp_of(s - lse[n]);
            const T* key = p.k.at(b, h) + j * p.k.row;
            const T* value = p.v.at(b, h) + j * p.v.row;
            const T z = keep.multiplier(n, j);
            const T ds = p.scale * prob * (z * dot(go.data() + n * d, value, d) - delta[n]);
            scaled_copy(prob * z, go.data() + n * d, g.v.at(b, h) + j * g.v.row, d);
            scaled_copy(ds, queries.qu.data() + n * d, g.k.at(b, h) + j * g.k.row, d);
            axpy(ds, key, gq_content + n * d, d);
            axpy(ds, p.pos_emb + j * p.pe_row + h * p.pe_head, gq_position + n * d, d);
            axpy(ds, queries.q.data() + n * d, grad_window + h * d, d);
            g.pos_bias[j * p.H + h] += ds;
          }
      }
    }
  });
  std::fill_n(g.u, p.H * d, T(0));
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.H; ++h) {
      const int64_t n = b * p.H + h;
      T* gq = g.q.at(b, h);
      std::fill_n(gq, d, T(0));
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        axpy(T(1), grad_q_content.data() + (chunk * N + n) * d, gq, d);
        axpy(T(1), grad_q_content.data() + (chunk * N + n) * d, g.u + h * d, d);
        axpy(T(1), grad_q_position.data() + (chunk * N + n) * d, gq, d);
      }
    }
}

void check_inputs(const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                  const at::Tensor& pos_emb, const at::Tensor& pos_bias, const at::Tensor& query_pos_bias, bool causal,
                  const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(query.dim() == 4, op, ": query must be [L, B, H, d], got shape ", query.sizes());
  const int64_t L = query.size(0), B = query.size(1), H = query.size(2), d = query.size(3);
  TORCH_CHECK(key.dim() == 4 && key.size(1) == B && key.size(2) == H && key.size(3) == d, op,
              ": key must be [K, ", B, ", ", H, ", ", d, "], got shape ", key.sizes());
  const int64_t K = key.size(0);
  TORCH_CHECK(value.sizes() == key.sizes(), op, ": value must be ", key.sizes(), " like key, got ", value.sizes());
  TORCH_CHECK(L >= 1 && K >= 1, op, ": needs at least one query and one key, got L=", L, ", K=", K);
  TORCH_CHECK(!causal || K >= L, op, ": causal attention needs K = M + L >= L keys, got K=", K, ", L=", L);
  const int64_t W = K + L - 1;
  TORCH_CHECK(pos_emb.dim() == 3 && pos_emb.size(0) == W && pos_emb.size(1) == H && pos_emb.size(2) == d, op,
              ": pos_emb must be [K + L - 1, H, d] = [", W, ", ", H, ", ", d, "], got ", pos_emb.sizes());
  TORCH_CHECK(pos_bias.dim() == 2 && pos_bias.size(0) == W && pos_bias.size(1) == H, op,
              ": pos_bias must be [K + L - 1, H] = [", W, ", ", H, "], got ", pos_bias.sizes());
  TORCH_CHECK(query_pos_bias.dim() == 2 && query_pos_bias.size(0) == H && query_pos_bias.size(1) == d, op,
              ": query_pos_bias must be [H, d] = [", H, ", ", d, "], got ", query_pos_bias.sizes());
  const auto dtype = query.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": query must be float32, float64, bfloat16 or float16, got ", dtype);
  for (const at::Tensor* t : {&key, &value, &pos_emb, &pos_bias, &query_pos_bias})
    TORCH_CHECK(t->scalar_type() == dtype, op, ": every input must have query's dtype ", dtype, ", got ",
                t->scalar_type());
  for (const at::Tensor* t : {&query, &key, &value, &pos_emb, &pos_bias, &query_pos_bias})
    TORCH_CHECK(t->device().is_cpu(), op, ": CPU kernel got a tensor on ", t->device());
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, op, ": mask must be bool, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 3 && (m.size(0) == 1 || m.size(0) == L) && m.size(1) == K &&
                    (m.size(2) == 1 || m.size(2) == B),
                op, ": mask must be [L or 1, K, B or 1] = [", L, ", ", K, ", ", B, "], got ", m.sizes());
    TORCH_CHECK(m.device().is_cpu(), op, ": CPU kernel got mask on ", m.device());
  }
  const int64_t int_max = std::numeric_limits<int>::max();
  for (const at::Tensor* t : {&query, &key, &value, &pos_emb})
    TORCH_CHECK(t->numel() < int_max, op, ": tensors of 2^31 elements or more are not supported");
}

philox::Dropout make_dropout(const char* op, double dropout_p, int64_t seed, int64_t offset) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  return {dropout_p, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)};
}

// The kernels compute in opmath precision (float for bfloat16 / float16) on
// tensors whose last dimension has unit stride.
at::Tensor compute_view(const at::Tensor& t, at::ScalarType compute) {
  if (t.scalar_type() != compute) return t.to(compute).contiguous();
  return t.stride(-1) == 1 ? t : t.contiguous();
}

at::ScalarType compute_type(const at::Tensor& query) {
  return query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename T>
Problem<T> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pe,
                        const at::Tensor& pb, const at::Tensor& u, double scale, bool causal,
                        const std::optional<at::Tensor>& mask, const philox::Dropout& dropout) {
  Problem<T> p;
  p.L = q.size(0);
  p.B = q.size(1);
  p.H = q.size(2);
  p.d = q.size(3);
  p.K = k.size(0);
  p.M = p.K - p.L;
  p.W = p.K + p.L - 1;
  p.scale = static_cast<T>(scale);
  p.causal = causal;
  p.q = {q.data_ptr<T>(), q.stride(0), q.stride(1), q.stride(2)};
  p.k = {k.data_ptr<T>(), k.stride(0), k.stride(1), k.stride(2)};
  p.v = {v.data_ptr<T>(), v.stride(0), v.stride(1), v.stride(2)};
  p.pos_emb = pe.data_ptr<T>();
  p.pe_row = pe.stride(0);
  p.pe_head = pe.stride(1);
  p.pos_bias = pb.data_ptr<T>();
  p.pb_row = pb.stride(0);
  p.pb_head = pb.stride(1);
  p.u = u.data_ptr<T>();
  p.u_head = u.stride(0);
  p.dropout = dropout;
  p.mask = nullptr;
  if (mask.has_value()) {
    const at::Tensor expanded = mask->expand({p.L, p.K, p.B});
    p.mask = expanded.data_ptr<bool>();
    p.mask_i = expanded.stride(0);
    p.mask_j = expanded.stride(1);
    p.mask_b = expanded.stride(2);
  }
  return p;
}

std::tuple<at::Tensor, at::Tensor> rel_attention_cpu(const at::Tensor& query, const at::Tensor& key,
                                                     const at::Tensor& value, const at::Tensor& pos_emb,
                                                     const at::Tensor& pos_bias, const at::Tensor& query_pos_bias,
                                                     double scale, bool causal,
                                                     const std::optional<at::Tensor>& mask, double dropout_p,
                                                     int64_t seed, int64_t offset) {
  check_inputs("rel_attention", query, key, value, pos_emb, pos_bias, query_pos_bias, causal, mask);
  const philox::Dropout dropout = make_dropout("rel_attention", dropout_p, seed, offset);
  const auto compute = compute_type(query);
  const at::Tensor q = compute_view(query, compute), k = compute_view(key, compute), v = compute_view(value, compute);
  const at::Tensor pe = compute_view(pos_emb, compute), pb = pos_bias.to(compute);
  const at::Tensor u = query_pos_bias.to(compute).contiguous();
  at::Tensor out = cpu::empty_on_huge_pages(query.sizes(), query.options().dtype(compute));
  at::Tensor lse = at::empty({query.size(1), query.size(2), query.size(0)}, query.options().dtype(compute));
  AT_DISPATCH_FLOATING_TYPES(compute, "rel_attention_cpu", [&] {
    const auto problem = make_problem<scalar_t>(q, k, v, pe, pb, u, scale, causal, mask, dropout);
    if (problem.L == 1)
      decode_forward_kernel(problem, out.data_ptr<scalar_t>(), out.stride(1), out.stride(2), lse.data_ptr<scalar_t>());
    else
      forward_kernel(problem, out.data_ptr<scalar_t>(), out.stride(0), out.stride(1), out.stride(2),
                     lse.data_ptr<scalar_t>());
  });
  return {out.to(query.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rel_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& pos_emb, const at::Tensor& pos_bias, const at::Tensor& query_pos_bias, const at::Tensor& out,
    const at::Tensor& lse, double scale, bool causal, const std::optional<at::Tensor>& mask, double dropout_p,
    int64_t seed, int64_t offset) {
  check_inputs("rel_attention_backward", query, key, value, pos_emb, pos_bias, query_pos_bias, causal, mask);
  const philox::Dropout dropout = make_dropout("rel_attention_backward", dropout_p, seed, offset);
  TORCH_CHECK(grad_out.sizes() == query.sizes() && out.sizes() == query.sizes(),
              "rel_attention_backward: grad_out and out must be ", query.sizes(), ", got ", grad_out.sizes(), " and ",
              out.sizes());
  const auto compute = compute_type(query);
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == query.size(1) && lse.size(1) == query.size(2) &&
                  lse.size(2) == query.size(0) && lse.scalar_type() == compute,
              "rel_attention_backward: lse must be [B, H, L] = [", query.size(1), ", ", query.size(2), ", ",
              query.size(0), "] of ", compute, ", got ", lse.sizes(), " of ", lse.scalar_type());
  const at::Tensor q = compute_view(query, compute), k = compute_view(key, compute), v = compute_view(value, compute);
  const at::Tensor pe = compute_view(pos_emb, compute), pb = pos_bias.to(compute);
  const at::Tensor u = query_pos_bias.to(compute).contiguous();
  const at::Tensor go = compute_view(grad_out, compute), o = compute_view(out, compute);
  const at::Tensor lse_c = lse.contiguous();
  const auto options = query.options().dtype(compute);
  at::Tensor grad_query = cpu::empty_on_huge_pages(query.sizes(), options);
  at::Tensor grad_key = cpu::empty_on_huge_pages(key.sizes(), options);
  at::Tensor grad_value = cpu::empty_on_huge_pages(key.sizes(), options);
  at::Tensor grad_pos_emb = at::zeros(pos_emb.sizes(), options);
  at::Tensor grad_pos_bias = at::empty(pos_bias.sizes(), options);
  at::Tensor grad_query_pos_bias = at::empty(query_pos_bias.sizes(), options);
  AT_DISPATCH_FLOATING_TYPES(compute, "rel_attention_backward_cpu", [&] {
    const auto problem = make_problem<scalar_t>(q, k, v, pe, pb, u, scale, causal, mask, dropout);
    const Grads<scalar_t> grads{slices<scalar_t>(grad_query), slices<scalar_t>(grad_key), slices<scalar_t>(grad_value),
                                grad_pos_emb.data_ptr<scalar_t>(), grad_pos_bias.data_ptr<scalar_t>(),
                                grad_query_pos_bias.data_ptr<scalar_t>()};
    const Slices<const scalar_t> grad_out_slices{go.data_ptr<scalar_t>(), go.stride(0), go.stride(1), go.stride(2)};
    const Slices<const scalar_t> out_slices{o.data_ptr<scalar_t>(), o.stride(0), o.stride(1), o.stride(2)};
    if (problem.L == 1)
      decode_backward_kernel(problem, grad_out_slices, out_slices, lse_c.data_ptr<scalar_t>(), grads);
    else
      backward_kernel(problem, grad_out_slices, out_slices, lse_c.data_ptr<scalar_t>(), grads);
  });
  const auto dtype = query.scalar_type();
  return {grad_query.to(dtype),   grad_key.to(dtype),      grad_value.to(dtype),
          grad_pos_emb.to(dtype), grad_pos_bias.to(dtype), grad_query_pos_bias.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastformers, CPU, m) {
  m.impl("rel_attention", &rel_attention_cpu);
  m.impl("rel_attention_backward", &rel_attention_backward_cpu);
}

}  // namespace fastformers
