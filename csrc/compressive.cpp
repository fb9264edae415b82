// CPU kernels of the Compressive Transformer ops (schemas in
// fastformers/ops/compressive/op.py):
//
// conv_compress: out[g, b, :] = bias + sum_k mem[g*c + k, b, :] @ W[:, :, k]^T
//   memory [M, B, D] -> [M / c, B, D_out]; weight [D_out, D, c] as nn.Conv1d
//   stores it. Every (group, tap) is one BLAS GEMM on the contiguous [B, D]
//   block mem[g*c + k], accumulated in place (beta = 1) onto the bias: the
//   memory and its gradient are never permuted or copied; only the weight is
//   repacked tap-major ([c, D_out, D], c*D*D_out elements) once per call.
//
// attention_reconstruction_loss: MSE(attn(LN(h), LN(c_mem)), attn(LN(h), LN(mem)))
//   with content-only softmax attention per head. Per batch element the layer
//   norm and the Q/K/V projections run into per-thread scratch (never for the
//   whole batch at once), then per head both attentions run flash-style (online
//   softmax over key tiles, scores and products as BLAS GEMMs on [tile, d_k]
//   slices) and the squared error is taken in the same pass: no [L, M] score
//   matrix and no projected memory are kept. The forward saves only the
//   difference of the two attentions and two per-row statistics; the backward
//   recomputes the projections of h and c_mem per batch element and yields
//   the gradient of c_mem only.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "cpu_utils.h"

namespace fastformers {
namespace {

// ------------------------------------------------------------------ conv_compress

void check_conv_inputs(const char* op, const at::Tensor& mem, const at::Tensor& weight) {
  TORCH_CHECK(mem.dim() == 3, op, ": mem must be [mem_len, batch, d_model], got shape ", mem.sizes());
  TORCH_CHECK(weight.dim() == 3 && weight.size(1) == mem.size(2) && weight.size(2) >= 1, op,
              ": weight must be [d_out, d_model = ", mem.size(2), ", compression_rate], got shape ", weight.sizes());
  const int64_t c = weight.size(2);
  TORCH_CHECK(mem.size(0) % c == 0, op, ": mem length ", mem.size(0), " is not a multiple of the compression rate ",
              c, "; only whole groups of ", c, " memories can be compressed");
  TORCH_CHECK(weight.scalar_type() == mem.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
              " must equal mem dtype ", mem.scalar_type());
  TORCH_CHECK(at::isFloatingType(mem.scalar_type()), op, ": mem must be floating point, got ", mem.scalar_type());
  TORCH_CHECK(mem.device().is_cpu() && weight.device().is_cpu(), op, ": CPU kernel got tensors on ", mem.device(),
              " and ", weight.device());
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Contiguous copy in the accumulation type: a no-op for float32/float64 inputs
// that are already contiguous, a conversion for reduced precision.
at::Tensor as_acc(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

std::optional<at::Tensor> as_acc(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  if (!t.has_value()) return std::nullopt;
  return as_acc(*t, acc);
}

template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// weight [D_out, D, c] -> taps [c, D_out, D]: W_k row-major, so each tap is a
// BLAS operand with unit stride along D.
template <typename T>
void pack_taps(const T* weight, int64_t d_out, int64_t D, int64_t c, T* taps) {
  for (int64_t o = 0; o < d_out; ++o)
    for (int64_t i = 0; i < D; ++i)
      for (int64_t k = 0; k < c; ++k) taps[(k * d_out + o) * D + i] = weight[(o * D + i) * c + k];
}

template <typename T>
void conv_forward(const T* mem, const T* taps, const T* bias, int64_t G, int64_t c, int64_t B, int64_t D,
                  int64_t d_out, T* out) {
  at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      T* out_g = out + g * B * d_out;
      if (bias != nullptr)
        for (int64_t b = 0; b < B; ++b) std::copy(bias, bias + d_out, out_g + b * d_out);
      for (int64_t k = 0; k < c; ++k) {
        const T beta = (bias != nullptr || k > 0) ? T(1) : T(0);
        cpu::gemm<T>(false, true, B, d_out, D, T(1), mem + (g * c + k) * B * D, D, taps + k * d_out * D, D, beta,
                     out_g, d_out);
      }
    }
  });
}

// Rows of the weight gradient per task: enough work per GEMM, and c * D_out / 64
// tasks so that every core has some even when c = 1.
constexpr int64_t kWeightRowBlock = 64;

template <typename T>
void conv_backward(const T* grad, const T* mem, const T* taps, int64_t G, int64_t c, int64_t B, int64_t D,
                   int64_t d_out, T* grad_mem, T* grad_taps, T* grad_bias) {
  // grad_mem[g*c + k] = grad[g] @ W_k: one [B, D_out] x [D_out, D] GEMM per (group, tap).
  at::parallel_for(0, G * c, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / c, k = task % c;
      cpu::gemm<T>(false, false, B, D, d_out, T(1), grad + g * B * d_out, d_out, taps + k * d_out * D, D, T(0),
                   grad_mem + task * B * D, D);
    }
  });
  // grad W_k[o0:o1] = sum_g grad[g][:, o0:o1]^T @ mem[g*c + k], accumulated in place.
  const int64_t blocks = (d_out + kWeightRowBlock - 1) / kWeightRowBlock;
  at::parallel_for(0, c * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task / blocks, o0 = task % blocks * kWeightRowBlock;
      const int64_t rows = std::min(kWeightRowBlock, d_out - o0);
      T* out = grad_taps + (k * d_out + o0) * D;
      for (int64_t g = 0; g < G; ++g)
        cpu::gemm<T>(true, false, rows, D, B, T(1), grad + g * B * d_out + o0, d_out, mem + (g * c + k) * B * D, D,
                     g > 0 ? T(1) : T(0), out, D);
    }
  });
  if (grad_bias != nullptr) {
    std::fill(grad_bias, grad_bias + d_out, T(0));
    for (int64_t row = 0; row < G * B; ++row)
      for (int64_t o = 0; o < d_out; ++o) grad_bias[o] += grad[row * d_out + o];
  }
}

at::Tensor conv_compress_cpu(const at::Tensor& mem_, const at::Tensor& weight_,
                             const std::optional<at::Tensor>& bias_) {
  check_conv_inputs("conv_compress", mem_, weight_);
  const int64_t M = mem_.size(0), B = mem_.size(1), D = mem_.size(2);
  const int64_t d_out = weight_.size(0), c = weight_.size(2), G = M / c;
  if (bias_.has_value()) {
    TORCH_CHECK(bias_->dim() == 1 && bias_->size(0) == d_out, "conv_compress: bias must be [", d_out,
                "], got shape ", bias_->sizes());
    TORCH_CHECK(bias_->scalar_type() == mem_.scalar_type(), "conv_compress: bias dtype ", bias_->scalar_type(),
                " must equal mem dtype ", mem_.scalar_type());
  }
  const at::ScalarType acc = acc_type(mem_.scalar_type());
  const at::Tensor mem = as_acc(mem_, acc), weight = as_acc(weight_, acc);
  const auto bias = as_acc(bias_, acc);
  at::Tensor taps = at::empty({c, d_out, D}, mem.options());
  at::Tensor out = at::empty({G, B, d_out}, mem.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "conv_compress_cpu", [&] {
    pack_taps(weight.data_ptr<scalar_t>(), d_out, D, c, taps.data_ptr<scalar_t>());
    conv_forward(mem.data_ptr<scalar_t>(), taps.data_ptr<scalar_t>(), data_or_null<scalar_t>(bias), G, c, B, D,
                 d_out, out.data_ptr<scalar_t>());
  });
  return out.to(mem_.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_compress_backward_cpu(const at::Tensor& grad_,
                                                                          const at::Tensor& mem_,
                                                                          const at::Tensor& weight_, bool has_bias) {
  check_conv_inputs("conv_compress_backward", mem_, weight_);
  const int64_t M = mem_.size(0), B = mem_.size(1), D = mem_.size(2);
  const int64_t d_out = weight_.size(0), c = weight_.size(2), G = M / c;
  TORCH_CHECK(grad_.dim() == 3 && grad_.size(0) == G && grad_.size(1) == B && grad_.size(2) == d_out,
              "conv_compress_backward: grad must be [", G, ", ", B, ", ", d_out, "], got ", grad_.sizes());
  TORCH_CHECK(grad_.scalar_type() == mem_.scalar_type(), "conv_compress_backward: grad dtype ", grad_.scalar_type(),
              " must equal mem dtype ", mem_.scalar_type());
  const at::ScalarType acc = acc_type(mem_.scalar_type());
  const at::Tensor grad = as_acc(grad_, acc), mem = as_acc(mem_, acc), weight = as_acc(weight_, acc);
  at::Tensor taps = at::empty({c, d_out, D}, mem.options());
  at::Tensor grad_taps = at::empty({c, d_out, D}, mem.options());
  at::Tensor grad_mem = at::empty({M, B, D}, mem.options());
  at::Tensor grad_weight = at::empty({d_out, D, c}, mem.options());
  at::Tensor grad_bias = at::empty({has_bias ? d_out : 0}, mem.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "conv_compress_backward_cpu", [&] {
    pack_taps(weight.data_ptr<scalar_t>(), d_out, D, c, taps.data_ptr<scalar_t>());
    conv_backward(grad.data_ptr<scalar_t>(), mem.data_ptr<scalar_t>(), taps.data_ptr<scalar_t>(), G, c, B, D, d_out,
                  grad_mem.data_ptr<scalar_t>(), grad_taps.data_ptr<scalar_t>(),
                  has_bias ? grad_bias.data_ptr<scalar_t>() : nullptr);
    const scalar_t* gt = grad_taps.data_ptr<scalar_t>();
    scalar_t* gw = grad_weight.data_ptr<scalar_t>();
    for (int64_t o = 0; o < d_out; ++o)
      for (int64_t i = 0; i < D; ++i)
        for (int64_t k = 0; k < c; ++k) gw[(o * D + i) * c + k] = gt[(k * d_out + o) * D + i];
  });
  const auto dtype = mem_.scalar_type();
  return {grad_mem.to(dtype), grad_weight.to(dtype), grad_bias.to(dtype)};
}

// ------------------------------------------------- attention_reconstruction_loss

constexpr int64_t kQueryTile = 64;
constexpr int64_t kKeyTile = 128;

// Sum and dot product with independent partial sums per lane: a plain
// `acc += x[i]` loop is not vectorised without -ffast-math (it would reorder
// the float additions), and these reductions sit in every row's hot path.
constexpr int64_t kLanes = 16;

template <typename T>
FASTFORMERS_VECTOR_CLONES T lane_sum(const T* __restrict__ x, int64_t n) {
  T lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += x[i + l];
  T total = 0;
  for (; i < n; ++i) total += x[i];
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

template <typename T>
FASTFORMERS_VECTOR_CLONES T lane_dot(const T* __restrict__ x, const T* __restrict__ y, int64_t n) {
  T lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += x[i + l] * y[i + l];
  T total = 0;
  for (; i < n; ++i) total += x[i] * y[i];
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// Layer-normalises `rows` rows of D features, row r read at x + r * ld_x:
// out [rows, D] = x_hat * weight + bias (weight/bias may be null), plus x_hat
// [rows, D] (before the affine map) and rstd [rows] when those are non-null.
template <typename T>
FASTFORMERS_VECTOR_CLONES void layer_norm_rows(const T* __restrict__ x, int64_t rows, int64_t ld_x, int64_t D,
                                               const T* __restrict__ weight, const T* __restrict__ bias, T eps,
                                               T* __restrict__ out, T* __restrict__ x_hat, T* __restrict__ rstd) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict__ row = x + r * ld_x;
    T* __restrict__ o = out + r * D;
    const T mean = lane_sum(row, D) / D;
    for (int64_t i = 0; i < D; ++i) o[i] = row[i] - mean;
    const T var = lane_dot(o, o, D);
    const T inv = T(1) / std::sqrt(var / D + eps);
    for (int64_t i = 0; i < D; ++i) o[i] *= inv;
    if (x_hat != nullptr) {
      std::copy(o, o + D, x_hat + r * D);
      rstd[r] = inv;
    }
    if (weight != nullptr)
      for (int64_t i = 0; i < D; ++i) o[i] *= weight[i];
    if (bias != nullptr)
      for (int64_t i = 0; i < D; ++i) o[i] += bias[i];
  }
}

// Layer norm of batch elements [b0, b0 + nb) of a [R, B, D] tensor into the
// chunk layout [R, nb, D] (row (r, j) at r * nb + j).
template <typename T>
void layer_norm_chunk(const T* x, int64_t R, int64_t B, int64_t D, int64_t b0, int64_t nb, const T* weight,
                      const T* bias, T eps, T* out, T* x_hat = nullptr, T* rstd = nullptr) {
  for (int64_t r = 0; r < R; ++r)
    layer_norm_rows<T>(x + (r * B + b0) * D, nb, D, D, weight, bias, eps, out + r * nb * D,
                       x_hat == nullptr ? nullptr : x_hat + r * nb * D, rstd == nullptr ? nullptr : rstd + r * nb);
}

// Batch elements per task: enough rows that each projection is one GEMM of
// some height, few enough that the per-thread scratch stays a small fraction
// of the activations.
constexpr int64_t kChunkRows = 32;

int64_t batch_chunk(int64_t B, int64_t longest) { return std::max<int64_t>(1, std::min(B, kChunkRows / longest)); }

// out [rows, E] = alpha * (x [rows, D] @ weight[E, D]^T + bias).
template <typename T>
void project(const T* x, int64_t rows, int64_t D, const T* weight, const T* bias, int64_t E, T alpha, T* out) {
  cpu::gemm<T>(false, true, rows, E, D, alpha, x, D, weight, D, T(0), out, E);
  if (bias != nullptr)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t e = 0; e < E; ++e) out[r * E + e] += alpha * bias[e];
}

// Softmax attention of L pre-scaled queries over n keys, one head: rows of
// query/key/value/out are d_k wide at row strides ld (the heads of a [rows, E]
// buffer). Writes out [L, d_k] and the log-sum-exp lse [L]. Online softmax
// over key tiles; scores [kQueryTile, kKeyTile] is scratch.
template <typename T>
FASTFORMERS_VECTOR_CLONES void attend(const T* query, int64_t L, const T* key, const T* value, int64_t n,
                                      int64_t dk, int64_t ld, T* out, int64_t ld_out, T* lse, T* scores) {
  T row_max[kQueryTile], row_sum[kQueryTile];
  for (int64_t i0 = 0; i0 < L; i0 += kQueryTile) {
    const int64_t nq = std::min(kQueryTile, L - i0);
    for (int64_t i = 0; i < nq; ++i) {
      row_max[i] = -std::numeric_limits<T>::infinity();
      row_sum[i] = 0;
    }
    for (int64_t j0 = 0; j0 < n; j0 += kKeyTile) {
      const int64_t nk = std::min(kKeyTile, n - j0);
      cpu::gemm<T>(false, true, nq, nk, dk, T(1), query + i0 * ld, ld, key + j0 * ld, ld, T(0), scores, nk);
      for (int64_t i = 0; i < nq; ++i) {
        T* __restrict__ s = scores + i * nk;
        T tile_max = -std::numeric_limits<T>::infinity();
        for (int64_t j = 0; j < nk; ++j) tile_max = std::max(tile_max, s[j]);
        const T new_max = std::max(row_max[i], tile_max);
        for (int64_t j = 0; j < nk; ++j) s[j] = cpu::exp_of(s[j] - new_max);
        const T tile_sum = lane_sum(s, nk);
        T* __restrict__ o = out + (i0 + i) * ld_out;
        if (j0 > 0) {
          const T rescale = cpu::exp_of(row_max[i] - new_max);
          row_sum[i] *= rescale;
          for (int64_t d = 0; d < dk; ++d) o[d] *= rescale;
        }
        row_sum[i] += tile_sum;
        row_max[i] = new_max;
      }
      cpu::gemm<T>(false, false, nq, dk, nk, T(1), scores, nk, value + j0 * ld, ld, j0 > 0 ? T(1) : T(0),
                   out + i0 * ld_out, ld_out);
    }
    for (int64_t i = 0; i < nq; ++i) {
      const T inv = T(1) / row_sum[i];
      T* __restrict__ o = out + (i0 + i) * ld_out;
      for (int64_t d = 0; d < dk; ++d) o[d] *= inv;
      lse[i0 + i] = row_max[i] + std::log(row_sum[i]);
    }
  }
}

void check_loss_inputs(const at::Tensor& h, const at::Tensor& mem, const at::Tensor& c_mem,
                       const at::Tensor& query_weight, const at::Tensor& key_weight, const at::Tensor& value_weight,
                       int64_t heads) {
  const char* op = "attention_reconstruction_loss";
  TORCH_CHECK(h.dim() == 3, op, ": h must be [seq_len, batch, d_model], got shape ", h.sizes());
  const int64_t B = h.size(1), D = h.size(2);
  TORCH_CHECK(mem.dim() == 3 && mem.size(1) == B && mem.size(2) == D, op, ": mem must be [mem_len, ", B, ", ", D,
              "], got shape ", mem.sizes());
  TORCH_CHECK(c_mem.dim() == 3 && c_mem.size(1) == B && c_mem.size(2) == D, op, ": c_mem must be [c_mem_len, ", B,
              ", ", D, "], got shape ", c_mem.sizes());
  TORCH_CHECK(heads > 0 && query_weight.dim() == 2 && query_weight.size(1) == D && query_weight.size(0) % heads == 0,
              op, ": query_weight must be [heads * d_k, ", D, "], got shape ", query_weight.sizes());
  TORCH_CHECK(key_weight.sizes() == query_weight.sizes() && value_weight.sizes() == query_weight.sizes(), op,
              ": key_weight and value_weight must match query_weight ", query_weight.sizes());
  for (const at::Tensor* t : {&mem, &c_mem})
    TORCH_CHECK(t->scalar_type() == h.scalar_type(), op, ": all tensors must share h's dtype ", h.scalar_type());
  TORCH_CHECK(at::isFloatingType(h.scalar_type()), op, ": h must be floating point, got ", h.scalar_type());
  TORCH_CHECK(h.device().is_cpu() && mem.device().is_cpu() && c_mem.device().is_cpu(), op,
              ": CPU kernel got tensors off the CPU");
  TORCH_CHECK(mem.size(0) > 0 && c_mem.size(0) > 0, op, ": mem and c_mem must be non-empty");
}

// The layer's detached parameters in the accumulation type, as raw pointers.
template <typename T>
struct LayerParams {
  const T *norm_weight, *norm_bias, *query_weight, *query_bias, *key_weight, *key_bias, *value_weight, *value_bias;
  T eps, scale;
};

struct AccParams {
  std::optional<at::Tensor> norm_weight, norm_bias, query_bias, key_bias, value_bias;
  at::Tensor query_weight, key_weight, value_weight;

  template <typename T>
  LayerParams<T> raw(double eps, double scale) const {
    return {data_or_null<T>(norm_weight), data_or_null<T>(norm_bias), query_weight.data_ptr<T>(),
            data_or_null<T>(query_bias),  key_weight.data_ptr<T>(),   data_or_null<T>(key_bias),
            value_weight.data_ptr<T>(),   data_or_null<T>(value_bias), static_cast<T>(eps), static_cast<T>(scale)};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_reconstruction_loss_cpu(
    const at::Tensor& h_, const at::Tensor& mem_, const at::Tensor& c_mem_, const std::optional<at::Tensor>& norm_weight,
    const std::optional<at::Tensor>& norm_bias, double eps, const at::Tensor& query_weight,
    const std::optional<at::Tensor>& query_bias, const at::Tensor& key_weight,
    const std::optional<at::Tensor>& key_bias, const at::Tensor& value_weight,
    const std::optional<at::Tensor>& value_bias, int64_t heads, double scale) {
  check_loss_inputs(h_, mem_, c_mem_, query_weight, key_weight, value_weight, heads);
  const at::ScalarType acc = acc_type(h_.scalar_type());
  const int64_t L = h_.size(0), B = h_.size(1), D = h_.size(2), M = mem_.size(0), N = c_mem_.size(0);
  const int64_t E = query_weight.size(0), dk = E / heads;
  const at::Tensor h = as_acc(h_, acc), mem = as_acc(mem_, acc), c_mem = as_acc(c_mem_, acc);
  const AccParams params{as_acc(norm_weight, acc),  as_acc(norm_bias, acc),    as_acc(query_bias, acc),
                         as_acc(key_bias, acc),     as_acc(value_bias, acc),   as_acc(query_weight, acc),
                         as_acc(key_weight, acc),   as_acc(value_weight, acc)};
  const auto options = h.options();
  at::Tensor diff = at::empty({L, B, E}, options);
  at::Tensor stats = at::empty({2, L, B, heads}, options);
  at::Tensor partial = at::empty({B}, options);
  const int64_t rows = std::max({L, M, N});
  AT_DISPATCH_FLOATING_TYPES(acc, "attention_reconstruction_loss_cpu", [&] {
    using T = scalar_t;
    const LayerParams<T> p = params.raw<T>(eps, scale);
    const T* h_ptr = h.data_ptr<T>();
    const T* mem_ptr = mem.data_ptr<T>();
    const T* c_mem_ptr = c_mem.data_ptr<T>();
    T* diff_ptr = diff.data_ptr<T>();
    T* lse_ptr = stats.data_ptr<T>();
    T* delta_ptr = lse_ptr + L * B * heads;
    T* partial_ptr = partial.data_ptr<T>();
    const int64_t nb = batch_chunk(B, std::max({L, M, N}));
    const int64_t chunks = (B + nb - 1) / nb;
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      // Per-thread scratch for one chunk of nb batch elements, rows laid out
      // [row, nb, features] (ATen-allocated, so memory profiles see it):
      // normalised rows, Q, K/V of mem and of c_mem; per head both attentions,
      // log-sum-exps and one score tile.
      const int64_t sizes[] = {rows * nb * D, L * nb * E, 2 * M * nb * E, 2 * N * nb * E, 2 * L * dk, 2 * L,
                               kQueryTile * kKeyTile};
      int64_t total = 0;
      for (int64_t s : sizes) total += s;
      at::Tensor scratch = at::empty({total}, options);
      T* normed = scratch.data_ptr<T>();
      T* query = normed + sizes[0];
      T *key_m = query + sizes[1], *value_m = key_m + M * nb * E;
      T *key_c = key_m + sizes[2], *value_c = key_c + N * nb * E;
      T *attn_m = key_c + sizes[3], *attn_c = attn_m + L * dk;
      T *lse_m = attn_m + sizes[4], *lse_c = lse_m + L;
      T* scores = lse_m + sizes[5];
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t b0 = chunk * nb, n = std::min(nb, B - b0);
        layer_norm_chunk<T>(h_ptr, L, B, D, b0, n, p.norm_weight, p.norm_bias, p.eps, normed);
        project(normed, L * n, D, p.query_weight, p.query_bias, E, p.scale, query);
        layer_norm_chunk<T>(mem_ptr, M, B, D, b0, n, p.norm_weight, p.norm_bias, p.eps, normed);
        project(normed, M * n, D, p.key_weight, p.key_bias, E, T(1), key_m);
        project(normed, M * n, D, p.value_weight, p.value_bias, E, T(1), value_m);
        layer_norm_chunk<T>(c_mem_ptr, N, B, D, b0, n, p.norm_weight, p.norm_bias, p.eps, normed);
        project(normed, N * n, D, p.key_weight, p.key_bias, E, T(1), key_c);
        project(normed, N * n, D, p.value_weight, p.value_bias, E, T(1), value_c);
        for (int64_t j = 0; j < n; ++j) {
          const int64_t b = b0 + j;
          T squared = 0;
          for (int64_t hd = 0; hd < heads; ++hd) {
            const int64_t col = j * E + hd * dk;  // head hd of batch element j in a [rows, n, E] buffer
            attend(query + col, L, key_m + col, value_m + col, M, dk, n * E, attn_m, dk, lse_m, scores);
            attend(query + col, L, key_c + col, value_c + col, N, dk, n * E, attn_c, dk, lse_c, scores);
            for (int64_t i = 0; i < L; ++i) {
              const T* a_c = attn_c + i * dk;
              const T* a_m = attn_m + i * dk;
              T* out = diff_ptr + (i * B + b) * E + hd * dk;
              for (int64_t d = 0; d < dk; ++d) out[d] = a_c[d] - a_m[d];
              squared += lane_dot(out, out, dk);
              const T delta = lane_dot(out, a_c, dk);
              lse_ptr[(i * B + b) * heads + hd] = lse_c[i];
              delta_ptr[(i * B + b) * heads + hd] = delta;
            }
          }
          partial_ptr[b] = squared;
        }
      }
    });
  });
  // Summing the per-batch partials in a fixed order keeps the loss
  // independent of the thread count.
  at::Tensor loss = partial.sum().div_(static_cast<double>(L * B * E)).to(h_.scalar_type());
  return {loss, diff, stats};
}

at::Tensor attention_reconstruction_loss_backward_cpu(
    const at::Tensor& grad, const at::Tensor& h_, const at::Tensor& c_mem_,
    const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& norm_bias, double eps,
    const at::Tensor& query_weight, const std::optional<at::Tensor>& query_bias, const at::Tensor& key_weight,
    const std::optional<at::Tensor>& key_bias, const at::Tensor& value_weight,
    const std::optional<at::Tensor>& value_bias, int64_t heads, double scale, const at::Tensor& diff_,
    const at::Tensor& stats_) {
  const char* op = "attention_reconstruction_loss_backward";
  TORCH_CHECK(grad.numel() == 1, op, ": grad must be a scalar, got shape ", grad.sizes());
  check_loss_inputs(h_, c_mem_, c_mem_, query_weight, key_weight, value_weight, heads);
  const at::ScalarType acc = acc_type(c_mem_.scalar_type());
  const int64_t L = h_.size(0), B = h_.size(1), D = h_.size(2), N = c_mem_.size(0);
  const int64_t E = query_weight.size(0), dk = E / heads;
  TORCH_CHECK(diff_.sizes() == at::IntArrayRef({L, B, E}), op, ": diff must be [", L, ", ", B, ", ", E, "], got ",
              diff_.sizes());
  TORCH_CHECK(stats_.sizes() == at::IntArrayRef({2, L, B, heads}), op, ": stats must be [2, ", L, ", ", B, ", ",
              heads, "], got ", stats_.sizes());
  for (const at::Tensor* t : {&diff_, &stats_})
    TORCH_CHECK(t->scalar_type() == acc, op, ": diff and stats must be ", acc, ", got ", t->scalar_type());
  const at::Tensor h = as_acc(h_, acc), c_mem = as_acc(c_mem_, acc);
  const at::Tensor diff = diff_.contiguous(), stats = stats_.contiguous();
  const AccParams params{as_acc(norm_weight, acc),  as_acc(norm_bias, acc),    as_acc(query_bias, acc),
                         as_acc(key_bias, acc),     as_acc(value_bias, acc),   as_acc(query_weight, acc),
                         as_acc(key_weight, acc),   as_acc(value_weight, acc)};
  const auto options = h.options();
  at::Tensor grad_c_mem = at::empty({N, B, D}, options);
  const int64_t rows = std::max(L, N);
  AT_DISPATCH_FLOATING_TYPES(acc, "attention_reconstruction_loss_backward_cpu", [&] {
    using T = scalar_t;
    const LayerParams<T> p = params.raw<T>(eps, scale);
    // d loss / d attn(h, c_mem) = coef * diff.
    const T coef = grad.item<double>() * 2.0 / static_cast<double>(L * B * E);
    const T* h_ptr = h.data_ptr<T>();
    const T* c_mem_ptr = c_mem.data_ptr<T>();
    const T* diff_ptr = diff.data_ptr<T>();
    const T* lse_ptr = stats.data_ptr<T>();
    const T* delta_ptr = lse_ptr + L * B * heads;
    T* grad_ptr = grad_c_mem.data_ptr<T>();
    const int64_t nb = batch_chunk(B, std::max(L, N));
    const int64_t chunks = (B + nb - 1) / nb;
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      // Chunk scratch as in the forward: normalised rows, x_hat and rstd of
      // c_mem, Q, K/V of c_mem and their gradients, two score tiles.
      const int64_t sizes[] = {rows * nb * D, N * nb * D, N * nb, L * nb * E, 2 * N * nb * E, 2 * N * nb * E,
                               2 * kQueryTile * kKeyTile};
      int64_t total = 0;
      for (int64_t s : sizes) total += s;
      at::Tensor scratch = at::empty({total}, options);
      T* normed = scratch.data_ptr<T>();
      T *x_hat = normed + sizes[0], *rstd = x_hat + sizes[1];
      T* query = rstd + sizes[2];
      T *key_c = query + sizes[3], *value_c = key_c + N * nb * E;
      T *grad_key = key_c + sizes[4], *grad_value = grad_key + N * nb * E;
      T *probs = grad_key + sizes[5], *grad_scores = probs + kQueryTile * kKeyTile;
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t b0 = chunk * nb, n = std::min(nb, B - b0), ld = n * E;
        layer_norm_chunk<T>(h_ptr, L, B, D, b0, n, p.norm_weight, p.norm_bias, p.eps, normed);
        project(normed, L * n, D, p.query_weight, p.query_bias, E, p.scale, query);
        layer_norm_chunk<T>(c_mem_ptr, N, B, D, b0, n, p.norm_weight, p.norm_bias, p.eps, normed, x_hat, rstd);
        project(normed, N * n, D, p.key_weight, p.key_bias, E, T(1), key_c);
        project(normed, N * n, D, p.value_weight, p.value_bias, E, T(1), value_c);
        // Per batch element, head, key tile and query tile, with q pre-scaled,
        // dA = coef * diff, P = exp(q k^T - lse), dS = P * (dA v^T - coef * delta):
        // dV += P^T dA, dK += dS^T q.
        for (int64_t j = 0; j < n; ++j) {
          const int64_t b = b0 + j;
          for (int64_t hd = 0; hd < heads; ++hd) {
            const int64_t col = j * E + hd * dk;
            for (int64_t j0 = 0; j0 < N; j0 += kKeyTile) {
              const int64_t nk = std::min(kKeyTile, N - j0);
              for (int64_t i0 = 0; i0 < L; i0 += kQueryTile) {
                const int64_t nq = std::min(kQueryTile, L - i0);
                const T* grad_attn = diff_ptr + (i0 * B + b) * E + hd * dk;  // rows at stride B * E
                cpu::gemm<T>(false, true, nq, nk, dk, T(1), query + i0 * ld + col, ld, key_c + j0 * ld + col, ld,
                             T(0), probs, nk);
                cpu::gemm<T>(false, true, nq, nk, dk, T(1), grad_attn, B * E, value_c + j0 * ld + col, ld, T(0),
                             grad_scores, nk);
                for (int64_t i = 0; i < nq; ++i) {
                  const int64_t stat = ((i0 + i) * B + b) * heads + hd;
                  const T lse = lse_ptr[stat], delta = delta_ptr[stat];
                  T* __restrict__ prob = probs + i * nk;
                  T* __restrict__ grad_score = grad_scores + i * nk;
                  for (int64_t k = 0; k < nk; ++k) {
                    prob[k] = cpu::exp_of(prob[k] - lse);
                    grad_score[k] = coef * prob[k] * (grad_score[k] - delta);
                  }
                }
                const T beta = i0 > 0 ? T(1) : T(0);
                cpu::gemm<T>(true, false, nk, dk, nq, coef, probs, nk, grad_attn, B * E, beta,
                             grad_value + j0 * ld + col, ld);
                cpu::gemm<T>(true, false, nk, dk, nq, T(1), grad_scores, nk, query + i0 * ld + col, ld, beta,
                             grad_key + j0 * ld + col, ld);
              }
            }
          }
        }
        // Back through the projections ([N * n, E] x [E, D] each) into normed,
        // then through the layer norm into the strided rows of grad_c_mem.
        cpu::gemm<T>(false, false, N * n, D, E, T(1), grad_key, E, p.key_weight, D, T(0), normed, D);
        cpu::gemm<T>(false, false, N * n, D, E, T(1), grad_value, E, p.value_weight, D, T(1), normed, D);
        for (int64_t row = 0; row < N * n; ++row) {
          T* __restrict__ g = normed + row * D;
          const T* __restrict__ xh = x_hat + row * D;
          if (p.norm_weight != nullptr)
            for (int64_t i = 0; i < D; ++i) g[i] *= p.norm_weight[i];
          const T mean_g = lane_sum(g, D) / D, mean_gx = lane_dot(g, xh, D) / D;
          T* __restrict__ out = grad_ptr + ((row / n) * B + b0 + row % n) * D;
          for (int64_t i = 0; i < D; ++i) out[i] = rstd[row] * (g[i] - mean_g - xh[i] * mean_gx);
        }
      }
    });
  });
  return grad_c_mem.to(c_mem_.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastformers, CPU, m) {
  m.impl("conv_compress", &conv_compress_cpu);
  m.impl("conv_compress_backward", &conv_compress_backward_cpu);
  m.impl("attention_reconstruction_loss", &attention_reconstruction_loss_cpu);
  m.impl("attention_reconstruction_loss_backward", &attention_reconstruction_loss_backward_cpu);
}

}  // namespace fastformers
