// Multi-head self-attention within groups of rows, with the qkv and output
// projections fused in: SparseWindowAttention (sparseconv/nn/attention.py)
// without padding and without an [N, 3C] qkv tensor.
//
// window_attention(x [N, C_in], weight [3C, C_in], bias [3C] or None, proj_weight [C_out, C],
//                  proj_bias [C_out] or None, offsets [G + 1] int64, index [N] int64 or None, heads, scale)
//     -> (y [N, C_out], out [N, C], lse [N, heads])
//   qkv = x @ weight^T + bias (rows [q | k | v], each C = heads * d wide; head h is columns
//   h * d .. (h + 1) * d - 1 of each part), computed group by group.  Group g is rows
//   index[offsets[g]] .. index[offsets[g + 1] - 1] (rows offsets[g] .. offsets[g + 1] - 1 when index
//   is None); index must be a permutation of [0, N), so the groups partition the rows; offsets[0] = 0,
//   non-decreasing, offsets[G] = N; empty groups are allowed.  For each group, head and row i:
//     out[i, head h] = sum_j softmax_j(scale * q_i . k_j) v_j      over the rows j of the group
//     lse[i, h]      = log sum_j exp(scale * q_i . k_j)            (kept for the backward)
//     y[i]           = out[i] @ proj_weight^T + proj_bias
//   y, out and lse rows match x rows (out is returned for the output projection's gradients).  Rows never see another group; cost O(N * C_in * 3C + sum over
//   groups of n_g^2 * C).  NaN/inf propagate.  Results do not depend on the thread count (each row
//   is computed by one thread, in a fixed order).
//
// window_attention_backward(grad_out [N, C], x, weight, bias, out, lse, offsets, index, heads, scale)
//     -> grad_qkv [N, 3C]
//   The gradient of out with respect to qkv (qkv recomputed group by group, p_ij from lse); the
//   gradients of x, weight and bias follow from it, and grad_out from the gradient of y, by the
//   projections' chain rule (sparseconv/ops.py).
//
// CPU: float32 (vectorized for AVX-512 / AVX2 / portable C++, as cpu_isa(); the projection runs the
// convolution's gemm_rows micro-kernel) and float64.  CUDA: registered from Python (sparseconv/ops.py:
// the projection, then groups padded to powers of two and batched products).
// Errors (ValueError): x not 2-D, weight not [3C, C_in] with C divisible by heads, bias not [3C],
// proj_weight not [C_out, C], proj_bias not [C_out],
// heads < 1, offsets not 1-D int64 starting at 0, non-decreasing and ending at N, index not an int64
// permutation of [0, N), dtypes or shapes of grad_out / out / lse that do not match, devices differ;
// TypeError: dtype not float32/float64 on the CPU.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace sparseconv {

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& proj_weight,
    const c10::optional<at::Tensor>& proj_bias, const at::Tensor& offsets, const c10::optional<at::Tensor>& index,
    int64_t heads, double scale);
at::Tensor window_attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                         const c10::optional<at::Tensor>& bias, const at::Tensor& out,
                                         const at::Tensor& lse, const at::Tensor& offsets,
                                         const c10::optional<at::Tensor>& index, int64_t heads, double scale);

}  // namespace sparseconv
