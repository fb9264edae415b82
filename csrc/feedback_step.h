// Kernels of one Feedback Transformer attention step on raw pointers, shared by
// the step op (feedback_attention.cpp) and the whole-recurrence op
// (feedback_recurrence.cpp), which calls them per token without the dispatcher.
// For memory step j < steps (row r = P - steps + j of the positional tables):
//   s_j = ((q + u) . K_j + q . R_r + S_r) * scale,   out = sum_j softmax(s)_j V_j
// Shapes: q [B, H, d], K/V caches [T_max, B, H, d] ([H, d] contiguous, time and
// batch axes strided), R [P, H, d], S [P, H], u [H, d] contiguous.
// Dropout of the probabilities (StepView::drop active): softmax(s)_j of pair
// (b, h) is kept iff element (b * H + h) * steps + j of drop's Philox stream is
// (mask layout [B, H, steps]), and then scaled by 1 / (1 - p).
// Internal linkage: each including file gets its own copies of the
// target_clones builds (multi-versioned functions must not be merged across units).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_utils.h"
#include "philox.h"

namespace fastformers {
namespace {

// The per-row helpers are inlined into the multi-versioned range kernels below,
// so they vectorise for the clone's target: as separate clones each call went
// through an indirect jump for d = 64 multiply-adds.
#define FASTFORMERS_ROW_HELPER inline __attribute__((always_inline))

// sum_i a[i] * b[i] (+ c[i] * e[i] when c is given). `omp simd reduction`
// made GCC add the sixteen lanes one after another, a dependency chain that
// cost more than d = 64 multiply-adds; float32 keeps sixteen partial sums in a
// vector and adds them as a tree (widest for the clone's target), other types
// keep the portable loop.
typedef float Float16 __attribute__((vector_size(64)));
typedef float Float8 __attribute__((vector_size(32)));
typedef float Float4 __attribute__((vector_size(16)));

FASTFORMERS_ROW_HELPER void multiply_add16(Float16& sum, const float* a, const float* b) {
  Float16 x, y;
  std::memcpy(&x, a, sizeof(x));
  std::memcpy(&y, b, sizeof(y));
  sum += x * y;
}

FASTFORMERS_ROW_HELPER float horizontal_sum(const Float16& v) {
  Float8 lo, hi;
  std::memcpy(&lo, &v, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  lo += hi;
  Float4 a, b;
  std::memcpy(&a, &lo, sizeof(a));
  std::memcpy(&b, reinterpret_cast<const char*>(&lo) + sizeof(a), sizeof(b));
  a += b;
  return (a[0] + a[2]) + (a[1] + a[3]);
}

template <typename scalar_t, typename acc_t>
FASTFORMERS_ROW_HELPER acc_t dot2(const scalar_t* __restrict__ a, const acc_t* __restrict__ b,
                                  const scalar_t* __restrict__ c, const acc_t* __restrict__ e, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    Float16 sum = {};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      multiply_add16(sum, a + i, b + i);
      if (c) multiply_add16(sum, c + i, e + i);
    }
    float tail = 0;
    for (; i < n; ++i) tail += a[i] * b[i] + (c ? c[i] * e[i] : 0.0f);
    return horizontal_sum(sum) + tail;
  } else {
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) sum += static_cast<acc_t>(a[i]) * b[i];
    if (c) {
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < n; ++i) sum += static_cast<acc_t>(c[i]) * e[i];
    }
    return sum;
  }
}

template <typename scalar_t, typename acc_t>
FASTFORMERS_ROW_HELPER acc_t dot(const scalar_t* __restrict__ a, const acc_t* __restrict__ b, int64_t n) {
  return dot2<scalar_t, acc_t>(a, b, nullptr, nullptr, n);
}

template <typename scalar_t, typename acc_t>
FASTFORMERS_ROW_HELPER void axpy(acc_t alpha, const scalar_t* __restrict__ x, acc_t* __restrict__ y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * static_cast<acc_t>(x[i]);
}

template <typename scalar_t, typename acc_t>
FASTFORMERS_ROW_HELPER void axpy_store(acc_t alpha, const acc_t* __restrict__ x, scalar_t* __restrict__ y,
                                       int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<scalar_t>(static_cast<acc_t>(y[i]) + alpha * x[i]);
}

// Parallel regions cost tens of microseconds to wake threads (far more on a
// busy machine); split only when each thread gets this many multiply-adds.
constexpr int64_t kMinWorkPerThread = 1 << 16;

inline int64_t grain_for(int64_t per_item_work) {
  return std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(per_item_work, 1));
}

// Pointers and strides of one step, shared by forward and backward.
template <typename scalar_t>
struct StepView {
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
  const scalar_t* R;  // first row used: P - steps
  const scalar_t* S;  // first row used: P - steps
  const scalar_t* u;
  int64_t B, H, d, steps;
  int64_t k_time, k_batch, v_time, v_batch;  // cache strides of the time and batch axes
  philox::Dropout drop{};                     // of the probabilities; inactive by default
};

// Where one step's backward adds its gradients: rows [0, steps) of cache-shaped
// buffers, rows [0, steps) of the positional-table slices that start at the
// step's first row (P - steps), and the [H, d] query-bias gradient.
template <typename grad_t>
struct StepGradView {
  grad_t* k;
  grad_t* v;
  grad_t* R;  // row P - steps of the table gradient
  grad_t* S;  // row P - steps of the bias gradient
  grad_t* u;
  int64_t k_time, k_batch, v_time, v_batch;
};

// Softmax probabilities of one (b, h) pair into p[0:steps]; qh and qu = q + u in acc_t.
template <typename scalar_t, typename acc_t>
FASTFORMERS_ROW_HELPER void step_probs(const StepView<scalar_t>& w, int64_t b, int64_t h, acc_t scale,
                                       const acc_t* qh, const acc_t* qu, acc_t* p) {
  const int64_t d = w.d, H = w.H;
  const scalar_t* k = w.k + b * w.k_batch + h * d;
  acc_t max = -INFINITY;
  for (int64_t j = 0; j < w.steps; ++j) {
    const acc_t s = (dot2(k + j * w.k_time, qu, w.R + (j * H + h) * d, qh, d) +
                     static_cast<acc_t>(w.S[j * H + h])) *
                    scale;
    p[j] = s;
    max = std::max(max, s);
  }
  acc_t sum = 0;
  for (int64_t j = 0; j < w.steps; ++j) {
    p[j] = std::exp(p[j] - max);
    sum += p[j];
  }
  const acc_t inv = acc_t(1) / sum;
  for (int64_t j = 0; j < w.steps; ++j) p[j] *= inv;
}

// m[j] = keep(j) / (1 - p): the dropout multipliers of pair bh's probabilities
// (only called with dropout active); keep holds steps bytes.
template <typename scalar_t, typename acc_t>
FASTFORMERS_ROW_HELPER void keep_multipliers(const StepView<scalar_t>& w, int64_t bh, acc_t* m, uint8_t* keep) {
  philox::keep_bits(w.drop, bh * w.steps, w.steps, keep);
  const acc_t scale = static_cast<acc_t>(w.drop.scale());
  for (int64_t j = 0; j < w.steps; ++j) m[j] = keep[j] ? scale : acc_t(0);
}

template <typename scalar_t, typename acc_t>
FASTFORMERS_ROW_HELPER void load_query(const StepView<scalar_t>& w, int64_t b, int64_t h, acc_t* qh, acc_t* qu) {
  const scalar_t* q = w.q + (b * w.H + h) * w.d;
  const scalar_t* u = w.u + h * w.d;
  for (int64_t i = 0; i < w.d; ++i) {
    qh[i] = static_cast<acc_t>(q[i]);
    qu[i] = qh[i] + static_cast<acc_t>(u[i]);
  }
}

// Rows bh in [begin, end) of one step's output; buf holds 3 * d + 2 * steps, keep steps bytes.
template <typename scalar_t, typename acc_t>
FASTFORMERS_VECTOR_CLONES void step_forward_rows(const StepView<scalar_t>& w, acc_t scale, scalar_t* o,
                                                 int64_t begin, int64_t end, acc_t* buf, uint8_t* keep) {
  acc_t *qh = buf, *qu = qh + w.d, *acc = qu + w.d, *p = acc + w.d, *m = p + w.steps;
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / w.H, h = bh % w.H;
    load_query(w, b, h, qh, qu);
    step_probs(w, b, h, scale, qh, qu, p);
    if (w.drop.active()) {
      keep_multipliers(w, bh, m, keep);
      for (int64_t j = 0; j < w.steps; ++j) p[j] *= m[j];
    }
    std::fill(acc, acc + w.d, acc_t(0));
    const scalar_t* v = w.v + b * w.v_batch + h * w.d;
    for (int64_t j = 0; j < w.steps; ++j) axpy(p[j], v + j * w.v_time, acc, w.d);
    for (int64_t i = 0; i < w.d; ++i) o[bh * w.d + i] = static_cast<scalar_t>(acc[i]);
  }
}

// out [B, H, d] (contiguous) of one step.
template <typename scalar_t>
void step_forward(const StepView<scalar_t>& w, double scale, scalar_t* o) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, w.B * w.H, grain_for(3 * w.steps * w.d), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(3 * w.d + 2 * w.steps);
    std::vector<uint8_t> keep(w.drop.active() ? w.steps : 0);
    step_forward_rows(w, static_cast<acc_t>(scale), o, begin, end, buf.data(), keep.data());
  });
}

// Heads [h_begin, h_end) of step_backward_accumulate; buf holds 5 * d + 3 * steps, keep steps bytes.
// With dropout, out = sum_j p_j m_j V_j (m_j = keep / (1 - p)): the value
// gradient takes p_j m_j, the probability gradient m_j (V_j . g).
template <typename scalar_t, typename grad_t, typename acc_t>
FASTFORMERS_VECTOR_CLONES void step_backward_heads(const StepView<scalar_t>& w, acc_t sc, const scalar_t* g_all,
                                                   scalar_t* gq_all, const StepGradView<grad_t>& gw,
                                                   int64_t h_begin, int64_t h_end, acc_t* buf, uint8_t* keep) {
  const int64_t B = w.B, H = w.H, d = w.d, steps = w.steps;
  acc_t *qh = buf, *qu = qh + d, *g = qu + d, *gq = g + d, *gu = gq + d, *p = gu + d, *ds = p + steps,
        *m = ds + steps;
  for (int64_t h = h_begin; h < h_end; ++h) {
    std::fill(gu, gu + d, acc_t(0));
    for (int64_t b = 0; b < B; ++b) {
      load_query(w, b, h, qh, qu);
      step_probs(w, b, h, sc, qh, qu, p);
      if (w.drop.active()) keep_multipliers(w, b * H + h, m, keep);
      const scalar_t* gsrc = g_all + (b * H + h) * d;
      for (int64_t i = 0; i < d; ++i) g[i] = static_cast<acc_t>(gsrc[i]);
      const scalar_t* k = w.k + b * w.k_batch + h * d;
      const scalar_t* v = w.v + b * w.v_batch + h * d;
      acc_t delta = 0;
      for (int64_t j = 0; j < steps; ++j) {
        ds[j] = dot(v + j * w.v_time, g, d);
        if (w.drop.active()) ds[j] *= m[j];
        delta += p[j] * ds[j];
      }
      std::fill(gq, gq + d, acc_t(0));
      grad_t* gk = gw.k + b * gw.k_batch + h * d;
      grad_t* gv = gw.v + b * gw.v_batch + h * d;
      for (int64_t j = 0; j < steps; ++j) {
        const acc_t score_grad = p[j] * (ds[j] - delta) * sc;
        axpy(score_grad, k + j * w.k_time, gq, d);
        axpy(score_grad, w.R + (j * H + h) * d, gq, d);
        axpy(score_grad, k + j * w.k_time, gu, d);
        axpy_store(score_grad, qu, gk + j * gw.k_time, d);
        axpy_store(w.drop.active() ? p[j] * m[j] : p[j], g, gv + j * gw.v_time, d);
        axpy_store(score_grad, qh, gw.R + (j * H + h) * d, d);
        gw.S[j * H + h] = static_cast<grad_t>(static_cast<acc_t>(gw.S[j * H + h]) + score_grad);
      }
      scalar_t* gq_dst = gq_all + (b * H + h) * d;
      for (int64_t i = 0; i < d; ++i) gq_dst[i] = static_cast<scalar_t>(gq[i]);
    }
    axpy_store(acc_t(1), gu, gw.u + h * d, d);
  }
}

// Adds one step's gradients into `gw` and writes the query gradient
// gq_all [B, H, d] (contiguous) from the output gradient g_all [B, H, d].
// Work is split by head so no two threads touch the same row.
template <typename scalar_t, typename grad_t>
void step_backward_accumulate(const StepView<scalar_t>& w, double scale, const scalar_t* g_all, scalar_t* gq_all,
                              const StepGradView<grad_t>& gw) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, w.H, grain_for(8 * w.B * w.steps * w.d), [&](int64_t h_begin, int64_t h_end) {
    std::vector<acc_t> buf(5 * w.d + 3 * w.steps);
    std::vector<uint8_t> keep(w.drop.active() ? w.steps : 0);
    step_backward_heads(w, static_cast<acc_t>(scale), g_all, gq_all, gw, h_begin, h_end, buf.data(), keep.data());
  });
}

}  // namespace
}  // namespace fastformers
