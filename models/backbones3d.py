"""3D sparse backbones with OpenPCDet's layer pattern.

Axis order: sparseconv coordinates are ``(batch, x, y, z)``, OpenPCDet/spconv
use ``(batch, z, y, x)``.  Anisotropic kernels, strides and paddings below are
therefore OpenPCDet's reversed: its ``padding=(0, 1, 1)`` is our ``(1, 1, 0)``
and its ``SparseConv3d(64, 128, (3, 1, 1), stride=(2, 1, 1))`` is our kernel
``(1, 1, 3)``, stride ``(1, 1, 2)``.

All three backbones (:class:`VoxelBackBone8x`, :class:`VoxelResBackBone8x`,
:class:`VoxelBackBone8xAttn`) share the stage geometry:

==========  =========================  ===================================
stage       output stride (x, y, z)    output grid (``X, Y`` even)
==========  =========================  ===================================
conv1       (1, 1, 1)                  ``(X, Y, Z + 1)``
conv2       (2, 2, 2)                  ``(X/2, Y/2, z2)``, ``z2 = Z // 2 + 1``
conv3       (4, 4, 4)                  ``(X/4, Y/4, z3)``, ``z3 = (z2 - 1) // 2 + 1``
conv4       (8, 8, 8)                  ``(X/8, Y/8, z4)``
conv_out    (8, 8, 16)                 ``(X/8, Y/8, z_out)``
==========  =========================  ===================================

(odd ``X`` rounds up at each halving: ``(X - 1) // 2 + 1``).  With OpenPCDet's defaults
(``Z = 40``) conv4 has no z padding (``z4 = 5``) and conv_out none either (``z_out = 2``).
A flat grid (small ``Z``) would leave conv4 or conv_out with an empty output grid; there
the backbone pads z just enough for one output layer (``Z = 20``: ``z4 = 2``, conv_out
padding 1, ``z_out = 1``), or uses ``last_pad`` when given (OpenPCDet's ``last_pad``, on z
only).  ``out_spatial_shape`` and ``num_bev_features`` (channels of
:func:`height_compression` of ``encoded``: ``128 * z_out``) say what came out.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from sparseconv import SparseTensor
from sparseconv import nn as snn

from ._utils import int_arg
from .registry import register_model

__all__ = ["VoxelBackBone8x", "VoxelResBackBone8x", "VoxelBackBone8xAttn", "SparseBasicBlock",
           "height_compression"]


def _block(cin, cout, kernel_size, stride=1, padding=0, conv="subm", indice_key=None):
    if conv == "subm":
        layer = snn.SubMConv3d(cin, cout, kernel_size, bias=False, indice_key=indice_key)
    else:
        layer = snn.SparseConv3d(cin, cout, kernel_size, stride, padding, bias=False, indice_key=indice_key)
    return snn.SparseSequential(layer, snn.BatchNorm(cout, eps=1e-3, momentum=0.01), snn.ReLU())


def _halve(n: int, pad: int = 1) -> int:
    """Output length of a kernel-3, stride-2 convolution with padding ``pad`` on ``n`` sites."""
    return (n + 2 * pad - 3) // 2 + 1


def _grid_geometry(grid_size: Sequence[int], last_pad: Optional[int]):
    """Checks ``grid_size`` and ``last_pad``; returns ``(sparse_shape, conv4_pad_z, last_pad_z, out_shape)``."""
    if isinstance(grid_size, (str, bytes)) or not hasattr(grid_size, "__len__") or len(grid_size) != 3:
        raise ValueError(f"grid_size must be 3 ints (X, Y, Z), got {grid_size!r}")
    try:
        grid = tuple(int(v) for v in grid_size)
    except (TypeError, ValueError):
        raise ValueError(f"grid_size must be 3 ints (X, Y, Z), got {grid_size!r}") from None
    if min(grid) < 1 or any(float(g) != float(v) for g, v in zip(grid, grid_size)):
        raise ValueError(f"grid_size must be 3 positive ints (X, Y, Z), got {grid_size!r}")
    sparse_shape = (grid[0], grid[1], grid[2] + 1)
    z3 = _halve(_halve(sparse_shape[2]))
    pad4 = 0 if z3 >= 3 else 1
    z4 = _halve(z3, pad4)
    if last_pad is None:
        pad_out = 0 if z4 >= 3 else (4 - z4) // 2
    else:
        pad_out = int_arg(last_pad, "last_pad (None: automatic)", 0)
    z_out = _halve(z4, pad_out)
    if z_out < 1:
        raise ValueError(f"last_pad={last_pad} leaves conv_out an empty z axis: conv4 gives {z4} z-sites for "
                         f"grid_size {grid}; use last_pad >= {(4 - z4) // 2} or None")
    xy = [_halve(_halve(_halve(n))) for n in grid[:2]]
    return sparse_shape, pad4, pad_out, (xy[0], xy[1], z_out)


def _on_grid(x: SparseTensor, sparse_shape: Tuple[int, int, int], who: str) -> SparseTensor:
    """``x`` on the backbone's sparse grid ``(X, Y, Z + 1)``: an input on the voxel grid ``(X, Y, Z)`` (what
    :func:`sparseconv.voxelize` and ``collate`` give) is re-wrapped, as OpenPCDet builds its input tensor
    with ``sparse_shape``."""
    if not isinstance(x, SparseTensor):
        raise TypeError(f"{who} expects a SparseTensor, got {type(x).__name__}")
    if x.spatial_shape == sparse_shape:
        return x
    grid = (sparse_shape[0], sparse_shape[1], sparse_shape[2] - 1)
    if x.spatial_shape != grid or x.stride != (1, 1, 1):
        raise ValueError(f"{who} was built for grid_size {grid} (sparse grid {sparse_shape}); got an input on "
                         f"spatial_shape {x.spatial_shape} with stride {x.stride}")
    geo = x.geometry
    kw = {} if geo is None else {"voxel_size": geo.voxel_size, "origin": geo.origin}
    return SparseTensor(x.features, x.coords, sparse_shape, batch_size=x.batch_size, **kw)


@register_model("voxel_backbone8x")
class VoxelBackBone8x(snn.SparseModule):
    """SECOND's sparse 3D backbone (OpenPCDet ``VoxelBackBone8x``): strides 1, 2, 4, 8, then a
    z-downsampling conv.

    Every layer is conv (no bias) + ``BatchNorm(eps=1e-3, momentum=0.01)`` + ReLU; submanifold
    3^3 convs within a stage, a strided 3^3 conv (stride 2) opening stages 2-4, and conv_out a
    ``(1, 1, 3)`` conv with stride ``(1, 1, 2)``.  See the module docstring for the z padding of
    flat grids.

    Args:
        input_channels: voxel feature channels (4 for MeanVFE over x, y, z, intensity).
        grid_size: voxel grid ``(X, Y, Z)``; the sparse grid is ``(X, Y, Z + 1)`` as in OpenPCDet.
        last_pad: z padding of conv_out; ``None`` (default): 0 where conv4 leaves at least 3 z-sites
            (OpenPCDet's default), else just enough for one output z-site.

    Attributes:
        sparse_shape: ``(X, Y, Z + 1)``.
        out_spatial_shape: grid of ``encoded``.
        num_point_features: channels of ``encoded`` (128).
        num_bev_features: channels of ``height_compression(encoded)``: ``128 * out_spatial_shape[2]``.
        backbone_channels: channels of each ``multi_scale`` entry.

    Shape:
        input: SparseTensor with ``input_channels`` channels on ``(X, Y, Z + 1)``, or on ``(X, Y, Z)``
        (re-wrapped onto ``(X, Y, Z + 1)``).
        output: dict with ``encoded`` (stride ``(8, 8, 16)``, 128 channels, on ``out_spatial_shape``)
        and ``multi_scale``: ``x_conv1`` .. ``x_conv4`` (strides 1, 2, 4, 8; 16, 32, 64, 64 channels).

    Raises:
        ValueError: bad ``grid_size`` / ``last_pad``; an input on another grid.

    Example:
        >>> net = VoxelBackBone8x(4, (1408, 1600, 40))
        >>> out = net(batch["voxels"])["encoded"]          # stride (8, 8, 16), grid (176, 200, 2)
        >>> bev = height_compression(out)                  # [B, 256, 200, 176]
    """

    def __init__(self, input_channels: int = 4, grid_size: Sequence[int] = (1408, 1600, 40),
                 last_pad: Optional[int] = None):
        super().__init__()
        input_channels = _check_channels(input_channels)
        self.sparse_shape, pad4, pad_out, self.out_spatial_shape = _grid_geometry(grid_size, last_pad)
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
            _block(64, 64, 3, 2, (1, 1, pad4), conv="spconv", indice_key="spconv4"),
            _block(64, 64, 3, indice_key="subm4"),
            _block(64, 64, 3, indice_key="subm4"),
        )
        self.conv_out = _block(64, 128, (1, 1, 3), (1, 1, 2), (0, 0, pad_out), conv="spconv",
                               indice_key="spconv_down2")
        self.num_point_features = 128
        self.num_bev_features = 128 * self.out_spatial_shape[2]
        self.backbone_channels = {"x_conv1": 16, "x_conv2": 32, "x_conv3": 64, "x_conv4": 64}

    def forward(self, x: SparseTensor) -> Dict[str, object]:
        x = self.conv_input(_on_grid(x, self.sparse_shape, type(self).__name__))
        x1 = self.conv1(x)
        x2 = self.conv2(x1)
        x3 = self.conv3(x2)
        x4 = self._stride8(x3)
        out = self.conv_out(x4)
        return {"encoded": out, "multi_scale": {"x_conv1": x1, "x_conv2": x2, "x_conv3": x3, "x_conv4": x4}}

    def _stride8(self, x3: SparseTensor) -> SparseTensor:
        """The stride-8 stage (``conv4``); :class:`VoxelBackBone8xAttn` adds its attention blocks here."""
        return self.conv4(x3)


def _check_channels(input_channels) -> int:
    return int_arg(input_channels, "input_channels")


class SparseBasicBlock(snn.SparseModule):
    """OpenPCDet's residual ``SparseBasicBlock``: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + identity)``.

    ``conv1`` and ``conv2`` are submanifold 3^3 convolutions (so the block keeps the input sites), the
    norms ``BatchNorm(eps=1e-3, momentum=0.01)``; ``identity`` is ``x`` (or ``downsample(x)``).  Parameter
    names (``conv1``, ``bn1``, ``conv2``, ``bn2``) are OpenPCDet's.

    Args:
        inplanes: input channels.
        planes: output channels (must equal ``inplanes`` unless ``downsample`` is given).
        bias: biases in the two convolutions (OpenPCDet's default with a norm: True).
        indice_key: passed to the convolutions (informational).
        downsample: optional sparse module mapping ``x`` to the identity branch (``planes`` channels, same sites).

    Shape:
        SparseTensor ``[N, inplanes]`` -> SparseTensor ``[N, planes]`` on the same sites.

    Example:
        >>> block = SparseBasicBlock(32, 32)
        >>> y = block(x)       # x: SparseTensor, 32 channels; y.coords equals x.coords
    """

    def __init__(self, inplanes: int, planes: int, bias: bool = True, indice_key: Optional[str] = None,
                 downsample: Optional[torch.nn.Module] = None):
        super().__init__()
        inplanes, planes = int_arg(inplanes, "inplanes"), int_arg(planes, "planes")
        if downsample is None and inplanes != planes:
            raise ValueError(f"inplanes ({inplanes}) must equal planes ({planes}) without a downsample module")
        self.conv1 = snn.SubMConv3d(inplanes, planes, 3, bias=bias, indice_key=indice_key)
        self.bn1 = snn.BatchNorm(planes, eps=1e-3, momentum=0.01)
        self.relu = snn.ReLU()
        self.conv2 = snn.SubMConv3d(planes, planes, 3, bias=bias, indice_key=indice_key)
        self.bn2 = snn.BatchNorm(planes, eps=1e-3, momentum=0.01)
        self.downsample = downsample

    def forward(self, x: SparseTensor) -> SparseTensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return out.replace_feature(torch.relu(out.features + identity.features))


@register_model("voxel_res_backbone8x")
class VoxelResBackBone8x(snn.SparseModule):
    """OpenPCDet's residual SECOND backbone (``VoxelResBackBone8x``, used by CenterPoint / PV-RCNN++).

    ``conv_input`` (submanifold 3^3, 16 channels), then four stages: stage 1 two
    :class:`SparseBasicBlock` (16); stages 2-4 a strided conv block (conv + BN + ReLU, stride 2) then
    two :class:`SparseBasicBlock` (32, 64, 128 channels); ``conv_out`` a ``(1, 1, 3)`` conv, stride
    ``(1, 1, 2)``, 128 channels.  Same strides, z padding rule and output dict as
    :class:`VoxelBackBone8x`.

    Args:
        input_channels: voxel feature channels.
        grid_size: voxel grid ``(X, Y, Z)``; the sparse grid is ``(X, Y, Z + 1)``.
        last_pad: z padding of conv_out (``None``: automatic, see :class:`VoxelBackBone8x`).
        bias: biases in the convolutions of the residual blocks (OpenPCDet's ``USE_BIAS``, default True).

    Attributes:
        sparse_shape, out_spatial_shape, num_point_features, num_bev_features, backbone_channels:
            as :class:`VoxelBackBone8x` (``x_conv4`` has 128 channels here).

    Shape:
        input: SparseTensor with ``input_channels`` channels on ``(X, Y, Z + 1)`` or ``(X, Y, Z)``.
        output: dict with ``encoded`` (stride ``(8, 8, 16)``, 128 channels) and ``multi_scale``
        ``x_conv1`` .. ``x_conv4`` (16, 32, 64, 128 channels).

    Example:
        >>> net = VoxelResBackBone8x(4, (352, 400, 20))
        >>> net.out_spatial_shape, net.num_bev_features
        ((44, 50, 1), 128)
    """

    def __init__(self, input_channels: int = 4, grid_size: Sequence[int] = (1408, 1600, 40),
                 last_pad: Optional[int] = None, bias: bool = True):
        super().__init__()
        input_channels = _check_channels(input_channels)
        self.sparse_shape, pad4, pad_out, self.out_spatial_shape = _grid_geometry(grid_size, last_pad)
        res = lambda c, key: SparseBasicBlock(c, c, bias=bias, indice_key=key)  # noqa: E731
        self.conv_input = _block(input_channels, 16, 3, indice_key="subm1")
        self.conv1 = snn.SparseSequential(res(16, "res1"), res(16, "res1"))
        self.conv2 = snn.SparseSequential(
            _block(16, 32, 3, 2, 1, conv="spconv", indice_key="spconv2"), res(32, "res2"), res(32, "res2"))
        self.conv3 = snn.SparseSequential(
            _block(32, 64, 3, 2, 1, conv="spconv", indice_key="spconv3"), res(64, "res3"), res(64, "res3"))
        self.conv4 = snn.SparseSequential(
            _block(64, 128, 3, 2, (1, 1, pad4), conv="spconv", indice_key="spconv4"),
            res(128, "res4"), res(128, "res4"))
        self.conv_out = _block(128, 128, (1, 1, 3), (1, 1, 2), (0, 0, pad_out), conv="spconv",
                               indice_key="spconv_down2")
        self.num_point_features = 128
        self.num_bev_features = 128 * self.out_spatial_shape[2]
        self.backbone_channels = {"x_conv1": 16, "x_conv2": 32, "x_conv3": 64, "x_conv4": 128}

    forward = VoxelBackBone8x.forward
    _stride8 = VoxelBackBone8x._stride8


@register_model("voxel_backbone8x_attn")
class VoxelBackBone8xAttn(VoxelBackBone8x):
    """:class:`VoxelBackBone8x` with windowed sparse self-attention after its stride-8 stage.

    conv4's output goes through ``n_blocks`` :class:`sparseconv.nn.SparseTransformerBlock` (64
    channels; window attention among the active voxels of each window, then a ReLU or top-k
    :class:`sparseconv.nn.SparseFFN`; windows shifted by half a window in every second block) before
    ``conv_out``.  The blocks keep the sites, so every output has the coordinates
    :class:`VoxelBackBone8x` gives; ``multi_scale["x_conv4"]`` is the output of the last block.

    Args:
        input_channels, grid_size, last_pad: as :class:`VoxelBackBone8x`.
        n_blocks: transformer blocks (``>= 0``; 0 gives :class:`VoxelBackBone8x`).
        heads: attention heads (divides 64).
        window: window size in stride-8 voxels, int or ``(x, y, z)``.
        hidden: hidden channels of the FFN.
        ffn_activation: ``"relu"`` or ``"topk"``.
        ffn_k: units kept per voxel by the top-k FFN (default ``hidden // 4``); only with ``"topk"``.
        attn_topk: keep the ``attn_topk`` largest attention scores per query (``None``: all).
        max_group: most voxels per attention chunk.

    Shape:
        as :class:`VoxelBackBone8x`.

    Raises:
        ValueError: a bad argument (named in the message).

    Example:
        >>> net = VoxelBackBone8xAttn(4, (352, 400, 20), n_blocks=2, window=(8, 8, 4), ffn_activation="topk")
        >>> out = net(batch["voxels"])["encoded"]
    """

    def __init__(self, input_channels: int = 4, grid_size: Sequence[int] = (1408, 1600, 40),
                 last_pad: Optional[int] = None, n_blocks: int = 2, heads: int = 4,
                 window: Union[int, Sequence[int]] = 8, hidden: int = 128, ffn_activation: str = "relu",
                 ffn_k: Optional[int] = None, attn_topk: Optional[int] = None, max_group: int = 64):
        super().__init__(input_channels, grid_size, last_pad)
        n_blocks, hidden = int_arg(n_blocks, "n_blocks", 0), int_arg(hidden, "hidden")
        if int_arg(heads, "heads") and 64 % heads:
            raise ValueError(f"heads must be a positive divisor of 64 (the channels of conv4), got {heads!r}")
        if ffn_activation not in ("relu", "topk"):
            raise ValueError(f"ffn_activation must be 'relu' or 'topk', got {ffn_activation!r}")
        if ffn_activation == "topk":
            ffn_k = max(1, hidden // 4) if ffn_k is None else ffn_k
            if int_arg(ffn_k, "ffn_k") > hidden:
                raise ValueError(f"ffn_k must be an int in [1, hidden={hidden}], got {ffn_k!r}")
        elif ffn_k is not None:
            raise ValueError(f"ffn_k={ffn_k!r} is only used with ffn_activation='topk'")
        if not isinstance(window, (str, bytes)) and hasattr(window, "__len__") and len(window) == 3:
            window = tuple(int_arg(w, f"window (got {window!r}); each entry") for w in window)
        else:
            window = (int_arg(window, "window (an int or 3 ints (x, y, z))"),) * 3
        if attn_topk is not None:
            attn_topk = int_arg(attn_topk, "attn_topk (or None)")
        max_group = int_arg(max_group, "max_group")
        self.window, self.ffn_activation = tuple(window), ffn_activation
        self.attn_blocks = torch.nn.ModuleList(
            snn.SparseTransformerBlock(64, heads, self.window, hidden, shift=i % 2 == 1,
                                       ffn_activation=ffn_activation, ffn_k=ffn_k, topk=attn_topk,
                                       max_group=max_group)
            for i in range(n_blocks))

    def _stride8(self, x3: SparseTensor) -> SparseTensor:
        x4 = self.conv4(x3)
        for block in self.attn_blocks:
            x4 = block(x4)
        return x4


def height_compression(x: SparseTensor) -> torch.Tensor:
    """Bird's-eye-view map ``[B, C * Z, Y, X]`` of a sparse tensor (OpenPCDet's HeightCompression).

    Channel ``c * Z + z`` holds channel ``c`` at height ``z`` (OpenPCDet's order); empty sites are 0.

    Example:
        >>> bev = height_compression(backbone(voxels)["encoded"])   # [B, 128 * z_out, Y / 8, X / 8]
    """
    dense = x.dense()  # [B, C, X, Y, Z]
    b, c, nx, ny, nz = dense.shape
    return dense.permute(0, 1, 4, 3, 2).reshape(b, c * nz, ny, nx)
