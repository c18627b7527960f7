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
