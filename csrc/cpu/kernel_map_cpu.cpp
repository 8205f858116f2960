#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../kernel_map.h"
#include "hash_table.h"

namespace sparseconv {

namespace {

KernelGeom make_geom(c10::IntArrayRef ks, c10::IntArrayRef stride, c10::IntArrayRef pad, c10::IntArrayRef dil) {
  check_triple(ks, "kernel_size", 1);
  check_triple(stride, "stride", 1);
  check_triple(pad, "padding", 0);
  check_triple(dil, "dilation", 1);
  KernelGeom g;
  for (int d = 0; d < 3; ++d) {
    g.ks[d] = ks[d];
    g.stride[d] = stride[d];
    g.pad[d] = pad[d];
    g.dil[d] = dil[d];
  }
  TORCH_CHECK_VALUE(g.volume() <= INT32_MAX, "sparseconv: kernel volume ", g.volume(), " is too large");
  return g;
}

}  // namespace

at::Tensor kmap_submanifold_cpu(const at::Tensor& keys_in, const at::Tensor& values_in, const at::Tensor& coords_in,
                                c10::IntArrayRef shape, c10::IntArrayRef kernel_size, c10::IntArrayRef dilation) {
  check_coords(coords_in, "kmap_submanifold", "coords");
  TORCH_CHECK_VALUE(keys_in.dim() == 1 && keys_in.scalar_type() == at::kLong && values_in.sizes() == keys_in.sizes(),
                    "sparseconv.kmap_submanifold: keys/values must be a hash_build table");
  const int64_t cap = keys_in.size(0);
  TORCH_CHECK_VALUE(cap >= 16 && (cap & (cap - 1)) == 0, "sparseconv.kmap_submanifold: not a hash_build table");
  const Grid grid = make_grid(shape);
  const int64_t one[3] = {1, 1, 1}, zero[3] = {0, 0, 0};
  const KernelGeom g = make_geom(kernel_size, one, zero, dilation);
  const at::Tensor keys = keys_in.contiguous(), values = values_in.contiguous(), coords = coords_in.contiguous();
  const int64_t n = coords.size(0);
  TORCH_CHECK_VALUE(n <= INT32_MAX, "sparseconv: more than 2^31 - 1 voxels are not supported");
  const int64_t kvol = g.volume();
  at::Tensor nbmap = at::full({n, kvol}, -1, coords.options().dtype(at::kInt));
  if (n == 0) return nbmap;

  const int64_t* kp = keys.data_ptr<int64_t>();
  const int64_t* vp = values.data_ptr<int64_t>();
  const int32_t* c = coords.data_ptr<int32_t>();
  int32_t* map = nbmap.data_ptr<int32_t>();
  // The symmetric fill writes rows named by the table, so the table must be exactly this set.
  {
    int64_t entries = 0;
    bool bad = false;
    for (int64_t s = 0; s < cap; ++s) {
      if (kp[s] == kEmptyKey) continue;
      ++entries;
      bad |= vp[s] < 0 || vp[s] >= n;
    }
    TORCH_CHECK_VALUE(entries == n && !bad, "sparseconv.kmap_submanifold: the hash table holds ", entries,
                      " coordinates but coords has ", n, " rows; pass the coords the table was built from");
  }

  // Per-offset displacement.
  std::vector<int64_t> disp(3 * kvol);
  for (int64_t k = 0; k < kvol; ++k) {
    int64_t o[3];
    g.offset(k, o);
    for (int d = 0; d < 3; ++d) disp[3 * k + d] = (o[d] - g.ks[d] / 2) * g.dil[d];
  }
  // Odd kernels are symmetric: offset K-1-k is the negation of offset k, so
  // a hit (i --k--> j) is also the hit (j --(K-1-k)--> i).  Only the first
  // half of the offsets is looked up; each write goes to a distinct cell.
  const bool symmetric = (g.ks[0] % 2) && (g.ks[1] % 2) && (g.ks[2] % 2);
  const int64_t k_end = symmetric ? kvol / 2 : kvol;

  at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int32_t* r = c + 4 * i;
      for (int64_t k = 0; k < k_end; ++k) {
        const int64_t x = r[1] + disp[3 * k], y = r[2] + disp[3 * k + 1], z = r[3] + disp[3 * k + 2];
        if (!grid.contains(r[0], x, y, z)) continue;
        const int64_t slot = cpu::table_find(kp, cap, grid.encode(r[0], x, y, z));
        if (slot < 0) continue;
        const int64_t j = vp[slot];
        map[i * kvol + k] = static_cast<int32_t>(j);
        if (symmetric) map[j * kvol + (kvol - 1 - k)] = static_cast<int32_t>(i);
      }
      if (symmetric) map[i * kvol + kvol / 2] = static_cast<int32_t>(i);
    }
  });
  return nbmap;
}

std::tuple<at::Tensor, at::Tensor> kmap_strided_cpu(const at::Tensor& coords_in, c10::IntArrayRef shape,
                                                    c10::IntArrayRef out_spatial, c10::IntArrayRef kernel_size,
                                                    c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                    c10::IntArrayRef dilation, bool transposed) {
  check_coords(coords_in, "kmap_strided", "coords");
  const Grid in_grid = make_grid(shape);
  check_triple(out_spatial, "out_spatial_shape", 1, INT32_MAX);
  const Grid out_grid = make_grid({shape[0], out_spatial[0], out_spatial[1], out_spatial[2]});
  const KernelGeom g = make_geom(kernel_size, stride, padding, dilation);
  const at::Tensor coords = coords_in.contiguous();
  const int64_t n = coords.size(0);
  TORCH_CHECK_VALUE(n <= INT32_MAX, "sparseconv: more than 2^31 - 1 voxels are not supported");
  const int64_t kvol = g.volume();
  const int32_t* c = coords.data_ptr<int32_t>();

  // Output coordinate of input row i through offset k, or false.
  auto target = [&](const int32_t* r, int64_t k, int64_t* o) -> bool {
    int64_t kk[3];
    g.offset(k, kk);
    for (int d = 0; d < 3; ++d) {
      const int64_t x = r[1 + d];
      int64_t v;
      if (transposed) {
        v = x * g.stride[d] - g.pad[d] + kk[d] * g.dil[d];
      } else {
        const int64_t num = x + g.pad[d] - kk[d] * g.dil[d];
        if (num < 0 || num % g.stride[d] != 0) return false;
        v = num / g.stride[d];
      }
      if (v < 0 || v >= out_spatial[d]) return false;
      o[d] = v;
    }
    return true;
  };

  // Pass 1: candidates per input row.
  std::vector<int64_t> start(n + 1, 0);
  at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int32_t* r = c + 4 * i;
      TORCH_CHECK_VALUE(in_grid.contains(r[0], r[1], r[2], r[3]), "sparseconv.kmap_strided: coordinate at row ", i,
                        " is outside the input grid ", shape);
      int64_t cnt = 0, o[3];
      for (int64_t k = 0; k < kvol; ++k) cnt += target(r, k, o);
      start[i + 1] = cnt;
    }
  });
  for (int64_t i = 0; i < n; ++i) start[i + 1] += start[i];
  const int64_t num_cand = start[n];

  // Pass 2: insert candidate output keys into a hash table, remember each slot.
  const int64_t cap = cpu::table_capacity(num_cand);
  std::vector<int64_t> tkeys(cap, kEmptyKey);
  std::vector<int64_t> cand_slot(num_cand);
  std::vector<int32_t> cand_k(num_cand);
  std::atomic<bool> full{false};
  at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int32_t* r = c + 4 * i;
      int64_t p = start[i], o[3];
      for (int64_t k = 0; k < kvol; ++k) {
        if (!target(r, k, o)) continue;
        bool existed;
        const int64_t slot = cpu::table_insert(tkeys.data(), cap, out_grid.encode(r[0], o[0], o[1], o[2]), &existed);
        if (slot < 0) full = true;
        cand_slot[p] = slot;
        cand_k[p] = static_cast<int32_t>(k);
        ++p;
      }
    }
  });
  TORCH_CHECK(!full.load(), "sparseconv: kernel-map hash table is full (internal error)");

  // Pass 3: the distinct output keys, sorted, give the output rows.
  std::vector<std::pair<int64_t, int64_t>> uniq;  // (key, slot)
  uniq.reserve(std::min<int64_t>(num_cand, cap));
  for (int64_t s = 0; s < cap; ++s) {
    if (tkeys[s] != kEmptyKey) uniq.emplace_back(tkeys[s], s);
  }
  std::sort(uniq.begin(), uniq.end());
  const int64_t m = static_cast<int64_t>(uniq.size());
  TORCH_CHECK_VALUE(m <= INT32_MAX, "sparseconv: more than 2^31 - 1 output voxels are not supported");
  std::vector<int32_t> slot_row(cap, -1);
  at::Tensor out_coords = at::empty({m, 4}, coords.options());
  int32_t* oc = out_coords.data_ptr<int32_t>();
  at::parallel_for(0, m, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      slot_row[uniq[j].second] = static_cast<int32_t>(j);
      out_grid.decode(uniq[j].first, oc + 4 * j);
    }
  });

  // Pass 4: fill the map; (output row, k) cells are distinct (kernel_map.h).
  at::Tensor nbmap = at::full({m, kvol}, -1, coords.options().dtype(at::kInt));
  int32_t* map = nbmap.data_ptr<int32_t>();
  at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t p = start[i]; p < start[i + 1]; ++p) {
        map[static_cast<int64_t>(slot_row[cand_slot[p]]) * kvol + cand_k[p]] = static_cast<int32_t>(i);
      }
    }
  });
  return {out_coords, nbmap};
}

TORCH_LIBRARY_IMPL(sparseconv, CPU, m) {
  m.impl("kmap_submanifold", &kmap_submanifold_cpu);
  m.impl("kmap_strided", &kmap_strided_cpu);
}

}  // namespace sparseconv
