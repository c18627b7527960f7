// pybind11 bindings of the CPU kernels. Tensors cross as (data pointer, dtype code);
// the Python layer (vfuse_kernels/_backend.py) checks shapes, dtypes and contiguity.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <string>
#include <utility>

#include "delta_merge.h"
#include "parallel.h"

namespace py = pybind11;

namespace vfuse {
// Merges elements [first, first + count) (first a multiple of kChunk) into out, which holds element first.
void merge(void* out, int out_dtype, const DeltaInputs& in, const std::vector<float>& coefs,
           const std::vector<float>& weights, int elect, bool normalize, float scale, int64_t first, int64_t count);
std::vector<double> sparse_l1(const DeltaInputs& in);
void bracket_pass(const DeltaInputs& in, const int64_t* lo, const int64_t* hi, const int64_t* rate, int64_t cap,
                  int64_t block, int32_t* counts, int64_t* cand, int64_t* fill);
void sample_keys(const DeltaInputs& in, const int64_t* runs, int64_t count, int64_t run, int32_t* keys);
int64_t tie_index(const DeltaInputs& in, int i, int64_t start, int64_t stop, uint32_t key, int64_t rank);
void random_bits(uint64_t seed, uint32_t model, int64_t numel, int64_t* out);
std::array<double, 3> pair_sums(const void* a, const void* b, int dtype, int64_t numel);
std::array<float, 2> slerp_coefficients(const std::array<double, 3>& sums, float t);
void pair_combine(void* out, int out_dtype, const void* a, const void* b, int dtype, int64_t numel, float ca,
                  float cb);
std::vector<double> offset_gram(const void* base, const std::vector<const void*>& tuned, int dtype, int64_t numel);
void linear_combination(void* out, int out_dtype, const std::vector<const void*>& tensors, const std::vector<float>& k,
                        int dtype, int64_t numel);
void stock_blend(void* out, int out_dtype, const void* base, const std::vector<const void*>& tuned, int dtype,
                 int64_t numel, float t);
void model_variance(float* out, const float* stack, int models, int64_t numel);
std::vector<int64_t> ram_counts(const void* base, const std::vector<const void*>& tuned, int dtype, int64_t numel,
                                float eps);
void ram_merge(void* out, int out_dtype, const void* base, const std::vector<const void*>& tuned, int dtype,
               int64_t numel, float eps, const std::vector<float>& unique_scale);
void nearswap(void* out, int out_dtype, const void* a, const void* b, int dtype, int64_t numel, float t);
uint32_t crc32(const void* data, size_t n, uint32_t crc);
std::pair<int64_t, int64_t> sce_select(const void* base, const std::vector<const void*>& tuned, int dtype,
                                       int64_t numel, double topk);
std::vector<double> sce_square_sums(const void* base, const std::vector<const void*>& tuned, int dtype, int64_t numel,
                                    int64_t threshold, int64_t cutoff);
void sce_merge(void* out, int out_dtype, const void* base, const std::vector<const void*>& tuned, int dtype,
               int64_t numel, int64_t threshold, int64_t cutoff, const std::vector<float>& weights);
void della_keep_mask(uint8_t* keep, const float* delta, int64_t rows, int64_t m, double density, double epsilon,
                     uint64_t seed, uint32_t model, int64_t first_row);
void arcee_scores(float* scores, const void* base, const void* tuned, int dtype, int64_t numel, const float* kl,
                  int64_t cols, uint64_t seed, int64_t count);
void arcee_apply(void* out, int out_dtype, const void* base, const void* tuned, int dtype, int64_t numel,
                 const float* kl, int64_t cols, float threshold);
}  // namespace vfuse

static std::vector<const void*> pointers(const std::vector<uintptr_t>& values, size_t least = 2) {
  if (values.size() < least || values.size() > 4)
    throw std::invalid_argument(std::to_string(least) + " to 4 tuned tensors");
  std::vector<const void*> out;
  for (uintptr_t v : values) out.push_back(reinterpret_cast<const void*>(v));
  return out;
}

using vfuse::DeltaInputs;

static DeltaInputs make_inputs(uintptr_t base, int base_dtype, const std::vector<uintptr_t>& tuned,
                               const std::vector<int>& tuned_dtypes, int64_t numel, bool tuned_are_deltas,
                               int sparsify, std::vector<int64_t> keep_a, std::vector<int64_t> keep_b,
                               uint64_t seed) {
  DeltaInputs in;
  in.base = reinterpret_cast<const void*>(base);
  in.base_dtype = base_dtype;
  for (uintptr_t p : tuned) in.tuned.push_back(reinterpret_cast<const void*>(p));
  in.tuned_dtypes = tuned_dtypes;
  in.numel = numel;
  in.tuned_are_deltas = tuned_are_deltas;
  in.sparsify = sparsify;
  in.keep_a = std::move(keep_a);
  in.keep_b = std::move(keep_b);
  in.seed = seed;
  if (in.tuned_dtypes.size() != in.tuned.size()) throw std::invalid_argument("tuned/tuned_dtypes length");
  const size_t per_model = sparsify == vfuse::kBand ? 2 : 1;
  if (sparsify != vfuse::kKeepAll &&
      (in.keep_a.size() != per_model * in.tuned.size() || in.keep_b.size() != per_model * in.tuned.size()))
    throw std::invalid_argument("keep_a/keep_b length");
  return in;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "vfuse_kernels CPU kernels (C++17, OpenMP)";

  m.attr("MERGE_ALIGN") = py::int_(vfuse::kChunk);  // merge's `first`: a multiple of this
  m.def("merge",
        [](uintptr_t out, int out_dtype, uintptr_t base, int base_dtype, std::vector<uintptr_t> tuned,
           std::vector<int> tuned_dtypes, int64_t numel, bool tuned_are_deltas, int sparsify,
           std::vector<int64_t> keep_a, std::vector<int64_t> keep_b, uint64_t seed, std::vector<float> coefs,
           std::vector<float> weights, int elect, bool normalize, float scale, int64_t first, int64_t count) {
          DeltaInputs in = make_inputs(base, base_dtype, tuned, tuned_dtypes, numel, tuned_are_deltas, sparsify,
                                       std::move(keep_a), std::move(keep_b), seed);
          if (count < 0) count = numel - first;
          if (first < 0 || count < 0 || first % vfuse::kChunk != 0 || first + count > numel)
            throw std::invalid_argument("first must be a multiple of " + std::to_string(vfuse::kChunk) +
                                        " and [first, first + count) within the tensors");
          py::gil_scoped_release release;
          vfuse::merge(reinterpret_cast<void*>(out), out_dtype, in, coefs, weights, elect, normalize, scale, first,
                       count);
        },
        py::arg("out"), py::arg("out_dtype"), py::arg("base"), py::arg("base_dtype"), py::arg("tuned"),
        py::arg("tuned_dtypes"), py::arg("numel"), py::arg("tuned_are_deltas"), py::arg("sparsify"),
        py::arg("keep_a"), py::arg("keep_b"), py::arg("seed"), py::arg("coefs"), py::arg("weights"),
        py::arg("elect"), py::arg("normalize"), py::arg("scale"), py::arg("first") = 0, py::arg("count") = -1,
        "Merges elements [first, first + count) of the tensors (count -1: to the end) into out, the address of "
        "output element first; first a multiple of the kernels' chunk (512).");

  m.def("sparse_l1",
        [](uintptr_t base, int base_dtype, std::vector<uintptr_t> tuned, std::vector<int> tuned_dtypes,
           int64_t numel, bool tuned_are_deltas, int sparsify, std::vector<int64_t> keep_a,
           std::vector<int64_t> keep_b, uint64_t seed) {
          DeltaInputs in = make_inputs(base, base_dtype, tuned, tuned_dtypes, numel, tuned_are_deltas, sparsify,
                                       std::move(keep_a), std::move(keep_b), seed);
          py::gil_scoped_release release;
          return vfuse::sparse_l1(in);
        });

  m.def("bracket_pass",
        [](uintptr_t base, int base_dtype, std::vector<uintptr_t> tuned, std::vector<int> tuned_dtypes,
           int64_t numel, bool tuned_are_deltas, std::vector<int64_t> lo, std::vector<int64_t> hi,
           std::vector<int64_t> rate, int64_t cap, int64_t block, uintptr_t counts, uintptr_t cand, uintptr_t fill) {
          DeltaInputs in = make_inputs(base, base_dtype, tuned, tuned_dtypes, numel, tuned_are_deltas,
                                       vfuse::kKeepAll, {}, {}, 0);
          if (lo.size() != in.tuned.size() || hi.size() != in.tuned.size() || rate.size() != in.tuned.size())
            throw std::invalid_argument("lo/hi/rate length");
          if (block <= 0) throw std::invalid_argument("block must be positive");
          py::gil_scoped_release release;
          vfuse::bracket_pass(in, lo.data(), hi.data(), rate.data(), cap, block, reinterpret_cast<int32_t*>(counts),
                              reinterpret_cast<int64_t*>(cand), reinterpret_cast<int64_t*>(fill));
        });

  m.def("sample_keys",
        [](uintptr_t base, int base_dtype, std::vector<uintptr_t> tuned, std::vector<int> tuned_dtypes,
           int64_t numel, bool tuned_are_deltas, uintptr_t runs, int64_t count, int64_t run, uintptr_t keys) {
          DeltaInputs in = make_inputs(base, base_dtype, tuned, tuned_dtypes, numel, tuned_are_deltas,
                                       vfuse::kKeepAll, {}, {}, 0);
          if (count < 0 || run <= 0) throw std::invalid_argument("count must be >= 0 and run positive");
          py::gil_scoped_release release;
          vfuse::sample_keys(in, reinterpret_cast<const int64_t*>(runs), count, run, reinterpret_cast<int32_t*>(keys));
        });

  m.def("tie_index",
        [](uintptr_t base, int base_dtype, uintptr_t tuned, int tuned_dtype, int64_t numel, bool tuned_are_deltas,
           int64_t start, int64_t stop, int64_t key, int64_t rank) {
          DeltaInputs in = make_inputs(base, base_dtype, {tuned}, {tuned_dtype}, numel, tuned_are_deltas,
                                       vfuse::kKeepAll, {}, {}, 0);
          if (start < 0 || stop > numel || key < 0 || key > 0x7fffffff || rank < 1)
            throw std::invalid_argument("tie_index: [start, stop) must lie in the tensor, key in [0, 2^31), rank >= 1");
          py::gil_scoped_release release;
          return vfuse::tie_index(in, 0, start, stop, uint32_t(key), rank);
        });

  m.def("random_bits", [](uint64_t seed, uint32_t model, int64_t numel, uintptr_t out) {
    if (numel < 0) throw std::invalid_argument("numel must be >= 0");
    py::gil_scoped_release release;
    vfuse::random_bits(seed, model, numel, reinterpret_cast<int64_t*>(out));
  });

  m.def("pair_sums", [](uintptr_t a, uintptr_t b, int dtype, int64_t numel) {
    py::gil_scoped_release release;
    return vfuse::pair_sums(reinterpret_cast<const void*>(a), reinterpret_cast<const void*>(b), dtype, numel);
  });

  m.def("slerp_coefficients", [](std::array<double, 3> sums, float t) { return vfuse::slerp_coefficients(sums, t); });

  m.def("pair_combine", [](uintptr_t out, int out_dtype, uintptr_t a, uintptr_t b, int dtype, int64_t numel, float ca,
                           float cb) {
    py::gil_scoped_release release;
    vfuse::pair_combine(reinterpret_cast<void*>(out), out_dtype, reinterpret_cast<const void*>(a),
                        reinterpret_cast<const void*>(b), dtype, numel, ca, cb);
  });

  m.def("offset_gram", [](uintptr_t base, std::vector<uintptr_t> tuned, int dtype, int64_t numel) {
    std::vector<const void*> ptrs = pointers(tuned);
    py::gil_scoped_release release;
    return vfuse::offset_gram(reinterpret_cast<const void*>(base), ptrs, dtype, numel);
  });

  m.def("linear_combination", [](uintptr_t out, int out_dtype, std::vector<uintptr_t> tensors, std::vector<float> k,
                                 int dtype, int64_t numel) {
    std::vector<const void*> ptrs = pointers(tensors);
    if (k.size() != ptrs.size()) throw std::invalid_argument("one coefficient per tensor");
    py::gil_scoped_release release;
    vfuse::linear_combination(reinterpret_cast<void*>(out), out_dtype, ptrs, k, dtype, numel);
  });

  m.def("stock_blend", [](uintptr_t out, int out_dtype, uintptr_t base, std::vector<uintptr_t> tuned, int dtype,
                          int64_t numel, float t) {
    std::vector<const void*> ptrs = pointers(tuned);
    py::gil_scoped_release release;
    vfuse::stock_blend(reinterpret_cast<void*>(out), out_dtype, reinterpret_cast<const void*>(base), ptrs, dtype, numel,
                       t);
  });

  m.def("ram_counts", [](uintptr_t base, std::vector<uintptr_t> tuned, int dtype, int64_t numel, float eps) {
    std::vector<const void*> ptrs = pointers(tuned, 1);
    py::gil_scoped_release release;
    return vfuse::ram_counts(reinterpret_cast<const void*>(base), ptrs, dtype, numel, eps);
  });

  m.def("ram_merge", [](uintptr_t out, int out_dtype, uintptr_t base, std::vector<uintptr_t> tuned, int dtype,
                        int64_t numel, float eps, std::vector<float> unique_scale) {
    std::vector<const void*> ptrs = pointers(tuned, 1);
    if (unique_scale.size() != tuned.size()) throw std::invalid_argument("one scale per tuned tensor");
    py::gil_scoped_release release;
    vfuse::ram_merge(reinterpret_cast<void*>(out), out_dtype, reinterpret_cast<const void*>(base), ptrs, dtype, numel,
                     eps, unique_scale);
  });

  m.def("nearswap", [](uintptr_t out, int out_dtype, uintptr_t a, uintptr_t b, int dtype, int64_t numel, float t) {
    py::gil_scoped_release release;
    vfuse::nearswap(reinterpret_cast<void*>(out), out_dtype, reinterpret_cast<const void*>(a),
                    reinterpret_cast<const void*>(b), dtype, numel, t);
  });

  m.def("sce_select", [](uintptr_t base, std::vector<uintptr_t> tuned, int dtype, int64_t numel, double topk) {
    std::vector<const void*> ptrs = pointers(tuned, 1);
    py::gil_scoped_release release;
    return vfuse::sce_select(reinterpret_cast<const void*>(base), ptrs, dtype, numel, topk);
  });
  m.def("sce_square_sums", [](uintptr_t base, std::vector<uintptr_t> tuned, int dtype, int64_t numel,
                              int64_t threshold, int64_t cutoff) {
    std::vector<const void*> ptrs = pointers(tuned, 1);
    py::gil_scoped_release release;
    return vfuse::sce_square_sums(reinterpret_cast<const void*>(base), ptrs, dtype, numel, threshold, cutoff);
  });
  m.def("sce_merge", [](uintptr_t out, int out_dtype, uintptr_t base, std::vector<uintptr_t> tuned, int dtype,
                        int64_t numel, int64_t threshold, int64_t cutoff, std::vector<float> weights) {
    std::vector<const void*> ptrs = pointers(tuned, 1);
    if (weights.size() != tuned.size()) throw std::invalid_argument("one weight per tuned tensor");
    py::gil_scoped_release release;
    vfuse::sce_merge(reinterpret_cast<void*>(out), out_dtype, reinterpret_cast<const void*>(base), ptrs, dtype, numel,
                     threshold, cutoff, weights);
  });

  m.def("model_variance", [](uintptr_t out, uintptr_t stack, int models, int64_t numel) {
    if (models < 1 || numel < 0) throw std::invalid_argument("models >= 1 and numel >= 0");
    py::gil_scoped_release release;
    vfuse::model_variance(reinterpret_cast<float*>(out), reinterpret_cast<const float*>(stack), models, numel);
  });
  m.def("arcee_scores", [](uintptr_t scores, uintptr_t base, uintptr_t tuned, int dtype, int64_t numel, uintptr_t kl,
                           int64_t cols, uint64_t seed, int64_t count) {
    if (numel < 1 || cols < 1 || numel % cols || count < 0 || count > numel)
      throw std::invalid_argument("numel >= 1 a multiple of cols >= 1, 0 <= count <= numel");
    py::gil_scoped_release release;
    vfuse::arcee_scores(reinterpret_cast<float*>(scores), reinterpret_cast<const void*>(base),
                        reinterpret_cast<const void*>(tuned), dtype, numel, reinterpret_cast<const float*>(kl), cols,
                        seed, count);
  });

  m.def("arcee_apply", [](uintptr_t out, int out_dtype, uintptr_t base, uintptr_t tuned, int dtype, int64_t numel,
                          uintptr_t kl, int64_t cols, float threshold) {
    if (numel < 0 || cols < 1 || numel % cols) throw std::invalid_argument("numel >= 0 a multiple of cols >= 1");
    py::gil_scoped_release release;
    vfuse::arcee_apply(reinterpret_cast<void*>(out), out_dtype, reinterpret_cast<const void*>(base),
                       reinterpret_cast<const void*>(tuned), dtype, numel, reinterpret_cast<const float*>(kl), cols,
                       threshold);
  });

  m.def("della_keep_mask", [](uintptr_t keep, uintptr_t delta, int64_t rows, int64_t m, double density,
                              double epsilon, uint64_t seed, uint32_t model, int64_t first_row) {
    if (rows < 0 || m < 2 || m > (int64_t(1) << 32) || first_row < 0)
      throw std::invalid_argument("rows >= 0, 2 <= m <= 2^32 and first_row >= 0");
    py::gil_scoped_release release;
    vfuse::della_keep_mask(reinterpret_cast<uint8_t*>(keep), reinterpret_cast<const float*>(delta), rows, m, density,
                           epsilon, seed, model, first_row);
  });
  m.def("crc32", [](py::buffer data, uint32_t crc) {
    py::buffer_info info = data.request();
    if (info.ndim > 1 || (info.ndim == 1 && info.strides[0] != info.itemsize))
      throw std::invalid_argument("crc32 needs contiguous bytes");
    const size_t n = size_t(info.size) * size_t(info.itemsize);
    py::gil_scoped_release release;
    return vfuse::crc32(info.ptr, n, crc);
  }, "zlib.crc32(data, crc): the same value, folded with PCLMULQDQ where the CPU has it");
  m.def("set_num_threads", [](int n) { omp_set_num_threads(n); });
  m.def("get_num_threads", []() { return omp_get_max_threads(); });
#ifdef _OPENMP
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif
}
