// CPU kernels of the Compressive Transformer ops (schemas in
// fastformers/ops/compressive/op.py):
//
// conv_compress: out[g, b, :] = bias + sum_k mem[g*c + k, b, :] @ W[:, :, k]^T
//   memory [M, B, D] -> [M / c, B, D_out]; weight [D_out, D, c] as nn.Conv1d
//   stores it. Each tap k is one batched GEMM over the strided [G, B, D] view
//   mem[k::c] (batch stride c*B*D), so the memory is never permuted.
//
// attention_reconstruction_loss: MSE(attn(LN(h), LN(c_mem)), attn(LN(h), LN(mem)))
//   with content-only softmax attention per head. Per (batch, head) both
//   attentions run flash-style (online softmax over key tiles of a query tile)
//   and the squared error is taken in the same pass: no [L, M] score matrix.
//   The backward yields the gradient of c_mem only.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/native_layer_norm.h>
#include <ATen/ops/native_layer_norm_backward.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace fastformers {
namespace {

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define FASTFORMERS_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTFORMERS_VECTOR_CLONES
#endif

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

at::Tensor conv_compress_cpu(const at::Tensor& mem_, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias) {
  check_conv_inputs("conv_compress", mem_, weight);
  const at::Tensor mem = mem_.contiguous();
  const int64_t M = mem.size(0), B = mem.size(1), D = mem.size(2);
  const int64_t d_out = weight.size(0), c = weight.size(2), G = M / c;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == d_out, "conv_compress: bias must be [", d_out, "], got shape ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == mem.scalar_type(), "conv_compress: bias dtype ", bias->scalar_type(),
                " must equal mem dtype ", mem.scalar_type());
  }
  // W_k^T for every tap, [c, D, d_out]: c * D * d_out elements, negligible next to the GEMMs.
  const at::Tensor taps = weight.permute({2, 1, 0}).contiguous();
  const at::Tensor grouped = mem.view({G, c, B, D});
  at::Tensor out = at::empty({G, B, d_out}, mem.options());
  if (bias.has_value())
    out.copy_(bias->view({1, 1, d_out}).expand({G, B, d_out}));
  else
    out.zero_();
  for (int64_t k = 0; k < c; ++k) out.baddbmm_(grouped.select(1, k), taps[k].expand({G, D, d_out}));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_compress_backward_cpu(const at::Tensor& grad_,
                                                                          const at::Tensor& mem_,
                                                                          const at::Tensor& weight, bool has_bias) {
  check_conv_inputs("conv_compress_backward", mem_, weight);
  const at::Tensor mem = mem_.contiguous();
  const int64_t M = mem.size(0), B = mem.size(1), D = mem.size(2);
  const int64_t d_out = weight.size(0), c = weight.size(2), G = M / c;
  TORCH_CHECK(grad_.dim() == 3 && grad_.size(0) == G && grad_.size(1) == B && grad_.size(2) == d_out,
              "conv_compress_backward: grad must be [", G, ", ", B, ", ", d_out, "], got ", grad_.sizes());
  TORCH_CHECK(grad_.scalar_type() == mem.scalar_type(), "conv_compress_backward: grad dtype ", grad_.scalar_type(),
              " must equal mem dtype ", mem.scalar_type());
  const at::Tensor grad = grad_.contiguous();
  // Both gradients are single GEMMs over the (group, batch) rows with the taps
  // and features as one c*D axis in (k, i) order; the layout changes this
  // needs are one copy of the [M, B, D] memory and one of its gradient.
  const at::Tensor grad_rows = grad.view({G * B, d_out});
  const at::Tensor taps = weight.permute({0, 2, 1}).contiguous().view({d_out, c * D});  // [o, (k, i)]
  // grad_mem[g*c + k, b, i] = sum_o grad[g, b, o] W[o, i, k]
  at::Tensor grad_mem = at::mm(grad_rows, taps).view({G, B, c, D}).permute({0, 2, 1, 3}).contiguous();
  // grad W[o, i, k] = sum_{g, b} grad[g, b, o] mem[g*c + k, b, i]
  const at::Tensor windows = mem.view({G, c, B, D}).permute({0, 2, 1, 3}).reshape({G * B, c * D});
  at::Tensor grad_weight = at::mm(grad_rows.t(), windows).view({d_out, c, D}).permute({0, 2, 1}).contiguous();
  at::Tensor grad_bias = has_bias ? grad.sum({0, 1}) : at::empty({0}, mem.options());
  return {grad_mem.view({M, B, D}), grad_weight, grad_bias};
}

// ------------------------------------------------- attention_reconstruction_loss

constexpr int64_t kBlockQ = 8;
constexpr int64_t kBlockK = 64;

// exp(x) by range reduction to 2^n * exp(r), |r| <= ln2 / 2, and a Taylor
// polynomial accurate to the type's epsilon: unlike std::exp it vectorises
// inside the softmax loops.
template <typename T>
inline T vector_exp(T x) {
  if constexpr (std::is_same_v<T, float>) {
    x = std::min(std::max(x, -87.0f), 88.0f);
    const float n = std::floor(x * 1.44269504088896341f + 0.5f);
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  } else {
    x = std::min(std::max(x, -708.0), 709.0);
    const double n = std::floor(x * 1.4426950408889634 + 0.5);
    const double r = (x - n * 6.93145751953125e-1) - n * 1.42860682030941723212e-6;
    double p = 1.0 / 6227020800.0;  // 1 / 13!
    const double inv_fact[] = {1.0 / 479001600, 1.0 / 39916800, 1.0 / 3628800, 1.0 / 362880, 1.0 / 40320,
                               1.0 / 5040,      1.0 / 720,      1.0 / 120,     1.0 / 24,     1.0 / 6,
                               0.5,             1.0,            1.0};
    for (double coefficient : inv_fact) p = p * r + coefficient;
    return p * std::bit_cast<double>((static_cast<int64_t>(n) + 1023) << 52);
  }
}

// Softmax attention of L queries (pre-scaled, [L, dk]) over n keys given as
// key_t [dk, n] and value [n, dk]: out [L, dk] and log-sum-exp lse [L].
// Online softmax over key tiles of kBlockK for query tiles of kBlockQ rows.
template <typename T>
FASTFORMERS_VECTOR_CLONES void attend(const T* __restrict__ query, int64_t L, const T* __restrict__ key_t,
                                      const T* __restrict__ value, int64_t n, int64_t dk, T* __restrict__ out,
                                      T* __restrict__ lse) {
  T scores[kBlockQ][kBlockK];
  T row_max[kBlockQ], row_sum[kBlockQ];
  for (int64_t i0 = 0; i0 < L; i0 += kBlockQ) {
    const int64_t nq = std::min(kBlockQ, L - i0);
    for (int64_t i = 0; i < nq; ++i) {
      row_max[i] = -std::numeric_limits<T>::infinity();
      row_sum[i] = 0;
      std::fill(out + (i0 + i) * dk, out + (i0 + i + 1) * dk, T(0));
    }
    for (int64_t j0 = 0; j0 < n; j0 += kBlockK) {
      const int64_t nk = std::min(kBlockK, n - j0);
      for (int64_t i = 0; i < nq; ++i) {
        T* __restrict__ s = scores[i];
        const T* __restrict__ q = query + (i0 + i) * dk;
        for (int64_t j = 0; j < nk; ++j) s[j] = 0;
        for (int64_t d = 0; d < dk; ++d) {
          const T qd = q[d];
          const T* __restrict__ k = key_t + d * n + j0;
          for (int64_t j = 0; j < nk; ++j) s[j] += qd * k[j];
        }
        T tile_max = -std::numeric_limits<T>::infinity();
        for (int64_t j = 0; j < nk; ++j) tile_max = std::max(tile_max, s[j]);
        const T new_max = std::max(row_max[i], tile_max);
        const T rescale = row_sum[i] > 0 ? vector_exp(row_max[i] - new_max) : T(0);
        T tile_sum = 0;
        for (int64_t j = 0; j < nk; ++j) {
          s[j] = vector_exp(s[j] - new_max);
          tile_sum += s[j];
        }
        row_sum[i] = row_sum[i] * rescale + tile_sum;
        row_max[i] = new_max;
        T* __restrict__ o = out + (i0 + i) * dk;
        for (int64_t d = 0; d < dk; ++d) o[d] *= rescale;
        for (int64_t j = 0; j < nk; ++j) {
          const T p = s[j];
          const T* __restrict__ v = value + (j0 + j) * dk;
          for (int64_t d = 0; d < dk; ++d) o[d] += p * v[d];
        }
      }
    }
    for (int64_t i = 0; i < nq; ++i) {
      const T inv = T(1) / row_sum[i];
      T* __restrict__ o = out + (i0 + i) * dk;
      for (int64_t d = 0; d < dk; ++d) o[d] *= inv;
      lse[i0 + i] = row_max[i] + std::log(row_sum[i]);
    }
  }
}

// Gradients of one (batch, head)'s compressed-memory attention: with
// dA_i = coef * diff_i, p_ij = exp(q_i . k_j - lse_i) (q pre-scaled),
//   dV_j += p_ij dA_i,  dK_j += p_ij (dA_i . v_j - coef * delta_i) q_i.
template <typename T>
FASTFORMERS_VECTOR_CLONES void attend_backward(const T* __restrict__ query, const T* __restrict__ diff, int64_t L,
                                               const T* __restrict__ lse, const T* __restrict__ delta,
                                               const T* __restrict__ key, const T* __restrict__ value, int64_t n,
                                               int64_t dk, T coef, T* __restrict__ grad_key,
                                               T* __restrict__ grad_value) {
  std::fill(grad_key, grad_key + n * dk, T(0));
  std::fill(grad_value, grad_value + n * dk, T(0));
  for (int64_t i = 0; i < L; ++i) {
    const T* __restrict__ q = query + i * dk;
    const T* __restrict__ e = diff + i * dk;
    for (int64_t j = 0; j < n; ++j) {
      const T* __restrict__ k = key + j * dk;
      const T* __restrict__ v = value + j * dk;
      T score = 0, e_dot_v = 0;
      for (int64_t d = 0; d < dk; ++d) {
        score += q[d] * k[d];
        e_dot_v += e[d] * v[d];
      }
      const T p = vector_exp(score - lse[i]);
      const T grad_v_scale = p * coef;
      const T grad_score = p * coef * (e_dot_v - delta[i]);
      T* __restrict__ gk = grad_key + j * dk;
      T* __restrict__ gv = grad_value + j * dk;
      for (int64_t d = 0; d < dk; ++d) {
        gv[d] += grad_v_scale * e[d];
        gk[d] += grad_score * q[d];
      }
    }
  }
}

// Copies head h of batch b from a [rows, B, E] tensor into [rows, dk], times scale.
template <typename T>
void gather_head(const T* src, int64_t rows, int64_t B, int64_t E, int64_t b, int64_t h, int64_t dk, T scale,
                 T* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + (r * B + b) * E + h * dk;
    for (int64_t d = 0; d < dk; ++d) dst[r * dk + d] = scale * s[d];
  }
}

// Same, transposed: [dk, rows].
template <typename T>
void gather_head_transposed(const T* src, int64_t rows, int64_t B, int64_t E, int64_t b, int64_t h, int64_t dk,
                            T* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + (r * B + b) * E + h * dk;
    for (int64_t d = 0; d < dk; ++d) dst[d * rows + r] = s[d];
  }
}

template <typename T>
void scatter_head(const T* src, int64_t rows, int64_t B, int64_t E, int64_t b, int64_t h, int64_t dk, T* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    T* d_ = dst + (r * B + b) * E + h * dk;
    for (int64_t d = 0; d < dk; ++d) d_[d] = src[r * dk + d];
  }
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::optional<at::Tensor> to_acc(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  if (!t.has_value()) return std::nullopt;
  return t->to(acc).contiguous();
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_reconstruction_loss_cpu(
    const at::Tensor& h_, const at::Tensor& mem_, const at::Tensor& c_mem_, const std::optional<at::Tensor>& norm_weight,
    const std::optional<at::Tensor>& norm_bias, double eps, const at::Tensor& query_weight,
    const std::optional<at::Tensor>& query_bias, const at::Tensor& key_weight,
    const std::optional<at::Tensor>& key_bias, const at::Tensor& value_weight,
    const std::optional<at::Tensor>& value_bias, int64_t heads, double scale) {
  check_loss_inputs(h_, mem_, c_mem_, query_weight, key_weight, value_weight, heads);
  const at::ScalarType acc = acc_type(h_.scalar_type());
  const int64_t L = h_.size(0), B = h_.size(1), D = h_.size(2), M = mem_.size(0), N = c_mem_.size(0);
  const int64_t E = query_weight.size(0), dk = E / heads;
  const auto ln_w = to_acc(norm_weight, acc), ln_b = to_acc(norm_bias, acc);
  auto normed = [&](const at::Tensor& x) {
    return std::get<0>(at::native_layer_norm(x.to(acc).contiguous(), {D}, ln_w, ln_b, eps));
  };
  auto project = [&](const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
    return at::linear(x, w.to(acc), to_acc(b, acc)).contiguous();
  };
  const at::Tensor h = normed(h_), mem = normed(mem_), c_mem = normed(c_mem_);
  const at::Tensor query = project(h, query_weight, query_bias);
  const at::Tensor key_m = project(mem, key_weight, key_bias), value_m = project(mem, value_weight, value_bias);
  const at::Tensor key_c = project(c_mem, key_weight, key_bias), value_c = project(c_mem, value_weight, value_bias);

  at::Tensor diff = at::empty({L, B, E}, query.options());
  at::Tensor stats = at::empty({2, L, B, heads}, query.options());
  at::Tensor partial = at::empty({B * heads}, query.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "attention_reconstruction_loss_cpu", [&] {
    const scalar_t* q_ptr = query.data_ptr<scalar_t>();
    const scalar_t* km_ptr = key_m.data_ptr<scalar_t>();
    const scalar_t* vm_ptr = value_m.data_ptr<scalar_t>();
    const scalar_t* kc_ptr = key_c.data_ptr<scalar_t>();
    const scalar_t* vc_ptr = value_c.data_ptr<scalar_t>();
    scalar_t* diff_ptr = diff.data_ptr<scalar_t>();
    scalar_t* lse_ptr = stats.data_ptr<scalar_t>();
    scalar_t* delta_ptr = lse_ptr + L * B * heads;
    scalar_t* partial_ptr = partial.data_ptr<scalar_t>();
    at::parallel_for(0, B * heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> q(L * dk), kt_m(dk * M), v_m(M * dk), kt_c(dk * N), v_c(N * dk);
      std::vector<scalar_t> a_m(L * dk), a_c(L * dk), lse_m(L), lse_c(L);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / heads, hd = task % heads;
        gather_head(q_ptr, L, B, E, b, hd, dk, static_cast<scalar_t>(scale), q.data());
        gather_head_transposed(km_ptr, M, B, E, b, hd, dk, kt_m.data());
        gather_head(vm_ptr, M, B, E, b, hd, dk, scalar_t(1), v_m.data());
        gather_head_transposed(kc_ptr, N, B, E, b, hd, dk, kt_c.data());
        gather_head(vc_ptr, N, B, E, b, hd, dk, scalar_t(1), v_c.data());
        attend(q.data(), L, kt_m.data(), v_m.data(), M, dk, a_m.data(), lse_m.data());
        attend(q.data(), L, kt_c.data(), v_c.data(), N, dk, a_c.data(), lse_c.data());
        scalar_t squared = 0;
        for (int64_t i = 0; i < L; ++i) {
          scalar_t delta = 0;
          scalar_t* out = diff_ptr + (i * B + b) * E + hd * dk;
          for (int64_t d = 0; d < dk; ++d) {
            const scalar_t e = a_c[i * dk + d] - a_m[i * dk + d];
            out[d] = e;
            squared += e * e;
            delta += e * a_c[i * dk + d];
          }
          lse_ptr[(i * B + b) * heads + hd] = lse_c[i];
          delta_ptr[(i * B + b) * heads + hd] = delta;
        }
        partial_ptr[task] = squared;
      }
    });
  });
  // Summing the per-(batch, head) partials in a fixed order keeps the loss
  // independent of the thread count.
  at::Tensor loss = partial.sum().div_(static_cast<double>(L * B * E)).to(h_.scalar_type());
  return {loss, query, key_c, value_c, diff, stats};
}

at::Tensor attention_reconstruction_loss_backward_cpu(
    const at::Tensor& grad, const at::Tensor& c_mem_, const std::optional<at::Tensor>& norm_weight,
    const std::optional<at::Tensor>& norm_bias, double eps, const at::Tensor& key_weight,
    const at::Tensor& value_weight, int64_t heads, double scale, const at::Tensor& query_, const at::Tensor& key_c_,
    const at::Tensor& value_c_, const at::Tensor& diff_, const at::Tensor& stats_) {
  const char* op = "attention_reconstruction_loss_backward";
  TORCH_CHECK(grad.numel() == 1, op, ": grad must be a scalar, got shape ", grad.sizes());
  TORCH_CHECK(c_mem_.dim() == 3 && query_.dim() == 3 && diff_.sizes() == query_.sizes(), op,
              ": c_mem, query and diff must be [*, batch, features] with diff shaped like query");
  const at::ScalarType acc = acc_type(c_mem_.scalar_type());
  const int64_t L = query_.size(0), B = query_.size(1), E = query_.size(2), N = c_mem_.size(0), D = c_mem_.size(2);
  TORCH_CHECK(heads > 0 && E % heads == 0, op, ": heads must divide ", E);
  const int64_t dk = E / heads;
  TORCH_CHECK(key_c_.sizes() == at::IntArrayRef({N, B, E}) && value_c_.sizes() == key_c_.sizes(), op,
              ": key_c and value_c must be [", N, ", ", B, ", ", E, "]");
  TORCH_CHECK(stats_.sizes() == at::IntArrayRef({2, L, B, heads}), op, ": stats must be [2, ", L, ", ", B, ", ",
              heads, "]");
  for (const at::Tensor* t : {&query_, &key_c_, &value_c_, &diff_, &stats_})
    TORCH_CHECK(t->scalar_type() == acc, op, ": saved tensors must be ", acc, ", got ", t->scalar_type());
  const at::Tensor query = query_.contiguous(), key_c = key_c_.contiguous(), value_c = value_c_.contiguous();
  const at::Tensor diff = diff_.contiguous(), stats = stats_.contiguous();
  at::Tensor grad_key = at::empty({N, B, E}, query.options());
  at::Tensor grad_value = at::empty({N, B, E}, query.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "attention_reconstruction_loss_backward_cpu", [&] {
    const scalar_t coef = grad.item<double>() * 2.0 / static_cast<double>(L * B * E);
    const scalar_t* q_ptr = query.data_ptr<scalar_t>();
    const scalar_t* e_ptr = diff.data_ptr<scalar_t>();
    const scalar_t* kc_ptr = key_c.data_ptr<scalar_t>();
    const scalar_t* vc_ptr = value_c.data_ptr<scalar_t>();
    const scalar_t* lse_ptr = stats.data_ptr<scalar_t>();
    const scalar_t* delta_ptr = lse_ptr + L * B * heads;
    scalar_t* gk_ptr = grad_key.data_ptr<scalar_t>();
    scalar_t* gv_ptr = grad_value.data_ptr<scalar_t>();
    at::parallel_for(0, B * heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> q(L * dk), e(L * dk), k(N * dk), v(N * dk), gk(N * dk), gv(N * dk), lse(L), delta(L);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / heads, hd = task % heads;
        gather_head(q_ptr, L, B, E, b, hd, dk, static_cast<scalar_t>(scale), q.data());
        gather_head(e_ptr, L, B, E, b, hd, dk, scalar_t(1), e.data());
        gather_head(kc_ptr, N, B, E, b, hd, dk, scalar_t(1), k.data());
        gather_head(vc_ptr, N, B, E, b, hd, dk, scalar_t(1), v.data());
        for (int64_t i = 0; i < L; ++i) {
          lse[i] = lse_ptr[(i * B + b) * heads + hd];
          delta[i] = delta_ptr[(i * B + b) * heads + hd];
        }
        attend_backward(q.data(), e.data(), L, lse.data(), delta.data(), k.data(), v.data(), N, dk, coef, gk.data(),
                        gv.data());
        scatter_head(gk.data(), N, B, E, b, hd, dk, gk_ptr);
        scatter_head(gv.data(), N, B, E, b, hd, dk, gv_ptr);
      }
    });
  });
  // Back through the key/value projections and the layer norm to c_mem.
  const at::Tensor grad_normed =
      at::addmm(at::mm(grad_key.view({N * B, E}), key_weight.to(acc)), grad_value.view({N * B, E}),
                value_weight.to(acc))
          .view({N, B, D});
  const auto ln_w = to_acc(norm_weight, acc), ln_b = to_acc(norm_bias, acc);
  const at::Tensor c_mem = c_mem_.to(acc).contiguous();
  const auto [normed, mean, rstd] = at::native_layer_norm(c_mem, {D}, ln_w, ln_b, eps);
  const at::Tensor grad_c_mem = std::get<0>(
      at::native_layer_norm_backward(grad_normed, c_mem, {D}, mean, rstd, ln_w, ln_b, {true, false, false}));
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
