// Row-gathered GEMM micro-kernels: the inner loop of the fused
// gather-GEMM-scatter convolution.
//
// gemm_rows(m, n, k, a_rows, b, ldb, c_rows):
//   for r in [0, m):  c_rows[r][0:n) += a_rows[r][0:k) @ B[0:k, 0:n)
//   with B row-major (element (p, j) at b[p * ldb + j]).  a_rows point at
//   arbitrary input rows (the gather happens through these pointers, no copy);
//   c_rows must be pairwise distinct (each is read, added to and written once).
//   Float32 only.  No threading inside: callers split rows across threads.
//
// gemm_pairs(m, n, k, a_ptrs, b_ptrs, c, ldc):
//   C[0:m, 0:n) += sum over p in [0, k) of a_ptrs[p][0:m)^T b_ptrs[p][0:n)
//   with C row-major (leading dimension ldc): the weight gradient of one
//   kernel offset, sum over its pairs of feats[src]^T grad[dst], read through
//   row pointers (no packing).
//
// sparse_rows(m, n, k, a, lda, b, ldb, c, ldc, idx):
//   C[r, 0:n) = sum over p with a[r, p] != 0 of a[r, p] * B[p, 0:n)   (C overwritten)
//   for r in [0, m): a row-major product that skips the zeros of A, found by
//   vector compares (sparse_mm.h).  idx: caller scratch of k + kSparseIdxSlack int32
//   (the ISA translation units allocate nothing; packed index stores write whole vectors).
//
// gemm_rows_f32() / gemm_pairs_f32() / sparse_rows_f32() return the best variant this CPU runs (AVX-512, AVX2+FMA
// or portable C++), chosen once from the CPU's feature flags.  The ISA
// variants live in their own translation units, which include no ATen
// headers, so no inline function is ever compiled for an ISA the CPU lacks.
#pragma once

#include <cstdint>

namespace sparseconv {
namespace cpu {

// Entries of sparse_rows' idx scratch beyond k (whole-vector stores of packed indices).
constexpr int64_t kSparseIdxSlack = 16;

using GemmRowsFn = void (*)(int64_t m, int64_t n, int64_t k, const float* const* a_rows, const float* b, int64_t ldb,
                            float* const* c_rows);

void gemm_rows_generic(int64_t m, int64_t n, int64_t k, const float* const* a_rows, const float* b, int64_t ldb,
                       float* const* c_rows);
using GemmPairsFn = void (*)(int64_t m, int64_t n, int64_t k, const float* const* a_ptrs, const float* const* b_ptrs,
                             float* c, int64_t ldc);

using SparseRowsFn = void (*)(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                              int64_t ldb, float* c, int64_t ldc, int32_t* idx);

void sparse_rows_generic(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                         float* c, int64_t ldc, int32_t* idx);
#if defined(__x86_64__) || defined(_M_X64)
void sparse_rows_avx512(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                        float* c, int64_t ldc, int32_t* idx);
void sparse_rows_avx2(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                      float* c, int64_t ldc, int32_t* idx);
#endif

void gemm_pairs_generic(int64_t m, int64_t n, int64_t k, const float* const* a_ptrs, const float* const* b_ptrs,
                        float* c, int64_t ldc);
#if defined(__x86_64__) || defined(_M_X64)
void gemm_pairs_avx512(int64_t m, int64_t n, int64_t k, const float* const* a_ptrs, const float* const* b_ptrs,
                       float* c, int64_t ldc);
void gemm_pairs_avx2(int64_t m, int64_t n, int64_t k, const float* const* a_ptrs, const float* const* b_ptrs,
                     float* c, int64_t ldc);
#endif
#if defined(__x86_64__) || defined(_M_X64)
void gemm_rows_avx512(int64_t m, int64_t n, int64_t k, const float* const* a_rows, const float* b, int64_t ldb,
                      float* const* c_rows);
void gemm_rows_avx2(int64_t m, int64_t n, int64_t k, const float* const* a_rows, const float* b, int64_t ldb,
                    float* const* c_rows);
#endif

GemmRowsFn gemm_rows_f32();
GemmPairsFn gemm_pairs_f32();
SparseRowsFn sparse_rows_f32();
// The variant gemm_rows_f32() picked: "avx512", "avx2" or "generic" (for reports and tests).
const char* gemm_rows_isa();

}  // namespace cpu
}  // namespace sparseconv
