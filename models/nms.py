"""Rotated bird's-eye-view IoU and non-maximum suppression in plain torch (any device).

* :func:`boxes_iou_bev`: exact IoU of rotated BEV rectangles (the intersection polygon is the
  convex hull of the corners of each box inside the other and the edge crossings).
* :func:`rotated_nms`: greedy NMS on that IoU (OpenPCDet ``nms_gpu``: a box is suppressed by a
  kept, higher-scoring box when their IoU is ``> iou_threshold``).
* :func:`circle_nms`: CenterPoint's distance NMS on BEV centres.
* :func:`batched_rotated_nms`, :func:`batched_circle_nms`: the same per class label.

Every function returns int64 indices into its input, sorted by score (descending; ties keep the
input order).
"""
from __future__ import annotations

from typing import Mapping, Optional, Union

import numpy as np
import torch

__all__ = ["boxes_iou_bev", "paired_iou_bev", "pairwise_distance", "rotated_nms", "circle_nms", "batched_rotated_nms",
           "batched_circle_nms"]

_CHUNK = 1 << 16  # box pairs per polygon-clipping chunk


def _as_bev(boxes: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[1] not in (5, 7):
        raise ValueError(f"{name} must be [N, 7] (x, y, z, dx, dy, dz, yaw) or [N, 5] (x, y, dx, dy, yaw), "
                         f"got shape {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {boxes.dtype}")
    return boxes if boxes.shape[1] == 5 else boxes[:, [0, 1, 3, 4, 6]]


def _corners(bev: torch.Tensor) -> torch.Tensor:
    """Counter-clockwise corners ``[P, 4, 2]`` of BEV boxes ``[P, 5]``."""
    half = bev.new_tensor([[0.5, 0.5], [-0.5, 0.5], [-0.5, -0.5], [0.5, -0.5]])
    local = half[None] * bev[:, None, 2:4]
    c, s = torch.cos(bev[:, 4])[:, None], torch.sin(bev[:, 4])[:, None]
    x = c * local[..., 0] - s * local[..., 1] + bev[:, None, 0]
    y = s * local[..., 0] + c * local[..., 1] + bev[:, None, 1]
    return torch.stack([x, y], -1)


def pairwise_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact Euclidean distances ``[..., N, M]`` between point sets ``[..., N, D]`` and ``[..., M, D]``
    (``torch.cdist`` without its matrix-product shortcut, which is not exact: identical points can be
    ``1e-8`` apart)."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _inside(points: torch.Tensor, corners: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
    """Whether points ``[P, K, 2]`` lie in the CCW quadrilaterals ``[P, 4, 2]`` (boundary within ``tol``)."""
    edges = corners.roll(-1, 1) - corners  # [P, 4, 2]
    length = edges.norm(dim=-1).clamp_min(torch.finfo(corners.dtype).tiny)  # [P, 4]
    rel = points[:, :, None, :] - corners[:, None, :, :]  # [P, K, 4, 2]
    dist = _cross(edges[:, None], rel) / length[:, None]  # signed distance, left of the edge > 0
    return (dist >= -tol[:, None, None]).all(-1)


def _intersection_area(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection areas ``[P]`` of BEV rectangle pairs ``a[i]``, ``b[i]`` (``[P, 5]``)."""
    ca, cb = _corners(a), _corners(b)
    scale = torch.maximum(a[:, 2:4].amax(1), b[:, 2:4].amax(1))
    tol = scale * (100 * torch.finfo(a.dtype).eps)
    in_a = _inside(cb, ca, tol)  # [P, 4]
    in_b = _inside(ca, cb, tol)
    # edge crossings: p + t r (edges of a) and q + u s (edges of b)
    p, r = ca[:, :, None, :], (ca.roll(-1, 1) - ca)[:, :, None, :]
    q, s = cb[:, None, :, :], (cb.roll(-1, 1) - cb)[:, None, :, :]
    denom = _cross(r, s)  # [P, 4, 4]
    qp = q - p
    ok = denom.abs() > (scale * scale * torch.finfo(a.dtype).eps)[:, None, None]
    safe = torch.where(ok, denom, torch.ones_like(denom))
    t = _cross(qp, s) / safe
    u = _cross(qp, r) / safe
    ok = ok & (t >= 0) & (t <= 1) & (u >= 0) & (u <= 1)
    cross_pts = (p + t[..., None] * r).reshape(-1, 16, 2)
    pts = torch.cat([ca, cb, cross_pts], 1)  # [P, 24, 2]
    valid = torch.cat([in_b, in_a, ok.reshape(-1, 16)], 1)
    count = valid.sum(1)
    w = valid.to(pts.dtype)
    centroid = (pts * w[..., None]).sum(1) / count.clamp_min(1)[:, None].to(pts.dtype)
    d = pts - centroid[:, None]
    angle = torch.atan2(d[..., 1], d[..., 0])
    angle = torch.where(valid, angle, torch.full_like(angle, 10.0))  # invalid points last
    order = angle.argsort(1)
    sp = torch.gather(d, 1, order[..., None].expand(-1, -1, 2))
    sv = torch.gather(valid, 1, order)
    sp = torch.where(sv[..., None], sp, sp[:, :1].expand_as(sp))  # invalid slots repeat the first point
    area = 0.5 * _cross(sp, sp.roll(-1, 1)).sum(1)
    return torch.where(count >= 3, area.clamp_min(0), torch.zeros_like(area))


def paired_iou_bev(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """BEV IoU ``[P]`` of box pairs ``a[i]``, ``b[i]`` (``[P, 7]`` or ``[P, 5]`` each).

    Example:
        >>> a = torch.tensor([[0., 0, 4, 2, 0]], dtype=torch.float64)
        >>> paired_iou_bev(a, torch.tensor([[1., 0, 4, 2, 0]], dtype=torch.float64)).tolist()
        [0.6]
    """
    a, b = _as_bev(a, "a"), _as_bev(b, "b").to(a.dtype)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must have the same number of boxes, got {a.shape[0]} and {b.shape[0]}")
    out = a.new_zeros(a.shape[0])
    if a.shape[0] == 0:
        return out
    live = ((a[:, :2] - b[:, :2]).norm(dim=1) < 0.5 * (a[:, 2:4].norm(dim=1) + b[:, 2:4].norm(dim=1))) \
        & (a[:, 2:4] > 0).all(1) & (b[:, 2:4] > 0).all(1)
    idx = live.nonzero()[:, 0]
    for start in range(0, idx.numel(), _CHUNK):
        sel = idx[start:start + _CHUNK]
        sa, sb = a[sel].clone(), b[sel].clone()
        sb[:, :2] -= sa[:, :2]  # relative to a's centre: exact far from the origin
        sa[:, :2] = 0
        inter = _intersection_area(sa, sb)
        union = sa[:, 2] * sa[:, 3] + sb[:, 2] * sb[:, 3] - inter
        out[sel] = (inter / union.clamp_min(torch.finfo(a.dtype).tiny)).clamp(0, 1)
    return out


def boxes_iou_bev(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bird's-eye-view IoU ``[N, M]`` of every pair of rotated boxes (exact polygon intersection).

    Pairs whose circumscribed circles do not meet are 0 without clipping. Boxes with zero length or
    width have IoU 0.

    Args:
        a: ``[N, 7]`` LiDAR boxes ``(x, y, z, dx, dy, dz, yaw)`` or ``[N, 5]`` ``(x, y, dx, dy, yaw)``.
        b: ``[M, 7]`` or ``[M, 5]``.

    Returns:
        ``[N, M]`` IoU in ``[0, 1]``, ``a``'s dtype and device.

    Example:
        >>> iou = boxes_iou_bev(torch.tensor([[0., 0, 4, 2, 0]]),
        ...                     torch.tensor([[1., 0, 4, 2, 0], [0., 0, 4, 2, torch.pi / 2]]))
        >>> [[round(v, 4) for v in row] for row in iou.tolist()]
        [[0.6, 0.3333]]
    """
    a, b = _as_bev(a, "a"), _as_bev(b, "b").to(a.dtype)
    n, m = a.shape[0], b.shape[0]
    out = a.new_zeros(n, m)
    if n == 0 or m == 0:
        return out
    ra, rb = 0.5 * a[:, 2:4].norm(dim=1), 0.5 * b[:, 2:4].norm(dim=1)
    near = pairwise_distance(a[:, :2], b[:, :2]) < ra[:, None] + rb[None, :]
    i, j = near.nonzero(as_tuple=True)
    if i.numel():
        out[i, j] = paired_iou_bev(a[i], b[j])
    return out


def _check_scores(scores: torch.Tensor, n: int, name: str = "scores") -> None:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or scores.shape[0] != n:
        raise ValueError(f"{name} must be a [N] tensor with N = {n}, got "
                         f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")


def _check_max(value: Optional[int], name: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return int(value)


def _greedy(order: torch.Tensor, i: torch.Tensor, j: torch.Tensor, post_max: Optional[int]) -> torch.Tensor:
    """Greedy suppression over boxes ``0..P-1`` in score order given conflicting pairs ``i < j``."""
    p = order.numel()
    ii, jj = i.cpu().numpy(), j.cpu().numpy()
    srt = np.argsort(ii, kind="stable")
    ii, jj = ii[srt], jj[srt]
    start = np.searchsorted(ii, np.arange(p + 1))
    removed = np.zeros(p, bool)
    keep = []
    for k in range(p):
        if removed[k]:
            continue
        keep.append(k)
        if post_max is not None and len(keep) >= post_max:
            break
        removed[jj[start[k]:start[k + 1]]] = True
    return order[torch.as_tensor(keep, dtype=torch.long, device=order.device)]


def _sorted_top(scores: torch.Tensor, pre_max: Optional[int]) -> torch.Tensor:
    order = torch.sort(scores, descending=True, stable=True).indices
    return order if pre_max is None else order[:pre_max]


def rotated_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, pre_max: Optional[int] = None,
                post_max: Optional[int] = None) -> torch.Tensor:
    """Greedy NMS on rotated BEV IoU (OpenPCDet ``class_agnostic_nms`` with ``nms_gpu``).

    Boxes are sorted by score (descending, stable), the first ``pre_max`` are kept as candidates, and a
    candidate is dropped when its IoU with a kept higher-scoring box is ``> iou_threshold``; at most
    ``post_max`` survive.

    Args:
        boxes: ``[N, 7]`` LiDAR boxes or ``[N, 5]`` BEV boxes.
        scores: ``[N]``.
        iou_threshold: in ``[0, 1]``.
        pre_max, post_max: optional caps (positive ints).

    Returns:
        int64 ``[K]`` indices into ``boxes``, by descending score.

    Example:
        >>> b = torch.tensor([[0., 0, 4, 2, 0], [0.2, 0, 4, 2, 0], [10., 0, 4, 2, 0]])
        >>> rotated_nms(b, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist()
        [0, 2]
    """
    bev = _as_bev(boxes, "boxes")
    _check_scores(scores, bev.shape[0])
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold!r}")
    pre_max, post_max = _check_max(pre_max, "pre_max"), _check_max(post_max, "post_max")
    order = _sorted_top(scores, pre_max)
    if order.numel() == 0:
        return order
    with torch.no_grad():
        cand = bev[order].detach()
        ra = 0.5 * cand[:, 2:4].norm(dim=1)
        near = pairwise_distance(cand[:, :2], cand[:, :2]) < ra[:, None] + ra[None, :]
        near = torch.triu(near, diagonal=1)
        i, j = near.nonzero(as_tuple=True)
        if i.numel():
            conflict = paired_iou_bev(cand[i], cand[j]) > float(iou_threshold)
            i, j = i[conflict], j[conflict]
    return _greedy(order, i, j, post_max)


def circle_nms(centers: torch.Tensor, scores: torch.Tensor, min_radius: float,
               post_max: Optional[int] = None) -> torch.Tensor:
    """CenterPoint's circle NMS: greedy suppression of centres within ``min_radius`` of a kept one.

    A candidate is dropped when its BEV distance to a kept, higher-scoring centre is ``<= min_radius``
    (metres). CenterPoint's ``circle_nms`` compares the *squared* distance with its ``min_radius``
    values; pass ``sqrt`` of those to reproduce it.

    Args:
        centers: ``[N, >= 2]`` (x, y first; boxes ``[N, 7]`` work).
        scores: ``[N]``.
        min_radius: non-negative distance in metres.
        post_max: optional cap on the kept count.

    Returns:
        int64 ``[K]`` indices into ``centers``, by descending score.

    Example:
        >>> c = torch.tensor([[0., 0], [0.5, 0], [3., 0]])
        >>> circle_nms(c, torch.tensor([0.5, 0.9, 0.7]), 1.0).tolist()
        [1, 2]
    """
    if not isinstance(centers, torch.Tensor) or centers.dim() != 2 or centers.shape[1] < 2:
        raise ValueError(f"centers must be [N, >= 2] (x, y, ...), got "
                         f"{tuple(centers.shape) if isinstance(centers, torch.Tensor) else type(centers).__name__}")
    _check_scores(scores, centers.shape[0])
    if not float(min_radius) >= 0:
        raise ValueError(f"min_radius must be >= 0, got {min_radius!r}")
    post_max = _check_max(post_max, "post_max")
    order = _sorted_top(scores, None)
    if order.numel() == 0:
        return order
    with torch.no_grad():
        c = centers[order, :2].detach()
        close = torch.triu(pairwise_distance(c, c) <= float(min_radius), diagonal=1)
        i, j = close.nonzero(as_tuple=True)
    return _greedy(order, i, j, post_max)


def _per_class(labels: torch.Tensor, scores: torch.Tensor, run, post_max: Optional[int]) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.shape != scores.shape:
        raise ValueError(f"labels must be a [N] tensor like scores {tuple(scores.shape)}, got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    kept = [run(idx, int(c)) for c in labels.unique().tolist() for idx in [(labels == c).nonzero()[:, 0]]]
    if not kept:
        return labels.new_zeros(0, dtype=torch.long)
    keep = torch.cat(kept).sort().values  # by index, so that equal scores keep the input order
    keep = keep[torch.sort(scores[keep], descending=True, stable=True).indices]
    return keep if post_max is None else keep[:post_max]


def batched_rotated_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float,
                        pre_max: Optional[int] = None, post_max: Optional[int] = None) -> torch.Tensor:
    """Class-aware :func:`rotated_nms`: boxes of different ``labels`` never suppress each other.

    ``pre_max`` and ``post_max`` apply per class (OpenPCDet ``multi_classes_nms``); the union is sorted
    by score (ties by index).

    Returns:
        int64 ``[K]`` indices into ``boxes``, by descending score.

    Example:
        >>> b = torch.tensor([[0., 0, 4, 2, 0], [0.2, 0, 4, 2, 0]])
        >>> batched_rotated_nms(b, torch.tensor([0.9, 0.8]), torch.tensor([1, 2]), 0.5).tolist()
        [0, 1]
    """
    _as_bev(boxes, "boxes")
    _check_scores(scores, boxes.shape[0])

    def run(idx, _):
        return idx[rotated_nms(boxes[idx], scores[idx], iou_threshold, pre_max, post_max)]

    return _per_class(labels, scores, run, None)


def batched_circle_nms(centers: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                       min_radius: Union[float, Mapping[int, float]], post_max: Optional[int] = None) -> torch.Tensor:
    """Class-aware :func:`circle_nms`; ``min_radius`` is one distance or a ``{label: distance}`` map.

    ``post_max`` applies per class; the union is sorted by score (ties by index).

    Example:
        >>> c = torch.tensor([[0., 0], [0.5, 0]])
        >>> batched_circle_nms(c, torch.tensor([0.9, 0.8]), torch.tensor([1, 1]), {1: 1.0}).tolist()
        [0]
    """
    if not isinstance(centers, torch.Tensor) or centers.dim() != 2:
        raise ValueError(f"centers must be [N, >= 2], got {getattr(centers, 'shape', type(centers).__name__)}")
    _check_scores(scores, centers.shape[0])

    def run(idx, c):
        if isinstance(min_radius, Mapping):
            if c not in min_radius:
                raise ValueError(f"min_radius has no entry for label {c} (keys: {sorted(min_radius)})")
            r = min_radius[c]
        else:
            r = min_radius
        return idx[circle_nms(centers[idx], scores[idx], r, post_max)]

    return _per_class(labels, scores, run, None)
