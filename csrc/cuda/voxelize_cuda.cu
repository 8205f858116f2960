// CUDA voxelize (contract: csrc/voxelize.h), built from ATen ops on the device, step by step as
// sparseconv.reference.voxelize_reference and csrc/cpu/voxelize_cpu.cpp: keys of the valid points
// -> stable sort (runs = voxels, points in input order) -> kept voxels / points -> reductions.
// Every step is deterministic (stable sorts; sums by sorted, accumulating index_put_).
#include <cmath>

#include <torch/library.h>

#include "../voxelize.h"
#include "common.cuh"

namespace sparseconv {
namespace cuda {

namespace {

using Reduce = VoxelReduce;


}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> voxelize_cuda(
    const at::Tensor& points_in, const c10::optional<at::Tensor>& batch_in, at::ArrayRef<double> voxel_size,
    at::ArrayRef<double> lower, c10::IntArrayRef grid_xyz, int64_t batch_size, int64_t max_points, int64_t max_voxels,
    c10::string_view reduce_name, bool order_by_first) {
  const char* op = "voxelize";
  check_feats(points_in, op, "points");
  TORCH_CHECK_TYPE(points_in.scalar_type() == at::kFloat || points_in.scalar_type() == at::kDouble,
                   "sparseconv.voxelize: the CUDA kernel supports float32 and float64 points, got ",
                   points_in.scalar_type());
  // Plain names, not structured bindings: lambdas below capture them (C++17 builds, torch < 2.13).
  const std::pair<Grid, VoxelReduce> args =
      check_voxelize_args(points_in, voxel_size, lower, grid_xyz, batch_size, max_points, reduce_name);
  const Grid grid = args.first;
  const Reduce reduce = args.second;
  const c10::cuda::CUDAGuard guard(points_in.device());
  const at::Tensor points = points_in.contiguous();
  const int64_t n = points.size(0), c = points.size(1);
  const at::ScalarType dt = points.scalar_type();
  const at::Device dev = points.device();
  const auto long_opts = points.options().dtype(at::kLong);

  at::Tensor b;
  if (batch_in.has_value() && batch_in->defined()) {
    const at::Tensor& batch = *batch_in;
    TORCH_CHECK_VALUE(batch.dim() == 1 && batch.size(0) == n, "sparseconv.voxelize: batch must be [N] = [", n,
                      "], got shape ", batch.sizes());
    TORCH_CHECK_VALUE(!at::isFloatingType(batch.scalar_type()) && batch.scalar_type() != at::kBool,
                      "sparseconv.voxelize: batch must be an integer tensor, got ", batch.scalar_type());
    check_same_device(points, batch, op, "points", "batch");
    b = batch.to(at::kLong).contiguous();
    if (n) {
      const int64_t lo = b.min().item<int64_t>(), hi = b.max().item<int64_t>();
      TORCH_CHECK_VALUE(lo >= 0 && hi < batch_size, "sparseconv.voxelize: batch indices must be in [0, ", batch_size,
                        "), got [", lo, ", ", hi, "]");
    }
  } else {
    b = at::zeros({n}, long_opts);
  }

  // 1. The voxel of each point: floor((p - lower) / voxel_size) in the points' dtype.
  const auto host = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor lo = at::tensor({lower[0], lower[1], lower[2]}, host).to(dev, dt);
  const at::Tensor vs = at::tensor({voxel_size[0], voxel_size[1], voxel_size[2]}, host).to(dev, dt);
  const at::Tensor gsz =
      at::tensor({double(grid.X), double(grid.Y), double(grid.Z)}, host).to(dev, dt);
  const at::Tensor xyz = points.narrow(1, 0, 3);
  const at::Tensor finite = at::isfinite(xyz).all(1);
  const at::Tensor q = at::floor((xyz - lo) / vs);
  const at::Tensor inside = finite & (q >= 0).all(1) & (q < gsz).all(1);
  const at::Tensor qi = at::where(inside.unsqueeze(1), q, at::zeros({}, q.options())).to(at::kLong);
  const at::Tensor keys =
      ((b * grid.X + qi.select(1, 0)) * grid.Y + qi.select(1, 1)) * grid.Z + qi.select(1, 2);

  // 2. Valid points stably sorted by key: each voxel's points are one run, in input order.
  const at::Tensor valid = inside.nonzero().flatten();
  const int64_t num_valid = valid.numel();
  at::Tensor skeys, order;
  std::tie(skeys, order) = at::sort(keys.index_select(0, valid), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor sidx = valid.index_select(0, order);

  // 3. Runs = voxels in key order; the first point of a run is its earliest point.
  at::Tensor uniq, unused, run_len;
  std::tie(uniq, unused, run_len) = at::unique_consecutive(skeys, /*return_inverse=*/false, /*return_counts=*/true);
  const int64_t v_all = uniq.numel();
  const at::Tensor run_start = at::cumsum(run_len, 0) - run_len;
  const at::Tensor first = sidx.index_select(0, run_start);

  // 4. Voxels kept (the first max_voxels by first appearance) and the output order.
  const bool truncate = max_voxels >= 0 && v_all > max_voxels;
  const int64_t nv = truncate ? max_voxels : v_all;
  at::Tensor runs = (order_by_first || truncate) ? at::argsort(first) : at::arange(v_all, long_opts);
  at::Tensor keep = truncate ? runs.narrow(0, 0, nv) : runs;
  if (!order_by_first) keep = std::get<0>(at::sort(keep));
  at::Tensor row_of_run = at::full({v_all}, -1, long_opts);
  index_put_distinct(row_of_run, keep, at::arange(nv, long_opts));
  const at::Tensor run_of_sorted = at::repeat_interleave(run_len, std::optional<int64_t>(num_valid));  // run of each sorted point
  const at::Tensor rank = at::arange(num_valid, long_opts) - run_start.index_select(0, run_of_sorted);
  const at::Tensor row = row_of_run.index_select(0, run_of_sorted);
  at::Tensor kept = row >= 0;
  if (max_points >= 0) kept = kept & (rank < max_points);

  // 5. Outputs.
  const at::Tensor kept_pts = sidx.masked_select(kept), rows = row.masked_select(kept), ranks = rank.masked_select(kept);
  at::Tensor point_voxel = at::full({n}, -1, long_opts);
  index_put_distinct(point_voxel, kept_pts, rows);
  const at::Tensor counts = at::bincount(rows, {}, nv).to(at::kInt);
  const at::Tensor pts = points.index_select(0, kept_pts);
  at::Tensor feats;
  switch (reduce) {
    case kCount:
      feats = counts.to(dt).unsqueeze(1);
      break;
    case kPad: {
      feats = at::zeros({nv, max_points, c}, points.options());
      at::Tensor slots = feats.view({nv * max_points, c});  // the same storage, one row per slot
      index_put_distinct(slots, rows * max_points + ranks, pts);
      break;
    }
    case kFirst: {
      feats = at::zeros({nv, c}, points.options());
      const at::Tensor is_first = ranks == 0;
      index_put_distinct(feats, rows.masked_select(is_first), pts.index_select(0, is_first.nonzero().flatten()));
      break;
    }
    case kMax:
      feats = at::zeros({nv, c}, points.options()).index_reduce_(0, rows, pts, "amax", /*include_self=*/false);
      break;
    case kMean:
    case kSum: {
      feats = at::zeros({nv, c}, points.options());
      index_put_accumulate(feats, rows, pts);  // sorted by row, then in input order: as the CPU
      if (reduce == kMean) feats = feats * counts.to(dt).clamp_min(1).reciprocal().unsqueeze(1);
      break;
    }
  }

  // Coordinates of the kept voxels (as coords.h Grid::decode).
  at::Tensor key = uniq.index_select(0, keep);
  const at::Tensor cz = at::remainder(key, grid.Z);
  key = at::div(key, grid.Z, "floor");
  const at::Tensor cy = at::remainder(key, grid.Y);
  key = at::div(key, grid.Y, "floor");
  const at::Tensor cx = at::remainder(key, grid.X);
  const at::Tensor cb = at::div(key, grid.X, "floor");
  const at::Tensor coords = at::stack({cb, cx, cy, cz}, 1).to(at::kInt).contiguous();

  // drops: non-finite, outside the grid, voxel beyond max_voxels, point beyond max_points.
  const at::Tensor nonfinite = (~finite).sum();
  const at::Tensor in_kept_voxels = (row >= 0).sum();
  const at::Tensor kept_total = kept.sum();
  const at::Tensor drops = at::stack({nonfinite, n - nonfinite - num_valid, num_valid - in_kept_voxels,
                                      in_kept_voxels - kept_total})
                               .to(at::kLong);
  return {coords, feats.contiguous(), point_voxel, counts, drops};
}

TORCH_LIBRARY_IMPL(sparseconv, CUDA, m) {
  m.impl("voxelize", &voxelize_cuda);
}

}  // namespace cuda
}  // namespace sparseconv
