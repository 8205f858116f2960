// Sparse pooling over a kernel map (kernel_map.h), per channel.
//
// maxpool_forward(feats [N, C], nbmap [M, K]) -> (out [M, C], argmax [M, C] int64)
//   out[o, c] = max over the active inputs of o (entries of nbmap[o] >= 0);
//   argmax holds the input row that won (the first in offset order on ties),
//   -1 (and out = 0) for an output with no active input.
// maxpool_backward(grad_out [M, C], argmax [M, C], num_in) -> grad_feats [num_in, C]
//
// avgpool_forward(feats [N, C], nbmap [M, K], count_inactive) -> out [M, C]
//   out[o] = sum of the active inputs of o divided by their number
//   (count_inactive = false, spconv / MinkowskiEngine semantics) or by K
//   (count_inactive = true, dense avg_pool3d with count_include_pad=True).
// avgpool_backward(grad_out [M, C], nbmap, num_in, count_inactive) -> grad_feats [num_in, C]
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace sparseconv {

std::tuple<at::Tensor, at::Tensor> maxpool_forward_cpu(const at::Tensor& feats, const at::Tensor& nbmap);
at::Tensor maxpool_backward_cpu(const at::Tensor& grad_out, const at::Tensor& argmax, int64_t num_in);
at::Tensor avgpool_forward_cpu(const at::Tensor& feats, const at::Tensor& nbmap, bool count_inactive);
at::Tensor avgpool_backward_cpu(const at::Tensor& grad_out, const at::Tensor& nbmap, int64_t num_in,
                                bool count_inactive);

}  // namespace sparseconv
