"""3D boxes in the LiDAR frame: ``[M, 7]`` rows ``x, y, z, dx, dy, dz, yaw``.

``x, y, z`` is the box centre, ``dx`` the length along the heading, ``dy`` the width across it,
``dz`` the height, ``yaw`` the heading around +z (0 faces +x, counter-clockwise positive), in
``[-pi, pi)`` (OpenPCDet's convention).

Example:
    >>> boxes = np.array([[10.0, 0.0, -1.0, 4.0, 2.0, 1.5, 0.0]])
    >>> points_in_boxes(np.array([[11.9, 0.9, -0.3], [12.1, 0.0, -1.0]]), boxes)[:, 0].tolist()
    [True, False]
"""
from __future__ import annotations

import numpy as np

__all__ = ["limit_period", "box_corners_bev", "boxes_bev_bounds", "points_in_boxes", "boxes_bev_overlap"]


def limit_period(angle, offset: float = 0.5, period: float = 2 * np.pi) -> np.ndarray:
    """Wraps angles into ``[-offset * period, (1 - offset) * period)``; the default gives ``[-pi, pi)``."""
    angle = np.asarray(angle, np.float64)
    return angle - np.floor(angle / period + offset) * period


def _as_boxes(boxes) -> np.ndarray:
    b = np.asarray(boxes, np.float64)
    if b.ndim == 1 and b.shape[0] >= 7:  # a single box
        b = b[None]
    if b.ndim != 2 or b.shape[1] < 7:
        raise ValueError(f"boxes must be [M, 7] (x, y, z, dx, dy, dz, yaw), got shape {np.shape(boxes)}")
    return b


def box_corners_bev(boxes) -> np.ndarray:
    """The 4 ground-plane corners ``[M, 4, 2]`` (x, y) of boxes ``[M, 7]``: front-left first, counter-clockwise.

    Example:
        >>> box_corners_bev(np.array([[0, 0, 0, 4, 2, 1, 0]]))[0].tolist()
        [[2.0, 1.0], [-2.0, 1.0], [-2.0, -1.0], [2.0, -1.0]]
    """
    b = _as_boxes(boxes)
    half = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], np.float64) * 0.5
    local = half[None] * b[:, None, 3:5]  # dx along the heading, dy across
    c, s = np.cos(b[:, 6]), np.sin(b[:, 6])
    rot = np.stack([np.stack([c, -s], 1), np.stack([s, c], 1)], 1)  # [M, 2, 2]
    return np.einsum("mij,mkj->mki", rot, local) + b[:, None, :2]


def boxes_bev_bounds(boxes) -> np.ndarray:
    """Axis-aligned bird's-eye-view bounds ``[M, 4]`` (x_min, y_min, x_max, y_max) of rotated boxes."""
    corners = box_corners_bev(boxes)
    return np.concatenate([corners.min(1), corners.max(1)], 1)


def points_in_boxes(points, boxes, margin: float = 0.0) -> np.ndarray:
    """Which points lie in which boxes (faces included): bool ``[N, M]``.

    A point is inside when its coordinates in the box frame (centre at the origin, x along the
    heading) satisfy ``|local| <= dims / 2 + margin`` on all three axes.

    Args:
        points: ``[N, >= 3]`` (x, y, z first).
        boxes: ``[M, 7]``.
        margin: metres added to every half size (negative shrinks the boxes).

    Example:
        >>> points_in_boxes(np.array([[0.0, 0.0, 0.0]]), np.array([[0, 0, 0, 1, 1, 1, 0.3]])).tolist()
        [[True]]
    """
    p = np.asarray(points)
    if p.ndim != 2 or p.shape[1] < 3:
        raise ValueError(f"points must be [N, >= 3], got shape {p.shape}")
    b = _as_boxes(boxes)
    xyz = p[:, :3].astype(np.float64)
    out = np.zeros((len(xyz), len(b)), bool)
    for j, box in enumerate(b):  # one box at a time: [N] temporaries only
        d = xyz - box[:3]
        c, s = np.cos(box[6]), np.sin(box[6])
        half = box[3:6] / 2 + margin
        out[:, j] = ((np.abs(d[:, 0] * c + d[:, 1] * s) <= half[0]) & (np.abs(-d[:, 0] * s + d[:, 1] * c) <= half[1])
                     & (np.abs(d[:, 2]) <= half[2]))
    return out


def boxes_bev_overlap(boxes_a, boxes_b, tolerance: float = 1e-6) -> np.ndarray:
    """Whether the bird's-eye-view rectangles of two box sets overlap: bool ``[A, B]``.

    Exact for rotated rectangles (separating-axis test on the 2 edge directions of each box).
    Rectangles that only touch, or overlap by less than ``tolerance`` metres along some axis,
    do not count as overlapping.

    Example:
        >>> a = np.array([[0, 0, 0, 2, 2, 1, 0]])
        >>> b = np.array([[1.5, 0, 0, 2, 2, 1, np.pi / 4], [3.5, 0, 0, 2, 2, 1, 0]])
        >>> boxes_bev_overlap(a, b).tolist()
        [[True, False]]
    """
    a, b = _as_boxes(boxes_a), _as_boxes(boxes_b)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), bool)
    ca, cb = box_corners_bev(a), box_corners_bev(b)  # [A, 4, 2], [B, 4, 2]

    def axes(boxes):  # unit heading and its normal, [M, 2, 2]
        c, s = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
        return np.stack([np.stack([c, s], 1), np.stack([-s, c], 1)], 1)

    ax = np.concatenate([np.broadcast_to(axes(a)[:, None], (len(a), len(b), 2, 2)),
                         np.broadcast_to(axes(b)[None], (len(a), len(b), 2, 2))], 2)  # [A, B, 4, 2]
    pa = np.einsum("acd,abkd->abkc", ca, ax)  # [A, B, 4 axes, 4 corners]
    pb = np.einsum("bcd,abkd->abkc", cb, ax)
    separated = (pa.max(-1) <= pb.min(-1) + tolerance) | (pb.max(-1) <= pa.min(-1) + tolerance)
    return ~separated.any(-1)
