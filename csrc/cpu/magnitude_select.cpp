// The bracket pass of the exact magnitude selection on the CPU (the algorithm and its
// resolution are in vfuse_kernels/selection.py; the GPU pass is
// vfuse_kernels/triton/magnitude_select.py). One pass over base and every tuned tensor:
// per block of `block` elements and model, the counts of key > hi, key == hi, key == lo
// and lo < key < hi, and the inside elements whose index hash is below the model's rate,
// packed as (key − 2^30) << 33 | (2^33 − 1 − index), in flat order.
//
// Counting is one vectorised loop per chunk: with one storage dtype and 1–4 models (the
// common case) every value is converted, subtracted and compared in registers; otherwise
// the deltas are staged in fp32 first. The loop also leaves each element's key and inside
// flag in L1-resident chunk buffers; inside elements (~1%) are then found 8 flags at a time.
// On AVX-512 CPUs, bf16 and fp32 inputs take a hand-written loop instead (count_avx512, see
// avx512.h: the compiler's widens every compare mask to a vector and spills its counters):
// compares into mask registers and masked adds, the inside flags kept as 16-bit masks and
// scanned four to a 64-bit word, and the few inside elements' keys recomputed from the inputs:
// the pass 30–40% faster on a 2-vCPU Xeon (benchmarks/NOTES.md, v0.6 and v0.7).
//
// sample_keys gathers the selection's sample (the keys at random runs of 16 elements), each run
// prefetched a few runs ahead: every load misses the caches. tie_index finds the rank-th
// element of one block whose key equals the selection's threshold (its cutoff).
#include "parallel.h"

#include <algorithm>
#include <cstring>

#include "avx512.h"
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

#if VFUSE_AVX512_LOOPS

// One model's bracket and its four per-lane counters.
struct LaneCounts {
  __m512i hi, eq_hi_key, lo, lo1, width, gt, eq_hi, eq_lo, inside;
};

// Adds 16 deltas' (valid lanes') contributions; returns their inside mask.
VFUSE_AVX512 VFUSE_INLINE __mmask16 count16(LaneCounts& n, __m512 delta, __mmask16 valid) {
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i key = _mm512_and_si512(_mm512_castps_si512(delta), _mm512_set1_epi32(0x7fffffff));
  const __mmask16 inside = _mm512_mask_cmplt_epu32_mask(valid, _mm512_sub_epi32(key, n.lo1), n.width);
  n.gt = _mm512_mask_add_epi32(n.gt, _mm512_mask_cmpgt_epi32_mask(valid, key, n.hi), n.gt, one);
  n.eq_hi = _mm512_mask_add_epi32(n.eq_hi, _mm512_mask_cmpeq_epi32_mask(valid, key, n.eq_hi_key), n.eq_hi, one);
  n.eq_lo = _mm512_mask_add_epi32(n.eq_lo, _mm512_mask_cmpeq_epi32_mask(valid, key, n.lo), n.eq_lo, one);
  n.inside = _mm512_mask_add_epi32(n.inside, inside, n.inside, one);
  return inside;
}

// Counts c[i][0..3] += (key > hi, == hi, == lo, inside) of chunk [start, start + len) and
// writes the inside masks masks[i * kChunk / 16 + q]: for fp32, bit t of mask q is element
// 16q + t; for bf16, element 32(q / 2) + 2t + q % 2 (the even, then the odd elements of each 32).
template <bool kBf16, int N, bool kDeltas>
VFUSE_AVX512 void count_avx512(const DeltaInputs& in, int64_t start, int64_t len, const Bracket* br, int64_t* c,
                               uint16_t* masks) {
  LaneCounts n[N];
  for (int i = 0; i < N; ++i) {  // inside: lo < key < hi (below 2^31 when hi is above every key)
    const int64_t top = br[i].above_all ? int64_t(1) << 31 : br[i].hi32;
    n[i].hi = _mm512_set1_epi32(br[i].hi32);  // 2^31 - 1 when above every key: never exceeded
    n[i].eq_hi_key = _mm512_set1_epi32(br[i].above_all ? -1 : br[i].hi32);  // keys >= 0: -1 matches none
    n[i].lo = _mm512_set1_epi32(br[i].lo);
    n[i].lo1 = _mm512_set1_epi32(br[i].lo + 1);
    n[i].width = _mm512_set1_epi32(int32_t(uint32_t(std::max<int64_t>(top - br[i].lo - 1, 0))));
    n[i].gt = n[i].eq_hi = n[i].eq_lo = n[i].inside = _mm512_setzero_si512();
  }
  if constexpr (kBf16) {
    const uint16_t* base = static_cast<const uint16_t*>(in.base) + start;
    for (int64_t j = 0; j < len; j += 32) {
      const int64_t rest = std::min<int64_t>(len - j, 32);
      const __mmask32 loaded = rest == 32 ? ~__mmask32(0) : (__mmask32(1) << rest) - 1;
      const __mmask16 even = __mmask16((int64_t(1) << ((rest + 1) / 2)) - 1), odd = __mmask16((int64_t(1) << (rest / 2)) - 1);
      const __m512i b = kDeltas ? _mm512_setzero_si512() : _mm512_maskz_loadu_epi16(loaded, base + j);
      const __m512 b_even = bf16_even(b), b_odd = bf16_odd(b);
      for (int i = 0; i < N; ++i) {
        const __m512i t = _mm512_maskz_loadu_epi16(loaded, static_cast<const uint16_t*>(in.tuned[i]) + start + j);
        const __m512 t_even = bf16_even(t), t_odd = bf16_odd(t);
        uint16_t* m = masks + i * (kChunk / 16) + j / 16;
        m[0] = count16(n[i], kDeltas ? t_even : _mm512_sub_ps(t_even, b_even), even);
        m[1] = count16(n[i], kDeltas ? t_odd : _mm512_sub_ps(t_odd, b_odd), odd);
      }
    }
  } else {
    const float* base = static_cast<const float*>(in.base) + start;
    for (int64_t j = 0; j < len; j += 16) {
      const int64_t rest = std::min<int64_t>(len - j, 16);
      const __mmask16 valid = rest == 16 ? __mmask16(0xffff) : __mmask16((1u << rest) - 1);
      const __m512 b = kDeltas ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(valid, base + j);
      for (int i = 0; i < N; ++i) {
        const __m512 t = _mm512_maskz_loadu_ps(valid, static_cast<const float*>(in.tuned[i]) + start + j);
        masks[i * (kChunk / 16) + j / 16] = count16(n[i], kDeltas ? t : _mm512_sub_ps(t, b), valid);
      }
    }
  }
  for (int i = 0; i < N; ++i) {
    c[4 * i] += _mm512_reduce_add_epi32(n[i].gt);
    c[4 * i + 1] += _mm512_reduce_add_epi32(n[i].eq_hi);
    c[4 * i + 2] += _mm512_reduce_add_epi32(n[i].eq_lo);
    c[4 * i + 3] += _mm512_reduce_add_epi32(n[i].inside);
  }
}

template <bool kBf16, bool kDeltas>
void count_avx512_n(const DeltaInputs& in, int64_t start, int64_t len, const Bracket* br, int64_t* c,
                    uint16_t* masks) {
  switch (in.models()) {
    case 1: return count_avx512<kBf16, 1, kDeltas>(in, start, len, br, c, masks);
    case 2: return count_avx512<kBf16, 2, kDeltas>(in, start, len, br, c, masks);
    case 3: return count_avx512<kBf16, 3, kDeltas>(in, start, len, br, c, masks);
    default: return count_avx512<kBf16, 4, kDeltas>(in, start, len, br, c, masks);
  }
}

// (key − 2^30) << 33 | (last − local) of 8 keys and local indices (last = 2^33 − 1 − the chunk's start).
VFUSE_AVX512 VFUSE_INLINE __m512i pack8(__m256i keys, __m256i local, __m512i last) {
  const __m512i key = _mm512_slli_epi64(_mm512_sub_epi64(_mm512_cvtepu32_epi64(keys), _mm512_set1_epi64(1 << 30)), 33);
  return _mm512_or_si512(key, _mm512_sub_epi64(last, _mm512_cvtepu32_epi64(local)));
}

// The packed candidates (key − 2^30) << 33 | (2^33 − 1 − e) of the lanes `inside` of 16 keys whose
// flat indices are start + local, written to dst (room for 16); returns how many.
VFUSE_AVX512 VFUSE_INLINE int pack16(__m512i keys, __m512i local, __mmask16 inside, int64_t start, int64_t* dst) {
  const __m512i k = _mm512_maskz_compress_epi32(inside, keys), e = _mm512_maskz_compress_epi32(inside, local);
  const __m512i last = _mm512_set1_epi64((int64_t(1) << 33) - 1 - start);
  const int count = __builtin_popcount(inside);
  _mm512_storeu_si512(dst, pack8(_mm512_castsi512_si256(k), _mm512_castsi512_si256(e), last));
  if (count > 8) _mm512_storeu_si512(dst + 8, pack8(_mm512_extracti64x4_epi64(k, 1), _mm512_extracti64x4_epi64(e, 1), last));
  return count;
}

// Writes model i's inside elements of chunk [start, start + len) as packed candidates to dst (room for
// their number + 16), from count_avx512's inside masks: each 16-lane group with an inside bit has its
// keys recomputed (the counting loop's conversion and subtraction) and compressed. Returns the number.
template <bool kBf16, bool kDeltas>
VFUSE_AVX512 int64_t pick_avx512(const DeltaInputs& in, int i, int64_t start, int64_t len, const uint16_t* masks,
                                 int64_t* dst) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i sign_off = _mm512_set1_epi32(0x7fffffff);
  int64_t written = 0;
  const int64_t groups = kBf16 ? 2 * ((len + 31) / 32) : (len + 15) / 16;  // <= 32
  const __m512i all = _mm512_maskz_loadu_epi16(__mmask32((uint64_t(1) << groups) - 1), masks);
  // the groups holding an inside lane, visited by their bits (a branch per group mispredicts at ~2% inside)
  for (uint32_t holding = _mm512_test_epi16_mask(all, all); holding; holding &= holding - 1) {
    const int64_t q = __builtin_ctz(holding);
    const __mmask16 inside = masks[q];
    __m512 delta;
    __m512i local;
    if constexpr (kBf16) {  // mask q: the even (q even) or odd lanes of elements 32(q / 2) ..
      const int64_t j = 32 * (q / 2), rest = std::min<int64_t>(len - j, 32);
      const __mmask32 loaded = rest == 32 ? ~__mmask32(0) : (__mmask32(1) << rest) - 1;
      const __m512i t = _mm512_maskz_loadu_epi16(loaded, static_cast<const uint16_t*>(in.tuned[i]) + start + j);
      const __m512i b = kDeltas ? _mm512_setzero_si512()
                                : _mm512_maskz_loadu_epi16(loaded, static_cast<const uint16_t*>(in.base) + start + j);
      delta = q % 2 ? bf16_odd(t) : bf16_even(t);
      if (!kDeltas) delta = _mm512_sub_ps(delta, q % 2 ? bf16_odd(b) : bf16_even(b));
      local = _mm512_add_epi32(_mm512_slli_epi32(lane, 1), _mm512_set1_epi32(int32_t(j + q % 2)));
    } else {
      const int64_t j = 16 * q, rest = std::min<int64_t>(len - j, 16);
      const __mmask16 valid = rest == 16 ? __mmask16(0xffff) : __mmask16((1u << rest) - 1);
      delta = _mm512_maskz_loadu_ps(valid, static_cast<const float*>(in.tuned[i]) + start + j);
      if (!kDeltas) delta = _mm512_sub_ps(delta, _mm512_maskz_loadu_ps(valid, static_cast<const float*>(in.base) + start + j));
      local = _mm512_add_epi32(lane, _mm512_set1_epi32(int32_t(j)));
    }
    written += pack16(_mm512_and_si512(_mm512_castps_si512(delta), sign_off), local, inside, start, dst + written);
  }
  return written;
}

int64_t pick_chunk_avx512(const DeltaInputs& in, int i, int64_t start, int64_t len, const uint16_t* masks,
                          int64_t* dst) {
  if (in.base_dtype == kBFloat16)
    return in.tuned_are_deltas ? pick_avx512<true, true>(in, i, start, len, masks, dst)
                               : pick_avx512<true, false>(in, i, start, len, masks, dst);
  return in.tuned_are_deltas ? pick_avx512<false, true>(in, i, start, len, masks, dst)
                             : pick_avx512<false, false>(in, i, start, len, masks, dst);
}

void count_chunk_avx512(const DeltaInputs& in, int64_t start, int64_t len, const Bracket* br, int64_t* c,
                        uint16_t* masks) {
  const bool bf16 = in.base_dtype == kBFloat16;
  if (bf16)
    return in.tuned_are_deltas ? count_avx512_n<true, true>(in, start, len, br, c, masks)
                               : count_avx512_n<true, false>(in, start, len, br, c, masks);
  return in.tuned_are_deltas ? count_avx512_n<false, true>(in, start, len, br, c, masks)
                             : count_avx512_n<false, false>(in, start, len, br, c, masks);
}
#else
void count_chunk_avx512(const DeltaInputs&, int64_t, int64_t, const Bracket*, int64_t*, uint16_t*) {}
int64_t pick_chunk_avx512(const DeltaInputs&, int, int64_t, int64_t, const uint16_t*, int64_t*) { return 0; }
#endif

// Model i's key of flat element e (bf16 or fp32 storage), as the counting loops compute it.
uint32_t key_at(const DeltaInputs& in, int i, int64_t e) {
  auto load = [&](const void* p) {
    return in.base_dtype == kBFloat16 ? bf16_to_float(static_cast<const uint16_t*>(p)[e]) : static_cast<const float*>(p)[e];
  };
  return magnitude_key(in.tuned_are_deltas ? load(in.tuned[i]) : load(in.tuned[i]) - load(in.base));
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

constexpr int64_t kSampleAhead = 16;  // prefetch distance of sample_keys, in runs

// keys[i][r * run + j] = model i's key at element runs[r] * run + j: the selection's sample
// (reference/magnitude_select.py's sample_keys, the same fp32 subtraction), a run at a time.
void sample_keys(const DeltaInputs& in, const int64_t* runs, int64_t count, int64_t run, int32_t* keys) {
  const int n = in.models();
#pragma omp parallel num_threads(threads_for(count * run * (n + 1)))
  {
    std::vector<float> b(static_cast<size_t>(run)), d(static_cast<size_t>(run));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < count; ++r) {
      if (r + kSampleAhead < count) {  // random runs: every load misses the caches
        const int64_t ahead = runs[r + kSampleAhead] * run;
        if (!in.tuned_are_deltas) prefetch_chunk(in.base, in.base_dtype, ahead, run);
        for (int i = 0; i < n; ++i) prefetch_chunk(in.tuned[i], in.tuned_dtypes[i], ahead, run);
      }
      const int64_t start = runs[r] * run;
      if (!in.tuned_are_deltas) load_chunk(in.base, in.base_dtype, start, run, nullptr, b.data());
      for (int i = 0; i < n; ++i) {
        load_chunk(in.tuned[i], in.tuned_dtypes[i], start, run, in.tuned_are_deltas ? nullptr : b.data(), d.data());
        int32_t* out = keys + (int64_t(i) * count + r) * run;
        for (int64_t j = 0; j < run; ++j) out[j] = int32_t(magnitude_key(d[j]));
      }
    }
  }
}

// The flat index of the rank-th (1-based) element of [start, stop) whose model-i key is `key`,
// or -1 where fewer hold it: the selection's cutoff, searched in the one block that the bracket
// pass's per-block counts point to.
int64_t tie_index(const DeltaInputs& in, int i, int64_t start, int64_t stop, uint32_t key, int64_t rank) {
  float b[kChunk], d[kChunk];
  for (int64_t at = start; at < stop; at += kChunk) {
    const int64_t len = std::min(kChunk, stop - at);
    if (!in.tuned_are_deltas) load_chunk(in.base, in.base_dtype, at, len, nullptr, b);
    load_chunk(in.tuned[i], in.tuned_dtypes[i], at, len, in.tuned_are_deltas ? nullptr : b, d);
    for (int64_t j = 0; j < len; ++j)
      if (magnitude_key(d[j]) == key && --rank == 0) return at + j;
  }
  return -1;
}

void bracket_pass(const DeltaInputs& in, const int64_t* lo, const int64_t* hi, const int64_t* rate, int64_t cap,
                  int64_t block, int32_t* counts, int64_t* cand, int64_t* fill) {
  const int n = in.models();
  const int64_t blocks = (in.numel + block - 1) / block;
  const int threads = threads_for(in.numel * (n + 1));
  // count_avx512 takes the pass with one storage dtype, 1–4 models (one_dtype) and AVX-512 loops for it
  const bool fused = one_dtype(in), avx512 = fused && avx512_loops_for(in.base_dtype);
  std::vector<Bracket> br(n);
  for (int i = 0; i < n; ++i) br[i] = Bracket(lo[i], hi[i]);
  std::vector<int64_t> totals(size_t(threads) * n);  // candidates found by each thread, per model
#pragma omp parallel num_threads(threads)
  {
    // this thread's candidates per model, in flat order (static schedule: its blocks are one range);
    // the vectors keep their capacity between calls, so a checkpoint's selections fault no fresh pages
    static thread_local std::vector<std::vector<int64_t>> kept;
    const int tid = omp_get_thread_num();
    if (kept.size() < size_t(n)) kept.resize(n);
    for (int i = 0; i < n; ++i) kept[i].clear();
    ChunkScratch s(n);
    std::vector<int64_t> c(size_t(n) * 4), inside_before(n), picked(kChunk + 16);
    std::vector<uint8_t> flags(size_t(n) * kChunk + 8, 0);
    std::vector<uint32_t> keys(size_t(n) * kChunk);
    std::vector<uint16_t> masks(size_t(n) * (kChunk / 16));
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      std::fill(c.begin(), c.end(), 0);
      const int64_t end = std::min(in.numel, (blk + 1) * block);
      for (int64_t start = blk * block; start < end; start += kChunk) {
        const int64_t len = std::min(kChunk, end - start);
        for (int i = 0; i < n; ++i) inside_before[i] = c[4 * i + 3];
        if (avx512)
          count_chunk_avx512(in, start, len, br.data(), c.data(), masks.data());
        else if (fused)
          count_chunk_fused(in, start, len, br.data(), c.data(), keys.data(), flags.data());
        else
          count_chunk_staged(in, start, len, br.data(), c.data(), keys.data(), flags.data(), s);
        for (int i = 0; i < n; ++i) {  // rare: the elements strictly inside the bracket
          if (c[4 * i + 3] == inside_before[i]) continue;
          int64_t got = 0;  // the chunk's picks, packed into `picked`, then appended to the model's candidates
          auto pick = [&](int64_t local, uint32_t key) {
            const int64_t e = start + local;
            if (rate[i] > 0xffffffffLL || int64_t(subsample_hash(e)) < rate[i])  // rate 2^32: every element
              picked[got++] = ((int64_t(key) - (int64_t(1) << 30)) << 33) | ((int64_t(1) << 33) - 1 - e);
          };
          uint16_t* m = masks.data() + size_t(i) * (kChunk / 16);
          if (avx512 && rate[i] > 0xffffffffLL) {  // every inside element: compressed 16 lanes at a time
            got = pick_chunk_avx512(in, i, start, len, m, picked.data());
          } else if (avx512) {  // 16-bit masks (count_avx512's order), four per word; the keys recomputed
            const bool pairs = in.base_dtype == kBFloat16;
            const int64_t written = pairs ? 2 * ((len + 31) / 32) : (len + 15) / 16;
            std::fill(m + written, m + ((written + 3) & ~int64_t(3)), 0);
            for (int64_t w = 0; w < written; w += 4) {
              uint64_t bits;
              std::memcpy(&bits, m + w, 8);
              for (; bits; bits &= bits - 1) {
                const int bit = __builtin_ctzll(bits);
                const int64_t q = w + bit / 16, t = bit % 16;
                const int64_t local = pairs ? 32 * (q / 2) + 2 * t + q % 2 : 16 * q + t;
                pick(local, key_at(in, i, start + local));
              }
            }
          } else {
            uint8_t* f = flags.data() + size_t(i) * kChunk;
            const uint32_t* k = keys.data() + size_t(i) * kChunk;
            std::fill(f + len, f + ((len + 7) & ~int64_t(7)), 0);
            for (int64_t j = 0; j < len; j += 8) {  // 8 flags at a time
              uint64_t word;
              std::memcpy(&word, f + j, 8);
              for (; word; word &= word - 1) {
                const int64_t local = j + (__builtin_ctzll(word) >> 3);
                pick(local, k[local]);
              }
            }
          }
          kept[i].insert(kept[i].end(), picked.data(), picked.data() + got);
        }
      }
      for (int i = 0; i < n; ++i)
        for (int f = 0; f < 4; ++f) counts[(blk * n + i) * 4 + f] = int32_t(c[4 * i + f]);
    }
    for (int i = 0; i < n; ++i) totals[size_t(tid) * n + i] = int64_t(kept[i].size());
#pragma omp barrier
    for (int i = 0; i < n; ++i) {  // into cand in thread order: flat order, the first cap of them
      int64_t at = 0;
      for (int t = 0; t < tid; ++t) at += totals[size_t(t) * n + i];
      const int64_t room = std::max<int64_t>(0, std::min(int64_t(kept[i].size()), cap - at));
      if (room) std::memcpy(cand + i * cap + at, kept[i].data(), size_t(room) * sizeof(int64_t));
    }
  }
  for (int i = 0; i < n; ++i)
    for (int t = 0; t < threads; ++t) fill[i] += totals[size_t(t) * n + i];
}

}  // namespace vfuse
