// CPU kernels of one Feedback Transformer attention step (the math is in
// feedback_step.h): tensor checks and dispatch around the raw-pointer kernels.
// Schemas live in fastformers/ops/feedback/step_op.py.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "feedback_step.h"

namespace fastformers {
namespace {

// The [H, d] slice of a cache row must be contiguous; the time and batch axes
// may be strided so one [T_max, B, C, H, d] buffer can serve several caches.
bool inner_contiguous(const at::Tensor& cache) {
  return cache.stride(3) == 1 && cache.stride(2) == cache.size(3);
}

void check_step_inputs(const char* op, const at::Tensor& query, const at::Tensor& key_cache,
                       const at::Tensor& value_cache, int64_t steps, const at::Tensor& key_pos_embeddings,
                       const at::Tensor& key_pos_bias, const at::Tensor& query_pos_bias) {
  TORCH_CHECK(query.dim() == 3, op, ": query must be [batch, heads, d_k], got ", query.sizes());
  const int64_t B = query.size(0), H = query.size(1), d = query.size(2);
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.size(1) == B && key_cache.size(2) == H && key_cache.size(3) == d,
              op, ": key_cache must be [T_max, ", B, ", ", H, ", ", d, "], got ", key_cache.sizes());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), op, ": value_cache must match key_cache ",
              key_cache.sizes(), ", got ", value_cache.sizes());
  TORCH_CHECK(key_pos_embeddings.dim() == 3 && key_pos_embeddings.size(1) == H && key_pos_embeddings.size(2) == d,
              op, ": key_pos_embeddings must be [P, ", H, ", ", d, "], got ", key_pos_embeddings.sizes());
  TORCH_CHECK(key_pos_bias.dim() == 2 && key_pos_bias.size(0) == key_pos_embeddings.size(0) &&
                  key_pos_bias.size(1) == H,
              op, ": key_pos_bias must be [", key_pos_embeddings.size(0), ", ", H, "], got ", key_pos_bias.sizes());
  TORCH_CHECK(query_pos_bias.dim() == 2 && query_pos_bias.size(0) == H && query_pos_bias.size(1) == d, op,
              ": query_pos_bias must be [", H, ", ", d, "], got ", query_pos_bias.sizes());
  TORCH_CHECK(steps >= 1 && steps <= key_cache.size(0) && steps <= key_pos_embeddings.size(0), op,
              ": steps must be in [1, min(T_max=", key_cache.size(0), ", P=", key_pos_embeddings.size(0), ")], got ",
              steps);
  for (const at::Tensor* t : {&key_cache, &value_cache, &key_pos_embeddings, &key_pos_bias, &query_pos_bias}) {
    TORCH_CHECK(t->scalar_type() == query.scalar_type(), op, ": every tensor must have the query dtype ",
                query.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device().is_cpu(), op, ": CPU kernel got a tensor on ", t->device());
  }
  TORCH_CHECK(at::isFloatingType(query.scalar_type()), op, ": tensors must be floating point, got ",
              query.scalar_type());
  TORCH_CHECK(query.device().is_cpu(), op, ": CPU kernel got query on ", query.device());
}

at::Tensor inner_contiguous_cache(const at::Tensor& cache) {
  return inner_contiguous(cache) ? cache : cache.contiguous();
}

philox::Dropout checked_dropout(const char* op, double dropout_p, int64_t seed, int64_t offset) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(offset >= 0, op, ": offset must be >= 0, got ", offset);
  return {dropout_p, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)};
}

template <typename scalar_t>
StepView<scalar_t> make_view(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t steps,
                             const at::Tensor& R, const at::Tensor& S, const at::Tensor& u,
                             const philox::Dropout& drop) {
  const int64_t P = R.size(0);
  return {q.data_ptr<scalar_t>(),
          k.data_ptr<scalar_t>(),
          v.data_ptr<scalar_t>(),
          R.data_ptr<scalar_t>() + (P - steps) * R.stride(0),
          S.data_ptr<scalar_t>() + (P - steps) * S.stride(0),
          u.data_ptr<scalar_t>(),
          q.size(0),
          q.size(1),
          q.size(2),
          steps,
          k.stride(0),
          k.stride(1),
          v.stride(0),
          v.stride(1),
          drop};
}

at::Tensor feedback_attention_step_cpu(const at::Tensor& query_, const at::Tensor& key_cache_,
                                       const at::Tensor& value_cache_, int64_t steps,
                                       const at::Tensor& key_pos_embeddings_, const at::Tensor& key_pos_bias_,
                                       const at::Tensor& query_pos_bias_, double scale, double dropout_p,
                                       int64_t seed, int64_t offset) {
  const philox::Dropout drop = checked_dropout("feedback_attention_step", dropout_p, seed, offset);
  check_step_inputs("feedback_attention_step", query_, key_cache_, value_cache_, steps, key_pos_embeddings_,
                    key_pos_bias_, query_pos_bias_);
  const at::Tensor query = query_.contiguous(), R = key_pos_embeddings_.contiguous(),
                   S = key_pos_bias_.contiguous(), u = query_pos_bias_.contiguous();
  const at::Tensor key_cache = inner_contiguous_cache(key_cache_), value_cache = inner_contiguous_cache(value_cache_);
  at::Tensor out = at::empty(query.sizes(), query.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "feedback_attention_step_cpu", [&] {
    const auto w = make_view<scalar_t>(query, key_cache, value_cache, steps, R, S, u, drop);
    step_forward(w, scale, out.data_ptr<scalar_t>());
  });
  return out;
}

// Adds this step's gradients into caller-owned buffers: rows [0, steps) of
// grad_key_cache / grad_value_cache (shaped like the caches), the last `steps`
// rows of grad_key_pos_embeddings / grad_key_pos_bias, all of
// grad_query_pos_bias. Returns the gradient of the query. One buffer per
// forward then collects a whole recurrence without any [P, H, d] zero-fill
// per step. Work is split by head so no two threads touch the same row.
at::Tensor checked_step_backward_accumulate(const at::Tensor& grad_out_, const at::Tensor& query_,
                                            const at::Tensor& key_cache_, const at::Tensor& value_cache_,
                                            int64_t steps, const at::Tensor& key_pos_embeddings_,
                                            const at::Tensor& key_pos_bias_, const at::Tensor& query_pos_bias_,
                                            double scale, double dropout_p, int64_t seed, int64_t offset,
                                            at::Tensor& grad_key_cache, at::Tensor& grad_value_cache,
                                            at::Tensor& grad_key_pos_embeddings, at::Tensor& grad_key_pos_bias,
                                            at::Tensor& grad_query_pos_bias) {
  const char* op = "feedback_attention_step_backward";
  const philox::Dropout drop = checked_dropout(op, dropout_p, seed, offset);
  check_step_inputs(op, query_, key_cache_, value_cache_, steps, key_pos_embeddings_, key_pos_bias_,
                    query_pos_bias_);
  TORCH_CHECK(grad_out_.sizes() == query_.sizes() && grad_out_.scalar_type() == query_.scalar_type(), op,
              ": grad must be ", query_.sizes(), " ", query_.scalar_type(), ", got ", grad_out_.sizes(), " ",
              grad_out_.scalar_type());
  const int64_t B = query_.size(0), H = query_.size(1), d = query_.size(2);
  for (at::Tensor* cache_grad : {&grad_key_cache, &grad_value_cache}) {
    TORCH_CHECK(cache_grad->dim() == 4 && cache_grad->size(0) >= steps && cache_grad->size(1) == B &&
                    cache_grad->size(2) == H && cache_grad->size(3) == d && inner_contiguous(*cache_grad),
                op, ": cache gradient buffers must be [>= steps, ", B, ", ", H, ", ", d,
                "] with [H, d] contiguous, got ", cache_grad->sizes(), " strides ", cache_grad->strides());
  }
  TORCH_CHECK(grad_key_pos_embeddings.dim() == 3 && grad_key_pos_embeddings.size(0) >= steps &&
                  grad_key_pos_embeddings.size(1) == H && grad_key_pos_embeddings.size(2) == d &&
                  grad_key_pos_embeddings.is_contiguous(),
              op, ": grad_key_pos_embeddings must be contiguous [>= steps, H, d], got ",
              grad_key_pos_embeddings.sizes());
  TORCH_CHECK(grad_key_pos_bias.dim() == 2 && grad_key_pos_bias.size(0) == grad_key_pos_embeddings.size(0) &&
                  grad_key_pos_bias.size(1) == H && grad_key_pos_bias.is_contiguous(),
              op, ": grad_key_pos_bias must be contiguous [", grad_key_pos_embeddings.size(0), ", H], got ",
              grad_key_pos_bias.sizes());
  TORCH_CHECK(grad_query_pos_bias.sizes() == query_pos_bias_.sizes() && grad_query_pos_bias.is_contiguous(), op,
              ": grad_query_pos_bias must be contiguous ", query_pos_bias_.sizes());
  // bfloat16/half steps may accumulate into float32 buffers: a whole recurrence
  // adds thousands of terms into them, too many for an 8-bit mantissa.
  const auto grad_dtype = grad_key_cache.scalar_type();
  const bool widened = grad_dtype != query_.scalar_type();
  TORCH_CHECK(!widened || (grad_dtype == at::kFloat && at::isReducedFloatingType(query_.scalar_type())), op,
              ": gradient buffers must have the query dtype ", query_.scalar_type(),
              " (or float32 for bfloat16/half queries), got ", grad_dtype);
  for (const at::Tensor* t :
       {&grad_key_cache, &grad_value_cache, &grad_key_pos_embeddings, &grad_key_pos_bias, &grad_query_pos_bias}) {
    TORCH_CHECK(t->scalar_type() == grad_dtype && t->device().is_cpu(), op,
                ": gradient buffers must be CPU tensors of one dtype (", grad_dtype, "), got ", t->scalar_type());
  }
  const at::Tensor query = query_.contiguous(), grad_out = grad_out_.contiguous(), R = key_pos_embeddings_.contiguous(),
                   S = key_pos_bias_.contiguous(), u = query_pos_bias_.contiguous();
  const at::Tensor key_cache = inner_contiguous_cache(key_cache_), value_cache = inner_contiguous_cache(value_cache_);
  at::Tensor grad_query = at::empty(query.sizes(), query.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "feedback_attention_step_backward_cpu",
                                  [&] {
    const auto w = make_view<scalar_t>(query, key_cache, value_cache, steps, R, S, u, drop);
    auto accumulate = [&]<typename grad_t>() {
      const int64_t first_row = grad_key_pos_embeddings.size(0) - steps;
      const StepGradView<grad_t> gw{grad_key_cache.data_ptr<grad_t>(),
                                    grad_value_cache.data_ptr<grad_t>(),
                                    grad_key_pos_embeddings.data_ptr<grad_t>() + first_row * H * d,
                                    grad_key_pos_bias.data_ptr<grad_t>() + first_row * H,
                                    grad_query_pos_bias.data_ptr<grad_t>(),
                                    grad_key_cache.stride(0),
                                    grad_key_cache.stride(1),
                                    grad_value_cache.stride(0),
                                    grad_value_cache.stride(1)};
      step_backward_accumulate(w, scale, grad_out.data_ptr<scalar_t>(), grad_query.data_ptr<scalar_t>(), gw);
    };
    if (widened) {
      accumulate.template operator()<float>();
    } else {
      accumulate.template operator()<scalar_t>();
    }
  });
  return grad_query;
}

at::Tensor feedback_attention_step_backward_accumulate_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
    int64_t steps, const at::Tensor& key_pos_embeddings, const at::Tensor& key_pos_bias,
    const at::Tensor& query_pos_bias, double scale, double dropout_p, int64_t seed, int64_t offset,
    at::Tensor grad_key_cache, at::Tensor grad_value_cache, at::Tensor grad_key_pos_embeddings,
    at::Tensor grad_key_pos_bias, at::Tensor grad_query_pos_bias) {
  return checked_step_backward_accumulate(grad_out, query, key_cache, value_cache, steps, key_pos_embeddings,
                                          key_pos_bias, query_pos_bias, scale, dropout_p, seed, offset,
                                          grad_key_cache, grad_value_cache, grad_key_pos_embeddings,
                                          grad_key_pos_bias, grad_query_pos_bias);
}

// Gradients of the rows the step used only: [steps, B, H, d] for the caches,
// [steps, H, d] / [steps, H] for the positional tables (rows P - steps .. P - 1).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> feedback_attention_step_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
    int64_t steps, const at::Tensor& key_pos_embeddings, const at::Tensor& key_pos_bias,
    const at::Tensor& query_pos_bias, double scale, double dropout_p, int64_t seed, int64_t offset) {
  const auto options = query.options();
  const int64_t B = query.size(0), H = query.size(1), d = query.size(2);
  at::Tensor grad_key = at::zeros({steps, B, H, d}, options);
  at::Tensor grad_value = at::zeros({steps, B, H, d}, options);
  at::Tensor grad_pos_emb = at::zeros({steps, H, d}, options);
  at::Tensor grad_pos_bias = at::zeros({steps, H}, options);
  at::Tensor grad_query_pos_bias = at::zeros({H, d}, options);
  at::Tensor grad_query =
      checked_step_backward_accumulate(grad_out, query, key_cache, value_cache, steps, key_pos_embeddings,
                                       key_pos_bias, query_pos_bias, scale, dropout_p, seed, offset, grad_key,
                                       grad_value, grad_pos_emb,
                                       grad_pos_bias, grad_query_pos_bias);
  return {grad_query, grad_key, grad_value, grad_pos_emb, grad_pos_bias, grad_query_pos_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastformers, CPU, m) {
  m.impl("feedback_attention_step", &feedback_attention_step_cpu);
  m.impl("feedback_attention_step_backward", &feedback_attention_step_backward_cpu);
  m.impl("feedback_attention_step_backward_accumulate_", &feedback_attention_step_backward_accumulate_cpu);
}

}  // namespace fastformers
