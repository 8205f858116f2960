// CPU window attention (window_attention.h): argument checks, the choice of
// the float32 ISA variant, and threading over groups.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../window_attention.h"
#include "gemm_rows.h"
#include "window_attention_isa.h"

namespace sparseconv {
namespace cpu {
namespace {
// Portable register block of the window-attention kernels (window_attention_kernel.h).
template <typename T>
struct AttnVec {
  struct V {
    T x[16];
  };
  static V zero() {
    V v;
    for (int i = 0; i < 16; ++i) v.x[i] = T(0);
    return v;
  }
  static V load(const T* p) {
    V v;
    for (int i = 0; i < 16; ++i) v.x[i] = p[i];
    return v;
  }
  static void store(T* p, const V& v) {
    for (int i = 0; i < 16; ++i) p[i] = v.x[i];
  }
  static V fma(V acc, T a, const T* p) {
    for (int i = 0; i < 16; ++i) acc.x[i] += a * p[i];
    return acc;
  }
  static V max(V acc, const T* p) {
    for (int i = 0; i < 16; ++i) acc.x[i] = p[i] > acc.x[i] ? p[i] : acc.x[i];
    return acc;
  }
};

#include "window_attention_kernel.h"

void attn_forward_generic(const float* qkv, const int64_t* offsets, const int64_t* index, int64_t g_begin,
                          int64_t g_end, int64_t heads, int64_t d, float scale, float* out, float* lse, float* scratch,
                          int64_t* rows) {
  attn_forward_groups<float>(qkv, offsets, index, g_begin, g_end, heads, d, scale, out, lse, scratch, rows);
}

void attn_backward_generic(const float* grad_out, const float* qkv, const float* out, const float* lse,
                           const int64_t* offsets, const int64_t* index, int64_t g_begin, int64_t g_end, int64_t heads,
                           int64_t d, float scale, float* grad_qkv, float* scratch, int64_t* rows) {
  attn_backward_groups<float>(grad_out, qkv, out, lse, offsets, index, g_begin, g_end, heads, d, scale, grad_qkv,
                              scratch, rows);
}

struct AttnFns {
  AttnForwardFn forward;
  AttnBackwardFn backward;
};

AttnFns attn_fns() {
  // The same ISA as the convolution micro-kernels (gemm_rows_isa(): CPU flags, capped by SPARSECONV_CPU_ISA).
#if defined(__x86_64__) || defined(_M_X64)
  const char* isa = gemm_rows_isa();
  if (std::strcmp(isa, "avx512") == 0) return {attn_forward_avx512, attn_backward_avx512};
  if (std::strcmp(isa, "avx2") == 0) return {attn_forward_avx2, attn_backward_avx2};
#endif
  return {attn_forward_generic, attn_backward_generic};
}

// Group sizes vary, so the grain is a few groups: the cost of a group is ~n^2.
constexpr int64_t kGroupGrain = 16;

void check_window_attention(const at::Tensor& qkv, const at::Tensor& offsets, const c10::optional<at::Tensor>& index,
                            int64_t heads, const char* op) {
  TORCH_CHECK_VALUE(heads >= 1, "sparseconv.", op, ": heads must be >= 1, got ", heads);
  TORCH_CHECK_VALUE(qkv.dim() == 2 && qkv.size(1) % (3 * heads) == 0, "sparseconv.", op,
                    ": qkv must be [N, 3 * C] with C divisible by heads (", heads, "), got shape ", qkv.sizes());
  check_cpu_dtype(qkv, op);
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) >= 1 && offsets.scalar_type() == at::kLong, "sparseconv.",
                    op, ": offsets must be a 1-D int64 tensor [G + 1], got ", offsets.scalar_type(), " of shape ",
                    offsets.sizes());
  check_same_device(qkv, offsets, op, "qkv", "offsets");
  const int64_t n = qkv.size(0);
  const at::Tensor o = offsets.contiguous();
  const int64_t* p = o.data_ptr<int64_t>();
  const int64_t g = o.size(0) - 1;
  TORCH_CHECK_VALUE(p[0] == 0 && p[g] == n, "sparseconv.", op, ": offsets must start at 0 and end at N = ", n,
                    ", got ", p[0], " and ", p[g]);
  for (int64_t i = 0; i < g; ++i) {
    TORCH_CHECK_VALUE(p[i] <= p[i + 1], "sparseconv.", op, ": offsets must be non-decreasing, but offsets[", i,
                      "] = ", p[i], " > offsets[", i + 1, "] = ", p[i + 1]);
  }
  if (index.has_value()) {
    const at::Tensor& idx = *index;
    TORCH_CHECK_VALUE(idx.dim() == 1 && idx.size(0) == n && idx.scalar_type() == at::kLong, "sparseconv.", op,
                      ": index must be a 1-D int64 permutation of the ", n, " rows, got ", idx.scalar_type(),
                      " of shape ", idx.sizes());
    check_same_device(qkv, idx, op, "qkv", "index");
    const at::Tensor ic = idx.contiguous();
    const int64_t* ip = ic.data_ptr<int64_t>();
    std::vector<uint8_t> seen(n, 0);
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK_VALUE(ip[i] >= 0 && ip[i] < n && !seen[ip[i]], "sparseconv.", op,
                        ": index must be a permutation of [0, ", n, "), but index[", i, "] = ", ip[i],
                        ip[i] >= 0 && ip[i] < n ? " repeats a row" : " is out of range");
      seen[ip[i]] = 1;
    }
  }
}

int64_t max_group(const int64_t* p, int64_t g) {
  int64_t m = 0;
  for (int64_t i = 0; i < g; ++i) m = std::max(m, p[i + 1] - p[i]);
  return m;
}

// float32 takes the ISA variant, float64 the portable template.
void forward_groups(const AttnFns& fns, const float* qkv, const int64_t* off, const int64_t* index, int64_t begin,
                    int64_t end, int64_t heads, int64_t d, double scale, float* out, float* lse, float* scratch,
                    int64_t* rows) {
  fns.forward(qkv, off, index, begin, end, heads, d, static_cast<float>(scale), out, lse, scratch, rows);
}
void forward_groups(const AttnFns&, const double* qkv, const int64_t* off, const int64_t* index, int64_t begin,
                    int64_t end, int64_t heads, int64_t d, double scale, double* out, double* lse, double* scratch,
                    int64_t* rows) {
  attn_forward_groups<double>(qkv, off, index, begin, end, heads, d, scale, out, lse, scratch, rows);
}
void backward_groups(const AttnFns& fns, const float* grad, const float* qkv, const float* out, const float* lse,
                     const int64_t* off, const int64_t* index, int64_t begin, int64_t end, int64_t heads, int64_t d,
                     double scale, float* grad_qkv, float* scratch, int64_t* rows) {
  fns.backward(grad, qkv, out, lse, off, index, begin, end, heads, d, static_cast<float>(scale), grad_qkv, scratch,
               rows);
}
void backward_groups(const AttnFns&, const double* grad, const double* qkv, const double* out, const double* lse,
                     const int64_t* off, const int64_t* index, int64_t begin, int64_t end, int64_t heads, int64_t d,
                     double scale, double* grad_qkv, double* scratch, int64_t* rows) {
  attn_backward_groups<double>(grad, qkv, out, lse, off, index, begin, end, heads, d, scale, grad_qkv, scratch, rows);
}

}  // namespace
}  // namespace cpu

std::tuple<at::Tensor, at::Tensor> window_attention_cpu(const at::Tensor& qkv_in, const at::Tensor& offsets_in,
                                                        const c10::optional<at::Tensor>& index_in, int64_t heads,
                                                        double scale) {
  const char* op = "window_attention";
  cpu::check_window_attention(qkv_in, offsets_in, index_in, heads, op);
  const at::Tensor qkv = qkv_in.contiguous(), offsets = offsets_in.contiguous();
  const at::Tensor index = index_in.has_value() ? index_in->contiguous() : at::Tensor();
  const int64_t n = qkv.size(0), c = qkv.size(1) / 3, d = c / heads, g = offsets.size(0) - 1;
  at::Tensor out = at::empty({n, c}, qkv.options());
  at::Tensor lse = at::empty({n, heads}, qkv.options());
  if (n == 0 || c == 0) return {out.zero_(), lse.zero_()};
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* idx = index.defined() ? index.data_ptr<int64_t>() : nullptr;
  const int64_t maxn = cpu::max_group(off, g);
  const cpu::AttnFns fns = cpu::attn_fns();
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "window_attention_cpu", [&] {
    const scalar_t* q = qkv.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* l = lse.data_ptr<scalar_t>();
    at::parallel_for(0, g, cpu::kGroupGrain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(cpu::attn_forward_scratch(maxn, heads, d));
      std::vector<int64_t> rows(maxn);
      cpu::forward_groups(fns, q, off, idx, begin, end, heads, d, scale, o, l, scratch.data(), rows.data());
    });
  });
  return {out, lse};
}

at::Tensor window_attention_backward_cpu(const at::Tensor& grad_in, const at::Tensor& qkv_in, const at::Tensor& out_in,
                                         const at::Tensor& lse_in, const at::Tensor& offsets_in,
                                         const c10::optional<at::Tensor>& index_in, int64_t heads, double scale) {
  const char* op = "window_attention_backward";
  cpu::check_window_attention(qkv_in, offsets_in, index_in, heads, op);
  const int64_t n = qkv_in.size(0), c = qkv_in.size(1) / 3;
  TORCH_CHECK_VALUE(grad_in.dim() == 2 && grad_in.size(0) == n && grad_in.size(1) == c, "sparseconv.", op,
                    ": grad_out must be [", n, ", ", c, "], got ", grad_in.sizes());
  TORCH_CHECK_VALUE(out_in.sizes() == grad_in.sizes(), "sparseconv.", op, ": out must be [", n, ", ", c, "], got ",
                    out_in.sizes());
  TORCH_CHECK_VALUE(lse_in.dim() == 2 && lse_in.size(0) == n && lse_in.size(1) == heads, "sparseconv.", op,
                    ": lse must be [", n, ", ", heads, "], got ", lse_in.sizes());
  for (const at::Tensor* t : {&grad_in, &out_in, &lse_in}) {
    TORCH_CHECK_VALUE(t->scalar_type() == qkv_in.scalar_type(), "sparseconv.", op, ": grad_out, out and lse must be ",
                      qkv_in.scalar_type(), " like qkv, got ", t->scalar_type());
    check_same_device(qkv_in, *t, op, "qkv", "grad_out/out/lse");
  }
  const at::Tensor qkv = qkv_in.contiguous(), offsets = offsets_in.contiguous(), grad = grad_in.contiguous(),
                   out = out_in.contiguous(), lse = lse_in.contiguous();
  const at::Tensor index = index_in.has_value() ? index_in->contiguous() : at::Tensor();
  const int64_t d = c / heads, g = offsets.size(0) - 1;
  at::Tensor grad_qkv = at::empty({n, 3 * c}, qkv.options());
  if (n == 0 || c == 0) return grad_qkv.zero_();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* idx = index.defined() ? index.data_ptr<int64_t>() : nullptr;
  const int64_t maxn = cpu::max_group(off, g);
  const cpu::AttnFns fns = cpu::attn_fns();
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "window_attention_backward_cpu", [&] {
    const scalar_t* args[] = {grad.data_ptr<scalar_t>(), qkv.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                              lse.data_ptr<scalar_t>()};
    scalar_t* gq = grad_qkv.data_ptr<scalar_t>();
    at::parallel_for(0, g, cpu::kGroupGrain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(cpu::attn_backward_scratch(maxn, heads, d));
      std::vector<int64_t> rows(maxn);
      cpu::backward_groups(fns, args[0], args[1], args[2], args[3], off, idx, begin, end, heads, d, scale, gq,
                           scratch.data(), rows.data());
    });
  });
  return grad_qkv;
}

TORCH_LIBRARY_IMPL(sparseconv, CPU, m) {
  m.impl("window_attention", &window_attention_cpu);
  m.impl("window_attention_backward", &window_attention_backward_cpu);
}

}  // namespace sparseconv
