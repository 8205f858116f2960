"""Points to voxels and back: :func:`voxelize`, :func:`voxelize_padded`, :func:`devoxelize`."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional, Sequence

import torch

from . import ops
from .coords import CoordinateSet, VoxelGeometry
from .tensor import SparseTensor

__all__ = ["voxelize", "voxelize_padded", "devoxelize", "grid_shape", "Voxels", "PaddedVoxels", "KITTI_POINT_RANGE"]

REDUCTIONS = ("mean", "max", "sum", "first", "count")

# The op itself: _prepare has already normalised every argument to the schema's types, so the
# wrappers below call it directly instead of through ops.voxelize, which would normalise them again.
_voxelize_op = torch.ops.sparseconv.voxelize.default

#: KITTI's standard detection range (OpenPCDet): x, y, z minimum then maximum, metres.
KITTI_POINT_RANGE = (0.0, -40.0, -3.0, 70.4, 40.0, 1.0)


def grid_shape(voxel_size: Sequence[float], point_range: Sequence[float]):
    """Voxel grid ``(X, Y, Z)`` of a point range: ``round((max - min) / voxel_size)`` per axis (spconv, OpenPCDet)."""
    return _geometry(voxel_size, point_range)[0]


_NUMBER_TYPES = frozenset((float, int))


def _geometry(voxel_size, point_range):
    """``(grid, voxel_size, lower)``: the grid and the voxel size and the range's lower corner as
    tuples of ints and floats.

    It runs on every call of :func:`voxelize`, and between the scans of a pipeline its code is cold:
    tuples of plain numbers (immutable, as a pipeline passes the same settings for every scan) are
    looked up in a small memo instead (cold, 13 against 37 us after a NumPy ``unique`` of 1M floats);
    anything else is checked and converted each time.
    """
    if (type(voxel_size) is tuple and type(point_range) is tuple
            and set(map(type, voxel_size + point_range)) <= _NUMBER_TYPES):
        return _geometry_memo(voxel_size, point_range)
    return _geometry_of(voxel_size, point_range)


def _geometry_of(voxel_size, point_range):
    """:func:`_geometry` without the memo.  Written without comprehensions or generators (each
    extra Python frame costs microseconds when the code is cold)."""
    if len(voxel_size) != 3:
        raise ValueError(f"voxel_size must have 3 values (x, y, z), got {tuple(voxel_size)}")
    if len(point_range) != 6:
        raise ValueError(f"point_range must be (x_min, y_min, z_min, x_max, y_max, z_max), got {tuple(point_range)}")
    vs = list(map(float, voxel_size))
    r = list(map(float, point_range))
    if not (vs[0] > 0 and vs[1] > 0 and vs[2] > 0):
        raise ValueError(f"voxel_size must be positive, got {tuple(vs)}")
    if not math.isfinite(sum(r)):
        raise ValueError(f"point_range must be finite, got {tuple(point_range)}")
    grid = (round((r[3] - r[0]) / vs[0]), round((r[4] - r[1]) / vs[1]), round((r[5] - r[2]) / vs[2]))
    if min(grid) < 1:
        raise ValueError(f"point_range {tuple(point_range)} is empty for voxel_size {tuple(vs)}: grid {grid}")
    return grid, tuple(vs), tuple(r[:3])


_geometry_memo = functools.lru_cache(maxsize=64)(_geometry_of)


def _drop_stats(num_points: int, drops: torch.Tensor, counts: torch.Tensor) -> Dict[str, int]:
    nonfinite, outside, over_voxels, over_points = (int(v) for v in drops.tolist())
    return {
        "points": num_points,
        "kept": int(counts.sum()) if counts.numel() else 0,
        "voxels": int(counts.shape[0]),
        "dropped_nonfinite": nonfinite,
        "dropped_out_of_range": outside,
        "dropped_max_voxels": over_voxels,
        "dropped_max_points": over_points,
    }


def _prepare(points, voxel_size, point_range, max_points_per_voxel, max_voxels, batch, batch_size):
    if not isinstance(points, torch.Tensor):
        raise TypeError(f"points must be a torch.Tensor, got {type(points).__name__}")
    shape = points.shape  # one binding call (each costs ~15 us when cold)
    if len(shape) != 2 or shape[1] < 3:
        raise ValueError(f"points must be [N, C] with C >= 3 (x, y, z first), got shape {tuple(shape)}")
    if not points.is_floating_point():
        raise TypeError(f"points must be floating point, got {points.dtype}")
    grid, vs, lower = _geometry(voxel_size, point_range)
    if batch is not None:
        if not isinstance(batch, torch.Tensor) or batch.dim() != 1 or batch.shape[0] != points.shape[0]:
            raise ValueError(f"batch must be a [N] = [{points.shape[0]}] integer tensor, got "
                             f"{getattr(batch, 'shape', type(batch))}")
        if batch_size is None:
            batch_size = int(batch.max()) + 1 if batch.numel() else 1
    batch_size = 1 if batch_size is None else int(batch_size)
    mp = -1 if max_points_per_voxel is None else int(max_points_per_voxel)
    mv = -1 if max_voxels is None else int(max_voxels)
    if max_points_per_voxel is not None and mp < 1:
        raise ValueError(f"max_points_per_voxel must be >= 1 (or None for no limit), got {max_points_per_voxel}")
    if max_voxels is not None and mv < 1:
        raise ValueError(f"max_voxels must be >= 1 (or None for no limit), got {max_voxels}")
    return grid, vs, lower, batch_size, mp, mv


@dataclass(frozen=True)
class Voxels:
    """Result of :func:`voxelize`; unpacks as ``tensor, point_to_voxel``.

    Attributes:
        tensor: the voxels as a :class:`SparseTensor` (reduced point features, ``[V, C]``).
        point_to_voxel: int64 ``[N]``, the row of each point's voxel, ``-1`` for dropped points.
        counts: int32 ``[V]``, points kept per voxel (if asked for, else ``None``).
        centroid_offset: ``[V, 3]``, mean of the kept points minus the voxel centre
            (if asked for, else ``None``).
        stats: point and voxel counts, and the points dropped per reason (computed on first
            access, so that voxelizing needs no host synchronisation).
    """

    tensor: SparseTensor
    point_to_voxel: torch.Tensor
    counts: Optional[torch.Tensor]
    centroid_offset: Optional[torch.Tensor]
    _drops: torch.Tensor = field(repr=False)
    _kept: torch.Tensor = field(repr=False)

    @functools.cached_property
    def stats(self) -> Dict[str, int]:
        return _drop_stats(self.point_to_voxel.shape[0], self._drops, self._kept)

    def __iter__(self) -> Iterator:
        return iter((self.tensor, self.point_to_voxel))


def voxelize(
    points: torch.Tensor,
    voxel_size: Sequence[float],
    point_range: Sequence[float],
    reduce: str = "mean",
    max_points_per_voxel: Optional[int] = None,
    max_voxels: Optional[int] = None,
    batch: Optional[torch.Tensor] = None,
    batch_size: Optional[int] = None,
    return_counts: bool = False,
    return_centroid_offset: bool = False,
) -> Voxels:
    """Merges the points that fall into one voxel into a sparse tensor.

    A point ``p`` falls into voxel ``floor((p - point_range[:3]) / voxel_size)`` (computed in the
    points' dtype, as spconv's ``PointToVoxel``); the grid is ``round((max - min) / voxel_size)``.
    Points with a non-finite x, y or z, or outside the grid, are dropped and counted in ``stats``.
    ``max_points_per_voxel`` and ``max_voxels`` follow spconv's ``PointToVoxel``: voxels are
    created in the order of their first point and only the first ``max_voxels`` are kept; in each
    voxel the first ``max_points_per_voxel`` points (in input order) are kept.  The result is
    deterministic; voxel rows are sorted by ``(batch, x, y, z)``.

    Args:
        points: ``[N, C]`` float32/float64, columns ``x, y, z`` first (e.g. KITTI's
            ``x, y, z, intensity``).
        voxel_size: ``(vx, vy, vz)``.
        point_range: ``(x_min, y_min, z_min, x_max, y_max, z_max)``.
        reduce: how the kept points of a voxel make its ``C`` features: ``"mean"`` (MeanVFE),
            ``"max"``, ``"sum"``, ``"first"``, or ``"count"`` (one feature: the point count).
        max_points_per_voxel: keep at most this many points per voxel (``None``: all).
        max_voxels: keep at most this many voxels (``None``: all).
        batch: int ``[N]`` batch index of each point (``None``: one scan).
        batch_size: number of scans (default ``max(batch) + 1``).
        return_counts: also return the points kept per voxel.
        return_centroid_offset: also return the mean xyz of each voxel minus its centre
            (VoxelNet/SECOND-style voxel features).

    Returns:
        :class:`Voxels`: ``tensor`` (``SparseTensor`` with ``spatial_shape`` = the grid and the
        voxel geometry for :func:`devoxelize`), ``point_to_voxel``, and the optional outputs.

    Example:
        >>> pts = torch.tensor([[0.1, 0.1, 0.1, 1.0], [0.12, 0.1, 0.1, 3.0], [5.0, 5.0, 5.0, 0.5]])
        >>> x, p2v = voxelize(pts, (0.5, 0.5, 0.5), (0, 0, 0, 10, 10, 10))
        >>> x.num_voxels, p2v.tolist(), x.features[0].tolist()
        (2, [0, 0, 1], [0.11000000149011612, 0.10000000149011612, 0.10000000149011612, 2.0])
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
    grid, vs, lower, batch_size, mp, mv = _prepare(points, voxel_size, point_range, max_points_per_voxel, max_voxels,
                                                   batch, batch_size)
    coords, feats, point_voxel, counts, drops = _voxelize_op(points, batch, vs, lower, grid, batch_size, mp, mv, reduce,
                                                             False)
    geometry = VoxelGeometry(vs, lower)
    tensor = SparseTensor._from_set(feats, CoordinateSet(coords, grid, (1, 1, 1), batch_size, geometry=geometry))
    offset = None
    if return_centroid_offset:
        mean = feats[:, :3] if reduce == "mean" else _voxelize_op(
            points[:, :3], batch, vs, lower, grid, batch_size, mp, mv, "mean", False)[1]
        centre = torch.tensor(lower, dtype=points.dtype, device=points.device) + (coords[:, 1:].to(points.dtype) + 0.5) \
            * torch.tensor(vs, dtype=points.dtype, device=points.device)
        offset = mean - centre
    return Voxels(tensor, point_voxel, counts if return_counts else None, offset, drops, counts)


@dataclass(frozen=True)
class PaddedVoxels:
    """Result of :func:`voxelize_padded` (spconv ``PointToVoxel`` layout).

    Attributes:
        voxels: ``[V, max_points, C]`` the kept points of each voxel, zero-padded.
        coords: int32 ``[V, 4]`` ``(batch, x, y, z)`` (spconv gives ``(z, y, x)`` without batch).
        num_points: int32 ``[V]`` points per voxel.
        point_to_voxel: int64 ``[N]`` (``-1`` for dropped points).
        spatial_shape: the grid ``(X, Y, Z)``.
        stats: point and voxel counts, and the points dropped per reason (computed on first access).
    """

    voxels: torch.Tensor
    coords: torch.Tensor
    num_points: torch.Tensor
    point_to_voxel: torch.Tensor
    spatial_shape: tuple
    _drops: torch.Tensor = field(repr=False)

    @functools.cached_property
    def stats(self) -> Dict[str, int]:
        return _drop_stats(self.point_to_voxel.shape[0], self._drops, self.num_points)


def voxelize_padded(
    points: torch.Tensor,
    voxel_size: Sequence[float],
    point_range: Sequence[float],
    max_points_per_voxel: int,
    max_voxels: Optional[int] = None,
    batch: Optional[torch.Tensor] = None,
    batch_size: Optional[int] = None,
) -> PaddedVoxels:
    """Voxelizes into the padded ``[V, max_points, C]`` layout of PointPillars/VoxelNet VFEs.

    Same voxels, points and order as spconv's ``PointToVoxel`` (voxels in order of first
    appearance, the first ``max_points_per_voxel`` points of each in input order), with
    ``(batch, x, y, z)`` coordinates.

    Example:
        >>> out = voxelize_padded(points, (0.16, 0.16, 4), (0, -39.68, -3, 69.12, 39.68, 1), 32, 40000)
        >>> out.voxels.shape  # [V, 32, 4]
    """
    if max_points_per_voxel is None:
        raise ValueError("voxelize_padded needs max_points_per_voxel (the padded size)")
    grid, vs, lower, batch_size, mp, mv = _prepare(points, voxel_size, point_range, max_points_per_voxel, max_voxels,
                                                   batch, batch_size)
    coords, voxels, point_voxel, counts, drops = _voxelize_op(points, batch, vs, lower, grid, batch_size, mp, mv, "pad",
                                                              True)
    return PaddedVoxels(voxels, coords, counts, point_voxel, grid, drops)


def devoxelize(
    x: SparseTensor,
    points: torch.Tensor,
    mode: str = "nearest",
    batch: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Brings voxel features back to points (differentiable in the features).

    ``"nearest"``: each point takes the features of the voxel it falls into (zeros if that voxel
    is not active).  ``"trilinear"`` (SPVNAS): each point interpolates the 8 voxels whose centres
    surround it, with trilinear weights renormalised to sum to 1 over the active ones (zeros if
    none is active).

    Args:
        x: sparse tensor with a known voxel geometry (from :func:`voxelize`, or any layer after
            it: strided layers carry the geometry), ``[V, C]`` features.
        points: ``[N, >= 3]`` points (x, y, z first), same device as ``x``.
        mode: ``"nearest"`` or ``"trilinear"``.
        batch: int ``[N]`` batch index of each point (``None``: all in batch 0).

    Returns:
        ``[N, C]`` point features.

    Example:
        >>> x, p2v = voxelize(points, (0.1, 0.1, 0.1), (0, -40, -3, 70.4, 40, 1))
        >>> point_feats = devoxelize(net(x), points, mode="trilinear")
    """
    if not isinstance(x, SparseTensor):
        raise TypeError(f"devoxelize expects a SparseTensor, got {type(x).__name__}")
    if mode not in ("nearest", "trilinear"):
        raise ValueError(f"mode must be 'nearest' or 'trilinear', got {mode!r}")
    if not isinstance(points, torch.Tensor) or points.dim() != 2 or points.shape[1] < 3:
        raise ValueError(f"points must be [N, >= 3], got {getattr(points, 'shape', type(points))}")
    if points.device != x.device:
        raise ValueError(f"points are on {points.device} but the sparse tensor is on {x.device}")
    geometry = x.geometry
    if geometry is None:
        raise ValueError("devoxelize needs the voxel geometry of the tensor (voxel_size and origin): build it with "
                         "sparseconv.voxelize, or pass voxel_size= and origin= to SparseTensor")
    n = points.shape[0]
    if batch is None:
        b = torch.zeros(n, dtype=torch.int32, device=points.device)
    else:
        if batch.shape != (n,):
            raise ValueError(f"batch must be [N] = [{n}], got {tuple(batch.shape)}")
        b = batch.to(torch.int32)
    xyz = points[:, :3].to(torch.float64)
    vs = torch.tensor(geometry.voxel_size, dtype=torch.float64, device=points.device)
    origin = torch.tensor(geometry.origin, dtype=torch.float64, device=points.device)
    u = (xyz - origin) / vs
    keys, values = x.coordinate_set.hash_table()
    grid = x.coordinate_set.grid
    feats = x.features
    if mode == "nearest":
        # The cell in the points' own floating type, exactly as voxelize computes it, so that a
        # point within rounding of a voxel face finds the voxel voxelize put it in.
        dt = points.dtype if points.dtype in (torch.float32, torch.float64) else torch.float64
        cell = torch.floor((points[:, :3].to(dt) - origin.to(dt)) / vs.to(dt)).to(torch.float64)
        ok = torch.isfinite(cell).all(1)
        cell = torch.where(ok.unsqueeze(1), cell, torch.full_like(cell, -1)).clamp(-1, 2**31 - 1).to(torch.int32)
        rows = ops.hash_query(keys, values, torch.cat([b.unsqueeze(1), cell], 1), grid)
        out = feats[rows.clamp_min(0)]
        return torch.where((rows >= 0).unsqueeze(1), out, torch.zeros_like(out))
    u = u - 0.5  # voxel centres at integer positions
    base = torch.floor(u)
    frac = (u - base).to(feats.dtype)
    ok = torch.isfinite(base).all(1)
    base = torch.where(ok.unsqueeze(1), base, torch.full_like(base, -2)).clamp(-2, 2**31 - 2).to(torch.int32)
    corners = torch.tensor([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=torch.int32,
                           device=points.device)
    cells = base.unsqueeze(1) + corners  # [N, 8, 3]
    queries = torch.cat([b.view(n, 1, 1).expand(n, 8, 1), cells], 2).reshape(-1, 4)
    rows = ops.hash_query(keys, values, queries, grid).view(n, 8)
    c = corners.to(feats.dtype)
    w = (c * frac.unsqueeze(1) + (1 - c) * (1 - frac.unsqueeze(1))).prod(2)  # [N, 8]
    w = torch.where(rows >= 0, w, torch.zeros_like(w))
    total = w.sum(1, keepdim=True)
    w = torch.where(total > 0, w / total.clamp_min(torch.finfo(w.dtype).tiny), torch.zeros_like(w))
    gathered = feats[rows.clamp_min(0)]  # [N, 8, C]
    return (gathered * w.unsqueeze(2)).sum(1)
