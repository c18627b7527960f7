// Population variance across models of each element of a [models, numel] fp32 stack
// (vfuse_kernels/merging/methods/sce.py): Welford's update in fp64, models in order, then
// m2 / models rounded to fp32 — the operations of torch.var(x, dim=0, unbiased=False) on the
// CPU (its WelfordOps with a double accumulator), so the same bits, at streaming speed.
#include <cstdint>

#include "parallel.h"

namespace vfuse {

void model_variance(float* out, const float* stack, int models, int64_t numel) {
#pragma omp parallel for schedule(static) num_threads(threads_for(numel * models))
  for (int64_t e = 0; e < numel; ++e) {
    double mean = 0.0, m2 = 0.0;
    for (int i = 0; i < models; ++i) {
      const double x = stack[i * numel + e];
      const double delta = x - mean;
      mean = mean + delta / double(i + 1);
      m2 = m2 + delta * (x - mean);
    }
    out[e] = float(m2 / double(models));
  }
}

}  // namespace vfuse
