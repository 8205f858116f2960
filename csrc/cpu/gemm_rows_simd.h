// The register-blocked bodies of gemm_rows, gemm_pairs and sparse_rows
// (gemm_rows.h), written once over a vector type V and included by each ISA's
// translation unit, which compiles them for that ISA.  Include nothing from
// ATen or the standard library's containers here.
//
// Blocking: MR rows x NV vectors of C accumulate in registers while the inner
// dimension runs; each step loads NV vectors of a B row once and broadcasts
// one value per row (MR * NV FMAs per NV + MR loads).  Columns go in panels of
// V::kNV vectors; the last vector of a panel is masked when n is not a
// multiple of the vector width (FULL = false), and full panels take plain
// loads and stores: masked stores followed by masked loads of the same rows
// (the next offset's update) do not forward and stall on some CPUs.
#pragma once

#include <cstdint>
#include <type_traits>

namespace sparseconv {
namespace cpu {
namespace simd {

template <int N>
using Int = std::integral_constant<int, N>;

// NV vectors of the row p (the last one masked unless FULL).
template <class V, int NV, bool FULL>
inline void load_row(const float* p, typename V::Mask last, typename V::T* out) {
#pragma GCC unroll 8
  for (int v = 0; v + 1 < NV; ++v) out[v] = V::load(p + V::W * v);
  out[NV - 1] = FULL ? V::load(p + V::W * (NV - 1)) : V::loadm(last, p + V::W * (NV - 1));
}

// c[0 : NV vectors) = acc (ADD = false) or += acc (ADD = true).
template <class V, int NV, bool FULL, bool ADD>
inline void store_row(float* c, typename V::Mask last, const typename V::T* acc) {
#pragma GCC unroll 8
  for (int v = 0; v + 1 < NV; ++v) V::store(c + V::W * v, ADD ? V::add(V::load(c + V::W * v), acc[v]) : acc[v]);
  float* cl = c + V::W * (NV - 1);
  if (FULL) {
    V::store(cl, ADD ? V::add(V::load(cl), acc[NV - 1]) : acc[NV - 1]);
  } else {
    V::storem(cl, last, ADD ? V::add(V::loadm(last, cl), acc[NV - 1]) : acc[NV - 1]);
  }
}

// Calls f(col, last, Int<NV>, std::bool_constant<FULL>) for each column panel of [0, n).
template <class V, class F>
inline void for_each_panel(int64_t n, F&& f) {
  constexpr int64_t panel = V::kNV * V::W;
  for (int64_t col = 0; col < n; col += panel) {
    const int64_t w = n - col < panel ? n - col : panel;
    const int nv = static_cast<int>((w + V::W - 1) / V::W);
    const typename V::Mask last = V::mask(static_cast<int>(w - (nv - 1) * V::W));
    const bool full = w == nv * V::W;
    switch (nv * 2 + full) {
      case 2: f(col, last, Int<1>{}, std::false_type{}); break;
      case 3: f(col, last, Int<1>{}, std::true_type{}); break;
      case 4: f(col, last, Int<2>{}, std::false_type{}); break;
      case 5: f(col, last, Int<2>{}, std::true_type{}); break;
      case 6: if constexpr (V::kNV >= 3) f(col, last, Int<3>{}, std::false_type{}); break;
      case 7: if constexpr (V::kNV >= 3) f(col, last, Int<3>{}, std::true_type{}); break;
      case 8: if constexpr (V::kNV >= 4) f(col, last, Int<4>{}, std::false_type{}); break;
      default: if constexpr (V::kNV >= 4) f(col, last, Int<4>{}, std::true_type{}); break;
    }
  }
}

// Rows [0, m) in blocks of MR (calls f(r, Int<MR>)), then the remainder of fewer than MR rows
// by one call f(r, Int<rem>).
template <int R, class F>
inline void remainder_rows(int64_t rem, int64_t r, F& f) {
  if constexpr (R > 0) {
    if (rem == R) {
      f(r, Int<R>{});
    } else {
      remainder_rows<R - 1>(rem, r, f);
    }
  }
}

template <int MR, class F>
inline void row_blocks(int64_t m, F&& f) {
  int64_t r = 0;
  for (; r + MR <= m; r += MR) f(r, Int<MR>{});
  remainder_rows<MR - 1>(m - r, r, f);
}

// ---------------------------------------------------------------- gemm_rows
template <class V, int MR, int NV, bool FULL>
inline void rows_kernel(int64_t k, const float* const* a_rows, const float* b, int64_t ldb, float* const* c_rows,
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
    load_row<V, NV, FULL>(bp, last, bv);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const typename V::T av = V::bcast(a[r][p]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) store_row<V, NV, FULL, true>(c_rows[r] + col, last, acc[r]);
}

template <class V>
inline void gemm_rows(int64_t m, int64_t n, int64_t k, const float* const* a, const float* b, int64_t ldb,
                      float* const* c) {
  for_each_panel<V>(n, [&](int64_t col, typename V::Mask last, auto nv, auto full) {
    constexpr int NV = decltype(nv)::value;
    row_blocks<V::mr(NV)>(m, [&](int64_t r, auto mr) {
      rows_kernel<V, decltype(mr)::value, NV, decltype(full)::value>(k, a + r, b, ldb, c + r, col, last);
    });
  });
}

// ---------------------------------------------------------------- gemm_pairs
// MR rows x NV vectors of C in registers while p runs over the pairs; each
// step loads NV vectors of b_ptrs[p] and broadcasts a_ptrs[p][row0 + r].
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
    const float* ap = a_ptrs[p] + row0;
    typename V::T bv[NV];
    load_row<V, NV, FULL>(b_ptrs[p] + col, last, bv);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const typename V::T av = V::bcast(ap[r]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) store_row<V, NV, FULL, true>(c + (row0 + r) * ldc + col, last, acc[r]);
}

template <class V>
inline void gemm_pairs(int64_t m, int64_t n, int64_t k, const float* const* a, const float* const* b, float* c,
                       int64_t ldc) {
  for_each_panel<V>(n, [&](int64_t col, typename V::Mask last, auto nv, auto full) {
    constexpr int NV = decltype(nv)::value;
    row_blocks<V::mr(NV)>(m, [&](int64_t r, auto mr) {
      pairs_kernel<V, decltype(mr)::value, NV, decltype(full)::value>(k, a, r, b, c, ldc, col, last);
    });
  });
}

// ---------------------------------------------------------------- sparse_rows
// Per row, the indices of its non-zero entries (V::nonzero_index: a vector compare, then the
// lanes' indices packed branch-free; at 90 % zeros a bit loop mispredicts on most groups), then
// per column panel S independent sets of NV accumulators over those indices (a single set would
// wait on the FMA latency: one chain per vector), summed at the end.  idx is caller scratch of
// k + kSparseIdxSlack entries (the packed stores write whole vectors).
template <class V, int NV, bool FULL>
inline void sparse_panel(const float* a, const int32_t* idx, int64_t nnz, const float* b, int64_t ldb, float* c,
                         int64_t col, typename V::Mask last) {
  constexpr int S = NV >= 4 ? 2 : NV >= 2 ? 4 : 8;
  typename V::T acc[S][NV];
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[s][v] = V::zero();
  }
  int64_t t = 0;
  for (; t + S <= nnz; t += S) {
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s) {
      const int64_t p = idx[t + s];
      const typename V::T av = V::bcast(a[p]);
      typename V::T bv[NV];
      load_row<V, NV, FULL>(b + p * ldb + col, last, bv);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[s][v] = V::fma(av, bv[v], acc[s][v]);
    }
  }
  for (; t < nnz; ++t) {
    const int64_t p = idx[t];
    const typename V::T av = V::bcast(a[p]);
    typename V::T bv[NV];
    load_row<V, NV, FULL>(b + p * ldb + col, last, bv);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[0][v] = V::fma(av, bv[v], acc[0][v]);
  }
#pragma GCC unroll 8
  for (int s = 1; s < S; ++s) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[0][v] = V::add(acc[0][v], acc[s][v]);
  }
  store_row<V, NV, FULL, false>(c + col, last, acc[0]);
}

template <class V>
inline void sparse_rows(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                        float* c, int64_t ldc, int32_t* idx) {
  for (int64_t r = 0; r < m; ++r) {
    const float* ar = a + r * lda;
    int64_t nnz = 0, p = 0;
    // Rows ahead are fetched early: the loads of A stall otherwise (A is streamed once, and the
    // panel work between rows keeps the hardware prefetcher from running ahead).
    const float* ahead = r + 4 < m ? ar + 4 * lda : nullptr;
    for (; p + V::W <= k; p += V::W) {
      if (ahead && (p * 4) % 64 == 0) __builtin_prefetch(ahead + p);
      nnz += V::nonzero_index(ar + p, static_cast<int32_t>(p), idx + nnz);
    }
    for (; p < k; ++p) {
      idx[nnz] = static_cast<int32_t>(p);
      nnz += ar[p] != 0.f;
    }
    float* cr = c + r * ldc;
    for_each_panel<V>(n, [&](int64_t col, typename V::Mask last, auto nv, auto full) {
      sparse_panel<V, decltype(nv)::value, decltype(full)::value>(ar, idx, nnz, b, ldb, cr, col, last);
    });
  }
}

}  // namespace simd
}  // namespace cpu
}  // namespace sparseconv
