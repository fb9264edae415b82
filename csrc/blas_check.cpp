// fastformers::_blas_dims: the int narrowing every C++ GEMM call runs
// (cpu::blas_dims), as an op so tests reach sizes and strides past 2^31 that
// no test can allocate. Schema in fastformers/_library.py.
#include <torch/library.h>

#include "cpu_utils.h"

namespace fastformers {
namespace {

std::vector<int64_t> blas_dims(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc) {
  const cpu::BlasDims d = cpu::blas_dims(m, n, k, lda, ldb, ldc);
  return {d.m, d.n, d.k, d.lda, d.ldb, d.ldc};
}

}  // namespace

// No tensor arguments, so no backend key: CompositeExplicitAutograd serves calls without one.
TORCH_LIBRARY_IMPL(fastformers, CompositeExplicitAutograd, m) { m.impl("_blas_dims", &blas_dims); }

}  // namespace fastformers
