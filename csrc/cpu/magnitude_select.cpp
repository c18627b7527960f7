// The bracket pass of the exact magnitude selection on the CPU (the algorithm and its
// resolution are in vfuse_kernels/ops/magnitude_select.py; the GPU pass is
// vfuse_kernels/triton/magnitude_select.py). One pass over base and every tuned tensor:
// per block of `block` elements and model, the counts of key > hi, key == hi, key == lo
// and lo < key < hi, and the inside elements whose index hash is below the model's rate,
// packed as (key − 2^30) << 33 | (2^33 − 1 − index).
//
// Counting is one vectorised loop per chunk: with one storage dtype and 1–4 models (the
// common case) every value is converted, subtracted and compared in registers; otherwise
// the deltas are staged in fp32 first. The loop also leaves each element's key and inside
// flag in L1-resident chunk buffers; inside elements (~1%) are then found 8 flags at a time.
#include "parallel.h"

#include <algorithm>
#include <cstring>

#include "delta_merge.h"

namespace vfuse {

namespace {

// One model's bracket in 32-bit form: keys are < 2^31 and lo >= -1; hi may be 2^31 (above
// every key): then hi32 = 2^31 - 1 and a key equal to it is inside, not "== hi".
struct Bracket {
  int32_t lo, hi32, above_all;
  explicit Bracket(int64_t lo64 = 0, int64_t hi64 = 0)
      : lo(int32_t(lo64)), hi32(int32_t(std::min<int64_t>(hi64, 0x7fffffff))), above_all(hi64 > 0x7fffffff) {}
};

// Adds one key's contribution to the four counts and returns its inside flag.
VFUSE_INLINE int32_t count_key(int32_t key, const Bracket& b, int32_t& gt, int32_t& eq_hi, int32_t& eq_lo,
                               int32_t& inside) {
  const int32_t at_hi = key == b.hi32;
  const int32_t in = (key > b.lo) & ((key < b.hi32) | (at_hi & b.above_all));
  gt += key > b.hi32;
  eq_hi += at_hi;
  eq_lo += key == b.lo;
  inside += in;
  return in;
}

// Counts c[i][0..3] += (key > hi, == hi, == lo, inside) of chunk [start, start + len), the
// keys keys[i * kChunk + j] and inside flags flags[i * kChunk + j], the storage decoded in registers.
template <typename C, int N, bool kDeltas>
VFUSE_INLINE void count_fused(const DeltaInputs& in, int64_t start, int64_t len, const Bracket* br, int64_t* c,
                              uint32_t* __restrict keys, uint8_t* __restrict flags) {
  using T = typename C::T;
  const T* __restrict base = static_cast<const T*>(in.base) + start;
  const T* tuned[N];
  Bracket b[N];  // local copies: nothing the loop stores can alias them
  for (int i = 0; i < N; ++i) {
    tuned[i] = static_cast<const T*>(in.tuned[i]) + start;
    b[i] = br[i];
  }
  int32_t gt[N] = {}, eq_hi[N] = {}, eq_lo[N] = {}, inside[N] = {};
  for (int64_t j = 0; j < len; ++j) {
    const float b0 = kDeltas ? 0.f : C::load(base[j]);
    for (int i = 0; i < N; ++i) {
      const float d = kDeltas ? C::load(tuned[i][j]) : C::load(tuned[i][j]) - b0;
      const uint32_t key = magnitude_key(d);
      keys[i * kChunk + j] = key;
      flags[i * kChunk + j] = uint8_t(count_key(int32_t(key), b[i], gt[i], eq_hi[i], eq_lo[i], inside[i]));
    }
  }
  for (int i = 0; i < N; ++i) {
    c[4 * i] += b[i].above_all ? 0 : gt[i];
    c[4 * i + 1] += b[i].above_all ? 0 : eq_hi[i];
    c[4 * i + 2] += eq_lo[i];
    c[4 * i + 3] += inside[i];
  }
}

template <typename C, bool kDeltas>
VFUSE_INLINE void count_fused_n(const DeltaInputs& in, int64_t start, int64_t len, const Bracket* br, int64_t* c,
                                uint32_t* keys, uint8_t* flags) {
  switch (in.models()) {
    case 1: return count_fused<C, 1, kDeltas>(in, start, len, br, c, keys, flags);
    case 2: return count_fused<C, 2, kDeltas>(in, start, len, br, c, keys, flags);
    case 3: return count_fused<C, 3, kDeltas>(in, start, len, br, c, keys, flags);
    default: return count_fused<C, 4, kDeltas>(in, start, len, br, c, keys, flags);
  }
}

// The fused count where every tensor has one storage dtype and there are 1–4 models.
VFUSE_MULTIVERSION
void count_chunk_fused(const DeltaInputs& in, int64_t start, int64_t len, const Bracket* br, int64_t* c,
                       uint32_t* keys, uint8_t* flags) {
  switch (in.base_dtype) {
    case kBFloat16:
      return in.tuned_are_deltas ? count_fused_n<Bf16, true>(in, start, len, br, c, keys, flags)
                                 : count_fused_n<Bf16, false>(in, start, len, br, c, keys, flags);
    case kFloat16:
      return in.tuned_are_deltas ? count_fused_n<Fp16, true>(in, start, len, br, c, keys, flags)
                                 : count_fused_n<Fp16, false>(in, start, len, br, c, keys, flags);
    default:
      return in.tuned_are_deltas ? count_fused_n<Fp32, true>(in, start, len, br, c, keys, flags)
                                 : count_fused_n<Fp32, false>(in, start, len, br, c, keys, flags);
  }
}

// The general count: deltas staged in fp32 by load_deltas (mixed dtypes, more models).
VFUSE_MULTIVERSION
void count_chunk_staged(const DeltaInputs& in, int64_t start, int64_t len, const Bracket* br, int64_t* c,
                        uint32_t* keys, uint8_t* flags, ChunkScratch& s) {
  load_deltas(in, start, len, false, s);
  for (int i = 0; i < in.models(); ++i) {
    const float* d = s.delta_of(i);
    int32_t gt = 0, eq_hi = 0, eq_lo = 0, inside = 0;
    for (int64_t j = 0; j < len; ++j) {
      const uint32_t key = magnitude_key(d[j]);
      keys[i * kChunk + j] = key;
      flags[i * kChunk + j] = uint8_t(count_key(int32_t(key), br[i], gt, eq_hi, eq_lo, inside));
    }
    c[4 * i] += br[i].above_all ? 0 : gt;
    c[4 * i + 1] += br[i].above_all ? 0 : eq_hi;
    c[4 * i + 2] += eq_lo;
    c[4 * i + 3] += inside;
  }
}

bool one_dtype(const DeltaInputs& in) {
  if (in.models() > 4) return false;
  for (int dtype : in.tuned_dtypes)
    if (dtype != in.base_dtype) return false;
  return true;
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
  const bool fused = one_dtype(in);
  std::vector<Bracket> br(n);
  for (int i = 0; i < n; ++i) br[i] = Bracket(lo[i], hi[i]);
  std::vector<std::vector<std::vector<int64_t>>> picked(threads, std::vector<std::vector<int64_t>>(n));
#pragma omp parallel num_threads(threads)
  {
    auto& mine = picked[omp_get_thread_num()];
    ChunkScratch s(n);
    std::vector<int64_t> c(size_t(n) * 4), inside_before(n);
    std::vector<uint8_t> flags(size_t(n) * kChunk + 8, 0);
    std::vector<uint32_t> keys(size_t(n) * kChunk);
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      std::fill(c.begin(), c.end(), 0);
      const int64_t end = std::min(in.numel, (blk + 1) * block);
      for (int64_t start = blk * block; start < end; start += kChunk) {
        const int64_t len = std::min(kChunk, end - start);
        for (int i = 0; i < n; ++i) inside_before[i] = c[4 * i + 3];
        if (fused)
          count_chunk_fused(in, start, len, br.data(), c.data(), keys.data(), flags.data());
        else
          count_chunk_staged(in, start, len, br.data(), c.data(), keys.data(), flags.data(), s);
        for (int i = 0; i < n; ++i) {
          if (c[4 * i + 3] == inside_before[i]) continue;
          uint8_t* f = flags.data() + size_t(i) * kChunk;
          const uint32_t* k = keys.data() + size_t(i) * kChunk;
          std::fill(f + len, f + ((len + 7) & ~int64_t(7)), 0);
          for (int64_t j = 0; j < len; j += 8) {  // rare: elements strictly inside the bracket
            uint64_t word;
            std::memcpy(&word, f + j, 8);
            for (; word; word &= word - 1) {
              const int64_t local = j + (__builtin_ctzll(word) >> 3), e = start + local;
              if (int64_t(subsample_hash(e)) < rate[i])
                mine[i].push_back(((int64_t(k[local]) - (int64_t(1) << 30)) << 33) | ((int64_t(1) << 33) - 1 - e));
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
