// The two passes of a spherical interpolation over whole tensors (vfuse_kernels/merging/
// methods/slerp.py): the sums Σa², Σb², Σab, then out = ca·a + cb·b. Both tensors share one
// storage dtype; the sums in fp64 (in a fixed order: lane_sum, sum_items), the combination in fp32.
// Between them, ca and cb from the sums (slerp_coefficients): the CPU's one definition of them.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"
#include "parallel.h"

namespace vfuse {
namespace {

template <typename C>
VFUSE_INLINE void sums_chunk(const void* a_ptr, const void* b_ptr, int64_t start, int64_t len, double* sums) {
  const typename C::T* a = static_cast<const typename C::T*>(a_ptr) + start;
  const typename C::T* b = static_cast<const typename C::T*>(b_ptr) + start;
  double x[kItem], y[kItem];
  for (int64_t j = 0; j < len; ++j) {
    x[j] = C::load(a[j]);
    y[j] = C::load(b[j]);
  }
  sums[0] = lane_sum(len, [&](int64_t j) VFUSE_INLINE_LAMBDA { return x[j] * x[j]; });
  sums[1] = lane_sum(len, [&](int64_t j) VFUSE_INLINE_LAMBDA { return y[j] * y[j]; });
  sums[2] = lane_sum(len, [&](int64_t j) VFUSE_INLINE_LAMBDA { return x[j] * y[j]; });
}

template <typename C, typename O>
VFUSE_INLINE void combine_chunk(void* out_ptr, const void* a_ptr, const void* b_ptr, int64_t start, int64_t len,
                                float ca, float cb) {
  const typename C::T* a = static_cast<const typename C::T*>(a_ptr) + start;
  const typename C::T* b = static_cast<const typename C::T*>(b_ptr) + start;
  typename O::T* out = static_cast<typename O::T*>(out_ptr) + start;
  for (int64_t j = 0; j < len; ++j) out[j] = O::store(ca * C::load(a[j]) + cb * C::load(b[j]));
}

VFUSE_MULTIVERSION
void sums_item(const void* a, const void* b, int dtype, int64_t start, int64_t len, double* sums) {
  with_codec(dtype, [&](auto c) VFUSE_INLINE_LAMBDA { sums_chunk<decltype(c)>(a, b, start, len, sums); });
}

VFUSE_MULTIVERSION
void combine_item(void* out, int out_dtype, const void* a, const void* b, int dtype, int64_t start, int64_t len,
                  float ca, float cb) {
  with_codecs(dtype, out_dtype, [&](auto c, auto o) VFUSE_INLINE_LAMBDA {
    combine_chunk<decltype(c), decltype(o)>(out, a, b, start, len, ca, cb);
  });
}

}  // namespace

std::array<double, 3> pair_sums(const void* a, const void* b, int dtype, int64_t numel) {
  const std::vector<double> s = sum_items(numel, threads_for(numel), 3, [&](int64_t start, int64_t len, double* sums) {
    sums_item(a, b, dtype, start, len, sums);
  });
  return {s[0], s[1], s[2]};
}

std::array<float, 2> slerp_coefficients(const std::array<double, 3>& sums, float t) {
  // norms in fp64, a norm <= 1e-8 (or NaN) read as 1; cos θ rounded to fp32 (NaN kept); the rest in fp32
  // with libm's acosf and sinf; the linear blend where |cos θ| > 0.9995 (reference/slerp.py)
  double na = std::sqrt(sums[0]), nb = std::sqrt(sums[1]);
  na = na > 1e-8 ? na : 1.0;
  nb = nb > 1e-8 ? nb : 1.0;
  double c = sums[2] / (na * nb);
  if (c < -1.0) c = -1.0;
  if (c > 1.0) c = 1.0;
  const float cos_theta = static_cast<float>(c);
  if (std::fabs(cos_theta) > 0.9995f) return {1.0f - t, t};
  const float theta = std::acos(cos_theta), sin_theta = std::sin(theta);
  return {std::sin((1.0f - t) * theta) / sin_theta, std::sin(t * theta) / sin_theta};
}

void pair_combine(void* out, int out_dtype, const void* a, const void* b, int dtype, int64_t numel, float ca,
                  float cb) {
  for_each_item(numel, threads_for(numel), [&](int64_t start, int64_t len) {
    combine_item(out, out_dtype, a, b, dtype, start, len, ca, cb);
  });
}

}  // namespace vfuse
