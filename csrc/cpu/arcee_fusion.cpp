// Arcee Fusion's element passes (vfuse_kernels/merging/methods/arcee_fusion.py), each one pass
// in fp32 with the torch path's operations in its order (the same bits). kl holds one value per
// row of `cols` elements.
//   arcee_scores: score = |θ − b|·kl[row] at the sampled elements e_j = min(⌊bits_j / 2³² · numel⌋,
//                 numel − 1) (the fp64 arithmetic of the torch path), or at every element without bits;
//   arcee_apply:  out = b + (θ − b)·[|θ − b|·kl[row] ≥ threshold] (the mask as 1.0 / 0.0).
#include <cmath>
#include <cstdint>

#include "common.h"
#include "parallel.h"

namespace vfuse {
namespace {

constexpr int64_t kPrefetchAhead = 16;  // sampled elements: every load misses, so fetch this many ahead

VFUSE_INLINE int64_t sampled_element(int64_t bits, int64_t numel) {
  const int64_t e = int64_t(std::floor(double(bits) / 4294967296.0 * double(numel)));
  return e < numel - 1 ? e : numel - 1;
}

VFUSE_MULTIVERSION
void arcee_scores_item(float* scores, const void* base, const void* tuned, int dtype, int64_t numel, const float* kl,
                       int64_t cols, const int64_t* bits, int64_t count, int64_t start, int64_t len) {
  with_codec(dtype, [&](auto c) VFUSE_INLINE_LAMBDA {
    using C = decltype(c);
    const typename C::T* b = static_cast<const typename C::T*>(base);
    const typename C::T* t = static_cast<const typename C::T*>(tuned);
    for (int64_t j = start; j < start + len; ++j) {
      int64_t e = j;
      if (bits != nullptr) {
        if (j + kPrefetchAhead < count) {
          const int64_t ahead = sampled_element(bits[j + kPrefetchAhead], numel);
          __builtin_prefetch(b + ahead);
          __builtin_prefetch(t + ahead);
        }
        e = sampled_element(bits[j], numel);
      }
      scores[j] = std::fabs(C::load(t[e]) - C::load(b[e])) * kl[e / cols];
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
                  int64_t cols, const int64_t* bits, int64_t count) {
  for_each_item(count, threads_for(count), [&](int64_t start, int64_t len) {
    arcee_scores_item(scores, base, tuned, dtype, numel, kl, cols, bits, count, start, len);
  });
}

void arcee_apply(void* out, int out_dtype, const void* base, const void* tuned, int dtype, int64_t numel,
                 const float* kl, int64_t cols, float threshold) {
  for_each_item(numel, threads_for(numel), [&](int64_t start, int64_t len) {
    arcee_apply_item(out, out_dtype, base, tuned, dtype, kl, cols, threshold, start, len);
  });
}

}  // namespace vfuse
