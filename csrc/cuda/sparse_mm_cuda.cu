// sparse_rows_mm on CUDA (sparse_mm.h): a @ b with cuBLAS through at::mm; the zero-skipping kernel is
// CPU-only for now.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../sparse_mm.h"
#include "common.cuh"

namespace sparseconv {
namespace cuda {

at::Tensor sparse_rows_mm_cuda(const at::Tensor& a, const at::Tensor& b) {
  check_sparse_rows_mm(a, b);
  const c10::cuda::CUDAGuard guard(a.device());
  return at::mm(a, b);
}

TORCH_LIBRARY_IMPL(sparseconv, CUDA, m) { m.impl("sparse_rows_mm", &sparse_rows_mm_cuda); }

}  // namespace cuda
}  // namespace sparseconv
