"""Sparse layers (``sparseconv.nn``)."""
from . import functional
from .base import SparseModule
from .conv import SparseConv3d, SparseConvTranspose3d, SparseInverseConv3d, SubMConv3d
from .modules import GELU, Dropout, LeakyReLU, Linear, ReLU, SiLU, SparseSequential, ToDense
from .norm import BatchNorm, GroupNorm, LayerNorm, SyncBatchNorm
from .pool import SparseAvgPool3d, SparseGlobalAvgPool, SparseGlobalMaxPool, SparseMaxPool3d

__all__ = [
    "functional",
    "SparseModule",
    "SubMConv3d",
    "SparseConv3d",
    "SparseInverseConv3d",
    "SparseConvTranspose3d",
    "SparseMaxPool3d",
    "SparseAvgPool3d",
    "SparseGlobalMaxPool",
    "SparseGlobalAvgPool",
    "BatchNorm",
    "SyncBatchNorm",
    "LayerNorm",
    "GroupNorm",
    "ReLU",
    "LeakyReLU",
    "GELU",
    "SiLU",
    "Dropout",
    "Linear",
    "SparseSequential",
    "ToDense",
]
