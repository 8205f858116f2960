// Voxelization of raw points.
//
// voxelize(points [N, C] float, batch [N] int (or None: all 0), voxel_size[3], lower[3], grid[3],
//          batch_size, max_points, max_voxels, reduce, order_by_first)
//   -> (coords [V, 4] int32, feats [V, F] ([V, max_points, C] for "pad"), point_voxel [N] int64, counts [V] int32,
//       drops [4] int64)
//
//   The voxel of a point is floor((p - lower) / voxel_size) per axis, computed in the points'
//   floating-point type (as spconv's PointToVoxel); it must lie in [0, grid).  Points whose
//   x, y or z is NaN/inf, or whose voxel is outside the grid, are dropped.
//   Voxels are created in the order of their first point; with max_voxels >= 0 only the first
//   max_voxels voxels are kept (the points of later ones are dropped).  Within a voxel the points
//   are taken in input order; with max_points >= 0 only the first max_points are kept.  This is
//   spconv's PointToVoxel.  Output rows are sorted by (batch, x, y, z), or by first appearance
//   when order_by_first.
//   feats reduce the kept points of each voxel over all C columns: "mean", "max", "sum", "first"
//   (the first kept point), "count" (F = 1: the number of kept points), or "pad"
//   (feats [V, max_points, C]: the kept points in order, zero-padded; the spconv PointToVoxel layout).
//   point_voxel[i] is the output row of point i or -1 if it was dropped.  counts[v] is the number
//   of kept points.  drops counts the dropped points by reason: non-finite, outside the grid, voxel
//   beyond max_voxels, point beyond max_points.
//   Errors (ValueError): points not [N, >= 3] float; batch not [N] integer or outside
//   [0, batch_size); voxel_size <= 0; a grid too large for 64-bit keys.
//   Deterministic, independent of the thread count.  Not differentiable.
#pragma once

#include <cmath>
#include <string>
#include <utility>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "coords.h"
#include <c10/util/Optional.h>

namespace sparseconv {

enum VoxelReduce { kMean, kMax, kSum, kFirst, kCount, kPad };

// The reduce argument of voxelize (ValueError naming the choices otherwise).
inline VoxelReduce parse_voxel_reduce(c10::string_view r) {
  if (r == "mean") return kMean;
  if (r == "max") return kMax;
  if (r == "sum") return kSum;
  if (r == "first") return kFirst;
  if (r == "count") return kCount;
  if (r == "pad") return kPad;
  TORCH_CHECK_VALUE(false, "sparseconv.voxelize: reduce must be one of mean, max, sum, first, count, pad; got '",
                    std::string(r), "'");
}

// The arguments of voxelize after the backend's dtype check: point shape, voxel size, range, grid
// (ValueError naming the problem).  Returns the grid [batch_size, X, Y, Z] and the reduction.
inline std::pair<Grid, VoxelReduce> check_voxelize_args(const at::Tensor& points, at::ArrayRef<double> voxel_size,
                                                        at::ArrayRef<double> lower, c10::IntArrayRef grid_xyz,
                                                        int64_t batch_size, int64_t max_points,
                                                        c10::string_view reduce_name) {
  TORCH_CHECK_VALUE(points.size(1) >= 3, "sparseconv.voxelize: points must be [N, C] with C >= 3 (x, y, z first), "
                    "got shape ", points.sizes());
  TORCH_CHECK_VALUE(voxel_size.size() == 3 && lower.size() == 3, "sparseconv.voxelize: voxel_size and lower need 3 values");
  for (double v : voxel_size) {
    TORCH_CHECK_VALUE(std::isfinite(v) && v > 0, "sparseconv.voxelize: voxel_size must be positive, got ", voxel_size);
  }
  for (double v : lower) TORCH_CHECK_VALUE(std::isfinite(v), "sparseconv.voxelize: the range must be finite");
  check_triple(grid_xyz, "grid", 1, INT32_MAX);
  const Grid grid = make_grid({batch_size, grid_xyz[0], grid_xyz[1], grid_xyz[2]});
  const VoxelReduce reduce = parse_voxel_reduce(reduce_name);
  TORCH_CHECK_VALUE(reduce != kPad || max_points >= 1, "sparseconv.voxelize: reduce='pad' needs max_points >= 1");
  TORCH_CHECK_VALUE(points.size(0) <= INT32_MAX, "sparseconv.voxelize: more than 2^31 - 1 points are not supported");
  return {grid, reduce};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> voxelize_cpu(
    const at::Tensor& points, const c10::optional<at::Tensor>& batch, at::ArrayRef<double> voxel_size,
    at::ArrayRef<double> lower, c10::IntArrayRef grid, int64_t batch_size, int64_t max_points, int64_t max_voxels,
    c10::string_view reduce, bool order_by_first);

}  // namespace sparseconv
