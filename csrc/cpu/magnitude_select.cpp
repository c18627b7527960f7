// The bracket pass of the exact magnitude selection on the CPU (the algorithm and its
// resolution are in vfuse_kernels/ops/magnitude_select.py; the GPU pass is
// vfuse_kernels/triton/magnitude_select.py). One pass over base and every tuned tensor:
// per block of `block` elements and model, the counts of key > hi, key == hi,
// key == lo and lo < key < hi (a vectorised counting loop), and the inside elements whose
// index hash is below the model's rate, packed as (key − 2^30) << 33 | (2^33 − 1 − index).
#include "parallel.h"

#include <algorithm>
#include <cstring>

#include "delta_merge.h"

namespace vfuse {

namespace {

// Counts of one chunk of keys: c[0] key > hi, c[1] key == hi, c[2] key == lo, c[3] inside;
// inside[j] = 1 where lo < key < hi.
VFUSE_MULTIVERSION
void count_keys(const float* d, int64_t len, int32_t lo, int64_t hi, int64_t c[4], uint8_t* inside) {
  // keys are < 2^31 and lo >= -1, so 32-bit compares are exact; hi may be 2^31 (above every key)
  const int32_t hi32 = int32_t(std::min<int64_t>(hi, 0x7fffffff));
  const int32_t above_all = hi > 0x7fffffff;  // then key == hi32 is inside, not "== hi"
  int32_t gt = 0, eq_hi = 0, eq_lo = 0, n_inside = 0;
  for (int64_t j = 0; j < len; ++j) {
    const int32_t key = int32_t(magnitude_key(d[j]));
    const int32_t at_hi = key == hi32;
    const int32_t in = (key > lo) & ((key < hi32) | (at_hi & above_all));
    gt += key > hi32;
    eq_hi += at_hi;
    eq_lo += key == lo;
    n_inside += in;
    inside[j] = uint8_t(in);
  }
  c[0] += above_all ? 0 : gt;
  c[1] += above_all ? 0 : eq_hi;
  c[2] += eq_lo;
  c[3] += n_inside;
}

inline uint32_t subsample_hash(int64_t e) {
  uint64_t u = uint64_t(e);
  uint32_t x = uint32_t(u ^ (u >> 32));
  x ^= x >> 16;
  x *= 0x85ebca6bu;
  x ^= x >> 13;
  x *= 0xc2b2ae35u;
  x ^= x >> 16;
  return x;
}

}  // namespace

void bracket_pass(const DeltaInputs& in, const int64_t* lo, const int64_t* hi, const int64_t* rate, int64_t cap,
                  int64_t block, int32_t* counts, int64_t* cand, int64_t* fill) {
  const int n = in.models();
  const int64_t blocks = (in.numel + block - 1) / block;
  const int threads = threads_for(in.numel * (n + 1));
  std::vector<std::vector<std::vector<int64_t>>> picked(threads, std::vector<std::vector<int64_t>>(n));
#pragma omp parallel num_threads(threads)
  {
    auto& mine = picked[omp_get_thread_num()];
    ChunkScratch s(n);
    std::vector<int64_t> c(size_t(n) * 4);
    std::vector<uint8_t> inside(kChunk + 8, 0);
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      std::fill(c.begin(), c.end(), 0);
      const int64_t end = std::min(in.numel, (blk + 1) * block);
      for (int64_t start = blk * block; start < end; start += kChunk) {
        const int64_t len = std::min(kChunk, end - start);
        load_deltas(in, start, len, false, s);
        for (int i = 0; i < n; ++i) {
          const float* d = s.delta_of(i);
          const int64_t before = c[4 * i + 3];
          count_keys(d, len, int32_t(lo[i]), hi[i], &c[4 * i], inside.data());
          if (c[4 * i + 3] == before) continue;
          std::fill(inside.begin() + len, inside.end(), 0);
          for (int64_t j = 0; j < len; j += 8) {  // rare: elements strictly inside the bracket
            uint64_t word;
            std::memcpy(&word, inside.data() + j, 8);
            for (; word; word &= word - 1) {
              const int64_t e = start + j + (__builtin_ctzll(word) >> 3);
              if (int64_t(subsample_hash(e)) < rate[i])
                mine[i].push_back(((int64_t(magnitude_key(d[e - start])) - (int64_t(1) << 30)) << 33) |
                                  ((int64_t(1) << 33) - 1 - e));
            }
          }
        }
      }
      for (int i = 0; i < n; ++i)
        for (int f = 0; f < 4; ++f) counts[(blk * n + i) * 4 + f] = int32_t(c[4 * i + f]);
    }
  }
  for (int i = 0; i < n; ++i) {
    int64_t total = 0;
    for (auto& t : picked) {
      const int64_t room = std::max<int64_t>(0, std::min<int64_t>(int64_t(t[i].size()), cap - total));
      if (room) std::memcpy(cand + i * cap + total, t[i].data(), size_t(room) * sizeof(int64_t));
      total += int64_t(t[i].size());
    }
    fill[i] += total;
  }
}

}  // namespace vfuse
