// Loops written with AVX-512 intrinsics (F and BW), each next to the portable loop whose results it
// gives bit for bit: the bracket pass's counting (magnitude_select.cpp), the TIES merge
// (delta_merge.cpp) and DARE's Philox words (random_bits.cpp). The compiler's own AVX-512 code
// for those loops widens every compare mask to a vector; these keep the flags in mask registers
// and decode bf16 as even/odd lanes (a shift and an and, no shuffles). Taken where the CPU has
// AVX-512 F and BW and the environment variable VFUSE_NO_AVX512 is unset (the tests run both loops).
#pragma once
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <cstdint>
#include <cstdlib>

#define VFUSE_AVX512_LOOPS 1
#define VFUSE_AVX512 __attribute__((target("avx512f,avx512bw")))

namespace vfuse {

inline bool avx512_loops() {
  static const bool on =
      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && !std::getenv("VFUSE_NO_AVX512");
  return on;
}

// 32 bf16 values loaded as 16 32-bit lanes: lane t holds elements 2t (low half) and 2t + 1 (high half).
VFUSE_AVX512 inline __m512 bf16_even(__m512i pairs) { return _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)); }
VFUSE_AVX512 inline __m512 bf16_odd(__m512i pairs) {
  return _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(int32_t(0xffff0000u))));
}

// float_to_bf16 of 16 lanes (round to nearest even, NaN kept quiet), left in each lane's high half.
VFUSE_AVX512 inline __m512i bf16_high_halves(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  const __mmask16 nan =
      _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  return _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
}

// The 32 bf16 values of bf16_high_halves(even elements) and (odd elements), interleaved back.
VFUSE_AVX512 inline __m512i bf16_pack(__m512i even, __m512i odd) {
  return _mm512_or_si512(_mm512_srli_epi32(even, 16), _mm512_and_si512(odd, _mm512_set1_epi32(int32_t(0xffff0000u))));
}

}  // namespace vfuse
#else
namespace vfuse {
inline bool avx512_loops() { return false; }
}  // namespace vfuse
#endif
