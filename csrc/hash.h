// Coordinate hash table: open addressing over packed 64-bit keys (coords.h).
//
// hash_build(coords [N, 4] int32, shape [B, X, Y, Z]) -> (keys [cap] int64, values [cap] int64)
//   cap is the smallest power of two >= max(16, 2 N): it depends only on N.
//   Empty slots hold key -1.  values[slot] is the row of `coords` whose key is
//   keys[slot].  Build is parallel (compare-and-swap on the key slot).
//   Errors (ValueError): a coordinate outside the grid (the message names the
//   row, the coordinate and the allowed range); a coordinate that occurs twice
//   (the message names both rows).  Probing is bounded by cap, so a full table
//   raises instead of looping.
//
// hash_query(keys, values, queries [M, 4] int32, shape) -> rows [M] int64
//   rows[m] is the row of the query's coordinate in the table, or -1 when it is
//   absent or outside the grid.  Read-only, parallel, deterministic.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace sparseconv {

std::tuple<at::Tensor, at::Tensor> hash_build_cpu(const at::Tensor& coords, c10::IntArrayRef shape);
at::Tensor hash_query_cpu(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& queries,
                          c10::IntArrayRef shape);

}  // namespace sparseconv
