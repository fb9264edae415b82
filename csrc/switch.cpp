// CPU kernels of the Switch Transformer grouped expert FFN
//   y[t] = scale[t] * layer2(act(layer1(x[t])) [* linear_v(x[t])])   kept tokens of expert e
//   y[t] = scale[t] * x[t]                                             dropped tokens
// and its backward. Tokens are grouped by expert in `order` (segment
// offsets[e] .. offsets[e + 1], the first kept[e] of it kept); each expert's
// kept rows are gathered into a contiguous block so every product is one BLAS
// call. Schemas live in fastformers/ops/switch/op.py.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

namespace fastformers {
namespace {

using OptionalTensor = std::optional<at::Tensor>;

enum class Activation { kRelu, kGelu };

Activation parse_activation(c10::string_view name) {
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  TORCH_CHECK(false, "switch_mlp: activation must be 'relu' or 'gelu', got '", std::string(name), "'");
}

template <Activation A, typename T>
inline T activate(T h) {
  if constexpr (A == Activation::kRelu) {
    return h > T(0) ? h : T(0);
  } else {
    return T(0.5) * h * (T(1) + std::erf(h * T(M_SQRT1_2)));
  }
}

template <Activation A, typename T>
inline T activate_derivative(T h) {
  if constexpr (A == Activation::kRelu) {
    return h > T(0) ? T(1) : T(0);  // 0 at h = 0, as torch's relu backward
  } else {
    const T inv_sqrt_2pi = T(0.5 * M_2_SQRTPI * M_SQRT1_2);
    return T(0.5) * (T(1) + std::erf(h * T(M_SQRT1_2))) + h * inv_sqrt_2pi * std::exp(T(-0.5) * h * h);
  }
}

// Calls body(activation, gated) with both as compile-time constants, so the
// elementwise loops carry no per-element branch.
template <typename Body>
void with_activation(Activation activation, bool gated, const Body& body) {
  auto with_gate = [&](auto act) {
    if (gated) {
      body(act, std::true_type{});
    } else {
      body(act, std::false_type{});
    }
  };
  if (activation == Activation::kRelu) {
    with_gate(std::integral_constant<Activation, Activation::kRelu>{});
  } else {
    with_gate(std::integral_constant<Activation, Activation::kGelu>{});
  }
}

// a[i] = act(h1[i]) (* v[i]) for n rows of hidden = [h1 | v]
template <Activation A, bool kGated, typename T>
void activate_rows(const T* hidden, int64_t hidden_width, int64_t n, int64_t d_ff, T* a) {
  for (int64_t i = 0; i < n; ++i) {
    const T* h = hidden + i * hidden_width;
    T* out = a + i * d_ff;
    for (int64_t j = 0; j < d_ff; ++j) {
      if constexpr (kGated) {
        out[j] = activate<A>(h[j]) * h[d_ff + j];
      } else {
        out[j] = activate<A>(h[j]);
      }
    }
  }
}

void check_tensor(const at::Tensor& tensor, const char* name, int64_t expert, at::IntArrayRef shape,
                  const at::Tensor& x) {
  TORCH_CHECK(tensor.sizes() == shape, "switch_mlp: ", name, "[", expert, "] must be ", shape, ", got ",
              tensor.sizes());
  TORCH_CHECK(tensor.scalar_type() == x.scalar_type(), "switch_mlp: ", name, "[", expert, "] dtype ",
              tensor.scalar_type(), " must equal x dtype ", x.scalar_type());
  TORCH_CHECK(tensor.device().is_cpu(), "switch_mlp: CPU kernel got ", name, "[", expert, "] on ", tensor.device());
}

// A weight group holds one tensor per expert, or none when `optional` (no bias, no gate).
void check_group(at::TensorList group, const char* name, bool optional, int64_t E, at::IntArrayRef shape,
                 const at::Tensor& x) {
  TORCH_CHECK((optional && group.empty()) || static_cast<int64_t>(group.size()) == E, "switch_mlp: ", name,
              " must hold ", E, " tensors (one per expert)", optional ? " or none" : "", ", got ", group.size());
  for (size_t e = 0; e < group.size(); ++e) check_tensor(group[e], name, e, shape, x);
}

// Checks shapes, dtypes and that the routing is a valid grouping: the kernels
// write each token's row from exactly one expert, which needs order to be a
// permutation and the segments to tile [0, T).
void check_inputs(const at::Tensor& x, const at::Tensor& order, const at::Tensor& offsets, const at::Tensor& kept,
                  at::TensorList w1, at::TensorList b1, at::TensorList w2, at::TensorList b2, at::TensorList w_gate,
                  at::TensorList b_gate, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2, "switch_mlp: x must be [tokens, d_model], got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "switch_mlp: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), "switch_mlp: CPU kernel got x on ", x.device());
  const int64_t T = x.size(0), d = x.size(1);
  TORCH_CHECK(!w1.empty() && w1[0].dim() == 2 && w1[0].size(1) == d,
              "switch_mlp: w1 must be n_experts >= 1 tensors [d_ff, d_model=", d, "], got ", w1.size(),
              w1.empty() ? "" : " starting with shape ", w1.empty() ? at::IntArrayRef() : w1[0].sizes());
  const int64_t E = w1.size(), d_ff = w1[0].size(0);
  check_group(w1, "w1", false, E, {d_ff, d}, x);
  check_group(w2, "w2", false, E, {d, d_ff}, x);
  check_group(b1, "b1", true, E, {d_ff}, x);
  check_group(b2, "b2", true, E, {d}, x);
  check_group(w_gate, "w_gate", true, E, {d_ff, d}, x);
  check_group(b_gate, "b_gate", true, E, {d_ff}, x);
  TORCH_CHECK(!w_gate.empty() || b_gate.empty(), "switch_mlp: b_gate is given without w_gate");
  TORCH_CHECK(scale.sizes() == at::IntArrayRef{T} && scale.scalar_type() == x.scalar_type() && scale.device().is_cpu(),
              "switch_mlp: scale must be a CPU ", x.scalar_type(), " [", T, "] tensor, got ", scale.scalar_type(), " ",
              scale.sizes(), " on ", scale.device());
  const std::pair<const at::Tensor*, const char*> index_tensors[] = {{&order, "order"}, {&offsets, "offsets"},
                                                                      {&kept, "kept"}};
  const int64_t index_sizes[] = {T, E + 1, E};
  for (int i = 0; i < 3; ++i) {
    const at::Tensor& tensor = *index_tensors[i].first;
    TORCH_CHECK(tensor.dim() == 1 && tensor.size(0) == index_sizes[i] && tensor.scalar_type() == at::kLong &&
                    tensor.device().is_cpu(),
                "switch_mlp: ", index_tensors[i].second, " must be a CPU int64 [", index_sizes[i], "] tensor, got ",
                tensor.scalar_type(), " ", tensor.sizes(), " on ", tensor.device());
  }
  const at::Tensor offsets_c = offsets.contiguous(), kept_c = kept.contiguous(), order_c = order.contiguous();
  const int64_t* offset = offsets_c.data_ptr<int64_t>();
  const int64_t* n_kept = kept_c.data_ptr<int64_t>();
  TORCH_CHECK(offset[0] == 0 && offset[E] == T, "switch_mlp: offsets must start at 0 and end at T=", T, ", got ",
              offset[0], " and ", offset[E]);
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(offset[e] <= offset[e + 1], "switch_mlp: offsets must be non-decreasing, offsets[", e,
                "]=", offset[e], " > offsets[", e + 1, "]=", offset[e + 1]);
    TORCH_CHECK(n_kept[e] >= 0 && n_kept[e] <= offset[e + 1] - offset[e], "switch_mlp: kept[", e, "]=", n_kept[e],
                " must lie in [0, ", offset[e + 1] - offset[e], "] (the tokens routed to expert ", e, ")");
  }
  // O(T) with one byte per token: negligible next to the products
  std::vector<uint8_t> seen(T, 0);
  const int64_t* token = order_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < T; ++i) {
    TORCH_CHECK(token[i] >= 0 && token[i] < T && !seen[token[i]], "switch_mlp: order must be a permutation of 0..",
                T - 1, ", got ", token[i], " at position ", i);
    seen[token[i]] = 1;
  }
}

// Everything the per-expert kernels read, in the compute dtype (float32 for
// bf16/fp16 inputs, else the input dtype).
using Group = std::vector<at::Tensor>;

struct Problem {
  at::Tensor x, scale;
  Group w1, b1, w2, b2, w_gate, b_gate;  // one tensor per expert; empty biases / gate when absent
  const int64_t* order;
  const int64_t* offsets;
  const int64_t* kept;
  int64_t n_tokens, d_model, d_ff, n_experts, max_kept;
  Activation activation;
  at::Tensor order_storage, offsets_storage, kept_storage;  // keep the index pointers alive

  bool gated() const { return !w_gate.empty(); }
};

// Used in place when already in the compute dtype and contiguous (the usual
// float32/float64 case): no copy of the weights per call. Worker threads run
// below autograd (see for_each_expert), so no graph is recorded on them.
at::Tensor to_compute(const at::Tensor& tensor, at::ScalarType dtype) { return tensor.to(dtype).contiguous(); }

Group to_compute(at::TensorList group, at::ScalarType dtype) {
  Group out;
  out.reserve(group.size());
  for (const at::Tensor& tensor : group) out.push_back(to_compute(tensor, dtype));
  return out;
}

OptionalTensor expert_bias(const Group& bias, int64_t e) {
  return bias.empty() ? std::nullopt : OptionalTensor(bias[e]);
}

Problem make_problem(const at::Tensor& x, const at::Tensor& order, const at::Tensor& offsets, const at::Tensor& kept,
                     at::TensorList w1, at::TensorList b1, at::TensorList w2, at::TensorList b2,
                     at::TensorList w_gate, at::TensorList b_gate, const at::Tensor& scale,
                     c10::string_view activation) {
  check_inputs(x, order, offsets, kept, w1, b1, w2, b2, w_gate, b_gate, scale);
  const at::ScalarType dtype = at::toOpMathType(x.scalar_type());
  Problem p;
  p.activation = parse_activation(activation);
  p.x = to_compute(x, dtype);
  p.scale = to_compute(scale, dtype);
  p.w1 = to_compute(w1, dtype);
  p.w2 = to_compute(w2, dtype);
  p.b1 = to_compute(b1, dtype);
  p.b2 = to_compute(b2, dtype);
  p.w_gate = to_compute(w_gate, dtype);
  p.b_gate = to_compute(b_gate, dtype);
  p.order_storage = order.contiguous();
  p.offsets_storage = offsets.contiguous();
  p.kept_storage = kept.contiguous();
  p.order = p.order_storage.data_ptr<int64_t>();
  p.offsets = p.offsets_storage.data_ptr<int64_t>();
  p.kept = p.kept_storage.data_ptr<int64_t>();
  p.n_tokens = x.size(0);
  p.d_model = x.size(1);
  p.n_experts = w1.size();
  p.d_ff = w1[0].size(0);
  p.max_kept = 0;
  for (int64_t e = 0; e < p.n_experts; ++e) p.max_kept = std::max(p.max_kept, p.kept[e]);
  return p;
}

// Scratch blocks of max_kept rows, one set per thread: expert e uses their
// first kept[e] rows (a contiguous prefix).
struct Buffers {
  std::vector<at::Tensor> blocks;

  Buffers(const Problem& p, std::initializer_list<int64_t> widths) {
    for (int64_t width : widths) blocks.push_back(at::empty({p.max_kept, width}, p.x.options()));
  }
  at::Tensor rows(size_t buffer, int64_t n) const { return blocks[buffer].narrow(0, 0, n); }
};

// Runs body(e, buffers) for every expert. Experts run side by side (one
// single-threaded BLAS call each) unless one expert holds more than a thread's
// share of the kept tokens; then they run one after the other and BLAS uses
// every thread. Measured forward on 2 cores (T=2048, d=128, d_ff=256), side by
// side was as fast or faster for E=4 and E=64, and for E=4 at T=4096, d=256,
// d_ff=1024 too: splitting experts beats splitting each product when the
// load is balanced.
template <typename Body>
void for_each_expert(const Problem& p, std::initializer_list<int64_t> buffer_widths, const Body& body) {
  const int64_t threads = at::get_num_threads();
  int64_t total_kept = 0;
  for (int64_t e = 0; e < p.n_experts; ++e) total_kept += p.kept[e];
  auto run = [&](int64_t begin, int64_t end) {
    // worker threads do not inherit the dispatcher state of the calling kernel
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Buffers buffers(p, buffer_widths);
    for (int64_t e = begin; e < end; ++e) body(e, buffers);
  };
  if (threads > 1 && p.n_experts >= threads && p.max_kept * threads <= total_kept) {
    at::parallel_for(0, p.n_experts, 1, run);
  } else {
    run(0, p.n_experts);
  }
}

template <typename T>
void gather_rows(const at::Tensor& source, const int64_t* tokens, int64_t n, at::Tensor& block) {
  const int64_t width = source.size(1);
  const T* src = source.const_data_ptr<T>();
  T* dst = block.data_ptr<T>();
  for (int64_t i = 0; i < n; ++i) std::memcpy(dst + i * width, src + tokens[i] * width, width * sizeof(T));
}

// out[c] = sum_i block[i, c]; row-wise accumulation (a column reduction through
// at::sum is several times slower at these shapes)
template <typename T>
void column_sums(const T* block, int64_t rows, int64_t width, T* out) {
  std::fill_n(out, width, T(0));
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t c = 0; c < width; ++c) out[c] += block[i * width + c];
  }
}

// out = input @ weightᵀ (+ bias), weight [out_features, in_features]
void linear_into(at::Tensor out, const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias) {
  if (bias.has_value()) {
    at::addmm_out(out, *bias, input, weight.t());
  } else {
    at::mm_out(out, input, weight.t());
  }
}

template <typename T>
void forward(const Problem& p, at::Tensor& y, at::Tensor& hidden) {
  const int64_t d = p.d_model, d_ff = p.d_ff, hidden_width = hidden.size(1);
  const T* x = p.x.const_data_ptr<T>();
  const T* scale = p.scale.const_data_ptr<T>();
  T* out = y.data_ptr<T>();
  T* saved = hidden.data_ptr<T>();
  for_each_expert(p, {d, d_ff, d}, [&](int64_t e, const Buffers& buffers) {
    const int64_t begin = p.offsets[e], end = p.offsets[e + 1], n = p.kept[e];
    const int64_t* tokens = p.order + begin;
    if (n > 0) {
      at::Tensor block = buffers.rows(0, n);
      at::Tensor activated = buffers.rows(1, n);
      at::Tensor expert_out = buffers.rows(2, n);
      gather_rows<T>(p.x, tokens, n, block);
      const at::Tensor pre = hidden.narrow(0, begin, n);
      linear_into(pre.narrow(1, 0, d_ff), block, p.w1[e], expert_bias(p.b1, e));
      if (p.gated()) linear_into(pre.narrow(1, d_ff, d_ff), block, p.w_gate[e], expert_bias(p.b_gate, e));
      with_activation(p.activation, p.gated(), [&](auto act, auto gated) {
        activate_rows<decltype(act)::value, decltype(gated)::value>(saved + begin * hidden_width, hidden_width, n, d_ff,
                                      activated.data_ptr<T>());
      });
      linear_into(expert_out, activated, p.w2[e], expert_bias(p.b2, e));
      const T* u = expert_out.const_data_ptr<T>();
      for (int64_t i = 0; i < n; ++i) {
        const T s = scale[tokens[i]];
        T* row = out + tokens[i] * d;
        for (int64_t c = 0; c < d; ++c) row[c] = s * u[i * d + c];
      }
    }
    for (int64_t i = n; i < end - begin; ++i) {
      const int64_t t = tokens[i];
      const T s = scale[t];
      for (int64_t c = 0; c < d; ++c) out[t * d + c] = s * x[t * d + c];
      std::fill_n(saved + (begin + i) * hidden_width, hidden_width, T(0));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> switch_mlp_cpu(const at::Tensor& x, const at::Tensor& order,
                                                  const at::Tensor& offsets, const at::Tensor& kept, at::TensorList w1,
                                                  at::TensorList b1, at::TensorList w2, at::TensorList b2,
                                                  at::TensorList w_gate, at::TensorList b_gate,
                                                  const at::Tensor& scale, c10::string_view activation) {
  const Problem p = make_problem(x, order, offsets, kept, w1, b1, w2, b2, w_gate, b_gate, scale, activation);
  at::Tensor y = at::empty({p.n_tokens, p.d_model}, p.x.options());
  at::Tensor hidden = at::empty({p.n_tokens, (p.gated() ? 2 : 1) * p.d_ff}, p.x.options());
  AT_DISPATCH_FLOATING_TYPES(p.x.scalar_type(), "switch_mlp_cpu", [&] { forward<scalar_t>(p, y, hidden); });
  return {y.to(x.scalar_type()), hidden};
}

struct Gradients {
  at::Tensor x, scale;
  Group w1, b1, w2, b2, w_gate, b_gate;  // like the Problem's groups
};

template <typename T>
void backward(const Problem& p, const at::Tensor& grad_y, const at::Tensor& hidden, Gradients& grads) {
  const int64_t d = p.d_model, d_ff = p.d_ff, hidden_width = hidden.size(1);
  const T* x = p.x.const_data_ptr<T>();
  const T* scale = p.scale.const_data_ptr<T>();
  const T* g = grad_y.const_data_ptr<T>();
  const T* saved = hidden.const_data_ptr<T>();
  T* grad_x = grads.x.data_ptr<T>();
  T* grad_scale = grads.scale.data_ptr<T>();
  for_each_expert(p, {d, d, d, d_ff, d_ff, p.gated() ? d_ff : 0},
                  [&](int64_t e, const Buffers& buffers) {
    const int64_t begin = p.offsets[e], end = p.offsets[e + 1], n = p.kept[e];
    const int64_t* tokens = p.order + begin;
    if (n == 0) {
      // no token reached this expert's weights
      for (Group* group : {&grads.w1, &grads.b1, &grads.w2, &grads.b2, &grads.w_gate, &grads.b_gate}) {
        if (!group->empty()) (*group)[e].zero_();
      }
    } else {
      at::Tensor block = buffers.rows(0, n);
      at::Tensor grad_out = buffers.rows(1, n);
      at::Tensor scaled_grad_out = buffers.rows(2, n);
      at::Tensor activated = buffers.rows(3, n);
      at::Tensor grad_pre = buffers.rows(4, n);
      at::Tensor grad_gate = buffers.rows(5, n);
      gather_rows<T>(p.x, tokens, n, block);
      gather_rows<T>(grad_y, tokens, n, grad_out);
      const T* a = activated.const_data_ptr<T>();
      T* gu = scaled_grad_out.data_ptr<T>();
      const T* go = grad_out.const_data_ptr<T>();
      with_activation(p.activation, p.gated(), [&](auto act, auto gated) {
        activate_rows<decltype(act)::value, decltype(gated)::value>(saved + begin * hidden_width, hidden_width, n, d_ff,
                                      activated.data_ptr<T>());
      });
      for (int64_t i = 0; i < n; ++i) {
        const T s = scale[tokens[i]];
        for (int64_t c = 0; c < d; ++c) gu[i * d + c] = s * go[i * d + c];
      }
      at::mm_out(grads.w2[e], scaled_grad_out.t(), activated);
      if (!grads.b2.empty()) column_sums(gu, n, d, grads.b2[e].data_ptr<T>());
      // grad_pre first holds grad_out @ w2 (unscaled): its dot with the
      // activations is the scale gradient without a second forward product
      at::mm_out(grad_pre, grad_out, p.w2[e]);
      T* gp = grad_pre.data_ptr<T>();
      T* gg = p.gated() ? grad_gate.data_ptr<T>() : nullptr;
      const T* b2 = p.b2.empty() ? nullptr : p.b2[e].const_data_ptr<T>();
      for (int64_t i = 0; i < n; ++i) {
        // simd reductions: a strict left-to-right sum would serialise on the add latency
        T dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < d_ff; ++j) dot += gp[i * d_ff + j] * a[i * d_ff + j];
        if (b2) {
#pragma omp simd reduction(+ : dot)
          for (int64_t c = 0; c < d; ++c) dot += go[i * d + c] * b2[c];
        }
        grad_scale[tokens[i]] = dot;
      }
      with_activation(p.activation, p.gated(), [&](auto act, auto gated) {
        for (int64_t i = 0; i < n; ++i) {
          const T s = scale[tokens[i]];
          const T* h = saved + (begin + i) * hidden_width;
          T* grad_row = gp + i * d_ff;
          for (int64_t j = 0; j < d_ff; ++j) {
            const T grad_activated = s * grad_row[j];
            if constexpr (decltype(gated)::value) {
              gg[i * d_ff + j] = grad_activated * activate<decltype(act)::value>(h[j]);
              grad_row[j] = grad_activated * h[d_ff + j] * activate_derivative<decltype(act)::value>(h[j]);
            } else {
              grad_row[j] = grad_activated * activate_derivative<decltype(act)::value>(h[j]);
            }
          }
        }
      });
      at::mm_out(grads.w1[e], grad_pre.t(), block);
      if (!grads.b1.empty()) column_sums(gp, n, d_ff, grads.b1[e].data_ptr<T>());
      at::Tensor grad_block = scaled_grad_out;  // no longer needed: reuse its rows
      at::mm_out(grad_block, grad_pre, p.w1[e]);
      if (p.gated()) {
        at::mm_out(grads.w_gate[e], grad_gate.t(), block);
        if (!grads.b_gate.empty()) column_sums(gg, n, d_ff, grads.b_gate[e].data_ptr<T>());
        grad_block.addmm_(grad_gate, p.w_gate[e]);
      }
      const T* gx = grad_block.const_data_ptr<T>();
      for (int64_t i = 0; i < n; ++i) std::memcpy(grad_x + tokens[i] * d, gx + i * d, d * sizeof(T));
    }
    for (int64_t i = n; i < end - begin; ++i) {
      const int64_t t = tokens[i];
      const T s = scale[t];
      T dot = 0;
      for (int64_t c = 0; c < d; ++c) {
        grad_x[t * d + c] = s * g[t * d + c];
        dot += g[t * d + c] * x[t * d + c];
      }
      grad_scale[t] = dot;
    }
  });
}

Group empty_like(const Group& group) {
  Group out;
  out.reserve(group.size());
  for (const at::Tensor& tensor : group) out.push_back(at::empty_like(tensor));
  return out;
}

Group to_dtype(const Group& group, at::ScalarType dtype) {
  Group out;
  out.reserve(group.size());
  for (const at::Tensor& tensor : group) out.push_back(tensor.to(dtype));
  return out;
}

std::tuple<at::Tensor, Group, Group, Group, Group, Group, Group, at::Tensor> switch_mlp_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& order, const at::Tensor& offsets,
    const at::Tensor& kept, at::TensorList w1, at::TensorList b1, at::TensorList w2, at::TensorList b2,
    at::TensorList w_gate, at::TensorList b_gate, const at::Tensor& scale, const at::Tensor& hidden,
    c10::string_view activation) {
  const Problem p = make_problem(x, order, offsets, kept, w1, b1, w2, b2, w_gate, b_gate, scale, activation);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "switch_mlp_backward: grad_y must be ", x.sizes(), ", got ",
              grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "switch_mlp_backward: grad_y dtype ", grad_y.scalar_type(),
              " must equal x dtype ", x.scalar_type());
  const int64_t hidden_width = (p.gated() ? 2 : 1) * p.d_ff;
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) == p.n_tokens && hidden.size(1) == hidden_width &&
                  hidden.scalar_type() == p.x.scalar_type(),
              "switch_mlp_backward: hidden must be ", p.x.scalar_type(), " [", p.n_tokens, ", ", hidden_width,
              "] as switch_mlp returned it, got ", hidden.scalar_type(), " ", hidden.sizes());
  const at::Tensor grad = to_compute(grad_y, p.x.scalar_type());
  const at::Tensor saved = hidden.contiguous();
  Gradients grads;
  grads.x = at::empty_like(p.x);
  grads.scale = at::empty_like(p.scale);
  grads.w1 = empty_like(p.w1);
  grads.w2 = empty_like(p.w2);
  grads.b1 = empty_like(p.b1);
  grads.b2 = empty_like(p.b2);
  grads.w_gate = empty_like(p.w_gate);
  grads.b_gate = empty_like(p.b_gate);
  AT_DISPATCH_FLOATING_TYPES(p.x.scalar_type(), "switch_mlp_backward_cpu",
                             [&] { backward<scalar_t>(p, grad, saved, grads); });
  const at::ScalarType dtype = x.scalar_type();
  return {grads.x.to(dtype),           to_dtype(grads.w1, dtype),     to_dtype(grads.b1, dtype),
          to_dtype(grads.w2, dtype),   to_dtype(grads.b2, dtype),     to_dtype(grads.w_gate, dtype),
          to_dtype(grads.b_gate, dtype), grads.scale.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastformers, CPU, m) {
  m.impl("switch_mlp", &switch_mlp_cpu);
  m.impl("switch_mlp_backward", &switch_mlp_backward_cpu);
}

}  // namespace fastformers
