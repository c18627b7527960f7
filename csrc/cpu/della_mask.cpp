// DELLA's keep mask for a [rows, m] fp32 block of deltas, rows first_row… of the tensor (della_keep_mask in
// vfuse_kernels/merging/methods/gta.py): per row the stable ascending rank r of |δ| (equal
// magnitudes: the lower index first), p = (r / (m − 1))·2ε + (d − ε) in fp64, and element e
// kept iff bits(e) < floor(p·2^32), bits DARE's Philox stream of (seed, model) at the flat
// index. Per row one LSD radix sort of (key, index) pairs — stable, so the ranks are the
// stable sort's — then the same fp64 operations as the torch path: the same mask.
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "common.h"
#include "parallel.h"

namespace vfuse {
namespace {

struct MaskParams {
  int64_t m;
  double two_eps, low, last;
  uint64_t seed;
  uint32_t model;
};

// One row's keep flags into out (the row's first flat index: first), with the caller's buffers
// (pairs, spare: m entries; bits: m + 4).
VFUSE_MULTIVERSION
void keep_row(const float* d, uint8_t* out, int64_t first, const MaskParams& p, uint64_t* pairs, uint64_t* spare,
              uint32_t* bits) {
  const int64_t m = p.m;
  for (int64_t j = 0; j < m; ++j) {
    uint32_t key = float_to_bits(d[j]) & 0x7fffffffu;
    if (key > 0x7f800000u) key = 0x7fc00000u;  // every NaN one key: NaNs stay in index order
    pairs[j] = (uint64_t(key) << 32) | uint64_t(j);
  }
  for (int shift = 32; shift < 64; shift += 8) {  // the key's four bytes, lowest first
    int64_t start[257] = {};
    for (int64_t j = 0; j < m; ++j) ++start[((pairs[j] >> shift) & 0xff) + 1];
    for (int k = 0; k < 256; ++k) start[k + 1] += start[k];
    for (int64_t j = 0; j < m; ++j) spare[start[(pairs[j] >> shift) & 0xff]++] = pairs[j];
    std::swap(pairs, spare);
  }
  const int64_t aligned = first & ~int64_t(3);  // Philox groups: multiples of 4
  dare_bits_chunk(p.seed, p.model, aligned, first - aligned + m, bits);
  const uint32_t* random = bits + (first - aligned);
  for (int64_t rank = 0; rank < m; ++rank) {
    const int64_t j = int64_t(pairs[rank] & 0xffffffffu);
    const double keep_p = (double(rank) / p.last) * p.two_eps + p.low;
    out[j] = uint8_t(int64_t(random[j]) < int64_t(std::floor(keep_p * 4294967296.0)));
  }
}

}  // namespace

void della_keep_mask(uint8_t* keep, const float* delta, int64_t rows, int64_t m, double density, double epsilon,
                     uint64_t seed, uint32_t model, int64_t first_row) {
  const MaskParams params{m, 2.0 * epsilon, density - epsilon, double(m - 1), seed, model};
#pragma omp parallel num_threads(threads_for(rows * m))
  {
    std::vector<uint64_t> pairs(m), spare(m);
    std::vector<uint32_t> bits(m + 4);
#pragma omp for schedule(dynamic, 8)
    for (int64_t row = 0; row < rows; ++row)  // the row in a function compiled per SIMD target (see for_each_item)
      keep_row(delta + row * m, keep + row * m, (first_row + row) * m, params, pairs.data(), spare.data(),
               bits.data());
  }
}

}  // namespace vfuse
