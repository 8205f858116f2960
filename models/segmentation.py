"""Sparse U-Nets for semantic segmentation of voxels and points, their loss, and a volumetric toy task.

* :class:`MinkUNet` (registered ``minkunet``, ``minkunet18``, ``minkunet34``): the SPVNAS /
  MinkowskiEngine MinkUNet layout in sparseconv layers.
* :class:`SparseUNetAttn` (``sparse_unet_attn``): the same U-Net with windowed sparse attention
  (:class:`~sparseconv.nn.SparseTransformerBlock`) in its deepest stages and in the head.
* :func:`segmentation_loss` (weighted cross-entropy, ignore index, optional Lovász-softmax) and
  :func:`lovasz_softmax`.
* :func:`voxel_to_point_labels` (per-voxel predictions to points) and
  :func:`voxel_labels_from_points` (per-point labels to voxels, majority vote).
* :func:`synthetic_volume` and :func:`volume_batch`: sparse occupancy volumes of spheres, tubes
  and noise with per-voxel labels (a non-LiDAR example).

Labels follow the SemanticKITTI convention of :mod:`sparseconv.datasets.semantic_kitti`: training
id 0 is "ignore" (unlabeled after the learning map), ids ``1..19`` are the classes, so a network
for SemanticKITTI has ``num_classes=20`` outputs whose channel ``i`` is training id ``i`` (channel
0 is never a target).

See ``docs/segmentation.md``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from sparseconv import SparseTensor, cat, devoxelize, ops
from sparseconv import nn as snn

from .registry import register_model

__all__ = [
    "MINKUNET_CHANNELS",
    "MINKUNET_BLOCKS",
    "BasicBlock",
    "MinkUNet",
    "SparseUNetAttn",
    "minkunet18",
    "minkunet34",
    "segmentation_loss",
    "lovasz_softmax",
    "voxel_to_point_labels",
    "voxel_labels_from_points",
    "synthetic_volume",
    "volume_batch",
    "VOLUME_CLASSES",
]

#: Channels of MinkUNet (SPVNAS ``cs``): stem, the 4 encoder stages, the 4 decoder stages.
MINKUNET_CHANNELS = (32, 32, 64, 128, 256, 256, 128, 96, 96)

#: Residual blocks per stage ``(encoder, decoder)`` of the named depths.
MINKUNET_BLOCKS: Dict[int, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {
    18: ((2, 2, 2, 2), (2, 2, 2, 2)),
    34: ((2, 3, 4, 6), (2, 2, 2, 2)),
}

#: The grid of every input is padded (never cropped) to a multiple of this: 4 stride-2 stages.
_GRID_MULTIPLE = 16

UP_MODES = ("inverse", "transposed")

LabelsLike = Union[torch.Tensor, SparseTensor]


def _bn(channels: int) -> snn.BatchNorm:
    return snn.BatchNorm(channels)


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


class BasicBlock(snn.SparseModule):
    """Residual block of two submanifold 3^3 convolutions (ResNet ``BasicBlock``, SPVNAS ``ResidualBlock``).

    ``y = ReLU(BN(SubM(ReLU(BN(SubM(x))))) + shortcut(x))``, where the shortcut is the identity when
    ``in_channels == out_channels`` and a 1x1x1 projection (``Linear`` without bias) + BN otherwise.

    Args:
        in_channels: input channels.
        out_channels: output channels.

    Shape:
        SparseTensor ``[N, in_channels]`` -> SparseTensor ``[N, out_channels]`` on the same sites.

    Example:
        >>> block = BasicBlock(32, 64)
        >>> y = block(x)  # x: SparseTensor with 32 channels
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = snn.SubMConv3d(in_channels, out_channels, 3, bias=False)
        self.bn1 = _bn(out_channels)
        self.conv2 = snn.SubMConv3d(out_channels, out_channels, 3, bias=False)
        self.bn2 = _bn(out_channels)
        self.shortcut = None
        if in_channels != out_channels:
            self.shortcut = snn.SparseSequential(snn.Linear(in_channels, out_channels, bias=False), _bn(out_channels))

    def forward(self, x: SparseTensor) -> SparseTensor:
        y = self.bn1(self.conv1(x))
        y = self.bn2(self.conv2(y.replace_feature(torch.relu(y.features))))
        s = x if self.shortcut is None else self.shortcut(x)
        return y.replace_feature(torch.relu(y.features + s.features))


class _Up(snn.SparseModule):
    """Upsampling by 2 back onto the sites of ``skip``, then concatenation ``[up, skip]``.

    ``"inverse"``: :class:`~sparseconv.nn.SparseInverseConv3d` of the encoder's stride-2 conv
    (its output *is* the skip's coordinate set). ``"transposed"``:
    :class:`~sparseconv.nn.SparseConvTranspose3d` (k2, s2), whose output holds all 8 children of
    every coarse voxel, sorted by ``(batch, x, y, z)``; the skip's rows are looked up in it by
    coordinate hash. With equal weights both give the same values on the skip's sites.
    """

    def __init__(self, in_channels: int, out_channels: int, mode: str, indice_key: str):
        super().__init__()
        self.mode = mode
        if mode == "inverse":
            self.conv = snn.SparseInverseConv3d(in_channels, out_channels, 2, indice_key=indice_key, bias=False)
        else:
            self.conv = snn.SparseConvTranspose3d(in_channels, out_channels, 2, stride=2, bias=False)
        self.bn = _bn(out_channels)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"

    def forward(self, x: SparseTensor, skip: SparseTensor) -> SparseTensor:
        y = self.conv(x)
        if self.mode == "transposed":
            keys, values = y.coordinate_set.hash_table()
            rows = ops.hash_query(keys, values, skip.coords, y.coordinate_set.grid)
            if skip.num_voxels and int(rows.min()) < 0:
                raise RuntimeError("a skip site has no parent voxel in the transposed convolution's output; "
                                   "the skip and the coarse tensor do not belong to one U-Net level")
            y = skip.replace_feature(y.features.index_select(0, rows))
        f = torch.relu(self.bn(y.features))
        return cat([y.replace_feature(f), skip])


class _AttnStage(snn.SparseModule):
    """``num_blocks`` sparse transformer blocks (alternating shifted windows) after a channel projection."""

    def __init__(self, in_channels: int, channels: int, num_blocks: int, heads: int, window, ffn_ratio: float,
                 ffn_activation: str, ffn_k: Optional[int], max_group: int):
        super().__init__()
        self.proj = None
        if in_channels != channels:
            self.proj = snn.SparseSequential(snn.Linear(in_channels, channels, bias=False), _bn(channels), snn.ReLU())
        hidden = max(1, int(round(ffn_ratio * channels)))
        self.blocks = snn.SparseSequential(*[
            snn.SparseTransformerBlock(channels, heads, window, hidden, shift=i % 2 == 1,
                                       ffn_activation=ffn_activation, ffn_k=ffn_k, max_group=max_group)
            for i in range(num_blocks)])

    def forward(self, x: SparseTensor) -> SparseTensor:
        if self.proj is not None:
            x = self.proj(x)
        return self.blocks(x)


def _pad_grid(x: SparseTensor, multiple: int) -> SparseTensor:
    """``x`` on a grid rounded up to a multiple of ``multiple`` per axis (same rows, same geometry)."""
    shape = tuple(-(-s // multiple) * multiple for s in x.spatial_shape)
    if shape == tuple(x.spatial_shape):
        return x
    g = x.geometry
    return SparseTensor(x.features, x.coords, shape, x.stride, x.batch_size,
                        voxel_size=None if g is None else g.voxel_size, origin=None if g is None else g.origin)


@register_model("minkunet")
class MinkUNet(snn.SparseModule):
    """MinkUNet (Choy et al. 2019; the SPVNAS layout) for voxel-wise semantic segmentation.

    Layout (channels ``c = width * (32, 32, 64, 128, 256, 256, 128, 96, 96)``, SPVNAS ``cr``):

    * stem: two ``SubMConv3d`` 3^3 (``in -> c0 -> c0``), each + BN + ReLU;
    * encoder stage ``i = 1..4``: ``SparseConv3d`` k2 s2 (``c[i-1] -> c[i-1]``) + BN + ReLU, then
      ``blocks[0][i-1]`` residual :class:`BasicBlock` s (``c[i-1] -> c[i]``, then ``c[i] -> c[i]``);
    * decoder stage ``j = 1..4``: upsampling by 2 (``c[3+j] -> c[4+j]``) + BN + ReLU onto the sites of
      encoder level ``4 - j`` (``up="inverse"``: ``SparseInverseConv3d`` of that level's stride-2
      conv; ``up="transposed"``: ``SparseConvTranspose3d`` k2 s2 restricted to those sites),
      concatenation with that level's features, then ``blocks[1][j-1]`` residual blocks
      (``c[4+j] + c[4-j] -> c[4+j]``, ...);
    * classifier: ``Linear(c8, num_classes)`` on every voxel.

    ``depth=18``: blocks ``(2, 2, 2, 2)`` down and ``(2, 2, 2, 2)`` up; ``depth=34``: ``(2, 3, 4, 6)``
    down, ``(2, 2, 2, 2)`` up; ``blocks=((...), (...))`` sets them freely.

    Any grid works: the input's ``spatial_shape`` is padded up to a multiple of 16 inside the
    network (no voxel is dropped by the stride-2 convs), and the logits come back on the input's
    own sites: ``out.coords`` is ``x.coords`` (same rows, same order, same coordinate set).

    Args:
        in_channels: voxel feature channels (4 for x, y, z, intensity).
        num_classes: output channels (20 for SemanticKITTI: channel ``i`` = training id ``i``, 0 = ignore).
        width: channel multiplier (``cr``), > 0; channels are ``max(1, int(width * c))``.
        up: ``"inverse"`` (default) or ``"transposed"``.
        depth: 18 or 34 (ignored when ``blocks`` is given).
        blocks: ``(encoder_blocks, decoder_blocks)``, 4 positive ints each.

    Shape:
        ``forward``: SparseTensor ``[N, in_channels]`` -> SparseTensor ``[N, num_classes]`` on the
        same sites. ``forward_points``: ``[P, num_classes]``.

    Raises:
        TypeError, ValueError: a bad argument (named in the message).

    Example:
        >>> import sparseconv as sc
        >>> from sparseconv.models import create_model
        >>> net = create_model("minkunet18", in_channels=4, num_classes=20, width=0.5)
        >>> vox = sc.voxelize(points, (0.1, 0.1, 0.1), (-25.6, -25.6, -3, 25.6, 25.6, 3.4))
        >>> logits = net(vox.tensor)                       # SparseTensor [V, 20] on the voxels
        >>> point_logits = net.forward_points(vox.tensor, points)  # [P, 20]
    """

    def __init__(self, in_channels: int = 4, num_classes: int = 20, width: float = 1.0, up: str = "inverse",
                 depth: int = 18, blocks: Optional[Sequence[Sequence[int]]] = None):
        super().__init__()
        self.in_channels = _check_positive_int(in_channels, "in_channels")
        self.num_classes = _check_positive_int(num_classes, "num_classes")
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0 or width == float("inf"):
            raise ValueError(f"width must be a positive finite number, got {width!r}")
        if up not in UP_MODES:
            raise ValueError(f"up must be one of {UP_MODES}, got {up!r}")
        if blocks is None:
            if depth not in MINKUNET_BLOCKS:
                raise ValueError(f"depth must be one of {tuple(MINKUNET_BLOCKS)} (or give blocks=), got {depth!r}")
            blocks = MINKUNET_BLOCKS[depth]
        try:
            enc, dec = (tuple(int(b) for b in part) for part in blocks)
        except (TypeError, ValueError):
            raise ValueError(f"blocks must be (encoder, decoder) with 4 ints each, got {blocks!r}") from None
        if len(enc) != 4 or len(dec) != 4 or min(enc + dec) < 1:
            raise ValueError(f"blocks must be (encoder, decoder) with 4 positive ints each, got {blocks!r}")
        self.width = float(width)
        self.up_mode = up
        self.blocks = (enc, dec)
        c = tuple(max(1, int(self.width * v)) for v in MINKUNET_CHANNELS)
        self.channels = c

        self.stem = snn.SparseSequential(
            snn.SubMConv3d(self.in_channels, c[0], 3, bias=False), _bn(c[0]), snn.ReLU(),
            snn.SubMConv3d(c[0], c[0], 3, bias=False), _bn(c[0]), snn.ReLU())
        self.encoder = torch.nn.ModuleList()
        for i in range(4):
            self.encoder.append(snn.SparseSequential(OrderedDict([
                ("down", snn.SparseSequential(snn.SparseConv3d(c[i], c[i], 2, 2, bias=False, indice_key=f"down{i + 1}"),
                                     _bn(c[i]), snn.ReLU())),
                ("blocks", self._stage(f"down{i + 1}", c[i], c[i + 1], enc[i])),
            ])))
        self.up = torch.nn.ModuleList()
        self.decoder = torch.nn.ModuleList()
        for j in range(4):
            level = 3 - j  # encoder level whose sites this stage returns to (0: the input's sites)
            cin, cout = c[4 + j], c[5 + j]
            self.up.append(_Up(cin, cout, up, indice_key=f"down{level + 1}"))
            self.decoder.append(self._stage(f"up{j + 1}", cout + c[level], cout, dec[j]))
        self.head = self._head(c[8])
        self.classifier = snn.Linear(c[8], self.num_classes)

    # Hooks for variants (SparseUNetAttn).
    def _stage(self, name: str, in_channels: int, out_channels: int, num_blocks: int) -> torch.nn.Module:
        return snn.SparseSequential(*[BasicBlock(in_channels if b == 0 else out_channels, out_channels)
                                      for b in range(num_blocks)])

    def _head(self, channels: int) -> torch.nn.Module:
        return snn.SparseSequential()

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, num_classes={self.num_classes}, width={self.width}, "
                f"up={self.up_mode!r}, blocks={self.blocks}")

    def forward_features(self, x: SparseTensor) -> SparseTensor:
        """Decoder features (after the head, before the classifier): SparseTensor ``[N, c8]`` on the sites of ``x``."""
        if not isinstance(x, SparseTensor):
            raise TypeError(f"{type(self).__name__} expects a SparseTensor, got {type(x).__name__}")
        if x.num_channels != self.in_channels:
            raise ValueError(f"{type(self).__name__} was built for in_channels={self.in_channels}, "
                             f"got a tensor with {x.num_channels} channels")
        if x.num_voxels == 0:
            raise ValueError(f"{type(self).__name__} got an empty SparseTensor (no voxels)")
        y = self.stem(_pad_grid(x, _GRID_MULTIPLE))
        skips = [y]
        for stage in self.encoder:
            y = stage(y)
            skips.append(y)
        skips.pop()
        for up, stage in zip(self.up, self.decoder):
            y = stage(up(y, skips.pop()))
        y = self.head(y)
        return x.replace_feature(y.features)

    def forward(self, x: SparseTensor) -> SparseTensor:
        """Per-voxel logits: SparseTensor ``[N, num_classes]`` on the sites of ``x`` (same coordinate set)."""
        return self.classifier(self.forward_features(x))

    def forward_points(self, x: SparseTensor, points: torch.Tensor, batch: Optional[torch.Tensor] = None,
                       mode: str = "nearest", voxel_size: Optional[Sequence[float]] = None,
                       origin: Optional[Sequence[float]] = None) -> torch.Tensor:
        """Per-point logits ``[P, num_classes]``: the voxel logits brought to ``points`` by
        :func:`sparseconv.devoxelize` (``"nearest"``: the logits of the point's voxel, zeros for a point
        outside every voxel; ``"trilinear"``: interpolated between the 8 surrounding voxel centres).

        Args:
            x: the voxels, with their geometry (from :func:`sparseconv.voxelize` or ``collate``), or
                give ``voxel_size`` and ``origin`` (the lower corner of the point range).
            points: ``[P, >= 3]`` points, x, y, z first.
            batch: int ``[P]`` batch index of each point (``collate``'s ``batch_index``); ``None``: all 0.
            mode: ``"nearest"`` or ``"trilinear"``.

        For ``"nearest"`` at the input's own points this equals ``self(x).features[point_to_voxel]``
        (which is cheaper): ``devoxelize`` finds each point's voxel with :func:`sparseconv.voxelize`'s
        arithmetic, in the points' float type.

        Example:
            >>> batch = collate(samples, voxel_size=(0.1,) * 3, point_range=pr)
            >>> pl = net.forward_points(batch["voxels"], batch["points"], batch["batch_index"])
        """
        logits = self(x)
        if voxel_size is not None or origin is not None:
            if voxel_size is None or origin is None:
                raise ValueError("give voxel_size and origin together")
            logits = SparseTensor(logits.features, logits.coords, logits.spatial_shape, logits.stride,
                                  logits.batch_size, voxel_size=voxel_size, origin=origin)
        return devoxelize(logits, points, mode=mode, batch=batch)


@register_model("minkunet18")
def minkunet18(**kwargs) -> MinkUNet:
    """:class:`MinkUNet` with ``depth=18``: blocks ``(2, 2, 2, 2)`` down and up."""
    if "depth" in kwargs or "blocks" in kwargs:
        raise TypeError("minkunet18 fixes depth/blocks; use create_model('minkunet', depth=..., blocks=...)")
    return MinkUNet(depth=18, **kwargs)


@register_model("minkunet34")
def minkunet34(**kwargs) -> MinkUNet:
    """:class:`MinkUNet` with ``depth=34``: blocks ``(2, 3, 4, 6)`` down, ``(2, 2, 2, 2)`` up."""
    if "depth" in kwargs or "blocks" in kwargs:
        raise TypeError("minkunet34 fixes depth/blocks; use create_model('minkunet', depth=..., blocks=...)")
    return MinkUNet(depth=34, **kwargs)


ATTN_STAGE_NAMES = ("down1", "down2", "down3", "down4", "up1", "up2", "up3", "up4")


@register_model("sparse_unet_attn")
class SparseUNetAttn(MinkUNet):
    """:class:`MinkUNet` whose deepest stages use windowed sparse attention instead of residual convolutions.

    In each stage named in ``attn_stages`` (``"down1"`` .. ``"down4"``, ``"up1"`` .. ``"up4"``; default
    the last encoder stage and the first decoder stage, i.e. stride 16 and stride 8) the residual
    blocks are replaced by as many :class:`~sparseconv.nn.SparseTransformerBlock` s (pre-norm window
    attention + :class:`~sparseconv.nn.SparseFFN`, shifted windows in every second block), after a
    ``Linear + BN + ReLU`` projection when the stage changes the channel count (the decoder's
    concatenation always does). The strided, inverse / transposed convolutions and the skips are
    MinkUNet's. With ``attn_head=True`` one more transformer block (window ``head_window``) and a
    LayerNorm run on the full-resolution decoder features before the classifier.

    Args:
        in_channels, num_classes, width, up, depth, blocks: as :class:`MinkUNet`.
        attn_stages: stage names that use attention.
        heads: attention heads; must divide the channels of every attention stage.
        window: attention window in voxels of that stage's grid (int or ``(x, y, z)``).
        ffn_ratio: FFN hidden channels per channel.
        ffn_activation: ``"relu"`` or ``"topk"`` (:class:`~sparseconv.nn.SparseFFN`).
        ffn_k: kept hidden units per voxel for ``"topk"`` (default a quarter of the hidden units).
        max_group: most voxels per attention chunk.
        attn_head: add the attention block before the classifier.
        head_window: window of the head block (default ``window``).

    Example:
        >>> net = create_model("sparse_unet_attn", in_channels=4, num_classes=20, width=0.5, window=4)
        >>> logits = net(x)  # SparseTensor [N, 20] on the sites of x
    """

    def __init__(self, in_channels: int = 4, num_classes: int = 20, width: float = 1.0, up: str = "inverse",
                 depth: int = 18, blocks: Optional[Sequence[Sequence[int]]] = None,
                 attn_stages: Sequence[str] = ("down4", "up1"), heads: int = 4, window=4, ffn_ratio: float = 2.0,
                 ffn_activation: str = "relu", ffn_k: Optional[int] = None, max_group: int = 64,
                 attn_head: bool = True, head_window=None):
        if isinstance(attn_stages, str):
            attn_stages = (attn_stages,)
        bad = [s for s in attn_stages if s not in ATTN_STAGE_NAMES]
        if bad:
            raise ValueError(f"attn_stages must name stages from {ATTN_STAGE_NAMES}, got {tuple(attn_stages)!r}")
        if ffn_activation not in ("relu", "topk"):
            raise ValueError(f"ffn_activation must be 'relu' or 'topk', got {ffn_activation!r}")
        if not ffn_ratio > 0:
            raise ValueError(f"ffn_ratio must be positive, got {ffn_ratio!r}")
        # Read by the _stage/_head hooks during MinkUNet.__init__; set before torch.nn.Module.__init__
        # has run, hence object.__setattr__ (a plain dict attribute, not a submodule or parameter).
        cfg = dict(stages=tuple(attn_stages), heads=_check_positive_int(heads, "heads"), window=window,
                   ffn_ratio=float(ffn_ratio), ffn_activation=ffn_activation, ffn_k=ffn_k,
                   max_group=_check_positive_int(max_group, "max_group"), attn_head=bool(attn_head),
                   head_window=window if head_window is None else head_window)
        object.__setattr__(self, "_attn_cfg", cfg)
        super().__init__(in_channels, num_classes, width, up, depth, blocks)
        self.attn_stages = self._attn_cfg["stages"]
        self.attn_head = self._attn_cfg["attn_head"]

    def _attention(self, in_channels: int, channels: int, num_blocks: int, window, where: str) -> _AttnStage:
        cfg = self._attn_cfg
        if channels % cfg["heads"]:
            raise ValueError(f"heads={cfg['heads']} must divide the {channels} channels of {where} "
                             f"(width={self.width}); choose heads or width accordingly")
        hidden = max(1, int(round(cfg["ffn_ratio"] * channels)))
        k = cfg["ffn_k"]
        if cfg["ffn_activation"] == "topk" and k is None:
            k = max(1, hidden // 4)
        return _AttnStage(in_channels, channels, num_blocks, cfg["heads"], window, cfg["ffn_ratio"],
                          cfg["ffn_activation"], k, cfg["max_group"])

    def _stage(self, name: str, in_channels: int, out_channels: int, num_blocks: int) -> torch.nn.Module:
        if name in self._attn_cfg["stages"]:
            return self._attention(in_channels, out_channels, num_blocks, self._attn_cfg["window"], f"stage {name}")
        return super()._stage(name, in_channels, out_channels, num_blocks)

    def _head(self, channels: int) -> torch.nn.Module:
        if not self._attn_cfg["attn_head"]:
            return super()._head(channels)
        return snn.SparseSequential(self._attention(channels, channels, 1, self._attn_cfg["head_window"], "the head"),
                                    snn.LayerNorm(channels))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", attn_stages={self.attn_stages}, attn_head={self.attn_head}"


# ----------------------------------------------------------------------------------------------- losses
def _logits_of(x: LabelsLike, name: str) -> torch.Tensor:
    f = x.features if isinstance(x, SparseTensor) else x
    if not isinstance(f, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or SparseTensor, got {type(f).__name__}")
    if f.dim() != 2 or not f.is_floating_point():
        raise ValueError(f"{name} must be floating-point [N, C], got {f.dtype} {tuple(f.shape)}")
    return f


def _labels_for(labels: torch.Tensor, n: int, name: str = "labels") -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must be [N] = [{n}], got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    return labels.long()


def _lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. sorted errors (Berman et al. 2018, Alg. 1)."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def lovasz_softmax(probs: LabelsLike, labels: torch.Tensor, ignore_index: Optional[int] = 0,
                   classes: Union[str, Sequence[int]] = "present", per_class: bool = False) -> torch.Tensor:
    """Lovász-softmax loss (Berman, Triki, Blaschko, CVPR 2018): a convex surrogate of ``1 - IoU``.

    For each class ``c`` the errors ``m_i = |[y_i = c] - p_ic|`` are sorted in decreasing order and
    dotted with the discrete gradient of the Jaccard loss ``J(S) = |S| / |fg_c ∪ S|`` along that
    order: the Lovász extension of ``J``. It equals ``integral_0^1 J({i : m_i > t}) dt``; on hard
    one-hot ``probs`` it is exactly ``1 - IoU_c`` of those predictions.

    Args:
        probs: ``[N, C]`` class probabilities (softmax of the logits), or a SparseTensor of them.
        labels: int ``[N]`` in ``[0, C)``.
        ignore_index: label excluded from the loss (default 0, SemanticKITTI's "unlabeled"); ``None``: none.
        classes: ``"present"`` (classes occurring in the kept labels), ``"all"``, or a list of class ids.
        per_class: return the ``[K]`` losses of the averaged classes instead of their mean (in increasing
            class order for ``"present"`` and ``"all"``, in the given order for a list).

    Returns:
        Scalar mean over the classes (0 with the graph kept when no label is left), or ``[K]``.

    Raises:
        TypeError, ValueError: bad shapes, dtypes, ``classes`` or labels outside ``[0, C)``.

    Example:
        >>> probs = torch.softmax(logits, 1)
        >>> loss = lovasz_softmax(probs, labels)            # ignores label 0
    """
    p = _logits_of(probs, "probs")
    y = _labels_for(labels, p.shape[0])
    n, c = p.shape
    if ignore_index is not None:
        keep = y != int(ignore_index)
        p, y = p[keep], y[keep]
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= c):
        raise ValueError(f"labels must be in [0, {c}) (or the ignore_index {ignore_index}), "
                         f"got values in [{int(y.min())}, {int(y.max())}]")
    if classes == "present":
        ids = torch.unique(y).tolist()
    elif classes == "all":
        ids = list(range(c))
    elif isinstance(classes, str):
        raise ValueError(f"classes must be 'present', 'all' or a list of class ids, got {classes!r}")
    else:
        ids = [int(k) for k in classes]
        if any(k < 0 or k >= c for k in ids):
            raise ValueError(f"classes must be ids in [0, {c}), got {list(classes)}")
    if y.numel() == 0 or not ids:
        zero = p.sum() * 0.0
        return zero.reshape(0) if per_class else zero
    losses = []
    for k in ids:
        fg = (y == k).to(p.dtype)
        errors = (fg - p[:, k]).abs()
        errors_sorted, perm = torch.sort(errors, descending=True)
        losses.append(torch.dot(errors_sorted, _lovasz_grad(fg[perm])))
    out = torch.stack(losses)
    return out if per_class else out.mean()


def segmentation_loss(logits: LabelsLike, labels: torch.Tensor, class_weights: Optional[torch.Tensor] = None,
                      ignore_index: Optional[int] = 0, lovasz: float = 0.0,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """Weighted cross-entropy over the labelled voxels (or points), plus ``lovasz`` x Lovász-softmax.

    ``loss = CE(logits, labels; class_weights, ignore_index) + lovasz * lovasz_softmax(softmax(logits), labels)``.
    The cross-entropy is ``torch.nn.functional.cross_entropy``'s weighted mean (divided by the sum of
    the weights of the kept labels).

    Args:
        logits: ``[N, C]`` or a SparseTensor of them (a network's output).
        labels: int ``[N]``: training ids in ``[0, C)``; ``ignore_index`` entries are left out.
        class_weights: ``[C]`` per-class weights (e.g. inverse square root of the class frequencies).
        ignore_index: label left out (0 = SemanticKITTI's ignore); ``None`` keeps every label.
        lovasz: weight of the Lovász-softmax term (0: none; SPVNAS / Cylinder3D use 1).
        label_smoothing: as ``torch.nn.functional.cross_entropy``.

    Returns:
        Scalar loss; 0 (connected to ``logits``) when every label is ignored.

    Example:
        >>> out = net(batch["voxels"])
        >>> loss = segmentation_loss(out, voxel_labels, lovasz=1.0)
        >>> loss.backward()
    """
    f = _logits_of(logits, "logits")
    y = _labels_for(labels, f.shape[0])
    c = f.shape[1]
    if class_weights is not None:
        if not isinstance(class_weights, torch.Tensor) or class_weights.shape != (c,):
            got = getattr(class_weights, "shape", class_weights)
            raise ValueError(f"class_weights must be a [{c}] tensor, got {got}")
        class_weights = class_weights.to(device=f.device, dtype=f.dtype)
    if lovasz < 0:
        raise ValueError(f"lovasz must be >= 0, got {lovasz}")
    ign = -100 if ignore_index is None else int(ignore_index)
    keep = y != ign
    if not bool(keep.any()):
        return f.sum() * 0.0
    yk = y[keep]
    if int(yk.min()) < 0 or int(yk.max()) >= c:
        raise ValueError(f"labels must be in [0, {c}) (or the ignore_index {ignore_index}), "
                         f"got values in [{int(yk.min())}, {int(yk.max())}]")
    loss = F.cross_entropy(f, y, weight=class_weights, ignore_index=ign, label_smoothing=label_smoothing)
    if lovasz:
        loss = loss + lovasz * lovasz_softmax(torch.softmax(f, 1), y, ignore_index=ignore_index)
    return loss


# ------------------------------------------------------------------------------------ label projection
def _point_to_voxel(point_to_voxel: torch.Tensor, num_voxels: int) -> torch.Tensor:
    if not isinstance(point_to_voxel, torch.Tensor) or point_to_voxel.dim() != 1:
        got = getattr(point_to_voxel, "shape", point_to_voxel)
        raise ValueError(f"point_to_voxel must be an int [N] tensor, got {got}")
    if point_to_voxel.is_floating_point() or point_to_voxel.dtype == torch.bool:
        raise TypeError(f"point_to_voxel must be an integer tensor, got {point_to_voxel.dtype}")
    p2v = point_to_voxel.long()
    if p2v.numel() and (int(p2v.min()) < -1 or int(p2v.max()) >= num_voxels):
        raise ValueError(f"point_to_voxel must be in [-1, {num_voxels}) for {num_voxels} voxels, "
                         f"got values in [{int(p2v.min())}, {int(p2v.max())}]")
    return p2v


def voxel_to_point_labels(voxel_pred: LabelsLike, point_to_voxel: torch.Tensor, ignore_index: int = 0) -> torch.Tensor:
    """Per-point predictions from per-voxel ones: each point takes its voxel's class.

    Args:
        voxel_pred: ``[V, C]`` logits or probabilities (or a SparseTensor of them; the arg-max class
            is taken), or int ``[V]`` class ids.
        point_to_voxel: int ``[N]``: each point's voxel row, ``-1`` for a point that was dropped
            (from :func:`sparseconv.voxelize` / ``collate``).
        ignore_index: the label given to dropped points.

    Returns:
        int64 ``[N]``.

    Example:
        >>> batch = collate(samples, voxel_size=vs, point_range=pr)
        >>> pred = voxel_to_point_labels(net(batch["voxels"]), batch["point_to_voxel"])
        >>> conf = confusion_matrix(pred, batch["labels"], 20, ignore_index=0)
    """
    if isinstance(voxel_pred, SparseTensor):
        voxel_pred = voxel_pred.features
    if not isinstance(voxel_pred, torch.Tensor):
        raise TypeError(f"voxel_pred must be a torch.Tensor or SparseTensor, got {type(voxel_pred).__name__}")
    if voxel_pred.dim() == 2 and voxel_pred.is_floating_point():
        cls = voxel_pred.argmax(1)
    elif voxel_pred.dim() == 1 and not voxel_pred.is_floating_point():
        cls = voxel_pred.long()
    else:
        raise ValueError(f"voxel_pred must be float [V, C] scores or int [V] class ids, got "
                         f"{voxel_pred.dtype} {tuple(voxel_pred.shape)}")
    p2v = _point_to_voxel(point_to_voxel, cls.shape[0]).to(cls.device)
    out = cls[p2v.clamp_min(0)] if cls.numel() else torch.zeros_like(p2v)
    return torch.where(p2v >= 0, out, torch.full_like(out, int(ignore_index)))


def voxel_labels_from_points(labels: torch.Tensor, point_to_voxel: torch.Tensor, num_voxels: int,
                             ignore_index: Optional[int] = 0) -> torch.Tensor:
    """Per-voxel training labels: the most frequent label of the points in each voxel.

    Points labelled ``ignore_index`` do not vote; ties go to the smallest label; a voxel with no voting
    point gets ``ignore_index`` (``-1`` if it is ``None``). Dropped points (``point_to_voxel == -1``)
    are skipped.

    Args:
        labels: int ``[N]`` non-negative point labels.
        point_to_voxel: int ``[N]`` voxel row of each point, ``-1`` for dropped points.
        num_voxels: ``V``.
        ignore_index: the label that does not vote (0 = SemanticKITTI's ignore).

    Returns:
        int64 ``[V]``.

    Example:
        >>> batch = collate(samples, voxel_size=vs, point_range=pr)
        >>> y = voxel_labels_from_points(batch["labels"], batch["point_to_voxel"], batch["voxels"].num_voxels)
    """
    if isinstance(num_voxels, bool) or not isinstance(num_voxels, (int, np.integer)) or num_voxels < 0:
        raise ValueError(f"num_voxels must be a non-negative int, got {num_voxels!r}")
    p2v = _point_to_voxel(point_to_voxel, int(num_voxels))
    y = _labels_for(labels, p2v.shape[0]).to(p2v.device)
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"labels must be non-negative, got a minimum of {int(y.min())}")
    fill = -1 if ignore_index is None else int(ignore_index)
    vote = p2v >= 0
    if ignore_index is not None:
        vote &= y != int(ignore_index)
    v, lab = p2v[vote], y[vote]
    out = torch.full((int(num_voxels),), fill, dtype=torch.long, device=y.device)
    if lab.numel() == 0:
        return out
    k = int(lab.max()) + 1
    counts = torch.bincount(v * k + lab, minlength=int(num_voxels) * k).view(int(num_voxels), k)
    best = counts.argmax(1)  # first maximum: the smallest label among ties
    return torch.where(counts.sum(1) > 0, best, out)


# ------------------------------------------------------------------------------- volumetric example
#: Labels of :func:`synthetic_volume` (0 = empty space, never a site).
VOLUME_CLASSES = ("empty", "sphere", "tube", "noise")


def synthetic_volume(seed: int, size: int = 64, spheres: Tuple[int, int] = (2, 4), tubes: Tuple[int, int] = (2, 4),
                     noise: float = 0.02) -> Dict[str, object]:
    """A sparse occupancy volume of hollow spheres, thin tubes and scattered noise, labelled per voxel.

    A non-LiDAR segmentation example (think cells and vessels in a microscopy stack): spheres are
    shells of thickness ~1.5 voxels (radius ``size / 16 .. size / 6``), tubes are solid cylinders of
    radius 1-1.8 voxels along random segments, and noise voxels are drawn uniformly in the volume
    (``noise`` times the shape voxels). Occupancy alone tells them apart only through local shape:
    surfaces (2-D), curves (1-D) and isolated points. Where shapes overlap, the later one (tubes
    after spheres, noise last) labels the voxel.

    Args:
        seed: NumPy seed; same seed, same volume.
        size: the cubic grid ``size^3`` (>= 16).
        spheres, tubes: ``(low, high)`` inclusive ranges of how many of each to draw.
        noise: noise voxels per shape voxel.

    Returns:
        dict: ``coords`` int32 ``[N, 3]`` ``(x, y, z)`` sorted, ``labels`` int64 ``[N]`` in
        ``{1 sphere, 2 tube, 3 noise}`` (:data:`VOLUME_CLASSES`), ``spatial_shape`` ``(size,) * 3``.

    Example:
        >>> vol = synthetic_volume(0, size=48)
        >>> x, y = volume_batch([vol, synthetic_volume(1, size=48)])
        >>> x.num_channels, y.unique().tolist()
        (1, [1, 2, 3])
    """
    size = _check_positive_int(size, "size")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    rng = np.random.default_rng(int(seed))
    grid = np.zeros((size,) * 3, np.int64)
    axes = np.arange(size, dtype=np.float64) + 0.5
    gx, gy, gz = np.meshgrid(axes, axes, axes, indexing="ij")
    pts = np.stack([gx, gy, gz], -1)
    for _ in range(rng.integers(spheres[0], spheres[1] + 1)):
        r = rng.uniform(size / 16, size / 6)
        centre = rng.uniform(r + 1, size - r - 1, 3)
        d = np.linalg.norm(pts - centre, axis=-1)
        grid[np.abs(d - r) <= 0.75] = 1
    for _ in range(rng.integers(tubes[0], tubes[1] + 1)):
        a = rng.uniform(2, size - 2, 3)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        length = rng.uniform(size / 3, size)
        b = np.clip(a + direction * length, 2, size - 2)
        ab = b - a
        t = np.clip(((pts - a) @ ab) / max(ab @ ab, 1e-9), 0, 1)
        d = np.linalg.norm(pts - (a + t[..., None] * ab), axis=-1)
        grid[d <= rng.uniform(1.0, 1.8)] = 2
    n_noise = int(round(noise * np.count_nonzero(grid)))
    if n_noise:
        flat = rng.integers(0, size ** 3, n_noise)
        grid.reshape(-1)[flat] = 3
    coords = np.argwhere(grid > 0)
    labels = grid[coords[:, 0], coords[:, 1], coords[:, 2]]
    return {"coords": torch.from_numpy(coords.astype(np.int32)), "labels": torch.from_numpy(labels.astype(np.int64)),
            "spatial_shape": (size, size, size)}


def volume_batch(volumes: Sequence[Dict[str, object]]) -> Tuple[SparseTensor, torch.Tensor]:
    """Batches :func:`synthetic_volume` dicts into one SparseTensor (1 channel: occupancy = 1) and labels.

    Returns:
        ``(x, labels)``: SparseTensor ``[N, 1]`` with ``batch_size = len(volumes)`` on the largest
        grid, rows in the order of the volumes; int64 ``[N]``.
    """
    volumes = list(volumes)
    if not volumes:
        raise ValueError("volume_batch needs at least one volume")
    coords = torch.cat([torch.cat([torch.full((len(v["coords"]), 1), b, dtype=torch.int32), v["coords"]], 1)
                        for b, v in enumerate(volumes)])
    labels = torch.cat([v["labels"] for v in volumes])
    shape = tuple(max(v["spatial_shape"][a] for v in volumes) for a in range(3))
    x = SparseTensor(torch.ones(coords.shape[0], 1), coords, shape, batch_size=len(volumes))
    return x, labels
