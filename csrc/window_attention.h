// Multi-head self-attention within variable-size groups of rows: the core of
// SparseWindowAttention (sparseconv/nn/attention.py), without padding.
//
// window_attention(qkv [N, 3C], offsets [G + 1] int64, index [N] int64 or None, heads, scale)
//     -> (out [N, C], lse [N, heads])
//   Group g is rows index[offsets[g]] .. index[offsets[g + 1] - 1] of qkv (rows offsets[g] ..
//   offsets[g + 1] - 1 when index is None); index must be a permutation of [0, N), so the groups
//   partition the rows and the kernel gathers them itself (no sorted copy of qkv); offsets[0] = 0,
//   non-decreasing, offsets[G] = N; empty groups are allowed.  out and lse rows match qkv rows.
//   Row r of qkv is [q | k | v], each C = heads * d wide; head h is columns h * d .. (h + 1) * d - 1
//   of each part.  For each group, head and row i of the group:
//     out[i, head h] = sum_j softmax_j(scale * q_i . k_j) v_j      over the rows j of the group
//     lse[i, h]      = log sum_j exp(scale * q_i . k_j)            (kept for the backward)
//   Rows never see another group; cost O(sum over groups of n_g^2 * C).  NaN/inf propagate.
//   Results do not depend on the thread count (each row is computed by one thread, in a fixed order).
//
// window_attention_backward(grad_out [N, C], qkv, out, lse, offsets, index, heads, scale) -> grad_qkv [N, 3C]
//   The gradient of out with respect to qkv (out and lse from the forward); p_ij is recomputed from lse.
//
// CPU: float32 (vectorized for AVX-512 / AVX2 / portable C++, as cpu_isa()) and float64.  CUDA:
// registered from Python (sparseconv/ops.py: groups padded to powers of two, batched products).
// Errors (ValueError): qkv not [N, 3C] with C divisible by heads, heads < 1, offsets not 1-D int64
// starting at 0, non-decreasing and ending at N, index not an int64 permutation of [0, N), shapes of
// grad_out / out / lse that do not match, devices differ; TypeError: dtype not float32/float64 on the CPU.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace sparseconv {

std::tuple<at::Tensor, at::Tensor> window_attention_cpu(const at::Tensor& qkv, const at::Tensor& offsets,
                                                        const c10::optional<at::Tensor>& index, int64_t heads,
                                                        double scale);
at::Tensor window_attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out,
                                         const at::Tensor& lse, const at::Tensor& offsets,
                                         const c10::optional<at::Tensor>& index, int64_t heads, double scale);

}  // namespace sparseconv
