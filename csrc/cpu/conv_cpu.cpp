#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../conv.h"
#include "gemm_rows.h"
#include "pairs.h"

namespace sparseconv {

namespace {

template <typename scalar_t>
void gather_rows(const scalar_t* src, int64_t ld, const int32_t* idx, int64_t n, scalar_t* dst) {
  at::parallel_for(0, n, 256, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) std::memcpy(dst + j * ld, src + static_cast<int64_t>(idx[j]) * ld, ld * sizeof(scalar_t));
  });
}

// Rows of idx are distinct (kernel_map.h), so the parallel scatter is race-free.
template <typename scalar_t>
void scatter_add_rows(const scalar_t* src, int64_t ld, const int32_t* idx, int64_t n, scalar_t* dst) {
  at::parallel_for(0, n, 256, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      scalar_t* d = dst + static_cast<int64_t>(idx[j]) * ld;
      const scalar_t* s = src + j * ld;
      for (int64_t c = 0; c < ld; ++c) d[c] += s[c];
    }
  });
}



// ---------------------------------------------------------------- float32: fused, output-stationary
//
// Output rows go in tiles of kTile; for each tile and offset k the rows with a
// neighbour at k are gathered by pointer (no copy) and multiplied by weight[k]
// straight into the tile (gemm_rows.h), which stays in cache while all K
// offsets accumulate into it.  Threads own whole tiles, so there are no races
// and no scatter buffer; the result does not depend on the thread count (each
// output element sums its offsets in order k = 0..K-1).
constexpr int64_t kTile = 128;

void fused_conv_f32(const at::Tensor& feats, const at::Tensor& weight, const int32_t* map, int64_t m, int64_t kvol,
                    at::Tensor& out, const char* op) {
  const int64_t n_src = feats.size(0), cin = feats.size(1), cout = weight.size(2);
  const float* f = feats.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const cpu::GemmRowsFn gemm = cpu::gemm_rows_f32();
  const int64_t tiles = (m + kTile - 1) / kTile;
  std::atomic<bool> bad{false};
  at::parallel_for(0, tiles, 1, [&](int64_t tb, int64_t te) {
    // Per-offset lists of the tile's (input row, output row) pointers, filled in one row-major pass.
    std::vector<const float*> a(kvol * kTile);
    std::vector<float*> c(kvol * kTile);
    std::vector<int64_t> cnt(kvol);
    bool local_bad = false;
    for (int64_t t = tb; t < te; ++t) {
      const int64_t r0 = t * kTile, rows = std::min(kTile, m - r0);
      std::fill(o + r0 * cout, o + (r0 + rows) * cout, 0.f);
      std::fill(cnt.begin(), cnt.end(), 0);
      const int32_t* mp = map + r0 * kvol;
      for (int64_t r = 0; r < rows; ++r) {
        float* orow = o + (r0 + r) * cout;
        for (int64_t k = 0; k < kvol; ++k) {
          const int32_t v = mp[r * kvol + k];
          if (v < 0 || v >= n_src) {
            local_bad |= v != -1;
            continue;
          }
          const int64_t j = k * kTile + cnt[k]++;
          a[j] = f + static_cast<int64_t>(v) * cin;
          c[j] = orow;
        }
      }
      for (int64_t k = 0; k < kvol; ++k) {
        if (cnt[k] > 0) gemm(cnt[k], cout, cin, a.data() + k * kTile, w + k * cin * cout, cout, c.data() + k * kTile);
      }
    }
    if (local_bad) bad = true;
  });
  TORCH_CHECK_VALUE(!bad.load(), "sparseconv.", op, ": kernel map entries must be -1 or row indices below ", n_src,
                    "; the map does not belong to these features");
}

// The map read backwards as a forward map: t[i, k] = o where map[o, k] = i.
// Within one offset an input row feeds at most one output (kernel_map.h), so
// a repeated entry in a column means a corrupt map and is an error.
at::Tensor transpose_map(const int32_t* map, int64_t m, int64_t kvol, int64_t n_out, const char* op) {
  at::Tensor t = at::full({n_out, kvol}, -1, at::TensorOptions().dtype(at::kInt));
  int32_t* tp = t.data_ptr<int32_t>();
  std::atomic<int> bad{0};  // 1: out of range, 2: repeated
  at::parallel_for(0, kvol, 1, [&](int64_t kb, int64_t ke) {
    int local = 0;
    for (int64_t o = 0; o < m; ++o) {
      for (int64_t k = kb; k < ke; ++k) {
        const int32_t v = map[o * kvol + k];
        if (v < 0 || v >= n_out) {
          if (v != -1) local |= 1;
          continue;
        }
        int32_t& cell = tp[static_cast<int64_t>(v) * kvol + k];
        if (cell != -1) local |= 2;
        cell = static_cast<int32_t>(o);
      }
    }
    if (local) bad |= local;
  });
  TORCH_CHECK_VALUE(!(bad.load() & 1), "sparseconv.", op, ": kernel map entries must be -1 or row indices below ",
                    n_out, "; the map does not belong to these features");
  TORCH_CHECK_VALUE(!(bad.load() & 2), "sparseconv.", op,
                    ": the kernel map repeats a row within one kernel offset, which no convolution produces; "
                    "the map is corrupt");
  return t;
}

// Weight gradient (float32), parallel over kernel offsets: each offset's
// pairs go in chunks small enough that their feature and gradient rows stay in
// cache while gemm_pairs (gemm_rows.h) sweeps grad_weight[k] in register
// blocks, reading the rows through pointers (no packing).  Every offset's sum
// runs over its pairs in order, so results do not depend on the thread count.
void fused_weight_grad_f32(const float* f, int64_t cin, const float* g, int64_t cout, const Pairs& pairs,
                           int64_t kvol, float* gw) {
  const cpu::GemmPairsFn gemm = cpu::gemm_pairs_f32();
  constexpr int64_t kChunk = 96;
  at::parallel_for(0, kvol, 1, [&](int64_t kb, int64_t ke) {
    const float* a_ptrs[kChunk];
    const float* b_ptrs[kChunk];
    for (int64_t k = kb; k < ke; ++k) {
      float* gk = gw + k * cin * cout;
      std::fill(gk, gk + cin * cout, 0.f);
      const int32_t* src = pairs.src.data() + pairs.start[k];
      const int32_t* dst = pairs.dst.data() + pairs.start[k];
      const int64_t nk = pairs.count(k);
      for (int64_t j0 = 0; j0 < nk; j0 += kChunk) {
        const int64_t nc = std::min(kChunk, nk - j0);
        for (int64_t j = 0; j < nc; ++j) {
          a_ptrs[j] = f + static_cast<int64_t>(src[j0 + j]) * cin;
          b_ptrs[j] = g + static_cast<int64_t>(dst[j0 + j]) * cout;
        }
        gemm(cin, cout, nc, a_ptrs, b_ptrs, gk, cout);
      }
    }
  });
}

}  // namespace

namespace {

// conv_forward, with `op` naming the public op in error messages.
at::Tensor conv_forward_impl(const at::Tensor& feats_in, const at::Tensor& weight, const at::Tensor& nbmap_in,
                             int64_t num_out, bool transposed, const char* op) {
  check_conv_args(op, feats_in, weight, nbmap_in);
  check_cpu_dtype(feats_in, op);
  const int64_t m = nbmap_in.size(0), kvol = nbmap_in.size(1);
  const int64_t n_src = feats_in.size(0);
  if (transposed) {
    TORCH_CHECK_VALUE(n_src == m, "sparseconv.", op, ": the kernel map has ", m, " rows but the features have ",
                      n_src);
    TORCH_CHECK_VALUE(num_out >= 0, "sparseconv.", op, ": the output row count must be >= 0, got ", num_out);
  } else {
    TORCH_CHECK_VALUE(num_out == m, "sparseconv.", op, ": the output row count is ", num_out,
                      " but the kernel map has ", m, " rows");
  }
  const at::Tensor feats = feats_in.contiguous(), nbmap = nbmap_in.contiguous();
  const int64_t cin = feats.size(1), cout = weight.size(2);
  if (feats.scalar_type() == at::kFloat && num_out > 0 && cout > 0) {
    at::Tensor out = at::empty({num_out, cout}, feats.options());
    const at::Tensor w = weight.contiguous();
    if (transposed) {
      const at::Tensor t = transpose_map(nbmap.data_ptr<int32_t>(), m, kvol, num_out, op);
      fused_conv_f32(feats, w, t.data_ptr<int32_t>(), num_out, kvol, out, op);
    } else {
      fused_conv_f32(feats, w, nbmap.data_ptr<int32_t>(), m, kvol, out, op);
    }
    return out;
  }
  at::Tensor out = at::zeros({num_out, cout}, feats.options());
  if (m == 0 || num_out == 0 || cout == 0) return out;

  const Pairs pairs = make_pairs(nbmap.data_ptr<int32_t>(), m, kvol, transposed, transposed ? num_out : n_src, op);
  const int64_t max_n = pairs.max_count();
  at::Tensor abuf = at::empty({max_n, cin}, feats.options());
  at::Tensor pbuf = at::empty({max_n, cout}, feats.options());

  AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "sparseconv_conv_forward", [&] {
    for (int64_t k = 0; k < kvol; ++k) {
      const int64_t nk = pairs.count(k);
      if (nk == 0) continue;
      const int32_t* src = pairs.src.data() + pairs.start[k];
      const int32_t* dst = pairs.dst.data() + pairs.start[k];
      if (pairs.is_identity(k, n_src, num_out)) {
        out.addmm_(feats, weight[k]);
        continue;
      }
      at::Tensor a = abuf.narrow(0, 0, nk), p = pbuf.narrow(0, 0, nk);
      gather_rows<scalar_t>(feats.data_ptr<scalar_t>(), cin, src, nk, a.data_ptr<scalar_t>());
      at::mm_out(p, a, weight[k]);
      scatter_add_rows<scalar_t>(p.data_ptr<scalar_t>(), cout, dst, nk, out.data_ptr<scalar_t>());
    }
  });
  return out;
}

}  // namespace

at::Tensor conv_forward_cpu(const at::Tensor& feats, const at::Tensor& weight, const at::Tensor& nbmap,
                            int64_t num_out, bool transposed) {
  return conv_forward_impl(feats, weight, nbmap, num_out, transposed, "conv_forward");
}

at::Tensor conv_input_grad_cpu(const at::Tensor& grad_out, const at::Tensor& weight, const at::Tensor& nbmap,
                               int64_t num_in, bool transposed) {
  TORCH_CHECK_VALUE(weight.dim() == 3, "sparseconv.conv_input_grad: weight must be [K, C_in, C_out], got shape ",
                    weight.sizes());
  return conv_forward_impl(grad_out, weight.transpose(1, 2), nbmap, num_in, !transposed, "conv_input_grad");
}

at::Tensor conv_weight_grad_cpu(const at::Tensor& feats_in, const at::Tensor& grad_in, const at::Tensor& nbmap_in,
                                bool transposed) {
  const char* op = "conv_weight_grad";
  check_weight_grad_args(op, feats_in, grad_in, nbmap_in, transposed);
  check_cpu_dtype(feats_in, op);
  const int64_t m = nbmap_in.size(0), kvol = nbmap_in.size(1);
  const at::Tensor feats = feats_in.contiguous(), grad = grad_in.contiguous(), nbmap = nbmap_in.contiguous();
  const int64_t cin = feats.size(1), cout = grad.size(1);
  at::Tensor gw = at::zeros({kvol, cin, cout}, feats.options());
  if (m == 0) return gw;
  const int64_t n_feat = feats.size(0), n_grad = grad.size(0);
  const Pairs pairs = make_pairs(nbmap.data_ptr<int32_t>(), m, kvol, transposed, transposed ? n_grad : n_feat, op);
  if (feats.scalar_type() == at::kFloat && cin > 0 && cout > 0) {
    fused_weight_grad_f32(feats.data_ptr<float>(), cin, grad.data_ptr<float>(), cout, pairs, kvol,
                          gw.data_ptr<float>());
    return gw;
  }
  const int64_t max_n = pairs.max_count();
  at::Tensor abuf = at::empty({max_n, cin}, feats.options());
  at::Tensor bbuf = at::empty({max_n, cout}, feats.options());
  AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "sparseconv_conv_weight_grad", [&] {
    for (int64_t k = 0; k < kvol; ++k) {
      const int64_t nk = pairs.count(k);
      if (nk == 0) continue;
      at::Tensor gk = gw[k];
      if (pairs.is_identity(k, n_feat, n_grad)) {
        at::mm_out(gk, feats.t(), grad);
        continue;
      }
      at::Tensor a = abuf.narrow(0, 0, nk), b = bbuf.narrow(0, 0, nk);
      gather_rows<scalar_t>(feats.data_ptr<scalar_t>(), cin, pairs.src.data() + pairs.start[k], nk,
                            a.data_ptr<scalar_t>());
      gather_rows<scalar_t>(grad.data_ptr<scalar_t>(), cout, pairs.dst.data() + pairs.start[k], nk,
                            b.data_ptr<scalar_t>());
      at::mm_out(gk, a.t(), b);
    }
  });
  return gw;
}

TORCH_LIBRARY_IMPL(sparseconv, CPU, m) {
  m.impl("conv_forward", &conv_forward_cpu);
  m.impl("conv_input_grad", &conv_input_grad_cpu);
  m.impl("conv_weight_grad", &conv_weight_grad_cpu);
}

}  // namespace sparseconv
