// Kernel maps.
//
// A kernel map ("nbmap") is an int32 tensor [M, K]: M output sites, K kernel
// offsets enumerated x-major (k = (kx * KY + ky) * KZ + kz).  nbmap[o, k] is
// the input row that offset k of output o reads, or -1.  Invariant relied on
// by every conv/pool kernel: within one column k the non-negative entries are
// pairwise distinct (an input feeds a given offset of at most one output), so
// scatters are race-free when parallelised over rows for a fixed k.
//
// kmap_submanifold(keys, values, coords [N, 4], shape [B, X, Y, Z],
//                  kernel_size[3], dilation[3]) -> nbmap [N, K]
//   Output sites = input sites.  Offset k of site c reads c + (kk - ks // 2) * dil
//   per axis (kk = the offset's index on that axis), i.e. dense conv3d with
//   stride 1 and padding dil * (ks // 2), cropped to the input grid (spconv's
//   SubMConv3d).  For odd kernels the map is symmetric (nbmap[o, k] = i iff
//   nbmap[i, K - 1 - k] = o) and only half of the lookups are made.
//
// kmap_strided(coords [N, 4], shape [B, X, Y, Z], out_spatial[3], kernel_size[3],
//              stride[3], padding[3], dilation[3], transposed)
//     -> (out_coords [M, 4] int32, nbmap [M, K])
//   transposed = false: output sites are exactly the sites of the dense
//   conv3d(stride, padding, dilation) output grid `out_spatial` that receive at
//   least one active input: input x feeds output o through offset k iff
//   x = o * stride - padding + k * dilation.
//   transposed = true: the same for conv_transpose3d: input x feeds output
//   o = x * stride - padding + k * dilation when 0 <= o < out_spatial.
//   out_coords are sorted by (batch, x, y, z); the result is deterministic.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

#include "checks.h"
#include "coords.h"

namespace sparseconv {

// The validated geometry of kmap_strided (both backends): input grid, output grid, kernel.
struct StridedGeom {
  Grid in, out;
  KernelGeom g;
};

inline StridedGeom check_kmap_strided_args(const at::Tensor& coords, c10::IntArrayRef shape,
                                           c10::IntArrayRef out_spatial, c10::IntArrayRef kernel_size,
                                           c10::IntArrayRef stride, c10::IntArrayRef padding,
                                           c10::IntArrayRef dilation) {
  check_coords(coords, "kmap_strided", "coords");
  const Grid in = make_grid(shape);
  check_triple(out_spatial, "out_spatial_shape", 1, INT32_MAX);
  const Grid out = make_grid({shape[0], out_spatial[0], out_spatial[1], out_spatial[2]});
  const KernelGeom g = make_kernel_geom(kernel_size, stride, padding, dilation);
  TORCH_CHECK_VALUE(coords.size(0) <= INT32_MAX, "sparseconv: more than 2^31 - 1 voxels are not supported");
  return {in, out, g};
}

at::Tensor kmap_submanifold_cpu(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& coords,
                                c10::IntArrayRef shape, c10::IntArrayRef kernel_size, c10::IntArrayRef dilation);

std::tuple<at::Tensor, at::Tensor> kmap_strided_cpu(const at::Tensor& coords, c10::IntArrayRef shape,
                                                    c10::IntArrayRef out_spatial, c10::IntArrayRef kernel_size,
                                                    c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                    c10::IntArrayRef dilation, bool transposed);

}  // namespace sparseconv
