// Portable variant and the runtime choice of gemm_rows (gemm_rows.h).
#include "gemm_rows.h"

#include <cstdlib>
#include <cstring>

namespace sparseconv {
namespace cpu {

void gemm_rows_generic(int64_t m, int64_t n, int64_t k, const float* const* a_rows, const float* b, int64_t ldb,
                       float* const* c_rows) {
  constexpr int64_t kCols = 64;
  float acc[kCols];
  for (int64_t r = 0; r < m; ++r) {
    const float* a = a_rows[r];
    for (int64_t col = 0; col < n; col += kCols) {
      const int64_t w = n - col < kCols ? n - col : kCols;
      for (int64_t j = 0; j < w; ++j) acc[j] = 0.f;
      for (int64_t p = 0; p < k; ++p) {
        const float av = a[p];
        const float* bp = b + p * ldb + col;
        for (int64_t j = 0; j < w; ++j) acc[j] += av * bp[j];
      }
      float* c = c_rows[r] + col;
      for (int64_t j = 0; j < w; ++j) c[j] += acc[j];
    }
  }
}

void gemm_pairs_generic(int64_t m, int64_t n, int64_t k, const float* const* a_ptrs, const float* const* b_ptrs,
                        float* c, int64_t ldc) {
  for (int64_t p = 0; p < k; ++p) {
    const float* a = a_ptrs[p];
    const float* b = b_ptrs[p];
    for (int64_t r = 0; r < m; ++r) {
      const float av = a[r];
      float* cr = c + r * ldc;
      for (int64_t j = 0; j < n; ++j) cr[j] += av * b[j];
    }
  }
}

void sparse_rows_generic(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                         float* c, int64_t ldc, int32_t* /*idx*/) {
  for (int64_t r = 0; r < m; ++r) {
    float* cr = c + r * ldc;
    for (int64_t j = 0; j < n; ++j) cr[j] = 0.f;
    const float* ar = a + r * lda;
    for (int64_t p = 0; p < k; ++p) {
      const float av = ar[p];
      if (av == 0.f) continue;
      const float* bp = b + p * ldb;
      for (int64_t j = 0; j < n; ++j) cr[j] += av * bp[j];
    }
  }
}

namespace {

struct Choice {
  GemmRowsFn fn;
  GemmPairsFn pairs;
  SparseRowsFn sparse;
  const char* isa;
};

Choice choose() {
  // SPARSECONV_CPU_ISA=generic|avx2|avx512 caps the choice (for testing every variant on one machine).
  const char* cap = std::getenv("SPARSECONV_CPU_ISA");
  const bool allow512 = !cap || std::strcmp(cap, "avx512") == 0;
  const bool allow2 = allow512 || std::strcmp(cap, "avx2") == 0;
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (allow512 && __builtin_cpu_supports("avx512f")) return {gemm_rows_avx512, gemm_pairs_avx512, sparse_rows_avx512, "avx512"};
  if (allow2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return {gemm_rows_avx2, gemm_pairs_avx2, sparse_rows_avx2, "avx2"};
#else
  (void)allow2;
#endif
  return {gemm_rows_generic, gemm_pairs_generic, sparse_rows_generic, "generic"};
}

const Choice& choice() {
  static const Choice c = choose();  // decided once, on first use (not at import)
  return c;
}

}  // namespace

GemmRowsFn gemm_rows_f32() { return choice().fn; }
GemmPairsFn gemm_pairs_f32() { return choice().pairs; }
SparseRowsFn sparse_rows_f32() { return choice().sparse; }
const char* gemm_rows_isa() { return choice().isa; }

}  // namespace cpu
}  // namespace sparseconv
