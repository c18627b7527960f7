// SCE (vfuse_kernels/merging/methods/sce.py) in C++ passes over base and 1–4 tuned tensors of one
// storage dtype, without the fp32 stack of task vectors: each pass recomputes, a chunk at a time,
// the task vectors τᵢ = θᵢ − b (fp32) and their population variance σ² (fp64 Welford updates in
// model order, rounded to fp32: the bits of torch.var(τ, dim=0, unbiased=False), as
// model_variance.cpp).
//
// σ² ≥ 0, so its fp32 bit pattern orders like its value. A selection (T, cutoff) keeps element e
// where bits(σ²) > T, or bits(σ²) == T and e ≤ cutoff (T = 2³² keeps nothing).
//   select:      the k largest σ², ties to the lower flat index, k = floor(fp32(count(σ² ≠ 0)) ·
//                fp32(topk)): two radix passes count the 16-bit digits of σ²'s bits (the high
//                halves with the nonzero count, then the low halves under the k-th's high half),
//                one more finds the cutoff among the ties (counts per thread's range, then a scan
//                of the range holding it);
//   square_sums: Σₑ (τᵢ·keep)² per model: fp32 squares summed in fp64 in a fixed order
//                (lane_sum within an item, sum_items across: the same sums on any thread count);
//   merge:       part τᵢ·keep, sign election on Σ part (≥ 0 → +1), ωᵢ where sign(partᵢ) agrees,
//                out = b + Σ partᵢ·ωᵢ[agree] / max(Σ ωᵢ[agree], 1e-6)  (fp32, rounded once).
// Each pass is a parallel loop over items whose work (compiled per SIMD target, for_each_item)
// is vector loops over L1-resident buffers.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <utility>
#include <vector>

#include "common.h"
#include "parallel.h"

namespace vfuse {
namespace {

constexpr int kDigits = 1 << 16;
constexpr int64_t kKeepNone = int64_t(1) << 32;  // a threshold above every fp32 bit pattern

struct Inputs {
  const void* base;
  const void* tuned[4];
  int models;
  int dtype;
  int64_t numel;
};

struct Selection {
  int64_t threshold;
  int64_t cutoff;
};

// σ² bits of elements [start, start + len) into bits, and τᵢ into tau[i·kItem + j] when given.
template <typename C, int N>
VFUSE_INLINE void variance_chunk(const Inputs& in, int64_t start, int64_t len, uint32_t* bits, float* tau) {
  using T = typename C::T;
  const T* base = static_cast<const T*>(in.base) + start;
  const T* tuned[N];
  for (int i = 0; i < N; ++i) tuned[i] = static_cast<const T*>(in.tuned[i]) + start;
  for (int64_t j = 0; j < len; ++j) {
    const float b = C::load(base[j]);
    double mean = 0.0, m2 = 0.0;
    for (int i = 0; i < N; ++i) {
      const float t = C::load(tuned[i][j]) - b;
      if (tau != nullptr) tau[i * kItem + j] = t;
      const double x = t;
      const double delta = x - mean;
      mean = mean + delta / double(i + 1);
      m2 = m2 + delta * (x - mean);
    }
    bits[j] = float_to_bits(float(m2 / double(N)));
  }
}

VFUSE_INLINE bool kept(uint32_t bits, int64_t e, const Selection& s) {
  return (int64_t(bits) > s.threshold) | ((int64_t(bits) == s.threshold) & (e <= s.cutoff));
}

template <typename C, int N>
VFUSE_INLINE void histogram_chunk(const Inputs& in, int64_t start, int64_t len, int shift, int64_t prefix,
                                  int64_t* counts) {
  uint32_t bits[kItem];
  variance_chunk<C, N>(in, start, len, bits, nullptr);
  int64_t nonzero = 0;
  for (int64_t j = 0; j < len; ++j) nonzero += bits[j] != 0;
  counts[kDigits] += nonzero;
  for (int64_t j = 0; j < len; ++j)
    if (prefix < 0 || int64_t(bits[j] >> 16) == prefix) ++counts[(bits[j] >> shift) & 0xFFFFu];
}

template <typename C, int N>
VFUSE_INLINE int64_t ties_chunk(const Inputs& in, int64_t start, int64_t len, uint32_t threshold) {
  uint32_t bits[kItem];
  variance_chunk<C, N>(in, start, len, bits, nullptr);
  int64_t count = 0;
  for (int64_t j = 0; j < len; ++j) count += bits[j] == threshold;
  return count;
}

template <typename C, int N>
VFUSE_INLINE void sums_chunk(const Inputs& in, int64_t start, int64_t len, const Selection& s, double* sums) {
  uint32_t bits[kItem];
  float tau[N * kItem];
  variance_chunk<C, N>(in, start, len, bits, tau);
  float keep[kItem];
  for (int64_t j = 0; j < len; ++j) keep[j] = kept(bits[j], start + j, s) ? 1.f : 0.f;
  for (int i = 0; i < N; ++i) {
    const float* t = tau + i * kItem;
    sums[i] = lane_sum(len, [&](int64_t j) VFUSE_INLINE_LAMBDA { return double((t[j] * t[j]) * keep[j]); });
  }
}

template <typename C, typename O, int N>
VFUSE_INLINE void merge_chunk(const Inputs& in, int64_t start, int64_t len, const Selection& s, const float* w,
                              void* out_ptr) {
  uint32_t bits[kItem];
  float tau[N * kItem];
  variance_chunk<C, N>(in, start, len, bits, tau);
  const typename C::T* base = static_cast<const typename C::T*>(in.base) + start;
  typename O::T* out = static_cast<typename O::T*>(out_ptr) + start;
  for (int64_t j = 0; j < len; ++j) {
    const float keep = kept(bits[j], start + j, s) ? 1.f : 0.f;
    float part[N];
    float vote = 0.f;
    for (int i = 0; i < N; ++i) {
      part[i] = tau[i * kItem + j] * keep;
      vote += part[i];
    }
    const float majority = vote >= 0.f ? 1.f : -1.f;
    float merged = 0.f, divisor = 0.f;
    for (int i = 0; i < N; ++i) {
      const float sign = float(part[i] > 0.f) - float(part[i] < 0.f);
      const float erased = w[i] * float(sign == majority);
      merged += part[i] * erased;
      divisor += erased;
    }
    out[j] = O::store(C::load(base[j]) + merged / std::max(divisor, 1e-6f));
  }
}

// f(C{}, std::integral_constant<int, N>{}) for the inputs' storage codec C and model count N.
template <typename F>
VFUSE_INLINE void with_inputs(const Inputs& in, F&& f) {
  with_codec(in.dtype, [&](auto c) VFUSE_INLINE_LAMBDA {
    with_models(in.models, [&](auto models) VFUSE_INLINE_LAMBDA { f(c, models); });
  });
}

// The per-item work of each pass, compiled per SIMD target.
VFUSE_MULTIVERSION
void histogram_item(const Inputs& in, int64_t start, int64_t len, int shift, int64_t prefix, int64_t* counts) {
  with_inputs(in, [&](auto c, auto models) VFUSE_INLINE_LAMBDA {
    histogram_chunk<decltype(c), models>(in, start, len, shift, prefix, counts);
  });
}

VFUSE_MULTIVERSION
int64_t ties_item(const Inputs& in, int64_t start, int64_t len, uint32_t threshold) {
  int64_t count = 0;
  with_inputs(in, [&](auto c, auto models) VFUSE_INLINE_LAMBDA {
    count = ties_chunk<decltype(c), models>(in, start, len, threshold);
  });
  return count;
}

VFUSE_MULTIVERSION
void sums_item(const Inputs& in, int64_t start, int64_t len, const Selection& s, double* sums) {
  with_inputs(in, [&](auto c, auto models) VFUSE_INLINE_LAMBDA {
    sums_chunk<decltype(c), models>(in, start, len, s, sums);
  });
}

VFUSE_MULTIVERSION
void merge_item(const Inputs& in, int64_t start, int64_t len, const Selection& s, const float* w, void* out,
                int out_dtype) {
  with_inputs(in, [&](auto c, auto models) VFUSE_INLINE_LAMBDA {
    with_codec(out_dtype, [&](auto o) VFUSE_INLINE_LAMBDA {
      merge_chunk<decltype(c), decltype(o), models>(in, start, len, s, w, out);
    });
  });
}

Inputs make_inputs(const void* base, const std::vector<const void*>& tuned, int dtype, int64_t numel) {
  Inputs in{base, {}, int(tuned.size()), dtype, numel};
  for (size_t i = 0; i < tuned.size(); ++i) in.tuned[i] = tuned[i];
  return in;
}

int threads_of(const Inputs& in) { return threads_for(in.numel * in.models); }

// The items of a static split into `parts` contiguous ranges: part p holds [first, last).
std::pair<int64_t, int64_t> part_items(int64_t items, int parts, int p) {
  return {items * p / parts, items * (p + 1) / parts};
}

std::vector<int64_t> histogram(const Inputs& in, int shift, int64_t prefix) {
  return count_items(in.numel, threads_of(in), kDigits + 1, [&](int64_t start, int64_t len, int64_t* counts) {
    histogram_item(in, start, len, shift, prefix, counts);
  });
}

// The digit of `counts` holding the k-th largest element (1-based; `above` elements rank before
// every digit), and the count ranked before that digit.
std::pair<int64_t, int64_t> digit_of_kth(const std::vector<int64_t>& counts, int64_t k, int64_t above) {
  for (int64_t digit = kDigits - 1; digit >= 0; --digit) {
    if (above + counts[digit] >= k) return {digit, above};
    above += counts[digit];
  }
  throw std::logic_error("sce_select: fewer elements counted than k");
}

int64_t tie_cutoff(const Inputs& in, uint32_t threshold, int64_t rank) {
  if (rank <= 0) return -1;
  const int64_t items = item_count(in.numel);
  const int parts = threads_of(in);
  std::vector<int64_t> ties(parts, 0);
#pragma omp parallel for schedule(static, 1) num_threads(parts)
  for (int p = 0; p < parts; ++p) {
    const auto [first, last] = part_items(items, parts, p);
    for (int64_t item = first; item < last; ++item) {
      const int64_t start = item * kItem;
      ties[p] += ties_item(in, start, std::min(kItem, in.numel - start), threshold);
    }
  }
  for (int p = 0; p < parts; ++p) {
    if (rank > ties[p]) {
      rank -= ties[p];
      continue;
    }
    const auto [first, last] = part_items(items, parts, p);
    for (int64_t item = first; item < last; ++item) {
      const int64_t start = item * kItem, len = std::min(kItem, in.numel - start);
      const int64_t count = ties_item(in, start, len, threshold);
      if (rank > count) {
        rank -= count;
        continue;
      }
      for (int64_t e = start; e < start + len; ++e)  // the chunk holding it, element by element
        if (ties_item(in, e, 1, threshold) == 1 && --rank == 0) return e;
    }
  }
  return in.numel - 1;  // fewer ties than rank: all of them
}

}  // namespace

std::pair<int64_t, int64_t> sce_select(const void* base, const std::vector<const void*>& tuned, int dtype,
                                       int64_t numel, double topk) {
  const Inputs in = make_inputs(base, tuned, dtype, numel);
  const std::pair<int64_t, int64_t> all{0, numel - 1}, none{kKeepNone, -1};
  if (topk >= 1) return all;
  if (topk <= 0 || numel == 0) return none;
  const std::vector<int64_t> high = histogram(in, 16, -1);
  const int64_t k = int64_t(std::floor(float(high[kDigits]) * float(topk)));  // fp32, as torch computes it
  if (k <= 0) return none;
  const auto [digit_high, above_high] = digit_of_kth(high, k, 0);
  const auto [digit_low, above] = digit_of_kth(histogram(in, 0, digit_high), k, above_high);
  const int64_t threshold = digit_high << 16 | digit_low;
  return {threshold, tie_cutoff(in, uint32_t(threshold), k - above)};
}

std::vector<double> sce_square_sums(const void* base, const std::vector<const void*>& tuned, int dtype, int64_t numel,
                                    int64_t threshold, int64_t cutoff) {
  const Inputs in = make_inputs(base, tuned, dtype, numel);
  const Selection s{threshold, cutoff};
  return sum_items(numel, threads_of(in), in.models,
                   [&](int64_t start, int64_t len, double* sums) { sums_item(in, start, len, s, sums); });
}

void sce_merge(void* out, int out_dtype, const void* base, const std::vector<const void*>& tuned, int dtype,
               int64_t numel, int64_t threshold, int64_t cutoff, const std::vector<float>& weights) {
  const Inputs in = make_inputs(base, tuned, dtype, numel);
  const Selection s{threshold, cutoff};
  for_each_item(numel, threads_of(in), [&](int64_t start, int64_t len) {
    merge_item(in, start, len, s, weights.data(), out, out_dtype);
  });
}

}  // namespace vfuse
