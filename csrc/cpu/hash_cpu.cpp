#include <atomic>
#include <limits>
#include <sstream>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../hash.h"
#include "hash_table.h"

namespace sparseconv {

namespace {

std::string coord_str(const int32_t* c) {
  std::ostringstream s;
  s << "(batch=" << c[0] << ", x=" << c[1] << ", y=" << c[2] << ", z=" << c[3] << ")";
  return s.str();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> hash_build_cpu(const at::Tensor& coords_in, c10::IntArrayRef shape) {
  check_coords(coords_in, "hash_build", "coords");
  const Grid grid = make_grid(shape);
  const at::Tensor coords = coords_in.contiguous();
  const int64_t n = coords.size(0);
  const int64_t cap = cpu::table_capacity(n);
  at::Tensor keys = at::full({cap}, kEmptyKey, coords.options().dtype(at::kLong));
  at::Tensor values = at::full({cap}, -1, coords.options().dtype(at::kLong));
  const int32_t* c = coords.data_ptr<int32_t>();
  int64_t* kp = keys.data_ptr<int64_t>();
  int64_t* vp = values.data_ptr<int64_t>();

  // First offending row for each kind of error (min over threads -> deterministic message).
  std::atomic<int64_t> bad_range{std::numeric_limits<int64_t>::max()};
  std::atomic<int64_t> dup_row{std::numeric_limits<int64_t>::max()};
  std::atomic<bool> full{false};
  auto atomic_min = [](std::atomic<int64_t>& a, int64_t v) {
    int64_t cur = a.load();
    while (v < cur && !a.compare_exchange_weak(cur, v)) {
    }
  };

  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int32_t* r = c + 4 * i;
      if (!grid.contains(r[0], r[1], r[2], r[3])) {
        atomic_min(bad_range, i);
        continue;
      }
      bool existed = false;
      const int64_t slot = cpu::table_insert(kp, cap, grid.encode(r[0], r[1], r[2], r[3]), &existed);
      if (slot < 0) {
        full = true;
      } else if (existed) {
        atomic_min(dup_row, i);
      } else {
        vp[slot] = i;
      }
    }
  });

  if (bad_range.load() != std::numeric_limits<int64_t>::max()) {
    const int64_t i = bad_range.load();
    TORCH_CHECK_VALUE(false, "sparseconv: coordinate ", coord_str(c + 4 * i), " at row ", i,
                      " is outside the grid: batch must be in [0, ", grid.B, "), x in [0, ", grid.X, "), y in [0, ",
                      grid.Y, "), z in [0, ", grid.Z, ")");
  }
  TORCH_CHECK(!full.load(), "sparseconv: coordinate hash table of capacity ", cap, " is full (internal error)");
  if (dup_row.load() != std::numeric_limits<int64_t>::max()) {
    // The first row (in row order) that repeats an earlier coordinate, and that earlier row.
    const int64_t i = dup_row.load();
    const int32_t* r = c + 4 * i;
    int64_t other = i;
    for (int64_t j = 0; j < n; ++j) {
      const int32_t* q = c + 4 * j;
      if (j != i && q[0] == r[0] && q[1] == r[1] && q[2] == r[2] && q[3] == r[3]) {
        other = j;
        break;
      }
    }
    TORCH_CHECK_VALUE(false, "sparseconv: duplicate coordinate ", coord_str(r), " at rows ", std::min(other, i),
                      " and ", std::max(other, i),
                      "; every active site must appear once (merge points per voxel with sparseconv.voxelize "
                      "or torch.unique before building a SparseTensor)");
  }
  return {keys, values};
}

at::Tensor hash_query_cpu(const at::Tensor& keys_in, const at::Tensor& values_in, const at::Tensor& queries_in,
                          c10::IntArrayRef shape) {
  check_coords(queries_in, "hash_query", "queries");
  check_hash_table(keys_in, values_in, "hash_query");
  const int64_t cap = keys_in.size(0);
  const Grid grid = make_grid(shape);
  const at::Tensor keys = keys_in.contiguous(), values = values_in.contiguous(), queries = queries_in.contiguous();
  const int64_t m = queries.size(0);
  at::Tensor rows = at::empty({m}, queries.options().dtype(at::kLong));
  const int64_t* kp = keys.data_ptr<int64_t>();
  const int64_t* vp = values.data_ptr<int64_t>();
  const int32_t* q = queries.data_ptr<int32_t>();
  int64_t* out = rows.data_ptr<int64_t>();
  at::parallel_for(0, m, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int32_t* r = q + 4 * i;
      if (!grid.contains(r[0], r[1], r[2], r[3])) {
        out[i] = -1;
        continue;
      }
      const int64_t slot = cpu::table_find(kp, cap, grid.encode(r[0], r[1], r[2], r[3]));
      out[i] = slot < 0 ? -1 : vp[slot];
    }
  });
  return rows;
}

TORCH_LIBRARY_IMPL(sparseconv, CPU, m) {
  m.impl("hash_build", &hash_build_cpu);
  m.impl("hash_query", &hash_query_cpu);
}

}  // namespace sparseconv
