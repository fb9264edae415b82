// Dropout keep bits from Philox 4x32-10 (Salmon et al. 2011, Random123), the
// one generator shared by the C++ and the Triton kernels.
//
// Element n of a call with (seed, offset) reads stream position s = offset + n:
// counter (lo32(s / 4), hi32(s / 4), 0, 0), key (lo32(seed), hi32(seed)), and
// output word s % 4. It is kept when that word is >= threshold(p) =
// floor(p * 2^32). fastformers/ops/dropout.py (Python reference) and
// fastformers/ops/dropout_triton.py compute the same bits; tests compare all three.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu_utils.h"

namespace fastformers::philox {

constexpr uint32_t kMulA = 0xD2511F53u, kMulB = 0xCD9E8D57u;
constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;

struct Words {
  uint32_t w[4];
};

inline Words philox4x32_10(uint64_t block, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(block), c1 = static_cast<uint32_t>(block >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t a = static_cast<uint64_t>(kMulA) * c0, b = static_cast<uint64_t>(kMulB) * c2;
    const uint32_t next0 = static_cast<uint32_t>(b >> 32) ^ c1 ^ k0;
    const uint32_t next2 = static_cast<uint32_t>(a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(b);
    c3 = static_cast<uint32_t>(a);
    c0 = next0;
    c2 = next2;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return {{c0, c1, c2, c3}};
}

inline uint32_t threshold(double p) {
  return static_cast<uint32_t>(std::min(p * 4294967296.0, 4294967295.0));
}

// Dropout parameters of one call; p == 0 means no dropout (every element kept, scale 1).
struct Dropout {
  double p = 0.0;
  uint64_t seed = 0;
  uint64_t offset = 0;

  bool active() const { return p > 0.0; }
  uint32_t bound() const { return threshold(p); }
  double scale() const { return p > 0.0 ? 1.0 / (1.0 - p) : 1.0; }
};

// keep[i] = 1 for kept elements n0 + i, i < len, else 0. The 32-bit products of
// each Philox round vectorise (vpmuludq) over a run of counter blocks.
FASTFORMERS_VECTOR_CLONES inline void keep_bits(const Dropout& d, int64_t n0, int64_t len, uint8_t* __restrict__ keep) {
  if (len <= 0) return;
  const uint32_t bound = d.bound();
  const uint64_t first = d.offset + static_cast<uint64_t>(n0);
  const uint64_t last = first + static_cast<uint64_t>(len);  // exclusive
  const uint64_t block0 = first >> 2, blocks = ((last + 3) >> 2) - block0;
  constexpr int64_t kRun = 64;
  for (uint64_t base = 0; base < blocks; base += kRun) {
    const int64_t run = static_cast<int64_t>(std::min<uint64_t>(kRun, blocks - base));
    uint32_t c0[kRun], c1[kRun], c2[kRun], c3[kRun];
    for (int64_t i = 0; i < run; ++i) {
      const uint64_t block = block0 + base + static_cast<uint64_t>(i);
      c0[i] = static_cast<uint32_t>(block);
      c1[i] = static_cast<uint32_t>(block >> 32);
      c2[i] = 0;
      c3[i] = 0;
    }
    uint32_t k0 = static_cast<uint32_t>(d.seed), k1 = static_cast<uint32_t>(d.seed >> 32);
    for (int round = 0; round < 10; ++round) {
#pragma omp simd
      for (int64_t i = 0; i < run; ++i) {
        const uint64_t a = static_cast<uint64_t>(kMulA) * c0[i], b = static_cast<uint64_t>(kMulB) * c2[i];
        const uint32_t next0 = static_cast<uint32_t>(b >> 32) ^ c1[i] ^ k0;
        const uint32_t next2 = static_cast<uint32_t>(a >> 32) ^ c3[i] ^ k1;
        c1[i] = static_cast<uint32_t>(b);
        c3[i] = static_cast<uint32_t>(a);
        c0[i] = next0;
        c2[i] = next2;
      }
      k0 += kKeyA;
      k1 += kKeyB;
    }
    // Bytes of every position of the run's blocks, then the slice inside [first, last).
    uint8_t bytes[4 * kRun];
#pragma omp simd
    for (int64_t i = 0; i < run; ++i) {
      bytes[4 * i] = c0[i] >= bound;
      bytes[4 * i + 1] = c1[i] >= bound;
      bytes[4 * i + 2] = c2[i] >= bound;
      bytes[4 * i + 3] = c3[i] >= bound;
    }
    const uint64_t run_start = (block0 + base) << 2;
    const uint64_t from = std::max(first, run_start);
    const uint64_t to = std::min(last, run_start + 4 * static_cast<uint64_t>(run));
    std::memcpy(keep + (from - first), bytes + (from - run_start), to - from);
  }
}

// Multiplier per element: scale for kept, 0 for dropped (float or double).
template <typename T>
void keep_scale(const Dropout& d, int64_t n0, int64_t len, uint8_t* scratch, T* out) {
  keep_bits(d, n0, len, scratch);
  const T scale = static_cast<T>(d.scale());
  for (int64_t i = 0; i < len; ++i) out[i] = scratch[i] ? scale : T(0);
}

}  // namespace fastformers::philox
