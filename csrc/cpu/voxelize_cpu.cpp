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

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> voxelize_cpu(
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

  // Per-point outputs: every entry is written exactly once below.
  at::Tensor point_voxel = at::empty({n}, points.options().dtype(at::kLong));
  at::Tensor point_rank = at::empty({n}, points.options().dtype(at::kInt));
  int64_t* pv = point_voxel.data_ptr<int64_t>();
  int32_t* pr = point_rank.data_ptr<int32_t>();

  // 1. Key of each point (or a drop code), and per-chunk counts of valid points.
  constexpr int64_t kChunk = 16384;
  const int64_t num_chunks = (n + kChunk - 1) / kChunk;
  std::unique_ptr<uint64_t[]> key(new uint64_t[std::max<int64_t>(n, 1)]);
  std::vector<int64_t> chunk_valid(num_chunks + 1, 0), chunk_nonfinite(num_chunks, 0);
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "sparseconv_voxelize_keys", [&] {
    const scalar_t* p = points.data_ptr<scalar_t>();
    const scalar_t lo[3] = {static_cast<scalar_t>(lower[0]), static_cast<scalar_t>(lower[1]),
                            static_cast<scalar_t>(lower[2])};
    const scalar_t vs[3] = {static_cast<scalar_t>(voxel_size[0]), static_cast<scalar_t>(voxel_size[1]),
                            static_cast<scalar_t>(voxel_size[2])};
    const scalar_t g[3] = {static_cast<scalar_t>(grid.X), static_cast<scalar_t>(grid.Y),
                           static_cast<scalar_t>(grid.Z)};
    at::parallel_for(0, num_chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        int64_t valid = 0, nonfinite = 0;
        const int64_t end = std::min(n, (chunk + 1) * kChunk);
        for (int64_t i = chunk * kChunk; i < end; ++i) {
          const scalar_t* r = p + i * c;
          // NaN fails every comparison and inf lands outside: one test covers both; the rare
          // rejected point is then classified.
          const scalar_t qx = std::floor((r[0] - lo[0]) / vs[0]);
          const scalar_t qy = std::floor((r[1] - lo[1]) / vs[1]);
          const scalar_t qz = std::floor((r[2] - lo[2]) / vs[2]);
          const bool inside = qx >= scalar_t(0) && qx < g[0] && qy >= scalar_t(0) && qy < g[1] &&
                              qz >= scalar_t(0) && qz < g[2];
          if (!inside) {
            const bool finite = std::isfinite(r[0]) && std::isfinite(r[1]) && std::isfinite(r[2]);
            key[i] = finite ? kOutside : kNonFinite;
            nonfinite += !finite;
            pv[i] = -1;
            pr[i] = -1;
            continue;
          }
          key[i] = static_cast<uint64_t>(grid.encode(bp ? bp[i] : 0, static_cast<int64_t>(qx),
                                                     static_cast<int64_t>(qy), static_cast<int64_t>(qz)));
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
  std::vector<uint64_t> skeys(valid);
  std::vector<int32_t> sidx(valid);
  auto compact = [&](auto* out_keys) {
    at::parallel_for(0, num_chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        int64_t j = chunk_valid[chunk];
        const int64_t end = std::min(n, (chunk + 1) * kChunk);
        for (int64_t i = chunk * kChunk; i < end; ++i) {
          if (key[i] >= kOutside) continue;
          out_keys[j] = static_cast<std::remove_pointer_t<decltype(out_keys)>>(key[i]);
          sidx[j++] = static_cast<int32_t>(i);
        }
      }
    });
  };
  if (max_key <= UINT32_MAX) {
    std::vector<uint32_t> k32(valid);
    compact(k32.data());
    cpu::radix_sort_pairs(k32, sidx, cpu::bit_width(max_key));
    at::parallel_for(0, valid, 1 << 15, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) skeys[j] = k32[j];
    });
  } else {
    compact(skeys.data());
    cpu::radix_sort_pairs(skeys, sidx, cpu::bit_width(max_key));
  }

  // 3. Runs = voxels (in key order); the first point of a run is its earliest point.
  //    Run starts are found per chunk in parallel, then concatenated.
  const int64_t rchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), valid / 16384));
  const int64_t rlen = (valid + rchunks - 1) / rchunks;
  std::vector<std::vector<int64_t>> starts(rchunks);
  at::parallel_for(0, rchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t t = cb; t < ce; ++t) {
      const int64_t end = std::min(valid, (t + 1) * rlen);
      starts[t].reserve((end - t * rlen) / 2 + 1);
      for (int64_t j = t * rlen; j < end; ++j) {
        if (j == 0 || skeys[j] != skeys[j - 1]) starts[t].push_back(j);
      }
    }
  });
  std::vector<int64_t> run_start;
  {
    size_t total = 1;
    for (const auto& s : starts) total += s.size();
    run_start.reserve(total);
    for (const auto& s : starts) run_start.insert(run_start.end(), s.begin(), s.end());
  }
  const int64_t v_all = static_cast<int64_t>(run_start.size());
  run_start.push_back(valid);

  // 4. Voxels kept (the first max_voxels by first appearance) and the output order.
  std::vector<int64_t> order;  // output row -> run
  order.reserve(v_all);
  const bool truncate = max_voxels >= 0 && v_all > max_voxels;
  if (order_by_first || truncate) {
    std::vector<uint64_t> first(v_all);
    std::vector<int64_t> runs(v_all);
    for (int64_t r = 0; r < v_all; ++r) {
      first[r] = static_cast<uint64_t>(sidx[run_start[r]]);
      runs[r] = r;
    }
    cpu::radix_sort_pairs(first, runs, cpu::bit_width(static_cast<uint64_t>(std::max<int64_t>(n, 1))));
    const int64_t keep = truncate ? max_voxels : v_all;
    if (order_by_first) {
      order.assign(runs.begin(), runs.begin() + keep);
    } else {
      std::vector<char> kept(v_all, 0);
      for (int64_t j = 0; j < keep; ++j) kept[runs[j]] = 1;
      for (int64_t r = 0; r < v_all; ++r) {
        if (kept[r]) order.push_back(r);
      }
    }
    // The points of the voxels beyond max_voxels are dropped.
    for (int64_t j = keep; j < v_all; ++j) {
      for (int64_t q = run_start[runs[j]]; q < run_start[runs[j] + 1]; ++q) {
        pv[sidx[q]] = -1;
        pr[sidx[q]] = -1;
      }
    }
  } else {
    for (int64_t r = 0; r < v_all; ++r) order.push_back(r);
  }
  const int64_t nv = static_cast<int64_t>(order.size());

  // 5. Per voxel: coordinates, kept points, reduction.  Each voxel writes only its own rows.
  const int64_t f = reduce == kCount ? 1 : (reduce == kPad ? max_points * c : c);
  at::Tensor coords = at::empty({nv, 4}, points.options().dtype(at::kInt));
  at::Tensor feats = at::empty({nv, f}, points.options());
  at::Tensor counts = at::empty({nv}, points.options().dtype(at::kInt));
  int32_t* cp = coords.data_ptr<int32_t>();
  int32_t* cnt = counts.data_ptr<int32_t>();
  std::vector<int64_t> over_points(nv, 0);
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
            pr[i] = -1;
            continue;
          }
          pv[i] = v;
          pr[i] = static_cast<int32_t>(j);
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
  dropped_voxels = static_cast<int64_t>(skeys.size()) - dropped_points;
  for (int64_t v = 0; v < nv; ++v) dropped_voxels -= cnt[v];
  at::Tensor drops = at::tensor({nonfinite, outside, dropped_voxels, dropped_points}, points.options().dtype(at::kLong));
  return {coords, feats, point_voxel, point_rank, counts, drops};
}

TORCH_LIBRARY_IMPL(sparseconv, CPU, m) {
  m.impl("voxelize", &voxelize_cpu);
}

}  // namespace sparseconv
