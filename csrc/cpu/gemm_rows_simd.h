// The register-blocked body of gemm_rows (gemm_rows.h), written once over a
// vector type V and included by each ISA's translation unit, which compiles
// it for that ISA.  Include nothing from ATen here.
//
// Blocking: MR rows x NV vectors of C accumulate in registers while k runs;
// each step loads NV vectors of B's row p once and broadcasts a_rows[r][p]
// for the MR rows (MR * NV FMAs per NV + MR loads).  Columns go in panels of
// NVMAX vectors; the last vector of a panel is masked when n is not a
// multiple of the vector width.
#pragma once

#include <cstdint>

namespace sparseconv {
namespace cpu {
namespace simd {

template <class V, int MR, int NV, bool FULL>
inline void kernel(int64_t k, const float* const* a_rows, const float* b, int64_t ldb, float* const* c_rows,
                   int64_t col, typename V::Mask last) {
  typename V::T acc[MR][NV];
  const float* a[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    a[r] = a_rows[r];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = V::zero();
  }
  const float* bp = b + col;
  for (int64_t p = 0; p < k; ++p, bp += ldb) {
    typename V::T bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v + 1 < NV; ++v) bv[v] = V::load(bp + V::W * v);
    bv[NV - 1] = FULL ? V::load(bp + V::W * (NV - 1)) : V::loadm(last, bp + V::W * (NV - 1));
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const typename V::T av = V::bcast(a[r][p]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    float* c = c_rows[r] + col;
#pragma GCC unroll 8
    for (int v = 0; v + 1 < NV; ++v) V::store(c + V::W * v, V::add(V::load(c + V::W * v), acc[r][v]));
    float* cl = c + V::W * (NV - 1);
    if (FULL) {
      V::store(cl, V::add(V::load(cl), acc[r][NV - 1]));
    } else {
      V::storem(cl, last, V::add(V::loadm(last, cl), acc[r][NV - 1]));
    }
  }
}

// Rows [0, m) in blocks of MR, then the remainder (fewer than MR rows) by a smaller kernel.
template <class V, int NV, bool FULL, int R>
inline void tail(int64_t rem, int64_t k, const float* const* a, const float* b, int64_t ldb, float* const* c,
                 int64_t col, typename V::Mask last) {
  if constexpr (R > 0) {
    if (rem == R) {
      kernel<V, R, NV, FULL>(k, a, b, ldb, c, col, last);
    } else {
      tail<V, NV, FULL, R - 1>(rem, k, a, b, ldb, c, col, last);
    }
  }
}

template <class V, int NV, bool FULL>
inline void rows(int64_t m, int64_t k, const float* const* a, const float* b, int64_t ldb, float* const* c,
                 int64_t col, typename V::Mask last) {
  constexpr int MR = V::mr(NV);
  int64_t r = 0;
  for (; r + MR <= m; r += MR) kernel<V, MR, NV, FULL>(k, a + r, b, ldb, c + r, col, last);
  tail<V, NV, FULL, MR - 1>(m - r, k, a + r, b, ldb, c + r, col, last);
}

template <class V>
inline void gemm_rows(int64_t m, int64_t n, int64_t k, const float* const* a, const float* b, int64_t ldb,
                      float* const* c) {
  constexpr int64_t panel = V::kNV * V::W;
  for (int64_t col = 0; col < n; col += panel) {
    const int64_t w = n - col < panel ? n - col : panel;
    const int nv = static_cast<int>((w + V::W - 1) / V::W);
    const typename V::Mask last = V::mask(static_cast<int>(w - (nv - 1) * V::W));
    // Full last vectors take plain loads and stores: masked stores followed by masked loads of
    // the same rows (the next offset's update) do not forward and stall on some CPUs.
    const bool full = w == nv * V::W;
    switch (nv * 2 + full) {
      case 2: rows<V, 1, false>(m, k, a, b, ldb, c, col, last); break;
      case 3: rows<V, 1, true>(m, k, a, b, ldb, c, col, last); break;
      case 4: rows<V, 2, false>(m, k, a, b, ldb, c, col, last); break;
      case 5: rows<V, 2, true>(m, k, a, b, ldb, c, col, last); break;
      case 6: if constexpr (V::kNV >= 3) rows<V, 3, false>(m, k, a, b, ldb, c, col, last); break;
      case 7: if constexpr (V::kNV >= 3) rows<V, 3, true>(m, k, a, b, ldb, c, col, last); break;
      case 8: if constexpr (V::kNV >= 4) rows<V, 4, false>(m, k, a, b, ldb, c, col, last); break;
      default: if constexpr (V::kNV >= 4) rows<V, 4, true>(m, k, a, b, ldb, c, col, last); break;
    }
  }
}

// gemm_pairs: MR rows x NV vectors of C in registers while p runs over the
// pairs; each step loads NV vectors of b_ptrs[p] and broadcasts
// a_ptrs[p][row0 + r].
template <class V, int MR, int NV, bool FULL>
inline void pairs_kernel(int64_t k, const float* const* a_ptrs, int64_t row0, const float* const* b_ptrs, float* c,
                         int64_t ldc, int64_t col, typename V::Mask last) {
  typename V::T acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = V::zero();
  }
  for (int64_t p = 0; p < k; ++p) {
    const float* bp = b_ptrs[p] + col;
    const float* ap = a_ptrs[p] + row0;
    typename V::T bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v + 1 < NV; ++v) bv[v] = V::load(bp + V::W * v);
    bv[NV - 1] = FULL ? V::load(bp + V::W * (NV - 1)) : V::loadm(last, bp + V::W * (NV - 1));
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const typename V::T av = V::bcast(ap[r]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    float* cr = c + (row0 + r) * ldc + col;
#pragma GCC unroll 8
    for (int v = 0; v + 1 < NV; ++v) V::store(cr + V::W * v, V::add(V::load(cr + V::W * v), acc[r][v]));
    float* cl = cr + V::W * (NV - 1);
    if (FULL) {
      V::store(cl, V::add(V::load(cl), acc[r][NV - 1]));
    } else {
      V::storem(cl, last, V::add(V::loadm(last, cl), acc[r][NV - 1]));
    }
  }
}

template <class V, int NV, bool FULL, int R>
inline void pairs_tail(int64_t rem, int64_t k, const float* const* a, int64_t row0, const float* const* b, float* c,
                       int64_t ldc, int64_t col, typename V::Mask last) {
  if constexpr (R > 0) {
    if (rem == R) {
      pairs_kernel<V, R, NV, FULL>(k, a, row0, b, c, ldc, col, last);
    } else {
      pairs_tail<V, NV, FULL, R - 1>(rem, k, a, row0, b, c, ldc, col, last);
    }
  }
}

template <class V, int NV, bool FULL>
inline void pairs_rows(int64_t m, int64_t k, const float* const* a, const float* const* b, float* c, int64_t ldc,
                       int64_t col, typename V::Mask last) {
  constexpr int MR = V::mr(NV);
  int64_t r = 0;
  for (; r + MR <= m; r += MR) pairs_kernel<V, MR, NV, FULL>(k, a, r, b, c, ldc, col, last);
  pairs_tail<V, NV, FULL, MR - 1>(m - r, k, a, r, b, c, ldc, col, last);
}

template <class V>
inline void gemm_pairs(int64_t m, int64_t n, int64_t k, const float* const* a, const float* const* b, float* c,
                       int64_t ldc) {
  constexpr int64_t panel = V::kNV * V::W;
  for (int64_t col = 0; col < n; col += panel) {
    const int64_t w = n - col < panel ? n - col : panel;
    const int nv = static_cast<int>((w + V::W - 1) / V::W);
    const typename V::Mask last = V::mask(static_cast<int>(w - (nv - 1) * V::W));
    // Full last vectors take plain loads and stores: masked stores followed by masked loads of
    // the same rows (the next offset's update) do not forward and stall on some CPUs.
    const bool full = w == nv * V::W;
    switch (nv * 2 + full) {
      case 2: pairs_rows<V, 1, false>(m, k, a, b, c, ldc, col, last); break;
      case 3: pairs_rows<V, 1, true>(m, k, a, b, c, ldc, col, last); break;
      case 4: pairs_rows<V, 2, false>(m, k, a, b, c, ldc, col, last); break;
      case 5: pairs_rows<V, 2, true>(m, k, a, b, c, ldc, col, last); break;
      case 6: if constexpr (V::kNV >= 3) pairs_rows<V, 3, false>(m, k, a, b, c, ldc, col, last); break;
      case 7: if constexpr (V::kNV >= 3) pairs_rows<V, 3, true>(m, k, a, b, c, ldc, col, last); break;
      case 8: if constexpr (V::kNV >= 4) pairs_rows<V, 4, false>(m, k, a, b, c, ldc, col, last); break;
      default: if constexpr (V::kNV >= 4) pairs_rows<V, 4, true>(m, k, a, b, c, ldc, col, last); break;
    }
  }
}

// sparse_rows: per row, the indices of its non-zero entries (vector compares
// to a bit mask, then the set bits), then per column panel NV accumulators
// over those indices only.  idx must hold k entries.
template <class V, int NV, bool FULL>
inline void sparse_panel(const float* a, const int32_t* idx, int64_t nnz, const float* b, int64_t ldb, float* c,
                         int64_t col, typename V::Mask last) {
  typename V::T acc[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) acc[v] = V::zero();
  for (int64_t t = 0; t < nnz; ++t) {
    const int64_t p = idx[t];
    const typename V::T av = V::bcast(a[p]);
    const float* bp = b + p * ldb + col;
#pragma GCC unroll 8
    for (int v = 0; v + 1 < NV; ++v) acc[v] = V::fma(av, V::load(bp + V::W * v), acc[v]);
    acc[NV - 1] = V::fma(av, FULL ? V::load(bp + V::W * (NV - 1)) : V::loadm(last, bp + V::W * (NV - 1)), acc[NV - 1]);
  }
  float* cp = c + col;
#pragma GCC unroll 8
  for (int v = 0; v + 1 < NV; ++v) V::store(cp + V::W * v, acc[v]);
  if (FULL) {
    V::store(cp + V::W * (NV - 1), acc[NV - 1]);
  } else {
    V::storem(cp + V::W * (NV - 1), last, acc[NV - 1]);
  }
}

template <class V>
inline void sparse_rows(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                        float* c, int64_t ldc, int32_t* idx) {
  constexpr int64_t panel = V::kNV * V::W;
  for (int64_t r = 0; r < m; ++r) {
    const float* ar = a + r * lda;
    int64_t nnz = 0, p = 0;
    for (; p + V::W <= k; p += V::W) {
      uint32_t bits = V::nonzero_bits(ar + p);
      while (bits) {
        idx[nnz++] = static_cast<int32_t>(p + __builtin_ctz(bits));
        bits &= bits - 1;
      }
    }
    for (; p < k; ++p) {
      idx[nnz] = static_cast<int32_t>(p);
      nnz += ar[p] != 0.f;
    }
    float* cr = c + r * ldc;
    for (int64_t col = 0; col < n; col += panel) {
      const int64_t w = n - col < panel ? n - col : panel;
      const int nv = static_cast<int>((w + V::W - 1) / V::W);
      const typename V::Mask last = V::mask(static_cast<int>(w - (nv - 1) * V::W));
      const bool full = w == nv * V::W;
      switch (nv * 2 + full) {
        case 2: sparse_panel<V, 1, false>(ar, idx, nnz, b, ldb, cr, col, last); break;
        case 3: sparse_panel<V, 1, true>(ar, idx, nnz, b, ldb, cr, col, last); break;
        case 4: sparse_panel<V, 2, false>(ar, idx, nnz, b, ldb, cr, col, last); break;
        case 5: sparse_panel<V, 2, true>(ar, idx, nnz, b, ldb, cr, col, last); break;
        case 6: if constexpr (V::kNV >= 3) sparse_panel<V, 3, false>(ar, idx, nnz, b, ldb, cr, col, last); break;
        case 7: if constexpr (V::kNV >= 3) sparse_panel<V, 3, true>(ar, idx, nnz, b, ldb, cr, col, last); break;
        case 8: if constexpr (V::kNV >= 4) sparse_panel<V, 4, false>(ar, idx, nnz, b, ldb, cr, col, last); break;
        default: if constexpr (V::kNV >= 4) sparse_panel<V, 4, true>(ar, idx, nnz, b, ldb, cr, col, last); break;
      }
    }
  }
}

}  // namespace simd
}  // namespace cpu
}  // namespace sparseconv
