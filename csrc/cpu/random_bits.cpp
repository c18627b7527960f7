// The Philox random bits of DARE's stream as a tensor (DELLA's per-element keep draws).
#include <algorithm>
#include <cstdint>

#include "common.h"
#include "parallel.h"

namespace vfuse {

// out[e] = the 32 random bits of flat element e for (seed, model), e in [0, numel), as int64.
void random_bits(uint64_t seed, uint32_t model, int64_t numel, int64_t* out) {
  constexpr int64_t kItem = 4096;  // a multiple of 4: every item starts a Philox group
  const int64_t items = (numel + kItem - 1) / kItem;
#pragma omp parallel for schedule(static) num_threads(threads_for(numel))
  for (int64_t item = 0; item < items; ++item) {
    uint32_t bits[kItem];
    const int64_t start = item * kItem, len = std::min(kItem, numel - start);
    dare_bits_chunk(seed, model, start, len, bits);
    for (int64_t j = 0; j < len; ++j) out[start + j] = int64_t(bits[j]);
  }
}

}  // namespace vfuse
