// Argument checks shared by the op implementations (messages name the op and
// the argument).
#pragma once

#include <ATen/core/Tensor.h>

namespace sparseconv {

inline void check_coords(const at::Tensor& coords, const char* op, const char* name) {
  TORCH_CHECK_VALUE(coords.dim() == 2 && coords.size(1) == 4, "sparseconv.", op, ": ", name,
                    " must be [N, 4] (batch, x, y, z), got shape ", coords.sizes());
  TORCH_CHECK_VALUE(coords.scalar_type() == at::kInt, "sparseconv.", op, ": ", name, " must be int32, got ",
                    coords.scalar_type());
}

inline void check_nbmap(const at::Tensor& nbmap, const char* op) {
  TORCH_CHECK_VALUE(nbmap.dim() == 2, "sparseconv.", op, ": nbmap must be [M, K], got shape ", nbmap.sizes());
  TORCH_CHECK_VALUE(nbmap.scalar_type() == at::kInt, "sparseconv.", op, ": nbmap must be int32, got ",
                    nbmap.scalar_type());
}

inline void check_feats(const at::Tensor& feats, const char* op, const char* name) {
  TORCH_CHECK_VALUE(feats.dim() == 2, "sparseconv.", op, ": ", name, " must be [N, C], got shape ", feats.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(feats.scalar_type()), "sparseconv.", op, ": ", name,
                   " must be floating point, got ", feats.scalar_type());
}

// The CPU kernels compute in float32 and float64.
inline void check_cpu_dtype(const at::Tensor& feats, const char* op) {
  TORCH_CHECK_TYPE(feats.scalar_type() == at::kFloat || feats.scalar_type() == at::kDouble, "sparseconv.", op,
                   ": the CPU kernels support float32 and float64 features, got ", feats.scalar_type(),
                   "; convert with .float() (float16/bfloat16 are for the CUDA backend)");
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* na,
                              const char* nb) {
  TORCH_CHECK_VALUE(a.device() == b.device(), "sparseconv.", op, ": ", na, " is on ", a.device(), " but ", nb,
                    " is on ", b.device(), "; move them to the same device");
}

// sparse_rows_mm (sparse_mm.h).
inline void check_sparse_rows_mm(const at::Tensor& a, const at::Tensor& b) {
  const char* op = "sparse_rows_mm";
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2, "sparseconv.", op, ": a and b must be 2-D, got shapes ", a.sizes(),
                    " and ", b.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(a.scalar_type()), "sparseconv.", op, ": a must be floating point, got ",
                   a.scalar_type());
  TORCH_CHECK_VALUE(a.scalar_type() == b.scalar_type(), "sparseconv.", op, ": a is ", a.scalar_type(), " but b is ",
                    b.scalar_type());
  TORCH_CHECK_VALUE(a.size(1) == b.size(0), "sparseconv.", op, ": a is ", a.sizes(), " and b is ", b.sizes(),
                    "; the inner sizes differ");
  check_same_device(a, b, op, "a", "b");
}

// maxpool_backward (pool.h), after the backend's dtype check.
inline void check_maxpool_backward_args(const at::Tensor& grad, const at::Tensor& argmax, int64_t num_in) {
  const char* op = "maxpool_backward";
  TORCH_CHECK_VALUE(argmax.sizes() == grad.sizes() && argmax.scalar_type() == at::kLong, "sparseconv.", op,
                    ": argmax must be int64 with the shape of grad_out");
  TORCH_CHECK_VALUE(num_in >= 0, "sparseconv.", op, ": num_in must be >= 0");
  check_same_device(grad, argmax, op, "grad_out", "argmax");
}

// keys/values of a hash_build table (hash.h).
inline void check_hash_table(const at::Tensor& keys, const at::Tensor& values, const char* op) {
  TORCH_CHECK_VALUE(keys.dim() == 1 && keys.scalar_type() == at::kLong && values.sizes() == keys.sizes() &&
                        values.scalar_type() == at::kLong,
                    "sparseconv.", op, ": keys and values must be 1-D int64 tensors of the same length "
                    "(the output of hash_build)");
  const int64_t cap = keys.size(0);
  TORCH_CHECK_VALUE(cap >= 16 && (cap & (cap - 1)) == 0, "sparseconv.", op, ": table capacity ", cap,
                    " is not a power of two >= 16 (not a hash_build table)");
}

// conv_forward / conv_input_grad (conv.h): shapes, dtypes and devices agree.  The backend
// checks which feature dtypes it supports.
inline void check_conv_args(const char* op, const at::Tensor& feats, const at::Tensor& weight,
                            const at::Tensor& nbmap) {
  check_feats(feats, op, "feats");
  check_nbmap(nbmap, op);
  TORCH_CHECK_VALUE(weight.dim() == 3, "sparseconv.", op, ": weight must be [K, C_in, C_out], got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(weight.scalar_type() == feats.scalar_type(), "sparseconv.", op, ": weight dtype ",
                    weight.scalar_type(), " differs from feature dtype ", feats.scalar_type());
  TORCH_CHECK_VALUE(weight.size(0) == nbmap.size(1), "sparseconv.", op, ": weight has ", weight.size(0),
                    " kernel offsets but the kernel map has ", nbmap.size(1));
  TORCH_CHECK_VALUE(weight.size(1) == feats.size(1), "sparseconv.", op, ": features have ", feats.size(1),
                    " channels but weight expects C_in = ", weight.size(1));
  check_same_device(feats, weight, op, "feats", "weight");
  check_same_device(feats, nbmap, op, "feats", "nbmap");
}

// conv_weight_grad (conv.h): the map's rows index grad_out (feats when transposed).
inline void check_weight_grad_args(const char* op, const at::Tensor& feats, const at::Tensor& grad,
                                   const at::Tensor& nbmap, bool transposed) {
  check_feats(feats, op, "feats");
  check_feats(grad, op, "grad_out");
  check_nbmap(nbmap, op);
  TORCH_CHECK_VALUE(feats.scalar_type() == grad.scalar_type(), "sparseconv.", op,
                    ": feats and grad_out dtypes differ");
  check_same_device(feats, grad, op, "feats", "grad_out");
  check_same_device(feats, nbmap, op, "feats", "nbmap");
  const at::Tensor& row_side = transposed ? feats : grad;
  TORCH_CHECK_VALUE(row_side.size(0) == nbmap.size(0), "sparseconv.", op, ": the kernel map has ", nbmap.size(0),
                    " rows but ", transposed ? "feats" : "grad_out", " has ", row_side.size(0));
}

}  // namespace sparseconv
