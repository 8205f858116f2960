// AVX2 build of the float32 window-attention kernels (window_attention_isa.h): the plain loops of
// window_attention_kernel.h compiled for this ISA through the target attribute below (run only when
// cpu_isa() is "avx2" or better).
#if defined(__x86_64__) || defined(_M_X64)

// Standard headers before the target pragma, so nothing of theirs is compiled for this ISA.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "window_attention_isa.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#include <immintrin.h>

namespace sparseconv {
namespace cpu {
namespace {
// AVX2 register block of the window-attention kernels: two ymm of 8 floats.
template <typename T>
struct AttnVec;
template <>
struct AttnVec<float> {
  struct V {
    __m256 lo, hi;
  };
  static V zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static V load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static void store(float* p, V v) {
    _mm256_storeu_ps(p, v.lo);
    _mm256_storeu_ps(p + 8, v.hi);
  }
  static V fma(V acc, float a, const float* p) {
    const __m256 b = _mm256_set1_ps(a);
    return {_mm256_fmadd_ps(b, _mm256_loadu_ps(p), acc.lo), _mm256_fmadd_ps(b, _mm256_loadu_ps(p + 8), acc.hi)};
  }
  static V max(V acc, const float* p) {
    return {_mm256_max_ps(acc.lo, _mm256_loadu_ps(p)), _mm256_max_ps(acc.hi, _mm256_loadu_ps(p + 8))};
  }
};

#include "window_attention_kernel.h"
}  // namespace

void attn_forward_avx2(const AttnProblem<float>& pb, int64_t g_begin, int64_t g_end, float* y, float* out,
                       float* lse, const AttnScratch<float>& sc) {
  attn_forward_groups<float>(pb, g_begin, g_end, y, out, lse, sc);
}

void attn_backward_avx2(const AttnProblem<float>& pb, const float* grad_out, const float* out, const float* lse,
                        int64_t g_begin, int64_t g_end, float* grad_qkv, const AttnScratch<float>& sc) {
  attn_backward_groups<float>(pb, grad_out, out, lse, g_begin, g_end, grad_qkv, sc);
}

}  // namespace cpu
}  // namespace sparseconv

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#endif  // x86-64
