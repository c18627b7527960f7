// Exact top-k by magnitude per model, O(n): a 65536-bin histogram of the top 16 bits
// of the 31-bit magnitude key finds the bin holding the k-th largest |δᵢ|; a second
// pass collects that bin's elements as (key, inverted index) pairs and nth_element
// picks the k-th, which breaks ties at the threshold towards the lower flat index.
#include "parallel.h"

#include <algorithm>
#include <functional>
#include <stdexcept>

#include "delta_merge.h"

namespace vfuse {

namespace {
constexpr int kBinShift = 15;            // 31-bit key >> 15 = 16-bit bin
constexpr int64_t kBins = int64_t(1) << 16;
}  // namespace

// ks[i] in [1, numel], numel < 2^32. Writes keys_out[i] (threshold key) and
// cutoffs_out[i] (last flat index kept among elements whose key equals it).
void magnitude_select(const DeltaInputs& in, const std::vector<int64_t>& ks, int64_t* keys_out,
                      int64_t* cutoffs_out) {
  const int n = in.models();
  const int64_t chunks = (in.numel + kChunk - 1) / kChunk;
  const int threads = omp_get_max_threads();

  // Pass 1: per-thread histograms, then their sum.
  std::vector<int64_t> hist(size_t(n) * kBins, 0);
  std::vector<std::vector<uint32_t>> local(threads);
#pragma omp parallel num_threads(threads)
  {
    std::vector<uint32_t>& h = local[omp_get_thread_num()];
    h.assign(size_t(n) * kBins, 0);
    ChunkScratch s(n);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t start = c * kChunk, len = std::min(kChunk, in.numel - start);
      load_deltas(in, start, len, false, s);
      for (int i = 0; i < n; ++i) {
        const float* d = s.delta_of(i);
        uint32_t* hi = h.data() + size_t(i) * kBins;
        for (int64_t j = 0; j < len; ++j) ++hi[magnitude_key(d[j]) >> kBinShift];
      }
    }
  }
  for (const auto& h : local)
    for (size_t b = 0; b < h.size(); ++b) hist[b] += h[b];
  local.clear();

  // The bin of the k-th largest key and the rank of the k-th inside it.
  std::vector<uint32_t> bin(n);
  std::vector<int64_t> rank(n);
  for (int i = 0; i < n; ++i) {
    int64_t above = 0, b = kBins - 1;
    const int64_t* hi = hist.data() + size_t(i) * kBins;
    while (above + hi[b] < ks[i]) above += hi[b--];
    bin[i] = uint32_t(b);
    rank[i] = ks[i] - above;  // 1-based rank inside the bin
  }

  // Pass 2: the candidates of each model's bin as key << 32 | (2^32 - 1 - index),
  // so that a larger value means a larger magnitude, then a lower index.
  std::vector<std::vector<std::vector<uint64_t>>> found(threads, std::vector<std::vector<uint64_t>>(n));
#pragma omp parallel num_threads(threads)
  {
    auto& mine = found[omp_get_thread_num()];
    ChunkScratch s(n);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t start = c * kChunk, len = std::min(kChunk, in.numel - start);
      load_deltas(in, start, len, false, s);
      for (int i = 0; i < n; ++i) {
        const float* d = s.delta_of(i);
        for (int64_t j = 0; j < len; ++j) {
          uint32_t key = magnitude_key(d[j]);
          if ((key >> kBinShift) == bin[i])
            mine[i].push_back((uint64_t(key) << 32) | (0xffffffffu - uint32_t(start + j)));
        }
      }
    }
  }
  for (int i = 0; i < n; ++i) {
    std::vector<uint64_t> cand;
    for (auto& t : found) cand.insert(cand.end(), t[i].begin(), t[i].end());
    if (rank[i] < 1 || rank[i] > int64_t(cand.size())) throw std::logic_error("magnitude_select: bin count mismatch");
    auto kth = cand.begin() + (rank[i] - 1);
    std::nth_element(cand.begin(), kth, cand.end(), std::greater<uint64_t>());
    keys_out[i] = int64_t(*kth >> 32);
    cutoffs_out[i] = int64_t(0xffffffffu - uint32_t(*kth));
  }
}

}  // namespace vfuse
