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

void attn_forward_generic(const AttnProblem<float>& pb, int64_t g_begin, int64_t g_end, float* y, float* out,
                          float* lse, const AttnScratch<float>& sc) {
  attn_forward_groups<float>(pb, g_begin, g_end, y, out, lse, sc);
}

void attn_backward_generic(const AttnProblem<float>& pb, const float* grad_out, const float* out, const float* lse,
                           int64_t g_begin, int64_t g_end, float* grad_qkv, const AttnScratch<float>& sc) {
  attn_backward_groups<float>(pb, grad_out, out, lse, g_begin, g_end, grad_qkv, sc);
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

void check_projection(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                      int64_t cin, const char* op, const char* wname, const char* bname) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == cin, "sparseconv.", op, ": ", wname, " must be [C_out, ",
                    cin, "], got shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.scalar_type() == x.scalar_type(), "sparseconv.", op, ": ", wname, " is ",
                    weight.scalar_type(), " but x is ", x.scalar_type());
  check_same_device(x, weight, op, "x", wname);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == x.scalar_type(),
                      "sparseconv.", op, ": ", bname, " must be [", weight.size(0), "] of ", x.scalar_type(),
                      ", got ", bias->scalar_type(), " of shape ", bias->sizes());
    check_same_device(x, *bias, op, "x", bname);
  }
}

void check_window_attention(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            const at::Tensor& offsets, const c10::optional<at::Tensor>& index, int64_t heads,
                            const char* op) {
  TORCH_CHECK_VALUE(heads >= 1, "sparseconv.", op, ": heads must be >= 1, got ", heads);
  TORCH_CHECK_VALUE(x.dim() == 2, "sparseconv.", op, ": x must be [N, C_in], got shape ", x.sizes());
  check_cpu_dtype(x, op);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == x.size(1) && weight.size(0) % (3 * heads) == 0,
                    "sparseconv.", op, ": weight must be [3 * C, C_in] = [3 * C, ", x.size(1),
                    "] with C divisible by heads (", heads, "), got shape ", weight.sizes());
  check_projection(x, weight, bias, x.size(1), op, "weight", "bias");
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) >= 1 && offsets.scalar_type() == at::kLong, "sparseconv.",
                    op, ": offsets must be a 1-D int64 tensor [G + 1], got ", offsets.scalar_type(), " of shape ",
                    offsets.sizes());
  check_same_device(x, offsets, op, "x", "offsets");
  const int64_t n = x.size(0);
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
    check_same_device(x, idx, op, "x", "index");
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

// float32 takes the ISA variant (and the convolution's gemm_rows micro-kernel for the projection), float64 the
// portable template.
AttnProjFn<float> projection(float*) { return gemm_rows_f32(); }
AttnProjFn<double> projection(double*) { return attn_project_generic<double>; }
void forward_groups(const AttnFns& fns, const AttnProblem<float>& pb, int64_t begin, int64_t end, float* y,
                    float* out, float* lse, const AttnScratch<float>& sc) {
  fns.forward(pb, begin, end, y, out, lse, sc);
}
void forward_groups(const AttnFns&, const AttnProblem<double>& pb, int64_t begin, int64_t end, double* y,
                    double* out, double* lse, const AttnScratch<double>& sc) {
  attn_forward_groups<double>(pb, begin, end, y, out, lse, sc);
}
void backward_groups(const AttnFns& fns, const AttnProblem<float>& pb, const float* grad, const float* out,
                     const float* lse, int64_t begin, int64_t end, float* grad_qkv, const AttnScratch<float>& sc) {
  fns.backward(pb, grad, out, lse, begin, end, grad_qkv, sc);
}
void backward_groups(const AttnFns&, const AttnProblem<double>& pb, const double* grad, const double* out,
                     const double* lse, int64_t begin, int64_t end, double* grad_qkv, const AttnScratch<double>& sc) {
  attn_backward_groups<double>(pb, grad, out, lse, begin, end, grad_qkv, sc);
}

// Inputs made contiguous, the transposed weight, and the problem description pointing into them.
template <typename T>
struct Prepared {
  at::Tensor x, wt, bias, pwt, pbias, offsets, index;
  AttnProblem<T> pb;
  int64_t max_n;
};

template <typename T>
Prepared<T> prepare(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                    const at::Tensor* proj_weight, const c10::optional<at::Tensor>* proj_bias,
                    const at::Tensor& offsets, const c10::optional<at::Tensor>& index, int64_t heads, double scale) {
  Prepared<T> r;
  r.x = x.contiguous();
  r.wt = weight.t().contiguous();
  r.bias = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (proj_weight) {
    r.pwt = proj_weight->t().contiguous();
    r.pbias = proj_bias->has_value() ? (*proj_bias)->contiguous() : at::Tensor();
  }
  r.offsets = offsets.contiguous();
  r.index = index.has_value() ? index->contiguous() : at::Tensor();
  const int64_t c = weight.size(0) / 3;
  r.pb = AttnProblem<T>{r.x.template data_ptr<T>(),
                        r.x.size(1),
                        r.wt.template data_ptr<T>(),
                        r.bias.defined() ? r.bias.template data_ptr<T>() : nullptr,
                        projection(static_cast<T*>(nullptr)),
                        r.pwt.defined() ? r.pwt.template data_ptr<T>() : nullptr,
                        r.pbias.defined() ? r.pbias.template data_ptr<T>() : nullptr,
                        r.pwt.defined() ? r.pwt.size(1) : 0,
                        r.offsets.template data_ptr<int64_t>(),
                        r.index.defined() ? r.index.template data_ptr<int64_t>() : nullptr,
                        heads,
                        c / heads,
                        static_cast<T>(scale)};
  r.max_n = max_group(r.pb.offsets, r.offsets.size(0) - 1);
  return r;
}

// A thread's scratch for groups of at most max_n rows.
template <typename T>
struct ThreadScratch {
  std::vector<T> values;
  std::vector<int64_t> rows;
  std::vector<const T*> a_rows;
  std::vector<T*> c_rows;
  ThreadScratch(int64_t values_size, int64_t max_n)
      : values(values_size), rows(max_n), a_rows(max_n), c_rows(max_n) {}
  AttnScratch<T> view() { return {values.data(), rows.data(), a_rows.data(), c_rows.data()}; }
};

}  // namespace
}  // namespace cpu

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& proj_weight,
    const c10::optional<at::Tensor>& proj_bias, const at::Tensor& offsets, const c10::optional<at::Tensor>& index,
    int64_t heads, double scale) {
  const char* op = "window_attention";
  cpu::check_window_attention(x, weight, bias, offsets, index, heads, op);
  const int64_t n = x.size(0), c = weight.size(0) / 3, g = offsets.size(0) - 1;
  cpu::check_projection(x, proj_weight, proj_bias, c, op, "proj_weight", "proj_bias");
  at::Tensor y = at::empty({n, proj_weight.size(0)}, x.options());
  at::Tensor out = at::empty({n, c}, x.options());
  at::Tensor lse = at::empty({n, heads}, x.options());
  if (n == 0) return {y, out, lse};
  if (c == 0 || proj_weight.size(0) == 0) {  // nothing to attend: y is the output projection's bias
    if (proj_bias.has_value()) {
      y.copy_(proj_bias->unsqueeze(0).expand_as(y));
    } else {
      y.zero_();
    }
    return {y, out.zero_(), lse.zero_()};
  }
  const cpu::AttnFns fns = cpu::attn_fns();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "window_attention_cpu", [&] {
    const cpu::Prepared<scalar_t> prep =
        cpu::prepare<scalar_t>(x, weight, bias, &proj_weight, &proj_bias, offsets, index, heads, scale);
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* l = lse.data_ptr<scalar_t>();
    at::parallel_for(0, g, cpu::kGroupGrain, [&](int64_t begin, int64_t end) {
      cpu::ThreadScratch<scalar_t> scratch(cpu::attn_forward_scratch(prep.max_n, heads, c / heads), prep.max_n);
      cpu::forward_groups(fns, prep.pb, begin, end, yp, o, l, scratch.view());
    });
  });
  return {y, out, lse};
}

at::Tensor window_attention_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x, const at::Tensor& weight,
                                         const c10::optional<at::Tensor>& bias, const at::Tensor& out_in,
                                         const at::Tensor& lse_in, const at::Tensor& offsets,
                                         const c10::optional<at::Tensor>& index, int64_t heads, double scale) {
  const char* op = "window_attention_backward";
  cpu::check_window_attention(x, weight, bias, offsets, index, heads, op);
  const int64_t n = x.size(0), c = weight.size(0) / 3, g = offsets.size(0) - 1;
  TORCH_CHECK_VALUE(grad_in.dim() == 2 && grad_in.size(0) == n && grad_in.size(1) == c, "sparseconv.", op,
                    ": grad_out must be [", n, ", ", c, "], got ", grad_in.sizes());
  TORCH_CHECK_VALUE(out_in.sizes() == grad_in.sizes(), "sparseconv.", op, ": out must be [", n, ", ", c, "], got ",
                    out_in.sizes());
  TORCH_CHECK_VALUE(lse_in.dim() == 2 && lse_in.size(0) == n && lse_in.size(1) == heads, "sparseconv.", op,
                    ": lse must be [", n, ", ", heads, "], got ", lse_in.sizes());
  for (const at::Tensor* t : {&grad_in, &out_in, &lse_in}) {
    TORCH_CHECK_VALUE(t->scalar_type() == x.scalar_type(), "sparseconv.", op, ": grad_out, out and lse must be ",
                      x.scalar_type(), " like x, got ", t->scalar_type());
    check_same_device(x, *t, op, "x", "grad_out/out/lse");
  }
  const at::Tensor grad = grad_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  at::Tensor grad_qkv = at::empty({n, 3 * c}, x.options());
  if (n == 0 || c == 0) return grad_qkv.zero_();
  const cpu::AttnFns fns = cpu::attn_fns();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "window_attention_backward_cpu", [&] {
    const cpu::Prepared<scalar_t> prep =
        cpu::prepare<scalar_t>(x, weight, bias, nullptr, nullptr, offsets, index, heads, scale);
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* op_ = out.data_ptr<scalar_t>();
    const scalar_t* lp = lse.data_ptr<scalar_t>();
    scalar_t* gq = grad_qkv.data_ptr<scalar_t>();
    at::parallel_for(0, g, cpu::kGroupGrain, [&](int64_t begin, int64_t end) {
      cpu::ThreadScratch<scalar_t> scratch(cpu::attn_backward_scratch(prep.max_n, heads, c / heads), prep.max_n);
      cpu::backward_groups(fns, prep.pb, gp, op_, lp, begin, end, gq, scratch.view());
    });
  });
  return grad_qkv;
}

TORCH_LIBRARY_IMPL(sparseconv, CPU, m) {
  m.impl("window_attention", &window_attention_cpu);
  m.impl("window_attention_backward", &window_attention_backward_cpu);
}

}  // namespace sparseconv
