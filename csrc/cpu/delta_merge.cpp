// Fused delta merge on the CPU: one pass reads base and every tuned tensor once and
// writes the output once (fp32 arithmetic, rounding once to the output dtype).
//   uᵢ = coefᵢ · keepᵢ · δᵢ          (coefᵢ = wᵢ · rescaleᵢ)
//   election s = sign(Σ uᵢ) or sign(Σ sign uᵢ) (≥ 0 → +1); agreeᵢ = sign(uᵢ) == s
//   m = Σ agreeᵢ uᵢ, d = Σ agreeᵢ wᵢ   (without election: m = Σ uᵢ, d = Σ wᵢ)
//   out = base + scale · (normalize ? m / (d == 0 ? 1 : d) : m)
#include "delta_merge.h"

#include <algorithm>
#include <cmath>

namespace vfuse {

void load_deltas(const DeltaInputs& in, int64_t start, int64_t len, bool with_keep, ChunkScratch& s) {
  load_chunk(in.base, in.base_dtype, start, len, s.base.data());
  const float* b = s.base.data();
  for (int i = 0; i < in.models(); ++i) {
    float* d = s.delta_of(i);
    load_chunk(in.tuned[i], in.tuned_dtypes[i], start, len, d);
    if (!in.tuned_are_deltas)
      for (int64_t j = 0; j < len; ++j) d[j] -= b[j];
    if (!with_keep) continue;
    uint8_t* keep = s.keep_of(i);
    if (in.sparsify == kTrim) {
      const uint32_t key = uint32_t(in.keep_a[i]);
      const int64_t last = in.keep_b[i] - start;  // cutoff relative to this chunk
      for (int64_t j = 0; j < len; ++j) {
        uint32_t k = magnitude_key(d[j]);
        keep[j] = k > key || (k == key && j <= last);
      }
    } else if (in.sparsify == kDrop) {
      dare_bits_chunk(in.seed, uint32_t(i), start, len, s.bits.data());
      const uint64_t threshold = uint64_t(in.keep_a[i]);
      for (int64_t j = 0; j < len; ++j) keep[j] = uint64_t(s.bits[j]) < threshold;
    } else {
      std::fill(keep, keep + len, uint8_t(1));
    }
  }
}

void merge(void* out, int out_dtype, const DeltaInputs& in, const std::vector<float>& coefs,
           const std::vector<float>& weights, int elect, bool normalize, float scale) {
  const int n = in.models();
  const int64_t chunks = (in.numel + kChunk - 1) / kChunk;
  double weight_sum64 = 0.0;  // Σ wᵢ summed in fp64 like the host, rounded once
  for (float w : weights) weight_sum64 += double(w);
  const float weight_sum = float(weight_sum64);
#pragma omp parallel
  {
    ChunkScratch s(n);
    std::vector<float> u(size_t(n) * kChunk), m(kChunk), d(kChunk), vote(kChunk);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t start = c * kChunk, len = std::min(kChunk, in.numel - start);
      load_deltas(in, start, len, true, s);
      for (int i = 0; i < n; ++i) {
        const float* delta = s.delta_of(i);
        const uint8_t* keep = s.keep_of(i);
        float* ui = u.data() + size_t(i) * kChunk;
        const float coef = coefs[i];
        for (int64_t j = 0; j < len; ++j) ui[j] = keep[j] ? delta[j] * coef : 0.f;
      }
      std::fill(m.begin(), m.begin() + len, 0.f);
      if (elect == kNoElection) {
        for (int i = 0; i < n; ++i) {
          const float* ui = u.data() + size_t(i) * kChunk;
          for (int64_t j = 0; j < len; ++j) m[j] += ui[j];
        }
        std::fill(d.begin(), d.begin() + len, weight_sum);
      } else {
        std::fill(vote.begin(), vote.begin() + len, 0.f);
        for (int i = 0; i < n; ++i) {
          const float* ui = u.data() + size_t(i) * kChunk;
          if (elect == kElectSum)
            for (int64_t j = 0; j < len; ++j) vote[j] += ui[j];
          else
            for (int64_t j = 0; j < len; ++j) vote[j] += float(ui[j] > 0.f) - float(ui[j] < 0.f);
        }
        std::fill(d.begin(), d.begin() + len, 0.f);
        for (int i = 0; i < n; ++i) {
          const float* ui = u.data() + size_t(i) * kChunk;
          const float w = weights[i];
          for (int64_t j = 0; j < len; ++j) {
            bool agree = vote[j] >= 0.f ? ui[j] > 0.f : ui[j] < 0.f;
            m[j] += agree ? ui[j] : 0.f;
            d[j] += agree ? w : 0.f;
          }
        }
      }
      const float* b = s.base.data();
      for (int64_t j = 0; j < len; ++j) {
        float merged = normalize ? m[j] / (d[j] == 0.f ? 1.f : d[j]) : m[j];
        m[j] = b[j] + scale * merged;
      }
      store_chunk(out, out_dtype, start, len, m.data());
    }
  }
}

// Σ|δᵢ| and Σ keepᵢ·|δᵢ| per model (fp64, summed in chunk order: independent of the
// thread count). Returns [models][2].
std::vector<double> sparse_l1(const DeltaInputs& in) {
  const int n = in.models();
  const int64_t chunks = (in.numel + kChunk - 1) / kChunk;
  std::vector<double> partial(size_t(chunks) * n * 2, 0.0);
#pragma omp parallel
  {
    ChunkScratch s(n);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t start = c * kChunk, len = std::min(kChunk, in.numel - start);
      load_deltas(in, start, len, true, s);
      for (int i = 0; i < n; ++i) {
        const float* delta = s.delta_of(i);
        const uint8_t* keep = s.keep_of(i);
        double all = 0.0, kept = 0.0;
        for (int64_t j = 0; j < len; ++j) {
          double a = std::fabs(double(delta[j]));
          all += a;
          kept += keep[j] ? a : 0.0;
        }
        partial[(size_t(c) * n + i) * 2] = all;
        partial[(size_t(c) * n + i) * 2 + 1] = kept;
      }
    }
  }
  std::vector<double> total(size_t(n) * 2, 0.0);
  for (int64_t c = 0; c < chunks; ++c)
    for (int k = 0; k < n * 2; ++k) total[k] += partial[size_t(c) * n * 2 + k];
  return total;
}

}  // namespace vfuse
