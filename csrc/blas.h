// Row-major GEMM on raw pointers through the Fortran BLAS that libtorch links
// (MKL on x86-64 wheels): one call per product, no tensor wrapping, no
// dispatcher. Kernels that multiply many small per-expert or per-tile blocks
// use it because at::mm's per-call overhead dominates at those sizes.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

// Weak: when the symbol is absent the kernels fall back to at::addmm on borrowed blobs.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace fastformers {
namespace blas {

// C[m, n] = alpha * op(A) op(B) + beta * C via at::addmm, for builds whose BLAS lacks sgemm_/dgemm_.
template <typename T>
void gemm_fallback(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                   const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto matrix = [&](const T* data, bool trans, int64_t rows, int64_t cols, int64_t ld) {
    // op(X) is [rows, cols]; X is stored row-major as [rows, cols] or [cols, rows].
    return trans ? at::from_blob(const_cast<T*>(data), {cols, rows}, {ld, 1}, options).t()
                 : at::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1}, options);
  };
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, options);
  out.copy_(at::addmm(out, matrix(a, trans_a, m, k, lda), matrix(b, trans_b, k, n, ldb), beta, alpha));
}

// Row-major C[m, n] = alpha * op(A) op(B) + beta * C, op(A) [m, k], op(B) [k, n];
// lda/ldb/ldc are the row strides of the matrices as stored. beta = 0 ignores C's contents.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t row = 0; row < m; ++row)
      for (int64_t col = 0; col < n; ++col) c[row * ldc + col] = beta == T(0) ? T(0) : beta * c[row * ldc + col];
    return;
  }
  // Column-major BLAS sees a row-major X as X^T: C^T = op(B)^T op(A)^T.
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb), ildc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) {
      sgemm_(&tb, &ta, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
      return;
    }
  } else {
    if (dgemm_ != nullptr) {
      dgemm_(&tb, &ta, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
      return;
    }
  }
  gemm_fallback(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace blas
}  // namespace fastformers
