// CUDA kernel maps (contract: csrc/kernel_map.h).
//
// kmap_submanifold: one thread per (row, offset) looks its neighbour up in the hash table
//   (every offset is looked up; the CPU's symmetric half-lookup gives the same map).
// kmap_strided: candidates (input row, offset) -> output keys -> sort + unique (ATen) -> map,
//   as sparseconv.reference.kmap_strided_reference: output rows are the distinct keys in sorted
//   order, so the result equals the CPU's and does not depend on scheduling.
#include <limits>
#include <vector>

#include <torch/library.h>

#include "../kernel_map.h"
#include "common.cuh"

namespace sparseconv {
namespace cuda {

namespace {


// Per-axis kernel index of every offset k (x-major), int64 [K, 3] on `device`.
at::Tensor offset_indices(const KernelGeom& g, const at::Device& device) {
  const int64_t kvol = g.volume();
  std::vector<int64_t> v(3 * kvol);
  for (int64_t k = 0; k < kvol; ++k) g.offset(k, v.data() + 3 * k);
  return at::tensor(v, at::TensorOptions().dtype(at::kLong)).view({kvol, 3}).to(device);
}

// disp[k] = (kk - ks // 2) * dil per axis.  bad_row: first row outside the grid (INT64_MAX: none).
__global__ void kmap_submanifold_kernel(const int64_t* __restrict__ keys, const int64_t* __restrict__ values,
                                        int64_t cap, const int32_t* __restrict__ c, int64_t n,
                                        const int64_t* __restrict__ disp, int64_t kvol, Grid grid,
                                        int32_t* __restrict__ map, long long* bad_row) {
  SPARSECONV_CUDA_LOOP(t, n * kvol) {
    const int64_t i = t / kvol, k = t - i * kvol;
    const int32_t* r = c + 4 * i;
    if (!grid.contains(r[0], r[1], r[2], r[3])) {
      if (k == 0) atomicMin(bad_row, static_cast<long long>(i));
      continue;
    }
    const int64_t x = r[1] + disp[3 * k], y = r[2] + disp[3 * k + 1], z = r[3] + disp[3 * k + 2];
    if (!grid.contains(r[0], x, y, z)) continue;  // the map is pre-filled with -1
    const int64_t slot = table_find(keys, cap, grid.encode(r[0], x, y, z));
    if (slot >= 0) map[t] = static_cast<int32_t>(values[slot]);
  }
}

}  // namespace

at::Tensor kmap_submanifold_cuda(const at::Tensor& keys_in, const at::Tensor& values_in, const at::Tensor& coords_in,
                                 c10::IntArrayRef shape, c10::IntArrayRef kernel_size, c10::IntArrayRef dilation) {
  check_coords(coords_in, "kmap_submanifold", "coords");
  TORCH_CHECK_VALUE(keys_in.dim() == 1 && keys_in.scalar_type() == at::kLong && values_in.sizes() == keys_in.sizes(),
                    "sparseconv.kmap_submanifold: keys/values must be a hash_build table");
  const int64_t cap = keys_in.size(0);
  TORCH_CHECK_VALUE(cap >= 16 && (cap & (cap - 1)) == 0, "sparseconv.kmap_submanifold: not a hash_build table");
  check_same_device(coords_in, keys_in, "kmap_submanifold", "coords", "keys");
  check_same_device(coords_in, values_in, "kmap_submanifold", "coords", "values");
  const Grid grid = make_grid(shape);
  const int64_t one[3] = {1, 1, 1}, zero[3] = {0, 0, 0};
  const KernelGeom g = make_kernel_geom(kernel_size, one, zero, dilation);
  const c10::cuda::CUDAGuard guard(coords_in.device());
  const at::Tensor keys = keys_in.contiguous(), values = values_in.contiguous(), coords = coords_in.contiguous();
  const int64_t n = coords.size(0);
  const int64_t kvol = g.volume();
  at::Tensor nbmap = at::full({n, kvol}, -1, coords.options().dtype(at::kInt));
  if (n == 0) return nbmap;
  {
    // The table must hold exactly these coordinates (as the CPU checks).
    const at::Tensor used = keys != kEmptyKey;
    const int64_t entries = used.sum().item<int64_t>();
    const bool bad = (used & ((values < 0) | (values >= n))).any().item<bool>();
    TORCH_CHECK_VALUE(entries == n && !bad, "sparseconv.kmap_submanifold: the hash table holds ", entries,
                      " coordinates but coords has ", n, " rows; pass the coords the table was built from");
  }
  std::vector<int64_t> disp(3 * kvol);
  for (int64_t k = 0; k < kvol; ++k) {
    int64_t o[3];
    g.offset(k, o);
    for (int d = 0; d < 3; ++d) disp[3 * k + d] = (o[d] - g.ks[d] / 2) * g.dil[d];
  }
  const at::Tensor disp_t = at::tensor(disp, at::TensorOptions().dtype(at::kLong)).to(coords.device());
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  at::Tensor bad_row = at::full({1}, kNone, coords.options().dtype(at::kLong));
  kmap_submanifold_kernel<<<num_blocks(n * kvol), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      keys.data_ptr<int64_t>(), values.data_ptr<int64_t>(), cap, coords.data_ptr<int32_t>(), n,
      disp_t.data_ptr<int64_t>(), kvol, grid, nbmap.data_ptr<int32_t>(),
      reinterpret_cast<long long*>(bad_row.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t bad = bad_row.item<int64_t>();
  TORCH_CHECK_VALUE(bad == kNone, "sparseconv.kmap_submanifold: coordinate at row ", bad, " is outside the grid ",
                    shape);
  return nbmap;
}

std::tuple<at::Tensor, at::Tensor> kmap_strided_cuda(const at::Tensor& coords_in, c10::IntArrayRef shape,
                                                     c10::IntArrayRef out_spatial, c10::IntArrayRef kernel_size,
                                                     c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                     c10::IntArrayRef dilation, bool transposed) {
  const StridedGeom geom =
      check_kmap_strided_args(coords_in, shape, out_spatial, kernel_size, stride, padding, dilation);
  const Grid in_grid = geom.in, out_grid = geom.out;
  const KernelGeom g = geom.g;
  const c10::cuda::CUDAGuard guard(coords_in.device());
  const at::Tensor coords = coords_in.contiguous();
  const int64_t n = coords.size(0);
  TORCH_CHECK_VALUE(n <= INT32_MAX, "sparseconv: more than 2^31 - 1 voxels are not supported");
  const int64_t kvol = g.volume();
  const at::Device dev = coords.device();
  const auto long_opts = at::TensorOptions().dtype(at::kLong).device(dev);

  const at::Tensor c = coords.to(at::kLong);  // [N, 4]
  {
    const at::Tensor lo = at::zeros({4}, long_opts);
    const at::Tensor hi = at::tensor({in_grid.B, in_grid.X, in_grid.Y, in_grid.Z}, at::TensorOptions().dtype(at::kLong)).to(dev);
    const at::Tensor outside = ((c < lo) | (c >= hi)).any(1);
    if (n > 0 && outside.any().item<bool>()) {
      const int64_t row = outside.nonzero()[0][0].item<int64_t>();
      TORCH_CHECK_VALUE(false, "sparseconv.kmap_strided: coordinate at row ", row, " is outside the input grid ",
                        shape);
    }
  }

  // Candidates: every (input row, offset), with its output coordinate [N, K, 3].
  const at::Tensor kk = offset_indices(g, dev);                                                        // [K, 3]
  const at::Tensor st = at::tensor({g.stride[0], g.stride[1], g.stride[2]}, at::TensorOptions().dtype(at::kLong)).to(dev);
  const at::Tensor pad = at::tensor({g.pad[0], g.pad[1], g.pad[2]}, at::TensorOptions().dtype(at::kLong)).to(dev);
  const at::Tensor dil = at::tensor({g.dil[0], g.dil[1], g.dil[2]}, at::TensorOptions().dtype(at::kLong)).to(dev);
  const at::Tensor lim = at::tensor({out_grid.X, out_grid.Y, out_grid.Z}, at::TensorOptions().dtype(at::kLong)).to(dev);
  const at::Tensor xyz = c.narrow(1, 1, 3).unsqueeze(1);  // [N, 1, 3]
  at::Tensor o, ok;
  if (transposed) {
    o = xyz * st - pad + kk * dil;  // [N, K, 3]
    ok = at::ones({n, kvol}, long_opts.dtype(at::kBool));
  } else {
    const at::Tensor num = xyz + pad - kk * dil;
    ok = ((num >= 0) & (at::remainder(num, st) == 0)).all(2);
    o = at::div(num, st, "floor");
  }
  ok = ok & ((o >= 0) & (o < lim)).all(2);  // [N, K]

  // Flat candidate index t = i * K + k of the hits, and their output keys.
  const at::Tensor hit = ok.reshape({-1}).nonzero().squeeze(1);  // ascending
  const at::Tensor rows = at::div(hit, kvol, "floor");
  const at::Tensor offs = hit - rows * kvol;
  const at::Tensor oh = o.reshape({-1, 3}).index_select(0, hit);  // [P, 3]
  const at::Tensor b = c.select(1, 0).index_select(0, rows);
  const at::Tensor ckey =
      ((b * out_grid.X + oh.select(1, 0)) * out_grid.Y + oh.select(1, 1)) * out_grid.Z + oh.select(1, 2);

  // Distinct keys in sorted order are the output rows.
  at::Tensor out_keys, inverse, counts;
  std::tie(out_keys, inverse, counts) = at::_unique2(ckey, /*sorted=*/true, /*return_inverse=*/true,
                                                     /*return_counts=*/false);
  const int64_t m = out_keys.numel();
  TORCH_CHECK_VALUE(m <= INT32_MAX, "sparseconv: more than 2^31 - 1 output voxels are not supported");

  // Decode (as coords.h Grid::decode).
  at::Tensor key = out_keys;
  const at::Tensor oz = at::remainder(key, out_grid.Z);
  key = at::div(key, out_grid.Z, "floor");
  const at::Tensor oy = at::remainder(key, out_grid.Y);
  key = at::div(key, out_grid.Y, "floor");
  const at::Tensor ox = at::remainder(key, out_grid.X);
  const at::Tensor ob = at::div(key, out_grid.X, "floor");
  const at::Tensor out_coords = at::stack({ob, ox, oy, oz}, 1).to(at::kInt).contiguous();

  // (output row, offset) cells are distinct (kernel_map.h): a plain indexed write.
  at::Tensor nbmap = at::full({m, kvol}, -1, coords.options().dtype(at::kInt));
  if (hit.numel() > 0) {
    at::Tensor flat = nbmap.view({-1});
    index_put_distinct(flat, inverse * kvol + offs, rows.to(at::kInt));
  }
  return {out_coords, nbmap};
}

TORCH_LIBRARY_IMPL(sparseconv, CUDA, m) {
  m.impl("kmap_submanifold", &kmap_submanifold_cuda);
  m.impl("kmap_strided", &kmap_strided_cuda);
}

}  // namespace cuda
}  // namespace sparseconv
