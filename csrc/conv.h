// Sparse convolution by gather -> GEMM -> scatter-add over a kernel map.
//
// weight is [K, C_in, C_out]; offset k uses weight[k] (kernel_map.h fixes the
// offset order).  nbmap is [M, K] int32 (kernel_map.h).
//
// conv_forward(feats, weight, nbmap, num_out, transposed) -> out
//   transposed = false: feats [N_in, C_in] are indexed by nbmap entries,
//     out [M, C_out] with out[o] = sum_k feats[nbmap[o, k]] @ weight[k];
//     num_out must equal M.
//   transposed = true: the map is read backwards: feats [M, C_in],
//     out [num_out, C_out] with out[nbmap[o, k]] += feats[o] @ weight[k].
//     This is the input-gradient of the forward map and the inverse conv.
// conv_input_grad(grad_out, weight, nbmap, num_in, transposed) -> grad_feats
//   = conv_forward(grad_out, weight^T, nbmap, num_in, !transposed).
// conv_weight_grad(feats, grad_out, nbmap, transposed) -> grad_weight [K, C_in, C_out]
//   grad_weight[k] = sum over pairs (i -> o) of offset k of feats[i]^T grad_out[o].
//
// Float32 and float64 (float64 for gradcheck).  Index arithmetic is int64.
// Parallel over rows for each offset; results do not depend on thread count.
#pragma once

#include <ATen/core/Tensor.h>

namespace sparseconv {

at::Tensor conv_forward_cpu(const at::Tensor& feats, const at::Tensor& weight, const at::Tensor& nbmap,
                            int64_t num_out, bool transposed);
at::Tensor conv_input_grad_cpu(const at::Tensor& grad_out, const at::Tensor& weight, const at::Tensor& nbmap,
                               int64_t num_in, bool transposed);
at::Tensor conv_weight_grad_cpu(const at::Tensor& feats, const at::Tensor& grad_out, const at::Tensor& nbmap,
                                bool transposed);

}  // namespace sparseconv
