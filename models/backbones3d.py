"""3D sparse backbones with OpenPCDet's layer pattern.

Axis order: sparseconv coordinates are ``(batch, x, y, z)``, OpenPCDet/spconv
use ``(batch, z, y, x)``.  Anisotropic kernels, strides and paddings below are
therefore OpenPCDet's reversed: its ``padding=(0, 1, 1)`` is our ``(1, 1, 0)``
and its ``SparseConv3d(64, 128, (3, 1, 1), stride=(2, 1, 1))`` is our kernel
``(1, 1, 3)``, stride ``(1, 1, 2)``.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch

from sparseconv import SparseTensor
from sparseconv import nn as snn

from .registry import register_model

__all__ = ["VoxelBackBone8x", "height_compression"]


def _block(cin, cout, kernel_size, stride=1, padding=0, conv="subm", indice_key=None):
    if conv == "subm":
        layer = snn.SubMConv3d(cin, cout, kernel_size, bias=False, indice_key=indice_key)
    else:
        layer = snn.SparseConv3d(cin, cout, kernel_size, stride, padding, bias=False, indice_key=indice_key)
    return snn.SparseSequential(layer, snn.BatchNorm(cout, eps=1e-3, momentum=0.01), snn.ReLU())


@register_model("voxel_backbone8x")
class VoxelBackBone8x(snn.SparseModule):
    """SECOND's sparse 3D backbone (OpenPCDet ``VoxelBackBone8x``): strides 1, 2, 4, 8, then a
    z-downsampling conv.

    Args:
        input_channels: voxel feature channels (4 for MeanVFE over x, y, z, intensity).
        grid_size: voxel grid ``(X, Y, Z)``; the sparse grid is ``(X, Y, Z + 1)`` as in OpenPCDet.

    Shape:
        input SparseTensor on ``(X, Y, Z + 1)`` -> dict with ``encoded`` (stride ``(8, 8, 16)``,
        128 channels) and ``multi_scale`` features ``x_conv1`` .. ``x_conv4``.

    Example:
        >>> net = VoxelBackBone8x(4, (1408, 1600, 40))
        >>> out = net(voxels)["encoded"]
    """

    def __init__(self, input_channels: int = 4, grid_size: Sequence[int] = (1408, 1600, 40)):
        super().__init__()
        self.sparse_shape = (int(grid_size[0]), int(grid_size[1]), int(grid_size[2]) + 1)
        self.conv_input = _block(input_channels, 16, 3, indice_key="subm1")
        self.conv1 = snn.SparseSequential(_block(16, 16, 3, indice_key="subm1"))
        self.conv2 = snn.SparseSequential(
            _block(16, 32, 3, 2, 1, conv="spconv", indice_key="spconv2"),
            _block(32, 32, 3, indice_key="subm2"),
            _block(32, 32, 3, indice_key="subm2"),
        )
        self.conv3 = snn.SparseSequential(
            _block(32, 64, 3, 2, 1, conv="spconv", indice_key="spconv3"),
            _block(64, 64, 3, indice_key="subm3"),
            _block(64, 64, 3, indice_key="subm3"),
        )
        self.conv4 = snn.SparseSequential(
            _block(64, 64, 3, 2, (1, 1, 0), conv="spconv", indice_key="spconv4"),
            _block(64, 64, 3, indice_key="subm4"),
            _block(64, 64, 3, indice_key="subm4"),
        )
        self.conv_out = _block(64, 128, (1, 1, 3), (1, 1, 2), 0, conv="spconv", indice_key="spconv_down2")
        self.num_point_features = 128

    def forward(self, x: SparseTensor) -> Dict[str, object]:
        x = self.conv_input(x)
        x1 = self.conv1(x)
        x2 = self.conv2(x1)
        x3 = self.conv3(x2)
        x4 = self.conv4(x3)
        out = self.conv_out(x4)
        return {"encoded": out, "multi_scale": {"x_conv1": x1, "x_conv2": x2, "x_conv3": x3, "x_conv4": x4}}


def height_compression(x: SparseTensor) -> torch.Tensor:
    """Bird's-eye-view map ``[B, C * Z, Y, X]`` of a sparse tensor (OpenPCDet's HeightCompression)."""
    dense = x.dense()  # [B, C, X, Y, Z]
    b, c, nx, ny, nz = dense.shape
    return dense.permute(0, 1, 4, 3, 2).reshape(b, c * nz, ny, nx)
