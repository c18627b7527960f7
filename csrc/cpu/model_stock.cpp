// Whole-tensor passes over 2–4 tensors of one storage dtype: the Gram matrix of the offsets
// oᵢ = wᵢ − w₀ from a base w₀, or of the tensors themselves without one (fp64 sums) — Model Stock,
// nuslerp, multislerp and karcher reduce to it (vfuse_kernels/ops/) — then Model Stock's blend
// out = t·((w₁ + … + w_N) / N) + (1 − t)·w₀ in fp32 in mergekit's order, or a linear combination
// out = Σ kᵢwᵢ in fp32, each stored in the output's dtype. The sums add in a fixed order
// (lane_sum within an item, sum_items across).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"
#include "parallel.h"

namespace vfuse {
namespace {

// Σₑ oᵢ[e]·oⱼ[e] over one item, for i ≤ j (row-major upper triangle) into sums.
template <typename C, int N, bool kBase>
VFUSE_INLINE void gram_chunk(const void* base_ptr, const void* const* tuned_ptrs, int64_t start, int64_t len,
                             double* sums) {
  using T = typename C::T;
  const T* base = static_cast<const T*>(base_ptr) + start;
  double o[N][kItem];
  for (int i = 0; i < N; ++i) {
    const T* x = static_cast<const T*>(tuned_ptrs[i]) + start;
    for (int64_t j = 0; j < len; ++j) o[i][j] = double(C::load(x[j]) - (kBase ? C::load(base[j]) : 0.f));
  }
  int p = 0;
  for (int i = 0; i < N; ++i)
    for (int k = i; k < N; ++k)
      sums[p++] = lane_sum(len, [&](int64_t j) VFUSE_INLINE_LAMBDA { return o[i][j] * o[k][j]; });
}

template <typename C, typename O, int N>
VFUSE_INLINE void blend_chunk(void* out_ptr, const void* base_ptr, const void* const* tuned_ptrs, int64_t start,
                              int64_t len, float t) {
  using T = typename C::T;
  typename O::T* out = static_cast<typename O::T*>(out_ptr) + start;
  const T* base = static_cast<const T*>(base_ptr) + start;
  const T* tuned[N];
  for (int i = 0; i < N; ++i) tuned[i] = static_cast<const T*>(tuned_ptrs[i]) + start;
  const float keep = 1.f - t;
  for (int64_t j = 0; j < len; ++j) {
    float sum = C::load(tuned[0][j]);
    for (int i = 1; i < N; ++i) sum = sum + C::load(tuned[i][j]);
    out[j] = O::store(t * (sum / float(N)) + keep * C::load(base[j]));
  }
}

template <typename C, typename O, int N>
VFUSE_INLINE void combination_chunk(void* out_ptr, const void* const* ptrs, const float* k, int64_t start,
                                    int64_t len) {
  using T = typename C::T;
  typename O::T* out = static_cast<typename O::T*>(out_ptr) + start;
  const T* x[N];
  float coef[N];
  for (int i = 0; i < N; ++i) {
    x[i] = static_cast<const T*>(ptrs[i]) + start;
    coef[i] = k[i];
  }
  for (int64_t j = 0; j < len; ++j) {
    float sum = coef[0] * C::load(x[0][j]);
    for (int i = 1; i < N; ++i) sum = sum + coef[i] * C::load(x[i][j]);
    out[j] = O::store(sum);
  }
}

VFUSE_MULTIVERSION
void gram_item(const void* base, const void* const* tuned, size_t n, int dtype, int64_t start, int64_t len,
               double* sums) {
  with_codec(dtype, [&](auto c) VFUSE_INLINE_LAMBDA {
    with_models(n, [&](auto count) VFUSE_INLINE_LAMBDA {
      if (base != nullptr)
        gram_chunk<decltype(c), count, true>(base, tuned, start, len, sums);
      else
        gram_chunk<decltype(c), count, false>(base, tuned, start, len, sums);
    });
  });
}

VFUSE_MULTIVERSION
void blend_item(void* out, int out_dtype, const void* base, const void* const* tuned, size_t n, int dtype,
                int64_t start, int64_t len, float t) {
  with_codecs(dtype, out_dtype, [&](auto c, auto o) VFUSE_INLINE_LAMBDA {
    with_models(n, [&](auto count) VFUSE_INLINE_LAMBDA {
      blend_chunk<decltype(c), decltype(o), count>(out, base, tuned, start, len, t);
    });
  });
}

VFUSE_MULTIVERSION
void combination_item(void* out, int out_dtype, const void* const* tensors, size_t n, const float* k, int dtype,
                      int64_t start, int64_t len) {
  with_codecs(dtype, out_dtype, [&](auto c, auto o) VFUSE_INLINE_LAMBDA {
    with_models(n, [&](auto count) VFUSE_INLINE_LAMBDA {
      combination_chunk<decltype(c), decltype(o), count>(out, tensors, k, start, len);
    });
  });
}

}  // namespace

// Σₑ oᵢ[e]·oⱼ[e] for i ≤ j (row-major upper triangle), 2 to 4 tuned tensors of one dtype;
// oᵢ = tunedᵢ − base, or tunedᵢ where base is null.
std::vector<double> offset_gram(const void* base, const std::vector<const void*>& tuned, int dtype, int64_t numel) {
  const size_t n = tuned.size();
  return sum_items(numel, threads_for(numel), int(n * (n + 1) / 2), [&](int64_t start, int64_t len, double* sums) {
    gram_item(base, tuned.data(), n, dtype, start, len, sums);
  });
}

// out = Σ kᵢ·xᵢ in fp32 (left to right), 2 to 4 tensors of one dtype; out fp32 or a storage dtype.
void linear_combination(void* out, int out_dtype, const std::vector<const void*>& tensors, const std::vector<float>& k,
                        int dtype, int64_t numel) {
  for_each_item(numel, threads_for(numel), [&](int64_t start, int64_t len) {
    combination_item(out, out_dtype, tensors.data(), tensors.size(), k.data(), dtype, start, len);
  });
}

void stock_blend(void* out, int out_dtype, const void* base, const std::vector<const void*>& tuned, int dtype,
                 int64_t numel, float t) {
  for_each_item(numel, threads_for(numel), [&](int64_t start, int64_t len) {
    blend_item(out, out_dtype, base, tuned.data(), tuned.size(), dtype, start, len, t);
  });
}

}  // namespace vfuse
