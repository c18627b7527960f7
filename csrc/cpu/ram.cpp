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

// Adds, per model, the item's elements it contributes to that are shared (counts[i]) and
// unique (counts[N + i]).
template <typename C, int N>
VFUSE_INLINE void counts_chunk(const void* base_ptr, const void* const* tuned_ptrs, int64_t start, int64_t len,
                               float eps, int64_t* counts) {
  using T = typename C::T;
  const T* base = static_cast<const T*>(base_ptr) + start;
  const T* tuned[N];
  for (int i = 0; i < N; ++i) tuned[i] = static_cast<const T*>(tuned_ptrs[i]) + start;
  int64_t shared[N] = {}, unique[N] = {};
  for (int64_t j = 0; j < len; ++j) {
    const float b = C::load(base[j]);
    int32_t in[N], c = 0;
    for (int i = 0; i < N; ++i) {
      in[i] = std::fabs(C::load(tuned[i][j]) - b) > eps;
      c += in[i];
    }
    for (int i = 0; i < N; ++i) {
      shared[i] += in[i] & (c > 1);
      unique[i] += in[i] & (c == 1);
    }
  }
  for (int i = 0; i < N; ++i) {
    counts[i] += shared[i];
    counts[N + i] += unique[i];
  }
}

template <typename C, typename O, int N>
VFUSE_INLINE void merge_chunk(void* out_ptr, const void* base_ptr, const void* const* tuned_ptrs, int64_t start,
                              int64_t len, float eps, const float* unique_scale) {
  using T = typename C::T;
  typename O::T* out = static_cast<typename O::T*>(out_ptr) + start;
  const T* base = static_cast<const T*>(base_ptr) + start;
  const T* tuned[N];
  float scale[N];
  for (int i = 0; i < N; ++i) {
    tuned[i] = static_cast<const T*>(tuned_ptrs[i]) + start;
    scale[i] = unique_scale[i];
  }
  for (int64_t j = 0; j < len; ++j) {
    const float b = C::load(base[j]);
    float tau[N];
    int32_t c = 0;
    for (int i = 0; i < N; ++i) {
      tau[i] = C::load(tuned[i][j]) - b;
      const bool in = std::fabs(tau[i]) > eps;
      tau[i] = in ? tau[i] : 0.f;
      c += in;
    }
    const float count = float(c > 1 ? c : 1);
    float merged = 0.f;
    for (int i = 0; i < N; ++i) merged = merged + (c == 1 ? tau[i] * scale[i] : tau[i] / count);
    out[j] = O::store(b + merged);
  }
}

VFUSE_MULTIVERSION
void counts_item(const void* base, const void* const* tuned, size_t n, int dtype, int64_t start, int64_t len,
                 float eps, int64_t* counts) {
  with_codec(dtype, [&](auto c) VFUSE_INLINE_LAMBDA {
    with_models(n, [&](auto models) VFUSE_INLINE_LAMBDA {
      counts_chunk<decltype(c), models>(base, tuned, start, len, eps, counts);
    });
  });
}

VFUSE_MULTIVERSION
void merge_item(void* out, int out_dtype, const void* base, const void* const* tuned, size_t n, int dtype,
                int64_t start, int64_t len, float eps, const float* unique_scale) {
  with_codecs(dtype, out_dtype, [&](auto c, auto o) VFUSE_INLINE_LAMBDA {
    with_models(n, [&](auto models) VFUSE_INLINE_LAMBDA {
      merge_chunk<decltype(c), decltype(o), models>(out, base, tuned, start, len, eps, unique_scale);
    });
  });
}

}  // namespace

// [shared₀ … shared_{N−1}, unique₀ … unique_{N−1}]: the elements each model contributes to.
std::vector<int64_t> ram_counts(const void* base, const std::vector<const void*>& tuned, int dtype, int64_t numel,
                                float eps) {
  const size_t n = tuned.size();
  return count_items(numel, threads_for(numel), int(2 * n), [&](int64_t start, int64_t len, int64_t* counts) {
    counts_item(base, tuned.data(), n, dtype, start, len, eps, counts);
  });
}

void ram_merge(void* out, int out_dtype, const void* base, const std::vector<const void*>& tuned, int dtype,
               int64_t numel, float eps, const std::vector<float>& unique_scale) {
  for_each_item(numel, threads_for(numel), [&](int64_t start, int64_t len) {
    merge_item(out, out_dtype, base, tuned.data(), tuned.size(), dtype, start, len, eps, unique_scale.data());
  });
}

}  // namespace vfuse
