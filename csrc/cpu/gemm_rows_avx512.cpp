// AVX-512 variant of gemm_rows (gemm_rows.h): 16-float vectors, panels of 64
// columns, up to 6 x 4 accumulators.  Compiled for AVX-512F only through the
// target attribute below; run only when the CPU reports avx512f.
#if defined(__x86_64__) || defined(_M_X64)

// Standard headers before the target pragma, so nothing of theirs is compiled for this ISA.
#include <cstdint>
#include <type_traits>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,fma,avx2"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,fma,avx2")
#endif

#include <immintrin.h>

#include "gemm_rows.h"
#include "gemm_rows_simd.h"

namespace sparseconv {
namespace cpu {
namespace {

struct V512 {
  using T = __m512;
  using Mask = __mmask16;
  static constexpr int W = 16;
  static constexpr int kNV = 4;
  static constexpr int mr(int nv) { return nv == 4 ? 6 : nv == 3 ? 8 : 12; }
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static T loadm(Mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static void storem(float* p, Mask m, T v) { _mm512_mask_storeu_ps(p, m, v); }
  static T bcast(float x) { return _mm512_set1_ps(x); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static Mask mask(int w) { return static_cast<Mask>(w >= 16 ? 0xFFFFu : (1u << w) - 1u); }
  // The indices base + i of the non-zero (or NaN) lanes of p[0, 16), packed at out (16 entries
  // written); returns how many.  Compress into a register, then a plain store: the memory form of
  // vpcompressd is microcoded and slow on some CPUs.
  static int nonzero_index(const float* p, int32_t base, int32_t* out) {
    const __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(p), _mm512_setzero_ps(), _CMP_NEQ_UQ);
    const __m512i ids = _mm512_add_epi32(_mm512_set1_epi32(base),
                                         _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    _mm512_storeu_si512(out, _mm512_maskz_compress_epi32(m, ids));
    return __builtin_popcount(static_cast<unsigned>(m));
  }
};

}  // namespace

void gemm_rows_avx512(int64_t m, int64_t n, int64_t k, const float* const* a_rows, const float* b, int64_t ldb,
                      float* const* c_rows) {
  simd::gemm_rows<V512>(m, n, k, a_rows, b, ldb, c_rows);
}

void sparse_rows_avx512(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                    float* c, int64_t ldc, int32_t* idx) {
  simd::sparse_rows<V512>(m, n, k, a, lda, b, ldb, c, ldc, idx);
}

void gemm_pairs_avx512(int64_t m, int64_t n, int64_t k, const float* const* a_ptrs, const float* const* b_ptrs,
                   float* c, int64_t ldc) {
  simd::gemm_pairs<V512>(m, n, k, a_ptrs, b_ptrs, c, ldc);
}

}  // namespace cpu
}  // namespace sparseconv

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#endif
