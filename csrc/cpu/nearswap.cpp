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
VFUSE_INLINE void nearswap_chunk(void* out_ptr, const void* a_ptr, const void* b_ptr, int64_t start, int64_t len,
                                 float t) {
  const typename C::T* a = static_cast<const typename C::T*>(a_ptr) + start;
  const typename C::T* b = static_cast<const typename C::T*>(b_ptr) + start;
  typename O::T* out = static_cast<typename O::T*>(out_ptr) + start;
  for (int64_t j = 0; j < len; ++j) {
    const float x = C::load(a[j]), y = C::load(b[j]);
    float distance = std::fabs(x - y);
    distance = distance < 1e-6f ? 1e-6f : distance;  // clamp(min=1e-6); NaN stays NaN
    float w = (1.f / distance) * t;  // torch's scalar / tensor: the reciprocal times the scalar
    w = w < 0.f ? 0.f : w;
    w = w > 1.f ? 1.f : w;
    out[j] = O::store(w * y + (1.f - w) * x);
  }
}

VFUSE_MULTIVERSION
void nearswap_item(void* out, int out_dtype, const void* a, const void* b, int dtype, int64_t start, int64_t len,
                   float t) {
  with_codecs(dtype, out_dtype, [&](auto c, auto o) VFUSE_INLINE_LAMBDA {
    nearswap_chunk<decltype(c), decltype(o)>(out, a, b, start, len, t);
  });
}

}  // namespace

void nearswap(void* out, int out_dtype, const void* a, const void* b, int dtype, int64_t numel, float t) {
  for_each_item(numel, threads_for(numel), [&](int64_t start, int64_t len) {
    nearswap_item(out, out_dtype, a, b, dtype, start, len, t);
  });
}

}  // namespace vfuse
