"""Voxel 3D object detectors (OpenPCDet pipelines): :class:`SECOND`, :class:`CenterPoint`,
:class:`CenterPointAttn` (registered as ``second``, ``centerpoint``, ``centerpoint_attn``).

Pipeline: ``MeanVFE`` (the voxel means of ``collate``) -> sparse 3D backbone (stride 8 in x, y) ->
:func:`height_compression` (BEV map ``[B, C * Z', Y / 8, X / 8]``) -> ``BaseBEVBackbone`` -> dense head.

Input: the batch dict of ``sparseconv.datasets.collate(samples, voxel_size, point_range)``. Output:
in training mode ``{"loss": scalar, "terms": {name: detached 0-dim tensor}}`` (``gt_boxes`` required); in
eval mode one dict per sample with ``boxes`` float32 ``[K, 7]`` (LiDAR frame, centre, sizes, yaw),
``scores`` float32 ``[K]`` in ``[0, 1]`` and ``labels`` int64 ``[K]`` (1-based into ``class_names``),
sorted by descending score.

Example:
    >>> from functools import partial
    >>> import sparseconv.models as M
    >>> from sparseconv.datasets import collate
    >>> pr, vs = (0, -25.6, -3, 51.2, 25.6, 1), (0.2, 0.2, 0.1)
    >>> net = M.create_model("second", class_names=("Car",), point_range=pr, voxel_size=vs, in_channels=4)
    >>> batch = collate(samples, vs, pr)
    >>> net.train(); net(batch)["loss"].backward()
    >>> net.eval(); dets = net(batch)            # list of {"boxes", "scores", "labels"}
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from sparseconv import SparseTensor

from .anchor_head import AnchorHeadSingle, _check_class_names, _check_geometry, _pos_int
from .backbones2d import BaseBEVBackbone
from .backbones3d import VoxelBackBone8x, VoxelBackBone8xAttn, VoxelResBackBone8x, height_compression
from .center_head import CenterHead, CenterHeadAttn
from .registry import register_model
from .vfe import MeanVFE

__all__ = ["SECOND", "CenterPoint", "CenterPointAttn", "grid_size"]

Output = Union[Dict[str, Any], List[Dict[str, torch.Tensor]]]


def grid_size(point_range: Sequence[float], voxel_size: Sequence[float]) -> Tuple[int, int, int]:
    """The voxel grid ``round((max - min) / voxel_size)`` per axis (the detection contract).

    Example:
        >>> grid_size((0, -40, -3, 70.4, 40, 1), (0.05, 0.05, 0.1))
        (1408, 1600, 40)
    """
    pr, vs = _check_geometry(point_range, voxel_size)
    grid = tuple(int(round((pr[i + 3] - pr[i]) / vs[i])) for i in range(3))
    if min(grid) < 1:
        raise ValueError(f"point_range {point_range!r} and voxel_size {voxel_size!r} give an empty grid {grid}")
    return grid


class _VoxelDetector(torch.nn.Module):
    """Shared pipeline; subclasses build the 3D backbone and the head."""

    def __init__(self, class_names, point_range, voxel_size, in_channels, backbone_cls, backbone_kwargs,
                 bev_layer_nums, bev_layer_strides, bev_num_filters, bev_upsample_strides,
                 bev_num_upsample_filters):
        super().__init__()
        self.class_names = _check_class_names(class_names)
        self.point_range, self.voxel_size = _check_geometry(point_range, voxel_size)
        self.in_channels = _pos_int(in_channels, "in_channels (x, y, z, ...)", 3)
        self.grid_size = grid_size(self.point_range, self.voxel_size)
        self.vfe = MeanVFE(self.in_channels)
        self.backbone_3d = backbone_cls(self.in_channels, self.grid_size, **dict(backbone_kwargs or {}))
        out_shape = tuple(self.backbone_3d.out_spatial_shape)
        self.feature_map_stride = 8
        self.bev_size = (int(out_shape[0]), int(out_shape[1]))  # (X, Y) of the height-compressed map
        self.backbone_2d = BaseBEVBackbone(self.backbone_3d.num_bev_features, bev_layer_nums, bev_layer_strides,
                                           bev_num_filters, bev_upsample_strides, bev_num_upsample_filters)
        # with the usual neck (first level stride 1, first up-sample 1) the head sees the BEV map's size
        s = float(self.backbone_2d.upsample_strides[0]) / float(self.backbone_2d.layer_strides[0])
        if len(self.backbone_2d.upsample_strides) > len(self.backbone_2d.layer_strides):
            s *= float(self.backbone_2d.upsample_strides[-1])
        if s != 1.0:
            raise ValueError(f"the BEV neck must keep the map size (layer_strides[0] / upsample_strides[0] = 1, "
                             f"no extra deblock stride), got layer_strides {tuple(bev_layer_strides)} and "
                             f"upsample_strides {tuple(bev_upsample_strides)}")
        self.feature_map_size = self.bev_size

    def bev_features(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The BEV feature map ``[B, C, Y, X]`` the head sees, from a ``collate`` batch."""
        if not isinstance(batch, Mapping) or "voxels" not in batch:
            raise ValueError(f"{type(self).__name__} expects a collate batch dict with 'voxels', got "
                             f"{sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__}")
        x = batch["voxels"]
        if not isinstance(x, SparseTensor):
            raise TypeError(f"batch['voxels'] must be a SparseTensor, got {type(x).__name__}")
        b = int(batch.get("batch_size", x.batch_size))
        if x.batch_size != b:
            raise ValueError(f"batch['voxels'] has batch_size {x.batch_size} but batch['batch_size'] is {b}")
        if tuple(x.spatial_shape) not in (self.grid_size, self.backbone_3d.sparse_shape):
            raise ValueError(f"batch['voxels'] is on grid {tuple(x.spatial_shape)} but {type(self).__name__} was built "
                             f"for point_range {self.point_range} / voxel_size {self.voxel_size}, grid "
                             f"{self.grid_size}; collate with the same voxel_size and point_range")
        x = self.vfe(x)
        encoded = self.backbone_3d(x)["encoded"]
        bev = height_compression(encoded)
        exp = (self.backbone_3d.num_bev_features, self.bev_size[1], self.bev_size[0])
        if tuple(bev.shape[1:]) != exp:
            raise ValueError(f"the 3D backbone gave a BEV map [B, C, Y, X] = {tuple(bev.shape)}, expected "
                             f"[{b}, {exp[0]}, {exp[1]}, {exp[2]}] for grid {self.grid_size} at stride 8")
        feats = self.backbone_2d(bev)
        if (feats.shape[3], feats.shape[2]) != self.feature_map_size:
            raise ValueError(f"the BEV neck gave a map of X x Y = {feats.shape[3]} x {feats.shape[2]} cells, expected "
                             f"{self.feature_map_size[0]} x {self.feature_map_size[1]} (grid {self.grid_size} / 8)")
        return feats

    def forward(self, batch: Mapping[str, Any]) -> Output:
        """Training: ``{"loss", "terms"}``; eval: a list of ``{"boxes", "scores", "labels"}`` per sample."""
        feats = self.bev_features(batch)
        preds = self.dense_head(feats)
        if self.training:
            if "gt_boxes" not in batch:
                raise ValueError("training needs batch['gt_boxes'] [B, M, 8] (collate of samples with gt_boxes)")
            gt = batch["gt_boxes"]
            if not isinstance(gt, torch.Tensor) or gt.dim() != 3 or gt.shape[2] != 8 or gt.shape[0] != feats.shape[0]:
                raise ValueError(f"batch['gt_boxes'] must be [B = {feats.shape[0]}, M, 8], got "
                                 f"{tuple(gt.shape) if isinstance(gt, torch.Tensor) else type(gt).__name__}")
            loss, terms = self.dense_head.loss(preds, gt.to(feats.device, torch.float32))
            return {"loss": loss, "terms": terms}
        return self.dense_head.predict(preds)


_BEV_DEFAULTS = dict(bev_layer_nums=(2, 2), bev_layer_strides=(1, 2), bev_num_filters=(64, 128),
                     bev_upsample_strides=(1, 2), bev_num_upsample_filters=(128, 128))


@register_model("second")
class SECOND(_VoxelDetector):
    """SECOND (OpenPCDet ``second.yaml``): MeanVFE -> :class:`VoxelBackBone8x` -> height compression ->
    ``BaseBEVBackbone`` -> :class:`AnchorHeadSingle`.

    Args:
        class_names: detected classes (labels 1-based into it).
        point_range: ``(x0, y0, z0, x1, y1, z1)``; voxel_size: ``(vx, vy, vz)``; the grid is
            ``round((max - min) / voxel_size)``.
        in_channels: point feature width (4: x, y, z, intensity).
        backbone_kwargs: extra :class:`VoxelBackBone8x` arguments (``last_pad``).
        bev_layer_nums, bev_layer_strides, bev_num_filters, bev_upsample_strides, bev_num_upsample_filters:
            the ``BaseBEVBackbone`` (defaults smaller than OpenPCDet's ``(5, 5), (1, 2), (128, 256), (1, 2),
            (256, 256)``, for CPU training).
        anchor_config: per-class anchor overrides (:data:`~.anchor_head.DEFAULT_ANCHOR_CONFIG`).
        score_threshold, nms_threshold, nms_pre_max, max_detections, multi_class_nms: post-processing.
        head_kwargs: any other :class:`AnchorHeadSingle` argument (loss weights, direction bins, ...).

    Example:
        >>> net = SECOND(class_names=("Car",), point_range=(0, -25.6, -3, 51.2, 25.6, 1),
        ...              voxel_size=(0.2, 0.2, 0.1), in_channels=4)
    """

    def __init__(self, class_names: Sequence[str] = ("Car", "Pedestrian", "Cyclist"),
                 point_range: Sequence[float] = (0.0, -40.0, -3.0, 70.4, 40.0, 1.0),
                 voxel_size: Sequence[float] = (0.05, 0.05, 0.1), in_channels: int = 4,
                 backbone_kwargs: Optional[Mapping[str, Any]] = None,
                 bev_layer_nums: Sequence[int] = _BEV_DEFAULTS["bev_layer_nums"],
                 bev_layer_strides: Sequence[int] = _BEV_DEFAULTS["bev_layer_strides"],
                 bev_num_filters: Sequence[int] = _BEV_DEFAULTS["bev_num_filters"],
                 bev_upsample_strides: Sequence[float] = _BEV_DEFAULTS["bev_upsample_strides"],
                 bev_num_upsample_filters: Sequence[int] = _BEV_DEFAULTS["bev_num_upsample_filters"],
                 anchor_config: Optional[Mapping[str, Mapping[str, Any]]] = None, score_threshold: float = 0.1,
                 nms_threshold: float = 0.01, nms_pre_max: Optional[int] = 4096, max_detections: Optional[int] = 500,
                 multi_class_nms: bool = False, head_kwargs: Optional[Mapping[str, Any]] = None):
        super().__init__(class_names, point_range, voxel_size, in_channels, VoxelBackBone8x, backbone_kwargs,
                         bev_layer_nums, bev_layer_strides, bev_num_filters, bev_upsample_strides,
                         bev_num_upsample_filters)
        self.dense_head = AnchorHeadSingle(
            self.backbone_2d.num_bev_features, self.class_names, self.point_range, self.voxel_size,
            self.feature_map_size, anchor_config=anchor_config, score_threshold=score_threshold,
            nms_threshold=nms_threshold, nms_pre_max=nms_pre_max, nms_post_max=max_detections,
            multi_class_nms=multi_class_nms, **dict(head_kwargs or {}))


def _center_head_args(score_threshold, nms_type, nms_threshold, nms_pre_max, max_detections, circle_radius,
                      head_kwargs) -> Dict[str, Any]:
    args = dict(score_threshold=score_threshold, nms_type=nms_type, nms_threshold=nms_threshold,
                nms_pre_max=nms_pre_max, nms_post_max=max_detections, max_detections=max_detections,
                circle_radius=circle_radius)
    args.update(dict(head_kwargs or {}))
    return args


@register_model("centerpoint")
class CenterPoint(_VoxelDetector):
    """CenterPoint (OpenPCDet ``centerpoint.yaml``): MeanVFE -> :class:`VoxelResBackBone8x` -> height
    compression -> ``BaseBEVBackbone`` -> :class:`CenterHead`.

    Args:
        class_names, point_range, voxel_size, in_channels, backbone_kwargs, bev_*: as :class:`SECOND`
            (``backbone_kwargs`` for :class:`VoxelResBackBone8x`).
        score_threshold, nms_type (``"rotated"``, ``"circle"``, ``"none"``), nms_threshold, nms_pre_max,
        max_detections, circle_radius: post-processing.
        head_kwargs: any other :class:`CenterHead` argument (``shared_channels``, ``top_k``, loss weights, ...).

    Example:
        >>> net = CenterPoint(class_names=("Car", "Pedestrian"), point_range=(0, -25.6, -3, 51.2, 25.6, 1),
        ...                   voxel_size=(0.2, 0.2, 0.1), in_channels=4)
    """

    head_cls = CenterHead
    backbone_cls = VoxelResBackBone8x

    def __init__(self, class_names: Sequence[str] = ("Car", "Pedestrian", "Cyclist"),
                 point_range: Sequence[float] = (0.0, -40.0, -3.0, 70.4, 40.0, 1.0),
                 voxel_size: Sequence[float] = (0.05, 0.05, 0.1), in_channels: int = 4,
                 backbone_kwargs: Optional[Mapping[str, Any]] = None,
                 bev_layer_nums: Sequence[int] = _BEV_DEFAULTS["bev_layer_nums"],
                 bev_layer_strides: Sequence[int] = _BEV_DEFAULTS["bev_layer_strides"],
                 bev_num_filters: Sequence[int] = _BEV_DEFAULTS["bev_num_filters"],
                 bev_upsample_strides: Sequence[float] = _BEV_DEFAULTS["bev_upsample_strides"],
                 bev_num_upsample_filters: Sequence[int] = _BEV_DEFAULTS["bev_num_upsample_filters"],
                 score_threshold: float = 0.1, nms_type: str = "rotated", nms_threshold: float = 0.01,
                 nms_pre_max: Optional[int] = 4096, max_detections: Optional[int] = 500,
                 circle_radius: Union[float, Mapping[int, float], None] = None,
                 head_kwargs: Optional[Mapping[str, Any]] = None):
        super().__init__(class_names, point_range, voxel_size, in_channels, self.backbone_cls, backbone_kwargs,
                         bev_layer_nums, bev_layer_strides, bev_num_filters, bev_upsample_strides,
                         bev_num_upsample_filters)
        self.dense_head = self.head_cls(
            self.backbone_2d.num_bev_features, self.class_names, self.point_range, self.voxel_size,
            self.feature_map_size, feature_map_stride=self.feature_map_stride,
            **_center_head_args(score_threshold, nms_type, nms_threshold, nms_pre_max, max_detections,
                                circle_radius, head_kwargs))


@register_model("centerpoint_attn")
class CenterPointAttn(CenterPoint):
    """CenterPoint with attention: MeanVFE -> :class:`VoxelBackBone8xAttn` (window attention after the
    stride-8 stage) -> height compression -> ``BaseBEVBackbone`` -> :class:`CenterHeadAttn` (top-K
    candidates refined by attention).

    Args:
        as :class:`CenterPoint`; ``backbone_kwargs`` go to :class:`VoxelBackBone8xAttn` (``n_blocks``,
        ``heads``, ``window``, ...), ``head_kwargs`` to :class:`CenterHeadAttn` (``refine_k``,
        ``refine_layers``, ``assign_radius``, ...).

    Example:
        >>> net = CenterPointAttn(class_names=("Car",), point_range=(0, -25.6, -3, 51.2, 25.6, 1),
        ...                       voxel_size=(0.2, 0.2, 0.1), in_channels=4, head_kwargs={"refine_k": 64})
    """

    head_cls = CenterHeadAttn
    backbone_cls = VoxelBackBone8xAttn
