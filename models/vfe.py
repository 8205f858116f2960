"""Voxel feature encoders (OpenPCDet's VFEs): :class:`MeanVFE` and :class:`PointNetVFE`.

Both read the padded layout of :func:`sparseconv.voxelize_padded` (spconv ``PointToVoxel``):
``voxels`` ``[V, P, C]`` (the first ``num_points[v]`` rows of voxel ``v`` are its points, the
rest padding), ``num_points`` ``[V]`` and ``coords`` int ``[V, 4]`` ``(batch, x, y, z)``.  Padding
rows are never read, whatever they hold.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from sparseconv import SparseTensor
from sparseconv.voxelize import PaddedVoxels

from ._utils import int_arg
from .registry import register_model

__all__ = ["MeanVFE", "PointNetVFE"]

Padded = Union[PaddedVoxels, torch.Tensor]


def _floats(value, n: int, name: str, positive: bool = False) -> Tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {n} numbers, got {value!r}") from None
    if len(out) != n or (positive and min(out) <= 0):
        raise ValueError(f"{name} must be {n} {'positive ' if positive else ''}numbers, got {value!r}")
    return out


def _unpack(voxels: Padded, num_points: Optional[torch.Tensor], coords: Optional[torch.Tensor], who: str,
            channels: int, need_coords: bool):
    """``(voxels [V, P, C], counts int64 [V], coords or None, valid bool [V, P])`` of either input form."""
    if isinstance(voxels, PaddedVoxels):
        if num_points is not None or coords is not None:
            raise ValueError(f"{who}: num_points and coords come from the PaddedVoxels; do not pass them too")
        voxels, num_points, coords = voxels.voxels, voxels.num_points, voxels.coords
    if not isinstance(voxels, torch.Tensor) or voxels.dim() != 3 or not voxels.is_floating_point():
        raise ValueError(f"{who}: voxels must be a float [V, P, C] tensor or PaddedVoxels, got "
                         f"{getattr(voxels, 'shape', type(voxels).__name__)}")
    v, p, c = voxels.shape
    if c != channels:
        raise ValueError(f"{who} expects {channels} point channels, got voxels with C = {c}")
    if not isinstance(num_points, torch.Tensor) or num_points.shape != (v,) or num_points.is_floating_point():
        raise ValueError(f"{who}: num_points must be an integer [V] = [{v}] tensor, got "
                         f"{getattr(num_points, 'shape', None) if num_points is not None else None}")
    counts = num_points.to(device=voxels.device, dtype=torch.long)
    if v and (int(counts.min()) < 0 or int(counts.max()) > p):
        raise ValueError(f"{who}: num_points must be in [0, P = {p}], got values in "
                         f"[{int(counts.min())}, {int(counts.max())}]")
    if need_coords:
        if not isinstance(coords, torch.Tensor) or coords.shape != (v, 4) or coords.is_floating_point():
            raise ValueError(f"{who}: coords must be an integer [V, 4] = [{v}, 4] tensor (batch, x, y, z), got "
                             f"{getattr(coords, 'shape', None) if coords is not None else None}")
        coords = coords.to(voxels.device)
    valid = torch.arange(p, device=voxels.device)[None, :] < counts[:, None]
    return voxels, counts, coords, valid


@register_model("mean_vfe")
class MeanVFE(torch.nn.Module):
    """Per-voxel mean of the point features (OpenPCDet ``MeanVFE``); no parameters.

    * A :class:`~sparseconv.SparseTensor` (``collate`` / :func:`sparseconv.voxelize` with
      ``reduce="mean"`` already averaged the points) is returned unchanged.
    * The padded layout gives the mean of each voxel's first ``num_points`` rows, ``[V, C]``
      (0 for a voxel with no points).  Padding rows are ignored, whatever their values.

    Args:
        num_point_features: point feature width ``C`` (4: x, y, z, intensity).

    Shape:
        ``forward(x: SparseTensor [V, C])`` -> the same SparseTensor;
        ``forward(voxels [V, P, C], num_points [V])`` or ``forward(PaddedVoxels)`` -> ``[V, C]``.

    Example:
        >>> pv = sparseconv.voxelize_padded(points, (0.2, 0.2, 0.2), (0, -40, -3, 70.4, 40, 1), 5)
        >>> feats = MeanVFE(4)(pv)                                   # [V, 4]
        >>> x = sparseconv.SparseTensor(feats, pv.coords, pv.spatial_shape)
    """

    def __init__(self, num_point_features: int = 4):
        super().__init__()
        self.num_point_features = int_arg(num_point_features, "num_point_features")

    def get_output_feature_dim(self) -> int:
        return self.num_point_features

    def extra_repr(self) -> str:
        return f"num_point_features={self.num_point_features}"

    def forward(self, voxels: Union[SparseTensor, Padded], num_points: Optional[torch.Tensor] = None):
        if isinstance(voxels, SparseTensor):
            if num_points is not None:
                raise ValueError("MeanVFE: a SparseTensor is already one row per voxel; num_points must be None")
            if voxels.num_channels != self.num_point_features:
                raise ValueError(f"MeanVFE expects {self.num_point_features} channels, got {voxels.num_channels}")
            return voxels
        voxels, counts, _, valid = _unpack(voxels, num_points, None, "MeanVFE", self.num_point_features, False)
        total = torch.where(valid[:, :, None], voxels, voxels.new_zeros(())).sum(1)
        return total / counts.clamp(min=1).to(voxels.dtype)[:, None]


@register_model("pointnet_vfe")
class PointNetVFE(torch.nn.Module):
    """PointPillars-style voxel encoder (OpenPCDet ``PillarVFE`` on voxels): a shared PointNet over the
    points of each voxel, max-pooled.

    Each point's features are augmented to ``[p (C), p_xyz - voxel point mean (3), p_xyz - voxel centre (3)]``
    (without ``use_absolute_xyz`` the raw ``x, y, z`` are dropped; ``with_distance`` appends ``|p_xyz|``),
    then each layer is ``Linear -> BatchNorm1d(eps=1e-3, momentum=0.01) -> ReLU`` (``Linear`` with bias and
    no norm if not ``use_norm``).  A layer other than the last has ``num_filters[i] // 2`` units and appends
    its voxel-wise max to each point (so ``num_filters[i]`` features per point, OpenPCDet's PFNLayer); the
    last layer's voxel-wise max is the output.

    Unlike OpenPCDet (which zeroes padding rows but then lets them into BatchNorm and the max), padding
    rows take no part at all: the point mean, the batch statistics and the max are over each voxel's
    ``num_points`` real points.  So the output is independent of the padding values and invariant to the
    order of the points within a voxel.  A voxel with no points gets zeros.

    Voxel centre of coordinate ``c``: ``point_range[:3] + (c + 0.5) * voxel_size`` (:func:`sparseconv.voxelize`).

    Args:
        in_channels: point feature width ``C`` (``>= 3``, x, y, z first).
        voxel_size: ``(vx, vy, vz)``.
        point_range: ``(x0, y0, z0, x1, y1, z1)``.
        num_filters: output width of each layer (a non-last width must be even).
        use_norm: BatchNorm after each linear layer (else a bias).
        use_absolute_xyz: keep the raw ``x, y, z`` among the features.
        with_distance: append the distance of the point to the origin.

    Attributes:
        num_input_features: width of the augmented point features: ``C + 6`` (``C + 3`` without
            absolute xyz), ``+ 1`` with distance.
        out_channels: ``num_filters[-1]``.

    Shape:
        ``forward(voxels [V, P, C], num_points [V], coords [V, 4])`` or ``forward(PaddedVoxels)`` -> ``[V, out_channels]``.

    Example:
        >>> pv = sparseconv.voxelize_padded(points, (0.2, 0.2, 0.2), (0, -40, -3, 70.4, 40, 1), 8)
        >>> vfe = PointNetVFE(4, (0.2, 0.2, 0.2), (0, -40, -3, 70.4, 40, 1), num_filters=(32,))
        >>> x = sparseconv.SparseTensor(vfe(pv), pv.coords, pv.spatial_shape)   # [V, 32]
    """

    def __init__(self, in_channels: int = 4, voxel_size: Sequence[float] = (0.2, 0.2, 0.2),
                 point_range: Sequence[float] = (0.0, -40.0, -3.0, 70.4, 40.0, 1.0),
                 num_filters: Sequence[int] = (64,), use_norm: bool = True, use_absolute_xyz: bool = True,
                 with_distance: bool = False):
        super().__init__()
        self.in_channels = int_arg(in_channels, "in_channels", 3)
        self.voxel_size = _floats(voxel_size, 3, "voxel_size", positive=True)
        self.point_range = _floats(point_range, 6, "point_range")
        if isinstance(num_filters, (str, bytes)) or not hasattr(num_filters, "__len__") or len(num_filters) < 1:
            raise ValueError(f"num_filters must be a non-empty sequence of positive ints, got {num_filters!r}")
        filters = [int_arg(f, f"num_filters (got {tuple(num_filters)}) entries") for f in num_filters]
        for f in filters[:-1]:
            if f % 2:
                raise ValueError(f"num_filters entries before the last must be even (half the units plus their "
                                 f"voxel max), got {tuple(filters)}")
        self.use_norm, self.use_absolute_xyz, self.with_distance = bool(use_norm), bool(use_absolute_xyz), \
            bool(with_distance)
        self.num_input_features = self.in_channels + (6 if self.use_absolute_xyz else 3) + int(self.with_distance)
        self.out_channels = filters[-1]
        self.linears = torch.nn.ModuleList()
        self.norms = torch.nn.ModuleList()
        cin = self.num_input_features
        for i, f in enumerate(filters):
            units = f if i == len(filters) - 1 else f // 2
            self.linears.append(torch.nn.Linear(cin, units, bias=not self.use_norm))
            self.norms.append(torch.nn.BatchNorm1d(units, eps=1e-3, momentum=0.01) if self.use_norm
                              else torch.nn.Identity())
            cin = f
        self.register_buffer("_scale", torch.tensor(self.voxel_size), persistent=False)
        self.register_buffer("_offset", torch.tensor(self.point_range[:3]), persistent=False)

    def get_output_feature_dim(self) -> int:
        return self.out_channels

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, voxel_size={self.voxel_size}, point_range={self.point_range}, "
                f"use_absolute_xyz={self.use_absolute_xyz}, with_distance={self.with_distance}")

    def point_features(self, voxels: torch.Tensor, counts: torch.Tensor, coords: torch.Tensor,
                       valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Augmented features of the real points: ``([N, num_input_features], voxel index int64 [N])``,
        points in voxel-major order."""
        pts = voxels[valid]                                                   # [N, C]
        vid = torch.arange(voxels.shape[0], device=voxels.device).repeat_interleave(counts)
        xyz = pts[:, :3]
        dtype = voxels.dtype
        mean = voxels.new_zeros(voxels.shape[0], 3).index_add(0, vid, xyz) / \
            counts.clamp(min=1).to(dtype)[:, None]
        centre = (coords[:, 1:].to(dtype) + 0.5) * self._scale.to(dtype) + self._offset.to(dtype)
        parts = [pts if self.use_absolute_xyz else pts[:, 3:], xyz - mean[vid], xyz - centre[vid]]
        if self.with_distance:
            parts.append(xyz.norm(dim=1, keepdim=True))
        return torch.cat(parts, 1), vid

    def forward(self, voxels: Padded, num_points: Optional[torch.Tensor] = None,
                coords: Optional[torch.Tensor] = None) -> torch.Tensor:
        if isinstance(voxels, SparseTensor):
            raise TypeError("PointNetVFE needs the points of each voxel (voxelize_padded's layout), got a "
                            "SparseTensor; use MeanVFE for mean-voxelized input")
        voxels, counts, coords, valid = _unpack(voxels, num_points, coords, "PointNetVFE", self.in_channels, True)
        v, p = valid.shape
        x, vid = self.point_features(voxels, counts, coords, valid)
        for i, (lin, norm) in enumerate(zip(self.linears, self.norms)):
            h = lin(x)
            h = torch.relu(norm(h) if h.shape[0] > 0 else h)
            full = h.new_full((v, p, h.shape[1]), float("-inf"))
            full = full.index_put((valid.nonzero(as_tuple=True)), h)
            vmax = full.amax(1) if p > 0 else h.new_zeros(v, h.shape[1])
            vmax = torch.where(counts[:, None] > 0, vmax, vmax.new_zeros(()))  # empty voxels: 0, not -inf
            if i == len(self.linears) - 1:
                return vmax
            x = torch.cat([h, vmax[vid]], 1)
        raise AssertionError("unreachable")  # pragma: no cover
