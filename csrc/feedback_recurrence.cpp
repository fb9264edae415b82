// The whole Feedback Transformer recurrence (every token through every layer,
// the memory mix and the K/V projection) as one CPU kernel per direction, so
// the per-token work is raw GEMM calls and the step kernels of feedback_step.h
// with no dispatcher, autograd or allocation per token. Everything a step
// produces is written into slices of buffers allocated once per call.
//
// Per token t (pre-norm layers; at t = 0 there is no memory and attention is skipped):
//   z = LN_a(x), q = z Wq^T + bq, a = step(q, K[:t], V[:t]) (probability dropout), xm = x + drop(a Wo^T + bo)
//   z2 = LN_f(xm), u = z2 W1^T + b1, h = drop(act(u) [* (z2 Wv^T + bv) if gated]), x' = xm + drop(h W2^T + b2)
//   m_t = sum_l softmax(w)_l x_l (embedding and every layer output), [K_t V_t] = m_t Wkv^T + bkv
// Dropout bits come from one Philox stream per call at the element ranges
// documented in recurrence.py (DropoutPlan below computes the same offsets);
// backward regenerates them.
// Backward runs the tokens in reverse and records every row gradient; the
// weight gradients are then large GEMMs over all tokens (done by the caller).
// Schemas and the buffer layouts live in fastformers/ops/feedback/recurrence.py.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <array>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "activations.h"
#include "feedback_step.h"
#include "philox.h"

namespace fastformers {
namespace {

// Buffer layouts shared with recurrence.py (ACTIVATIONS, STATS, ROW_GRADS there).
enum Activation : int64_t { kNormAttn, kQuery, kAttention, kMid, kNormFF, kNumActivations };
enum Stat : int64_t { kMeanAttn, kRstdAttn, kMeanFF, kRstdFF, kNumStats };
enum RowGrad : int64_t { kGradFFOut, kGradNormFF, kGradAttnOut, kGradQuery, kGradNormAttn, kNumRowGrads };
// hidden [N, 2 or 3, T, B, F] (HIDDEN there) and grad_hidden [N, 1 or 2, T, B, F].
enum Hidden : int64_t { kFF2Input, kFF1Output, kGate };
// Per-layer parameters in recurrence.LayerWeights.FIELDS order.
enum Field : int64_t {
  kNormAttnWeight, kNormAttnBias, kQueryWeight, kPosEmb, kPosBias, kQueryPosBias, kOutWeight, kOutBias,
  kNormFFWeight, kNormFFBias, kFF1Weight, kFF1Bias, kFF2Weight, kFF2Bias, kQueryBias, kGateWeight, kGateBias,
  kNumFields
};
constexpr const char* kFieldNames[kNumFields] = {
    "norm_attn_weight", "norm_attn_bias", "query_weight", "key_pos_embeddings", "key_pos_bias", "query_pos_bias",
    "output_weight", "output_bias", "norm_ff_weight", "norm_ff_bias", "ff1_weight", "ff1_bias", "ff2_weight",
    "ff2_bias", "query_bias", "gate_weight", "gate_bias"};
constexpr bool kOptionalField[kNumFields] = {false, false, false, false, false, false, false, true, false,
                                             false, false, true,  false, true,  true,  true,  true};

using FFActivation = activations::Activation;

template <typename T>
struct LayerPtrs {
  // The matrices as stored ([out, in]) in backward, as [in, out] copies in forward.
  const T *norm_attn_w, *norm_attn_b, *wq, *R, *S, *u, *wo, *bo, *norm_ff_w, *norm_ff_b, *w1, *b1, *w2, *b2, *bq,
      *wv, *bv;
  int64_t P;
  double eps_attn, eps_ff;
};

struct Dims {
  int64_t T, B, D, H, d, F, N, C, P, start;
  bool gated;
  FFActivation activation;
  int64_t kv_width() const { return 2 * C * H * d; }
  int64_t hidden_slots() const { return gated ? 3 : 2; }
  // Per-token weight products of one layer (query, output, ff1, ff2 and the gate).
  int64_t products_per_layer() const { return gated ? 5 : 4; }
};

// The call's dropout sites (recurrence.DROPOUT_SITES): each (layer, site) owns
// the stream range [T, size] at offset + T * (layer * width + prefix[site]),
// token i at i * size inside it.
enum Site : int64_t { kSiteAttention, kSiteAttnResidual, kSiteHidden, kSiteFFResidual, kNumSites };
constexpr int64_t kSiteProbability[kNumSites] = {0, 1, 2, 1};  // index into a layer's (attention, residual, hidden)

struct DropoutPlan {
  std::vector<double> p;  // 3 per layer, or empty without dropout
  uint64_t seed = 0, offset = 0;
  int64_t T = 0, width = 0;
  std::array<int64_t, kNumSites> sizes{}, prefix{};

  DropoutPlan(const Dims& n, c10::ArrayRef<double> probabilities, int64_t seed_, int64_t offset_)
      : p(probabilities.begin(), probabilities.end()), seed(static_cast<uint64_t>(seed_)),
        offset(static_cast<uint64_t>(offset_)), T(n.T) {
    const int64_t steps = std::max<int64_t>(n.start + n.T - 1, 0);
    sizes = {n.B * n.H * steps, n.B * n.D, n.B * n.F, n.B * n.D};
    for (int64_t k = 0; k < kNumSites; ++k) {
      prefix[k] = width;
      width += sizes[k];
    }
  }

  philox::Dropout site(int64_t token, int64_t layer, int64_t k) const {
    if (p.empty()) return {};
    const uint64_t first = offset + static_cast<uint64_t>(T * (layer * width + prefix[k]) + token * sizes[k]);
    return {p[3 * layer + kSiteProbability[k]], seed, first};
  }
};

// x[k] *= keep(k) / (1 - p) for k < len; keep holds len bytes.
template <typename T>
void apply_dropout(const philox::Dropout& drop, T* x, int64_t len, uint8_t* keep) {
  philox::keep_bits(drop, 0, len, keep);
  const T scale = static_cast<T>(drop.scale());
  for (int64_t k = 0; k < len; ++k) x[k] = keep[k] ? x[k] * scale : T(0);
}

// out = act(x) over len elements (the dispatch outside the loop, so it vectorises).
template <typename T>
void activate(FFActivation a, const T* x, T* out, int64_t len) {
  activations::dispatch(a, [&](auto act) {
    for (int64_t k = 0; k < len; ++k) out[k] = activations::activate<decltype(act)::value>(x[k]);
  });
}

// grad[k] *= act'(x[k]).
template <typename T>
void activation_backward(FFActivation a, const T* x, T* grad, int64_t len) {
  activations::dispatch(a, [&](auto act) {
    for (int64_t k = 0; k < len; ++k) grad[k] = activations::activation_grad<decltype(act)::value>(x[k], grad[k]);
  });
}

// The parameter at `index`, undefined when None (List::get returns a copy).
at::Tensor param_at(const c10::List<std::optional<at::Tensor>>& params, int64_t index) {
  const std::optional<at::Tensor> value = params.get(index);
  return value.has_value() ? *value : at::Tensor();
}

// Checks the inputs shared by forward and backward; returns the dimensions and
// contiguous copies of every defined per-layer parameter (kept alive by `owned`).
Dims check_common(const char* op, const at::Tensor& x_like, const at::Tensor& kv, int64_t start,
                  const at::Tensor& mix_weights, const at::Tensor& kv_weight,
                  const c10::List<std::optional<at::Tensor>>& params, c10::ArrayRef<double> norm_eps, int64_t heads,
                  bool shared_kv, c10::string_view activation, c10::ArrayRef<double> dropout_p,
                  std::vector<at::Tensor>& owned) {
  TORCH_CHECK(x_like.dim() == 3, op, ": inputs must be [T, B, D], got ", x_like.sizes());
  const auto dtype = x_like.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": the CPU recurrence takes float32 or float64, got ",
              dtype);
  Dims n{};
  n.T = x_like.size(0), n.B = x_like.size(1), n.D = x_like.size(2), n.H = heads, n.start = start;
  TORCH_CHECK(params.size() % kNumFields == 0 && !params.empty(), op, ": layer_params must hold ", kNumFields,
              " entries per layer, got ", params.size());
  n.N = static_cast<int64_t>(params.size()) / kNumFields;
  TORCH_CHECK(static_cast<int64_t>(norm_eps.size()) == 2 * n.N, op, ": norm_eps must hold 2 per layer (", 2 * n.N,
              "), got ", norm_eps.size());
  TORCH_CHECK(heads >= 1 && n.D % heads == 0, op, ": heads (", heads, ") must divide d_model ", n.D);
  n.d = n.D / heads;
  n.C = shared_kv ? 1 : n.N;
  TORCH_CHECK(start >= 0, op, ": start must be >= 0, got ", start);
  TORCH_CHECK(kv.dim() == 5 && kv.size(0) >= start + n.T && kv.size(1) == n.B && kv.size(2) == 2 * n.C &&
                  kv.size(3) == heads && kv.size(4) == n.d && kv.is_contiguous(),
              op, ": kv must be a contiguous [>= ", start + n.T, ", ", n.B, ", ", 2 * n.C, ", ", heads, ", ", n.d,
              "] cache, got ", kv.sizes(), " strides ", kv.strides());
  TORCH_CHECK(mix_weights.dim() == 1 && mix_weights.size(0) == n.N + 1, op, ": mix_weights must be [", n.N + 1,
              "], got ", mix_weights.sizes());
  TORCH_CHECK(kv_weight.dim() == 2 && kv_weight.size(0) == n.kv_width() && kv_weight.size(1) == n.D, op,
              ": kv_weight must be [", n.kv_width(), ", ", n.D, "], got ", kv_weight.sizes());
  const at::Tensor first_w1 = param_at(params, kFF1Weight), first_pos_emb = param_at(params, kPosEmb);
  TORCH_CHECK(first_w1.defined() && first_pos_emb.defined(), op, ": layer 0 lacks ff1_weight or key_pos_embeddings");
  n.F = first_w1.size(0);
  n.P = first_pos_emb.size(0);
  n.gated = param_at(params, kGateWeight).defined();
  const std::optional<FFActivation> known = activations::find(activation);
  TORCH_CHECK(known.has_value(), op, ": activation must be relu, gelu, silu, sigmoid or identity, got ", activation);
  n.activation = *known;
  TORCH_CHECK(dropout_p.empty() || static_cast<int64_t>(dropout_p.size()) == 3 * n.N, op,
              ": dropout_p must be empty or hold 3 per layer (", 3 * n.N, "), got ", dropout_p.size());
  for (double p : dropout_p) TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout_p must be in [0, 1), got ", p);
  for (const at::Tensor* t : {&x_like, &kv, &mix_weights, &kv_weight}) {
    TORCH_CHECK(t->scalar_type() == dtype && t->device().is_cpu(), op, ": every tensor must be a CPU ", dtype,
                " tensor, got ", t->scalar_type(), " on ", t->device());
  }
  for (int64_t l = 0; l < n.N; ++l) {
    const int64_t D = n.D, F = n.F, H = n.H, d = n.d, P = n.P;
    const std::vector<std::vector<int64_t>> expected = {{D}, {D}, {D, D}, {P, H, d}, {P, H}, {H, d}, {D, D}, {D},
                                                        {D}, {D}, {F, D}, {F},    {D, F}, {D},    {D},    {F, D},
                                                        {F}};
    TORCH_CHECK(param_at(params, l * kNumFields + kGateWeight).defined() == n.gated, op,
                ": every layer or none must have gate_weight (layer ", l, " differs from layer 0)");
    for (int64_t f = 0; f < kNumFields; ++f) {
      const at::Tensor param = param_at(params, l * kNumFields + f);
      TORCH_CHECK(param.defined() || kOptionalField[f], op, ": layer ", l, " ", kFieldNames[f], " must be given");
      if (!param.defined()) {
        owned.emplace_back();
        continue;
      }
      TORCH_CHECK(param.sizes() == c10::IntArrayRef(expected[f]), op, ": layer ", l, " ", kFieldNames[f], " must be ",
                  c10::IntArrayRef(expected[f]), ", got ", param.sizes());
      TORCH_CHECK(param.scalar_type() == dtype && param.device().is_cpu(), op, ": layer ", l, " ", kFieldNames[f],
                  " must be a CPU ", dtype, " tensor, got ", param.scalar_type(), " on ", param.device());
      owned.push_back(param.contiguous());
    }
  }
  TORCH_CHECK(start + n.T - 1 <= n.P, op, ": ", start, " cached + ", n.T, " new steps need ", start + n.T - 1,
              " positional rows, the tables have P=", n.P);
  return n;
}

template <typename T>
std::vector<LayerPtrs<T>> layer_ptrs(const Dims& n, const std::vector<at::Tensor>& owned,
                                     c10::ArrayRef<double> norm_eps) {
  std::vector<LayerPtrs<T>> layers(n.N);
  for (int64_t l = 0; l < n.N; ++l) {
    auto p = [&](int64_t f) -> const T* {
      const at::Tensor& t = owned[l * kNumFields + f];
      return t.defined() ? t.data_ptr<T>() : nullptr;
    };
    layers[l] = {p(kNormAttnWeight), p(kNormAttnBias), p(kQueryWeight), p(kPosEmb),     p(kPosBias),
                 p(kQueryPosBias),   p(kOutWeight),    p(kOutBias),     p(kNormFFWeight), p(kNormFFBias),
                 p(kFF1Weight),      p(kFF1Bias),      p(kFF2Weight),   p(kFF2Bias),      p(kQueryBias),
                 p(kGateWeight),     p(kGateBias),     n.P,             norm_eps[2 * l],  norm_eps[2 * l + 1]};
  }
  return layers;
}

std::vector<double> softmax_of(const at::Tensor& weights) {
  const at::Tensor w = weights.to(at::kDouble).contiguous();
  const double* p = w.data_ptr<double>();
  const int64_t n = w.size(0);
  double max = -INFINITY, sum = 0;
  for (int64_t i = 0; i < n; ++i) max = std::max(max, p[i]);
  std::vector<double> probs(n);
  for (int64_t i = 0; i < n; ++i) sum += probs[i] = std::exp(p[i] - max);
  for (double& value : probs) value /= sum;
  return probs;
}

// y = LN(x) * w + b over rows of D, with the statistics written out.
template <typename T>
void layer_norm_rows(const T* x, int64_t rows, int64_t D, const T* w, const T* b, double eps, T* y, T* mean_out,
                     T* rstd_out) {
  using acc_t = at::opmath_type<T>;
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * D;
    acc_t sum = 0;
    for (int64_t i = 0; i < D; ++i) sum += xr[i];
    const acc_t mean = sum / D;
    acc_t sq = 0;
    for (int64_t i = 0; i < D; ++i) sq += (xr[i] - mean) * (xr[i] - mean);
    const acc_t rstd = acc_t(1) / std::sqrt(sq / D + static_cast<acc_t>(eps));
    T* yr = y + r * D;
    for (int64_t i = 0; i < D; ++i) yr[i] = (xr[i] - mean) * rstd * w[i] + b[i];
    mean_out[r] = mean;
    rstd_out[r] = rstd;
  }
}

// gx = add + d LN(x) / dx applied to gy (the input gradient of a layer norm).
template <typename T>
void layer_norm_input_grad_rows(const T* gy, const T* x, const T* mean, const T* rstd, const T* w, int64_t rows,
                                int64_t D, const T* add, T* gx) {
  using acc_t = at::opmath_type<T>;
  for (int64_t r = 0; r < rows; ++r) {
    const T *gyr = gy + r * D, *xr = x + r * D, *addr = add + r * D;
    const acc_t m = mean[r], s = rstd[r];
    acc_t sum_g = 0, sum_gx = 0;
    for (int64_t i = 0; i < D; ++i) {
      const acc_t g = gyr[i] * w[i];
      sum_g += g;
      sum_gx += g * (xr[i] - m) * s;
    }
    sum_g /= D;
    sum_gx /= D;
    T* out = gx + r * D;
    for (int64_t i = 0; i < D; ++i) {
      const acc_t xhat = (xr[i] - m) * s;
      out[i] = addr[i] + s * (gyr[i] * w[i] - sum_g - xhat * sum_gx);
    }
  }
}

template <typename T>
void add_bias_rows(T* y, const T* bias, int64_t rows, int64_t n) {
  if (bias == nullptr) return;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) y[r * n + i] += bias[i];
}

// Key and value cache views of layer l inside kv [T_max, B, 2C, H, d].
template <typename T>
StepView<T> cache_view(const Dims& n, const T* kv, int64_t layer, int64_t steps, const T* q, const LayerPtrs<T>& lw) {
  const int64_t c = n.C == 1 ? 0 : layer;
  const int64_t time = n.B * n.kv_width(), batch = n.kv_width();
  return {q, kv + 2 * c * n.H * n.d, kv + (2 * c + 1) * n.H * n.d, lw.R + (lw.P - steps) * n.H * n.d,
          lw.S + (lw.P - steps) * n.H, lw.u, n.B, n.H, n.d, steps, time, batch, time, batch};
}

// The right-hand side [k, n] (row stride ldb) of a per-token product.
template <typename T>
struct Product {
  int64_t n, k;
  const T* b;
  int64_t ldb;
};

// The per-token weight products of one pass over the tokens: `per_layer(lw)`'s
// products_per_layer() for each layer, then `last`. A single token (a
// generation step) would pack every weight for one product, so only longer
// passes pack.
template <typename T, typename PerLayer>
std::vector<cpu::RepeatedRhs<T>> weight_products(const Dims& n, const std::vector<LayerPtrs<T>>& layers,
                                                 const Product<T>& last, const PerLayer& per_layer) {
  const bool pack = n.T > 1;
  std::vector<cpu::RepeatedRhs<T>> products;
  products.reserve(n.products_per_layer() * layers.size() + 1);
  for (const LayerPtrs<T>& lw : layers) {
    const std::array<Product<T>, 5> all = per_layer(lw);
    for (int64_t k = 0; k < n.products_per_layer(); ++k) {
      products.emplace_back(n.B, all[k].n, all[k].k, all[k].b, all[k].ldb, pack);
    }
  }
  products.emplace_back(n.B, last.n, last.k, last.b, last.ldb, pack);
  return products;
}

// Scratch rows of one pass: a [B, max(D, F)] branch output and keep bytes for it.
template <typename T>
struct BranchScratch {
  std::vector<T> rows;
  std::vector<uint8_t> keep;
  explicit BranchScratch(const Dims& n) : rows(n.B * std::max(n.D, n.F)), keep(n.B * std::max(n.D, n.F)) {}
};

// out (holding the residual input) += drop(a W + bias) over B rows of width `width`.
template <typename T>
void add_residual_branch(const cpu::RepeatedRhs<T>& product, const T* a, int64_t lda, const T* bias, int64_t B,
                         int64_t width, const philox::Dropout& drop, BranchScratch<T>& scratch, T* out) {
  if (!drop.active()) {
    product.multiply(a, lda, 1, out, width);
    add_bias_rows(out, bias, B, width);
    return;
  }
  T* branch = scratch.rows.data();
  product.multiply(a, lda, 0, branch, width);
  add_bias_rows(branch, bias, B, width);
  apply_dropout(drop, branch, B * width, scratch.keep.data());
  for (int64_t k = 0; k < B * width; ++k) out[k] += branch[k];
}

template <typename T>
void forward_loop(const Dims& n, const std::vector<LayerPtrs<T>>& layers, const std::vector<double>& probs_d,
                  double scale, const DropoutPlan& plan, const T* x_seq, T* kv, const T* wkv_in_out, const T* bkv,
                  bool record, T* lo, T* mem, T* act, T* hid, T* st) {
  const int64_t B = n.B, D = n.D, F = n.F, N = n.N, KV = n.kv_width(), K = n.products_per_layer();
  const int64_t Ts = record ? n.T : 1;  // saved slots along time
  const int64_t BD = B * D;
  BranchScratch<T> scratch(n);
  // per layer: query, output, ff1, ff2 (and the gate); then the K/V projection
  const auto rhs = weight_products<T>(n, layers, {KV, D, wkv_in_out, KV}, [&](const LayerPtrs<T>& lw) {
    return std::array<Product<T>, 5>{
        {{D, D, lw.wq, D}, {D, D, lw.wo, D}, {F, D, lw.w1, F}, {D, F, lw.w2, D}, {F, D, lw.wv, F}}};
  });
  for (int64_t i = 0; i < n.T; ++i) {
    const int64_t t = n.start + i, s = record ? i : 0;
    T* x = lo + i * (N + 1) * BD;
    std::memcpy(x, x_seq + i * BD, BD * sizeof(T));
    for (int64_t l = 0; l < N; ++l) {
      const LayerPtrs<T>& lw = layers[l];
      auto A = [&](int64_t k) { return act + ((l * kNumActivations + k) * Ts + s) * BD; };
      auto ST = [&](int64_t k) { return st + ((l * kNumStats + k) * Ts + s) * B; };
      auto HID = [&](int64_t k) { return hid + ((l * n.hidden_slots() + k) * Ts + s) * B * F; };
      T* xm = A(kMid);
      std::memcpy(xm, x, BD * sizeof(T));
      if (t > 0) {
        layer_norm_rows(x, B, D, lw.norm_attn_w, lw.norm_attn_b, lw.eps_attn, A(kNormAttn), ST(kMeanAttn),
                        ST(kRstdAttn));
        rhs[K * l].multiply(A(kNormAttn), D, 0, A(kQuery), D);
        add_bias_rows(A(kQuery), lw.bq, B, D);
        StepView<T> view = cache_view(n, kv, l, t, A(kQuery), lw);
        view.drop = plan.site(i, l, kSiteAttention);
        step_forward(view, scale, A(kAttention));
        add_residual_branch(rhs[K * l + 1], A(kAttention), D, lw.bo, B, D, plan.site(i, l, kSiteAttnResidual),
                            scratch, xm);
      } else {
        // No memory yet: the attention slots stay zero, so sums over all tokens skip this one.
        for (int64_t k : {kNormAttn, kQuery, kAttention}) std::fill(A(k), A(k) + BD, T(0));
        std::fill(ST(kMeanAttn), ST(kMeanAttn) + B, T(0));
        std::fill(ST(kRstdAttn), ST(kRstdAttn) + B, T(0));
      }
      layer_norm_rows(xm, B, D, lw.norm_ff_w, lw.norm_ff_b, lw.eps_ff, A(kNormFF), ST(kMeanFF), ST(kRstdFF));
      T *pre = HID(kFF1Output), *h = HID(kFF2Input);
      rhs[K * l + 2].multiply(A(kNormFF), D, 0, pre, F);
      add_bias_rows(pre, lw.b1, B, F);
      activate(n.activation, pre, h, B * F);
      if (n.gated) {
        T* gate = HID(kGate);
        rhs[K * l + 4].multiply(A(kNormFF), D, 0, gate, F);
        add_bias_rows(gate, lw.bv, B, F);
        for (int64_t k = 0; k < B * F; ++k) h[k] *= gate[k];
      }
      const philox::Dropout hidden_drop = plan.site(i, l, kSiteHidden);
      if (hidden_drop.active()) apply_dropout(hidden_drop, h, B * F, scratch.keep.data());
      T* next = x + BD;
      std::memcpy(next, xm, BD * sizeof(T));
      add_residual_branch(rhs[K * l + 3], h, F, lw.b2, B, D, plan.site(i, l, kSiteFFResidual), scratch, next);
      x = next;
    }
    T* m = mem + s * BD;
    const T* outs = lo + i * (N + 1) * BD;
    for (int64_t k = 0; k < BD; ++k) {
      at::opmath_type<T> sum = 0;
      for (int64_t l = 0; l <= N; ++l) sum += static_cast<at::opmath_type<T>>(probs_d[l]) * outs[l * BD + k];
      m[k] = sum;
    }
    T* kv_row = kv + t * B * KV;
    rhs[K * N].multiply(m, D, 0, kv_row, KV);
    add_bias_rows(kv_row, bkv, B, KV);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> feedback_recurrence_forward_cpu(
    const at::Tensor& x_seq_, at::Tensor kv, int64_t start, const at::Tensor& mix_weights,
    const at::Tensor& kv_weight_, const std::optional<at::Tensor>& kv_bias_,
    const c10::List<std::optional<at::Tensor>>& layer_params, c10::ArrayRef<double> norm_eps, int64_t heads,
    double scale, bool shared_kv, c10::string_view activation, c10::ArrayRef<double> dropout_p, int64_t seed,
    int64_t offset, bool record) {
  const char* op = "feedback_recurrence_forward";
  std::vector<at::Tensor> owned;
  const Dims n = check_common(op, x_seq_, kv, start, mix_weights, kv_weight_, layer_params, norm_eps, heads,
                              shared_kv, activation, dropout_p, owned);
  const DropoutPlan plan(n, dropout_p, seed, offset);
  // The forward reads its matrices as [in, out] copies: x W^T becomes a plain
  // (NN) product, which MKL runs faster at these few rows (forward 57 vs 67 ms
  // at the small benchmark size, measured side by side on a quiet machine).
  for (int64_t l = 0; l < n.N; ++l)
    for (int64_t f : {kQueryWeight, kOutWeight, kFF1Weight, kFF2Weight, kGateWeight})
      if (owned[l * kNumFields + f].defined()) owned[l * kNumFields + f] = owned[l * kNumFields + f].t().contiguous();
  const at::Tensor x_seq = x_seq_.contiguous(), kv_weight_in_out = kv_weight_.t().contiguous();
  at::Tensor kv_bias;
  if (kv_bias_.has_value() && kv_bias_->defined()) {
    TORCH_CHECK(kv_bias_->dim() == 1 && kv_bias_->size(0) == n.kv_width() &&
                    kv_bias_->scalar_type() == x_seq.scalar_type(),
                op, ": kv_bias must be [", n.kv_width(), "] ", x_seq.scalar_type(), ", got ", kv_bias_->sizes());
    kv_bias = kv_bias_->contiguous();
  }
  const int64_t Ts = record ? n.T : 1;
  const auto options = x_seq.options();
  const std::vector<int64_t> shapes[] = {{n.T, n.N + 1, n.B, n.D}, {n.N, kNumActivations, Ts, n.B, n.D},
                                         {n.N, n.hidden_slots(), Ts, n.B, n.F}};
  size_t saved_bytes = 0;
  for (const auto& shape : shapes) {
    saved_bytes += cpu::RecycledBlocks::block_bytes(c10::multiply_integers(shape), x_seq.scalar_type());
  }
  // the backward's buffers are as large again
  cpu::RecycledBlocks::fit(2 * saved_bytes);
  at::Tensor layer_outputs = cpu::RecycledBlocks::empty(shapes[0], options);
  at::Tensor memories = at::empty({Ts, n.B, n.D}, options);
  at::Tensor activations = cpu::RecycledBlocks::empty(shapes[1], options);
  at::Tensor hidden = cpu::RecycledBlocks::empty(shapes[2], options);
  at::Tensor stats = at::empty({n.N, kNumStats, Ts, n.B}, options);
  const auto probs = softmax_of(mix_weights);
  AT_DISPATCH_FLOATING_TYPES(x_seq.scalar_type(), "feedback_recurrence_forward_cpu", [&] {
    forward_loop<scalar_t>(n, layer_ptrs<scalar_t>(n, owned, norm_eps), probs, scale, plan, x_seq.data_ptr<scalar_t>(),
                           kv.data_ptr<scalar_t>(), kv_weight_in_out.data_ptr<scalar_t>(),
                           kv_bias.defined() ? kv_bias.data_ptr<scalar_t>() : nullptr, record,
                           layer_outputs.data_ptr<scalar_t>(), memories.data_ptr<scalar_t>(),
                           activations.data_ptr<scalar_t>(), hidden.data_ptr<scalar_t>(), stats.data_ptr<scalar_t>());
  });
  return {layer_outputs, memories, activations, hidden, stats};
}

template <typename T>
void backward_loop(const Dims& n, const std::vector<LayerPtrs<T>>& layers, const std::vector<double>& probs_d,
                   double scale, const DropoutPlan& plan, const T* grad_out, const T* lo, const T* act, const T* hid,
                   const T* st, const T* kv, const T* wkv, T* grad_x, T* grad_mem, T* grows, T* ghid, T* gkv, T* gR,
                   T* gS, T* gu) {
  using acc_t = at::opmath_type<T>;
  const int64_t T_len = n.T, B = n.B, D = n.D, F = n.F, N = n.N, H = n.H, d = n.d, KV = n.kv_width();
  const int64_t BD = B * D, K = n.products_per_layer();
  std::vector<T> scratch(3 * BD + B * F);
  T *g = scratch.data(), *ga = g + BD, *gxm = ga + BD, *grad_ff2_input = gxm + BD;
  std::vector<uint8_t> keep(B * std::max(D, F));
  // per layer: ff2, ff1, output, query (the transposed products) and the gate; then the K/V projection
  const auto rhs = weight_products<T>(n, layers, {D, KV, wkv, D}, [&](const LayerPtrs<T>& lw) {
    return std::array<Product<T>, 5>{
        {{F, D, lw.w2, F}, {D, F, lw.w1, D}, {D, D, lw.wo, D}, {D, D, lw.wq, D}, {D, F, lw.wv, D}}};
  });
  // dst = src, dropped like the forward's site (dst may be src)
  auto masked_copy = [&](const philox::Dropout& drop, const T* src, T* dst, int64_t len) {
    if (dst != src) std::memcpy(dst, src, len * sizeof(T));
    if (drop.active()) apply_dropout(drop, dst, len, keep.data());
  };
  for (int64_t i = T_len - 1; i >= 0; --i) {
    const int64_t t = n.start + i;
    T* gm = grad_mem + i * BD;
    rhs[K * N].multiply(gkv + t * B * KV, KV, 0, gm, D);
    const T* go = grad_out + i * BD;
    for (int64_t k = 0; k < BD; ++k) g[k] = go[k] + static_cast<acc_t>(probs_d[N]) * gm[k];
    for (int64_t l = N - 1; l >= 0; --l) {
      const LayerPtrs<T>& lw = layers[l];
      auto A = [&](int64_t k) { return act + ((l * kNumActivations + k) * T_len + i) * BD; };
      auto ST = [&](int64_t k) { return st + ((l * kNumStats + k) * T_len + i) * B; };
      auto GR = [&](int64_t k) { return grows + ((l * kNumRowGrads + k) * T_len + i) * BD; };
      auto HID = [&](int64_t k) { return hid + ((l * n.hidden_slots() + k) * T_len + i) * B * F; };
      auto GHID = [&](int64_t k) { return ghid + ((l * (n.hidden_slots() - 1) + k) * T_len + i) * B * F; };
      masked_copy(plan.site(i, l, kSiteFFResidual), g, GR(kGradFFOut), BD);
      rhs[K * l].multiply(GR(kGradFFOut), D, 0, grad_ff2_input, F);
      masked_copy(plan.site(i, l, kSiteHidden), grad_ff2_input, grad_ff2_input, B * F);
      const T* pre = HID(kFF1Output);
      T* grad_pre = GHID(0);
      if (n.gated) {
        // grad(gate) = grad(h) * act(pre); grad(act(pre)) = grad(h) * gate
        T* grad_gate = GHID(1);
        const T* gate = HID(kGate);
        activate(n.activation, pre, grad_gate, B * F);
        for (int64_t k = 0; k < B * F; ++k) {
          grad_gate[k] *= grad_ff2_input[k];
          grad_pre[k] = grad_ff2_input[k] * gate[k];
        }
      } else {
        std::memcpy(grad_pre, grad_ff2_input, B * F * sizeof(T));
      }
      activation_backward(n.activation, pre, grad_pre, B * F);
      rhs[K * l + 1].multiply(grad_pre, F, 0, GR(kGradNormFF), D);
      if (n.gated) rhs[K * l + 4].multiply(GHID(1), F, 1, GR(kGradNormFF), D);
      layer_norm_input_grad_rows(GR(kGradNormFF), A(kMid), ST(kMeanFF), ST(kRstdFF), lw.norm_ff_w, B, D, g, gxm);
      if (t > 0) {
        masked_copy(plan.site(i, l, kSiteAttnResidual), gxm, GR(kGradAttnOut), BD);
        rhs[K * l + 2].multiply(GR(kGradAttnOut), D, 0, ga, D);
        const int64_t c = n.C == 1 ? 0 : l;
        const int64_t time = B * KV;
        const StepGradView<T> gw{gkv + 2 * c * H * d,
                                 gkv + (2 * c + 1) * H * d,
                                 gR + (l * n.P + n.P - t) * H * d,
                                 gS + (l * n.P + n.P - t) * H,
                                 gu + l * H * d,
                                 time,
                                 KV,
                                 time,
                                 KV};
        StepView<T> view = cache_view(n, kv, l, t, A(kQuery), lw);
        view.drop = plan.site(i, l, kSiteAttention);
        step_backward_accumulate(view, scale, ga, GR(kGradQuery), gw);
        rhs[K * l + 3].multiply(GR(kGradQuery), D, 0, GR(kGradNormAttn), D);
        layer_norm_input_grad_rows(GR(kGradNormAttn), lo + (i * (N + 1) + l) * BD, ST(kMeanAttn), ST(kRstdAttn),
                                   lw.norm_attn_w, B, D, gxm, g);
      } else {
        // The attention sublayer did not run: its row gradients are zero.
        std::memcpy(g, gxm, BD * sizeof(T));
        for (int64_t k : {kGradAttnOut, kGradQuery, kGradNormAttn}) std::fill(GR(k), GR(k) + BD, T(0));
      }
      for (int64_t k = 0; k < BD; ++k) g[k] += static_cast<acc_t>(probs_d[l]) * gm[k];
    }
    std::memcpy(grad_x + i * BD, g, BD * sizeof(T));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
feedback_recurrence_backward_cpu(const at::Tensor& grad_out_, const at::Tensor& layer_outputs,
                                 const at::Tensor& activations, const at::Tensor& hidden, const at::Tensor& stats,
                                 const at::Tensor& kv, int64_t start, const at::Tensor& mix_weights,
                                 const at::Tensor& kv_weight_, const c10::List<std::optional<at::Tensor>>& layer_params,
                                 c10::ArrayRef<double> norm_eps, int64_t heads, double scale, bool shared_kv,
                                 c10::string_view activation, c10::ArrayRef<double> dropout_p, int64_t seed,
                                 int64_t offset) {
  const char* op = "feedback_recurrence_backward";
  std::vector<at::Tensor> owned;
  const Dims n = check_common(op, grad_out_, kv, start, mix_weights, kv_weight_, layer_params, norm_eps, heads,
                              shared_kv, activation, dropout_p, owned);
  const DropoutPlan plan(n, dropout_p, seed, offset);
  const int64_t T = n.T, B = n.B, D = n.D, N = n.N;
  const std::vector<std::pair<const at::Tensor*, std::vector<int64_t>>> saved = {
      {&layer_outputs, {T, N + 1, B, D}},
      {&activations, {N, kNumActivations, T, B, D}},
      {&hidden, {N, n.hidden_slots(), T, B, n.F}},
      {&stats, {N, kNumStats, T, B}}};
  for (const auto& [tensor, shape] : saved) {
    TORCH_CHECK(tensor->sizes() == c10::IntArrayRef(shape) && tensor->is_contiguous() &&
                    tensor->scalar_type() == grad_out_.scalar_type(),
                op, ": saved buffers must be contiguous ", grad_out_.scalar_type(), " ", c10::IntArrayRef(shape),
                " (the recorded forward's), got ", tensor->sizes());
  }
  const at::Tensor grad_out = grad_out_.contiguous(), kv_weight = kv_weight_.contiguous();
  const auto options = grad_out.options();
  at::Tensor grad_x = at::empty({T, B, D}, options);
  at::Tensor grad_memories = at::empty({T, B, D}, options);
  at::Tensor row_grads = cpu::RecycledBlocks::empty({N, kNumRowGrads, T, B, D}, options);
  at::Tensor grad_hidden = cpu::RecycledBlocks::empty({N, n.hidden_slots() - 1, T, B, n.F}, options);
  at::Tensor grad_kv = cpu::RecycledBlocks::empty(kv.sizes(), kv.options()).zero_();
  at::Tensor grad_pos_emb = at::zeros({N, n.P, n.H, n.d}, options);
  at::Tensor grad_pos_bias = at::zeros({N, n.P, n.H}, options);
  at::Tensor grad_query_pos_bias = at::zeros({N, n.H, n.d}, options);
  const auto probs = softmax_of(mix_weights);
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "feedback_recurrence_backward_cpu", [&] {
    backward_loop<scalar_t>(n, layer_ptrs<scalar_t>(n, owned, norm_eps), probs, scale, plan,
                            grad_out.data_ptr<scalar_t>(),
                            layer_outputs.data_ptr<scalar_t>(), activations.data_ptr<scalar_t>(),
                            hidden.data_ptr<scalar_t>(), stats.data_ptr<scalar_t>(), kv.data_ptr<scalar_t>(),
                            kv_weight.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(),
                            grad_memories.data_ptr<scalar_t>(), row_grads.data_ptr<scalar_t>(),
                            grad_hidden.data_ptr<scalar_t>(), grad_kv.data_ptr<scalar_t>(),
                            grad_pos_emb.data_ptr<scalar_t>(), grad_pos_bias.data_ptr<scalar_t>(),
                            grad_query_pos_bias.data_ptr<scalar_t>());
  });
  return {grad_x, grad_memories, row_grads, grad_hidden, grad_kv, grad_pos_emb, grad_pos_bias, grad_query_pos_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastformers, CPU, m) {
  m.impl("feedback_recurrence_forward", &feedback_recurrence_forward_cpu);
  m.impl("feedback_recurrence_backward", &feedback_recurrence_backward_cpu);
}

}  // namespace fastformers
