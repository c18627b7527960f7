// The Philox random bits of DARE's stream as a tensor (DELLA's per-element keep draws).
#include <algorithm>
#include <cstdint>

#include "common.h"
#include "parallel.h"

namespace vfuse {

namespace {

VFUSE_MULTIVERSION
void random_bits_item(uint64_t seed, uint32_t model, int64_t start, int64_t len, int64_t* out) {
  uint32_t bits[kItem];
  dare_bits_chunk(seed, model, start, len, bits);
  for (int64_t j = 0; j < len; ++j) out[start + j] = int64_t(bits[j]);
}

}  // namespace

// out[e] = the 32 random bits of flat element e for (seed, model), e in [0, numel), as int64.
void random_bits(uint64_t seed, uint32_t model, int64_t numel, int64_t* out) {
  static_assert(kItem % 4 == 0, "every item starts a Philox group");
  for_each_item(numel, threads_for(numel),
                [&](int64_t start, int64_t len) { random_bits_item(seed, model, start, len, out); });
}

}  // namespace vfuse
