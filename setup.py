"""Build script for sparseconv: one extension, ``sparseconv._C``, from ``csrc/``.

Environment variables:
  SPARSECONV_CPU_ONLY=1     build the CPU kernels only, even when CUDA is available.
  SPARSECONV_FORCE_CUDA=1   compile the CUDA sources even when no GPU is visible.
  TORCH_CUDA_ARCH_LIST      CUDA architectures (default "8.0;8.6;9.0" when no GPU is visible).
  MAX_JOBS                  parallel compile jobs (ninja).
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    cpu_only = os.environ.get("SPARSECONV_CPU_ONLY", "0") == "1"
    force_cuda = os.environ.get("SPARSECONV_FORCE_CUDA", "0") == "1"
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    use_cuda = (
        not cpu_only
        and bool(cuda_sources)
        and torch.version.cuda is not None
        and CUDA_HOME is not None
        and (force_cuda or torch.cuda.is_available())
    )
    sources = ["csrc/sparseconv.cpp"] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++20 since 2.13;
    # torch 2.14's headers no longer compile as C++17).
    cxx_flags = ["-O3", "-fopenmp"]
    define_macros = []
    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;8.6;9.0"
        ext = CUDAExtension(
            "sparseconv._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"],
            define_macros=define_macros + [("SPARSECONV_WITH_CUDA", "1")],
        )
    else:
        ext = CppExtension(
            "sparseconv._C",
            sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
            define_macros=define_macros,
        )
    return [ext]


def _packages():
    packages = {p: os.path.join(*p.split(".")) for p in find_packages(include=["sparseconv", "sparseconv.*"])}
    # models/ and datasets/ ship inside the wheel as sparseconv.models / sparseconv.datasets.
    for top in ("models", "datasets"):
        if os.path.isfile(os.path.join(ROOT, top, "__init__.py")):
            for sub in [top] + [f"{top}.{s}" for s in find_packages(where=top)]:
                packages["sparseconv." + sub] = os.path.join(*sub.split("."))
    return packages


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


_pkgs = _packages()
setup(
    packages=sorted(_pkgs),
    package_dir=_pkgs,
    package_data={"sparseconv.models": ["weights/*.pt", "weights/*.md", "weights/seg/*.pt"]},
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
)
