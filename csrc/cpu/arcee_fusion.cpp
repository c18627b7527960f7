// Arcee Fusion's element passes (vfuse_kernels/merging/methods/arcee_fusion.py), each one pass
// in fp32 with the torch path's operations in its order (the same bits). kl holds one value per
// row of `cols` elements.
//   arcee_scores: score = |θ − b|·kl[row] at the sampled elements e_j = min(⌊bits_j / 2³² · numel⌋,
//                 numel − 1) (the fp64 arithmetic of the torch path; bits_j: DARE's Philox stream
//                 for (seed, model 0)), or at every element when count = numel;
//   arcee_apply:  out = b + (θ − b)·[|θ − b|·kl[row] ≥ threshold] (the mask as 1.0 / 0.0).
#include <cmath>
#include <cstdint>

#include "common.h"
#include "parallel.h"

namespace vfuse {
namespace {

constexpr int64_t kPrefetchAhead = 16;  // sampled elements: every load misses, so fetch this many ahead

VFUSE_INLINE int64_t sampled_element(uint32_t bits, int64_t numel) {
  const int64_t e = int64_t(std::floor(double(bits) / 4294967296.0 * double(numel)));
  return e < numel - 1 ? e : numel - 1;
}

// e / cols without a 64-bit division: the fp64 quotient, corrected by one either way (exact
// for e < 2^53).
VFUSE_INLINE int64_t row_of(int64_t e, int64_t cols, double inverse_cols) {
  int64_t row = int64_t(double(e) * inverse_cols);
  if (row * cols > e) --row;
  else if ((row + 1) * cols <= e) ++row;
  return row;
}

VFUSE_MULTIVERSION
void arcee_scores_item(float* scores, const void* base, const void* tuned, int dtype, int64_t numel, const float* kl,
                       int64_t cols, uint64_t seed, bool sampled, int64_t start, int64_t len) {
  with_codec(dtype, [&](auto c) VFUSE_INLINE_LAMBDA {
    using C = decltype(c);
    const typename C::T* b = static_cast<const typename C::T*>(base);
    const typename C::T* t = static_cast<const typename C::T*>(tuned);
    if (!sampled) {  // every element, row by row
      for (int64_t e = start, row = start / cols; e < start + len; ++row) {
        const int64_t end = (row + 1) * cols < start + len ? (row + 1) * cols : start + len;
        for (; e < end; ++e) scores[e] = std::fabs(C::load(t[e]) - C::load(b[e])) * kl[row];
      }
      return;
    }
    uint32_t bits[kItem];
    int64_t element[kItem];
    dare_bits_chunk(seed, 0, start, len, bits);
    for (int64_t j = 0; j < len; ++j) element[j] = sampled_element(bits[j], numel);
    const double inverse_cols = 1.0 / double(cols);
    for (int64_t j = 0; j < len; ++j) {
      if (j + kPrefetchAhead < len) {
        __builtin_prefetch(b + element[j + kPrefetchAhead]);
        __builtin_prefetch(t + element[j + kPrefetchAhead]);
      }
      const int64_t e = element[j];
      scores[start + j] = std::fabs(C::load(t[e]) - C::load(b[e])) * kl[row_of(e, cols, inverse_cols)];
    }
  });
}

VFUSE_MULTIVERSION
void arcee_apply_item(void* out, int out_dtype, const void* base, const void* tuned, int dtype, const float* kl,
                      int64_t cols, float threshold, int64_t start, int64_t len) {
  with_codecs(dtype, out_dtype, [&](auto c, auto o) VFUSE_INLINE_LAMBDA {
    using C = decltype(c);
    using O = decltype(o);
    const typename C::T* b = static_cast<const typename C::T*>(base);
    const typename C::T* t = static_cast<const typename C::T*>(tuned);
    typename O::T* r = static_cast<typename O::T*>(out);
    int64_t row = start / cols, row_end = (row + 1) * cols;
    for (int64_t e = start; e < start + len;) {
      const int64_t end = row_end < start + len ? row_end : start + len;
      const float k = kl[row];
      for (; e < end; ++e) {
        const float x = C::load(b[e]);
        const float delta = C::load(t[e]) - x;
        const float keep = std::fabs(delta) * k >= threshold ? 1.f : 0.f;
        r[e] = O::store(x + delta * keep);
      }
      ++row;
      row_end += cols;
    }
  });
}

}  // namespace

void arcee_scores(float* scores, const void* base, const void* tuned, int dtype, int64_t numel, const float* kl,
                  int64_t cols, uint64_t seed, int64_t count) {
  const bool sampled = count != numel;
  for_each_item(count, threads_for(count), [&](int64_t start, int64_t len) {
    arcee_scores_item(scores, base, tuned, dtype, numel, kl, cols, seed, sampled, start, len);
  });
}

void arcee_apply(void* out, int out_dtype, const void* base, const void* tuned, int dtype, int64_t numel,
                 const float* kl, int64_t cols, float threshold) {
  for_each_item(numel, threads_for(numel), [&](int64_t start, int64_t len) {
    arcee_apply_item(out, out_dtype, base, tuned, dtype, kl, cols, threshold, start, len);
  });
}

}  // namespace vfuse
