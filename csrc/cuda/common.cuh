// Shared helpers of the CUDA kernels (csrc/cuda/*.cu).
//
// Every op runs on the current stream of its inputs' device (a CUDAGuard sets
// the device; ATen ops pick up the current stream), and every kernel launch is
// followed by C10_CUDA_KERNEL_LAUNCH_CHECK().  Error checks that need device
// results copy a few flags to the host (one synchronisation) and then raise the
// same exceptions, with the same messages, as the CPU kernels.
#pragma once

#include <cstdint>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "../checks.h"
#include "../coords.h"
#include "../hash_table_common.h"

namespace sparseconv {
namespace cuda {

constexpr int kThreads = 256;

inline unsigned int num_blocks(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(b < 1 ? 1 : (b > 65535 * 32 ? 65535 * 32 : b));
}

// Grid-stride loop over [0, n) in int64.
#define SPARSECONV_CUDA_LOOP(i, n)                                                                     \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n);            \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

// The CUDA kernels compute in float32, float64, float16 and bfloat16 (the last two accumulate in
// float32).
inline void check_cuda_dtype(const at::Tensor& feats, const char* op) {
  const auto t = feats.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, "sparseconv.", op,
                   ": the CUDA kernels support float32, float64, float16 and bfloat16 features, got ", t);
}

// Accumulation dtype of a feature dtype: float64 for float64, float32 otherwise.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// True when some entry of the int32 map is neither -1 nor a row below n (one synchronisation).
inline bool map_has_bad_entries(const at::Tensor& nbmap, int64_t n) {
  if (nbmap.numel() == 0) return false;
  return ((nbmap < -1) | (nbmap >= n)).any().item<bool>();
}

inline void check_map_entries(const at::Tensor& nbmap, int64_t n, const char* op) {
  TORCH_CHECK_VALUE(!map_has_bad_entries(nbmap, n), "sparseconv.", op,
                    ": kernel map entries must be -1 or row indices below ", n,
                    "; the map does not belong to these features");
}

// out.index_put_({index}, values, accumulate): on CUDA an accumulating index_put_ sorts the indices
// (stably) and adds duplicates in that order, so the result is deterministic.
inline void index_put_accumulate(at::Tensor& out, const at::Tensor& index, const at::Tensor& values) {
  c10::List<std::optional<at::Tensor>> indices;
  indices.push_back(index);
  out.index_put_(indices, values, /*accumulate=*/true);
}

// out.index_put_({index}, values) for distinct indices (a plain indexed write).
inline void index_put_distinct(at::Tensor& out, const at::Tensor& index, const at::Tensor& values) {
  c10::List<std::optional<at::Tensor>> indices;
  indices.push_back(index);
  out.index_put_(indices, values, /*accumulate=*/false);
}

// ------------------------------------------------------------------ the coordinate hash table
//
// The same table as the CPU's (csrc/cpu/hash_table.h): capacity rule, splitmix64 finaliser and
// linear probing, so a table built on either device answers queries on either device.

using sparseconv::mix64;
using sparseconv::table_capacity;
using sparseconv::table_find;

}  // namespace cuda
}  // namespace sparseconv
