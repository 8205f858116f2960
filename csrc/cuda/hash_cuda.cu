// CUDA hash_build / hash_query (contract: csrc/hash.h).  Same table as the CPU:
// open addressing over int64 keys, atomicCAS on the key slot, linear probing bounded by the
// capacity (a full table sets a flag instead of looping).
#include <limits>
#include <sstream>

#include <torch/library.h>

#include "../hash.h"
#include "common.cuh"

namespace sparseconv {
namespace cuda {

namespace {

// flags[0]: first row outside the grid, flags[1]: first row that found its key already present
// (INT64_MAX: none), flags[2]: 1 when some insert found the table full.
__global__ void hash_build_kernel(const int32_t* __restrict__ c, int64_t n, Grid grid, int64_t* keys,
                                  int64_t* values, int64_t cap, long long* flags) {
  const uint64_t mask = static_cast<uint64_t>(cap) - 1;
  SPARSECONV_CUDA_LOOP(i, n) {
    const int32_t* r = c + 4 * i;
    if (!grid.contains(r[0], r[1], r[2], r[3])) {
      atomicMin(&flags[0], static_cast<long long>(i));
      continue;
    }
    const int64_t key = grid.encode(r[0], r[1], r[2], r[3]);
    uint64_t slot = mix64(static_cast<uint64_t>(key)) & mask;
    bool placed = false;
    for (int64_t probe = 0; probe < cap; ++probe) {
      const unsigned long long prev =
          atomicCAS(reinterpret_cast<unsigned long long*>(keys + slot), static_cast<unsigned long long>(kEmptyKey),
                    static_cast<unsigned long long>(key));
      if (prev == static_cast<unsigned long long>(kEmptyKey)) {
        values[slot] = i;
        placed = true;
        break;
      }
      if (prev == static_cast<unsigned long long>(key)) {
        atomicMin(&flags[1], static_cast<long long>(i));
        placed = true;
        break;
      }
      slot = (slot + 1) & mask;
    }
    if (!placed) flags[2] = 1;
  }
}

__global__ void hash_query_kernel(const int64_t* __restrict__ keys, const int64_t* __restrict__ values, int64_t cap,
                                  const int32_t* __restrict__ q, int64_t m, Grid grid, int64_t* __restrict__ out) {
  SPARSECONV_CUDA_LOOP(i, m) {
    const int32_t* r = q + 4 * i;
    if (!grid.contains(r[0], r[1], r[2], r[3])) {
      out[i] = -1;
      continue;
    }
    const int64_t slot = table_find(keys, cap, grid.encode(r[0], r[1], r[2], r[3]));
    out[i] = slot < 0 ? -1 : values[slot];
  }
}

std::string coord_str(const at::Tensor& coords, int64_t row) {
  const at::Tensor r = coords[row].cpu();
  const int32_t* c = r.data_ptr<int32_t>();
  std::ostringstream s;
  s << "(batch=" << c[0] << ", x=" << c[1] << ", y=" << c[2] << ", z=" << c[3] << ")";
  return s.str();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> hash_build_cuda(const at::Tensor& coords_in, c10::IntArrayRef shape) {
  check_coords(coords_in, "hash_build", "coords");
  const Grid grid = make_grid(shape);
  const c10::cuda::CUDAGuard guard(coords_in.device());
  const at::Tensor coords = coords_in.contiguous();
  const int64_t n = coords.size(0);
  const int64_t cap = table_capacity(n);
  at::Tensor keys = at::full({cap}, kEmptyKey, coords.options().dtype(at::kLong));
  at::Tensor values = at::full({cap}, -1, coords.options().dtype(at::kLong));
  if (n == 0) return {keys, values};
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  at::Tensor flags = at::tensor({kNone, kNone, int64_t(0)}, at::TensorOptions().dtype(at::kLong)).to(coords.device());
  hash_build_kernel<<<num_blocks(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      coords.data_ptr<int32_t>(), n, grid, keys.data_ptr<int64_t>(), values.data_ptr<int64_t>(), cap,
      reinterpret_cast<long long*>(flags.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor f = flags.cpu();
  const int64_t* fp = f.data_ptr<int64_t>();

  if (fp[0] != kNone) {
    const int64_t i = fp[0];
    TORCH_CHECK_VALUE(false, "sparseconv: coordinate ", coord_str(coords, i), " at row ", i,
                      " is outside the grid: batch must be in [0, ", grid.B, "), x in [0, ", grid.X, "), y in [0, ",
                      grid.Y, "), z in [0, ", grid.Z, ")");
  }
  TORCH_CHECK(fp[2] == 0, "sparseconv: coordinate hash table of capacity ", cap, " is full (internal error)");
  if (fp[1] != kNone) {
    // Deterministically (unlike the racing inserts): the first row in row order that repeats an
    // earlier coordinate, and the first row holding that coordinate.
    const at::Tensor c = coords.to(at::kLong);
    const at::Tensor key =
        ((c.select(1, 0) * grid.X + c.select(1, 1)) * grid.Y + c.select(1, 2)) * grid.Z + c.select(1, 3);
    at::Tensor sorted_keys, order;
    std::tie(sorted_keys, order) = at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const at::Tensor repeats = sorted_keys.narrow(0, 1, n - 1) == sorted_keys.narrow(0, 0, n - 1);
    const int64_t i = order.narrow(0, 1, n - 1).masked_select(repeats).min().item<int64_t>();
    at::Tensor same = (coords == coords[i].unsqueeze(0)).all(1);
    same.select(0, i).fill_(false);
    const at::Tensor others = same.nonzero();
    const int64_t other = others.size(0) > 0 ? others[0][0].item<int64_t>() : i;
    TORCH_CHECK_VALUE(false, "sparseconv: duplicate coordinate ", coord_str(coords, i), " at rows ",
                      std::min(other, i), " and ", std::max(other, i),
                      "; every active site must appear once (merge points per voxel with sparseconv.voxelize "
                      "or torch.unique before building a SparseTensor)");
  }
  return {keys, values};
}

at::Tensor hash_query_cuda(const at::Tensor& keys_in, const at::Tensor& values_in, const at::Tensor& queries_in,
                           c10::IntArrayRef shape) {
  check_coords(queries_in, "hash_query", "queries");
  check_hash_table(keys_in, values_in, "hash_query");
  const int64_t cap = keys_in.size(0);
  check_same_device(queries_in, keys_in, "hash_query", "queries", "keys");
  check_same_device(queries_in, values_in, "hash_query", "queries", "values");
  const Grid grid = make_grid(shape);
  const c10::cuda::CUDAGuard guard(queries_in.device());
  const at::Tensor keys = keys_in.contiguous(), values = values_in.contiguous(), queries = queries_in.contiguous();
  const int64_t m = queries.size(0);
  at::Tensor rows = at::empty({m}, queries.options().dtype(at::kLong));
  if (m == 0) return rows;
  hash_query_kernel<<<num_blocks(m), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      keys.data_ptr<int64_t>(), values.data_ptr<int64_t>(), cap, queries.data_ptr<int32_t>(), m, grid,
      rows.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return rows;
}

TORCH_LIBRARY_IMPL(sparseconv, CUDA, m) {
  m.impl("hash_build", &hash_build_cuda);
  m.impl("hash_query", &hash_query_cuda);
}

}  // namespace cuda
}  // namespace sparseconv
