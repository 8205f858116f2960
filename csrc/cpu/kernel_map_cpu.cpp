#include <algorithm>
#include <atomic>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../kernel_map.h"
#include "hash_table.h"
#include "radix_sort.h"

namespace sparseconv {

at::Tensor kmap_submanifold_cpu(const at::Tensor& keys_in, const at::Tensor& values_in, const at::Tensor& coords_in,
                                c10::IntArrayRef shape, c10::IntArrayRef kernel_size, c10::IntArrayRef dilation) {
  check_coords(coords_in, "kmap_submanifold", "coords");
  TORCH_CHECK_VALUE(keys_in.dim() == 1 && keys_in.scalar_type() == at::kLong && values_in.sizes() == keys_in.sizes(),
                    "sparseconv.kmap_submanifold: keys/values must be a hash_build table");
  const int64_t cap = keys_in.size(0);
  TORCH_CHECK_VALUE(cap >= 16 && (cap & (cap - 1)) == 0, "sparseconv.kmap_submanifold: not a hash_build table");
  const Grid grid = make_grid(shape);
  const int64_t one[3] = {1, 1, 1}, zero[3] = {0, 0, 0};
  const KernelGeom g = make_kernel_geom(kernel_size, one, zero, dilation);
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

  // Rows sorted by key (voxelize's output and every strided map's output are)
  // take a merge join instead of hash lookups: for a fixed (dx, dy) the query
  // keys key[i] + delta grow with i, so one forward-moving cursor per row
  // chunk finds every neighbour in a short sequential scan of the sorted keys.
  std::vector<int64_t> key(n);
  std::atomic<bool> unsorted{false};
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    bool local = false;
    for (int64_t i = begin; i < end; ++i) {
      const int32_t* r = c + 4 * i;
      TORCH_CHECK_VALUE(grid.contains(r[0], r[1], r[2], r[3]), "sparseconv.kmap_submanifold: coordinate at row ", i,
                        " is outside the grid ", shape);
      key[i] = grid.encode(r[0], r[1], r[2], r[3]);
    }
    for (int64_t i = std::max<int64_t>(begin, 1); i < end; ++i) local |= key[i - 1] >= key[i];
    if (local) unsorted = true;
  });

  if (!unsorted.load()) {
    const int64_t ks1 = g.ks[1], ks2 = g.ks[2];
    const int64_t zlo = -(ks2 / 2) * g.dil[2], zhi = (ks2 - 1 - ks2 / 2) * g.dil[2];
    const int64_t* kb = key.data();
    at::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t a = 0; a < g.ks[0]; ++a) {
        for (int64_t b = 0; b < ks1; ++b) {
          const int64_t k0 = (a * ks1 + b) * ks2;  // offset of (a, b, 0)
          if (k0 >= k_end && !(symmetric && k0 <= kvol / 2)) continue;
          const int64_t dx = disp[3 * k0], dy = disp[3 * k0 + 1];
          const int64_t delta = (dx * grid.Y + dy) * grid.Z;
          int64_t j = std::lower_bound(kb, kb + n, kb[begin] + delta + zlo) - kb;
          for (int64_t i = begin; i < end; ++i) {
            const int32_t* r = c + 4 * i;
            const int64_t x = r[1] + dx, y = r[2] + dy;
            if (x < 0 || x >= grid.X || y < 0 || y >= grid.Y) continue;
            const int64_t t = kb[i] + delta;
            while (j < n && kb[j] < t + zlo) ++j;
            for (int64_t jj = j; jj < n && kb[jj] <= t + zhi; ++jj) {
              const int64_t dz = kb[jj] - t, z = r[3] + dz;
              if (z < 0 || z >= grid.Z || dz % g.dil[2] != 0) continue;
              const int64_t k = k0 + dz / g.dil[2] + ks2 / 2;
              if (k >= k_end) continue;  // the mirrored half (symmetric) is written below
              map[i * kvol + k] = static_cast<int32_t>(jj);
              if (symmetric) map[jj * kvol + (kvol - 1 - k)] = static_cast<int32_t>(i);
            }
          }
        }
      }
      if (symmetric) {
        for (int64_t i = begin; i < end; ++i) map[i * kvol + kvol / 2] = static_cast<int32_t>(i);
      }
    });
    return nbmap;
  }

  // Unsorted rows: hash lookups.
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
  const StridedGeom geom =
      check_kmap_strided_args(coords_in, shape, out_spatial, kernel_size, stride, padding, dilation);
  const Grid in_grid = geom.in, out_grid = geom.out;
  const KernelGeom g = geom.g;
  const at::Tensor coords = coords_in.contiguous();
  const int64_t n = coords.size(0);
  const int64_t kvol = g.volume();
  const int32_t* c = coords.data_ptr<int32_t>();

  // The (kernel index, output coordinate) pairs of input row r along each axis:
  // at most ks[d] per axis, found with one division each; a row's targets are
  // their cartesian product, with offset k = (kx * KY + ky) * KZ + kz.
  struct Axes {
    std::vector<int32_t> kk[3], v[3];
    int64_t n[3];
    explicit Axes(const KernelGeom& g) {
      for (int d = 0; d < 3; ++d) {
        kk[d].resize(g.ks[d]);
        v[d].resize(g.ks[d]);
      }
    }
    int64_t count() const { return n[0] * n[1] * n[2]; }
  };
  auto axes_of = [&](const int32_t* r, Axes& ax) {
    for (int d = 0; d < 3; ++d) {
      const int64_t x = r[1 + d], s = g.stride[d], lim = out_spatial[d], dil = g.dil[d];
      int64_t cnt = 0;
      if (transposed) {
        for (int64_t kd = 0; kd < g.ks[d]; ++kd) {
          const int64_t v = x * s - g.pad[d] + kd * dil;
          if (v < 0 || v >= lim) continue;
          ax.kk[d][cnt] = static_cast<int32_t>(kd);
          ax.v[d][cnt] = static_cast<int32_t>(v);
          ++cnt;
        }
      } else if (dil == 1) {
        // x + pad - kd = v * s: kd runs from (x + pad) mod s in steps of s, v down from (x + pad) div s.
        const uint32_t xp = static_cast<uint32_t>(x + g.pad[d]);  // >= 0 and < 2^32 (check_triple bounds pad)
        const uint32_t q = xp / static_cast<uint32_t>(s), rem = xp - q * static_cast<uint32_t>(s);
        for (int64_t kd = rem, v = q; kd < g.ks[d] && v >= 0; kd += s, --v) {
          if (v >= lim) continue;
          ax.kk[d][cnt] = static_cast<int32_t>(kd);
          ax.v[d][cnt] = static_cast<int32_t>(v);
          ++cnt;
        }
      } else {
        for (int64_t kd = 0; kd < g.ks[d]; ++kd) {
          const int64_t num = x + g.pad[d] - kd * dil;
          if (num < 0) break;  // num decreases with kd
          const uint32_t v = static_cast<uint32_t>(num) / static_cast<uint32_t>(s);
          if (static_cast<int64_t>(v) * s != num || v >= lim) continue;
          ax.kk[d][cnt] = static_cast<int32_t>(kd);
          ax.v[d][cnt] = static_cast<int32_t>(v);
          ++cnt;
        }
      }
      ax.n[d] = cnt;
    }
  };

  // Pass 1: candidates per input row.
  std::vector<int64_t> start(n + 1, 0);
  at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
    Axes ax(g);
    for (int64_t i = begin; i < end; ++i) {
      const int32_t* r = c + 4 * i;
      TORCH_CHECK_VALUE(in_grid.contains(r[0], r[1], r[2], r[3]), "sparseconv.kmap_strided: coordinate at row ", i,
                        " is outside the input grid ", shape);
      axes_of(r, ax);
      start[i + 1] = ax.count();
    }
  });
  for (int64_t i = 0; i < n; ++i) start[i + 1] += start[i];
  const int64_t num_cand = start[n];

  // Pass 2: every candidate as (output key, input row << 32 | offset).
  std::vector<int64_t> ckey(num_cand), cval(num_cand);
  at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
    Axes ax(g);
    for (int64_t i = begin; i < end; ++i) {
      const int32_t* r = c + 4 * i;
      axes_of(r, ax);
      int64_t p = start[i];
      for (int64_t a = 0; a < ax.n[0]; ++a) {
        for (int64_t b = 0; b < ax.n[1]; ++b) {
          const int64_t kxy = ax.kk[0][a] * g.ks[1] + ax.kk[1][b];
          const int64_t key_xy = (r[0] * out_grid.X + ax.v[0][a]) * out_grid.Y + ax.v[1][b];
          for (int64_t e = 0; e < ax.n[2]; ++e) {
            ckey[p] = key_xy * out_grid.Z + ax.v[2][e];
            cval[p] = (i << 32) | (kxy * g.ks[2] + ax.kk[2][e]);
            ++p;
          }
        }
      }
    }
  });

  // Pass 3: a stable radix sort by output key; equal keys are adjacent, in
  // input-row order, and the distinct keys in sorted order are the output rows.
  {
    std::vector<int64_t> ktmp(num_cand), vtmp(num_cand), hist;
    const int bits = cpu::bit_width(static_cast<uint64_t>(out_grid.B * out_grid.X * out_grid.Y * out_grid.Z - 1));
    cpu::radix_sort_pairs(ckey.data(), cval.data(), ktmp.data(), vtmp.data(), num_cand, bits, hist);
  }
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_cand / 16384));
  const int64_t chunk_len = (num_cand + chunks - 1) / chunks;
  std::vector<int64_t> heads(chunks + 1, 0);  // distinct keys starting in each chunk, then their prefix sum
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t t = cb; t < ce; ++t) {
      int64_t h = 0;
      for (int64_t p = t * chunk_len; p < std::min(num_cand, (t + 1) * chunk_len); ++p) h += p == 0 || ckey[p] != ckey[p - 1];
      heads[t + 1] = h;
    }
  });
  for (int64_t t = 0; t < chunks; ++t) heads[t + 1] += heads[t];
  const int64_t m = heads[chunks];
  TORCH_CHECK_VALUE(m <= INT32_MAX, "sparseconv: more than 2^31 - 1 output voxels are not supported");

  // Pass 4: output coordinates (from the first candidate of each key, without
  // decoding keys) and the map; (output row, k) cells are distinct (kernel_map.h).
  at::Tensor out_coords = at::empty({m, 4}, coords.options());
  at::Tensor nbmap = at::full({m, kvol}, -1, coords.options().dtype(at::kInt));
  int32_t* oc = out_coords.data_ptr<int32_t>();
  int32_t* map = nbmap.data_ptr<int32_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t t = cb; t < ce; ++t) {
      int64_t row = heads[t] - 1;
      for (int64_t p = t * chunk_len; p < std::min(num_cand, (t + 1) * chunk_len); ++p) {
        const int64_t i = cval[p] >> 32, k = cval[p] & 0xFFFFFFFF;
        if (p == 0 || ckey[p] != ckey[p - 1]) {
          ++row;
          const int32_t* r = c + 4 * i;
          int64_t kk[3];
          g.offset(k, kk);
          oc[4 * row] = r[0];
          for (int d = 0; d < 3; ++d) {
            oc[4 * row + 1 + d] = static_cast<int32_t>(
                transposed ? r[1 + d] * g.stride[d] - g.pad[d] + kk[d] * g.dil[d]
                           : (r[1 + d] + g.pad[d] - kk[d] * g.dil[d]) / g.stride[d]);
          }
        }
        map[row * kvol + k] = static_cast<int32_t>(i);
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
