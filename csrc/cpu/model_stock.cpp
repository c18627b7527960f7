// Whole-tensor passes over 2–4 tensors of one storage dtype: the Gram matrix of the offsets
// oᵢ = wᵢ − w₀ from a base w₀, or of the tensors themselves without one (fp64 sums) — Model Stock,
// nuslerp, multislerp and karcher reduce to it (vfuse_kernels/ops/) — then Model Stock's blend
// out = t·((w₁ + … + w_N) / N) + (1 − t)·w₀ in fp32 in mergekit's order, or a linear combination
// out = Σ kᵢwᵢ in fp32, each stored in the output's dtype.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"
#include "parallel.h"

namespace vfuse {
namespace {

constexpr int64_t kItem = 4096;

template <typename C, int N, bool kBase>
std::vector<double> gram(const void* base_ptr, const std::vector<const void*>& tuned_ptrs, int64_t numel) {
  using T = typename C::T;
  const T* base = static_cast<const T*>(base_ptr);
  const T* tuned[N];
  for (int i = 0; i < N; ++i) tuned[i] = static_cast<const T*>(tuned_ptrs[i]);
  constexpr int kPairs = N * (N + 1) / 2;
  const int64_t items = (numel + kItem - 1) / kItem;
  std::vector<double> total(kPairs, 0.0);
#pragma omp parallel num_threads(threads_for(numel))
  {
    double local[kPairs] = {};
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t start = item * kItem, end = std::min(numel, start + kItem);
      for (int64_t e = start; e < end; ++e) {
        const float b = kBase ? C::load(base[e]) : 0.f;
        double o[N];
        for (int i = 0; i < N; ++i) o[i] = double(C::load(tuned[i][e]) - b);
        int p = 0;
        for (int i = 0; i < N; ++i)
          for (int j = i; j < N; ++j) local[p++] += o[i] * o[j];
      }
    }
#pragma omp critical
    for (int p = 0; p < kPairs; ++p) total[p] += local[p];
  }
  return total;
}

template <typename C, typename O, int N>
void blend(void* out_ptr, const void* base_ptr, const std::vector<const void*>& tuned_ptrs, int64_t numel, float t) {
  using T = typename C::T;
  typename O::T* out = static_cast<typename O::T*>(out_ptr);
  const T* base = static_cast<const T*>(base_ptr);
  const T* tuned[N];
  for (int i = 0; i < N; ++i) tuned[i] = static_cast<const T*>(tuned_ptrs[i]);
  const float keep = 1.f - t;
#pragma omp parallel for schedule(static) num_threads(threads_for(numel))
  for (int64_t e = 0; e < numel; ++e) {
    float sum = C::load(tuned[0][e]);
    for (int i = 1; i < N; ++i) sum = sum + C::load(tuned[i][e]);
    out[e] = O::store(t * (sum / float(N)) + keep * C::load(base[e]));
  }
}

template <typename C, bool kBase>
std::vector<double> gram_n(const void* base, const std::vector<const void*>& tuned, int64_t numel) {
  switch (tuned.size()) {
    case 2: return gram<C, 2, kBase>(base, tuned, numel);
    case 3: return gram<C, 3, kBase>(base, tuned, numel);
    default: return gram<C, 4, kBase>(base, tuned, numel);
  }
}

template <typename C>
std::vector<double> gram_of(const void* base, const std::vector<const void*>& tuned, int64_t numel) {
  return base ? gram_n<C, true>(base, tuned, numel) : gram_n<C, false>(base, tuned, numel);
}

template <typename C, typename O, int N>
void combination(void* out_ptr, const std::vector<const void*>& ptrs, const float* k, int64_t numel) {
  using T = typename C::T;
  typename O::T* out = static_cast<typename O::T*>(out_ptr);
  const T* x[N];
  float coef[N];
  for (int i = 0; i < N; ++i) {
    x[i] = static_cast<const T*>(ptrs[i]);
    coef[i] = k[i];
  }
#pragma omp parallel for schedule(static) num_threads(threads_for(numel))
  for (int64_t e = 0; e < numel; ++e) {
    float sum = coef[0] * C::load(x[0][e]);
    for (int i = 1; i < N; ++i) sum = sum + coef[i] * C::load(x[i][e]);
    out[e] = O::store(sum);
  }
}

template <typename C, typename O>
void combination_n(void* out, const std::vector<const void*>& ptrs, const float* k, int64_t numel) {
  switch (ptrs.size()) {
    case 2: return combination<C, O, 2>(out, ptrs, k, numel);
    case 3: return combination<C, O, 3>(out, ptrs, k, numel);
    default: return combination<C, O, 4>(out, ptrs, k, numel);
  }
}

template <typename C, typename O>
void blend_n(void* out, const void* base, const std::vector<const void*>& tuned, int64_t numel, float t) {
  switch (tuned.size()) {
    case 2: return blend<C, O, 2>(out, base, tuned, numel, t);
    case 3: return blend<C, O, 3>(out, base, tuned, numel, t);
    default: return blend<C, O, 4>(out, base, tuned, numel, t);
  }
}

}  // namespace

// Σₑ oᵢ[e]·oⱼ[e] for i ≤ j (row-major upper triangle), 2 to 4 tuned tensors of one dtype;
// oᵢ = tunedᵢ − base, or tunedᵢ where base is null.
VFUSE_MULTIVERSION
std::vector<double> offset_gram(const void* base, const std::vector<const void*>& tuned, int dtype, int64_t numel) {
  return with_codec(dtype, [&](auto c) { return gram_of<decltype(c)>(base, tuned, numel); });
}

// out = Σ kᵢ·xᵢ in fp32 (left to right), 2 to 4 tensors of one dtype; out fp32 or a storage dtype.
VFUSE_MULTIVERSION
void linear_combination(void* out, int out_dtype, const std::vector<const void*>& tensors, const std::vector<float>& k,
                        int dtype, int64_t numel) {
  with_codecs(dtype, out_dtype, [&](auto c, auto o) {
    combination_n<decltype(c), decltype(o)>(out, tensors, k.data(), numel);
  });
}

VFUSE_MULTIVERSION
void stock_blend(void* out, int out_dtype, const void* base, const std::vector<const void*>& tuned, int dtype,
                 int64_t numel, float t) {
  with_codecs(dtype, out_dtype, [&](auto c, auto o) { blend_n<decltype(c), decltype(o)>(out, base, tuned, numel, t); });
}

}  // namespace vfuse
