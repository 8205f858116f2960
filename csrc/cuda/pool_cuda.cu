// CUDA sparse pooling (contract: csrc/pool.h), mirroring csrc/cpu/pool_cpu.cpp:
//   maxpool_forward / avgpool_forward: one thread per (output row, channel) walks the offsets in
//     order k = 0..K-1 (same ties, NaN rule and summation order as the CPU);
//   avgpool_backward: one launch per offset, scattering without atomics (within a column the
//     input rows are distinct, kernel_map.h), offsets in order as the CPU;
//   maxpool_backward: accumulating index_put_ (sorted, deterministic).
// float16/bfloat16 are computed in float32.
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../pool.h"
#include "common.cuh"

namespace sparseconv {
namespace cuda {

namespace {

void check_pool_args(const char* op, const at::Tensor& feats, const at::Tensor& nbmap) {
  check_feats(feats, op, "feats");
  check_cuda_dtype(feats, op);
  check_nbmap(nbmap, op);
  check_same_device(feats, nbmap, op, "feats", "nbmap");
}

template <typename scalar_t>
__global__ void maxpool_forward_kernel(const scalar_t* __restrict__ f, const int32_t* __restrict__ map, int64_t m,
                                       int64_t kvol, int64_t c, scalar_t* __restrict__ out,
                                       int64_t* __restrict__ arg) {
  using acc_t = at::opmath_type<scalar_t>;
  SPARSECONV_CUDA_LOOP(t, m * c) {
    const int64_t o = t / c, ch = t - o * c;
    acc_t best = acc_t(0);
    int64_t best_i = -1;
    for (int64_t k = 0; k < kvol; ++k) {
      const int64_t i = map[o * kvol + k];
      if (i < 0) continue;
      const acc_t v = static_cast<acc_t>(f[i * c + ch]);
      // NaN propagates like torch.max_pool3d: a NaN input wins and stays.
      if (best_i < 0 || v > best || (v != v && best == best)) {
        best = v;
        best_i = i;
      }
    }
    out[t] = static_cast<scalar_t>(best);
    arg[t] = best_i;
  }
}

// inv[o] = 1 / (K, or the number of active inputs of o, at least 1).
template <typename acc_t>
__global__ void avg_inverse_kernel(const int32_t* __restrict__ map, int64_t m, int64_t kvol, bool count_inactive,
                                   acc_t* __restrict__ inv) {
  SPARSECONV_CUDA_LOOP(o, m) {
    int64_t n = kvol;
    if (!count_inactive) {
      n = 0;
      for (int64_t k = 0; k < kvol; ++k) n += map[o * kvol + k] >= 0;
      if (n == 0) n = 1;
    }
    inv[o] = acc_t(1) / static_cast<acc_t>(n);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void avgpool_forward_kernel(const scalar_t* __restrict__ f, const int32_t* __restrict__ map, int64_t m,
                                       int64_t kvol, int64_t c, const acc_t* __restrict__ inv,
                                       scalar_t* __restrict__ out) {
  SPARSECONV_CUDA_LOOP(t, m * c) {
    const int64_t o = t / c, ch = t - o * c;
    acc_t sum = acc_t(0);
    for (int64_t k = 0; k < kvol; ++k) {
      const int64_t i = map[o * kvol + k];
      if (i >= 0) sum += static_cast<acc_t>(f[i * c + ch]);
    }
    out[t] = static_cast<scalar_t>(sum * inv[o]);
  }
}

// Offset k: grad_in[map[o, k]] += grad_out[o] * inv[o]; the rows map[., k] are distinct.
template <typename scalar_t, typename acc_t>
__global__ void avgpool_backward_offset_kernel(const scalar_t* __restrict__ g, const int32_t* __restrict__ map,
                                               int64_t m, int64_t kvol, int64_t k, int64_t c,
                                               const acc_t* __restrict__ inv, acc_t* __restrict__ gi) {
  SPARSECONV_CUDA_LOOP(t, m * c) {
    const int64_t o = t / c, ch = t - o * c;
    const int64_t i = map[o * kvol + k];
    if (i >= 0) gi[i * c + ch] += static_cast<acc_t>(g[t]) * inv[o];
  }
}

at::Tensor avg_inverse(const at::Tensor& nbmap, bool count_inactive, at::ScalarType acc) {
  const int64_t m = nbmap.size(0), kvol = nbmap.size(1);
  at::Tensor inv = at::empty({m}, nbmap.options().dtype(acc));
  if (m == 0) return inv;
  AT_DISPATCH_FLOATING_TYPES(acc, "sparseconv_avg_inverse", [&] {
    avg_inverse_kernel<scalar_t><<<num_blocks(m), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        nbmap.data_ptr<int32_t>(), m, kvol, count_inactive, inv.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return inv;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> maxpool_forward_cuda(const at::Tensor& feats_in, const at::Tensor& nbmap_in) {
  check_pool_args("maxpool_forward", feats_in, nbmap_in);
  const c10::cuda::CUDAGuard guard(feats_in.device());
  const at::Tensor feats = feats_in.contiguous(), nbmap = nbmap_in.contiguous();
  const int64_t m = nbmap.size(0), kvol = nbmap.size(1), c = feats.size(1);
  check_map_entries(nbmap, feats.size(0), "maxpool_forward");
  at::Tensor out = at::zeros({m, c}, feats.options());
  at::Tensor arg = at::full({m, c}, -1, feats.options().dtype(at::kLong));
  if (m * c == 0) return {out, arg};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "sparseconv_maxpool_forward", [&] {
    maxpool_forward_kernel<scalar_t><<<num_blocks(m * c), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        feats.data_ptr<scalar_t>(), nbmap.data_ptr<int32_t>(), m, kvol, c, out.data_ptr<scalar_t>(),
        arg.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, arg};
}

at::Tensor maxpool_backward_cuda(const at::Tensor& grad_in, const at::Tensor& argmax_in, int64_t num_in) {
  const char* op = "maxpool_backward";
  check_feats(grad_in, op, "grad_out");
  check_cuda_dtype(grad_in, op);
  check_maxpool_backward_args(grad_in, argmax_in, num_in);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous(), argmax = argmax_in.contiguous();
  const int64_t c = grad.size(1);
  if (argmax.numel() > 0) {
    TORCH_CHECK_VALUE(!((argmax < -1) | (argmax >= num_in)).any().item<bool>(), "sparseconv.", op,
                      ": argmax entries must be -1 or below num_in = ", num_in);
  }
  const at::ScalarType acc = acc_dtype(grad.scalar_type());
  at::Tensor gi = at::zeros({num_in * c}, grad.options().dtype(acc));
  if (argmax.numel() > 0 && num_in > 0) {
    const at::Tensor active = argmax >= 0;
    const at::Tensor flat = argmax * c + at::arange(c, argmax.options());
    index_put_accumulate(gi, flat.masked_select(active), grad.to(acc).masked_select(active));
  }
  gi = gi.view({num_in, c});
  return acc == grad.scalar_type() ? gi : gi.to(grad.scalar_type());
}

at::Tensor avgpool_forward_cuda(const at::Tensor& feats_in, const at::Tensor& nbmap_in, bool count_inactive) {
  check_pool_args("avgpool_forward", feats_in, nbmap_in);
  const c10::cuda::CUDAGuard guard(feats_in.device());
  const at::Tensor feats = feats_in.contiguous(), nbmap = nbmap_in.contiguous();
  const int64_t m = nbmap.size(0), kvol = nbmap.size(1), c = feats.size(1);
  check_map_entries(nbmap, feats.size(0), "avgpool_forward");
  at::Tensor out = at::zeros({m, c}, feats.options());
  if (m * c == 0) return out;
  const at::ScalarType acc = acc_dtype(feats.scalar_type());
  const at::Tensor inv = avg_inverse(nbmap, count_inactive, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "sparseconv_avgpool_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    avgpool_forward_kernel<scalar_t, acc_t><<<num_blocks(m * c), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        feats.data_ptr<scalar_t>(), nbmap.data_ptr<int32_t>(), m, kvol, c, inv.data_ptr<acc_t>(),
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor avgpool_backward_cuda(const at::Tensor& grad_in, const at::Tensor& nbmap_in, int64_t num_in,
                                 bool count_inactive) {
  check_pool_args("avgpool_backward", grad_in, nbmap_in);
  TORCH_CHECK_VALUE(grad_in.size(0) == nbmap_in.size(0), "sparseconv.avgpool_backward: grad_out has ",
                    grad_in.size(0), " rows but the kernel map has ", nbmap_in.size(0));
  TORCH_CHECK_VALUE(num_in >= 0, "sparseconv.avgpool_backward: num_in must be >= 0");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous(), nbmap = nbmap_in.contiguous();
  const int64_t m = nbmap.size(0), kvol = nbmap.size(1), c = grad.size(1);
  check_map_entries(nbmap, num_in, "avgpool_backward");
  const at::ScalarType acc = acc_dtype(grad.scalar_type());
  at::Tensor gi = at::zeros({num_in, c}, grad.options().dtype(acc));
  if (m * c > 0 && num_in > 0) {
    const at::Tensor inv = avg_inverse(nbmap, count_inactive, acc);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "sparseconv_avgpool_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      for (int64_t k = 0; k < kvol; ++k) {
        avgpool_backward_offset_kernel<scalar_t, acc_t>
            <<<num_blocks(m * c), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                grad.data_ptr<scalar_t>(), nbmap.data_ptr<int32_t>(), m, kvol, k, c, inv.data_ptr<acc_t>(),
                gi.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  return acc == grad.scalar_type() ? gi : gi.to(grad.scalar_type());
}

TORCH_LIBRARY_IMPL(sparseconv, CUDA, m) {
  m.impl("maxpool_forward", &maxpool_forward_cuda);
  m.impl("maxpool_backward", &maxpool_backward_cuda);
  m.impl("avgpool_forward", &avgpool_forward_cuda);
  m.impl("avgpool_backward", &avgpool_backward_cuda);
}

}  // namespace cuda
}  // namespace sparseconv
