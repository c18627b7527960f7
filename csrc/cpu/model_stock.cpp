// The two passes of Model Stock over whole tensors (vfuse_kernels/merging/methods/model_stock.py):
// the Gram matrix of the offsets oᵢ = wᵢ − w₀ (fp64 sums), then
// out = t·((w₁ + … + w_N) / N) + (1 − t)·w₀ in fp32, the operations in mergekit's order.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"
#include "parallel.h"

namespace vfuse {
namespace {

constexpr int64_t kItem = 4096;

template <typename C, int N>
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
        const float b = C::load(base[e]);
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

template <typename C, int N>
void blend(float* out, const void* base_ptr, const std::vector<const void*>& tuned_ptrs, int64_t numel, float t) {
  using T = typename C::T;
  const T* base = static_cast<const T*>(base_ptr);
  const T* tuned[N];
  for (int i = 0; i < N; ++i) tuned[i] = static_cast<const T*>(tuned_ptrs[i]);
  const float keep = 1.f - t;
#pragma omp parallel for schedule(static) num_threads(threads_for(numel))
  for (int64_t e = 0; e < numel; ++e) {
    float sum = C::load(tuned[0][e]);
    for (int i = 1; i < N; ++i) sum = sum + C::load(tuned[i][e]);
    out[e] = t * (sum / float(N)) + keep * C::load(base[e]);
  }
}

template <typename C>
std::vector<double> gram_n(const void* base, const std::vector<const void*>& tuned, int64_t numel) {
  switch (tuned.size()) {
    case 2: return gram<C, 2>(base, tuned, numel);
    case 3: return gram<C, 3>(base, tuned, numel);
    default: return gram<C, 4>(base, tuned, numel);
  }
}

template <typename C>
void blend_n(float* out, const void* base, const std::vector<const void*>& tuned, int64_t numel, float t) {
  switch (tuned.size()) {
    case 2: return blend<C, 2>(out, base, tuned, numel, t);
    case 3: return blend<C, 3>(out, base, tuned, numel, t);
    default: return blend<C, 4>(out, base, tuned, numel, t);
  }
}

}  // namespace

// Σₑ oᵢ[e]·oⱼ[e] for i ≤ j (row-major upper triangle), 2 to 4 tuned tensors of one dtype.
VFUSE_MULTIVERSION
std::vector<double> offset_gram(const void* base, const std::vector<const void*>& tuned, int dtype, int64_t numel) {
  switch (dtype) {
    case kBFloat16: return gram_n<Bf16>(base, tuned, numel);
    case kFloat16: return gram_n<Fp16>(base, tuned, numel);
    default: return gram_n<Fp32>(base, tuned, numel);
  }
}

VFUSE_MULTIVERSION
void stock_blend(float* out, const void* base, const std::vector<const void*>& tuned, int dtype, int64_t numel,
                 float t) {
  switch (dtype) {
    case kBFloat16: return blend_n<Bf16>(out, base, tuned, numel, t);
    case kFloat16: return blend_n<Fp16>(out, base, tuned, numel, t);
    default: return blend_n<Fp32>(out, base, tuned, numel, t);
  }
}

}  // namespace vfuse
