// Per-chunk sparsified deltas shared by the merge pass, the L1-norm pass and the
// magnitude selection (csrc/cpu/delta_merge.cpp, csrc/cpu/magnitude_select.cpp).
#pragma once
#include <cstdint>
#include <vector>

#include "common.h"

namespace vfuse {

enum Sparsify : int { kKeepAll = 0, kTrim = 1, kDrop = 2, kMask = 3, kBand = 4 };
enum Elect : int { kNoElection = 0, kElectSum = 1, kElectCount = 2 };

// Elements per work item: a multiple of 4 (Philox makes 4 words per counter), small
// enough that a chunk's buffers for a few models stay in L1.
constexpr int64_t kChunk = 512;

constexpr int64_t kPrefetchChunks = 2;  // prefetch distance, in chunks

struct DeltaInputs {
  const void* base;
  int base_dtype;
  std::vector<const void*> tuned;
  std::vector<int> tuned_dtypes;
  int64_t numel;
  bool tuned_are_deltas;
  int sparsify;                 // Sparsify
  std::vector<int64_t> keep_a;  // trim: magnitude key of the threshold; drop: keep threshold on 32 random bits;
                                // mask: address of the keep flags, one bit per element (bit e & 7 of byte
                                // e >> 3), or 0 to keep every element; band: 2N values, below
  std::vector<int64_t> keep_b;  // trim: last flat index kept among keys equal to the threshold
  // band (Model Breadcrumbs): keep_a[i], keep_b[i] = key K and cutoff C of model i's wider cut,
  // keep_a[N + i], keep_b[N + i] those of its narrower one; a cut holds key > K or (key == K and
  // e > C) — ties to the higher flat index — and the kept elements are the wider cut's minus the
  // narrower one's.
  uint64_t seed;
  int models() const { return int(tuned.size()); }
};

// Thread-local buffers for one chunk: base values, deltas and keep flags of every model.
struct ChunkScratch {
  std::vector<float> base, delta;
  std::vector<float> keep;  // 1 where the entry survives sparsification, else 0
  std::vector<uint32_t> bits;
  bool keep_all = true;  // set by load_deltas: no sparsification, keep flags not written
  explicit ChunkScratch(int models)
      : base(kChunk), delta(size_t(models) * kChunk), keep(size_t(models) * kChunk), bits(kChunk) {}
  float* delta_of(int i) { return delta.data() + size_t(i) * kChunk; }
  const float* delta_of(int i) const { return delta.data() + size_t(i) * kChunk; }
  float* keep_of(int i) { return keep.data() + size_t(i) * kChunk; }
  const float* keep_of(int i) const { return keep.data() + size_t(i) * kChunk; }
};

// Loads base and computes δᵢ = θᵢ − base (fp32) for elements [start, start+len) of
// every model; with `with_keep`, also the keep flags of the sparsification (unless
// nothing is sparsified: then s.keep_all is set and the flags are not written).
void load_deltas(const DeltaInputs& in, int64_t start, int64_t len, bool with_keep, ChunkScratch& s);

}  // namespace vfuse
