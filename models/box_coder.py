"""Box encodings for detection heads: SECOND's anchor residuals and CenterPoint's cell targets.

Boxes are LiDAR boxes ``[..., 7]`` rows ``x, y, z, dx, dy, dz, yaw`` (``z`` the box centre, ``dx``
the length along the heading, yaw around +z; see ``sparseconv.datasets.boxes``).

* :class:`ResidualCoder` (OpenPCDet ``ResidualCoder``): residuals of a box with respect to an anchor,
  ``(x_g - x_a) / d_a``, ``(y_g - y_a) / d_a``, ``(z_g - z_a) / dz_a`` (``d_a`` the anchor's BEV
  diagonal), ``log(dx_g / dx_a)``, ``log(dy_g / dy_a)``, ``log(dz_g / dz_a)`` and the yaw residual
  ``yaw_g - yaw_a`` (or ``cos yaw_g - cos yaw_a``, ``sin yaw_g - sin yaw_a``).
* :func:`encode_center_targets` / :func:`decode_center_boxes` (CenterPoint / OpenPCDet
  ``CenterHead``): a box as seen from its BEV cell: the centre's offset within the cell, ``z``,
  the log sizes and ``cos yaw``, ``sin yaw``.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

# Log-size codes are clamped here before exp: an untrained or diverged network must not produce
# infinite box sizes (the metrics reject non-finite boxes). e^10 is far beyond any real ratio.
_MAX_LOG = 10.0

__all__ = ["ResidualCoder", "limit_period", "center_cell", "encode_center_targets", "decode_center_boxes"]


def limit_period(angle: torch.Tensor, offset: float = 0.5, period: float = 2 * torch.pi) -> torch.Tensor:
    """Wraps angles into ``[-offset * period, (1 - offset) * period)`` (default ``[-pi, pi)``).

    Example:
        >>> limit_period(torch.tensor([3.5, -3.5])).tolist()   # doctest: +ELLIPSIS
        [-2.78..., 2.78...]
    """
    return angle - torch.floor(angle / period + offset) * period


def _check_boxes(t: torch.Tensor, name: str, width: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if t.dim() < 1 or t.shape[-1] != width:
        raise ValueError(f"{name} must be [..., {width}], got shape {tuple(t.shape)}")


class ResidualCoder:
    """SECOND's anchor residual coder (OpenPCDet ``ResidualCoder``).

    ``encode(boxes, anchors)`` and ``decode(deltas, anchors)`` are exact inverses: with the plain yaw
    residual ``decode(encode(b, a), a) == b`` (up to rounding); with ``encode_angle_by_sincos`` the
    decoded yaw is ``atan2`` of the reconstructed sine and cosine, i.e. ``b``'s yaw wrapped to
    ``(-pi, pi]``. Sizes are clamped to ``>= 1e-5`` before taking logarithms.

    Args:
        encode_angle_by_sincos: encode the yaw as ``(cos yaw_g - cos yaw_a, sin yaw_g - sin yaw_a)``
            (``code_size`` 8) instead of ``yaw_g - yaw_a`` (``code_size`` 7).

    Shape:
        boxes, anchors: ``[..., 7]`` (broadcastable); deltas: ``[..., code_size]``.

    Example:
        >>> coder = ResidualCoder()
        >>> a = torch.tensor([[0.0, 0.0, -1.0, 3.9, 1.6, 1.56, 0.0]])
        >>> g = torch.tensor([[0.5, 0.2, -0.9, 4.2, 1.7, 1.5, 0.1]])
        >>> torch.allclose(coder.decode(coder.encode(g, a), a), g)
        True
    """

    def __init__(self, encode_angle_by_sincos: bool = False):
        self.encode_angle_by_sincos = bool(encode_angle_by_sincos)
        self.code_size = 8 if self.encode_angle_by_sincos else 7

    def __repr__(self) -> str:
        return f"ResidualCoder(encode_angle_by_sincos={self.encode_angle_by_sincos})"

    def encode(self, boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Residuals ``[..., code_size]`` of ``boxes`` ``[..., 7]`` with respect to ``anchors`` ``[..., 7]``."""
        _check_boxes(boxes, "boxes", 7)
        _check_boxes(anchors, "anchors", 7)
        xa, ya, za, dxa, dya, dza, ra = torch.unbind(anchors, -1)
        xg, yg, zg, dxg, dyg, dzg, rg = torch.unbind(boxes, -1)
        dxa, dya, dza = dxa.clamp_min(1e-5), dya.clamp_min(1e-5), dza.clamp_min(1e-5)
        dxg, dyg, dzg = dxg.clamp_min(1e-5), dyg.clamp_min(1e-5), dzg.clamp_min(1e-5)
        diagonal = torch.sqrt(dxa ** 2 + dya ** 2)
        out = [(xg - xa) / diagonal, (yg - ya) / diagonal, (zg - za) / dza,
               torch.log(dxg / dxa), torch.log(dyg / dya), torch.log(dzg / dza)]
        if self.encode_angle_by_sincos:
            out += [torch.cos(rg) - torch.cos(ra), torch.sin(rg) - torch.sin(ra)]
        else:
            out.append(rg - ra)
        return torch.stack(out, -1)

    def decode(self, deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Boxes ``[..., 7]`` from residuals ``[..., code_size]`` and ``anchors`` ``[..., 7]``."""
        _check_boxes(deltas, "deltas", self.code_size)
        _check_boxes(anchors, "anchors", 7)
        xa, ya, za, dxa, dya, dza, ra = torch.unbind(anchors, -1)
        dxa, dya, dza = dxa.clamp_min(1e-5), dya.clamp_min(1e-5), dza.clamp_min(1e-5)
        t = torch.unbind(deltas, -1)
        diagonal = torch.sqrt(dxa ** 2 + dya ** 2)
        if self.encode_angle_by_sincos:
            rg = torch.atan2(t[7] + torch.sin(ra), t[6] + torch.cos(ra))
        else:
            rg = t[6] + ra
        return torch.stack([t[0] * diagonal + xa, t[1] * diagonal + ya, t[2] * dza + za,
                            torch.exp(t[3].clamp(max=_MAX_LOG)) * dxa, torch.exp(t[4].clamp(max=_MAX_LOG)) * dya,
                            torch.exp(t[5].clamp(max=_MAX_LOG)) * dza, rg], -1)


def _bev_params(point_range: Sequence[float], voxel_size: Sequence[float], stride: int):
    if len(point_range) != 6:
        raise ValueError(f"point_range must be 6 floats (x0, y0, z0, x1, y1, z1), got {point_range!r}")
    if len(voxel_size) < 2 or min(float(v) for v in voxel_size[:2]) <= 0:
        raise ValueError(f"voxel_size must have positive x and y sizes, got {voxel_size!r}")
    if int(stride) < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    cell = (float(voxel_size[0]) * int(stride), float(voxel_size[1]) * int(stride))
    return (float(point_range[0]), float(point_range[1])), cell


def center_cell(boxes: torch.Tensor, point_range: Sequence[float], voxel_size: Sequence[float], stride: int,
                map_size: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The BEV cell of each box centre, as OpenPCDet ``CenterHead`` assigns it.

    The continuous cell coordinate is ``(x - x0) / (voxel_x * stride)`` (same for y), clamped to
    ``[0, size - 0.5]`` so that a centre on the far edge of the range stays in the map.

    Args:
        boxes: ``[M, >= 7]`` LiDAR boxes.
        point_range: ``(x0, y0, z0, x1, y1, z1)``.
        voxel_size: ``(vx, vy, vz)``.
        stride: feature map stride in voxels.
        map_size: BEV map size ``(X, Y)`` in cells.

    Returns:
        ``(center, cell)``: the continuous cell coordinates ``[M, 2]`` (x, y) and the integer cells
        ``[M, 2]`` int64 (their floor).

    Example:
        >>> boxes = torch.tensor([[1.5, 0.5, 0, 1, 1, 1, 0.]])
        >>> c, i = center_cell(boxes, (0, 0, -3, 8, 8, 1), (0.5, 0.5, 0.1), 2, (8, 8))
        >>> c.tolist(), i.tolist()
        ([[1.5, 0.5]], [[1, 0]])
    """
    origin, cell = _bev_params(point_range, voxel_size, stride)
    cx = ((boxes[:, 0] - origin[0]) / cell[0]).clamp(0, map_size[0] - 0.5)
    cy = ((boxes[:, 1] - origin[1]) / cell[1]).clamp(0, map_size[1] - 0.5)
    center = torch.stack([cx, cy], -1)
    return center, torch.floor(center).long()


def encode_center_targets(boxes: torch.Tensor, cells: torch.Tensor, point_range: Sequence[float],
                          voxel_size: Sequence[float], stride: int) -> torch.Tensor:
    """CenterPoint regression targets ``[M, 8]`` of ``boxes`` seen from BEV ``cells``.

    Codes: ``offset_x, offset_y`` (the centre's position in the cell, in cells: ``(x - x0) / cell_x
    - i``), ``z``, ``log dx, log dy, log dz``, ``cos yaw, sin yaw`` (OpenPCDet's order).

    Args:
        boxes: ``[M, >= 7]`` LiDAR boxes.
        cells: int ``[M, 2]`` cell indices ``(i, j)`` along x and y (usually :func:`center_cell`).
        point_range, voxel_size, stride: the BEV map's geometry (cell size ``voxel_size * stride``).

    Returns:
        ``[M, 8]`` codes; :func:`decode_center_boxes` inverts them.

    Example:
        >>> b = torch.tensor([[1.3, 0.5, -1.0, 4.0, 2.0, 1.5, 0.3]])
        >>> t = encode_center_targets(b, torch.tensor([[1, 0]]), (0, 0, -3, 8, 8, 1), (0.5, 0.5, 0.1), 2)
        >>> torch.allclose(decode_center_boxes(t, torch.tensor([[1, 0]]), (0, 0, -3, 8, 8, 1), (0.5, 0.5, 0.1), 2), b)
        True
    """
    _check_boxes(boxes[..., :7], "boxes", 7)
    origin, cell = _bev_params(point_range, voxel_size, stride)
    c = cells.to(boxes.dtype)
    off_x = (boxes[:, 0] - origin[0]) / cell[0] - c[:, 0]
    off_y = (boxes[:, 1] - origin[1]) / cell[1] - c[:, 1]
    size = torch.log(boxes[:, 3:6].clamp_min(1e-5))
    return torch.cat([off_x[:, None], off_y[:, None], boxes[:, 2:3], size,
                      torch.cos(boxes[:, 6:7]), torch.sin(boxes[:, 6:7])], 1)


def decode_center_boxes(codes: torch.Tensor, cells: torch.Tensor, point_range: Sequence[float],
                        voxel_size: Sequence[float], stride: int) -> torch.Tensor:
    """LiDAR boxes ``[..., 7]`` from CenterPoint codes ``[..., 8]`` predicted at BEV ``cells`` ``[..., 2]``.

    ``x = x0 + (i + offset_x) * cell_x`` (same for y), sizes ``exp`` of the log sizes,
    ``yaw = atan2(sin, cos)`` (in ``(-pi, pi]``). The exact inverse of :func:`encode_center_targets`.

    Example:
        >>> codes = torch.tensor([[0.5, 0.5, -1.0, 0.0, 0.0, 0.0, 1.0, 0.0]])
        >>> decode_center_boxes(codes, torch.tensor([[2, 3]]), (0, 0, -3, 8, 8, 1), (0.5, 0.5, 0.1), 2).tolist()
        [[2.5, 3.5, -1.0, 1.0, 1.0, 1.0, 0.0]]
    """
    _check_boxes(codes, "codes", 8)
    origin, cell = _bev_params(point_range, voxel_size, stride)
    c = cells.to(codes.dtype)
    x = origin[0] + (c[..., 0] + codes[..., 0]) * cell[0]
    y = origin[1] + (c[..., 1] + codes[..., 1]) * cell[1]
    yaw = torch.atan2(codes[..., 7], codes[..., 6])
    return torch.cat([x[..., None], y[..., None], codes[..., 2:3], torch.exp(codes[..., 3:6].clamp(max=_MAX_LOG)), yaw[..., None]], -1)
