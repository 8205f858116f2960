// Operator schemas of the sparseconv library, defined once.  Kernels are
// registered per backend in csrc/cpu and csrc/cuda; fake (meta) kernels and
// autograd formulas are registered from Python (sparseconv/ops.py).
#include <Python.h>

#include <torch/library.h>

#include "cpu/gemm_rows.h"

namespace {

// sparseconv._C.cpu_isa() -> "avx512" | "avx2" | "generic": the instruction set of the CPU
// convolution micro-kernels on this machine (cpu/gemm_rows.h).
PyObject* cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(sparseconv::cpu::gemm_rows_isa()); }

PyMethodDef methods[] = {{"cpu_isa", cpu_isa, METH_NOARGS, "ISA of the CPU convolution micro-kernels."},
                         {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
// Importing sparseconv._C runs the static TORCH_LIBRARY registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(sparseconv, m) {
  m.def("hash_build(Tensor coords, int[] shape) -> (Tensor, Tensor)");
  m.def("hash_query(Tensor keys, Tensor values, Tensor queries, int[] shape) -> Tensor");
  m.def("kmap_submanifold(Tensor keys, Tensor values, Tensor coords, int[] shape, int[] kernel_size, "
        "int[] dilation) -> Tensor");
  m.def("kmap_strided(Tensor coords, int[] shape, int[] out_spatial, int[] kernel_size, int[] stride, "
        "int[] padding, int[] dilation, bool transposed) -> (Tensor, Tensor)");
  m.def("conv_forward(Tensor feats, Tensor weight, Tensor nbmap, SymInt num_out, bool transposed) -> Tensor");
  m.def("conv_input_grad(Tensor grad_out, Tensor weight, Tensor nbmap, SymInt num_in, bool transposed) -> Tensor");
  m.def("conv_weight_grad(Tensor feats, Tensor grad_out, Tensor nbmap, bool transposed) -> Tensor");
  m.def("maxpool_forward(Tensor feats, Tensor nbmap) -> (Tensor, Tensor)");
  m.def("maxpool_backward(Tensor grad_out, Tensor argmax, SymInt num_in) -> Tensor");
  m.def("avgpool_forward(Tensor feats, Tensor nbmap, bool count_inactive) -> Tensor");
  m.def("avgpool_backward(Tensor grad_out, Tensor nbmap, SymInt num_in, bool count_inactive) -> Tensor");
  m.def("sparse_rows_mm(Tensor a, Tensor b) -> Tensor");
  m.def("window_attention(Tensor x, Tensor weight, Tensor? bias, Tensor proj_weight, Tensor? proj_bias, "
        "Tensor offsets, Tensor? index, int heads, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("window_attention_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor out, Tensor lse, "
        "Tensor offsets, Tensor? index, int heads, float scale) -> Tensor");
  m.def("voxelize(Tensor points, Tensor? batch, float[] voxel_size, float[] lower, int[] grid, int batch_size, "
        "int max_points, int max_voxels, str reduce, bool order_by_first) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
