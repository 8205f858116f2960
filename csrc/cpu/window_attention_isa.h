// Float32 window-attention kernels compiled per ISA (window_attention_kernel.h
// bodies; window_attention_cpu.cpp chooses one by cpu_isa()).  No ATen here.
#pragma once

#include <cstdint>

namespace sparseconv {
namespace cpu {

using AttnForwardFn = void (*)(const float* qkv, const int64_t* offsets, const int64_t* index, int64_t g_begin,
                               int64_t g_end, int64_t heads, int64_t d, float scale, float* out, float* lse,
                               float* scratch, int64_t* rows);
using AttnBackwardFn = void (*)(const float* grad_out, const float* qkv, const float* out, const float* lse,
                                const int64_t* offsets, const int64_t* index, int64_t g_begin, int64_t g_end,
                                int64_t heads, int64_t d, float scale, float* grad_qkv, float* scratch,
                                int64_t* rows);

#if defined(__x86_64__) || defined(_M_X64)
void attn_forward_avx2(const float* qkv, const int64_t* offsets, const int64_t* index, int64_t g_begin,
                       int64_t g_end, int64_t heads, int64_t d, float scale, float* out, float* lse, float* scratch,
                       int64_t* rows);
void attn_backward_avx2(const float* grad_out, const float* qkv, const float* out, const float* lse,
                        const int64_t* offsets, const int64_t* index, int64_t g_begin, int64_t g_end, int64_t heads,
                        int64_t d, float scale, float* grad_qkv, float* scratch, int64_t* rows);
void attn_forward_avx512(const float* qkv, const int64_t* offsets, const int64_t* index, int64_t g_begin,
                       int64_t g_end, int64_t heads, int64_t d, float scale, float* out, float* lse, float* scratch,
                       int64_t* rows);
void attn_backward_avx512(const float* grad_out, const float* qkv, const float* out, const float* lse,
                        const int64_t* offsets, const int64_t* index, int64_t g_begin, int64_t g_end, int64_t heads,
                        int64_t d, float scale, float* grad_qkv, float* scratch, int64_t* rows);
#endif

}  // namespace cpu
}  // namespace sparseconv
