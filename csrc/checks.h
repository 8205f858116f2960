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

}  // namespace sparseconv
