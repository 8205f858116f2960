#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../coords.h"
#include "../voxelize.h"
#include "radix_sort.h"

namespace sparseconv {

namespace {

enum Reduce { kMean, kMax, kSum, kFirst, kCount, kPad };

Reduce parse_reduce(c10::string_view r) {
  if (r == "mean") return kMean;
  if (r == "max") return kMax;
  if (r == "sum") return kSum;
  if (r == "first") return kFirst;
  if (r == "count") return kCount;
  if (r == "pad") return kPad;
  TORCH_CHECK_VALUE(false, "sparseconv.voxelize: reduce must be one of mean, max, sum, first, count, pad; got '",
                    std::string(r), "'");
}

constexpr uint64_t kNonFinite = std::numeric_limits<uint64_t>::max();
constexpr uint64_t kOutside = kNonFinite - 1;

// Scratch buffers of one calling thread (see voxelize_cpu).
struct Workspace {
  std::vector<uint64_t> key, skeys, skeys_tmp;
  std::vector<uint32_t> k32, k32_tmp, first, first_tmp;
  std::vector<int32_t> sidx, sidx_tmp;
  std::vector<int64_t> chunk_valid, chunk_nonfinite, chunk_runs, run_start, order, runs, runs_tmp, over_points,
      hist;
  std::vector<char> kept;
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> voxelize_cpu(
    const at::Tensor& points_in, const c10::optional<at::Tensor>& batch_in, at::ArrayRef<double> voxel_size,
    at::ArrayRef<double> lower, c10::IntArrayRef grid_xyz, int64_t batch_size, int64_t max_points, int64_t max_voxels,
    c10::string_view reduce_name, bool order_by_first) {
  const char* op = "voxelize";
  check_feats(points_in, op, "points");
  check_cpu_dtype(points_in, op);
  TORCH_CHECK_VALUE(points_in.size(1) >= 3, "sparseconv.voxelize: points must be [N, C] with C >= 3 (x, y, z first), "
                    "got shape ", points_in.sizes());
  TORCH_CHECK_VALUE(voxel_size.size() == 3 && lower.size() == 3, "sparseconv.voxelize: voxel_size and lower need 3 values");
  for (double v : voxel_size) {
    TORCH_CHECK_VALUE(std::isfinite(v) && v > 0, "sparseconv.voxelize: voxel_size must be positive, got ", voxel_size);
  }
  for (double v : lower) TORCH_CHECK_VALUE(std::isfinite(v), "sparseconv.voxelize: the range must be finite");
  check_triple(grid_xyz, "grid", 1, INT32_MAX);
  const Grid grid = make_grid({batch_size, grid_xyz[0], grid_xyz[1], grid_xyz[2]});
  const Reduce reduce = parse_reduce(reduce_name);
  TORCH_CHECK_VALUE(reduce != kPad || max_points >= 1, "sparseconv.voxelize: reduce='pad' needs max_points >= 1");
  const at::Tensor points = points_in.contiguous();
  const int64_t n = points.size(0), c = points.size(1);
  TORCH_CHECK_VALUE(n <= INT32_MAX, "sparseconv.voxelize: more than 2^31 - 1 points are not supported");

  at::Tensor batch;
  if (batch_in.has_value() && batch_in->defined()) {
    batch = *batch_in;
    TORCH_CHECK_VALUE(batch.dim() == 1 && batch.size(0) == n, "sparseconv.voxelize: batch must be [N] = [", n,
                      "], got shape ", batch.sizes());
    TORCH_CHECK_VALUE(!at::isFloatingType(batch.scalar_type()) && batch.scalar_type() != at::kBool,
                      "sparseconv.voxelize: batch must be an integer tensor, got ", batch.scalar_type());
    check_same_device(points, batch, op, "points", "batch");
    batch = batch.to(at::kLong).contiguous();
    if (n) {
      const int64_t lo = batch.min().item<int64_t>(), hi = batch.max().item<int64_t>();
      TORCH_CHECK_VALUE(lo >= 0 && hi < batch_size, "sparseconv.voxelize: batch indices must be in [0, ", batch_size,
                        "), got [", lo, ", ", hi, "]");
    }
  }
  const int64_t* bp = batch.defined() ? batch.data_ptr<int64_t>() : nullptr;

  // Temporaries live in a per-thread workspace that keeps its capacity between calls: a scan is
  // voxelized many times per second, and fresh multi-megabyte buffers each time cost more in page
  // faults than the work itself.
  thread_local Workspace ws;

  // Per-point outputs: every entry is written exactly once below.
  at::Tensor point_voxel = at::empty({n}, points.options().dtype(at::kLong));
  int64_t* pv = point_voxel.data_ptr<int64_t>();

  // 1. Key of each point (or a drop code), and per-chunk counts of valid points.
  constexpr int64_t kChunk = 16384;
  const int64_t num_chunks = (n + kChunk - 1) / kChunk;
  uint64_t* key = cpu::scratch(ws.key, n);
  int64_t* chunk_valid = cpu::scratch(ws.chunk_valid, num_chunks + 1);
  int64_t* chunk_nonfinite = cpu::scratch(ws.chunk_nonfinite, num_chunks + 1);
  chunk_valid[0] = 0;
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "sparseconv_voxelize_keys", [&] {
    const scalar_t* p = points.data_ptr<scalar_t>();
    const scalar_t lo[3] = {static_cast<scalar_t>(lower[0]), static_cast<scalar_t>(lower[1]),
                            static_cast<scalar_t>(lower[2])};
    const scalar_t vs[3] = {static_cast<scalar_t>(voxel_size[0]), static_cast<scalar_t>(voxel_size[1]),
                            static_cast<scalar_t>(voxel_size[2])};
    const scalar_t g[3] = {static_cast<scalar_t>(grid.X), static_cast<scalar_t>(grid.Y),
                           static_cast<scalar_t>(grid.Z)};
    // The cell index floor(d / vs), exactly as the rounded division gives it, without dividing in
    // almost every case: the product with the rounded reciprocal is within a few ulps of the
    // rounded quotient, so its floor is the same unless the product lies within that distance of
    // an integer; only then is the division done.  Floors are taken by integer truncation plus a
    // correction (std::floor is a library call on baseline x86-64).  Returns false for a cell
    // outside [0, grid) and for NaN/inf.
    const scalar_t inv[3] = {scalar_t(1) / vs[0], scalar_t(1) / vs[1], scalar_t(1) / vs[2]};
    constexpr scalar_t kUlps = 8 * std::numeric_limits<scalar_t>::epsilon();
    auto floor_int = [](scalar_t v) -> int64_t {
      int64_t i = static_cast<int64_t>(v);
      return i - (v < static_cast<scalar_t>(i));
    };
    auto cell = [&](scalar_t d, int axis, int64_t* q) -> bool {
      const scalar_t t = d * inv[axis];
      if (!(t > scalar_t(-2) && t < g[axis] + scalar_t(2))) return false;  // far outside, or NaN/inf
      int64_t i = floor_int(t);
      const scalar_t frac = t - static_cast<scalar_t>(i);
      const scalar_t margin = kUlps * (std::abs(t) + scalar_t(1));
      if (frac < margin || frac > scalar_t(1) - margin) i = floor_int(d / vs[axis]);
      *q = i;
      return i >= 0 && i < static_cast<int64_t>(g[axis]);
    };
    at::parallel_for(0, num_chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        int64_t valid = 0, nonfinite = 0;
        const int64_t end = std::min(n, (chunk + 1) * kChunk);
        for (int64_t i = chunk * kChunk; i < end; ++i) {
          const scalar_t* r = p + i * c;
          // NaN fails every comparison and inf lands outside: one test covers both; the rare
          // rejected point is then classified.  Comparing before converting also keeps a huge
          // quotient from overflowing the integer conversion.
          int64_t qx, qy, qz;
          const bool inside = cell(r[0] - lo[0], 0, &qx) && cell(r[1] - lo[1], 1, &qy) && cell(r[2] - lo[2], 2, &qz);
          if (!inside) {
            const bool finite = std::isfinite(r[0]) && std::isfinite(r[1]) && std::isfinite(r[2]);
            key[i] = finite ? kOutside : kNonFinite;
            nonfinite += !finite;
            pv[i] = -1;
            continue;
          }
          key[i] = static_cast<uint64_t>(grid.encode(bp ? bp[i] : 0, qx, qy, qz));
          ++valid;
        }
        chunk_valid[chunk + 1] = valid;
        chunk_nonfinite[chunk] = nonfinite;
      }
    });
  });
  int64_t nonfinite = 0;
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    nonfinite += chunk_nonfinite[chunk];
    chunk_valid[chunk + 1] += chunk_valid[chunk];
  }
  const int64_t valid = chunk_valid[num_chunks];
  const int64_t outside = n - nonfinite - valid;

  // 2. Valid points, stably sorted by key: each voxel's points become one run, in input order.
  //    Keys are sorted as 32-bit integers when the grid allows (half the memory traffic).
  const uint64_t max_key = static_cast<uint64_t>(grid.B * grid.X * grid.Y * grid.Z - 1);
  uint64_t* skeys = cpu::scratch(ws.skeys, valid);
  int32_t* sidx = cpu::scratch(ws.sidx, valid);
  int32_t* sidx_tmp = cpu::scratch(ws.sidx_tmp, valid);
  auto compact = [&](auto* out_keys) {
    using K = std::remove_pointer_t<decltype(out_keys)>;
    at::parallel_for(0, num_chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        int64_t j = chunk_valid[chunk];
        const int64_t end = std::min(n, (chunk + 1) * kChunk);
        for (int64_t i = chunk * kChunk; i < end; ++i) {
          if (key[i] >= kOutside) continue;
          out_keys[j] = static_cast<K>(key[i]);
          sidx[j++] = static_cast<int32_t>(i);
        }
      }
    });
  };
  if (max_key <= UINT32_MAX) {
    uint32_t* k32 = cpu::scratch(ws.k32, valid);
    uint32_t* k32_tmp = cpu::scratch(ws.k32_tmp, valid);
    compact(k32);
    cpu::radix_sort_pairs(k32, sidx, k32_tmp, sidx_tmp, valid, cpu::bit_width(max_key), ws.hist);
    at::parallel_for(0, valid, 1 << 15, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) skeys[j] = k32[j];
    });
  } else {
    compact(skeys);
    cpu::radix_sort_pairs(skeys, sidx, cpu::scratch(ws.skeys_tmp, valid), sidx_tmp, valid, cpu::bit_width(max_key),
                          ws.hist);
  }

  // 3. Runs = voxels (in key order); the first point of a run is its earliest point.  Run starts
  //    are marked per chunk in parallel, counted, then written in order.
  const int64_t rchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), valid / 16384));
  const int64_t rlen = (valid + rchunks - 1) / rchunks;
  int64_t* chunk_runs = cpu::scratch(ws.chunk_runs, rchunks + 1);
  chunk_runs[0] = 0;
  at::parallel_for(0, rchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t t = cb; t < ce; ++t) {
      int64_t cnt = 0;
      const int64_t end = std::min(valid, (t + 1) * rlen);
      for (int64_t j = t * rlen; j < end; ++j) cnt += (j == 0 || skeys[j] != skeys[j - 1]);
      chunk_runs[t + 1] = cnt;
    }
  });
  for (int64_t t = 0; t < rchunks; ++t) chunk_runs[t + 1] += chunk_runs[t];
  const int64_t v_all = chunk_runs[rchunks];
  int64_t* run_start = cpu::scratch(ws.run_start, v_all + 1);
  at::parallel_for(0, rchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t t = cb; t < ce; ++t) {
      int64_t r = chunk_runs[t];
      const int64_t end = std::min(valid, (t + 1) * rlen);
      for (int64_t j = t * rlen; j < end; ++j) {
        if (j == 0 || skeys[j] != skeys[j - 1]) run_start[r++] = j;
      }
    }
  });
  run_start[v_all] = valid;

  // 4. Voxels kept (the first max_voxels by first appearance) and the output order.
  const bool truncate = max_voxels >= 0 && v_all > max_voxels;
  const int64_t nv = truncate ? max_voxels : v_all;
  int64_t* order = cpu::scratch(ws.order, nv);  // output row -> run
  if (order_by_first || truncate) {
    uint32_t* first = cpu::scratch(ws.first, v_all);
    int64_t* runs = cpu::scratch(ws.runs, v_all);
    at::parallel_for(0, v_all, 1 << 14, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        first[r] = static_cast<uint32_t>(sidx[run_start[r]]);
        runs[r] = r;
      }
    });
    cpu::radix_sort_pairs(first, runs, cpu::scratch(ws.first_tmp, v_all), cpu::scratch(ws.runs_tmp, v_all), v_all,
                          cpu::bit_width(static_cast<uint64_t>(std::max<int64_t>(n, 1))), ws.hist);
    if (order_by_first) {
      std::copy(runs, runs + nv, order);
    } else {
      char* kept = cpu::scratch(ws.kept, v_all);
      std::fill(kept, kept + v_all, 0);
      for (int64_t j = 0; j < nv; ++j) kept[runs[j]] = 1;
      int64_t o = 0;
      for (int64_t r = 0; r < v_all; ++r) {
        if (kept[r]) order[o++] = r;
      }
    }
    // The points of the voxels beyond max_voxels are dropped.
    for (int64_t j = nv; j < v_all; ++j) {
      for (int64_t q = run_start[runs[j]]; q < run_start[runs[j] + 1]; ++q) {
        pv[sidx[q]] = -1;
      }
    }
  } else {
    for (int64_t r = 0; r < nv; ++r) order[r] = r;
  }

  // 5. Per voxel: coordinates, kept points, reduction.  Each voxel writes only its own rows.
  const int64_t f = reduce == kCount ? 1 : (reduce == kPad ? max_points * c : c);
  at::Tensor coords = at::empty({nv, 4}, points.options().dtype(at::kInt));
  at::Tensor feats = at::empty({nv, f}, points.options());
  at::Tensor counts = at::empty({nv}, points.options().dtype(at::kInt));
  int32_t* cp = coords.data_ptr<int32_t>();
  int32_t* cnt = counts.data_ptr<int32_t>();
  int64_t* over_points = cpu::scratch(ws.over_points, nv);
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "sparseconv_voxelize_reduce", [&] {
    const scalar_t* p = points.data_ptr<scalar_t>();
    scalar_t* fp = feats.data_ptr<scalar_t>();
    at::parallel_for(0, nv, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t v = begin; v < end; ++v) {
        const int64_t r = order[v], s = run_start[r], len = run_start[r + 1] - s;
        const int64_t take = max_points >= 0 ? std::min(len, max_points) : len;
        grid.decode(static_cast<int64_t>(skeys[s]), cp + 4 * v);
        cnt[v] = static_cast<int32_t>(take);
        over_points[v] = len - take;
        scalar_t* out = fp + v * f;
        for (int64_t j = 0; j < len; ++j) {
          const int64_t i = sidx[s + j];
          if (j >= take) {
            pv[i] = -1;
            continue;
          }
          pv[i] = v;
          const scalar_t* row = p + i * c;
          switch (reduce) {
            case kCount:
              break;
            case kPad:
              std::copy(row, row + c, out + j * c);
              break;
            case kFirst:
              if (j == 0) std::copy(row, row + c, out);
              break;
            case kMax:
              for (int64_t k = 0; k < c; ++k) out[k] = j == 0 ? row[k] : std::max(out[k], row[k]);
              break;
            case kMean:
            case kSum:
              for (int64_t k = 0; k < c; ++k) out[k] = j == 0 ? row[k] : out[k] + row[k];
              break;
          }
        }
        if (reduce == kCount) out[0] = static_cast<scalar_t>(take);
        if (reduce == kPad) std::fill(out + take * c, out + f, scalar_t(0));
        if (reduce == kMean) {
          const scalar_t inv = scalar_t(1) / static_cast<scalar_t>(take);
          for (int64_t k = 0; k < c; ++k) out[k] *= inv;
        }
      }
    });
  });

  int64_t dropped_voxels = 0, dropped_points = 0;
  for (int64_t v = 0; v < nv; ++v) dropped_points += over_points[v];
  dropped_voxels = valid - dropped_points;
  for (int64_t v = 0; v < nv; ++v) dropped_voxels -= cnt[v];
  at::Tensor drops = at::tensor({nonfinite, outside, dropped_voxels, dropped_points}, points.options().dtype(at::kLong));
  return {coords, feats, point_voxel, counts, drops};
}

TORCH_LIBRARY_IMPL(sparseconv, CPU, m) {
  m.impl("voxelize", &voxelize_cpu);
}

}  // namespace sparseconv
