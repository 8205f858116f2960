// Float32 window-attention kernels compiled per ISA (window_attention_kernel.h
// bodies; window_attention_cpu.cpp chooses one by cpu_isa()), and the plain
// structs that describe a problem and a thread's scratch.  No ATen here, and
// no functions defined, so including this in every ISA unit is safe.
#pragma once

#include <cstdint>

namespace sparseconv {
namespace cpu {

// c_rows[r][0, n) += a_rows[r][0, k) @ b[k, ldb] for r < m (gemm_rows.h's contract).
template <typename T>
using AttnProjFn = void (*)(int64_t m, int64_t n, int64_t k, const T* const* a_rows, const T* b, int64_t ldb,
                            T* const* c_rows);

// One window_attention call: qkv = x @ wt (+ bias), attention within the groups of rows
// index[offsets[g] .. offsets[g + 1]), y = attended @ pwt (+ pbias).
template <typename T>
struct AttnProblem {
  const T* x;            // [N, cin]
  int64_t cin;
  const T* wt;           // [cin, 3C]: the transposed projection weight
  const T* bias;         // [3C] or null
  AttnProjFn<T> proj;    // the projection micro-kernel
  const T* pwt;          // [C, cout]: the transposed output projection weight
  const T* pbias;        // [cout] or null
  int64_t cout;
  const int64_t* offsets;
  const int64_t* index;  // null: consecutive rows
  int64_t heads, d;
  T scale;
};

// Per-thread scratch for groups of at most max_n rows (window_attention_kernel.h sizes `values`).
template <typename T>
struct AttnScratch {
  T* values;
  int64_t* rows;         // [max_n]
  const T** a_rows;      // [max_n]
  T** c_rows;            // [max_n]
};

using AttnForwardFn = void (*)(const AttnProblem<float>& pb, int64_t g_begin, int64_t g_end, float* y, float* out,
                               float* lse, const AttnScratch<float>& sc);
using AttnBackwardFn = void (*)(const AttnProblem<float>& pb, const float* grad_out, const float* out,
                                const float* lse, int64_t g_begin, int64_t g_end, float* grad_qkv,
                                const AttnScratch<float>& sc);

#if defined(__x86_64__) || defined(_M_X64)
void attn_forward_avx2(const AttnProblem<float>& pb, int64_t g_begin, int64_t g_end, float* y, float* out, float* lse,
                       const AttnScratch<float>& sc);
void attn_backward_avx2(const AttnProblem<float>& pb, const float* grad_out, const float* out, const float* lse,
                        int64_t g_begin, int64_t g_end, float* grad_qkv, const AttnScratch<float>& sc);
void attn_forward_avx512(const AttnProblem<float>& pb, int64_t g_begin, int64_t g_end, float* y, float* out, float* lse,
                         const AttnScratch<float>& sc);
void attn_backward_avx512(const AttnProblem<float>& pb, const float* grad_out, const float* out, const float* lse,
                          int64_t g_begin, int64_t g_end, float* grad_qkv, const AttnScratch<float>& sc);
#endif

}  // namespace cpu
}  // namespace sparseconv
