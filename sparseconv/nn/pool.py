"""Sparse pooling layers."""
from __future__ import annotations

from typing import Optional

import torch

from ..tensor import IntOr3, SparseTensor, _as_triple
from . import functional as F
from .base import SparseModule

__all__ = ["SparseMaxPool3d", "SparseAvgPool3d", "SparseGlobalMaxPool", "SparseGlobalAvgPool"]


class _SparsePool(SparseModule):
    def __init__(self, kernel_size: IntOr3, stride: Optional[IntOr3] = None, padding: IntOr3 = 0,
                 dilation: IntOr3 = 1, indice_key: Optional[str] = None):
        super().__init__()
        self.kernel_size = _as_triple(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else _as_triple(stride, "stride")
        self.padding = _as_triple(padding, "padding", 0)
        self.dilation = _as_triple(dilation, "dilation")
        self.indice_key = indice_key

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, dilation={self.dilation}"


class SparseMaxPool3d(_SparsePool):
    """Max pooling over the active sites of each window (empty sites are ignored, as in spconv).

    Output sites equal those of ``SparseConv3d`` with the same geometry; ``stride`` defaults to
    ``kernel_size``.  Where every input is >= 0, or where empty sites are read as ``-inf``, this is
    dense ``max_pool3d`` at the output sites.

    Example:
        >>> y = SparseMaxPool3d(2)(x)  # y.stride == 2 * x.stride
    """

    def forward(self, x: SparseTensor) -> SparseTensor:
        return F.sparse_max_pool3d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.indice_key)


class SparseAvgPool3d(_SparsePool):
    """Average pooling; by default the mean over the active sites of each window
    (``count_inactive=False``); with ``count_inactive=True`` the sum divided by the kernel volume,
    which is dense ``avg_pool3d`` (``count_include_pad=True``) at the output sites."""

    def __init__(self, kernel_size: IntOr3, stride: Optional[IntOr3] = None, padding: IntOr3 = 0,
                 dilation: IntOr3 = 1, count_inactive: bool = False, indice_key: Optional[str] = None):
        super().__init__(kernel_size, stride, padding, dilation, indice_key)
        self.count_inactive = bool(count_inactive)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return F.sparse_avg_pool3d(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                   self.count_inactive, self.indice_key)


class SparseGlobalMaxPool(SparseModule):
    """Max over all voxels of each batch element: ``SparseTensor`` -> dense ``[B, C]``."""

    def forward(self, x: SparseTensor) -> torch.Tensor:
        return F.global_max_pool(x)


class SparseGlobalAvgPool(SparseModule):
    """Mean over all voxels of each batch element: ``SparseTensor`` -> dense ``[B, C]``."""

    def forward(self, x: SparseTensor) -> torch.Tensor:
        return F.global_avg_pool(x)
