// AVX2 + FMA variant of gemm_rows (gemm_rows.h): 8-float vectors, panels of
// 16 columns, up to 6 x 2 accumulators (16 ymm registers).  Compiled for
// AVX2/FMA through the target attribute below; run only when the CPU has both.
#if defined(__x86_64__) || defined(_M_X64)

// Standard headers before the target pragma, so nothing of theirs is compiled for this ISA.
#include <cstdint>
#include <type_traits>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#include <immintrin.h>

#include "gemm_rows.h"
#include "gemm_rows_simd.h"
#include "pack_table.h"

namespace sparseconv {
namespace cpu {
namespace {

// For each 8-bit mask, its set lanes in increasing order (then zeros): the permutation that packs them.
constexpr PackTable8<LanesInOrder> kPack{};

struct V256 {
  using T = __m256;
  using Mask = __m256i;
  static constexpr int W = 8;
  static constexpr int kNV = 2;
  static constexpr int mr(int nv) { return nv == 2 ? 6 : 8; }
  static T zero() { return _mm256_setzero_ps(); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static T loadm(Mask m, const float* p) { return _mm256_maskload_ps(p, m); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static void storem(float* p, Mask m, T v) { _mm256_maskstore_ps(p, m, v); }
  static T bcast(float x) { return _mm256_set1_ps(x); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  // The indices base + i of the non-zero (or NaN) lanes of p[0, 8), packed at out (8 entries
  // written) through a table of lane permutations; returns how many.
  static int nonzero_index(const float* p, int32_t base, int32_t* out) {
    const int bits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p), _mm256_setzero_ps(), _CMP_NEQ_UQ));
    const __m256i perm = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kPack.lanes[bits])));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                        _mm256_add_epi32(_mm256_set1_epi32(base), _mm256_permutevar8x32_epi32(
                                                                      _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), perm)));
    return __builtin_popcount(static_cast<unsigned>(bits));
  }
  static Mask mask(int w) {
    return _mm256_setr_epi32(0 < w ? -1 : 0, 1 < w ? -1 : 0, 2 < w ? -1 : 0, 3 < w ? -1 : 0, 4 < w ? -1 : 0,
                             5 < w ? -1 : 0, 6 < w ? -1 : 0, 7 < w ? -1 : 0);
  }
};

}  // namespace

void gemm_rows_avx2(int64_t m, int64_t n, int64_t k, const float* const* a_rows, const float* b, int64_t ldb,
                    float* const* c_rows) {
  simd::gemm_rows<V256>(m, n, k, a_rows, b, ldb, c_rows);
}

void sparse_rows_avx2(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                    float* c, int64_t ldc, int32_t* idx) {
  simd::sparse_rows<V256>(m, n, k, a, lda, b, ldb, c, ldc, idx);
}

void gemm_pairs_avx2(int64_t m, int64_t n, int64_t k, const float* const* a_ptrs, const float* const* b_ptrs,
                   float* c, int64_t ldc) {
  simd::gemm_pairs<V256>(m, n, k, a_ptrs, b_ptrs, c, ldc);
}

}  // namespace cpu
}  // namespace sparseconv

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#endif
