// Helpers shared by the CPU kernels: BLAS GEMM on raw row-major pointers with
// leading dimensions (strided slices without materialising them), a
// vectorisable exp, per-CPU builds of hot loops, and large outputs on huge pages.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/accumulate.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <limits>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>

// Fortran BLAS, exported by the BLAS torch links (MKL on x86-64 wheels). Weak:
// when the symbol is absent gemm falls back to at::addmm on borrowed blobs.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
// MKL's packed-GEMM extension (CBLAS enums passed as int, their ABI).
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

// Builds each hot loop for AVX-512, AVX2 and baseline x86-64 and picks one at
// load time: the extension stays portable yet vectorises as wide as the CPU allows.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define FASTFORMERS_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTFORMERS_VECTOR_CLONES
#endif

namespace fastformers::cpu {

// A GEMM size or leading dimension as the int the Fortran BLAS ABI takes; a
// larger one (a huge tensor, or the stride of a view into one) is an error,
// never a silently wrapped value.
inline int blas_int(int64_t value, const char* name) {
  TORCH_CHECK(value >= 0 && value <= std::numeric_limits<int>::max(), "fastformers: GEMM ", name, " = ", value,
              " does not fit the BLAS int (at most ", std::numeric_limits<int>::max(),
              "); split the call into smaller tensors");
  return static_cast<int>(value);
}

// The sizes and leading dimensions of one GEMM call, each checked by blas_int.
struct BlasDims {
  int m, n, k, lda, ldb, ldc;
};

inline BlasDims blas_dims(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc) {
  return {blas_int(m, "m"), blas_int(n, "n"), blas_int(k, "k"), blas_int(lda, "lda"), blas_int(ldb, "ldb"),
          blas_int(ldc, "ldc")};
}

// Row-major C[m, n] = alpha * op(A) op(B) + beta * C with op(A) [m, k] and
// op(B) [k, n]; lda/ldb/ldc are the row strides of A, B, C as stored.
// beta = 0 ignores C's previous contents (NaN included), as BLAS does.
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
  const BlasDims d = blas_dims(m, n, k, lda, ldb, ldc);
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) {
      sgemm_(&tb, &ta, &d.n, &d.m, &d.k, &alpha, b, &d.ldb, a, &d.lda, &beta, c, &d.ldc);
      return;
    }
  } else {
    if (dgemm_ != nullptr) {
      dgemm_(&tb, &ta, &d.n, &d.m, &d.k, &alpha, b, &d.ldb, a, &d.lda, &beta, c, &d.ldc);
      return;
    }
  }
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto matrix = [&](const T* data, bool trans, int64_t rows, int64_t cols, int64_t ld) {
    // op(X) is [rows, cols]; X is stored row-major as [rows, cols] or [cols, rows].
    return trans ? at::from_blob(const_cast<T*>(data), {cols, rows}, {ld, 1}, options).t()
                 : at::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1}, options);
  };
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, options);
  if (beta == T(0)) out.zero_();
  out.copy_(at::addmm(out, matrix(a, trans_a, m, k, lda), matrix(b, trans_b, k, n, ldb), beta, alpha));
}

// exp for float: Cody-Waite range reduction and a degree-6 polynomial, written so
// the loops around it vectorise (std::exp does not without -ffast-math);
// relative error ~2e-7. exp(-inf) = 0 and NaN propagates, as a softmax needs.
inline float exp_approx(float x) {
  const float clamped = std::min(std::max(x, -87.0f), 88.0f);
  const float n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (clamped - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float result = p * std::bit_cast<float>(bits);
  result = x == -std::numeric_limits<float>::infinity() ? 0.0f : result;
  return x != x ? x : result;
}

inline float exp_of(float x) { return exp_approx(x); }
inline double exp_of(double x) { return std::exp(x); }

// at::empty for a large output a kernel is about to write: asks Linux for
// transparent huge pages on its whole 2 MiB pages. A fresh buffer is otherwise
// first-touched one 4 KiB page fault at a time, which for a 32 MiB gradient
// costs about twice as long as writing it. Advice only: ignored where unsupported.
inline at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor tensor = at::empty(sizes, options);
#ifdef __linux__
  constexpr uintptr_t kHugePage = uintptr_t(1) << 21;
  const auto begin = reinterpret_cast<uintptr_t>(tensor.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + tensor.nbytes()) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return tensor;
}

// The right-hand side B [k, n] (row-major, row stride ldb) of many products
// C = A B + beta C with A [m, k]: a recurrence multiplies each step's m rows by
// the same weights. MKL repacks B inside every such call (its copy routines
// were ~11% of a Feedback Transformer fwd+bwd at labml's size); with `pack`
// and MKL's packed-GEMM extension, float B is packed once here, into a 64-byte
// aligned buffer (a malloc-aligned one made the products twice as slow).
// Otherwise each product is a gemm. Not copyable: MKL's packed buffer must not
// change address. The buffer is not a RecycledBlocks block: with the packs in
// that cache (the forward's and the backward's differ in size) a labml-size
// Feedback backward measured 164K-287K page faults against 29K-102K, and ran slower.
template <typename T>
class RepeatedRhs {
 public:
  RepeatedRhs(int64_t m, int64_t n, int64_t k, const T* b, int64_t ldb, bool pack)
      : m_(m), n_(n), k_(k), b_(b), ldb_(ldb) {
    if constexpr (std::is_same_v<T, float>) {
      const bool mkl = cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr &&
                       cblas_sgemm_compute != nullptr;
      if (pack && mkl && m > 0 && n > 0 && k > 0) {
        const size_t bytes =
            cblas_sgemm_pack_get_size(kBMatrix, blas_int(m, "m"), blas_int(n, "n"), blas_int(k, "k"));
        const size_t padded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
        packed_.reset(static_cast<float*>(std::aligned_alloc(kAlignment, padded)));
        TORCH_CHECK(packed_ != nullptr, "out of memory packing a ", k, " x ", n, " GEMM operand (", bytes, " bytes)");
        cblas_sgemm_pack(kRowMajor, kBMatrix, kNoTrans, int(m), int(n), int(k), 1.0f, b, blas_int(ldb, "ldb"),
                         packed_.get());
      }
    }
  }
  RepeatedRhs(RepeatedRhs&&) noexcept = default;
  RepeatedRhs(const RepeatedRhs&) = delete;
  RepeatedRhs& operator=(const RepeatedRhs&) = delete;

  // c [m, n] (row stride ldc) = a [m, k] (row stride lda) B + beta c.
  void multiply(const T* a, int64_t lda, T beta, T* c, int64_t ldc) const {
    if constexpr (std::is_same_v<T, float>) {
      if (packed_ != nullptr) {
        // m_, n_, k_, ldb_ were checked when packing
        cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, int(m_), int(n_), int(k_), a, blas_int(lda, "lda"),
                            packed_.get(), int(ldb_), beta, c, blas_int(ldc, "ldc"));
        return;
      }
    }
    gemm<T>(false, false, m_, n_, k_, T(1), a, lda, b_, ldb_, beta, c, ldc);
  }

 private:
  static constexpr int kRowMajor = 101, kNoTrans = 111, kPacked = 151, kBMatrix = 162;
  static constexpr size_t kAlignment = 64;
  struct Free {
    void operator()(float* data) const { std::free(data); }
  };
  int64_t m_, n_, k_;
  const T* b_;
  int64_t ldb_;
  std::unique_ptr<float, Free> packed_;
};

// Every cache of kernel buffers registers here, so that fastformers.empty_cache()
// and fastformers.cache_info() (csrc/cache.cpp) reach all of them. A cache gives
// a name, how many bytes it holds, and a release() that frees what it holds and
// returns how many bytes that was. release() runs on the thread calling
// empty_cache(), possibly while kernels run on other threads: it must take the
// cache's own lock and free only buffers no running kernel uses. Per-thread
// scratch (switch.cpp's ThreadScratch) registers one entry per thread from a
// thread_local object that unregisters in its destructor, and guards its
// buffers with a mutex its kernels hold while using them.
class CacheRegistry {
 public:
  struct Entry {
    std::string name;
    std::function<size_t()> held_bytes;
    std::function<size_t()> release;
  };

  // Returns an id for remove().
  static size_t add(std::string name, std::function<size_t()> held_bytes, std::function<size_t()> release) {
    CacheRegistry& registry = instance();
    std::lock_guard<std::mutex> lock(registry.mutex_);
    const size_t id = registry.next_id_++;
    registry.entries_.emplace(id, Entry{std::move(name), std::move(held_bytes), std::move(release)});
    return id;
  }

  static void remove(size_t id) {
    CacheRegistry& registry = instance();
    std::lock_guard<std::mutex> lock(registry.mutex_);
    registry.entries_.erase(id);
  }

  // Frees what every cache holds; returns the bytes freed.
  static size_t release_all() {
    CacheRegistry& registry = instance();
    std::lock_guard<std::mutex> lock(registry.mutex_);
    size_t released = 0;
    for (auto& [id, entry] : registry.entries_) released += entry.release();
    return released;
  }

  // (name, bytes held) of every cache, caches of one name summed.
  static std::map<std::string, size_t> held() {
    CacheRegistry& registry = instance();
    std::lock_guard<std::mutex> lock(registry.mutex_);
    std::map<std::string, size_t> held;
    for (auto& [id, entry] : registry.entries_) held[entry.name] += entry.held_bytes();
    return held;
  }

 private:
  // never destroyed: thread_local caches may unregister during static destruction
  static CacheRegistry& instance() {
    static CacheRegistry* registry = new CacheRegistry();
    return *registry;
  }

  std::mutex mutex_;
  std::map<size_t, Entry> entries_;
  size_t next_id_ = 0;
};

// Large CPU buffers recycled across calls. A kernel that allocates the same
// large outputs or temporaries every call otherwise gets fresh pages each
// time (glibc returns big blocks to the kernel when they are freed) and pays a
// page fault per 4 KiB on first touch:
// - switch_mlp_backward's weight gradients (autograd moves them into .grad,
//   zero_grad(set_to_none=True) frees them): at E = 64 (T=2048, d=128,
//   d_ff=256) ~2000 faults per backward, the bulk of the kernel's extra time
//   over E = 16; at T=4096, d=512, d_ff=2048, E=64 (512 MiB of gradients)
//   fresh pages made the step 1.56x a dense FFN's instead of 1.18x;
// - the Feedback recurrence's saved activations and backward buffers: ~800K
//   faults per fwd+bwd at labml's experiment size.
// A block comes back here when its tensor dies and a later call asking for
// its size, or up to kMaxSlack less, reuses it (the most recently returned
// one: its pages are the likeliest to be resident). The cache holds at most
// its limit: by default the largest working set a caller declared with fit()
// (and at least kMinCachedBytes), the memory those calls use every step
// anyway; set_limit() (fastformers.set_cache_limit, FASTFORMERS_CACHE_LIMIT)
// replaces it. A block that does not fit evicts the least recently returned
// ones; release() (fastformers.empty_cache) frees them all.
class RecycledBlocks {
 public:
  struct Stats {
    size_t held_bytes, held_blocks, lent_bytes, limit_bytes, hits, misses, evictions;
  };

  // Lets the cache hold ``bytes`` in all (one call's blocks, as block_bytes counts them).
  static void fit(size_t bytes) {
    RecycledBlocks& blocks = instance();
    std::lock_guard<std::mutex> lock(blocks.mutex_);
    blocks.fitted_bytes_ = std::max(blocks.fitted_bytes_, bytes);
  }

  static size_t block_bytes(int64_t numel, at::ScalarType dtype) {
    TORCH_CHECK(numel >= 0 && static_cast<uint64_t>(numel) <= std::numeric_limits<size_t>::max() / 16,
                "RecycledBlocks: a block of ", numel, " elements is too large");
    return std::max<size_t>((numel * c10::elementSize(dtype) + kAlignment - 1) / kAlignment, 1) * kAlignment;
  }

  static at::Tensor empty(at::IntArrayRef shape, const at::TensorOptions& options) {
    const size_t bytes = block_bytes(c10::multiply_integers(shape), options.dtype().toScalarType());
    RecycledBlocks& blocks = instance();
    auto [data, size] = blocks.take(bytes);
    if (data == nullptr) {
      data = std::aligned_alloc(kAlignment, bytes);
      TORCH_CHECK(data != nullptr, "out of memory allocating ", bytes, " bytes");
      size = bytes;
    }
    return at::from_blob(data, shape, [size](void* block) { instance().give_back(block, size); }, options);
  }

  // Frees every cached block (lent ones come back to the cache when their tensors die); returns the bytes freed.
  static size_t release() {
    RecycledBlocks& blocks = instance();
    std::lock_guard<std::mutex> lock(blocks.mutex_);
    return blocks.evict_to(0, /*count_evictions=*/false);
  }

  // ``bytes`` < 0: back to the automatic limit. Evicts down to the new limit at once.
  static void set_limit(int64_t bytes) {
    RecycledBlocks& blocks = instance();
    std::lock_guard<std::mutex> lock(blocks.mutex_);
    blocks.user_limit_ = bytes;
    blocks.evict_to(blocks.limit(), /*count_evictions=*/true);
  }

  static Stats stats() {
    RecycledBlocks& blocks = instance();
    std::lock_guard<std::mutex> lock(blocks.mutex_);
    return {blocks.cached_bytes_, blocks.lru_.size(), blocks.lent_bytes_, blocks.limit(),
            blocks.hits_,         blocks.misses_,     blocks.evictions_};
  }

 private:
  struct Block {
    void* data;
    size_t bytes;
  };
  using Lru = std::list<Block>;  // front: most recently returned

  static constexpr size_t kAlignment = 64;
  static constexpr size_t kMinCachedBytes = size_t(256) << 20;
  static constexpr size_t kMaxSlackDivisor = 8;  // a block may be up to 1/8 larger than asked

  // never destroyed: tensors may outlive static destruction at exit
  static RecycledBlocks& instance() {
    static RecycledBlocks* blocks = [] {
      auto* created = new RecycledBlocks();
      CacheRegistry::add("recycled_blocks", [] { return stats().held_bytes; }, [] { return release(); });
      return created;
    }();
    return *blocks;
  }

  size_t limit() const {
    return user_limit_ >= 0 ? static_cast<size_t>(user_limit_) : std::max(fitted_bytes_, kMinCachedBytes);
  }

  std::pair<void*, size_t> take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto fit = by_size_.lower_bound(bytes);
    if (fit == by_size_.end() || fit->first > bytes + bytes / kMaxSlackDivisor) {
      ++misses_;
      lent_bytes_ += bytes;
      return {nullptr, 0};
    }
    // equal sizes keep insertion order: the last one of this size was returned most recently
    auto newest = std::prev(by_size_.upper_bound(fit->first));
    const Block block = *newest->second;
    lru_.erase(newest->second);
    by_size_.erase(newest);
    cached_bytes_ -= block.bytes;
    lent_bytes_ += block.bytes;
    ++hits_;
    return {block.data, block.bytes};
  }

  void give_back(void* data, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      lent_bytes_ -= bytes;
      const size_t cap = limit();
      if (bytes <= cap) {
        evict_to(cap - bytes, /*count_evictions=*/true);
        lru_.push_front({data, bytes});
        by_size_.emplace(bytes, lru_.begin());
        cached_bytes_ += bytes;
        return;
      }
    }
    std::free(data);
  }

  // Frees least recently returned blocks until at most ``bytes`` are cached; returns the bytes freed.
  size_t evict_to(size_t bytes, bool count_evictions) {
    size_t freed = 0;
    while (cached_bytes_ > bytes) {
      const Block block = lru_.back();
      auto range = by_size_.equal_range(block.bytes);
      for (auto it = range.first; it != range.second; ++it) {
        if (it->second == std::prev(lru_.end())) {
          by_size_.erase(it);
          break;
        }
      }
      lru_.pop_back();
      std::free(block.data);
      cached_bytes_ -= block.bytes;
      freed += block.bytes;
      evictions_ += count_evictions;
    }
    return freed;
  }

  std::mutex mutex_;
  Lru lru_;
  std::multimap<size_t, Lru::iterator> by_size_;
  size_t cached_bytes_ = 0;
  size_t lent_bytes_ = 0;
  size_t fitted_bytes_ = 0;
  int64_t user_limit_ = -1;
  size_t hits_ = 0, misses_ = 0, evictions_ = 0;
};

}  // namespace fastformers::cpu
