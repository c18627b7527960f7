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

#if VFUSE_AVX512_LOOPS
// Eight groups per vector, each counter word in the low half of a 64-bit lane: vpmuludq
// multiplies exactly those halves, so the high halves that lo(p) and the xors leave behind never
// reach a low half. The four words are then interleaved into element order.
VFUSE_AVX512 void philox_groups_avx512(uint32_t k0, uint32_t k1, uint32_t model, uint64_t first, int64_t groups,
                                       uint32_t* out) {
  const __m512i m0 = _mm512_set1_epi64(0xD2511F53), m1 = _mm512_set1_epi64(0xCD9E8D57);
  const __m512i lanes = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i groups_0_3 = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
  const __m512i groups_4_7 = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  __m512i key0[10], key1[10];
  for (int round = 0; round < 10; ++round) {
    key0[round] = _mm512_set1_epi64(uint32_t(k0 + uint32_t(round) * 0x9E3779B9u));
    key1[round] = _mm512_set1_epi64(uint32_t(k1 + uint32_t(round) * 0xBB67AE85u));
  }
  for (int64_t g = 0; g < groups; g += 8) {
    const __m512i counter = _mm512_add_epi64(_mm512_set1_epi64(int64_t(first + uint64_t(g))), lanes);
    __m512i c0 = counter, c1 = _mm512_srli_epi64(counter, 32), c2 = _mm512_set1_epi64(model);
    __m512i c3 = _mm512_setzero_si512();
    for (int round = 0; round < 10; ++round) {
      const __m512i p0 = _mm512_mul_epu32(c0, m0), p1 = _mm512_mul_epu32(c2, m1);
      c0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1, 32), c1, key0[round], 0x96);  // a ^ b ^ c
      c2 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), c3, key1[round], 0x96);
      c1 = p1;
      c3 = p0;
    }
    const __m512i words01 = _mm512_mask_blend_epi32(0xAAAA, c0, _mm512_slli_epi64(c1, 32));
    const __m512i words23 = _mm512_mask_blend_epi32(0xAAAA, c2, _mm512_slli_epi64(c3, 32));
    _mm512_storeu_si512(out + 4 * g, _mm512_permutex2var_epi64(words01, groups_0_3, words23));
    _mm512_storeu_si512(out + 4 * g + 16, _mm512_permutex2var_epi64(words01, groups_4_7, words23));
  }
}
#endif

// out[e] = the 32 random bits of flat element e for (seed, model), e in [0, numel), as int64.
void random_bits(uint64_t seed, uint32_t model, int64_t numel, int64_t* out) {
  static_assert(kItem % 4 == 0, "every item starts a Philox group");
  for_each_item(numel, threads_for(numel),
                [&](int64_t start, int64_t len) { random_bits_item(seed, model, start, len, out); });
}

}  // namespace vfuse
