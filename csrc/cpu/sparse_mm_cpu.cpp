#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../sparse_mm.h"
#include "gemm_rows.h"

namespace sparseconv {

at::Tensor sparse_rows_mm_cpu(const at::Tensor& a_in, const at::Tensor& b_in) {
  check_sparse_rows_mm(a_in, b_in);
  if (a_in.scalar_type() != at::kFloat) return at::mm(a_in, b_in);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  at::Tensor out = at::empty({m, n}, a.options());
  if (m == 0 || n == 0) return out;
  const cpu::SparseRowsFn fn = cpu::sparse_rows_f32();
  const float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, m, 256, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> idx(k + cpu::kSparseIdxSlack);
    fn(end - begin, n, k, ap + begin * k, k, bp, n, op + begin * n, n, idx.data());
  });
  return out;
}

TORCH_LIBRARY_IMPL(sparseconv, CPU, m) { m.impl("sparse_rows_mm", &sparse_rows_mm_cpu); }

}  // namespace sparseconv
