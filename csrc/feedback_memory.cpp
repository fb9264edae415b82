// CPU kernels of the feedback-memory weighted sum
//   m[n] = sum_l softmax(w)_l * x[l, n]        x: [L, N] (N = batch * d_model)
// and its backward. Schemas live in fastformers/ops/feedback/op.py.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu_utils.h"

namespace fastformers {
namespace {

// Fixed chunking keeps the reduction order (and so the result) independent of
// the number of threads.
constexpr int64_t kChunk = 4096;
constexpr int64_t kTile = 1024;

void check_inputs(const at::Tensor& layer_outputs, const at::Tensor& weights) {
  TORCH_CHECK(layer_outputs.dim() >= 2,
              "feedback_memory: layer_outputs must be [n_layers + 1, batch, d_model] (rank >= 2), got rank ",
              layer_outputs.dim());
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == layer_outputs.size(0),
              "feedback_memory: weights must be [", layer_outputs.size(0), "] to match layer_outputs, got ",
              weights.sizes());
  TORCH_CHECK(weights.scalar_type() == layer_outputs.scalar_type(), "feedback_memory: weights dtype ",
              weights.scalar_type(), " must equal layer_outputs dtype ", layer_outputs.scalar_type());
  TORCH_CHECK(at::isFloatingType(layer_outputs.scalar_type()),
              "feedback_memory: layer_outputs must be floating point, got ", layer_outputs.scalar_type());
  TORCH_CHECK(layer_outputs.device().is_cpu() && weights.device().is_cpu(),
              "feedback_memory: CPU kernel got tensors on ", layer_outputs.device(), " and ", weights.device());
}

template <typename acc_t, typename scalar_t>
std::vector<acc_t> softmax(const scalar_t* w, int64_t n) {
  std::vector<acc_t> p(n);
  acc_t max = -INFINITY;
  for (int64_t l = 0; l < n; ++l) max = std::max(max, static_cast<acc_t>(w[l]));
  acc_t sum = 0;
  for (int64_t l = 0; l < n; ++l) {
    p[l] = std::exp(static_cast<acc_t>(w[l]) - max);
    sum += p[l];
  }
  for (int64_t l = 0; l < n; ++l) p[l] /= sum;
  return p;
}

// m[begin:end] = sum_l probs[l] * x[l, begin:end], through an L1-resident
// accumulator per tile of kTile columns streamed over the L rows.
template <typename scalar_t, typename acc_t>
FASTFORMERS_VECTOR_CLONES void weighted_sum_range(const scalar_t* __restrict__ x, int64_t N,
                                                  const acc_t* __restrict__ probs, int64_t L, int64_t begin,
                                                  int64_t end, scalar_t* __restrict__ m) {
  acc_t acc[kTile];
  for (int64_t tile = begin; tile < end; tile += kTile) {
    const int64_t width = std::min(kTile, end - tile);
    for (int64_t n = 0; n < width; ++n) acc[n] = probs[0] * static_cast<acc_t>(x[tile + n]);
    for (int64_t l = 1; l < L; ++l) {
      const scalar_t* __restrict__ row = x + l * N + tile;
      const acc_t p = probs[l];
      for (int64_t n = 0; n < width; ++n) acc[n] += p * static_cast<acc_t>(row[n]);
    }
    for (int64_t n = 0; n < width; ++n) m[tile + n] = static_cast<scalar_t>(acc[n]);
  }
}

// grad_x[l, begin:end] = probs[l] * g[begin:end] and dots[l] = <g, x[l]> over the range.
template <typename scalar_t, typename acc_t>
FASTFORMERS_VECTOR_CLONES void backward_range(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                              scalar_t* __restrict__ gx, int64_t N, const acc_t* __restrict__ probs,
                                              int64_t L, int64_t begin, int64_t end, acc_t* __restrict__ dots) {
  for (int64_t l = 0; l < L; ++l) {
    const scalar_t* __restrict__ row = x + l * N;
    scalar_t* __restrict__ grad_row = gx + l * N;
    const acc_t p = probs[l];
    acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t n = begin; n < end; ++n) {
      const acc_t gn = static_cast<acc_t>(g[n]);
      grad_row[n] = static_cast<scalar_t>(p * gn);
      dot += gn * static_cast<acc_t>(row[n]);
    }
    dots[l] = dot;
  }
}

at::Tensor feedback_memory_cpu(const at::Tensor& layer_outputs_, const at::Tensor& weights_) {
  check_inputs(layer_outputs_, weights_);
  const at::Tensor layer_outputs = layer_outputs_.contiguous();
  const at::Tensor weights = weights_.contiguous();
  const int64_t L = layer_outputs.size(0);
  const int64_t N = layer_outputs.numel() / std::max<int64_t>(L, 1);
  at::Tensor out = at::empty(layer_outputs.sizes().slice(1), layer_outputs.options());
  // a sum over no layers, as the reference gives (the loop below starts from layer 0)
  if (L == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, layer_outputs.scalar_type(), "feedback_memory_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto probs = softmax<acc_t>(weights.data_ptr<scalar_t>(), L);
    const scalar_t* x = layer_outputs.data_ptr<scalar_t>();
    scalar_t* m = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, kChunk, [&](int64_t begin, int64_t end) {
      weighted_sum_range(x, N, probs.data(), L, begin, end, m);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> feedback_memory_backward_cpu(const at::Tensor& grad_,
                                                                 const at::Tensor& layer_outputs_,
                                                                 const at::Tensor& weights_) {
  check_inputs(layer_outputs_, weights_);
  TORCH_CHECK(grad_.sizes() == layer_outputs_.sizes().slice(1), "feedback_memory_backward: grad must be ",
              layer_outputs_.sizes().slice(1), ", got ", grad_.sizes());
  TORCH_CHECK(grad_.scalar_type() == layer_outputs_.scalar_type(), "feedback_memory_backward: grad dtype ",
              grad_.scalar_type(), " must equal layer_outputs dtype ", layer_outputs_.scalar_type());
  const at::Tensor grad = grad_.contiguous();
  const at::Tensor layer_outputs = layer_outputs_.contiguous();
  const at::Tensor weights = weights_.contiguous();
  const int64_t L = layer_outputs.size(0);
  const int64_t N = layer_outputs.numel() / std::max<int64_t>(L, 1);
  at::Tensor grad_layer_outputs = at::empty_like(layer_outputs);
  at::Tensor grad_weights = at::empty_like(weights);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, layer_outputs.scalar_type(), "feedback_memory_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto probs = softmax<acc_t>(weights.data_ptr<scalar_t>(), L);
        const scalar_t* x = layer_outputs.data_ptr<scalar_t>();
        const scalar_t* g = grad.data_ptr<scalar_t>();
        scalar_t* gx = grad_layer_outputs.data_ptr<scalar_t>();
        const int64_t n_chunks = (N + kChunk - 1) / kChunk;
        // partial[c * L + l] = sum over chunk c of g[n] * x[l, n]
        std::vector<acc_t> partial(n_chunks * L, acc_t(0));
        at::parallel_for(0, n_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
          for (int64_t c = chunk_begin; c < chunk_end; ++c) {
            const int64_t begin = c * kChunk;
            const int64_t end = std::min(N, begin + kChunk);
            backward_range(x, g, gx, N, probs.data(), L, begin, end, partial.data() + c * L);
          }
        });
        std::vector<acc_t> grad_probs(L, acc_t(0));
        for (int64_t c = 0; c < n_chunks; ++c)
          for (int64_t l = 0; l < L; ++l) grad_probs[l] += partial[c * L + l];
        acc_t weighted = 0;
        for (int64_t l = 0; l < L; ++l) weighted += probs[l] * grad_probs[l];
        scalar_t* gw = grad_weights.data_ptr<scalar_t>();
        for (int64_t l = 0; l < L; ++l) gw[l] = static_cast<scalar_t>(probs[l] * (grad_probs[l] - weighted));
      });
  return {grad_layer_outputs, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastformers, CPU, m) {
  m.impl("feedback_memory", &feedback_memory_cpu);
  m.impl("feedback_memory_backward", &feedback_memory_backward_cpu);
}

}  // namespace fastformers
