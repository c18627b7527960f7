// Shared scalar helpers for the CPU kernels: storage-dtype conversions, chunk loads and
// stores, and the Philox 4x32-10 generator (the same function as vfuse_kernels/triton/
// philox.py and the reference vfuse_kernels/reference/philox.py).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "avx512.h"

// Hot loops are compiled for AVX-512 (x86-64-v4: F, BW, DQ, VL; GCC >= 11), for AVX2 and for
// baseline x86-64, and picked at load time (function multiversioning): portable binaries that
// still use wide SIMD. The AVX-512 clone (2-core Sapphire Rapids VM, 2 × 32M bf16): TIES merge
// pass 30–35 → 20–21 ms, whole TIES 66–79 → 41–50 ms against the AVX2 clone; an "avx512f"-only
// clone was no faster than AVX2 (benchmarks/NOTES.md).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && __GNUC__ >= 11
#define VFUSE_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define VFUSE_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define VFUSE_MULTIVERSION
#endif
// Helpers of multiversioned functions are forced inline so that each clone compiles them
// for its own target.
#if defined(__GNUC__)
#define VFUSE_INLINE inline __attribute__((always_inline))
#define VFUSE_INLINE_LAMBDA __attribute__((always_inline))
#else
#define VFUSE_INLINE inline
#define VFUSE_INLINE_LAMBDA
#endif

namespace vfuse {

// Storage dtype codes shared with vfuse_kernels/_backend.py.
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// Round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// fp16 -> fp32, exact for normals, subnormals, infinities and NaN.
// Shifting exponent+mantissa into fp32 position and multiplying by 2^112 rebiases
// the exponent (15 -> 127) and normalises fp16 subnormals in one exact multiply.
inline float fp16_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t em = h & 0x7fffu;
  uint32_t bits = float_to_bits(bits_to_float(em << 13) * 0x1p112f);
  if (em >= 0x7c00u) bits = 0x7f800000u | ((em & 0x3ffu) << 13);
  return bits_to_float(bits | sign);
}

// fp32 -> fp16, round to nearest even, overflow to infinity, subnormals rounded.
inline uint16_t float_to_fp16(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  uint32_t r;
  if (a > 0x7f800000u) {
    r = 0x7e00u;                                   // NaN
  } else if (a >= 0x477ff000u) {
    r = 0x7c00u;                                   // >= 65520 rounds to infinity
  } else if (a < 0x38800000u) {
    // below 2^-14: adding 0.5 leaves the value rounded (RNE) to a multiple of 2^-24
    r = float_to_bits(bits_to_float(a) + 0.5f) - 0x3f000000u;
  } else {
    // rebias the exponent by -112 and round the 13 dropped mantissa bits to even
    r = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
  }
  return uint16_t(r | sign);
}

inline int dtype_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// Whether the AVX-512 loops (avx512.h) take a pass over `dtype` storage: they handle bf16 and fp32.
inline bool avx512_loops_for(int dtype) { return avx512_loops() && (dtype == kBFloat16 || dtype == kFloat32); }

// Calls body(j, fp32 value of src[start + j]) for j < len, src of storage `dtype`.
template <typename Body>
VFUSE_INLINE void for_each_loaded(const void* src, int dtype, int64_t start, int64_t len, Body body) {
  const uint16_t* half = static_cast<const uint16_t*>(src) + start;
  const float* single = static_cast<const float*>(src) + start;
  switch (dtype) {
    case kBFloat16:
      for (int64_t j = 0; j < len; ++j) body(j, bf16_to_float(half[j]));
      break;
    case kFloat16:
      for (int64_t j = 0; j < len; ++j) body(j, fp16_to_float(half[j]));
      break;
    default:
      for (int64_t j = 0; j < len; ++j) body(j, single[j]);
  }
}

// dst[j] = fp32(src[start + j]) - minus[j] (minus may be null: plain conversion).
VFUSE_INLINE void load_chunk(const void* src, int dtype, int64_t start, int64_t len, const float* minus, float* dst) {
  if (minus)
    for_each_loaded(src, dtype, start, len, [=](int64_t j, float v) { dst[j] = v - minus[j]; });
  else
    for_each_loaded(src, dtype, start, len, [=](int64_t j, float v) { dst[j] = v; });
}

// dst[start + j] = round(b[j] + scale * m[j]) in storage `dtype`, for j < len.
VFUSE_INLINE void store_chunk(void* dst, int dtype, int64_t start, int64_t len, const float* b, float scale,
                        const float* m) {
  switch (dtype) {
    case kBFloat16: {
      uint16_t* d = static_cast<uint16_t*>(dst) + start;
      for (int64_t j = 0; j < len; ++j) d[j] = float_to_bf16(b[j] + scale * m[j]);
      break;
    }
    case kFloat16: {
      uint16_t* d = static_cast<uint16_t*>(dst) + start;
      for (int64_t j = 0; j < len; ++j) d[j] = float_to_fp16(b[j] + scale * m[j]);
      break;
    }
    default: {
      float* d = static_cast<float*>(dst) + start;
      for (int64_t j = 0; j < len; ++j) d[j] = b[j] + scale * m[j];
    }
  }
}

// memcpy that bypasses the caches (non-temporal stores) where dst is 16-byte aligned:
// an output written once is not read first (no read-for-ownership traffic). Callers
// issue stream_fence() before the data is read by another thread.
inline void stream_copy(void* dst, const void* src, size_t bytes) {
#if defined(__SSE2__)
  if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    size_t vec = bytes & ~size_t(15);
    auto* d = static_cast<__m128i*>(dst);
    auto* s = static_cast<const __m128i*>(src);
    for (size_t i = 0; i < vec / 16; ++i) _mm_stream_si128(d + i, _mm_loadu_si128(s + i));
    std::memcpy(static_cast<char*>(dst) + vec, static_cast<const char*>(src) + vec, bytes - vec);
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Software prefetch of the bytes of elements [start, start+len).
inline void prefetch_chunk(const void* src, int dtype, int64_t start, int64_t len) {
  const int size = dtype_size(dtype);
  const char* p = static_cast<const char*>(src) + start * size;
  for (int64_t offset = 0; offset < len * size; offset += 64) __builtin_prefetch(p + offset, 0, 0);
}

// Philox 4x32-10 (Salmon et al. 2011): counter (c0..c3), key (k0, k1), in place. Scalar
// references, not an array: inlined into a loop over counters, it vectorises across them.
VFUSE_INLINE void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0, p1 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0, n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c0 = n0;
    c1 = uint32_t(p1);
    c2 = n2;
    c3 = uint32_t(p0);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

#if VFUSE_AVX512_LOOPS
// dare_bits_chunk's words of `groups` (a multiple of 8) whole groups from group `first` on, with
// AVX-512 intrinsics (random_bits.cpp).
void philox_groups_avx512(uint32_t k0, uint32_t k1, uint32_t model, uint64_t first, int64_t groups, uint32_t* out);
#endif

// DARE random bits for model `model` and flat elements [start, start+len), start % 4 == 0:
// element e takes word (e % 4) of Philox(counter = (e/4 low, e/4 high, model, 0), key = seed).
// Where the AVX-512 loops are on (avx512.h), eight groups at a time through vpmuludq; the rest
// in one loop of independent Philox calls over the whole groups, vectorised across them by the
// compiler: 2x faster with AVX-512 than a call per group on an array.
inline void dare_bits_chunk(uint64_t seed, uint32_t model, int64_t start, int64_t len, uint32_t* __restrict out) {
  const uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  const uint64_t first = uint64_t(start) >> 2;
  const int64_t whole = len / 4;
  int64_t g = 0;
#if VFUSE_AVX512_LOOPS
  if (avx512_loops()) {
    g = whole / 8 * 8;
    philox_groups_avx512(k0, k1, model, first, g, out);
  }
#endif
  for (; g < whole; ++g) {
    uint32_t c0 = uint32_t(first + g), c1 = uint32_t((first + g) >> 32), c2 = model, c3 = 0u;
    philox4x32_10(c0, c1, c2, c3, k0, k1);
    out[4 * g] = c0;
    out[4 * g + 1] = c1;
    out[4 * g + 2] = c2;
    out[4 * g + 3] = c3;
  }
  if (len % 4) {  // the last, partial group
    const uint64_t group = first + uint64_t(whole);
    uint32_t c[4] = {uint32_t(group), uint32_t(group >> 32), model, 0u};
    philox4x32_10(c[0], c[1], c[2], c[3], k0, k1);
    for (int64_t l = 0; l < len % 4; ++l) out[4 * whole + l] = c[l];
  }
}

// Storage codecs for the fused single-loop kernels (one storage dtype, known at compile time).
struct Bf16 {
  using T = uint16_t;
  static float load(T v) { return bf16_to_float(v); }
  static T store(float f) { return float_to_bf16(f); }
};
struct Fp16 {
  using T = uint16_t;
  static float load(T v) { return fp16_to_float(v); }
  static T store(float f) { return float_to_fp16(f); }
};
struct Fp32 {
  using T = float;
  static float load(T v) { return v; }
  static T store(float f) { return f; }
};

// f(C{}) with the storage codec of dtype: one switch for every kernel over one storage dtype.
// Inside a VFUSE_MULTIVERSION function, f must be a VFUSE_INLINE_LAMBDA: a lambda is a function
// of its own, compiled for baseline x86-64 unless inlined into each clone.
template <typename F>
VFUSE_INLINE decltype(auto) with_codec(int dtype, F&& f) {
  switch (dtype) {
    case kBFloat16: return f(Bf16{});
    case kFloat16: return f(Fp16{});
    default: return f(Fp32{});
  }
}

// f(C{}, O{}) with the codecs of the inputs' dtype and of the output's out_dtype.
template <typename F>
VFUSE_INLINE decltype(auto) with_codecs(int dtype, int out_dtype, F&& f) {
  return with_codec(dtype, [&](auto c) VFUSE_INLINE_LAMBDA {
    return with_codec(out_dtype, [&](auto o) VFUSE_INLINE_LAMBDA { return f(c, o); });
  });
}

// f(std::integral_constant<int, N>{}) with N = n models (1–4; more take 4: callers check): the
// count as a compile-time constant, so that per-model loops unroll into registers.
template <typename F>
VFUSE_INLINE void with_models(size_t n, F&& f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

// |x| of an fp32 value as an order-preserving unsigned key (31 bits).
inline uint32_t magnitude_key(float x) { return float_to_bits(x) & 0x7fffffffu; }

// RN(m / d) for fp32 m and d ≠ 0, given inverse = RN64(1 / d): one fp64 product rounded to fp32,
// bit-identical to the IEEE fp32 division. The product is within 2⁻⁵² (relative) of m / d, and
// m / d is never within 2⁻⁴⁹ of a midpoint between adjacent fp32 values: a midpoint has an odd
// 25-bit significand M, so m − M·d ≠ 0 is a multiple of ulp(M)/2 · ulp(d) and
// |m/d − M| ≥ M · 2⁻²⁵ · 2⁻²⁴. So both round to the same fp32 value, subnormal results, overflow to
// infinity, signed zeros, infinities and NaNs included. (vdivps: 8–10 cycles per vector; this is
// two conversions and a multiplication.)
VFUSE_INLINE float exact_quotient(float m, double inverse) { return float(double(m) * inverse); }

constexpr int kLanes = 16;

// Σⱼ f(j) for j < len in fp64, in a fixed order: term j goes to running sum j % kLanes, the sums
// are added in lane order. It vectorises (a single running sum waits on every add) and gives the
// same value on every SIMD target.
template <typename F>
VFUSE_INLINE double lane_sum(int64_t len, F f) {
  double lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] += f(j + l);
  for (; j < len; ++j) lane[j % kLanes] += f(j);
  double sum = 0.0;
  for (int l = 0; l < kLanes; ++l) sum += lane[l];
  return sum;
}

}  // namespace vfuse
