// Reinforced Agent Merging (vfuse_kernels/merging/methods/ram.py) in C++ passes over base and 1–4
// tuned tensors of one storage dtype: τᵢ = θᵢ − b (fp32); model i contributes where |τᵢ| > ε;
// c = number of contributors. The counts pass gives, per model, the elements it contributes to
// that are shared (c > 1) and unique (c = 1) — ramplus_tl's ρᵢ; the merge pass writes
// out = b + Σᵢ [contributes]·(c = 1 ? τᵢ·λᵢ : τᵢ / c) in fp32.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"
#include "parallel.h"

namespace vfuse {
namespace {

constexpr int64_t kItem = 4096;

template <typename C, int N>
std::vector<int64_t> counts(const void* base_ptr, const std::vector<const void*>& tuned_ptrs, int64_t numel,
                            float eps) {
  using T = typename C::T;
  const T* base = static_cast<const T*>(base_ptr);
  const T* tuned[N];
  for (int i = 0; i < N; ++i) tuned[i] = static_cast<const T*>(tuned_ptrs[i]);
  std::vector<int64_t> total(2 * N, 0);
  const int64_t items = (numel + kItem - 1) / kItem;
#pragma omp parallel num_threads(threads_for(numel))
  {
    int64_t shared[N] = {}, unique[N] = {};
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t start = item * kItem, end = std::min(numel, start + kItem);
      for (int64_t e = start; e < end; ++e) {
        const float b = C::load(base[e]);
        int32_t in[N], c = 0;
        for (int i = 0; i < N; ++i) {
          in[i] = std::fabs(C::load(tuned[i][e]) - b) > eps;
          c += in[i];
        }
        for (int i = 0; i < N; ++i) {
          shared[i] += in[i] & (c > 1);
          unique[i] += in[i] & (c == 1);
        }
      }
    }
#pragma omp critical
    for (int i = 0; i < N; ++i) {
      total[i] += shared[i];
      total[N + i] += unique[i];
    }
  }
  return total;
}

template <typename C, typename O, int N>
void merge(void* out_ptr, const void* base_ptr, const std::vector<const void*>& tuned_ptrs, int64_t numel, float eps,
           const float* unique_scale) {
  using T = typename C::T;
  typename O::T* out = static_cast<typename O::T*>(out_ptr);
  const T* base = static_cast<const T*>(base_ptr);
  const T* tuned[N];
  float scale[N];
  for (int i = 0; i < N; ++i) {
    tuned[i] = static_cast<const T*>(tuned_ptrs[i]);
    scale[i] = unique_scale[i];
  }
#pragma omp parallel for schedule(static) num_threads(threads_for(numel))
  for (int64_t e = 0; e < numel; ++e) {
    const float b = C::load(base[e]);
    float tau[N];
    int32_t c = 0;
    for (int i = 0; i < N; ++i) {
      tau[i] = C::load(tuned[i][e]) - b;
      const bool in = std::fabs(tau[i]) > eps;
      tau[i] = in ? tau[i] : 0.f;
      c += in;
    }
    const float count = float(c > 1 ? c : 1);
    float merged = 0.f;
    for (int i = 0; i < N; ++i) merged = merged + (c == 1 ? tau[i] * scale[i] : tau[i] / count);
    out[e] = O::store(b + merged);
  }
}

template <typename C>
std::vector<int64_t> counts_n(const void* base, const std::vector<const void*>& tuned, int64_t numel, float eps) {
  switch (tuned.size()) {
    case 1: return counts<C, 1>(base, tuned, numel, eps);
    case 2: return counts<C, 2>(base, tuned, numel, eps);
    case 3: return counts<C, 3>(base, tuned, numel, eps);
    default: return counts<C, 4>(base, tuned, numel, eps);
  }
}

template <typename C, typename O>
void merge_n(void* out, const void* base, const std::vector<const void*>& tuned, int64_t numel, float eps,
             const float* scale) {
  switch (tuned.size()) {
    case 1: return merge<C, O, 1>(out, base, tuned, numel, eps, scale);
    case 2: return merge<C, O, 2>(out, base, tuned, numel, eps, scale);
    case 3: return merge<C, O, 3>(out, base, tuned, numel, eps, scale);
    default: return merge<C, O, 4>(out, base, tuned, numel, eps, scale);
  }
}

}  // namespace

// [shared₀ … shared_{N−1}, unique₀ … unique_{N−1}]: the elements each model contributes to.
VFUSE_MULTIVERSION
std::vector<int64_t> ram_counts(const void* base, const std::vector<const void*>& tuned, int dtype, int64_t numel,
                                float eps) {
  return with_codec(dtype, [&](auto c) { return counts_n<decltype(c)>(base, tuned, numel, eps); });
}

VFUSE_MULTIVERSION
void ram_merge(void* out, int out_dtype, const void* base, const std::vector<const void*>& tuned, int dtype,
               int64_t numel, float eps, const std::vector<float>& unique_scale) {
  with_codecs(dtype, out_dtype, [&](auto c, auto o) {
    merge_n<decltype(c), decltype(o)>(out, base, tuned, numel, eps, unique_scale.data());
  });
}

}  // namespace vfuse
