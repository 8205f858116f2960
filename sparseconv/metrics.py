"""Evaluation metrics: rotated-box IoU, KITTI detection AP and semantic-segmentation IoU.

Everything here is NumPy; torch tensors are accepted wherever an array is and are converted
(``.detach().cpu().numpy()``). Results are NumPy arrays / Python floats.

**Boxes** are in the LiDAR frame unless said otherwise: x forward, y left, z up; a 3D box is
``(x, y, z, dx, dy, dz, yaw)`` with ``(x, y, z)`` the box *centre*, ``dx`` the length along the
heading, ``dy`` the width, ``dz`` the height and ``yaw`` the heading angle around +z (0 faces +x).
A bird's-eye-view (BEV) box is ``(x, y, dx, dy, yaw)``.

* :func:`box_iou_bev`, :func:`box_iou_3d`: exact IoU of rotated boxes (the two rectangles are
  clipped against each other with Sutherland-Hodgman, the area is the shoelace formula; the 3D
  IoU is the BEV intersection times the z overlap over the union of the volumes). Vectorised over
  all pairs; pairs whose bounding circles are apart are skipped.
* :func:`kitti_eval`, :func:`format_kitti_table`: KITTI object-detection AP (BEV and 3D, R40 and
  R11) following the official devkit (``evaluate_object_3d_offline.cpp``) and OpenPCDet's
  ``kitti_object_eval_python``; see :func:`kitti_eval` for the protocol.
* :func:`confusion_matrix`, :func:`iou_per_class`, :func:`mean_iou`, :class:`SegmentationMeter`:
  semantic segmentation.

Example:
    >>> import numpy as np
    >>> a = np.array([[0.0, 0.0, 0.0, 4.0, 2.0, 2.0, 0.0]])
    >>> b = np.array([[1.0, 0.0, 0.0, 4.0, 2.0, 2.0, 0.0]])
    >>> float(box_iou_3d(a, b)[0, 0])        # 3 x 2 x 2 = 12 / (16 + 16 - 12)
    0.6
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "box_iou_bev",
    "box_iou_3d",
    "camera_boxes_to_lidar_frame",
    "kitti_eval",
    "format_kitti_table",
    "KITTI_CLASSES",
    "KITTI_DIFFICULTIES",
    "KITTI_OVERLAPS",
    "confusion_matrix",
    "iou_per_class",
    "mean_iou",
    "SegmentationMeter",
]

_CHUNK = 1 << 16  # pairs clipped at once (bounds the temporary memory to a few tens of MB)


def _np(x: Any, dtype=None) -> np.ndarray:
    """``x`` as a NumPy array (torch tensors are detached and moved to the CPU)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x) if dtype is None else np.asarray(x, dtype=dtype)


# =============================================================================== rotated-box IoU
def _as_boxes(x: Any, what: str, allowed: Tuple[int, ...]) -> np.ndarray:
    try:
        arr = _np(x, np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what}: expected a numeric array of boxes, got {type(x).__name__} ({e})") from None
    if arr.ndim == 1 and arr.size == 0:
        arr = arr.reshape(0, allowed[0])
    if arr.ndim != 2 or arr.shape[1] not in allowed:
        cols = " or ".join(str(c) for c in allowed)
        raise ValueError(f"{what}: expected shape [N, {cols}], got {tuple(arr.shape)}")
    return arr


def _check_finite_dims(arr: np.ndarray, dim_cols: Sequence[int], what: str) -> None:
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{what}: box {i} has a non-finite value: {arr[i].tolist()}")
    neg = (arr[:, list(dim_cols)] < 0).any(axis=1)
    if neg.any():
        i = int(np.flatnonzero(neg)[0])
        raise ValueError(f"{what}: box {i} has a negative size: {arr[i].tolist()}")


def _corners(bev: np.ndarray) -> np.ndarray:
    """Counter-clockwise corners ``[P, 4, 2]`` of BEV boxes ``[P, 5]`` (x, y, dx, dy, yaw)."""
    half = np.array([[0.5, 0.5], [-0.5, 0.5], [-0.5, -0.5], [0.5, -0.5]])
    local = half[None] * bev[:, None, 2:4]
    c, s = np.cos(bev[:, 4])[:, None], np.sin(bev[:, 4])[:, None]
    x = c * local[..., 0] - s * local[..., 1] + bev[:, None, 0]
    y = s * local[..., 0] + c * local[..., 1] + bev[:, None, 1]
    return np.stack([x, y], axis=-1)


def _clip_area(subject: np.ndarray, clip: np.ndarray) -> np.ndarray:
    """Area of ``subject ∩ clip`` for convex CCW quadrilaterals ``[P, 4, 2]`` (Sutherland-Hodgman).

    The subject polygon is clipped by the four half-planes to the left of the clip polygon's
    edges. Polygons are padded arrays ``[P, K, 2]`` with vertex counts ``n [P]``; each vertex
    emits itself when inside and the edge's crossing point when the edge crosses the line, and
    the emitted points are compacted with a stable sort.
    """
    P = subject.shape[0]
    poly = subject
    n = np.full(P, 4, np.int64)
    rows = np.arange(P)[:, None]
    for e in range(4):
        p0 = clip[:, e][:, None, :]
        d = clip[:, (e + 1) % 4][:, None, :] - p0
        K = poly.shape[1]
        idx = np.arange(K)[None, :]
        valid = idx < n[:, None]
        nxt = np.where(idx + 1 < n[:, None], idx + 1, 0)
        q = poly[rows, nxt]
        s = d[..., 0] * (poly[..., 1] - p0[..., 1]) - d[..., 1] * (poly[..., 0] - p0[..., 0])
        sq = s[rows, nxt]
        inside = s >= 0
        crosses = (inside != (sq >= 0)) & valid
        t = s / np.where(crosses, s - sq, 1.0)
        x = poly + t[..., None] * (q - poly)
        pts = np.stack([poly, x], axis=2).reshape(P, 2 * K, 2)
        keep = np.stack([inside & valid, crosses], axis=2).reshape(P, 2 * K)
        order = np.argsort(~keep, axis=1, kind="stable")
        n = keep.sum(axis=1)
        width = max(int(n.max(initial=0)), 1)
        poly = pts[rows, order[:, :width]]
    K = poly.shape[1]
    idx = np.arange(K)[None, :]
    nxt = np.where(idx + 1 < n[:, None], idx + 1, 0)
    q = poly[rows, nxt]
    terms = poly[..., 0] * q[..., 1] - q[..., 0] * poly[..., 1]
    area = 0.5 * np.where(idx < n[:, None], terms, 0.0).sum(axis=1)
    return np.where(n >= 3, np.maximum(area, 0.0), 0.0)


def _bev_intersection_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection areas ``[P]`` of BEV box pairs ``a[i], b[i]`` (``[P, 5]`` each)."""
    out = np.zeros(len(a))
    if len(a) == 0:
        return out
    ra = 0.5 * np.hypot(a[:, 2], a[:, 3])
    rb = 0.5 * np.hypot(b[:, 2], b[:, 3])
    dist = np.hypot(a[:, 0] - b[:, 0], a[:, 1] - b[:, 1])
    live = (dist < ra + rb) & (a[:, 2] > 0) & (a[:, 3] > 0) & (b[:, 2] > 0) & (b[:, 3] > 0)
    live_idx = np.flatnonzero(live)
    for start in range(0, len(live_idx), _CHUNK):
        sel = live_idx[start:start + _CHUNK]
        # Work relative to the first box's centre: keeps far-away boxes (e.g. x = 1e4) exact.
        ca, cb = a[sel].copy(), b[sel].copy()
        cb[:, :2] -= ca[:, :2]
        ca[:, :2] = 0.0
        out[sel] = _clip_area(_corners(ca), _corners(cb))
    return out


def _z_overlap_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Overlap ``[P]`` of the z extents of LiDAR box pairs ``[P, 7]`` (z = centre)."""
    top = np.minimum(a[:, 2] + 0.5 * a[:, 5], b[:, 2] + 0.5 * b[:, 5])
    bottom = np.maximum(a[:, 2] - 0.5 * a[:, 5], b[:, 2] - 0.5 * b[:, 5])
    return np.maximum(top - bottom, 0.0)


def _to_bev(boxes: np.ndarray) -> np.ndarray:
    return boxes if boxes.shape[1] == 5 else boxes[:, [0, 1, 3, 4, 6]]


def camera_boxes_to_lidar_frame(boxes: Any) -> np.ndarray:
    """KITTI rectified-camera boxes as boxes in a LiDAR-like frame with the same overlaps.

    Camera boxes are OpenPCDet's ``boxes3d_camera`` ``[N, 7]``: ``(x, y, z, l, h, w, ry)`` with
    ``(x, y, z)`` the *bottom* centre in the rectified camera frame (x right, y down, z forward)
    and ``ry`` the rotation around the camera y axis (KITTI ``label_2`` order is ``h w l`` for
    the dimensions). The result is ``(x, z, -(y - h/2), l, w, h, -ry)``: the ground plane is the
    camera x-z plane, height points up. It is *not* the real LiDAR frame (no calibration is
    applied), but every IoU between two such boxes equals the IoU of the camera boxes, which is
    what the KITTI devkit computes.

    Args:
        boxes: ``[N, 7]`` camera boxes.

    Returns:
        ``[N, 7]`` float64 boxes for :func:`box_iou_bev` / :func:`box_iou_3d`.

    Example:
        >>> camera_boxes_to_lidar_frame([[1.0, 1.6, 10.0, 4.0, 1.5, 1.8, 0.0]]).tolist()
        [[1.0, 10.0, -0.8500000000000001, 4.0, 1.8, 1.5, -0.0]]
    """
    c = _as_boxes(boxes, "camera_boxes_to_lidar_frame", (7,))
    return np.column_stack([c[:, 0], c[:, 2], -(c[:, 1] - 0.5 * c[:, 4]), c[:, 3], c[:, 5], c[:, 4], -c[:, 6]])


def _pairwise(a: np.ndarray, b: np.ndarray, volume: bool) -> np.ndarray:
    N, M = len(a), len(b)
    rows = max(1, (1 << 20) // max(M, 1))  # at most ~1M pairs in flight
    if N > rows:
        return np.concatenate([_pairwise(a[i:i + rows], b, volume) for i in range(0, N, rows)], axis=0)
    ia, ib = np.repeat(np.arange(N), M), np.tile(np.arange(M), N)
    inter = _bev_intersection_pairs(_to_bev(a)[ia], _to_bev(b)[ib])
    if volume:
        inter = inter * _z_overlap_pairs(a[ia], b[ib])
        va, vb = a[:, 3] * a[:, 4] * a[:, 5], b[:, 3] * b[:, 4] * b[:, 5]
    else:
        ab, bb = _to_bev(a), _to_bev(b)
        va, vb = ab[:, 2] * ab[:, 3], bb[:, 2] * bb[:, 3]
    union = va[ia] + vb[ib] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return np.clip(iou, 0.0, 1.0).reshape(N, M)


def box_iou_bev(a: Any, b: Any, frame: str = "lidar") -> np.ndarray:
    """Bird's-eye-view IoU of every pair of rotated boxes.

    Args:
        a: ``[N, 5]`` BEV boxes ``(x, y, dx, dy, yaw)`` or ``[N, 7]`` 3D LiDAR boxes
            ``(x, y, z, dx, dy, dz, yaw)`` (z and dz unused). With ``frame="camera"``: ``[N, 7]``
            KITTI camera boxes ``(x, y, z, l, h, w, ry)`` (see :func:`camera_boxes_to_lidar_frame`).
        b: ``[M, 5]`` or ``[M, 7]``, the same.
        frame: ``"lidar"`` (default) or ``"camera"``.

    Returns:
        ``[N, M]`` float64 IoU in ``[0, 1]``. Boxes of zero length or width have IoU 0.

    Raises:
        ValueError: wrong shapes, non-finite values, negative sizes or an unknown ``frame``.

    Example:
        >>> box_iou_bev([[0, 0, 4, 2, 0]], [[1, 0, 4, 2, 0], [0, 0, 4, 2, np.pi / 2]]).round(4).tolist()
        [[0.6, 0.3333]]
    """
    a, b = _prepare_pair(a, b, frame, "box_iou_bev", (5, 7))
    return _pairwise(a, b, volume=False)


def box_iou_3d(a: Any, b: Any, frame: str = "lidar") -> np.ndarray:
    """3D IoU of every pair of boxes rotated around the vertical axis.

    IoU = BEV intersection area × overlap of the vertical extents / union of the volumes.

    Args:
        a: ``[N, 7]`` LiDAR boxes ``(x, y, z, dx, dy, dz, yaw)``, ``z`` the box centre. With
            ``frame="camera"``: KITTI camera boxes ``(x, y, z, l, h, w, ry)`` with ``y`` the
            bottom (see :func:`camera_boxes_to_lidar_frame`).
        b: ``[M, 7]``, the same.
        frame: ``"lidar"`` (default) or ``"camera"``.

    Returns:
        ``[N, M]`` float64 IoU in ``[0, 1]``; boxes with a zero size have IoU 0.

    Raises:
        ValueError: wrong shapes, non-finite values, negative sizes or an unknown ``frame``.

    Example:
        >>> box_iou_3d([[0, 0, 0, 4, 2, 2, 0]], [[0, 0, 1, 4, 2, 2, 0]]).tolist()   # 8 / 24
        [[0.3333333333333333]]
    """
    a, b = _prepare_pair(a, b, frame, "box_iou_3d", (7,))
    return _pairwise(a, b, volume=True)


def _prepare_pair(a, b, frame, fn, allowed) -> Tuple[np.ndarray, np.ndarray]:
    if frame not in ("lidar", "camera"):
        raise ValueError(f"{fn}: frame must be 'lidar' or 'camera', got {frame!r}")
    out = []
    for name, x in (("a", a), ("b", b)):
        arr = _as_boxes(x, f"{fn}({name})", (7,) if frame == "camera" else allowed)
        dims = (3, 4, 5) if arr.shape[1] == 7 else (2, 3)
        _check_finite_dims(arr, dims, f"{fn}({name})")
        out.append(camera_boxes_to_lidar_frame(arr) if frame == "camera" else arr)
    return out[0], out[1]


# =============================================================================== KITTI AP
#: The classes the devkit knows, with their neighbouring ("don't penalise") classes.
KITTI_CLASSES = ("Car", "Pedestrian", "Cyclist", "Van", "Person_sitting", "Truck")
_NEIGHBOURS = {"car": "van", "pedestrian": "person_sitting"}
#: Difficulty levels: minimum 2D box height (px), maximum occlusion level, maximum truncation.
KITTI_DIFFICULTIES = {
    "easy": (40.0, 0, 0.15),
    "moderate": (25.0, 1, 0.30),
    "hard": (25.0, 2, 0.50),
}
#: Per-class IoU thresholds of the official evaluation (same for BEV and 3D).
KITTI_OVERLAPS = {
    "strict": {"Car": 0.7, "Pedestrian": 0.5, "Cyclist": 0.5, "Van": 0.7, "Person_sitting": 0.5, "Truck": 0.7},
    "lenient": {"Car": 0.5, "Pedestrian": 0.25, "Cyclist": 0.25, "Van": 0.5, "Person_sitting": 0.25, "Truck": 0.5},
}
_METRICS = ("bev", "3d")
_N_SAMPLE = 41  # devkit N_SAMPLE_PTS


def _record(rec: Any, keys: Dict[str, Tuple[Optional[int], bool]], what: str, required: Tuple[str, ...],
            n_key: str = "name") -> Dict[str, np.ndarray]:
    """Validates one frame record: ``keys`` maps a key to (columns or None, numeric)."""
    if rec is None:
        rec = {}
    if not isinstance(rec, Mapping):
        raise TypeError(f"{what}: expected a dict of arrays, got {type(rec).__name__}")
    if len(rec) == 0 or (n_key in rec and len(_np(rec[n_key]).reshape(-1)) == 0):
        n = 0
    else:
        missing = [k for k in required if k not in rec]
        if missing:
            raise ValueError(f"{what}: missing key(s) {missing} (has {sorted(rec)})")
        n = len(_np(rec[n_key]).reshape(-1))
    out: Dict[str, np.ndarray] = {}
    for key, (cols, numeric) in keys.items():
        if key not in rec:
            continue
        v = _np(rec[key])
        if numeric:
            try:
                v = v.astype(np.float64)
            except (TypeError, ValueError):
                raise ValueError(f"{what}: '{key}' is not numeric") from None
        else:
            v = np.array([str(s) for s in v.reshape(-1)], dtype=object)
        if v.size == 0 and n == 0:
            v = v.reshape((0,) if cols is None else (0, cols))
        if cols is None:
            v = v.reshape(-1) if v.ndim <= 1 else v
            if v.ndim != 1:
                raise ValueError(f"{what}: '{key}' must be 1-D [N], got shape {tuple(v.shape)}")
        elif v.ndim != 2 or v.shape[1] != cols:
            raise ValueError(f"{what}: '{key}' must have shape [N, {cols}], got {tuple(v.shape)}")
        out[key] = v
    if n > 0:
        for key, v in out.items():
            if v.dtype != object and not np.isfinite(v).all():
                raise ValueError(f"{what}: '{key}' has non-finite values")
    out["_n"] = np.int64(n)
    return out


def _gt_record(rec: Any, what: str) -> Dict[str, np.ndarray]:
    keys = {"name": (None, False), "truncated": (None, True), "occluded": (None, True), "bbox": (4, True),
            "boxes_lidar": (7, True)}
    r = _record(rec, keys, what, tuple(keys))
    n = int(r["_n"])
    if n == 0:
        return {"name": np.zeros(0, object), "truncated": np.zeros(0), "occluded": np.zeros(0),
                "bbox": np.zeros((0, 4)), "boxes_lidar": np.zeros((0, 7))}
    for key in ("truncated", "occluded", "bbox"):
        if len(r[key]) != n:
            raise ValueError(f"{what}: '{key}' has {len(r[key])} rows for {n} objects (len(name))")
    boxes = r["boxes_lidar"]
    if len(boxes) != n:
        # OpenPCDet's KITTI infos hold boxes for the objects before the trailing DontCare entries.
        dc = np.array([s.lower() == "dontcare" for s in r["name"]])
        n_obj = int((~dc).sum())
        if len(boxes) == n_obj and not dc[:n_obj].any():
            boxes = np.concatenate([boxes, np.zeros((n - n_obj, 7))], axis=0)
        else:
            raise ValueError(f"{what}: 'boxes_lidar' has {len(boxes)} rows for {n} objects (len(name)); "
                             f"only trailing DontCare entries may lack a box")
    r["boxes_lidar"] = boxes
    return r


def _det_record(rec: Any, what: str) -> Dict[str, np.ndarray]:
    keys = {"name": (None, False), "score": (None, True), "boxes_lidar": (7, True), "bbox": (4, True)}
    r = _record(rec, keys, what, ("name", "score", "boxes_lidar"))
    n = int(r["_n"])
    if n == 0:
        return {"name": np.zeros(0, object), "score": np.zeros(0), "boxes_lidar": np.zeros((0, 7)),
                "bbox": np.zeros((0, 4))}
    for key in ("score", "boxes_lidar", "bbox"):
        if key in r and len(r[key]) != n:
            raise ValueError(f"{what}: '{key}' has {len(r[key])} rows for {n} detections (len(name))")
    return r


def _frames(gt_frames: Any, det_frames: Any) -> Tuple[List[Any], List[Any], List[Any]]:
    if isinstance(gt_frames, Mapping):
        if not isinstance(det_frames, Mapping):
            raise TypeError("kitti_eval: gt_frames is a dict (frame id -> record), so det_frames must be one too")
        unknown = [k for k in det_frames if k not in gt_frames]
        if unknown:
            raise ValueError(f"kitti_eval: detections for frame(s) without ground truth: {unknown[:5]}")
        ids = list(gt_frames)
        return ids, [gt_frames[k] for k in ids], [det_frames.get(k) for k in ids]
    gt_list, det_list = list(gt_frames), list(det_frames)
    if len(gt_list) != len(det_list):
        raise ValueError(f"kitti_eval: {len(gt_list)} ground-truth frames but {len(det_list)} detection frames")
    return list(range(len(gt_list))), gt_list, det_list


def _resolve_overlaps(overlap: Any, classes: Sequence[str], metrics: Sequence[str]) -> Dict[str, Dict[str, float]]:
    if isinstance(overlap, str):
        if overlap not in KITTI_OVERLAPS:
            raise ValueError(f"kitti_eval: overlap must be 'strict', 'lenient' or a dict, got {overlap!r}")
        table: Mapping[str, Any] = KITTI_OVERLAPS[overlap]
    elif isinstance(overlap, Mapping):
        table = overlap
    else:
        raise TypeError(f"kitti_eval: overlap must be 'strict', 'lenient' or a dict, got {type(overlap).__name__}")
    lower = {str(k).lower(): v for k, v in table.items()}
    out = {}
    for c in classes:
        if c.lower() not in lower:
            raise ValueError(f"kitti_eval: no IoU threshold for class {c!r} (give overlap={{{c!r}: ...}})")
        v = lower[c.lower()]
        per = {m: float(v[m] if isinstance(v, Mapping) else v) for m in metrics}
        for m, t in per.items():
            if not 0.0 <= t < 1.0:
                raise ValueError(f"kitti_eval: IoU threshold for {c!r} / {m} must be in [0, 1), got {t}")
        out[c] = per
    return out


class _Data:
    """All frames flattened: GT and detection arrays, frame ids and the candidate pairs."""

    def __init__(self, gts: List[Dict[str, np.ndarray]], dets: List[Dict[str, np.ndarray]]):
        self.F = len(gts)
        g_counts = np.array([len(g["name"]) for g in gts], np.int64)
        d_counts = np.array([len(d["name"]) for d in dets], np.int64)
        self.gt_frame = np.repeat(np.arange(self.F), g_counts)
        self.det_frame = np.repeat(np.arange(self.F), d_counts)
        cat = lambda xs, shape: np.concatenate(xs, 0) if xs else np.zeros(shape)  # noqa: E731
        self.gt_name = np.array([s.lower() for g in gts for s in g["name"]], dtype=object)
        self.gt_trunc = cat([g["truncated"] for g in gts], (0,))
        self.gt_occ = cat([g["occluded"] for g in gts], (0,))
        gb = cat([g["bbox"] for g in gts], (0, 4))
        self.gt_height = gb[:, 3] - gb[:, 1]
        self.gt_box = cat([g["boxes_lidar"] for g in gts], (0, 7))
        self.det_name = np.array([s.lower() for d in dets for s in d["name"]], dtype=object)
        self.score = cat([d["score"] for d in dets], (0,))
        self.det_box = cat([d["boxes_lidar"] for d in dets], (0, 7))
        self.det_height = cat([np.abs(d["bbox"][:, 3] - d["bbox"][:, 1]) if "bbox" in d
                               else np.full(len(d["name"]), np.nan) for d in dets], (0,))
        self.is_dc = self.gt_name == "dontcare"
        self.G, self.D = len(self.gt_name), len(self.det_name)
        self.gt_start = np.concatenate([[0], np.cumsum(g_counts)[:-1]]).astype(np.int64)
        self.det_start = np.concatenate([[0], np.cumsum(d_counts)[:-1]]).astype(np.int64)
        self.g_counts, self.d_counts = g_counts, d_counts
        # Every (detection, ground truth) pair of the same frame, ordered by detection.
        reps = g_counts[self.det_frame]
        pd = np.repeat(np.arange(self.D), reps)
        within = np.arange(len(pd)) - np.repeat(np.cumsum(reps) - reps, reps)
        pg = np.repeat(self.gt_start[self.det_frame], reps) + within
        dbox, gbox = self.det_box[pd], self.gt_box[pg]
        inter = _bev_intersection_pairs(dbox[:, [0, 1, 3, 4, 6]], gbox[:, [0, 1, 3, 4, 6]])
        keep = inter > 0
        self.pd, self.pg, dbox, gbox, inter = pd[keep], pg[keep], dbox[keep], gbox[keep], inter[keep]
        self.pair_frame = self.det_frame[self.pd]
        self.overlaps: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        for metric in _METRICS:
            if metric == "bev":
                i = inter
                va, vb = dbox[:, 3] * dbox[:, 4], gbox[:, 3] * gbox[:, 4]
            else:
                i = inter * _z_overlap_pairs(dbox, gbox)
                va, vb = dbox[:, 3] * dbox[:, 4] * dbox[:, 5], gbox[:, 3] * gbox[:, 4] * gbox[:, 5]
            union = va + vb - i
            iou = np.divide(i, union, out=np.zeros_like(i), where=union > 0)
            over_det = np.divide(i, va, out=np.zeros_like(i), where=va > 0)  # devkit criterion 0
            self.overlaps[metric] = (iou, over_det)


def _labels(data: _Data, cls: str, difficulty: str) -> Tuple[np.ndarray, np.ndarray]:
    """Devkit ``cleanData``: ``ignored_gt`` and ``ignored_det`` (-1 other class, 1 ignored, 0 valid)."""
    min_h, max_occ, max_trunc = KITTI_DIFFICULTIES[difficulty]
    c = cls.lower()
    same = data.gt_name == c
    neighbour = data.gt_name == _NEIGHBOURS.get(c, "\0")
    ignore = (data.gt_occ > max_occ) | (data.gt_trunc > max_trunc) | (data.gt_height <= min_h)
    ig_gt = np.full(data.G, -1, np.int64)
    ig_gt[neighbour | (same & ignore)] = 1
    ig_gt[same & ~ignore] = 0
    ig_det = np.where(data.det_name == c, 0, -1).astype(np.int64)
    ig_det[data.det_height < min_h] = 1  # NaN (no 2D box) compares False: never ignored by height
    return ig_gt, ig_det


def _frame_slice(data: _Data, f: int):
    return (slice(data.det_start[f], data.det_start[f] + data.d_counts[f]),
            slice(data.gt_start[f], data.gt_start[f] + data.g_counts[f]))


def _dense(data: _Data, f: int, values: np.ndarray, pair_lo: int, pair_hi: int) -> np.ndarray:
    m = np.zeros((int(data.d_counts[f]), int(data.g_counts[f])))
    sel = slice(pair_lo, pair_hi)
    m[data.pd[sel] - data.det_start[f], data.pg[sel] - data.gt_start[f]] = values[sel]
    return m


def _stats_at(iou: np.ndarray, over_dc: np.ndarray, ig_gt: np.ndarray, ig_det: np.ndarray, score: np.ndarray,
              thr: float, t: float) -> Tuple[int, int]:
    """Devkit ``computeStatistics(compute_fp=True)`` in one frame at score threshold ``t``: (tp, fp).

    Ignored detections (``ig_det == 1``) never change tp or fp (a ground truth takes one only
    when no valid detection is left for it), so only valid detections are matched here.
    """
    elig = (ig_det == 0) & (score >= t)
    assigned = np.zeros(len(score), bool)
    tp = 0
    for g in range(iou.shape[1]):
        if ig_gt[g] == -1:
            continue
        cand = elig & ~assigned & (iou[:, g] > thr)
        if cand.any():
            assigned[int(np.argmax(np.where(cand, iou[:, g], -np.inf)))] = True  # first max overlap
            tp += int(ig_gt[g] == 0)
    free = elig & ~assigned
    fp = int(free.sum()) - int((free & over_dc).sum())  # unassigned detections in DontCare areas
    return tp, fp


def _first_pass_frame(iou: np.ndarray, ig_gt: np.ndarray, ig_det: np.ndarray, score: np.ndarray,
                      thr: float) -> List[float]:
    """Devkit ``computeStatistics(compute_fp=False)`` in one frame: the scores of the true positives."""
    assigned = np.zeros(len(score), bool)
    out = []
    for g in range(iou.shape[1]):
        if ig_gt[g] == -1:
            continue
        cand = (ig_det != -1) & ~assigned & (iou[:, g] > thr)
        if cand.any():
            j = int(np.argmax(np.where(cand, score, -np.inf)))  # first highest score
            assigned[j] = True
            if ig_gt[g] == 0 and ig_det[j] == 0:
                out.append(float(score[j]))
    return out


def _pr_steps(data: _Data, metric: str, thr: float, ig_gt: np.ndarray, ig_det: np.ndarray,
              first_pass: bool) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The devkit's tp and fp as functions of the score threshold, and the first-pass TP scores.

    Returns ``(u, tp, fp, tp_scores)``: ``u`` the distinct scores of valid detections, descending;
    ``tp[j], fp[j]`` the counts over all frames with the threshold at ``u[j]`` (detections with
    score >= ``u[j]`` kept); ``tp_scores`` (devkit mode only) the first-pass TP scores.

    Frames in which no detection is a candidate (overlap > thr) of two ground truths, and no
    candidate lies in a DontCare area, are done in closed form: there a ground truth is matched
    at threshold t iff its best candidate score is >= t. Other frames replay the devkit matching
    at each of their scores.
    """
    iou, over_det = data.overlaps[metric]
    pd, pg, score = data.pd, data.pg, data.score
    valid_det = ig_det == 0
    cand = (iou > thr) & (ig_gt[pg] != -1) & (ig_det[pd] != -1)
    dc_pair = data.is_dc[pg] & (over_det > thr) & valid_det[pd]
    in_dc = np.zeros(data.D, bool)
    in_dc[pd[dc_pair]] = True
    n_cand = np.bincount(pd[cand], minlength=data.D)
    n_valid_cand = np.bincount(pd[cand & valid_det[pd]], minlength=data.D)
    hard_det = (n_cand >= 2) | (in_dc & (n_valid_cand > 0))
    hard_frame = np.zeros(data.F, bool)
    hard_frame[data.det_frame[hard_det]] = True

    ev_s: List[np.ndarray] = []
    ev_tp: List[np.ndarray] = []
    ev_fp: List[np.ndarray] = []
    # --- closed form for the simple frames
    simple_pair = cand & ~hard_frame[data.pair_frame]
    vp = simple_pair & valid_det[pd]
    best = np.full(data.G, -np.inf)
    np.maximum.at(best, pg[vp], score[pd[vp]])
    matched = best > -np.inf
    simple_det = valid_det & ~hard_frame[data.det_frame] & ~in_dc
    ev_s += [score[simple_det], best[matched]]
    ev_fp += [np.ones(int(simple_det.sum())), -np.ones(int(matched.sum()))]
    ev_tp += [np.zeros(int(simple_det.sum())), (ig_gt[matched] == 0).astype(np.float64)]
    tp_scores: List[np.ndarray] = []
    if first_pass and simple_pair.any():
        sd, sg = pd[simple_pair], pg[simple_pair]
        order = np.lexsort((sd, -score[sd], sg))  # per GT: highest score, then first detection
        sd, sg = sd[order], sg[order]
        first = np.r_[True, sg[1:] != sg[:-1]]
        sd, sg = sd[first], sg[first]
        ok = (ig_gt[sg] == 0) & (ig_det[sd] == 0)
        tp_scores.append(score[sd[ok]])
    # --- replay the devkit in the other frames
    lo = np.searchsorted(data.pair_frame, np.arange(data.F), "left")
    hi = np.searchsorted(data.pair_frame, np.arange(data.F), "right")
    for f in np.flatnonzero(hard_frame):
        ds, gs = _frame_slice(data, f)
        fi = _dense(data, f, iou, lo[f], hi[f])
        dc_cols = data.is_dc[gs]
        fdc = (_dense(data, f, over_det, lo[f], hi[f])[:, dc_cols] > thr).any(axis=1)
        fs, fgt, fdet = score[ds], ig_gt[gs], ig_det[ds]
        u = np.unique(fs[fdet == 0])[::-1]
        prev = (0, 0)
        for t in u:
            cur = _stats_at(fi, fdc, fgt, fdet, fs, thr, t)
            ev_s.append(np.array([t]))
            ev_tp.append(np.array([cur[0] - prev[0]], np.float64))
            ev_fp.append(np.array([cur[1] - prev[1]], np.float64))
            prev = cur
        if first_pass:
            tp_scores.append(np.array(_first_pass_frame(fi, fgt, fdet, fs, thr)))
    s = np.concatenate(ev_s)
    order = np.argsort(-s, kind="stable")
    s = s[order]
    tp = np.cumsum(np.concatenate(ev_tp)[order])
    fp = np.cumsum(np.concatenate(ev_fp)[order])
    last = np.r_[s[1:] != s[:-1], True] if len(s) else np.zeros(0, bool)
    return s[last], np.rint(tp[last]), np.rint(fp[last]), (np.concatenate(tp_scores) if tp_scores else np.zeros(0))


def _devkit_thresholds(scores: np.ndarray, n_gt: int) -> List[float]:
    """Devkit ``getThresholds``: scores at which the recall steps by about 1/40."""
    v = sorted((float(x) for x in scores), reverse=True)
    t: List[float] = []
    current = 0.0
    for i, s in enumerate(v):
        l_recall = (i + 1) / n_gt
        r_recall = (i + 2) / n_gt if i < len(v) - 1 else l_recall
        if (r_recall - current) < (current - l_recall) and i < len(v) - 1:
            continue
        t.append(s)
        current += 1.0 / (_N_SAMPLE - 1.0)
    return t


def _ap(u: np.ndarray, tp: np.ndarray, fp: np.ndarray, tp_scores: np.ndarray, n_gt: int,
        recall_points: Sequence[int], sampling: str) -> Dict[str, float]:
    if n_gt == 0:
        return {f"R{r}": float("nan") for r in recall_points}
    out = {}
    if sampling == "devkit":
        th = _devkit_thresholds(tp_scores, n_gt)[:_N_SAMPLE]
        prec = np.zeros(_N_SAMPLE)
        for i, t in enumerate(th):
            j = int(np.searchsorted(-u, -t, side="right")) - 1  # last distinct score >= t
            prec[i] = tp[j] / (tp[j] + fp[j]) if j >= 0 and tp[j] + fp[j] > 0 else 0.0
        prec = np.maximum.accumulate(prec[::-1])[::-1]
        for r in recall_points:
            out[f"R{r}"] = float(prec[1:].sum() / 40 * 100) if r == 40 else float(prec[::4].sum() / 11 * 100)
        return out
    defined = tp + fp > 0
    prec = tp[defined] / (tp[defined] + fp[defined])
    rec = tp[defined] / n_gt
    for r in recall_points:
        levels = np.arange(1, 41) / 40 if r == 40 else np.arange(11) / 10
        reached = rec[None, :] >= levels[:, None] - 1e-12
        p = np.where(reached, prec[None, :], 0.0).max(axis=1, initial=0.0)
        out[f"R{r}"] = float(p.mean() * 100)
    return out


def kitti_eval(gt_frames: Any, det_frames: Any, classes: Sequence[str] = ("Car", "Pedestrian", "Cyclist"),
               metrics: Sequence[str] = ("bev", "3d"), recall_points: Sequence[int] = (40, 11),
               overlap: Any = "strict", sampling: str = "exact") -> Dict[str, Dict[str, Any]]:
    """KITTI object-detection average precision (BEV and 3D; R40 and R11), in percent.

    **Inputs.** ``gt_frames`` and ``det_frames`` are sequences of the same length (frame ``i`` of
    one goes with frame ``i`` of the other) or dicts ``frame id -> record`` (a frame missing from
    the detections has none). Arrays may be NumPy or torch.

    * ground truth record: ``name`` ``[N]`` str (KITTI types: ``Car``, ``Van``, ``Pedestrian``,
      ``Person_sitting``, ``Cyclist``, ``Truck``, ``DontCare``, ...), ``truncated`` ``[N]`` float,
      ``occluded`` ``[N]`` int (0..3), ``bbox`` ``[N, 4]`` image box ``(x1, y1, x2, y2)`` (only its
      height is used), ``boxes_lidar`` ``[N, 7]`` (LiDAR frame, z = centre). ``boxes_lidar`` may
      lack rows for trailing ``DontCare`` entries (OpenPCDet's KITTI infos); those regions are
      then empty. Boxes with a non-positive size overlap nothing.
    * detection record: ``name`` ``[M]``, ``score`` ``[M]``, ``boxes_lidar`` ``[M, 7]`` and,
      optionally, ``bbox`` ``[M, 4]``. **Without ``bbox`` the detections' 2D height is not
      checked** (the devkit ignores detections lower than the difficulty's minimum height; a
      LiDAR-only detector has no 2D box, so all its detections take part).

    **Protocol** (``evaluate_object_3d_offline.cpp`` / OpenPCDet ``kitti_object_eval_python``):

    * Difficulties, per ground truth: easy = 2D height > 40 px, occlusion <= 0, truncation <=
      0.15; moderate = > 25 px, <= 1, <= 0.30; hard = > 25 px, <= 2, <= 0.50 (heights *equal* to
      the minimum are excluded, as in the devkit). Each level includes the easier ones. A ground
      truth of the class outside the difficulty, and the neighbouring classes (``Van`` for
      ``Car``, ``Person_sitting`` for ``Pedestrian``) are *ignored*: neither TP nor FN, and a
      detection matched to one is neither TP nor FP. Other classes (``Truck`` for ``Car``, ...)
      are not ignored: a detection on them is a false positive.
    * Detections of the class with a 2D height below the difficulty's minimum (25 or 40 px) are
      ignored (with ``bbox`` only). As in the devkit this is checked before the class, so a low
      detection of *another* class may absorb a ground truth (making it neither TP nor FN).
    * Matching, per frame, ground truths in their input order: a ground truth takes, among the
      unassigned valid detections above the score threshold with IoU > the class threshold
      (strictly), the one of largest IoU; if there is none, an ignored detection (``height``)
      with IoU > threshold, without counting. Unassigned detections are false positives, except
      those whose overlap with a ``DontCare`` box, as a fraction of the detection's own area
      (BEV) or volume (3D), exceeds the threshold. Real KITTI ``DontCare`` labels have no 3D box
      (location -1000, size -1), so, as in the devkit, they affect no BEV / 3D result; a
      ``DontCare`` entry given a real 3D box masks the detections inside it.
    * IoU thresholds, ``overlap="strict"`` (official): Car 0.7, Pedestrian 0.5, Cyclist 0.5;
      ``"lenient"``: 0.5, 0.25, 0.25 (also Van 0.7/0.5, Person_sitting 0.5/0.25, Truck 0.7/0.5);
      or a dict ``{class: iou}`` / ``{class: {"bev": iou, "3d": iou}}``.
    * AP: precision ``P = TP / (TP + FP)`` and recall ``R = TP / n_gt`` (``n_gt``: non-ignored
      ground truths) at every score threshold; interpolated precision ``p(r) = max{P : R >= r}``
      (0 where recall r is never reached); ``R40`` = mean of ``p(r)`` at r = 1/40, 2/40, .., 1;
      ``R11`` = mean at r = 0, 0.1, .., 1; times 100.

    ``sampling="exact"`` (default) evaluates every score threshold, so the sampled recalls are
    exactly those above. ``sampling="devkit"`` reproduces the devkit's numbers (use it to compare
    with published results and OpenPCDet logs): it evaluates only up to 41 score thresholds, taken
    from the TP scores of a first, score-greedy matching pass so that the recall steps by about
    1/40 (``getThresholds``), and reads precision ``i`` as the precision at recall ``i / 40``.
    Since threshold ``i`` only has the recall *nearest* to ``i / 40``, the devkit credits recall
    levels up to half a step (1/80) beyond the highest recall reached; for R11, which reads every
    4th entry, that can add the last precision / 11 (several points). Along the curve the two
    agree closely. With fewer than ~40 ground truths the devkit's numbers are not APs at all (4
    cars detected perfectly give R40 = 7.5, R11 = 9.09; 40 cars, R40 = 97.5).

    Args:
        gt_frames: ground-truth records (see above).
        det_frames: detection records.
        classes: classes to evaluate (names compared case-insensitively).
        metrics: any of ``"bev"``, ``"3d"``.
        recall_points: any of 40, 11.
        overlap: ``"strict"``, ``"lenient"`` or a dict of thresholds.
        sampling: ``"exact"`` or ``"devkit"``.

    Returns:
        ``result[cls]`` = ``{"bev": {"R40": {"easy", "moderate", "hard"}, "R11": {...}},
        "3d": {...}, "num_gt": {"easy": n, ...}, "iou_threshold": {"bev": t, "3d": t}}``; APs in
        percent (0..100), NaN for a difficulty without ground truth.

    Raises:
        ValueError / TypeError: a malformed record (the message names the frame and key), unknown
        class without a threshold, metric, recall points or sampling.

    Example:
        >>> gt = [{"name": ["Car"], "truncated": [0.0], "occluded": [0], "bbox": [[0, 0, 50, 50]],
        ...        "boxes_lidar": [[10.0, 0.0, -1.0, 4.0, 1.8, 1.5, 0.0]]}]
        >>> det = [{"name": ["Car"], "score": [0.9], "boxes_lidar": [[10.0, 0.0, -1.0, 4.0, 1.8, 1.5, 0.0]]}]
        >>> kitti_eval(gt, det, classes=["Car"])["Car"]["3d"]["R40"]["moderate"]
        100.0
    """
    if isinstance(classes, str):
        classes = (classes,)
    if isinstance(metrics, str):
        metrics = (metrics,)
    metrics = tuple(metrics)
    for m in metrics:
        if m not in _METRICS:
            raise ValueError(f"kitti_eval: metrics must be among {_METRICS}, got {m!r}")
    recall_points = tuple(int(r) for r in recall_points)
    for r in recall_points:
        if r not in (40, 11):
            raise ValueError(f"kitti_eval: recall_points must be among (40, 11), got {r}")
    if sampling not in ("exact", "devkit"):
        raise ValueError(f"kitti_eval: sampling must be 'exact' or 'devkit', got {sampling!r}")
    thresholds = _resolve_overlaps(overlap, classes, metrics)
    ids, gt_list, det_list = _frames(gt_frames, det_frames)
    gts = [_gt_record(g, f"kitti_eval: ground-truth frame {i!r}") for i, g in zip(ids, gt_list)]
    dets = [_det_record(d, f"kitti_eval: detection frame {i!r}") for i, d in zip(ids, det_list)]
    data = _Data(gts, dets)
    result: Dict[str, Dict[str, Any]] = {}
    for cls in classes:
        res: Dict[str, Any] = {"iou_threshold": dict(thresholds[cls]), "num_gt": {}}
        for m in metrics:
            res[m] = {f"R{r}": {} for r in recall_points}
        for diff in KITTI_DIFFICULTIES:
            ig_gt, ig_det = _labels(data, cls, diff)
            n_gt = int((ig_gt == 0).sum())
            res["num_gt"][diff] = n_gt
            for m in metrics:
                steps = _pr_steps(data, m, thresholds[cls][m], ig_gt, ig_det, first_pass=sampling == "devkit")
                for key, ap in _ap(*steps, n_gt, recall_points, sampling).items():
                    res[m][key][diff] = ap
        result[cls] = res
    return result


def format_kitti_table(result: Mapping[str, Mapping[str, Any]], digits: int = 2) -> str:
    """A plain-text table of a :func:`kitti_eval` result.

    Args:
        result: the dict returned by :func:`kitti_eval`.
        digits: decimals of the APs.

    Returns:
        One line per class, metric and recall sampling: ``Car  3D  IoU 0.70  R40  easy mod hard``
        (``-`` for a difficulty without ground truth), with a header.

    Example:
        >>> print(format_kitti_table(res))          # doctest: +SKIP
        class        metric  IoU   AP      easy  moderate      hard
        Car          BEV     0.70  R40    93.10     86.50     83.20
    """
    head = f"{'class':<14}{'metric':<8}{'IoU':<6}{'AP':<5}{'easy':>10}{'moderate':>10}{'hard':>10}"
    lines = [head, "-" * len(head)]
    fmt = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"  # noqa: E731
    for cls, res in result.items():
        for m in _METRICS:
            if m not in res:
                continue
            thr = res.get("iou_threshold", {}).get(m, float("nan"))
            for key in sorted(res[m], key=lambda k: -int(k[1:])):
                row = res[m][key]
                lines.append(f"{cls:<14}{m.upper():<8}{thr:<6.2f}{key:<5}"
                             + "".join(f"{fmt(row.get(d)):>10}" for d in KITTI_DIFFICULTIES))
        if "num_gt" in res:
            lines.append(f"{'':<14}{'#gt':<19}" + "".join(f"{res['num_gt'].get(d, 0):>10}" for d in KITTI_DIFFICULTIES))
    return "\n".join(lines)


# =============================================================================== segmentation
def _labels_array(x: Any, what: str) -> np.ndarray:
    arr = _np(x)
    if arr.dtype.kind not in "iub":
        if arr.dtype.kind == "f" and arr.size and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        elif arr.size == 0:
            arr = arr.astype(np.int64)
        else:
            raise TypeError(f"{what}: expected integer class labels, got dtype {arr.dtype}")
    return arr.astype(np.int64).reshape(-1)


def confusion_matrix(pred: Any, target: Any, num_classes: int, ignore_index: Optional[int] = None) -> np.ndarray:
    """Confusion matrix ``[C, C]`` (int64): ``conf[t, p]`` counts elements of target class ``t``
    predicted as ``p``.

    Args:
        pred: integer predicted labels, any shape.
        target: integer labels, the same number of elements.
        num_classes: ``C``; labels must lie in ``[0, C)``.
        ignore_index: elements whose *target* equals it are left out (e.g. 255 or -1, or 0 for
            SemanticKITTI's "unlabeled").

    Raises:
        ValueError: sizes differ, or a label (other than ``ignore_index`` in the target) is
            outside ``[0, C)``.
        TypeError: non-integer labels.

    Example:
        >>> confusion_matrix([0, 1, 1, 2], [0, 1, 2, 255], 3, ignore_index=255).tolist()
        [[1, 0, 0], [0, 1, 0], [0, 1, 0]]
    """
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f"confusion_matrix: num_classes must be >= 1, got {num_classes}")
    p = _labels_array(pred, "confusion_matrix(pred)")
    t = _labels_array(target, "confusion_matrix(target)")
    if p.shape != t.shape:
        raise ValueError(f"confusion_matrix: pred has {p.size} elements, target {t.size}")
    if ignore_index is not None:
        keep = t != int(ignore_index)
        p, t = p[keep], t[keep]
    for name, v in (("target", t), ("pred", p)):
        bad = (v < 0) | (v >= num_classes)
        if bad.any():
            raise ValueError(f"confusion_matrix: {name} label {int(v[bad][0])} outside [0, {num_classes})"
                             + ("" if ignore_index is None or name == "pred" else f" (ignore_index={ignore_index})"))
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _conf(conf: Any) -> np.ndarray:
    c = _np(conf, np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"expected a square confusion matrix [C, C], got shape {tuple(c.shape)}")
    return c


def iou_per_class(conf: Any) -> np.ndarray:
    """Per-class IoU ``[C]``: ``TP / (TP + FP + FN)`` = ``conf[c, c] / (row c + column c - conf[c, c])``.

    NaN for a class absent from both prediction and target.

    Example:
        >>> iou_per_class([[1, 1], [0, 2]]).tolist()     # class 0: 1/(2+1-1), class 1: 2/(2+3-2)
        [0.5, 0.6666666666666666]
    """
    c = _conf(conf)
    tp = np.diag(c)
    denom = c.sum(0) + c.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / np.where(denom > 0, denom, 1), np.nan)


def mean_iou(conf: Any, ignore: Union[None, int, Iterable[int]] = None) -> float:
    """Mean IoU over the classes present (IoU not NaN) and not in ``ignore``.

    Args:
        conf: ``[C, C]`` confusion matrix.
        ignore: class index or indices to leave out of the mean (e.g. an "unlabeled" class).

    Returns:
        The mean as a float; NaN when no class is left.

    Example:
        >>> mean_iou([[1, 1, 0], [0, 2, 0], [0, 0, 0]])     # class 2 absent: (1/2 + 2/3) / 2
        0.5833333333333333
    """
    iou = iou_per_class(conf)
    keep = np.ones(len(iou), bool)
    if ignore is not None:
        for i in ([ignore] if np.isscalar(ignore) else ignore):
            if not 0 <= int(i) < len(iou):
                raise ValueError(f"mean_iou: ignored class {i} outside [0, {len(iou)})")
            keep[int(i)] = False
    vals = iou[keep & ~np.isnan(iou)]
    return float(vals.mean()) if len(vals) else float("nan")


class SegmentationMeter:
    """Accumulates a confusion matrix over batches.

    Args:
        num_classes: ``C``.
        ignore_index: target label left out of every count.
        ignore_classes: classes left out of the mean IoU (they still count in the accuracy).
        class_names: optional names, for ``compute()["iou_by_name"]``.

    Example:
        >>> meter = SegmentationMeter(3, ignore_index=255)
        >>> meter.update([0, 1, 1], [0, 1, 2])
        >>> meter.update(np.array([[0.9, 0.1, 0.0]]), [255])   # scores [N, C] are argmax-ed
        >>> round(meter.compute()["miou"], 4)                   # (1 + 1/2 + 0) / 3
        0.5
    """

    def __init__(self, num_classes: int, ignore_index: Optional[int] = None,
                 ignore_classes: Union[None, int, Iterable[int]] = None,
                 class_names: Optional[Sequence[str]] = None):
        self.num_classes = int(num_classes)
        if self.num_classes < 1:
            raise ValueError(f"SegmentationMeter: num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(f"SegmentationMeter: {len(class_names)} class names for {self.num_classes} classes")
        self.ignore_index = ignore_index
        self.ignore_classes = ignore_classes
        self.class_names = None if class_names is None else list(class_names)
        self.reset()

    def reset(self) -> None:
        """Clears the accumulated counts."""
        self.conf = np.zeros((self.num_classes, self.num_classes), np.int64)

    def update(self, pred: Any, target: Any) -> None:
        """Adds a batch.

        Args:
            pred: integer labels of the target's shape, or scores with one more axis of size ``C``:
                ``[N, C]`` / ``[..., C]`` (last axis) or ``[B, C, ...]`` (axis 1), argmax-ed.
            target: integer labels.
        """
        p, t = _np(pred), _np(target)
        if p.ndim == t.ndim + 1:
            C = self.num_classes
            if p.shape[-1] == C and p.shape[:-1] == t.shape:
                p = p.argmax(-1)
            elif p.ndim >= 2 and p.shape[1] == C and p.shape[:1] + p.shape[2:] == t.shape:
                p = p.argmax(1)
            else:
                raise ValueError(f"SegmentationMeter.update: scores of shape {tuple(p.shape)} do not fit labels of "
                                 f"shape {tuple(t.shape)} with {C} classes (expected [..., C] or [B, C, ...])")
        elif p.shape != t.shape:
            raise ValueError(f"SegmentationMeter.update: pred shape {tuple(p.shape)} != target shape {tuple(t.shape)}")
        self.conf += confusion_matrix(p, t, self.num_classes, self.ignore_index)

    def compute(self) -> Dict[str, Any]:
        """``{"miou", "iou" [C], "accuracy", "class_accuracy" [C], "confusion" [C, C]}``
        (+ ``"iou_by_name"`` with class names). Accuracy is the fraction of counted elements
        predicted right (NaN before any); class accuracy is per target class (NaN if absent)."""
        c = self.conf.astype(np.float64)
        total = c.sum()
        rows = c.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            class_acc = np.where(rows > 0, np.diag(c) / np.where(rows > 0, rows, 1), np.nan)
        iou = iou_per_class(c)
        out: Dict[str, Any] = {
            "miou": mean_iou(c, self.ignore_classes),
            "iou": iou,
            "accuracy": float(np.trace(c) / total) if total > 0 else float("nan"),
            "class_accuracy": class_acc,
            "confusion": self.conf.copy(),
        }
        if self.class_names is not None:
            out["iou_by_name"] = {n: float(v) for n, v in zip(self.class_names, iou)}
        return out
