// Fused delta merge on the CPU: one pass reads base and every tuned tensor once and
// writes the output once (fp32 arithmetic, rounding once to the output dtype).
//   uᵢ = (δᵢ · coefᵢ) · keepᵢ          (coefᵢ = wᵢ · rescaleᵢ)
//   election s = sign(Σ uᵢ) or sign(Σ sign uᵢ) (≥ 0 → +1); agreeᵢ = sign(uᵢ) == s
//   m = Σ agreeᵢ uᵢ, d = Σ agreeᵢ wᵢ   (without election: m = Σ uᵢ, d = Σ wᵢ)
//   out = base + scale · (normalize ? m / (d == 0 ? 1 : d) : m)
// Work is split in chunks of kChunk elements. With one storage dtype and 1–4 models, task
// arithmetic / linear and TIES run one fused loop per chunk, merged in registers (TIES on bf16
// or fp32 through AVX-512 intrinsics where the CPU has them: trim_elect_avx512, 1.15–1.3× the
// compiler's loop on a 2-vCPU Xeon, benchmarks/NOTES.md v0.7); otherwise each chunk runs a few
// short loops over L1-resident fp32 buffers (vectorised for AVX-512, AVX2 or baseline x86-64).
#include "delta_merge.h"

#include <algorithm>
#include <climits>
#include <cmath>

#include "avx512.h"

#include "parallel.h"

namespace vfuse {

VFUSE_MULTIVERSION
void load_deltas(const DeltaInputs& in, int64_t start, int64_t len, bool with_keep, ChunkScratch& s) {
  const int64_t ahead = start + kPrefetchChunks * kChunk;  // a chunk the same thread reads soon
  if (ahead < in.numel) {
    const int64_t ahead_len = std::min(kChunk, in.numel - ahead);
    prefetch_chunk(in.base, in.base_dtype, ahead, ahead_len);
    for (int i = 0; i < in.models(); ++i) prefetch_chunk(in.tuned[i], in.tuned_dtypes[i], ahead, ahead_len);
  }
  load_chunk(in.base, in.base_dtype, start, len, nullptr, s.base.data());
  const float* minus = in.tuned_are_deltas ? nullptr : s.base.data();
  s.keep_all = !with_keep || in.sparsify == kKeepAll;
  for (int i = 0; i < in.models(); ++i) {
    float* d = s.delta_of(i);
    load_chunk(in.tuned[i], in.tuned_dtypes[i], start, len, minus, d);
    if (s.keep_all) continue;
    float* keep = s.keep_of(i);
    if (in.sparsify == kTrim) {
      const uint32_t key = uint32_t(in.keep_a[i]);
      // cutoff relative to this chunk, clamped so the comparison stays in 32 bits
      const int32_t last = int32_t(std::clamp<int64_t>(in.keep_b[i] - start, -1, kChunk));
      for (int32_t j = 0; j < int32_t(len); ++j) {
        uint32_t k = magnitude_key(d[j]);
        keep[j] = float(int(k > key) | (int(k == key) & int(j <= last)));
      }
    } else if (in.sparsify == kBand) {
      const int n = in.models();
      const int64_t wide_key = in.keep_a[i], wide_cut = in.keep_b[i] - start;
      const int64_t narrow_key = in.keep_a[n + i], narrow_cut = in.keep_b[n + i] - start;
      for (int64_t j = 0; j < len; ++j) {
        const int64_t k = magnitude_key(d[j]);
        const int wide = int(k > wide_key) | (int(k == wide_key) & int(j > wide_cut));
        const int narrow = int(k > narrow_key) | (int(k == narrow_key) & int(j > narrow_cut));
        keep[j] = float(wide & (1 - narrow));
      }
    } else if (in.sparsify == kMask) {
      const uint8_t* bits = reinterpret_cast<const uint8_t*>(in.keep_a[i]);
      if (bits == nullptr) {
        std::fill(keep, keep + len, 1.f);
        continue;
      }
      bits += start >> 3;  // start is a multiple of kChunk, so of 8
      for (int64_t j = 0; j < len; ++j) keep[j] = float((bits[j >> 3] >> (j & 7)) & 1);
    } else {
      dare_bits_chunk(in.seed, uint32_t(i), start, len, s.bits.data());
      const uint64_t threshold = uint64_t(in.keep_a[i]);
      for (int64_t j = 0; j < len; ++j) keep[j] = float(uint64_t(s.bits[j]) < threshold);
    }
  }
}

namespace {

// How the fused dense loop divides by d = Σ wᵢ (linear): not at all (task arithmetic); by one fp32
// multiplication where d is a power of two (m · 2⁻ᵏ is the exact quotient, correctly rounded like
// m / d: d = 1 for weights that sum to one); else exact_quotient's fp64 product.
enum Quotient : int { kNoQuotient, kPowerOfTwo, kFp64Inverse };

// The Quotient of a dense merge: a power of two d whose inverse is a normal fp32 value.
int dense_quotient(bool normalize, float weight_sum) {
  if (!normalize) return kNoQuotient;
  int exponent;
  const double fraction = std::frexp(double(weight_sum == 0.f ? 1.f : weight_sum), &exponent);
  return std::fabs(fraction) == 0.5 && exponent > -125 && exponent < 128 ? kPowerOfTwo : kFp64Inverse;
}

struct MergeParams {
  void* out;
  int out_dtype;
  bool stream_out;  // out aliases no input: write it with non-temporal stores
  const float* coefs;
  const float* weights;
  int elect;
  bool normalize;
  float scale;
  float weight_sum;
  int quotient;  // dense merges: how m is divided by weight_sum (Quotient, dense_quotient)
};

// out[start, start+len) = round(b + scale · m); `staged` holds kChunk outputs of 4 bytes.
VFUSE_INLINE void store_result(const MergeParams& p, int64_t start, int64_t len, const float* b, const float* m,
                         unsigned char* staged) {
  if (!p.stream_out) {
    store_chunk(p.out, p.out_dtype, start, len, b, p.scale, m);
    return;
  }
  const int size = dtype_size(p.out_dtype);
  store_chunk(staged, p.out_dtype, 0, len, b, p.scale, m);
  stream_copy(static_cast<char*>(p.out) + start * size, staged, size_t(len) * size);
}

// uᵢ of model i into u (keep flags applied unless everything is kept).
VFUSE_INLINE void weighted_delta(const ChunkScratch& s, int i, float coef, int64_t len, float* u) {
  const float* delta = s.delta_of(i);
  if (s.keep_all) {
    for (int64_t j = 0; j < len; ++j) u[j] = delta[j] * coef;
  } else {
    const float* keep = s.keep_of(i);
    for (int64_t j = 0; j < len; ++j) u[j] = (delta[j] * coef) * keep[j];
  }
}

// Merges one chunk and stores it, rounded once, into out[start, start+len).
VFUSE_MULTIVERSION
void merge_chunk(ChunkScratch& s, int n, int64_t start, int64_t len, const MergeParams& p, float* u, float* m,
                 float* d, float* vote, unsigned char* staged) {
  if (p.elect == kNoElection) {
    weighted_delta(s, 0, p.coefs[0], len, m);
    for (int i = 1; i < n; ++i) {
      weighted_delta(s, i, p.coefs[i], len, u);
      for (int64_t j = 0; j < len; ++j) m[j] += u[j];
    }
    const float divisor = p.weight_sum == 0.f ? 1.f : p.weight_sum;
    if (p.normalize)
      for (int64_t j = 0; j < len; ++j) m[j] = m[j] / divisor;
  } else {
    std::fill(vote, vote + len, 0.f);
    for (int i = 0; i < n; ++i) {
      float* ui = u + size_t(i) * kChunk;
      weighted_delta(s, i, p.coefs[i], len, ui);
      if (p.elect == kElectSum)
        for (int64_t j = 0; j < len; ++j) vote[j] += ui[j];
      else
        for (int64_t j = 0; j < len; ++j) vote[j] += float(ui[j] > 0.f) - float(ui[j] < 0.f);
    }
    std::fill(m, m + len, 0.f);
    std::fill(d, d + len, 0.f);
    for (int i = 0; i < n; ++i) {
      const float* ui = u + size_t(i) * kChunk;
      const float w = p.weights[i];
      for (int64_t j = 0; j < len; ++j) {
        int positive = vote[j] >= 0.f;
        float agree = float((positive & int(ui[j] > 0.f)) | ((1 - positive) & int(ui[j] < 0.f)));
        m[j] += ui[j] * agree;
        d[j] += w * agree;
      }
    }
    if (p.normalize)
      for (int64_t j = 0; j < len; ++j) m[j] = m[j] / (d[j] + float(d[j] == 0.f));  // d = 0 counts as 1
  }
  store_result(p, start, len, s.base.data(), m, staged);
}

// Task arithmetic / linear with every tensor in one storage dtype and N models known at
// compile time: one loop, each element loaded, merged in registers and stored once.
// out may be base or a tuned tensor: element j is read before it is written and no
// iteration depends on another (ivdep), so vectorising is safe with that aliasing.
template <typename C, int N, bool kDeltas, int kQuotient>
VFUSE_INLINE void dense_fused(const DeltaInputs& in, const MergeParams& p, int64_t start, int64_t len) {
  using T = typename C::T;
  const T* base = static_cast<const T*>(in.base) + start;
  const T* tuned[N];
  float coef[N];
  for (int i = 0; i < N; ++i) {
    tuned[i] = static_cast<const T*>(in.tuned[i]) + start;
    coef[i] = p.coefs[i];
  }
  T* out = static_cast<T*>(p.out) + start;
  const double inverse = 1.0 / double(p.weight_sum == 0.f ? 1.f : p.weight_sum);
  const float power = float(inverse);  // exact where kPowerOfTwo applies
  const float scale = p.scale;
#pragma GCC ivdep
  for (int64_t j = 0; j < len; ++j) {
    const float b = C::load(base[j]);
    float m = 0.f;
    for (int i = 0; i < N; ++i) m += (kDeltas ? C::load(tuned[i][j]) : C::load(tuned[i][j]) - b) * coef[i];
    if (kQuotient == kPowerOfTwo) m *= power;
    if (kQuotient == kFp64Inverse) m = exact_quotient(m, inverse);
    out[j] = C::store(b + scale * m);
  }
}

template <typename C, bool kDeltas, int kQuotient>
VFUSE_INLINE void dense_fused_n(const DeltaInputs& in, const MergeParams& p, int64_t start, int64_t len) {
  switch (in.models()) {
    case 1: return dense_fused<C, 1, kDeltas, kQuotient>(in, p, start, len);
    case 2: return dense_fused<C, 2, kDeltas, kQuotient>(in, p, start, len);
    case 3: return dense_fused<C, 3, kDeltas, kQuotient>(in, p, start, len);
    default: return dense_fused<C, 4, kDeltas, kQuotient>(in, p, start, len);
  }
}

template <typename C, bool kDeltas>
VFUSE_INLINE void dense_fused_quotient(const DeltaInputs& in, const MergeParams& p, int64_t start, int64_t len) {
  switch (p.quotient) {
    case kNoQuotient: return dense_fused_n<C, kDeltas, kNoQuotient>(in, p, start, len);
    case kPowerOfTwo: return dense_fused_n<C, kDeltas, kPowerOfTwo>(in, p, start, len);
    default: return dense_fused_n<C, kDeltas, kFp64Inverse>(in, p, start, len);
  }
}

template <typename C>
VFUSE_INLINE void dense_fused_dtype(const DeltaInputs& in, const MergeParams& p, int64_t start, int64_t len) {
  if (in.tuned_are_deltas)
    dense_fused_quotient<C, true>(in, p, start, len);
  else
    dense_fused_quotient<C, false>(in, p, start, len);
}

// x where c holds, else +0: a bit mask, so that the loops stay branch-free and vectorise.
VFUSE_INLINE float keep_if(bool c, float x) { return bits_to_float(float_to_bits(x) & (0u - uint32_t(c))); }

// TIES (trim, then election) with every tensor in one storage dtype and N models known at
// compile time: one loop, each element's deltas, keep flags, vote and agreement in registers;
// the same fp32 operations in the same order as merge_chunk (bit-identical results).
template <typename C, int N, bool kDeltas, bool kCount, bool kNormalize>
VFUSE_INLINE void trim_elect_fused(const DeltaInputs& in, const MergeParams& p, int64_t start, int64_t len) {
  using T = typename C::T;
  const T* base = static_cast<const T*>(in.base) + start;
  const T* tuned[N];
  float coef[N], weight[N];
  int32_t key[N];
  int32_t last[N];  // cutoff relative to this chunk, clamped so the comparison stays in 32 bits
  for (int i = 0; i < N; ++i) {
    tuned[i] = static_cast<const T*>(in.tuned[i]) + start;
    coef[i] = p.coefs[i];
    weight[i] = p.weights[i];
    key[i] = int32_t(in.keep_a[i]);
    last[i] = int32_t(std::clamp<int64_t>(in.keep_b[i] - start, -1, kChunk));
  }
  T* out = static_cast<T*>(p.out) + start;
  const float scale = p.scale;
  // Selects instead of multiplications by 0/1 flags, and signed 32-bit key compares (keys are
  // < 2^31; AVX2 has no unsigned compare): a third fewer vector operations. A dropped or
  // disagreeing term is +0 here where the flag product gave ±0; sums that start at +0 are
  // unchanged by either zero, so the results are the same bits.
#pragma GCC ivdep
  for (int32_t j = 0; j < int32_t(len); ++j) {
    const float b = C::load(base[j]);
    float u[N];
    float vote = 0.f;
    for (int i = 0; i < N; ++i) {
      const float d = kDeltas ? C::load(tuned[i][j]) : C::load(tuned[i][j]) - b;
      const int32_t k = int32_t(magnitude_key(d));
      u[i] = keep_if((k > key[i]) | ((k == key[i]) & (j <= last[i])), d * coef[i]);
      vote += kCount ? float(u[i] > 0.f) - float(u[i] < 0.f) : u[i];
    }
    const bool positive = vote >= 0.f;
    float m = 0.f, divisor = 0.f;
    for (int i = 0; i < N; ++i) {
      const bool agree = (positive & (u[i] > 0.f)) | (!positive & (u[i] < 0.f));
      m += keep_if(agree, u[i]);
      divisor += keep_if(agree, weight[i]);
    }
    if (kNormalize) m = m / (divisor + float(divisor == 0.f));
    out[j] = C::store(b + scale * m);
  }
}

template <typename C, bool kDeltas, bool kCount, bool kNormalize>
VFUSE_INLINE void trim_elect_n(const DeltaInputs& in, const MergeParams& p, int64_t start, int64_t len) {
  switch (in.models()) {
    case 1: return trim_elect_fused<C, 1, kDeltas, kCount, kNormalize>(in, p, start, len);
    case 2: return trim_elect_fused<C, 2, kDeltas, kCount, kNormalize>(in, p, start, len);
    case 3: return trim_elect_fused<C, 3, kDeltas, kCount, kNormalize>(in, p, start, len);
    default: return trim_elect_fused<C, 4, kDeltas, kCount, kNormalize>(in, p, start, len);
  }
}

template <typename C>
VFUSE_INLINE void trim_elect_dtype(const DeltaInputs& in, const MergeParams& p, int64_t start, int64_t len) {
  const bool count = p.elect == kElectCount;
  if (in.tuned_are_deltas) {
    if (count) p.normalize ? trim_elect_n<C, true, true, true>(in, p, start, len)
                           : trim_elect_n<C, true, true, false>(in, p, start, len);
    else p.normalize ? trim_elect_n<C, true, false, true>(in, p, start, len)
                     : trim_elect_n<C, true, false, false>(in, p, start, len);
  } else {
    if (count) p.normalize ? trim_elect_n<C, false, true, true>(in, p, start, len)
                           : trim_elect_n<C, false, true, false>(in, p, start, len);
    else p.normalize ? trim_elect_n<C, false, false, true>(in, p, start, len)
                     : trim_elect_n<C, false, false, false>(in, p, start, len);
  }
}

// TIES in one loop over a chunk (the caller checked dense_fusable and the method).
VFUSE_MULTIVERSION
void merge_chunk_trim_elect(const DeltaInputs& in, int64_t start, int64_t len, const MergeParams& p) {
  switch (p.out_dtype) {
    case kBFloat16: trim_elect_dtype<Bf16>(in, p, start, len); return;
    case kFloat16: trim_elect_dtype<Fp16>(in, p, start, len); return;
    default: trim_elect_dtype<Fp32>(in, p, start, len); return;
  }
}

#if VFUSE_AVX512_LOOPS
// b + scale · m of 16 lanes, m the election's disjoint mean of the weighted, sparsified deltas uᵢ
// (merge_chunk's operations in its order). kFlagProducts: a disagreeing term adds uᵢ · 0, as
// merge_chunk's flag product does (NaN from NaN or ±inf), where trim_elect_fused leaves it out.
template <int N, bool kCount, bool kNormalize, bool kFlagProducts = false>
VFUSE_AVX512 VFUSE_INLINE __m512 elect16(__m512 b, const __m512* u, const __m512* weight, __m512 scale) {
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.f);
  __m512 vote = zero;
  for (int i = 0; i < N; ++i) {
    if (kCount) {
      vote = _mm512_mask_add_ps(vote, _mm512_cmp_ps_mask(u[i], zero, _CMP_GT_OQ), vote, one);
      vote = _mm512_mask_sub_ps(vote, _mm512_cmp_ps_mask(u[i], zero, _CMP_LT_OQ), vote, one);
    } else {
      vote = i == 0 ? u[0] : _mm512_add_ps(vote, u[i]);  // 0 + u₀ has u₀'s sign test
    }
  }
  const __mmask16 positive = _mm512_cmp_ps_mask(vote, zero, _CMP_GE_OQ);
  __m512 m = zero, divisor = zero;
  for (int i = 0; i < N; ++i) {
    const __mmask16 agree = _mm512_mask_cmp_ps_mask(positive, u[i], zero, _CMP_GT_OQ) |
                            _mm512_mask_cmp_ps_mask(__mmask16(~positive), u[i], zero, _CMP_LT_OQ);
    m = kFlagProducts ? _mm512_add_ps(m, _mm512_mask_mul_ps(u[i], __mmask16(~agree), u[i], zero))
                      : _mm512_mask_add_ps(m, agree, m, u[i]);
    if (kNormalize) divisor = _mm512_mask_add_ps(divisor, agree, divisor, weight[i]);
  }
  if (kNormalize)
    m = _mm512_div_ps(m, _mm512_mask_mov_ps(divisor, _mm512_cmp_ps_mask(divisor, zero, _CMP_EQ_OQ), one));
  return _mm512_add_ps(b, _mm512_mul_ps(scale, m));
}

// trim_elect_fused on AVX-512 (bf16 and fp32 storage): its fp32 operations in its order, 16
// lanes at a time, every flag in a mask register. The chunk is split at each model's cutoff C,
// so that each key meets one threshold: key > K − 1 up to C, key > K after it. Keep flags and
// agreement select instead of multiplying by 0/1 (a dropped or disagreeing term is left out of
// sums that start at +0, as the portable loop adds +0 for it): the same bits, tested against it.
template <int N, bool kDeltas, bool kCount, bool kNormalize>
VFUSE_AVX512 VFUSE_INLINE __m512 trim_elect16(__m512 b, const __m512* t, const __m512i* floor, const __m512* coef,
                                             const __m512* weight, __m512 scale) {
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
  __m512 u[N];
  for (int i = 0; i < N; ++i) {
    const __m512 d = kDeltas ? t[i] : _mm512_sub_ps(t[i], b);
    const __mmask16 keep = _mm512_cmpgt_epi32_mask(_mm512_and_si512(_mm512_castps_si512(d), magnitude), floor[i]);
    u[i] = _mm512_maskz_mul_ps(keep, d, coef[i]);
  }
  return elect16<N, kCount, kNormalize>(b, u, weight, scale);
}

template <bool kBf16, int N, bool kDeltas, bool kCount, bool kNormalize>
VFUSE_AVX512 void trim_elect_avx512(const DeltaInputs& in, const MergeParams& p, int64_t start, int64_t len) {
  __m512 coef[N], weight[N];
  for (int i = 0; i < N; ++i) {
    coef[i] = _mm512_set1_ps(p.coefs[i]);
    weight[i] = _mm512_set1_ps(p.weights[i]);
  }
  const __m512 scale = _mm512_set1_ps(p.scale);
  int64_t bounds[N + 2] = {0, len};  // segments [bounds[s], bounds[s + 1]): each model's cutoff starts one
  int count = 2;
  for (int i = 0; i < N; ++i) {
    const int64_t after = in.keep_b[i] - start + 1;
    if (after > 0 && after < len) bounds[count++] = after;
  }
  std::sort(bounds, bounds + count);
  for (int s = 0; s + 1 < count; ++s) {
    const int64_t first = bounds[s], end = bounds[s + 1];
    __m512i floor[N];
    for (int i = 0; i < N; ++i) {  // the portable loop's 32-bit key, one lower up to the cutoff
      const int64_t key = int32_t(in.keep_a[i]);
      floor[i] = _mm512_set1_epi32(int32_t(std::max<int64_t>(key - (start + first <= in.keep_b[i]), INT32_MIN)));
    }
    if constexpr (kBf16) {
      const uint16_t* base = static_cast<const uint16_t*>(in.base) + start;
      uint16_t* out = static_cast<uint16_t*>(p.out) + start;
      for (int64_t j = first; j < end; j += 32) {
        const int64_t rest = std::min<int64_t>(end - j, 32);
        const __mmask32 valid = rest == 32 ? ~__mmask32(0) : (__mmask32(1) << rest) - 1;
        const __m512i b = _mm512_maskz_loadu_epi16(valid, base + j);
        __m512i t[N];
        for (int i = 0; i < N; ++i)
          t[i] = _mm512_maskz_loadu_epi16(valid, static_cast<const uint16_t*>(in.tuned[i]) + start + j);
        __m512 even[N], odd[N];
        for (int i = 0; i < N; ++i) {
          even[i] = bf16_even(t[i]);
          odd[i] = bf16_odd(t[i]);
        }
        const __m512 lo = trim_elect16<N, kDeltas, kCount, kNormalize>(bf16_even(b), even, floor, coef, weight, scale);
        const __m512 hi = trim_elect16<N, kDeltas, kCount, kNormalize>(bf16_odd(b), odd, floor, coef, weight, scale);
        _mm512_mask_storeu_epi16(out + j, valid, bf16_pack(bf16_high_halves(lo), bf16_high_halves(hi)));
      }
    } else {
      const float* base = static_cast<const float*>(in.base) + start;
      float* out = static_cast<float*>(p.out) + start;
      for (int64_t j = first; j < end; j += 16) {
        const int64_t rest = std::min<int64_t>(end - j, 16);
        const __mmask16 valid = rest == 16 ? __mmask16(0xffff) : __mmask16((1u << rest) - 1);
        __m512 t[N];
        for (int i = 0; i < N; ++i)
          t[i] = _mm512_maskz_loadu_ps(valid, static_cast<const float*>(in.tuned[i]) + start + j);
        const __m512 b = _mm512_maskz_loadu_ps(valid, base + j);
        _mm512_mask_storeu_ps(out + j, valid,
                              trim_elect16<N, kDeltas, kCount, kNormalize>(b, t, floor, coef, weight, scale));
      }
    }
  }
}

template <bool kBf16, int N>
void trim_elect_avx512_flags(const DeltaInputs& in, const MergeParams& p, int64_t start, int64_t len) {
  const bool count = p.elect == kElectCount;
  const int code = int(in.tuned_are_deltas) * 4 + int(count) * 2 + int(p.normalize);
  switch (code) {
    case 0: return trim_elect_avx512<kBf16, N, false, false, false>(in, p, start, len);
    case 1: return trim_elect_avx512<kBf16, N, false, false, true>(in, p, start, len);
    case 2: return trim_elect_avx512<kBf16, N, false, true, false>(in, p, start, len);
    case 3: return trim_elect_avx512<kBf16, N, false, true, true>(in, p, start, len);
    case 4: return trim_elect_avx512<kBf16, N, true, false, false>(in, p, start, len);
    case 5: return trim_elect_avx512<kBf16, N, true, false, true>(in, p, start, len);
    case 6: return trim_elect_avx512<kBf16, N, true, true, false>(in, p, start, len);
    default: return trim_elect_avx512<kBf16, N, true, true, true>(in, p, start, len);
  }
}

template <bool kBf16>
void trim_elect_avx512_n(const DeltaInputs& in, const MergeParams& p, int64_t start, int64_t len) {
  switch (in.models()) {
    case 1: return trim_elect_avx512_flags<kBf16, 1>(in, p, start, len);
    case 2: return trim_elect_avx512_flags<kBf16, 2>(in, p, start, len);
    case 3: return trim_elect_avx512_flags<kBf16, 3>(in, p, start, len);
    default: return trim_elect_avx512_flags<kBf16, 4>(in, p, start, len);
  }
}

// DARE and Model Breadcrumbs (drop, or the band between two magnitude cuts; then the election or
// a plain sum) on AVX-512, bf16 and fp32 storage: merge_chunk's operations in its order, 16 lanes
// at a time, its bits included (signed zeros, NaN): a dropped term is (δ · c) · 0, as its flag
// product makes it. kElect: the election and disjoint mean (elect16), else Σ uᵢ (over Σ wᵢ when
// normalising).
template <int N, bool kElect, bool kCount, bool kNormalize>
VFUSE_AVX512 VFUSE_INLINE __m512 sparse16(__m512 b, const __m512* d, const __mmask16* keep, const __m512* coef,
                                         const __m512* weight, __m512 scale, __m512 divisor) {
  const __m512 zero = _mm512_setzero_ps();
  __m512 u[N];
  for (int i = 0; i < N; ++i) {
    u[i] = _mm512_mul_ps(d[i], coef[i]);
    u[i] = _mm512_mask_mul_ps(u[i], __mmask16(~keep[i]), u[i], zero);
  }
  if (kElect) return elect16<N, kCount, kNormalize, true>(b, u, weight, scale);
  __m512 m = u[0];
  for (int i = 1; i < N; ++i) m = _mm512_add_ps(m, u[i]);
  if (kNormalize) m = _mm512_div_ps(m, divisor);
  return _mm512_add_ps(b, _mm512_mul_ps(scale, m));
}

// One magnitude cut of the band, as load_deltas applies it: key > K, or key == K past the cutoff.
// Keys below 0 hold every element, keys above 2^31 − 1 none.
struct Cut {
  __m512i key, cutoff;  // int32: K (clamped), the cutoff relative to the chunk
  __mmask16 every, none;
  VFUSE_AVX512 static Cut at(int64_t k, int64_t c, int64_t start) {
    return {_mm512_set1_epi32(int32_t(std::clamp<int64_t>(k, 0, INT32_MAX))),
            _mm512_set1_epi32(int32_t(std::clamp<int64_t>(c - start, -1, kChunk))),
            k < 0 ? __mmask16(0xffff) : __mmask16(0), k > INT32_MAX ? __mmask16(0xffff) : __mmask16(0)};
  }
  // keys: 16 magnitude keys; index: their elements' indices relative to the chunk
  VFUSE_AVX512 __mmask16 holds(__m512i keys, __m512i index) const {
    const __mmask16 above = _mm512_cmpgt_epi32_mask(keys, key);
    const __mmask16 past = _mm512_mask_cmpgt_epi32_mask(_mm512_cmpeq_epi32_mask(keys, key), index, cutoff);
    return __mmask16((every | above | past) & ~none);
  }
};

template <bool kBf16, int N, bool kBand, bool kDeltas, bool kElect, bool kCount, bool kNormalize>
VFUSE_AVX512 void sparse_avx512(const DeltaInputs& in, const MergeParams& p, int64_t start, int64_t len) {
  __m512 coef[N], weight[N];
  __m512i threshold[N];
  __mmask16 every[N];
  alignas(64) uint32_t words[kBand ? 1 : N][kChunk];  // DARE: the chunk's Philox words of each model
  Cut cuts[kBand ? 2 * N : 1];  // band: each model's wider cut, then the narrower ones
  for (int i = 0; i < N; ++i) {
    coef[i] = _mm512_set1_ps(p.coefs[i]);
    weight[i] = _mm512_set1_ps(p.weights[i]);
    if constexpr (!kBand) {
      const uint64_t keep = uint64_t(in.keep_a[i]);  // kept: word < keep (every word at keep >= 2^32)
      threshold[i] = _mm512_set1_epi32(int32_t(uint32_t(std::min<uint64_t>(keep, 0xffffffffu))));
      every[i] = keep > 0xffffffffu ? __mmask16(0xffff) : __mmask16(0);
      dare_bits_chunk(in.seed, uint32_t(i), start, len, words[i]);
    }
  }
  if constexpr (kBand)
    for (int c = 0; c < 2 * N; ++c) cuts[c] = Cut::at(in.keep_a[c], in.keep_b[c], start);
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
  // the keep flags of model i's 16 deltas d at elements `index` (relative to the chunk), whose
  // Philox words are `bits`
  const auto keep_of = [&](int i, __m512 d, __m512i index, __m512i bits) VFUSE_AVX512 {
    if constexpr (kBand) {
      const __m512i keys = _mm512_and_si512(_mm512_castps_si512(d), magnitude);
      return __mmask16(cuts[i].holds(keys, index) & ~cuts[N + i].holds(keys, index));
    } else {
      return __mmask16(every[i] | _mm512_cmplt_epu32_mask(bits, threshold[i]));
    }
  };
  const __m512 scale = _mm512_set1_ps(p.scale);
  const __m512 divisor = _mm512_set1_ps(p.weight_sum == 0.f ? 1.f : p.weight_sum);
  const __m512i zeros = _mm512_setzero_si512();
  if constexpr (kBf16) {
    const __m512i even_lanes = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd_lanes = _mm512_add_epi32(even_lanes, _mm512_set1_epi32(1));
    const uint16_t* base = static_cast<const uint16_t*>(in.base) + start;
    uint16_t* out = static_cast<uint16_t*>(p.out) + start;
    for (int64_t j = 0; j < len; j += 32) {
      const int64_t rest = std::min<int64_t>(len - j, 32);
      const __mmask32 valid = rest == 32 ? ~__mmask32(0) : (__mmask32(1) << rest) - 1;
      const __m512i b = _mm512_maskz_loadu_epi16(valid, base + j);
      const __m512 b_even = bf16_even(b), b_odd = bf16_odd(b);
      const __m512i at = _mm512_set1_epi32(int32_t(j));
      const __m512i index_even = _mm512_add_epi32(at, even_lanes), index_odd = _mm512_add_epi32(at, odd_lanes);
      __m512 d_even[N], d_odd[N];
      __mmask16 keep_even[N], keep_odd[N];
      for (int i = 0; i < N; ++i) {
        const __m512i t = _mm512_maskz_loadu_epi16(valid, static_cast<const uint16_t*>(in.tuned[i]) + start + j);
        d_even[i] = kDeltas ? bf16_even(t) : _mm512_sub_ps(bf16_even(t), b_even);
        d_odd[i] = kDeltas ? bf16_odd(t) : _mm512_sub_ps(bf16_odd(t), b_odd);
        __m512i bits_even = zeros, bits_odd = zeros;
        if constexpr (!kBand) {
          const __m512i w0 = _mm512_load_si512(words[i] + j), w1 = _mm512_load_si512(words[i] + j + 16);
          bits_even = _mm512_permutex2var_epi32(w0, even_lanes, w1);
          bits_odd = _mm512_permutex2var_epi32(w0, odd_lanes, w1);
        }
        keep_even[i] = keep_of(i, d_even[i], index_even, bits_even);
        keep_odd[i] = keep_of(i, d_odd[i], index_odd, bits_odd);
      }
      const __m512 lo = sparse16<N, kElect, kCount, kNormalize>(b_even, d_even, keep_even, coef, weight, scale,
                                                                divisor);
      const __m512 hi = sparse16<N, kElect, kCount, kNormalize>(b_odd, d_odd, keep_odd, coef, weight, scale, divisor);
      _mm512_mask_storeu_epi16(out + j, valid, bf16_pack(bf16_high_halves(lo), bf16_high_halves(hi)));
    }
  } else {
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const float* base = static_cast<const float*>(in.base) + start;
    float* out = static_cast<float*>(p.out) + start;
    for (int64_t j = 0; j < len; j += 16) {
      const int64_t rest = std::min<int64_t>(len - j, 16);
      const __mmask16 valid = rest == 16 ? __mmask16(0xffff) : __mmask16((1u << rest) - 1);
      const __m512 b = _mm512_maskz_loadu_ps(valid, base + j);
      const __m512i index = _mm512_add_epi32(_mm512_set1_epi32(int32_t(j)), lanes);
      __m512 d[N];
      __mmask16 keep[N];
      for (int i = 0; i < N; ++i) {
        const __m512 t = _mm512_maskz_loadu_ps(valid, static_cast<const float*>(in.tuned[i]) + start + j);
        d[i] = kDeltas ? t : _mm512_sub_ps(t, b);
        __m512i bits = zeros;
        if constexpr (!kBand) bits = _mm512_load_si512(words[i] + j);
        keep[i] = keep_of(i, d[i], index, bits);
      }
      _mm512_mask_storeu_ps(out + j, valid,
                            sparse16<N, kElect, kCount, kNormalize>(b, d, keep, coef, weight, scale, divisor));
    }
  }
}

template <bool kBf16, int N, bool kBand>
void sparse_avx512_flags(const DeltaInputs& in, const MergeParams& p, int64_t start, int64_t len) {
  const int code = int(in.tuned_are_deltas) * 8 + int(p.elect != kNoElection) * 4 + int(p.elect == kElectCount) * 2 +
                   int(p.normalize);
  switch (code) {
    case 0: return sparse_avx512<kBf16, N, kBand, false, false, false, false>(in, p, start, len);
    case 1: return sparse_avx512<kBf16, N, kBand, false, false, false, true>(in, p, start, len);
    case 4: return sparse_avx512<kBf16, N, kBand, false, true, false, false>(in, p, start, len);
    case 5: return sparse_avx512<kBf16, N, kBand, false, true, false, true>(in, p, start, len);
    case 6: return sparse_avx512<kBf16, N, kBand, false, true, true, false>(in, p, start, len);
    case 7: return sparse_avx512<kBf16, N, kBand, false, true, true, true>(in, p, start, len);
    case 8: return sparse_avx512<kBf16, N, kBand, true, false, false, false>(in, p, start, len);
    case 9: return sparse_avx512<kBf16, N, kBand, true, false, false, true>(in, p, start, len);
    case 12: return sparse_avx512<kBf16, N, kBand, true, true, false, false>(in, p, start, len);
    case 13: return sparse_avx512<kBf16, N, kBand, true, true, false, true>(in, p, start, len);
    case 14: return sparse_avx512<kBf16, N, kBand, true, true, true, false>(in, p, start, len);
    default: return sparse_avx512<kBf16, N, kBand, true, true, true, true>(in, p, start, len);
  }
}

template <bool kBf16, bool kBand>
void sparse_avx512_n(const DeltaInputs& in, const MergeParams& p, int64_t start, int64_t len) {
  switch (in.models()) {
    case 1: return sparse_avx512_flags<kBf16, 1, kBand>(in, p, start, len);
    case 2: return sparse_avx512_flags<kBf16, 2, kBand>(in, p, start, len);
    case 3: return sparse_avx512_flags<kBf16, 3, kBand>(in, p, start, len);
    default: return sparse_avx512_flags<kBf16, 4, kBand>(in, p, start, len);
  }
}

// DARE and Model Breadcrumbs in sparse_avx512 (the caller checked dense_fusable, the sparsification
// and avx512_loops_for).
void merge_chunk_sparse_avx512(const DeltaInputs& in, int64_t start, int64_t len, const MergeParams& p) {
  const bool bf16 = p.out_dtype == kBFloat16, band = in.sparsify == kBand;
  if (bf16)
    band ? sparse_avx512_n<true, true>(in, p, start, len) : sparse_avx512_n<true, false>(in, p, start, len);
  else
    band ? sparse_avx512_n<false, true>(in, p, start, len) : sparse_avx512_n<false, false>(in, p, start, len);
}

// TIES in trim_elect_avx512 (the caller checked dense_fusable, the method and avx512_loops_for).
void merge_chunk_trim_elect_avx512(const DeltaInputs& in, int64_t start, int64_t len, const MergeParams& p) {
  if (p.out_dtype == kBFloat16)
    trim_elect_avx512_n<true>(in, p, start, len);
  else
    trim_elect_avx512_n<false>(in, p, start, len);
}
#else
void merge_chunk_trim_elect_avx512(const DeltaInputs&, int64_t, int64_t, const MergeParams&) {}
void merge_chunk_sparse_avx512(const DeltaInputs&, int64_t, int64_t, const MergeParams&) {}
#endif

// Whether the fused dense loop applies: one storage dtype everywhere and 1 to 4 models.
bool dense_fusable(const DeltaInputs& in, int out_dtype) {
  if (in.models() > 4 || in.base_dtype != out_dtype) return false;
  for (int dtype : in.tuned_dtypes)
    if (dtype != out_dtype) return false;
  return true;
}

// Task arithmetic / linear: no sparsification, no election. The fused loop where it
// applies; otherwise each tuned tensor is converted, subtracted, weighted and
// accumulated in one loop over the chunk: m = Σ (θᵢ − b) · coefᵢ.
VFUSE_MULTIVERSION
void merge_chunk_dense(const DeltaInputs& in, int64_t start, int64_t len, const MergeParams& p, float* b,
                       float* m, unsigned char* staged) {
  if (dense_fusable(in, p.out_dtype)) {
    switch (p.out_dtype) {
      case kBFloat16: dense_fused_dtype<Bf16>(in, p, start, len); return;
      case kFloat16: dense_fused_dtype<Fp16>(in, p, start, len); return;
      default: dense_fused_dtype<Fp32>(in, p, start, len); return;
    }
  }
  load_chunk(in.base, in.base_dtype, start, len, nullptr, b);
  std::fill(m, m + len, 0.f);
  for (int i = 0; i < in.models(); ++i) {
    const float coef = p.coefs[i];
    if (in.tuned_are_deltas)
      for_each_loaded(in.tuned[i], in.tuned_dtypes[i], start, len, [=](int64_t j, float v) { m[j] += v * coef; });
    else
      for_each_loaded(in.tuned[i], in.tuned_dtypes[i], start, len,
                      [=](int64_t j, float v) { m[j] += (v - b[j]) * coef; });
  }
  if (p.normalize) {
    const float divisor = p.weight_sum == 0.f ? 1.f : p.weight_sum;
    for (int64_t j = 0; j < len; ++j) m[j] = m[j] / divisor;
  }
  store_result(p, start, len, b, m, staged);
}

}  // namespace

void merge(void* out, int out_dtype, const DeltaInputs& in, const std::vector<float>& coefs,
           const std::vector<float>& weights, int elect, bool normalize, float scale, int64_t first, int64_t count) {
  const int n = in.models();
  const int64_t end = first + count, chunks = (end + kChunk - 1) / kChunk;
  // the passes address the output by flat index, as the inputs: element first lands at out
  void* flat_out = static_cast<char*>(out) - first * dtype_size(out_dtype);
  double weight_sum = 0.0;  // Σ wᵢ in fp64 like the host, rounded once
  for (float w : weights) weight_sum += double(w);
  bool aliased = flat_out == in.base;
  for (const void* t : in.tuned) aliased = aliased || flat_out == t;
  const MergeParams params{flat_out, out_dtype, !aliased, coefs.data(), weights.data(), elect, normalize, scale,
                           float(weight_sum), dense_quotient(normalize, float(weight_sum))};
  const bool dense = in.sparsify == kKeepAll && elect == kNoElection;
  const bool trim_elect = in.sparsify == kTrim && elect != kNoElection && dense_fusable(in, out_dtype);
  const bool trim_elect_avx512 = trim_elect && avx512_loops_for(out_dtype);
  const bool sparse_avx512 = (in.sparsify == kDrop || in.sparsify == kBand) && dense_fusable(in, out_dtype) &&
                             avx512_loops_for(out_dtype);
#pragma omp parallel num_threads(threads_for(count * (n + 1)))
  {
    ChunkScratch s(n);
    std::vector<float> u(size_t(n) * kChunk), m(kChunk), d(kChunk), vote(kChunk);
    std::vector<unsigned char> staged(size_t(kChunk) * 4);
#pragma omp for schedule(static)
    for (int64_t c = first / kChunk; c < chunks; ++c) {
      const int64_t start = c * kChunk, len = std::min(kChunk, end - start);
      if (dense) {
        merge_chunk_dense(in, start, len, params, s.base.data(), m.data(), staged.data());
      } else if (trim_elect_avx512) {
        merge_chunk_trim_elect_avx512(in, start, len, params);
      } else if (sparse_avx512) {
        merge_chunk_sparse_avx512(in, start, len, params);
      } else if (trim_elect) {
        merge_chunk_trim_elect(in, start, len, params);
      } else {
        load_deltas(in, start, len, true, s);
        merge_chunk(s, n, start, len, params, u.data(), m.data(), d.data(), vote.data(), staged.data());
      }
    }
    stream_fence();
  }
}

namespace {

constexpr int kSumLanes = 8;  // sparse_l1's fp64 accumulators per sum: element j adds into lane j % 8

#if VFUSE_AVX512_LOOPS
// chunk_l1's lane sums over the chunk's first 16·⌊len/16⌋ elements, as its portable loop adds them
// (the same operations in the same order); returns how many elements it took.
VFUSE_AVX512 int64_t chunk_l1_avx512(const float* delta, const float* keep, int64_t len, double* all_lanes,
                                     double* kept_lanes) {
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
  __m512d all = _mm512_load_pd(all_lanes), kept = _mm512_load_pd(kept_lanes);
  int64_t j = 0;
  for (; j + 16 <= len; j += 16) {
    const __m512 a = _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(delta + j), magnitude));
    const __m512d low = _mm512_cvtps_pd(_mm512_castps512_ps256(a));
    const __m512d high = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    all = _mm512_add_pd(_mm512_add_pd(all, low), high);
    if (keep == nullptr) {
      kept = _mm512_add_pd(_mm512_add_pd(kept, low), high);
    } else {
      const __m512 k = _mm512_loadu_ps(keep + j);
      const __m512d k_low = _mm512_cvtps_pd(_mm512_castps512_ps256(k));
      const __m512d k_high = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(k), 1)));
      kept = _mm512_add_pd(_mm512_add_pd(kept, _mm512_mul_pd(low, k_low)), _mm512_mul_pd(high, k_high));
    }
  }
  _mm512_store_pd(all_lanes, all);
  _mm512_store_pd(kept_lanes, kept);
  return j;
}
#endif

// Σ|δ| and Σ keep·|δ| of one chunk of one model: lane-wise fp64 sums, the lanes then added in
// order (the same totals on every machine; independent chains, so the loop vectorises).
VFUSE_MULTIVERSION
void chunk_l1(const float* delta, const float* keep, int64_t len, double* all_out, double* kept_out) {
  alignas(64) double all[kSumLanes] = {}, kept[kSumLanes] = {};
  int64_t j = 0;
#if VFUSE_AVX512_LOOPS
  if (avx512_loops()) j = chunk_l1_avx512(delta, keep, len, all, kept);
#endif
  for (; j + kSumLanes <= len; j += kSumLanes)
    for (int l = 0; l < kSumLanes; ++l) {
      const double a = std::fabs(double(delta[j + l]));
      all[l] += a;
      kept[l] += keep == nullptr ? a : a * keep[j + l];
    }
  for (int l = 0; j < len; ++j, ++l) {
    const double a = std::fabs(double(delta[j]));
    all[l] += a;
    kept[l] += keep == nullptr ? a : a * keep[j];
  }
  double all_sum = 0.0, kept_sum = 0.0;
  for (int l = 0; l < kSumLanes; ++l) {
    all_sum += all[l];
    kept_sum += kept[l];
  }
  *all_out = all_sum;
  *kept_out = kept_sum;
}

}  // namespace

// Σ|δᵢ| and Σ keepᵢ·|δᵢ| per model (fp64, summed in a fixed order, chunk by chunk: independent of
// the thread count). Returns [models][2].
std::vector<double> sparse_l1(const DeltaInputs& in) {
  const int n = in.models();
  const int64_t chunks = (in.numel + kChunk - 1) / kChunk;
  std::vector<double> partial(size_t(chunks) * n * 2, 0.0);
#pragma omp parallel num_threads(threads_for(in.numel * (n + 1)))
  {
    ChunkScratch s(n);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t start = c * kChunk, len = std::min(kChunk, in.numel - start);
      load_deltas(in, start, len, true, s);
      for (int i = 0; i < n; ++i)
        chunk_l1(s.delta_of(i), s.keep_all ? nullptr : s.keep_of(i), len, &partial[(size_t(c) * n + i) * 2],
                 &partial[(size_t(c) * n + i) * 2 + 1]);
    }
  }
  std::vector<double> total(size_t(n) * 2, 0.0);
  for (int64_t c = 0; c < chunks; ++c)
    for (int k = 0; k < n * 2; ++k) total[k] += partial[size_t(c) * n * 2 + k];
  return total;
}

}  // namespace vfuse
