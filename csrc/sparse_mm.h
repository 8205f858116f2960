// Row-sparse matrix product: the second projection of an activation-sparse FFN.
//
// sparse_rows_mm(a [N, K], b [K, M]) -> out [N, M] = a @ b
//   a is dense in memory but mostly zeros (ReLU / top-k hidden activations);
//   the CPU kernel finds each row's non-zero entries (a vector compare per 16
//   or 8 values) and accumulates only those rows of b, so the work scales
//   with the number of non-zeros.  Entries equal to zero (+0 or -0) are
//   skipped; NaN and inf are non-zero and propagate as in a @ b.  Sums run
//   over k in increasing order, so results do not depend on the thread count
//   (they can differ from at::mm in float32 rounding).
//   float32 on the CPU takes the sparse kernel; other floating dtypes and the
//   CUDA backend compute a @ b with at::mm.
//   Errors (ValueError): a or b not 2-D, inner sizes differ, dtypes differ,
//   devices differ; TypeError: not floating point.
#pragma once

#include <ATen/core/Tensor.h>

namespace sparseconv {

at::Tensor sparse_rows_mm_cpu(const at::Tensor& a, const at::Tensor& b);

}  // namespace sparseconv
