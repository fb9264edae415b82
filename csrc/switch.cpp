// CPU kernels of the Switch Transformer grouped expert FFN
//   y[t] = scale[t] * layer2(dropout(act(layer1(x[t])) [* linear_v(x[t])]))   kept tokens of expert e
//   y[t] = scale[t] * x[t]                                                      dropped tokens
// and its backward (which regenerates the dropout mask, [T, d_ff] by token row). Tokens are grouped by expert in `order` (segment
// offsets[e] .. offsets[e + 1], the first kept[e] of it kept); each expert's
// kept rows are gathered into a contiguous block so every product is one BLAS
// call. Two op pairs share these kernels: switch_mlp{,_backward} take each
// weight kind as a list of per-expert tensors (one nn.Linear per expert, read
// in place), switch_mlp_stacked{,_backward} as one [E, ...] tensor and write
// every weight gradient straight into one [E, ...] tensor (no per-expert
// outputs to stack). Schemas live in fastformers/ops/switch/op.py.
// The activation loops select (ReLU's h > 0 ? g : 0) per element: under the
// default trapping-math GCC keeps those selects as branches on AVX2 (no masked
// ops), which left the backward's activation loop scalar at ~5 ns per element,
// about half the time of the four GEMMs next to it (perf, E = 4, labml size).
// No kernel here reads floating-point exception flags. Set before every
// include: a function whose options differ from an inline one's cannot inline it.
#pragma GCC optimize("no-trapping-math")

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "activations.h"
#include "cpu_utils.h"
#include "philox.h"

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <typeindex>
#include <utility>
#include <vector>

namespace fastformers {
namespace {

using activations::Activation;
using activations::activate;
using activations::activation_grad;

// Calls body(activation, gated) with both as compile-time constants, so the
// elementwise loops carry no per-element branch.
template <typename Body>
void with_activation(Activation activation, bool gated, const Body& body) {
  activations::dispatch(activation, [&](auto act) {
    if (gated) {
      body(act, std::true_type{});
    } else {
      body(act, std::false_type{});
    }
  });
}

// The weights of one kind for every expert: E tensors (one nn.Linear per
// expert, as labml holds them) or one stacked [E, ...] tensor; none when absent
// (no bias, no gate). Kernels find expert e's data through data(e), so both
// layouts run the same code; gradients are allocated in the layout of their weight.
class Group {
 public:
  Group() = default;

  static Group per_expert(at::TensorList tensors) {
    Group group;
    for (const at::Tensor& tensor : tensors) group.tensors_.push_back(tensor.contiguous());
    if (!group.tensors_.empty()) group.expert_numel_ = group.tensors_[0].numel();
    return group;
  }

  static Group stacked(const std::optional<at::Tensor>& tensor) {
    Group group;
    group.stacked_ = true;
    if (tensor.has_value()) {
      TORCH_CHECK(tensor->dim() >= 1, "switch_mlp: stacked weights must be [n_experts, ...], got a scalar");
      group.tensors_.push_back(tensor->contiguous());
      group.expert_numel_ = tensor->dim() > 0 && tensor->size(0) > 0 ? tensor->numel() / tensor->size(0) : 0;
    }
    return group;
  }

  bool empty() const { return tensors_.empty(); }
  // experts held (0 when absent)
  int64_t size() const {
    if (empty()) return 0;
    return stacked_ ? tensors_[0].size(0) : static_cast<int64_t>(tensors_.size());
  }
  // shape of one expert's tensor; the group must hold at least one expert
  at::IntArrayRef expert_sizes() const { return stacked_ ? tensors_[0].sizes().slice(1) : tensors_[0].sizes(); }
  int64_t expert_numel() const { return expert_numel_; }
  at::ScalarType scalar_type() const { return tensors_[0].scalar_type(); }

  template <typename T>
  T* data(int64_t e) const {
    return stacked_ ? tensors_[0].data_ptr<T>() + e * expert_numel_ : tensors_[e].data_ptr<T>();
  }

  // One uninitialised gradient block per tensor of this group, in its layout:
  // per-expert blocks (outputs of the list op must not alias each other) or one [E, ...] block.
  Group empty_like() const {
    Group out;
    out.stacked_ = stacked_;
    out.expert_numel_ = expert_numel_;
    for (const at::Tensor& tensor : tensors_) {
      out.tensors_.push_back(cpu::RecycledBlocks::empty(tensor.sizes(), tensor.options()));
    }
    return out;
  }

  size_t block_bytes() const {
    size_t bytes = 0;
    for (const at::Tensor& tensor : tensors_) {
      bytes += cpu::RecycledBlocks::block_bytes(tensor.numel(), tensor.scalar_type());
    }
    return bytes;
  }

  const std::vector<at::Tensor>& tensors() const { return tensors_; }
  std::optional<at::Tensor> stacked_tensor() const {
    return empty() ? std::nullopt : std::optional<at::Tensor>(tensors_[0]);
  }

  // Shape, dtype and device of every expert's tensor; none held is fine when `optional`.
  void check(const char* name, bool optional, int64_t E, at::IntArrayRef shape, const at::Tensor& x) const {
    if (stacked_) {
      if (empty()) {
        TORCH_CHECK(optional, "switch_mlp: ", name, " is required");
        return;
      }
      std::vector<int64_t> expected{E};
      expected.insert(expected.end(), shape.begin(), shape.end());
      check_tensor(tensors_[0], name, "", expected, x);
      return;
    }
    TORCH_CHECK((optional && empty()) || size() == E, "switch_mlp: ", name, " must hold ", E,
                " tensors (one per expert)", optional ? " or none" : "", ", got ", size());
    for (int64_t e = 0; e < size(); ++e) {
      check_tensor(tensors_[e], name, "[" + std::to_string(e) + "]", shape, x);
    }
  }

 private:
  static void check_tensor(const at::Tensor& tensor, const char* name, const std::string& index,
                           at::IntArrayRef shape, const at::Tensor& x) {
    TORCH_CHECK(tensor.sizes() == shape, "switch_mlp: ", name, index, " must be ", shape, ", got ", tensor.sizes());
    TORCH_CHECK(tensor.scalar_type() == x.scalar_type(), "switch_mlp: ", name, index, " dtype ",
                tensor.scalar_type(), " must equal x dtype ", x.scalar_type());
    TORCH_CHECK(tensor.device().is_cpu(), "switch_mlp: CPU kernel got ", name, index, " on ", tensor.device());
  }

  std::vector<at::Tensor> tensors_;
  bool stacked_ = false;
  int64_t expert_numel_ = 0;
};

// Checks shapes, dtypes and that the routing is a valid grouping: the kernels
// write each token's row from exactly one expert, which needs order to be a
// permutation and the segments to tile [0, T).
void check_inputs(const at::Tensor& x, const at::Tensor& order, const at::Tensor& offsets, const at::Tensor& kept,
                  const Group& w1, const Group& b1, const Group& w2, const Group& b2, const Group& w_gate,
                  const Group& b_gate, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2, "switch_mlp: x must be [tokens, d_model], got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "switch_mlp: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), "switch_mlp: CPU kernel got x on ", x.device());
  const int64_t T = x.size(0), d = x.size(1);
  TORCH_CHECK(w1.size() >= 1 && w1.expert_sizes().size() == 2 && w1.expert_sizes()[1] == d,
              "switch_mlp: w1 must hold n_experts >= 1 matrices [d_ff, d_model=", d, "], got ", w1.size(),
              w1.size() == 0 ? "" : " of shape ", w1.size() == 0 ? at::IntArrayRef() : w1.expert_sizes());
  const int64_t E = w1.size(), d_ff = w1.expert_sizes()[0];
  w1.check("w1", false, E, {d_ff, d}, x);
  w2.check("w2", false, E, {d, d_ff}, x);
  b1.check("b1", true, E, {d_ff}, x);
  b2.check("b2", true, E, {d}, x);
  w_gate.check("w_gate", true, E, {d_ff, d}, x);
  b_gate.check("b_gate", true, E, {d_ff}, x);
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

// Everything the per-expert kernels read. x and the weights stay in their
// input dtype (In); bfloat16/float16 ones are converted to float32 (T) one
// expert at a time inside the parallel loop (rows of x as they are gathered),
// because BLAS has no fast bfloat16 GEMM on AVX2 CPUs: a [96, 128] x [128, 256]
// product measured 1.07 ms in bfloat16 (at::mm, oneDNN) against 78 us in
// float32 on one thread.
struct Problem {
  at::Tensor x;      // [T, d], input dtype
  at::Tensor scale;  // [T], compute dtype
  Group w1, b1, w2, b2, w_gate, b_gate;  // input dtype; empty biases / gate when absent
  const int64_t* order;
  const int64_t* offsets;
  const int64_t* kept;
  int64_t n_tokens, d_model, d_ff, n_experts, max_kept;
  Activation activation;
  philox::Dropout dropout;  // of the hidden activations, mask [T, d_ff] by token row
  at::Tensor order_storage, offsets_storage, kept_storage;  // keep the index pointers alive

  bool gated() const { return !w_gate.empty(); }
};

Problem make_problem(const at::Tensor& x, const at::Tensor& order, const at::Tensor& offsets, const at::Tensor& kept,
                     Group w1, Group b1, Group w2, Group b2, Group w_gate, Group b_gate, const at::Tensor& scale,
                     c10::string_view activation, double dropout_p, int64_t seed, int64_t offset) {
  check_inputs(x, order, offsets, kept, w1, b1, w2, b2, w_gate, b_gate, scale);
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "switch_mlp: dropout_p must be in [0, 1), got ", dropout_p);
  Problem p;
  const std::optional<Activation> known = activations::find(activation);
  TORCH_CHECK_VALUE(known.has_value(), "switch_mlp: activation must be one of 'relu', 'gelu', 'silu', 'sigmoid', "
                    "'identity', got '", std::string(activation), "'");
  p.activation = *known;
  p.dropout = philox::Dropout{dropout_p, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)};
  p.x = x.contiguous();
  p.scale = scale.to(at::toOpMathType(x.scalar_type())).contiguous();
  p.w1 = std::move(w1);
  p.w2 = std::move(w2);
  p.b1 = std::move(b1);
  p.b2 = std::move(b2);
  p.w_gate = std::move(w_gate);
  p.b_gate = std::move(b_gate);
  p.order_storage = order.contiguous();
  p.offsets_storage = offsets.contiguous();
  p.kept_storage = kept.contiguous();
  p.order = p.order_storage.data_ptr<int64_t>();
  p.offsets = p.offsets_storage.data_ptr<int64_t>();
  p.kept = p.kept_storage.data_ptr<int64_t>();
  p.n_tokens = x.size(0);
  p.d_model = x.size(1);
  p.n_experts = p.w1.size();
  p.d_ff = p.w1.expert_sizes()[0];
  p.max_kept = 0;
  for (int64_t e = 0; e < p.n_experts; ++e) p.max_kept = std::max(p.max_kept, p.kept[e]);
  return p;
}

// Per-thread scratch, reused across experts and calls: it grows to the largest
// block the thread has needed, so steady-state calls allocate nothing per
// expert. Each thread's registers with cpu::CacheRegistry, so that
// fastformers.empty_cache() frees it: for_each_expert holds the thread's
// `in_use` lock while its kernels use the buffers, and release() frees only
// the scratch of threads not inside a kernel (try_lock: it never waits on one).
class ThreadScratch {
 public:
  static ThreadScratch& mine() {
    thread_local ThreadScratch scratch;
    return scratch;
  }

  // Buffer `slot` of element type T with room for `elements`; the caller holds in_use.
  template <typename T>
  T* get(size_t slot, int64_t elements) {
    std::vector<std::max_align_t>& buffer = buffers_[{std::type_index(typeid(T)), slot}];
    const size_t words = (static_cast<size_t>(elements) * sizeof(T) + sizeof(std::max_align_t) - 1) /
                         sizeof(std::max_align_t);
    if (buffer.size() < words) {
      held_bytes_ -= buffer.capacity() * sizeof(std::max_align_t);
      buffer.resize(words);
      held_bytes_ += buffer.capacity() * sizeof(std::max_align_t);
    }
    return reinterpret_cast<T*>(buffer.data());
  }

  std::mutex in_use;

 private:
  ThreadScratch()
      : registry_id_(cpu::CacheRegistry::add(
            "switch_scratch", [this] { return held_bytes_.load(); }, [this] { return release(); })) {}
  ~ThreadScratch() { cpu::CacheRegistry::remove(registry_id_); }

  size_t release() {
    std::unique_lock<std::mutex> lock(in_use, std::try_to_lock);
    if (!lock.owns_lock()) return 0;
    buffers_.clear();
    return held_bytes_.exchange(0);
  }

  std::map<std::pair<std::type_index, size_t>, std::vector<std::max_align_t>> buffers_;
  std::atomic<size_t> held_bytes_{0};
  const size_t registry_id_;
};

template <typename T>
T* scratch(size_t slot, int64_t elements) {
  return ThreadScratch::mine().get<T>(slot, elements);
}

// The scratch slots of one thread's expert: each buffer of a forward or
// backward has its own, so a later one never moves an earlier one's data.
enum Slot : size_t {
  kBlock, kGradOut, kScaledGradOut, kActivated, kGradPre, kGradGate, kExpertOut, kKeepScale,
  kW1, kW2, kWGate, kB1, kB2, kBGate,  // weights converted to the compute dtype
  kGradW1, kGradW2, kGradWGate, kGradB1, kGradB2, kGradBGate,  // gradients before their conversion
};

template <typename From, typename To>
FASTFORMERS_VECTOR_CLONES void convert(const From* __restrict__ from, int64_t n, To* __restrict__ to) {
  for (int64_t i = 0; i < n; ++i) to[i] = static_cast<To>(from[i]);
}

// Expert e's tensor of `group` (stored as In) as T values: its own data when
// In is T, else a converted copy in scratch `slot`.
template <typename T, typename In>
const T* compute_data(const Group& group, int64_t e, Slot slot) {
  if constexpr (std::is_same_v<T, In>) {
    return group.data<T>(e);
  } else {
    T* out = scratch<T>(slot, group.expert_numel());
    convert(group.data<In>(e), group.expert_numel(), out);
    return out;
  }
}

template <typename T, typename In>
const T* compute_data_or_null(const Group& group, int64_t e, Slot slot) {
  return group.empty() ? nullptr : compute_data<T, In>(group, e, slot);
}

// The gradient of expert e's tensor of a group (stored as In), computed in T:
// written in place when In is T, else in scratch `slot` and converted by store().
template <typename T, typename In>
class ExpertGrad {
 public:
  ExpertGrad(const Group& group, int64_t e, Slot slot)
      : out_(group.empty() ? nullptr : group.data<In>(e)), numel_(group.expert_numel()) {
    if (out_ == nullptr) return;
    if constexpr (std::is_same_v<T, In>) {
      data_ = out_;
    } else {
      data_ = scratch<T>(slot, numel_);
    }
  }
  T* data() const { return data_; }
  void store() const {
    if constexpr (!std::is_same_v<T, In>) {
      if (out_ != nullptr) convert(data_, numel_, out_);
    }
  }

 private:
  In* out_;
  int64_t numel_;
  T* data_ = nullptr;
};

// Runs body(e) for every expert. Experts run side by side (one
// single-threaded BLAS call each) unless one expert holds more than a thread's
// share of the kept tokens; then they run one after the other and BLAS uses
// every thread. Measured forward on 2 cores (T=2048, d=128, d_ff=256), side by
// side was as fast or faster for E=4 and E=64, and for E=4 at T=4096, d=256,
// d_ff=1024 too: splitting experts beats splitting each product when the
// load is balanced.
template <typename Body>
void for_each_expert(const Problem& p, const Body& body) {
  const int64_t threads = at::get_num_threads();
  int64_t total_kept = 0;
  for (int64_t e = 0; e < p.n_experts; ++e) total_kept += p.kept[e];
  auto run = [&](int64_t begin, int64_t end) {
    // worker threads do not inherit the dispatcher state of the calling kernel
    // (matters only for the at::addmm fallback of cpu::gemm)
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::lock_guard<std::mutex> scratch_in_use(ThreadScratch::mine().in_use);
    for (int64_t e = begin; e < end; ++e) body(e);
  };
  if (threads > 1 && p.n_experts >= threads && p.max_kept * threads <= total_kept) {
    at::parallel_for(0, p.n_experts, 1, run);
  } else {
    run(0, p.n_experts);
  }
}

// block[i] = x[tokens[i]] for n rows of d, converted to T.
template <typename T, typename In>
void gather_rows(const In* x, const int64_t* tokens, int64_t n, int64_t d, T* block) {
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<T, In>) {
      std::memcpy(block + i * d, x + tokens[i] * d, d * sizeof(T));
    } else {
      convert(x + tokens[i] * d, d, block + i * d);
    }
  }
}

// Dropout multipliers (0 or 1 / (1 - p)) of the d_ff hidden activations of token t.
template <typename T>
const T* keep_scale_row(const philox::Dropout& dropout, int64_t t, int64_t d_ff) {
  T* multipliers = scratch<T>(kKeepScale, d_ff);
  philox::keep_scale<T>(dropout, t * d_ff, d_ff, scratch<uint8_t>(kKeepScale, d_ff), multipliers);
  return multipliers;
}

template <typename T>
FASTFORMERS_VECTOR_CLONES void multiply_row(T* __restrict__ row, const T* __restrict__ by, int64_t n) {
  for (int64_t j = 0; j < n; ++j) row[j] *= by[j];
}

// In place on n rows of hidden = [h1 | v] (the products without bias): adds
// the biases, then a[i] = dropout(act(h1[i]) (* v[i])); one pass over the rows.
template <Activation A, bool kGated, typename T>
FASTFORMERS_VECTOR_CLONES void bias_activate_rows(T* __restrict__ hidden, int64_t hidden_width, int64_t n,
                                                  int64_t d_ff, const T* __restrict__ b1,
                                                  const T* __restrict__ b_gate, const int64_t* tokens,
                                                  const philox::Dropout& dropout, T* __restrict__ a) {
  for (int64_t i = 0; i < n; ++i) {
    T* h = hidden + i * hidden_width;
    T* out = a + i * d_ff;
    if (b1) {
      for (int64_t j = 0; j < d_ff; ++j) h[j] += b1[j];
    }
    if constexpr (kGated) {
      if (b_gate) {
        for (int64_t j = 0; j < d_ff; ++j) h[d_ff + j] += b_gate[j];
      }
      for (int64_t j = 0; j < d_ff; ++j) out[j] = activate<A>(h[j]) * h[d_ff + j];
    } else {
      for (int64_t j = 0; j < d_ff; ++j) out[j] = activate<A>(h[j]);
    }
    if (dropout.active()) multiply_row(out, keep_scale_row<T>(dropout, tokens[i], d_ff), d_ff);
  }
}

// out[tokens[i]] = scale[tokens[i]] * (u[i] + b2): bias, scale and scatter in one pass.
template <typename T, typename In>
FASTFORMERS_VECTOR_CLONES void scale_scatter_rows(const T* __restrict__ u, const T* __restrict__ b2,
                                                  const int64_t* tokens, int64_t n, int64_t d,
                                                  const T* __restrict__ scale, In* __restrict__ out) {
  for (int64_t i = 0; i < n; ++i) {
    const T s = scale[tokens[i]];
    In* row = out + tokens[i] * d;
    const T* src = u + i * d;
    if (b2) {
      for (int64_t c = 0; c < d; ++c) row[c] = static_cast<In>(s * (src[c] + b2[c]));
    } else {
      for (int64_t c = 0; c < d; ++c) row[c] = static_cast<In>(s * src[c]);
    }
  }
}

template <typename T, typename In>
void forward(const Problem& p, at::Tensor& y, at::Tensor& hidden) {
  const int64_t d = p.d_model, d_ff = p.d_ff, hidden_width = hidden.size(1);
  const In* x = p.x.const_data_ptr<In>();
  const T* scale = p.scale.const_data_ptr<T>();
  In* out = y.data_ptr<In>();
  T* saved = hidden.data_ptr<T>();
  for_each_expert(p, [&](int64_t e) {
    const int64_t begin = p.offsets[e], end = p.offsets[e + 1], n = p.kept[e];
    const int64_t* tokens = p.order + begin;
    if (n > 0) {
      T* block = scratch<T>(kBlock, n * d);
      T* activated = scratch<T>(kActivated, n * d_ff);
      T* expert_out = scratch<T>(kExpertOut, n * d);
      T* pre = saved + begin * hidden_width;
      gather_rows(x, tokens, n, d, block);
      cpu::gemm<T>(false, true, n, d_ff, d, T(1), block, d, compute_data<T, In>(p.w1, e, kW1), d, T(0), pre,
                   hidden_width);
      if (p.gated()) {
        cpu::gemm<T>(false, true, n, d_ff, d, T(1), block, d, compute_data<T, In>(p.w_gate, e, kWGate), d, T(0),
                     pre + d_ff, hidden_width);
      }
      const T* b1 = compute_data_or_null<T, In>(p.b1, e, kB1);
      const T* b_gate = compute_data_or_null<T, In>(p.b_gate, e, kBGate);
      with_activation(p.activation, p.gated(), [&](auto act, auto gated) {
        bias_activate_rows<decltype(act)::value, decltype(gated)::value>(pre, hidden_width, n, d_ff, b1, b_gate,
                                                                          tokens, p.dropout, activated);
      });
      cpu::gemm<T>(false, true, n, d, d_ff, T(1), activated, d_ff, compute_data<T, In>(p.w2, e, kW2), d_ff, T(0),
                   expert_out, d);
      scale_scatter_rows<T, In>(expert_out, compute_data_or_null<T, In>(p.b2, e, kB2), tokens, n, d, scale, out);
    }
    for (int64_t i = n; i < end - begin; ++i) {
      const int64_t t = tokens[i];
      const T s = scale[t];
      for (int64_t c = 0; c < d; ++c) out[t * d + c] = static_cast<In>(s * static_cast<T>(x[t * d + c]));
      std::fill_n(saved + (begin + i) * hidden_width, hidden_width, T(0));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const Problem& p) {
  // from the recycled blocks: fresh pages for hidden alone were 8K faults per
  // step at T=4096, d_ff=2048 (the backward's fit() covers both)
  at::Tensor y = cpu::RecycledBlocks::empty({p.n_tokens, p.d_model}, p.x.options());
  at::Tensor hidden =
      cpu::RecycledBlocks::empty({p.n_tokens, (p.gated() ? 2 : 1) * p.d_ff}, p.scale.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "switch_mlp_cpu", [&] {
    forward<at::opmath_type<scalar_t>, scalar_t>(p, y, hidden);
  });
  return {y, hidden};
}

std::tuple<at::Tensor, at::Tensor> switch_mlp_cpu(const at::Tensor& x, const at::Tensor& order,
                                                  const at::Tensor& offsets, const at::Tensor& kept, at::TensorList w1,
                                                  at::TensorList b1, at::TensorList w2, at::TensorList b2,
                                                  at::TensorList w_gate, at::TensorList b_gate,
                                                  const at::Tensor& scale, c10::string_view activation,
                                                  double dropout_p, int64_t seed, int64_t offset) {
  return forward_cpu(make_problem(x, order, offsets, kept, Group::per_expert(w1), Group::per_expert(b1),
                                  Group::per_expert(w2), Group::per_expert(b2), Group::per_expert(w_gate),
                                  Group::per_expert(b_gate), scale, activation, dropout_p, seed, offset));
}

std::tuple<at::Tensor, at::Tensor> switch_mlp_stacked_cpu(
    const at::Tensor& x, const at::Tensor& order, const at::Tensor& offsets, const at::Tensor& kept,
    const at::Tensor& w1, const std::optional<at::Tensor>& b1, const at::Tensor& w2,
    const std::optional<at::Tensor>& b2, const std::optional<at::Tensor>& w_gate,
    const std::optional<at::Tensor>& b_gate, const at::Tensor& scale, c10::string_view activation, double dropout_p,
    int64_t seed, int64_t offset) {
  return forward_cpu(make_problem(x, order, offsets, kept, Group::stacked(w1), Group::stacked(b1),
                                  Group::stacked(w2), Group::stacked(b2), Group::stacked(w_gate),
                                  Group::stacked(b_gate), scale, activation, dropout_p, seed, offset));
}

struct Gradients {
  at::Tensor x;      // input dtype
  at::Tensor scale;  // compute dtype
  Group w1, b1, w2, b2, w_gate, b_gate;  // like the Problem's groups, input dtype
};

// Gathers n rows of x and of grad_y into blocks, writes the scaled grad rows
// and accumulates the b2 gradient (the column sums of the scaled grad), and
// starts each token's scale gradient at grad_y[t] . b2: one pass.
template <typename T, typename In>
FASTFORMERS_VECTOR_CLONES void gather_backward_rows(const In* __restrict__ x, const In* __restrict__ grad_y,
                                                    const int64_t* tokens, int64_t n, int64_t d,
                                                    const T* __restrict__ scale, const T* __restrict__ b2,
                                                    T* __restrict__ block, T* __restrict__ grad_out,
                                                    T* __restrict__ scaled_grad_out, T* __restrict__ grad_b2,
                                                    T* __restrict__ grad_scale) {
  if (grad_b2) std::fill_n(grad_b2, d, T(0));
  gather_rows(x, tokens, n, d, block);
  gather_rows(grad_y, tokens, n, d, grad_out);
  for (int64_t i = 0; i < n; ++i) {
    const T s = scale[tokens[i]];
    const T* go = grad_out + i * d;
    T* gu = scaled_grad_out + i * d;
    for (int64_t c = 0; c < d; ++c) gu[c] = s * go[c];
    T dot = 0;
    if (b2) {
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < d; ++c) dot += go[c] * b2[c];
      for (int64_t c = 0; c < d; ++c) grad_b2[c] += gu[c];
    }
    grad_scale[tokens[i]] = dot;
  }
}

// One token row of activation_backward_rows: a = act(h1) (* v), grad_gate
// and the pre-activation gradient into gp (which holds the gradient of a on
// entry, before the scale s); returns a . grad for the scale gradient. Its own
// function so that its loop compiles alone: inlined into the row loop, GCC
// unswitched that loop on the optional bias gradients and left the copy that
// runs with biases scalar.
template <Activation A, bool kGated, typename T>
FASTFORMERS_VECTOR_CLONES __attribute__((noinline)) T activation_backward_row(const T* __restrict__ h, int64_t d_ff,
                                                                              T s, T* __restrict__ a,
                                                                              T* __restrict__ gp,
                                                                              T* __restrict__ grad_gate) {
  T dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < d_ff; ++j) {
    const T act = activate<A>(h[j]);
    const T grad_activated = gp[j];
    if constexpr (kGated) {
      const T v = h[d_ff + j];
      a[j] = act * v;
      dot += grad_activated * act * v;
      grad_gate[j] = s * grad_activated * act;
      gp[j] = activation_grad<A>(h[j], s * grad_activated * v);
    } else {
      a[j] = act;
      dot += grad_activated * act;
      gp[j] = activation_grad<A>(h[j], s * grad_activated);
    }
  }
  return dot;
}

// sums[j] = sum over the n rows of rows[i, j] (a bias gradient).
template <typename T>
FASTFORMERS_VECTOR_CLONES void column_sums(const T* __restrict__ rows, int64_t n, int64_t width,
                                           T* __restrict__ sums) {
  std::fill_n(sums, width, T(0));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < width; ++j) sums[j] += rows[i * width + j];
  }
}

// n rows of hidden = [h1 | v], with grad_pre holding grad_out @ w2 (the
// gradient of the activated rows after dropout, before the scale) on entry:
// recomputes a = dropout(act(h1) (* v)) for the w2 gradient, adds a . grad to
// the token's scale gradient, and turns grad_pre into the pre-activation
// gradient (grad_gate the gate's), then sums the b1 / b_gate gradients.
// Dropout multiplies grad_pre before and a after each row's loop.
template <Activation A, bool kGated, typename T>
void activation_backward_rows(const T* hidden, int64_t hidden_width, const int64_t* tokens, int64_t n, int64_t d_ff,
                              const T* scale, const philox::Dropout& dropout, T* activated, T* grad_pre,
                              T* grad_gate, T* grad_b1, T* grad_b_gate, T* grad_scale) {
  for (int64_t i = 0; i < n; ++i) {
    T* a = activated + i * d_ff;
    T* gp = grad_pre + i * d_ff;
    const T* keep = dropout.active() ? keep_scale_row<T>(dropout, tokens[i], d_ff) : nullptr;
    if (keep) multiply_row(gp, keep, d_ff);
    grad_scale[tokens[i]] += activation_backward_row<A, kGated, T>(hidden + i * hidden_width, d_ff, scale[tokens[i]],
                                                                   a, gp, kGated ? grad_gate + i * d_ff : nullptr);
    if (keep) multiply_row(a, keep, d_ff);
  }
  if (grad_b1) column_sums(grad_pre, n, d_ff, grad_b1);
  if (kGated && grad_b_gate) column_sums(grad_gate, n, d_ff, grad_b_gate);
}

template <typename T, typename In>
void backward(const Problem& p, const at::Tensor& grad_y, const at::Tensor& hidden, Gradients& grads) {
  const int64_t d = p.d_model, d_ff = p.d_ff, hidden_width = hidden.size(1);
  const In* x = p.x.const_data_ptr<In>();
  const T* scale = p.scale.const_data_ptr<T>();
  const In* g = grad_y.const_data_ptr<In>();
  const T* saved = hidden.const_data_ptr<T>();
  In* grad_x = grads.x.data_ptr<In>();
  T* grad_scale = grads.scale.data_ptr<T>();
  for_each_expert(p, [&](int64_t e) {
    const int64_t begin = p.offsets[e], end = p.offsets[e + 1], n = p.kept[e];
    const int64_t* tokens = p.order + begin;
    if (n == 0) {
      // no token reached this expert's weights
      for (const Group* group : {&grads.w1, &grads.b1, &grads.w2, &grads.b2, &grads.w_gate, &grads.b_gate}) {
        if (!group->empty()) std::fill_n(group->data<In>(e), group->expert_numel(), In(0));
      }
    } else {
      T* block = scratch<T>(kBlock, n * d);
      T* grad_out = scratch<T>(kGradOut, n * d);
      T* scaled_grad_out = scratch<T>(kScaledGradOut, n * d);
      T* activated = scratch<T>(kActivated, n * d_ff);
      T* grad_pre = scratch<T>(kGradPre, n * d_ff);
      T* grad_gate = p.gated() ? scratch<T>(kGradGate, n * d_ff) : nullptr;
      const ExpertGrad<T, In> grad_w1(grads.w1, e, kGradW1), grad_w2(grads.w2, e, kGradW2),
          grad_w_gate(grads.w_gate, e, kGradWGate), grad_b1(grads.b1, e, kGradB1), grad_b2(grads.b2, e, kGradB2),
          grad_b_gate(grads.b_gate, e, kGradBGate);
      const T* w1 = compute_data<T, In>(p.w1, e, kW1);
      const T* w2 = compute_data<T, In>(p.w2, e, kW2);
      gather_backward_rows<T, In>(x, g, tokens, n, d, scale, compute_data_or_null<T, In>(p.b2, e, kB2), block,
                                  grad_out, scaled_grad_out, grad_b2.data(), grad_scale);
      // grad_out @ w2 unscaled: its dot with the activations is the scale gradient
      cpu::gemm<T>(false, false, n, d_ff, d, T(1), grad_out, d, w2, d_ff, T(0), grad_pre, d_ff);
      with_activation(p.activation, p.gated(), [&](auto act, auto gated) {
        activation_backward_rows<decltype(act)::value, decltype(gated)::value>(
            saved + begin * hidden_width, hidden_width, tokens, n, d_ff, scale, p.dropout, activated, grad_pre,
            grad_gate, grad_b1.data(), grad_b_gate.data(), grad_scale);
      });
      cpu::gemm<T>(true, false, d, d_ff, n, T(1), scaled_grad_out, d, activated, d_ff, T(0), grad_w2.data(), d_ff);
      cpu::gemm<T>(true, false, d_ff, d, n, T(1), grad_pre, d_ff, block, d, T(0), grad_w1.data(), d);
      T* grad_block = scaled_grad_out;  // no longer needed: reuse its rows
      cpu::gemm<T>(false, false, n, d, d_ff, T(1), grad_pre, d_ff, w1, d, T(0), grad_block, d);
      if (p.gated()) {
        cpu::gemm<T>(true, false, d_ff, d, n, T(1), grad_gate, d_ff, block, d, T(0), grad_w_gate.data(), d);
        cpu::gemm<T>(false, false, n, d, d_ff, T(1), grad_gate, d_ff, compute_data<T, In>(p.w_gate, e, kWGate), d,
                     T(1), grad_block, d);
      }
      for (const ExpertGrad<T, In>* grad : {&grad_w1, &grad_w2, &grad_w_gate, &grad_b1, &grad_b2, &grad_b_gate}) {
        grad->store();
      }
      for (int64_t i = 0; i < n; ++i) {
        if constexpr (std::is_same_v<T, In>) {
          std::memcpy(grad_x + tokens[i] * d, grad_block + i * d, d * sizeof(T));
        } else {
          convert(grad_block + i * d, d, grad_x + tokens[i] * d);
        }
      }
    }
    for (int64_t i = n; i < end - begin; ++i) {
      const int64_t t = tokens[i];
      const T s = scale[t];
      T dot = 0;
      for (int64_t c = 0; c < d; ++c) {
        const T grad = static_cast<T>(g[t * d + c]);
        grad_x[t * d + c] = static_cast<In>(s * grad);
        dot += grad * static_cast<T>(x[t * d + c]);
      }
      grad_scale[t] = dot;
    }
  });
}

Gradients backward_cpu(const at::Tensor& grad_y, const Problem& p, const at::Tensor& hidden) {
  TORCH_CHECK(grad_y.sizes() == p.x.sizes(), "switch_mlp_backward: grad_y must be ", p.x.sizes(), ", got ",
              grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == p.x.scalar_type(), "switch_mlp_backward: grad_y dtype ", grad_y.scalar_type(),
              " must equal x dtype ", p.x.scalar_type());
  const int64_t hidden_width = (p.gated() ? 2 : 1) * p.d_ff;
  const at::ScalarType compute_dtype = p.scale.scalar_type();
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) == p.n_tokens && hidden.size(1) == hidden_width &&
                  hidden.scalar_type() == compute_dtype,
              "switch_mlp_backward: hidden must be ", compute_dtype, " [", p.n_tokens, ", ", hidden_width,
              "] as switch_mlp returned it, got ", hidden.scalar_type(), " ", hidden.sizes());
  const at::Tensor grad = grad_y.contiguous();
  const at::Tensor saved = hidden.contiguous();
  // one step's blocks: the weight gradients, grad_x, and the forward's y and hidden
  size_t step_bytes = 2 * cpu::RecycledBlocks::block_bytes(p.x.numel(), p.x.scalar_type()) +
                      cpu::RecycledBlocks::block_bytes(hidden.numel(), compute_dtype);
  for (const Group* group : {&p.w1, &p.w2, &p.b1, &p.b2, &p.w_gate, &p.b_gate}) step_bytes += group->block_bytes();
  cpu::RecycledBlocks::fit(step_bytes);
  Gradients grads;
  grads.x = cpu::RecycledBlocks::empty(p.x.sizes(), p.x.options());
  grads.scale = at::empty_like(p.scale);
  grads.w1 = p.w1.empty_like();
  grads.w2 = p.w2.empty_like();
  grads.b1 = p.b1.empty_like();
  grads.b2 = p.b2.empty_like();
  grads.w_gate = p.w_gate.empty_like();
  grads.b_gate = p.b_gate.empty_like();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "switch_mlp_backward_cpu", [&] {
    backward<at::opmath_type<scalar_t>, scalar_t>(p, grad, saved, grads);
  });
  grads.scale = grads.scale.to(p.x.scalar_type());
  return grads;
}

using TensorList = std::vector<at::Tensor>;

std::tuple<at::Tensor, TensorList, TensorList, TensorList, TensorList, TensorList, TensorList, at::Tensor>
switch_mlp_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& order,
                        const at::Tensor& offsets, const at::Tensor& kept, at::TensorList w1, at::TensorList b1,
                        at::TensorList w2, at::TensorList b2, at::TensorList w_gate, at::TensorList b_gate,
                        const at::Tensor& scale, const at::Tensor& hidden, c10::string_view activation,
                        double dropout_p, int64_t seed, int64_t offset) {
  const Problem p = make_problem(x, order, offsets, kept, Group::per_expert(w1), Group::per_expert(b1),
                                 Group::per_expert(w2), Group::per_expert(b2), Group::per_expert(w_gate),
                                 Group::per_expert(b_gate), scale, activation, dropout_p, seed, offset);
  const Gradients g = backward_cpu(grad_y, p, hidden);
  return {g.x, g.w1.tensors(), g.b1.tensors(), g.w2.tensors(), g.b2.tensors(), g.w_gate.tensors(),
          g.b_gate.tensors(), g.scale};
}

using OptionalTensor = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor, OptionalTensor, at::Tensor, OptionalTensor, OptionalTensor, OptionalTensor,
           at::Tensor>
switch_mlp_stacked_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& order,
                                const at::Tensor& offsets, const at::Tensor& kept, const at::Tensor& w1,
                                const OptionalTensor& b1, const at::Tensor& w2, const OptionalTensor& b2,
                                const OptionalTensor& w_gate, const OptionalTensor& b_gate, const at::Tensor& scale,
                                const at::Tensor& hidden, c10::string_view activation, double dropout_p,
                                int64_t seed, int64_t offset) {
  const Problem p = make_problem(x, order, offsets, kept, Group::stacked(w1), Group::stacked(b1), Group::stacked(w2),
                                 Group::stacked(b2), Group::stacked(w_gate), Group::stacked(b_gate), scale,
                                 activation, dropout_p, seed, offset);
  const Gradients g = backward_cpu(grad_y, p, hidden);
  return {g.x, *g.w1.stacked_tensor(), g.b1.stacked_tensor(), *g.w2.stacked_tensor(), g.b2.stacked_tensor(),
          g.w_gate.stacked_tensor(), g.b_gate.stacked_tensor(), g.scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastformers, CPU, m) {
  m.impl("switch_mlp", &switch_mlp_cpu);
  m.impl("switch_mlp_backward", &switch_mlp_backward_cpu);
  m.impl("switch_mlp_stacked", &switch_mlp_stacked_cpu);
  m.impl("switch_mlp_stacked_backward", &switch_mlp_stacked_backward_cpu);
}

}  // namespace fastformers
