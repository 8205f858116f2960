"""Coordinate sets and their kernel-map cache.

A :class:`CoordinateSet` is one set of active sites (int32 ``[N, 4]`` rows
``(batch, x, y, z)``) on one grid at one tensor stride.  Everything derived
from the geometry alone is computed once and cached on it: the coordinate
hash table, submanifold kernel maps per (kernel size, dilation), and the
output set plus kernel map of every strided / transposed convolution applied
to it.  Tensors that share geometry (``SparseTensor.replace_feature``, every
``SubMConv3d`` output, the output of an inverse conv) share the same set, so
a network builds each map exactly once per forward pass without string keys.

Strided convolutions record how their output set was produced
(:class:`ConvRecord`), which is what ``SparseInverseConv3d`` inverts: the
record of the conv that produced a set (``parent``), or one registered under
an ``indice_key`` in a dict shared by every set derived from the same input.

Kernel-map building is eager work with Python-side state, so it is excluded
from ``torch.compile`` graphs; the convolution arithmetic itself is traced.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from . import ops
from ._compat import eager_only

Triple = Tuple[int, int, int]

__all__ = ["CoordinateSet", "ConvRecord", "VoxelGeometry", "conv_output_shape", "conv_transpose_output_shape"]


def conv_output_shape(spatial_shape, kernel_size, stride, padding, dilation) -> Triple:
    """Dense ``conv3d`` output grid: ``(X + 2p - d (k - 1) - 1) // s + 1`` per axis."""
    out = tuple(
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(spatial_shape, kernel_size, stride, padding, dilation)
    )
    if min(out) < 1:
        raise ValueError(
            f"convolution with kernel_size={tuple(kernel_size)}, stride={tuple(stride)}, padding={tuple(padding)}, "
            f"dilation={tuple(dilation)} leaves an empty output grid {out} for spatial_shape {tuple(spatial_shape)}"
        )
    return out


def conv_transpose_output_shape(spatial_shape, kernel_size, stride, padding, dilation, output_padding) -> Triple:
    """Dense ``conv_transpose3d`` output grid: ``(X - 1) s - 2p + d (k - 1) + output_padding + 1`` per axis."""
    out = tuple(
        (n - 1) * s - 2 * p + d * (k - 1) + op + 1
        for n, k, s, p, d, op in zip(spatial_shape, kernel_size, stride, padding, dilation, output_padding)
    )
    if min(out) < 1:
        raise ValueError(
            f"transposed convolution with kernel_size={tuple(kernel_size)}, stride={tuple(stride)}, "
            f"padding={tuple(padding)} leaves an empty output grid {out} for spatial_shape {tuple(spatial_shape)}"
        )
    return out


@dataclass(frozen=True)
class VoxelGeometry:
    """Where the voxels of a grid are in the world: voxel ``c`` (per axis) spans
    ``origin + c * voxel_size`` to ``origin + (c + 1) * voxel_size``.

    Set by :func:`sparseconv.voxelize` (``origin`` is the lower corner of the point range) and
    carried through strided and transposed convolutions, so that
    :func:`sparseconv.devoxelize` can bring the features of any stage back to points.
    """

    voxel_size: Tuple[float, float, float]
    origin: Tuple[float, float, float]

    def __post_init__(self):
        if len(self.voxel_size) != 3 or len(self.origin) != 3 or min(self.voxel_size) <= 0:
            raise ValueError(f"voxel_size must be 3 positive values and origin 3 values, got {self}")

    def after_conv(self, kernel_size, stride, padding, dilation, transposed: bool) -> "VoxelGeometry":
        """The geometry of a convolution's output grid.

        Output voxel ``o`` is centred where its kernel window is centred: at input-grid position
        ``o * s - p + d (k - 1) / 2`` (``(o + p - d (k - 1) / 2) / s`` for a transposed conv).
        """
        size, origin = [], []
        for vs, org, k, s, p, d in zip(self.voxel_size, self.origin, kernel_size, stride, padding, dilation):
            scale, shift = (1.0 / s, (p - d * (k - 1) / 2) / s) if transposed else (float(s), -p + d * (k - 1) / 2)
            size.append(vs * scale)
            # centre(o) = org + (scale * o + shift + 0.5) * vs = new_origin + (o + 0.5) * vs * scale
            origin.append(org + (shift + 0.5) * vs - 0.5 * vs * scale)
        return VoxelGeometry(tuple(size), tuple(origin))


@dataclass(frozen=True, eq=False)
class ConvRecord:
    """How a strided (or transposed) convolution mapped ``source`` onto ``target``.

    ``nbmap[o, k]`` is the row of ``source`` that offset ``k`` of row ``o`` of
    ``target`` reads (``-1`` if none).
    """

    source: "CoordinateSet"
    target: "CoordinateSet"
    nbmap: torch.Tensor
    kernel_size: Triple
    stride: Triple
    padding: Triple
    dilation: Triple
    transposed: bool


class CoordinateSet:
    """Active sites of a sparse tensor with the caches derived from them (internal)."""

    __slots__ = ("coords", "spatial_shape", "stride", "batch_size", "parent", "keyed", "geometry", "_hash", "_subm",
                 "_strided")

    def __init__(
        self,
        coords: torch.Tensor,
        spatial_shape: Triple,
        stride: Triple,
        batch_size: int,
        parent: Optional[ConvRecord] = None,
        keyed: Optional[Dict[str, ConvRecord]] = None,
        geometry: Optional["VoxelGeometry"] = None,
    ):
        self.coords = coords
        self.spatial_shape = tuple(map(int, spatial_shape))
        self.stride = tuple(map(int, stride))
        self.batch_size = int(batch_size)
        self.parent = parent
        self.keyed = {} if keyed is None else keyed
        self.geometry = geometry
        self._hash = None
        self._subm: Dict[tuple, torch.Tensor] = {}
        self._strided: Dict[tuple, ConvRecord] = {}

    @property
    def num_voxels(self) -> int:
        return self.coords.shape[0]

    @property
    def grid(self) -> list:
        return [self.batch_size, *self.spatial_shape]

    @eager_only
    def hash_table(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The coordinate hash (built on first use; validates range and uniqueness)."""
        if self._hash is None:
            self._hash = ops.hash_build(self.coords, self.grid)
        return self._hash

    @eager_only
    def submanifold_map(self, kernel_size: Triple, dilation: Triple) -> torch.Tensor:
        key = (tuple(kernel_size), tuple(dilation))
        nbmap = self._subm.get(key)
        if nbmap is None:
            keys, values = self.hash_table()
            nbmap = ops.kmap_submanifold(keys, values, self.coords, self.grid, kernel_size, dilation)
            self._subm[key] = nbmap
        return nbmap

    @eager_only
    def strided(
        self,
        kernel_size: Triple,
        stride: Triple,
        padding: Triple,
        dilation: Triple,
        transposed: bool = False,
        output_padding: Triple = (0, 0, 0),
        indice_key: Optional[str] = None,
    ) -> ConvRecord:
        """Output set and kernel map of a strided (``transposed=False``) or transposed convolution."""
        key = (tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation), bool(transposed), tuple(output_padding))
        record = self._strided.get(key)
        if record is None:
            if transposed:
                out_shape = conv_transpose_output_shape(
                    self.spatial_shape, kernel_size, stride, padding, dilation, output_padding
                )
                out_stride = tuple(max(1, t // s) for t, s in zip(self.stride, stride))
            else:
                out_shape = conv_output_shape(self.spatial_shape, kernel_size, stride, padding, dilation)
                out_stride = tuple(t * s for t, s in zip(self.stride, stride))
            out_coords, nbmap = ops.kmap_strided(
                self.coords, self.grid, out_shape, kernel_size, stride, padding, dilation, transposed
            )
            geometry = None
            if self.geometry is not None:
                geometry = self.geometry.after_conv(kernel_size, stride, padding, dilation, transposed)
            target = CoordinateSet(out_coords, out_shape, out_stride, self.batch_size, keyed=self.keyed,
                                   geometry=geometry)
            record = ConvRecord(
                self,
                target,
                nbmap,
                tuple(kernel_size),
                tuple(stride),
                tuple(padding),
                tuple(dilation),
                bool(transposed),
            )
            if not transposed:
                target.parent = record
            self._strided[key] = record
        if indice_key is not None:
            self.keyed[indice_key] = record
        return record

    def inverse_record(self, indice_key: Optional[str], layer: str) -> ConvRecord:
        """The strided conv that an inverse conv on this set undoes."""
        if indice_key is not None:
            record = self.keyed.get(indice_key)
            if record is None:
                known = ", ".join(repr(k) for k in self.keyed) or "none"
                raise ValueError(
                    f"{layer}: no strided convolution was registered under indice_key={indice_key!r} "
                    f"(keys seen for this input: {known}); give the SparseConv3d that it inverts the same indice_key"
                )
            if record.target is not self and not (
                record.target.num_voxels == self.num_voxels and torch.equal(record.target.coords, self.coords)
            ):
                raise ValueError(
                    f"{layer}: indice_key={indice_key!r} belongs to a convolution whose output has "
                    f"{record.target.num_voxels} voxels at stride {record.target.stride}, but the input has "
                    f"{self.num_voxels} voxels at stride {self.stride}"
                )
            return record
        if self.parent is None:
            raise ValueError(
                f"{layer} has nothing to invert: its input (stride {self.stride}, {self.num_voxels} voxels) was not "
                "produced by a strided SparseConv3d/SparseMaxPool3d; apply it to the output of one, or pass the "
                "indice_key of the convolution to invert"
            )
        return self.parent

    def to(self, device: torch.device) -> "CoordinateSet":
        """The same sites on another device (caches are rebuilt there on demand)."""
        if self.coords.device == torch.device(device):
            return self
        return CoordinateSet(self.coords.to(device), self.spatial_shape, self.stride, self.batch_size,
                             geometry=self.geometry)
