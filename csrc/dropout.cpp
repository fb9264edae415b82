// CPU kernel of dropout_keep_mask: the Philox keep bits of csrc/philox.h as a
// bool tensor, so tests can compare them with the Triton and Python generators.
#include <torch/library.h>

#include "philox.h"

namespace fastformers {
namespace {

at::Tensor dropout_keep_mask_cpu(const at::Tensor& like, int64_t seed, int64_t offset, double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout_keep_mask: p must be in [0, 1), got ", p);
  TORCH_CHECK(offset >= 0, "dropout_keep_mask: offset must be >= 0, got ", offset);
  auto out = at::empty(like.sizes(), like.options().dtype(at::kBool));
  const philox::Dropout d{p, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)};
  philox::keep_bits(d, 0, out.numel(), reinterpret_cast<uint8_t*>(out.data_ptr<bool>()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastformers, CPU, m) { m.impl("dropout_keep_mask", &dropout_keep_mask_cpu); }

}  // namespace fastformers
