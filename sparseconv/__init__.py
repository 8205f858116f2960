"""sparseconv: 3D sparse convolution for LiDAR point clouds and sparse volumes.

Importing the package loads the C++ operator library; it never queries a GPU.
"""
from . import ops  # noqa: F401  (registers fake kernels and autograd formulas)
from . import nn  # noqa: F401
from . import sparsity  # noqa: F401
from .coords import CoordinateSet
from .tensor import SparseTensor, cat
from .voxelize import devoxelize, voxelize, voxelize_padded

__version__ = "0.1.0"

__all__ = ["SparseTensor", "CoordinateSet", "cat", "voxelize", "voxelize_padded", "devoxelize", "nn", "ops",
           "sparsity", "__version__"]
