// The kernels' buffer caches as ops (schemas in fastformers/_cache.py):
// empty_cache, set_cache_limit and cache_info over every cache registered in
// cpu::CacheRegistry (cpu_utils.h).
#include <torch/library.h>

#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "cpu_utils.h"

namespace fastformers {
namespace {

int64_t empty_cache() {
  const size_t released = cpu::CacheRegistry::release_all();
#ifdef __GLIBC__
  // Freed blocks below glibc's (adaptive) mmap threshold stay in its heap; hand those pages back too.
  malloc_trim(0);
#endif
  return static_cast<int64_t>(released);
}

void set_cache_limit(std::optional<int64_t> bytes) {
  TORCH_CHECK(!bytes.has_value() || *bytes >= 0, "set_cache_limit: bytes must be >= 0 (or None), got ", *bytes);
  cpu::RecycledBlocks::set_limit(bytes.value_or(-1));
}

// [held, blocks, lent, limit, hits, misses, evictions] of the recycled blocks, then the bytes every
// other registered cache holds, in all.
std::vector<int64_t> cache_info() {
  const cpu::RecycledBlocks::Stats stats = cpu::RecycledBlocks::stats();
  size_t others = 0;
  for (const auto& [name, bytes] : cpu::CacheRegistry::held())
    if (name != "recycled_blocks") others += bytes;
  return {static_cast<int64_t>(stats.held_bytes), static_cast<int64_t>(stats.held_blocks),
          static_cast<int64_t>(stats.lent_bytes), static_cast<int64_t>(stats.limit_bytes),
          static_cast<int64_t>(stats.hits),       static_cast<int64_t>(stats.misses),
          static_cast<int64_t>(stats.evictions),  static_cast<int64_t>(others)};
}

}  // namespace

// No tensor arguments, so no backend key: CompositeExplicitAutograd serves calls without one.
TORCH_LIBRARY_IMPL(fastformers, CompositeExplicitAutograd, m) {
  m.impl("empty_cache", &empty_cache);
  m.impl("set_cache_limit", &set_cache_limit);
  m.impl("cache_info", &cache_info);
}

}  // namespace fastformers
