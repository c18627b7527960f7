// The two passes of a spherical interpolation over whole tensors (vfuse_kernels/merging/
// methods/slerp.py): the sums Σa², Σb², Σab, then out = ca·a + cb·b. Both tensors share one
// storage dtype; the sums in fp64, the combination in fp32.
#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "common.h"
#include "parallel.h"

namespace vfuse {
namespace {

constexpr int64_t kBlock = 4096;  // elements per work item

template <typename C>
std::array<double, 3> sums(const void* a_ptr, const void* b_ptr, int64_t numel) {
  using T = typename C::T;
  const T* a = static_cast<const T*>(a_ptr);
  const T* b = static_cast<const T*>(b_ptr);
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
  double aa = 0, bb = 0, ab = 0;
#pragma omp parallel for schedule(static) reduction(+ : aa, bb, ab) num_threads(threads_for(numel))
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t start = block * kBlock, end = std::min(numel, start + kBlock);
    double saa = 0, sbb = 0, sab = 0;
#pragma omp simd reduction(+ : saa, sbb, sab)
    for (int64_t j = start; j < end; ++j) {
      const double x = C::load(a[j]), y = C::load(b[j]);
      saa += x * x;
      sbb += y * y;
      sab += x * y;
    }
    aa += saa;
    bb += sbb;
    ab += sab;
  }
  return {aa, bb, ab};
}

template <typename C, typename O>
void combine(void* out_ptr, const void* a_ptr, const void* b_ptr, int64_t numel, float ca, float cb) {
  const typename C::T* a = static_cast<const typename C::T*>(a_ptr);
  const typename C::T* b = static_cast<const typename C::T*>(b_ptr);
  typename O::T* out = static_cast<typename O::T*>(out_ptr);
#pragma omp parallel for schedule(static) num_threads(threads_for(numel))
  for (int64_t j = 0; j < numel; ++j) out[j] = O::store(ca * C::load(a[j]) + cb * C::load(b[j]));
}

}  // namespace

VFUSE_MULTIVERSION
std::array<double, 3> pair_sums(const void* a, const void* b, int dtype, int64_t numel) {
  return with_codec(dtype, [&](auto c) { return sums<decltype(c)>(a, b, numel); });
}

VFUSE_MULTIVERSION
void pair_combine(void* out, int out_dtype, const void* a, const void* b, int dtype, int64_t numel, float ca,
                  float cb) {
  with_codecs(dtype, out_dtype, [&](auto c, auto o) { combine<decltype(c), decltype(o)>(out, a, b, numel, ca, cb); });
}

}  // namespace vfuse
