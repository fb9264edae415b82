// The feed-forward activations of labml's FeedForward variants (ReLU, exact
// GELU, SiLU, Sigmoid, Identity), shared by the Switch expert kernels and the
// fused Feedback recurrence: names, elementwise forward and gradient, and a
// dispatch that makes the activation a compile-time constant of a loop body.
#pragma once

#include <c10/util/string_view.h>

#include <cmath>
#include <optional>
#include <type_traits>

#include "cpu_utils.h"

namespace fastformers::activations {

enum class Activation { kRelu, kGelu, kSilu, kSigmoid, kIdentity };

// The activation named `name` ("relu", "gelu", "silu", "sigmoid", "identity"), or none.
inline std::optional<Activation> find(c10::string_view name) {
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "silu") return Activation::kSilu;
  if (name == "sigmoid") return Activation::kSigmoid;
  if (name == "identity") return Activation::kIdentity;
  return std::nullopt;
}

template <typename T>
inline T sigmoid(T h) {
  return T(1) / (T(1) + cpu::exp_of(-h));
}

template <Activation A, typename T>
inline T activate(T h) {
  if constexpr (A == Activation::kRelu) {
    return h > T(0) ? h : T(0);
  } else if constexpr (A == Activation::kGelu) {
    return T(0.5) * h * (T(1) + std::erf(h * T(M_SQRT1_2)));
  } else if constexpr (A == Activation::kSilu) {
    return h * sigmoid(h);
  } else if constexpr (A == Activation::kSigmoid) {
    return sigmoid(h);
  } else {
    return h;
  }
}

// grad · act'(h); ReLU passes grad where h > 0 and 0 elsewhere, as torch's relu backward.
template <Activation A, typename T>
inline T activation_grad(T h, T grad) {
  if constexpr (A == Activation::kRelu) {
    return h > T(0) ? grad : T(0);
  } else if constexpr (A == Activation::kGelu) {
    const T inv_sqrt_2pi = T(0.5 * M_2_SQRTPI * M_SQRT1_2);
    return grad * (T(0.5) * (T(1) + std::erf(h * T(M_SQRT1_2))) + h * inv_sqrt_2pi * std::exp(T(-0.5) * h * h));
  } else if constexpr (A == Activation::kSilu) {
    const T s = sigmoid(h);
    return grad * (s * (T(1) + h * (T(1) - s)));
  } else if constexpr (A == Activation::kSigmoid) {
    const T s = sigmoid(h);
    return grad * (s * (T(1) - s));
  } else {
    return grad;
  }
}

// Calls body(std::integral_constant<Activation, a>{}), so the elementwise
// loops inside carry no per-element branch.
template <typename Body>
void dispatch(Activation a, const Body& body) {
  switch (a) {
    case Activation::kRelu:
      return body(std::integral_constant<Activation, Activation::kRelu>{});
    case Activation::kGelu:
      return body(std::integral_constant<Activation, Activation::kGelu>{});
    case Activation::kSilu:
      return body(std::integral_constant<Activation, Activation::kSilu>{});
    case Activation::kSigmoid:
      return body(std::integral_constant<Activation, Activation::kSigmoid>{});
    case Activation::kIdentity:
      return body(std::integral_constant<Activation, Activation::kIdentity>{});
  }
}

}  // namespace fastformers::activations
