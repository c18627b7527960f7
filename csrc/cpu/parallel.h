// OpenMP when the compiler has it; a single-thread stand-in otherwise.
#pragma once
#ifdef _OPENMP
#include <omp.h>
#else
inline int omp_get_max_threads() { return 1; }
inline int omp_get_thread_num() { return 0; }
inline void omp_set_num_threads(int) {}
#endif

#include <cstdint>

// Threads for a pass over `elements` values: one below ~256 KiB of fp32 work, where waking
// the team costs more than the work (and a loaded machine makes that much worse).
inline int threads_for(int64_t elements) { return elements < (int64_t(1) << 16) ? 1 : omp_get_max_threads(); }

#include <algorithm>
#include <vector>

namespace vfuse {

// Elements per work item of the element-wise passes (their chunk buffers stay in L1/L2).
constexpr int64_t kItem = 2048;

// The number of kItem-element items covering numel elements.
inline int64_t item_count(int64_t numel) { return (numel + kItem - 1) / kItem; }

// item(start, len) for the items of kItem elements covering [0, numel), on `threads` threads.
// The hot work belongs in a VFUSE_MULTIVERSION function that item calls: OpenMP outlines the
// body of a parallel loop into a function of its own, which target_clones does not clone, so
// loops written here directly compile for baseline x86-64 only.
template <typename Item>
void for_each_item(int64_t numel, int threads, Item&& item) {
  const int64_t items = item_count(numel);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < items; ++i) item(i * kItem, std::min(kItem, numel - i * kItem));
}

// Σ over items of item(start, len, partial): each item writes `width` partial sums, added in item
// order afterwards — the same totals whatever the thread count.
template <typename Item>
std::vector<double> sum_items(int64_t numel, int threads, int width, Item&& item) {
  const int64_t items = item_count(numel);
  std::vector<double> partial(size_t(items) * width), total(width, 0.0);
  for_each_item(numel, threads,
                [&](int64_t start, int64_t len) { item(start, len, &partial[(start / kItem) * width]); });
  for (int64_t i = 0; i < items; ++i)
    for (int w = 0; w < width; ++w) total[w] += partial[i * width + w];
  return total;
}

// Σ over items of item(start, len, counts), `width` integer counts: each thread adds into an array
// of its own, and the arrays are added at the end (integers: any order gives the same totals).
template <typename Item>
std::vector<int64_t> count_items(int64_t numel, int threads, int width, Item&& item) {
  const int64_t items = item_count(numel);
  std::vector<int64_t> total(width, 0);
#pragma omp parallel num_threads(threads)
  {
    std::vector<int64_t> counts(width, 0);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < items; ++i) item(i * kItem, std::min(kItem, numel - i * kItem), counts.data());
#pragma omp critical
    for (int w = 0; w < width; ++w) total[w] += counts[w];
  }
  return total;
}

}  // namespace vfuse
