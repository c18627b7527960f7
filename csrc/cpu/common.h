// Shared scalar helpers for the CPU kernels: storage-dtype conversions and the
// Philox 4x32-10 counter-based generator (the same function as the Triton one in
// vfuse_kernels/triton/philox.py and the reference in vfuse_kernels/reference/philox.py).
#pragma once
#include <cstdint>
#include <cstring>

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

inline float load_as_float(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    case kFloat16: return fp16_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// Converts src[start, start+len) of storage `dtype` into dst (fp32).
inline void load_chunk(const void* src, int dtype, int64_t start, int64_t len, float* dst) {
  switch (dtype) {
    case kBFloat16: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + start;
      for (int64_t j = 0; j < len; ++j) dst[j] = bf16_to_float(s[j]);
      break;
    }
    case kFloat16: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + start;
      for (int64_t j = 0; j < len; ++j) dst[j] = fp16_to_float(s[j]);
      break;
    }
    default:
      std::memcpy(dst, static_cast<const float*>(src) + start, size_t(len) * 4);
  }
}

// Rounds src (fp32) once into dst[start, start+len) of storage `dtype`.
inline void store_chunk(void* dst, int dtype, int64_t start, int64_t len, const float* src) {
  switch (dtype) {
    case kBFloat16: {
      uint16_t* d = static_cast<uint16_t*>(dst) + start;
      for (int64_t j = 0; j < len; ++j) d[j] = float_to_bf16(src[j]);
      break;
    }
    case kFloat16: {
      uint16_t* d = static_cast<uint16_t*>(dst) + start;
      for (int64_t j = 0; j < len; ++j) d[j] = float_to_fp16(src[j]);
      break;
    }
    default:
      std::memcpy(static_cast<float*>(dst) + start, src, size_t(len) * 4);
  }
}

// Philox 4x32-10 (Salmon et al. 2011): counter (c0..c3), key (k0, k1).
inline void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    uint64_t p0 = uint64_t(0xD2511F53u) * c[0];
    uint64_t p1 = uint64_t(0xCD9E8D57u) * c[2];
    uint32_t n0 = uint32_t(p1 >> 32) ^ c[1] ^ k0;
    uint32_t n2 = uint32_t(p0 >> 32) ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = uint32_t(p1);
    c[2] = n2;
    c[3] = uint32_t(p0);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// DARE random bits for model `model` and flat elements [start, start+len), start % 4 == 0:
// element e takes word (e % 4) of Philox(counter = (e/4 low, e/4 high, model, 0), key = seed).
inline void dare_bits_chunk(uint64_t seed, uint32_t model, int64_t start, int64_t len, uint32_t* out) {
  const uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int64_t j = 0; j < len; j += 4) {
    uint64_t group = uint64_t(start + j) >> 2;
    uint32_t c[4] = {uint32_t(group), uint32_t(group >> 32), model, 0u};
    philox4x32_10(c, k0, k1);
    for (int64_t l = 0; l < 4 && j + l < len; ++l) out[j + l] = c[l];
  }
}

// |x| of an fp32 value as an order-preserving unsigned key (31 bits).
inline uint32_t magnitude_key(float x) { return float_to_bits(x) & 0x7fffffffu; }

}  // namespace vfuse
