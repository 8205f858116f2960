"""Sparse convolution layers.

Every layer stores ``weight`` as ``[K, C_in, C_out]`` with the kernel offsets
enumerated x-major (``k = (kx * KY + ky) * KZ + kz``, axes in the
``(x, y, z)`` order of the coordinates) and ``bias`` as ``[C_out]``.
Initialisation follows ``torch.nn.Conv3d`` (fan-in ``C_in * K``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..tensor import IntOr3, SparseTensor, _as_triple
from . import functional as F
from .base import SparseModule

__all__ = ["SubMConv3d", "SparseConv3d", "SparseInverseConv3d", "SparseConvTranspose3d"]


class _SparseConvBase(SparseModule):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOr3, bias: bool, device=None, dtype=None):
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"{type(self).__name__}: channels must be >= 1, got {in_channels} -> {out_channels}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = _as_triple(kernel_size, "kernel_size")
        k = self.kernel_size[0] * self.kernel_size[1] * self.kernel_size[2]
        factory = {"device": device, "dtype": dtype}
        self.weight = torch.nn.Parameter(torch.empty(k, self.in_channels, self.out_channels, **factory))
        self.bias = torch.nn.Parameter(torch.empty(self.out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        fan_in = self.in_channels * self.weight.shape[0]
        bound = 1.0 / math.sqrt(fan_in)  # = kaiming_uniform_(a=sqrt(5)), as torch.nn.Conv3d
        torch.nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            torch.nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        for name in ("stride", "padding", "dilation", "output_padding"):
            v = getattr(self, name, None)
            if v is not None and v != (1, 1, 1) and not (name in ("padding", "output_padding") and v == (0, 0, 0)):
                s += f", {name}={v}"
        if getattr(self, "indice_key", None):
            s += f", indice_key={self.indice_key!r}"
        if self.bias is None:
            s += ", bias=False"
        return s


class SubMConv3d(_SparseConvBase):
    """Submanifold sparse convolution: output sites = input sites.

    Equals dense ``conv3d`` (stride 1, padding ``dilation * (kernel_size // 2)``) at the
    active sites.  ``indice_key`` is accepted for spconv compatibility; maps are cached
    per coordinate set automatically.

    Args:
        in_channels, out_channels: channel counts.
        kernel_size: int or (kx, ky, kz).
        dilation: int or 3 ints.
        bias: add a learnable bias.

    Shape:
        ``[N, C_in]`` features -> ``[N, C_out]`` on the same sites.

    Example:
        >>> conv = SubMConv3d(4, 16, 3)
        >>> y = conv(x)  # same coordinates as x, 16 channels
    """

    def __init__(self, in_channels, out_channels, kernel_size: IntOr3 = 3, dilation: IntOr3 = 1, bias: bool = True,
                 indice_key: Optional[str] = None, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, bias, device, dtype)
        self.dilation = _as_triple(dilation, "dilation")
        self.indice_key = indice_key

    def forward(self, x: SparseTensor) -> SparseTensor:
        return F.submanifold_conv3d(x, self.weight, self.bias, self.kernel_size, self.dilation,
                                    layer=f"SubMConv3d({self.in_channels} -> {self.out_channels})")


class SparseConv3d(_SparseConvBase):
    """Regular sparse convolution (spconv's ``SparseConv3d``).

    Output sites: every site of the dense ``conv3d`` output grid that sees at least one active
    input; ``spatial_shape`` follows the dense formula.  ``indice_key`` names the kernel map so a
    ``SparseInverseConv3d`` with the same key can invert it.

    Example:
        >>> down = SparseConv3d(16, 32, 3, stride=2, padding=1, indice_key="down1")
        >>> y = down(x)  # y.stride == (2, 2, 2)
    """

    def __init__(self, in_channels, out_channels, kernel_size: IntOr3, stride: IntOr3 = 1, padding: IntOr3 = 0,
                 dilation: IntOr3 = 1, bias: bool = True, indice_key: Optional[str] = None, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, bias, device, dtype)
        self.stride = _as_triple(stride, "stride")
        self.padding = _as_triple(padding, "padding", 0)
        self.dilation = _as_triple(dilation, "dilation")
        self.indice_key = indice_key

    def forward(self, x: SparseTensor) -> SparseTensor:
        return F.sparse_conv3d(x, self.weight, self.bias, self.kernel_size, self.stride, self.padding, self.dilation,
                               self.indice_key, layer=f"SparseConv3d({self.in_channels} -> {self.out_channels})")


class SparseInverseConv3d(_SparseConvBase):
    """Inverse of a strided ``SparseConv3d``: restores exactly the sites it consumed.

    Inverts the strided convolution that produced its input, or the one registered under
    ``indice_key``; the kernel map is reused, read backwards.  ``kernel_size`` must equal that
    convolution's.

    Example:
        >>> up = SparseInverseConv3d(32, 16, 3, indice_key="down1")
        >>> z = up(y)  # the sites of x again
    """

    def __init__(self, in_channels, out_channels, kernel_size: IntOr3, indice_key: Optional[str] = None,
                 bias: bool = True, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, bias, device, dtype)
        self.indice_key = indice_key

    def forward(self, x: SparseTensor) -> SparseTensor:
        return F.sparse_inverse_conv3d(x, self.weight, self.bias, self.kernel_size, self.indice_key,
                                       layer=f"SparseInverseConv3d({self.in_channels} -> {self.out_channels})")


class SparseConvTranspose3d(_SparseConvBase):
    """Generative transposed sparse convolution: equals dense ``conv_transpose3d`` on every site
    that receives an active input (those sites become the output)."""

    def __init__(self, in_channels, out_channels, kernel_size: IntOr3, stride: IntOr3 = 1, padding: IntOr3 = 0,
                 dilation: IntOr3 = 1, output_padding: IntOr3 = 0, bias: bool = True, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, bias, device, dtype)
        self.stride = _as_triple(stride, "stride")
        self.padding = _as_triple(padding, "padding", 0)
        self.dilation = _as_triple(dilation, "dilation")
        self.output_padding = _as_triple(output_padding, "output_padding", 0)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return F.sparse_conv_transpose3d(
            x, self.weight, self.bias, self.kernel_size, self.stride, self.padding, self.dilation,
            self.output_padding, layer=f"SparseConvTranspose3d({self.in_channels} -> {self.out_channels})")
