// nearswap (vfuse_kernels/ops/nearswap.py) in one pass: per element w = clamp(t / max(|a − b|,
// 1e-6), 0, 1), out = w·b + (1 − w)·a, in fp32 with the torch path's operations in its order
// (the same bits), a and b of one storage dtype, out fp32 or a storage dtype.
#include <cmath>
#include <cstdint>

#include "common.h"
#include "parallel.h"

namespace vfuse {
namespace {

template <typename C, typename O>
void nearswap_pass(void* out_ptr, const void* a_ptr, const void* b_ptr, int64_t numel, float t) {
  const typename C::T* a = static_cast<const typename C::T*>(a_ptr);
  const typename C::T* b = static_cast<const typename C::T*>(b_ptr);
  typename O::T* out = static_cast<typename O::T*>(out_ptr);
#pragma omp parallel for schedule(static) num_threads(threads_for(numel))
  for (int64_t e = 0; e < numel; ++e) {
    const float x = C::load(a[e]), y = C::load(b[e]);
    float distance = std::fabs(x - y);
    distance = distance < 1e-6f ? 1e-6f : distance;  // clamp(min=1e-6); NaN stays NaN
    float w = (1.f / distance) * t;  // torch's scalar / tensor: the reciprocal times the scalar
    w = w < 0.f ? 0.f : w;
    w = w > 1.f ? 1.f : w;
    out[e] = O::store(w * y + (1.f - w) * x);
  }
}

}  // namespace

VFUSE_MULTIVERSION
void nearswap(void* out, int out_dtype, const void* a, const void* b, int dtype, int64_t numel, float t) {
  with_codecs(dtype, out_dtype, [&](auto c, auto o) {
    nearswap_pass<decltype(c), decltype(o)>(out, a, b, numel, t);
  });
}

}  // namespace vfuse
