"""The immutable :class:`SparseTensor`."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple, Union

import torch

from .coords import CoordinateSet, VoxelGeometry

__all__ = ["SparseTensor", "cat"]

IntOr3 = Union[int, Sequence[int]]


def _as_triple(value: IntOr3, name: str, minimum: int = 1) -> Tuple[int, int, int]:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or 3 ints, got {value!r}")
    if isinstance(value, int):
        value = (value, value, value)
    try:
        out = tuple(int(v) for v in value)
    except TypeError:
        raise TypeError(f"{name} must be an int or 3 ints (x, y, z), got {value!r}") from None
    if len(out) != 3:
        raise ValueError(f"{name} must have 3 values (x, y, z), got {len(out)}: {tuple(value)}")
    if min(out) < minimum:
        raise ValueError(f"{name} must be >= {minimum} on every axis, got {out}")
    return out


class SparseTensor:
    """A batch of sparse 3D feature grids: features at active sites.

    ``SparseTensor`` is immutable: layers return new tensors, and
    :meth:`replace_feature` gives a tensor with new features that shares the
    coordinates and every kernel map already built for them.

    Args:
        feats: ``[N, C]`` floating-point features, one row per active site.
        coords: int32 ``[N, 4]`` rows ``(batch, x, y, z)``; each site at most once.
        spatial_shape: grid bounds ``(X, Y, Z)``; default ``coords.max(0) + 1``.
        stride: tensor stride (int or 3 ints) relative to the finest grid.
        batch_size: number of batch elements ``B``; default ``max(batch) + 1``.
        voxel_size, origin: optional world geometry (3 floats each): voxel ``c`` spans
            ``origin + c * voxel_size`` to ``origin + (c + 1) * voxel_size``; needed by
            :func:`sparseconv.devoxelize`, set by :func:`sparseconv.voxelize`.

    Raises:
        TypeError: ``feats`` or ``coords`` have the wrong type or dtype.
        ValueError: wrong shapes, length mismatch, devices differ, coordinates
            negative / outside ``spatial_shape`` / ``batch_size``, or duplicated.

    Example:
        >>> coords = torch.tensor([[0, 1, 2, 3], [0, 4, 4, 4], [1, 0, 0, 0]], dtype=torch.int32)
        >>> x = SparseTensor(torch.randn(3, 16), coords, spatial_shape=(8, 8, 8))
        >>> x.num_voxels, x.batch_size, x.dense().shape
        (3, 2, torch.Size([2, 16, 8, 8, 8]))
    """

    __slots__ = ("_feats", "_cset")

    def __init__(
        self,
        feats: torch.Tensor,
        coords: torch.Tensor,
        spatial_shape: Optional[Sequence[int]] = None,
        stride: IntOr3 = 1,
        batch_size: Optional[int] = None,
        *,
        voxel_size: Optional[Sequence[float]] = None,
        origin: Optional[Sequence[float]] = None,
    ):
        if not isinstance(feats, torch.Tensor):
            raise TypeError(f"feats must be a torch.Tensor, got {type(feats).__name__}")
        if not isinstance(coords, torch.Tensor):
            raise TypeError(f"coords must be a torch.Tensor, got {type(coords).__name__}")
        if feats.dim() != 2:
            raise ValueError(f"feats must be [N, C], got shape {tuple(feats.shape)}")
        if not feats.is_floating_point():
            raise TypeError(f"feats must be floating point, got {feats.dtype}")
        if coords.dim() != 2 or coords.shape[1] != 4:
            raise ValueError(f"coords must be [N, 4] rows (batch, x, y, z), got shape {tuple(coords.shape)}")
        if coords.dtype != torch.int32:
            raise TypeError(f"coords must be int32 (batch, x, y, z), got {coords.dtype}; convert with coords.int()")
        if feats.shape[0] != coords.shape[0]:
            raise ValueError(
                f"feats has {feats.shape[0]} rows but coords has {coords.shape[0]}; there must be one feature row per site"
            )
        if feats.device != coords.device:
            raise ValueError(f"feats is on {feats.device} but coords is on {coords.device}; move both to one device")
        stride = _as_triple(stride, "stride")
        n = coords.shape[0]
        if n:
            lo = coords.min(0).values.tolist()
            hi = coords.max(0).values.tolist()
        else:
            lo, hi = [0, 0, 0, 0], [-1, -1, -1, -1]
        if min(lo) < 0:
            axis = lo.index(min(lo))
            row = int((coords[:, axis] < 0).nonzero()[0, 0])
            raise ValueError(
                f"coords must be non-negative, but row {row} is {tuple(coords[row].tolist())} "
                f"(column {axis}: {('batch', 'x', 'y', 'z')[axis]}); shift points into the grid before voxelizing"
            )
        if spatial_shape is None:
            spatial_shape = tuple(max(h + 1, 1) for h in hi[1:])
        else:
            spatial_shape = _as_triple(spatial_shape, "spatial_shape")
            for axis in range(3):
                if hi[axis + 1] >= spatial_shape[axis]:
                    col = coords[:, axis + 1]
                    row = int((col >= spatial_shape[axis]).nonzero()[0, 0])
                    raise ValueError(
                        f"coordinate {tuple(coords[row].tolist())} at row {row} is outside spatial_shape "
                        f"{spatial_shape}: {'xyz'[axis]} must be in [0, {spatial_shape[axis]})"
                    )
        if batch_size is None:
            batch_size = max(hi[0] + 1, 1)
        else:
            batch_size = int(batch_size)
            if batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {batch_size}")
            if hi[0] >= batch_size:
                row = int((coords[:, 0] >= batch_size).nonzero()[0, 0])
                raise ValueError(
                    f"coordinate {tuple(coords[row].tolist())} at row {row} has batch index {hi[0]} "
                    f"but batch_size is {batch_size}"
                )
        geometry = None
        if voxel_size is not None or origin is not None:
            if voxel_size is None or origin is None:
                raise ValueError("give voxel_size and origin together")
            geometry = VoxelGeometry(tuple(float(v) for v in voxel_size), tuple(float(v) for v in origin))
        cset = CoordinateSet(coords.contiguous(), spatial_shape, stride, batch_size, geometry=geometry)
        cset.hash_table()  # builds the hash; rejects duplicate coordinates with the rows that repeat
        object.__setattr__(self, "_feats", feats)
        object.__setattr__(self, "_cset", cset)

    @classmethod
    def _from_set(cls, feats: torch.Tensor, cset: CoordinateSet) -> "SparseTensor":
        """Wraps features on an existing coordinate set (no validation; internal)."""
        out = cls.__new__(cls)
        object.__setattr__(out, "_feats", feats)
        object.__setattr__(out, "_cset", cset)
        return out

    def __reduce__(self):
        # Pickling (DataLoader workers, torch.save) keeps the data and the voxel geometry; kernel
        # maps are rebuilt on the other side.
        cset = self._cset
        return _rebuild, (self._feats, cset.coords, cset.spatial_shape, cset.stride, cset.batch_size, cset.geometry)

    def __setattr__(self, name, value):
        raise AttributeError("SparseTensor is immutable; use replace_feature(...) to get a tensor with new features")

    def __delattr__(self, name):
        raise AttributeError("SparseTensor is immutable")

    # ------------------------------------------------------------------ data
    @property
    def features(self) -> torch.Tensor:
        """``[N, C]`` features."""
        return self._feats

    feats = features

    @property
    def coords(self) -> torch.Tensor:
        """int32 ``[N, 4]`` coordinates ``(batch, x, y, z)``.

        Shared with every tensor on the same sites and with the cached kernel maps: never modify
        it in place; build a new ``SparseTensor`` from modified coordinates instead.
        """
        return self._cset.coords

    indices = coords  # spconv's name

    @property
    def spatial_shape(self) -> Tuple[int, int, int]:
        return self._cset.spatial_shape

    @property
    def stride(self) -> Tuple[int, int, int]:
        return self._cset.stride

    @property
    def batch_size(self) -> int:
        return self._cset.batch_size

    @property
    def geometry(self) -> Optional[VoxelGeometry]:
        """World geometry of the grid (``voxel_size``, ``origin``), or ``None`` when unknown."""
        return self._cset.geometry

    @property
    def num_voxels(self) -> int:
        return self._feats.shape[0]

    @property
    def num_channels(self) -> int:
        return self._feats.shape[1]

    @property
    def device(self) -> torch.device:
        return self._feats.device

    @property
    def dtype(self) -> torch.dtype:
        return self._feats.dtype

    @property
    def coordinate_set(self) -> CoordinateSet:
        """The shared coordinate set and its kernel-map cache."""
        return self._cset

    # ---------------------------------------------------------------- derive
    def replace_feature(self, feats: torch.Tensor) -> "SparseTensor":
        """A tensor with features ``feats`` ``[N, C']`` on the same sites (kernel maps are shared)."""
        if not isinstance(feats, torch.Tensor) or feats.dim() != 2:
            raise ValueError(f"replace_feature expects a [N, C] tensor, got {getattr(feats, 'shape', type(feats))}")
        if not feats.is_floating_point():
            raise TypeError(f"replace_feature expects floating-point features, got {feats.dtype}")
        if feats.shape[0] != self.num_voxels:
            raise ValueError(f"replace_feature got {feats.shape[0]} rows for a tensor with {self.num_voxels} voxels")
        if feats.device != self.coords.device:
            raise ValueError(
                f"replace_feature got features on {feats.device} but coordinates are on {self.coords.device}"
            )
        return SparseTensor._from_set(feats, self._cset)

    def to(self, *args, **kwargs) -> "SparseTensor":
        """Like ``Tensor.to`` on the features; a device move moves the coordinates too."""
        feats = self._feats.to(*args, **kwargs)
        if feats.device == self._feats.device:
            return SparseTensor._from_set(feats, self._cset)
        return SparseTensor._from_set(feats, self._cset.to(feats.device))

    def cpu(self) -> "SparseTensor":
        return self.to("cpu")

    def cuda(self, device=None) -> "SparseTensor":
        return self.to("cuda" if device is None else device)

    def detach(self) -> "SparseTensor":
        return SparseTensor._from_set(self._feats.detach(), self._cset)

    def dense(self, channels_first: bool = True) -> torch.Tensor:
        """Scatters to a dense ``[B, C, X, Y, Z]`` grid (``[B, X, Y, Z, C]`` if not ``channels_first``); differentiable."""
        b, (x, y, z), c = self.batch_size, self.spatial_shape, self.num_channels
        out = self._feats.new_zeros((b, x, y, z, c))
        idx = self.coords.long()
        out = out.index_put((idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]), self._feats)
        return out.permute(0, 4, 1, 2, 3).contiguous() if channels_first else out

    @classmethod
    def from_dense(
        cls,
        dense: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        channels_first: bool = True,
        stride: IntOr3 = 1,
    ) -> "SparseTensor":
        """Builds a sparse tensor from a dense ``[B, C, X, Y, Z]`` grid (``[B, X, Y, Z, C]`` if not ``channels_first``).

        Active sites are ``mask`` (bool ``[B, X, Y, Z]``) or, by default, the sites where any channel is non-zero.
        """
        if not isinstance(dense, torch.Tensor) or dense.dim() != 5:
            raise ValueError(f"from_dense expects a 5-D tensor, got {getattr(dense, 'shape', type(dense))}")
        if not dense.is_floating_point():
            raise TypeError(f"from_dense expects floating-point features, got {dense.dtype}")
        grid = dense.permute(0, 2, 3, 4, 1) if channels_first else dense
        if mask is None:
            mask = (grid != 0).any(-1)
        elif mask.shape != grid.shape[:4] or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool {tuple(grid.shape[:4])}, got {mask.dtype} {tuple(mask.shape)}")
        coords = mask.nonzero().int()
        cset = CoordinateSet(coords, tuple(grid.shape[1:4]), _as_triple(stride, "stride"), grid.shape[0])
        return cls._from_set(grid[mask], cset)

    def __add__(self, other):
        if isinstance(other, SparseTensor):
            _check_same_sites(self, other, "+")
            return self.replace_feature(self._feats + other._feats)
        return self.replace_feature(self._feats + other)

    __radd__ = __add__

    def __repr__(self) -> str:
        return (
            f"SparseTensor(num_voxels={self.num_voxels}, channels={self.num_channels}, "
            f"spatial_shape={self.spatial_shape}, stride={self.stride}, batch_size={self.batch_size}, "
            f"dtype={self.dtype}, device={self.device})"
        )


def _rebuild(feats, coords, spatial_shape, stride, batch_size, geometry) -> SparseTensor:
    return SparseTensor._from_set(feats, CoordinateSet(coords, spatial_shape, stride, batch_size, geometry=geometry))


def _check_same_sites(a: SparseTensor, b: SparseTensor, what: str) -> None:
    if a._cset is b._cset:
        return
    if a.spatial_shape != b.spatial_shape or a.batch_size != b.batch_size or not torch.equal(a.coords, b.coords):
        raise ValueError(
            f"{what} needs sparse tensors on the same sites: got {a.num_voxels} voxels on {a.spatial_shape} and "
            f"{b.num_voxels} voxels on {b.spatial_shape}"
        )


def cat(tensors: Iterable[SparseTensor]) -> SparseTensor:
    """Concatenates the features of sparse tensors on the same sites along the channel axis.

    Example:
        >>> y = cat([x, x])  # 2 * C channels on the sites of x
    """
    tensors = list(tensors)
    if not tensors:
        raise ValueError("cat needs at least one SparseTensor")
    for t in tensors:
        if not isinstance(t, SparseTensor):
            raise TypeError(f"cat expects SparseTensors, got {type(t).__name__}")
        _check_same_sites(tensors[0], t, "cat")
    return tensors[0].replace_feature(torch.cat([t.features for t in tensors], dim=1))
