// CUDA convolution (contract: csrc/conv.h): per kernel offset, gather -> at::mm -> scatter-add,
// with the (source row, destination row) pairs of every offset compacted from the map on the
// device.  Offsets are accumulated in order k = 0..K-1 into a float32 buffer (float64 for
// float64 features) that is cast to the feature dtype at the end, so float16/bfloat16 sum in
// float32.  Within one offset the destination rows are distinct (kernel_map.h); the scatter is
// index_put_(accumulate=true), which on CUDA sorts the indices and adds in a fixed order, so the
// result is deterministic.
#include <vector>

#include <torch/library.h>

#include "../conv.h"
#include "common.cuh"

namespace sparseconv {
namespace cuda {

namespace {


// Per-offset pairs of a map [M, K]: for offset k, src/dst = pairs.src/dst[start[k] : start[k + 1]]
// (int64, in ascending map row order).  transposed = false: src = nbmap[o, k] (input), dst = o;
// transposed = true: the roles swap.  Entries must already be validated.
struct DevicePairs {
  at::Tensor src, dst;
  std::vector<int64_t> start;  // [K + 1], on the host
};

DevicePairs make_pairs(const at::Tensor& nbmap, bool transposed) {
  const int64_t kvol = nbmap.size(1);
  DevicePairs p;
  p.start.assign(kvol + 1, 0);
  const at::Tensor active = nbmap.t() >= 0;  // [K, M]
  const at::Tensor nz = active.nonzero();    // [P, 2] (k, o), row-major: grouped by k, o ascending
  const at::Tensor counts = active.sum(1).cpu();
  const int64_t* cp = counts.data_ptr<int64_t>();
  for (int64_t k = 0; k < kvol; ++k) p.start[k + 1] = p.start[k] + cp[k];
  const at::Tensor k_idx = nz.select(1, 0), o_idx = nz.select(1, 1);
  const at::Tensor entry = nbmap.index({o_idx, k_idx}).to(at::kLong);
  p.src = transposed ? o_idx.contiguous() : entry;
  p.dst = transposed ? entry : o_idx.contiguous();
  return p;
}

at::Tensor conv_forward_impl(const at::Tensor& feats_in, const at::Tensor& weight_in, const at::Tensor& nbmap_in,
                             int64_t num_out, bool transposed, const char* op) {
  check_conv_args(op, feats_in, weight_in, nbmap_in);
  check_cuda_dtype(feats_in, op);
  const int64_t m = nbmap_in.size(0), kvol = nbmap_in.size(1);
  const int64_t n_src = feats_in.size(0);
  if (transposed) {
    TORCH_CHECK_VALUE(n_src == m, "sparseconv.", op, ": the kernel map has ", m, " rows but the features have ",
                      n_src);
    TORCH_CHECK_VALUE(num_out >= 0, "sparseconv.", op, ": the output row count must be >= 0, got ", num_out);
  } else {
    TORCH_CHECK_VALUE(num_out == m, "sparseconv.", op, ": the output row count is ", num_out,
                      " but the kernel map has ", m, " rows");
  }
  const c10::cuda::CUDAGuard guard(feats_in.device());
  const at::Tensor feats = feats_in.contiguous(), nbmap = nbmap_in.contiguous(), weight = weight_in.contiguous();
  const int64_t cout = weight.size(2);
  const at::ScalarType acc_t = acc_dtype(feats.scalar_type());
  if (m == 0 || num_out == 0 || cout == 0) return at::zeros({num_out, cout}, feats.options());
  check_map_entries(nbmap, transposed ? num_out : n_src, op);
  if (transposed) {
    // As the CPU: a row repeated within one offset of a transposed map is a corrupt map.
    const at::Tensor active = nbmap >= 0;
    const at::Tensor cell = at::where(active, nbmap.to(at::kLong) * kvol + at::arange(kvol, nbmap.options().dtype(at::kLong)),
                                      at::zeros({}, nbmap.options().dtype(at::kLong)));
    at::Tensor hits = at::zeros({num_out * kvol}, nbmap.options());
    index_put_accumulate(hits, cell.masked_select(active), at::ones({}, nbmap.options()));
    TORCH_CHECK_VALUE(!(hits > 1).any().item<bool>(), "sparseconv.", op,
                      ": the kernel map repeats a row within one kernel offset, which no convolution produces; "
                      "the map is corrupt");
  }
  const DevicePairs pairs = make_pairs(nbmap, transposed);
  at::Tensor acc = at::zeros({num_out, cout}, feats.options().dtype(acc_t));
  for (int64_t k = 0; k < kvol; ++k) {
    const int64_t nk = pairs.start[k + 1] - pairs.start[k];
    if (nk == 0) continue;
    const at::Tensor src = pairs.src.narrow(0, pairs.start[k], nk);
    const at::Tensor dst = pairs.dst.narrow(0, pairs.start[k], nk);
    const at::Tensor prod = at::mm(feats.index_select(0, src), weight[k]);  // [nk, C_out], cuBLAS
    index_put_accumulate(acc, dst, prod.to(acc_t));
  }
  return acc.scalar_type() == feats.scalar_type() ? acc : acc.to(feats.scalar_type());
}

}  // namespace

at::Tensor conv_forward_cuda(const at::Tensor& feats, const at::Tensor& weight, const at::Tensor& nbmap,
                             int64_t num_out, bool transposed) {
  return conv_forward_impl(feats, weight, nbmap, num_out, transposed, "conv_forward");
}

at::Tensor conv_input_grad_cuda(const at::Tensor& grad_out, const at::Tensor& weight, const at::Tensor& nbmap,
                                int64_t num_in, bool transposed) {
  TORCH_CHECK_VALUE(weight.dim() == 3, "sparseconv.conv_input_grad: weight must be [K, C_in, C_out], got shape ",
                    weight.sizes());
  return conv_forward_impl(grad_out, weight.transpose(1, 2), nbmap, num_in, !transposed, "conv_input_grad");
}

at::Tensor conv_weight_grad_cuda(const at::Tensor& feats_in, const at::Tensor& grad_in, const at::Tensor& nbmap_in,
                                 bool transposed) {
  const char* op = "conv_weight_grad";
  check_weight_grad_args(op, feats_in, grad_in, nbmap_in, transposed);
  check_cuda_dtype(feats_in, op);
  const int64_t m = nbmap_in.size(0), kvol = nbmap_in.size(1);
  const c10::cuda::CUDAGuard guard(feats_in.device());
  const at::Tensor feats = feats_in.contiguous(), grad = grad_in.contiguous(), nbmap = nbmap_in.contiguous();
  const int64_t cin = feats.size(1), cout = grad.size(1);
  at::Tensor gw = at::zeros({kvol, cin, cout}, feats.options());
  if (m == 0) return gw;
  const int64_t n_feat = feats.size(0), n_grad = grad.size(0);
  check_map_entries(nbmap, transposed ? n_grad : n_feat, op);
  const DevicePairs pairs = make_pairs(nbmap, transposed);
  for (int64_t k = 0; k < kvol; ++k) {
    const int64_t nk = pairs.start[k + 1] - pairs.start[k];
    if (nk == 0) continue;
    const at::Tensor src = pairs.src.narrow(0, pairs.start[k], nk);
    const at::Tensor dst = pairs.dst.narrow(0, pairs.start[k], nk);
    // cuBLAS accumulates float16/bfloat16 products in float32.
    gw[k].copy_(at::mm(feats.index_select(0, src).t(), grad.index_select(0, dst)));
  }
  return gw;
}

TORCH_LIBRARY_IMPL(sparseconv, CUDA, m) {
  m.impl("conv_forward", &conv_forward_cuda);
  m.impl("conv_input_grad", &conv_input_grad_cuda);
  m.impl("conv_weight_grad", &conv_weight_grad_cuda);
}

}  // namespace cuda
}  // namespace sparseconv
