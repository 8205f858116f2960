"""Sparse layers (``sparseconv.nn``)."""
from . import functional
from .activation import TopK
from .base import SparseModule
from .attention import SparseTransformerBlock, SparseWindowAttention
from .conv import SparseConv3d, SparseConvTranspose3d, SparseInverseConv3d, SubMConv3d
from .modules import GELU, Dropout, LeakyReLU, Linear, ReLU, SiLU, SparseSequential, ToDense
from .ffn import SparseFFN, SparseMoEFFN
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
    "TopK",
    "Dropout",
    "Linear",
    "SparseSequential",
    "ToDense",
    "SparseFFN",
    "SparseMoEFFN",
    "SparseWindowAttention",
    "SparseTransformerBlock",
]
