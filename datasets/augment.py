"""Data augmentation for LiDAR detection and segmentation samples (NumPy).

A sample is a dict (:class:`~sparseconv.datasets.KittiDetection`,
:class:`~sparseconv.datasets.SemanticKitti`): per-point arrays ``points`` ``[N, C]`` (x, y, z
first), ``labels`` and ``instance`` ``[N]`` (segmentation), per-box arrays ``gt_boxes`` ``[M, 7]``
(LiDAR frame, see :mod:`sparseconv.datasets.boxes`), ``gt_names``, ``gt_labels``,
``gt_difficulty`` ``[M]`` (detection); other keys pass through unchanged.

Every transform is a callable ``t(sample, rng) -> sample`` that returns a new dict (the input's
arrays are not modified) and moves points and boxes together: a point inside a box stays inside
it, and the box heading follows. ``rng`` is a ``numpy.random.Generator``, an int seed, or None
(fresh OS entropy); the same seed gives the same result.

Example:
    >>> aug = Compose([GTSampler(db, {"Car": 15}), RandomFlip(along_x=True), GlobalRotation((-0.78, 0.78)),
    ...                GlobalScaling((0.95, 1.05)), GlobalTranslation((0.2, 0.2, 0.2))])
    >>> out = aug(sample, np.random.default_rng(0))
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from .boxes import boxes_bev_overlap, limit_period, points_in_boxes

__all__ = [
    "PER_POINT_KEYS",
    "PER_BOX_KEYS",
    "as_rng",
    "rotate_scene",
    "scale_scene",
    "flip_scene",
    "translate_scene",
    "crop_to_range",
    "Compose",
    "GlobalRotation",
    "GlobalScaling",
    "RandomFlip",
    "GlobalTranslation",
    "RandomPointDropout",
    "GTDatabase",
    "GTSampler",
]

#: Sample keys holding one row per point: selected together when points are dropped.
PER_POINT_KEYS = ("points", "labels", "instance")
#: Sample keys holding one row per ground-truth box: selected together when boxes are dropped or added.
PER_BOX_KEYS = ("gt_boxes", "gt_names", "gt_labels", "gt_difficulty")

RngLike = Union[np.random.Generator, int, None]


def as_rng(rng: RngLike) -> np.random.Generator:
    """A ``numpy.random.Generator``: ``rng`` itself, ``default_rng(seed)`` for an int, fresh entropy for None."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be a numpy.random.Generator, an int seed or None, got {type(rng).__name__}")


def _select(sample: dict, keys: Sequence[str], mask: np.ndarray) -> dict:
    out = dict(sample)
    for k in keys:
        if k in out and out[k] is not None:
            out[k] = np.asarray(out[k])[mask]
    return out


def _with_xyz(sample: dict, fn_points, fn_boxes) -> dict:
    """A new sample whose point xyz is ``fn_points(xyz)`` and boxes ``fn_boxes(boxes)`` (float64 maths)."""
    out = dict(sample)
    p = np.asarray(sample["points"])
    q = p.copy()
    q[:, :3] = fn_points(p[:, :3].astype(np.float64))
    out["points"] = q
    if sample.get("gt_boxes") is not None:
        b = np.asarray(sample["gt_boxes"])
        c = b.copy()
        if len(b):
            c[:, :7] = fn_boxes(b[:, :7].astype(np.float64))
        out["gt_boxes"] = c
    return out


# ----------------------------------------------------------------------------- deterministic scene ops
def rotate_scene(sample: dict, angle: float) -> dict:
    """Rotates points and boxes by ``angle`` radians around the z axis (counter-clockwise seen from above).

    ``x' = x cos a - y sin a``, ``y' = x sin a + y cos a``; box yaw ``+= a`` (wrapped to ``[-pi, pi)``).
    """
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]])

    def points(xyz):
        xyz[:, :2] = xyz[:, :2] @ rot.T
        return xyz

    def boxes(b):
        b[:, :2] = b[:, :2] @ rot.T
        b[:, 6] = limit_period(b[:, 6] + angle)
        return b

    return _with_xyz(sample, points, boxes)


def scale_scene(sample: dict, factor: float) -> dict:
    """Scales point coordinates, box centres and box sizes by ``factor`` (about the origin)."""
    factor = float(factor)
    if not factor > 0:
        raise ValueError(f"scale factor must be positive, got {factor}")

    def boxes(b):
        b[:, :6] *= factor
        return b

    return _with_xyz(sample, lambda xyz: xyz * factor, boxes)


def flip_scene(sample: dict, axis: str) -> dict:
    """Mirrors the scene: ``axis="x"`` flips along x (``y -> -y``, ``yaw -> -yaw``); ``"y"`` flips
    along y (``x -> -x``, ``yaw -> pi - yaw``) (OpenPCDet's ``random_flip_along_x`` / ``_y``)."""
    if axis not in ("x", "y"):
        raise ValueError(f"flip axis must be 'x' (y -> -y) or 'y' (x -> -x), got {axis!r}")
    col = 1 if axis == "x" else 0

    def points(xyz):
        xyz[:, col] = -xyz[:, col]
        return xyz

    def boxes(b):
        b[:, col] = -b[:, col]
        b[:, 6] = limit_period(-b[:, 6] if axis == "x" else np.pi - b[:, 6])
        return b

    return _with_xyz(sample, points, boxes)


def translate_scene(sample: dict, offset: Sequence[float]) -> dict:
    """Shifts points and box centres by ``offset`` ``(dx, dy, dz)`` metres."""
    offset = np.asarray(offset, np.float64).reshape(3)

    def boxes(b):
        b[:, :3] += offset
        return b

    return _with_xyz(sample, lambda xyz: xyz + offset, boxes)


def crop_to_range(sample: dict, point_range: Sequence[float]) -> dict:
    """Keeps the points with ``min <= xyz < max`` and the boxes whose centre is in ``[min, max]``.

    ``point_range`` is ``(x_min, y_min, z_min, x_max, y_max, z_max)``: the half-open test matches
    the voxel grid of :func:`sparseconv.voxelize`; boxes follow OpenPCDet's centre rule.
    """
    lo, hi = np.asarray(point_range[:3], np.float64), np.asarray(point_range[3:], np.float64)
    xyz = np.asarray(sample["points"])[:, :3]
    out = _select(sample, PER_POINT_KEYS, ((xyz >= lo) & (xyz < hi)).all(1))
    if sample.get("gt_boxes") is not None:
        centres = np.asarray(sample["gt_boxes"])[:, :3]
        out = _select(out, PER_BOX_KEYS, ((centres >= lo) & (centres <= hi)).all(1))
    return out


# ----------------------------------------------------------------------------- random transforms
class Compose:
    """Applies transforms in order, all drawing from one generator.

    Example:
        >>> aug = Compose([RandomFlip(), GlobalRotation(), GlobalScaling()])
        >>> a, b = aug(sample, 7), aug(sample, 7)      # same seed: same result
    """

    def __init__(self, transforms: Iterable):
        self.transforms = list(transforms)
        for t in self.transforms:
            if not callable(t):
                raise TypeError(f"every transform must be callable (sample, rng) -> sample, got {t!r}")

    def __call__(self, sample: dict, rng: RngLike = None) -> dict:
        rng = as_rng(rng)
        for t in self.transforms:
            sample = t(sample, rng)
        return sample

    def __repr__(self) -> str:
        return "Compose([" + ", ".join(repr(t) for t in self.transforms) + "])"


def _range(value, name, positive=False):
    lo, hi = (float(v) for v in value)
    if lo > hi or (positive and lo <= 0):
        raise ValueError(f"{name} must be (low, high) with low <= high{' and low > 0' if positive else ''}, "
                         f"got {tuple(value)}")
    return lo, hi


class GlobalRotation:
    """Rotates the scene around z by an angle drawn uniformly from ``angle_range`` (radians)."""

    def __init__(self, angle_range: Sequence[float] = (-np.pi / 4, np.pi / 4)):
        self.angle_range = _range(angle_range, "angle_range")

    def __call__(self, sample: dict, rng: RngLike = None) -> dict:
        return rotate_scene(sample, as_rng(rng).uniform(*self.angle_range))

    def __repr__(self) -> str:
        return f"GlobalRotation({self.angle_range})"


class GlobalScaling:
    """Scales the scene by a factor drawn uniformly from ``scale_range``."""

    def __init__(self, scale_range: Sequence[float] = (0.95, 1.05)):
        self.scale_range = _range(scale_range, "scale_range", positive=True)

    def __call__(self, sample: dict, rng: RngLike = None) -> dict:
        return scale_scene(sample, as_rng(rng).uniform(*self.scale_range))

    def __repr__(self) -> str:
        return f"GlobalScaling({self.scale_range})"


class RandomFlip:
    """Flips along x (``y -> -y``) and / or along y (``x -> -x``), each with ``probability``."""

    def __init__(self, along_x: bool = True, along_y: bool = False, probability: float = 0.5):
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {probability}")
        self.along_x, self.along_y, self.probability = bool(along_x), bool(along_y), float(probability)

    def __call__(self, sample: dict, rng: RngLike = None) -> dict:
        rng = as_rng(rng)
        for axis, enabled in (("x", self.along_x), ("y", self.along_y)):
            if enabled and rng.random() < self.probability:
                sample = flip_scene(sample, axis)
        return sample

    def __repr__(self) -> str:
        return f"RandomFlip(along_x={self.along_x}, along_y={self.along_y}, probability={self.probability})"


class GlobalTranslation:
    """Shifts the scene by Gaussian noise with standard deviations ``std`` ``(x, y, z)`` metres."""

    def __init__(self, std: Sequence[float] = (0.2, 0.2, 0.2)):
        self.std = tuple(float(v) for v in np.broadcast_to(np.asarray(std, np.float64), (3,)))
        if min(self.std) < 0:
            raise ValueError(f"std must be >= 0, got {self.std}")

    def __call__(self, sample: dict, rng: RngLike = None) -> dict:
        return translate_scene(sample, as_rng(rng).normal(0.0, 1.0, 3) * np.asarray(self.std))

    def __repr__(self) -> str:
        return f"GlobalTranslation(std={self.std})"


class RandomPointDropout:
    """Drops each point independently with probability ``rate`` (with its per-point labels)."""

    def __init__(self, rate: float = 0.1):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"rate must be in [0, 1), got {rate}")
        self.rate = float(rate)

    def __call__(self, sample: dict, rng: RngLike = None) -> dict:
        keep = as_rng(rng).random(len(sample["points"])) >= self.rate
        return _select(sample, PER_POINT_KEYS, keep)

    def __repr__(self) -> str:
        return f"RandomPointDropout({self.rate})"


# ----------------------------------------------------------------------------- ground-truth sampling
class GTDatabase:
    """The points and boxes of the training objects, for :class:`GTSampler` (SECOND's GT database).

    Attributes:
        names: str ``[K]``; boxes: float32 ``[K, 7]`` (LiDAR frame, where the object was);
        difficulty: int64 ``[K]``; frame_ids: str ``[K]``; num_points: int64 ``[K]``;
        classes: the dataset's classes (``gt_labels`` of pasted objects number them from 1).
        :meth:`object_points` gives an object's points, relative to its box centre.

    Example:
        >>> db = GTDatabase.build(KittiDetection(root, "train"), "kitti_dbinfos_train.npz")
        >>> db = GTDatabase.load("kitti_dbinfos_train.npz")
        >>> db.counts()                       # objects per class
        >>> db.object_points(0).shape         # [n, 4], x, y, z relative to db.boxes[0, :3]
    """

    VERSION = 1

    def __init__(self, names, boxes, points, offsets, difficulty, frame_ids, classes):
        self.names = np.asarray(names, dtype=str)
        self.boxes = np.asarray(boxes, np.float32).reshape(-1, 7)
        self.points = np.asarray(points, np.float32)
        self.offsets = np.asarray(offsets, np.int64)
        self.difficulty = np.asarray(difficulty, np.int64)
        self.frame_ids = np.asarray(frame_ids, dtype=str)
        self.classes = tuple(str(c) for c in classes)
        k = len(self.names)
        if not (len(self.boxes) == len(self.difficulty) == len(self.frame_ids) == k and len(self.offsets) == k + 1):
            raise ValueError(f"GTDatabase arrays disagree: {k} names, {len(self.boxes)} boxes, "
                             f"{len(self.offsets)} offsets (need {k + 1})")
        if self.points.ndim != 2 or self.points.shape[1] < 3 or self.offsets[-1] != len(self.points):
            raise ValueError(f"GTDatabase points must be [P, >= 3] with P = offsets[-1], got {self.points.shape} "
                             f"and offsets[-1] = {self.offsets[-1] if len(self.offsets) else None}")

    @property
    def num_points(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"GTDatabase({len(self)} objects: {self.counts()})"

    def counts(self) -> Dict[str, int]:
        """Objects per class name."""
        names, n = np.unique(self.names, return_counts=True)
        return {str(a): int(b) for a, b in zip(names, n)}

    def object_points(self, i: int) -> np.ndarray:
        """The points ``[n, C]`` of object ``i``, x, y, z relative to its box centre."""
        return self.points[self.offsets[i]:self.offsets[i + 1]]

    @classmethod
    def build(
        cls,
        dataset,
        out_path: Optional[str] = None,
        classes: Optional[Sequence[str]] = None,
        min_points: Union[int, Mapping[str, int]] = 5,
        exclude_difficulty: Sequence[int] = (-1,),
    ) -> "GTDatabase":
        """Collects every object's points (those inside its box) over a dataset.

        Args:
            dataset: a detection dataset (its training split); frames are read without
                augmentation (``dataset.get(i, augment=False)`` when it has ``get``).
            out_path: also save the database there (``.npz``, atomically); None keeps it in memory.
            classes: object names to collect (default ``dataset.classes``).
            min_points: objects with fewer points are skipped (an int, or per class name).
            exclude_difficulty: difficulties to skip (default: -1, objects KITTI does not evaluate;
                OpenPCDet's ``filter_by_difficulty``).
        """
        classes = tuple(getattr(dataset, "classes", ()) if classes is None else classes)
        if not classes:
            raise ValueError("GTDatabase.build needs the classes to collect (the dataset has no .classes)")
        names, boxes, chunks, diff, frames = [], [], [], [], []
        for i in range(len(dataset)):
            s = dataset.get(i, augment=False) if hasattr(dataset, "get") else dataset[i]
            b = np.asarray(s["gt_boxes"], np.float64).reshape(-1, 7)
            if not len(b):
                continue
            n = np.asarray(s["gt_names"])
            d = np.asarray(s.get("gt_difficulty", np.zeros(len(b), np.int64)))
            pts = np.asarray(s["points"])
            wanted = np.isin(n, classes) & ~np.isin(d, list(exclude_difficulty))
            inside = points_in_boxes(pts, b[wanted])
            for col, j in enumerate(np.flatnonzero(wanted)):
                need = min_points.get(str(n[j]), 0) if isinstance(min_points, Mapping) else int(min_points)
                mask = inside[:, col]
                if mask.sum() < need:
                    continue
                obj = pts[mask].astype(np.float32)
                obj[:, :3] -= b[j, :3].astype(np.float32)
                names.append(str(n[j]))
                boxes.append(b[j])
                chunks.append(obj)
                diff.append(int(d[j]))
                frames.append(str(s.get("frame_id", i)))
        width = chunks[0].shape[1] if chunks else 4
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
        db = cls(np.array(names, dtype=str), np.array(boxes).reshape(-1, 7),
                 np.concatenate(chunks) if chunks else np.zeros((0, width), np.float32), offsets,
                 np.array(diff, np.int64), np.array(frames, dtype=str), classes)
        if out_path is not None:
            db.save(out_path)
        return db

    def save(self, path: str) -> None:
        """Writes the database to an ``.npz`` file (atomically)."""
        from sparseconv.io import atomic_write

        with atomic_write(path) as f:
            np.savez(f, version=np.int64(self.VERSION), names=self.names, boxes=self.boxes, points=self.points,
                     offsets=self.offsets, difficulty=self.difficulty, frame_ids=self.frame_ids,
                     classes=np.array(self.classes, dtype=str))

    @classmethod
    def load(cls, path: str) -> "GTDatabase":
        """Reads a database written by :meth:`save`.

        Raises:
            FileNotFoundError: no such file. PointCloudError: not a GT database file.
        """
        from sparseconv.io import PointCloudError

        p = os.fspath(path)
        if not os.path.isfile(p):
            raise FileNotFoundError(2, f"no such file: {p} (GT database)", p)
        try:
            with np.load(p, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except Exception as e:  # zipfile / format errors
            raise PointCloudError(f"{p}: not a GT database .npz file ({type(e).__name__}: {e})") from None
        need = ("names", "boxes", "points", "offsets", "difficulty", "frame_ids", "classes")
        missing = [k for k in need if k not in data]
        if missing:
            raise PointCloudError(f"{p}: not a GT database file: no {', '.join(missing)} (arrays: {sorted(data)})")
        try:
            return cls(*(data[k] for k in need))
        except ValueError as e:
            raise PointCloudError(f"{p}: corrupt GT database: {e}") from None


class GTSampler:
    """Pastes objects from a :class:`GTDatabase` into a detection scene (SECOND / OpenPCDet ``gt_sampling``).

    For each class ``name: n`` of ``sample_groups``, ``n`` minus the objects of that class already
    in the scene are drawn without replacement, kept in their original place (box and points as
    recorded). A drawn box is rejected when its bird's-eye-view rectangle overlaps any box of the
    scene (all of them, ``gt_labels`` 0 included) or one pasted before it; the overlap test is exact
    for rotated rectangles (:func:`~sparseconv.datasets.boxes.boxes_bev_overlap`). The scene points
    inside a pasted box (3D) are removed, and the object's points are put first.
    ``gt_labels`` of pasted objects index ``db.classes``; ``annos`` is not changed.

    Args:
        db: the database (built from the training split).
        sample_groups: target object count per class, e.g. ``{"Car": 15, "Pedestrian": 10, "Cyclist": 10}``.

    Example:
        >>> sampler = GTSampler(GTDatabase.load("kitti_dbinfos_train.npz"), {"Car": 15})
        >>> scene = sampler(sample, np.random.default_rng(0))
    """

    def __init__(self, db: GTDatabase, sample_groups: Mapping[str, int] = None):
        if not isinstance(db, GTDatabase):
            raise TypeError(f"db must be a GTDatabase, got {type(db).__name__}")
        groups = {"Car": 15, "Pedestrian": 10, "Cyclist": 10} if sample_groups is None else dict(sample_groups)
        unknown = [k for k in groups if k not in db.classes]
        if unknown:
            raise ValueError(f"sample_groups names {unknown} that are not classes of the database {db.classes}")
        if any(int(v) < 0 for v in groups.values()):
            raise ValueError(f"sample_groups counts must be >= 0, got {groups}")
        self.db, self.sample_groups = db, {k: int(v) for k, v in groups.items()}
        self._pools = {k: np.flatnonzero(db.names == k) for k in groups}

    def __repr__(self) -> str:
        return f"GTSampler({len(self.db)} objects, {self.sample_groups})"

    def __call__(self, sample: dict, rng: RngLike = None) -> dict:
        rng = as_rng(rng)
        extra = [k for k in PER_POINT_KEYS[1:] if sample.get(k) is not None]
        if extra:
            raise ValueError(f"GTSampler pastes detection objects; the sample has per-point {extra} it cannot fill")
        boxes = np.asarray(sample.get("gt_boxes", np.zeros((0, 7))), np.float64).reshape(-1, 7)
        names = np.asarray(sample.get("gt_names", np.zeros(0, str)))
        current, picked = boxes, []
        for name, target in self.sample_groups.items():
            need, pool = target - int((names == name).sum()), self._pools[name]
            if need <= 0 or not len(pool):
                continue
            idx = rng.choice(pool, size=min(need, len(pool)), replace=False)
            cand = self.db.boxes[idx].astype(np.float64)
            hit_scene = boxes_bev_overlap(cand, current).any(1)
            hit_self = boxes_bev_overlap(cand, cand)
            ok = []
            for j in range(len(idx)):
                if not hit_scene[j] and not hit_self[j, ok].any():
                    ok.append(j)
            current = np.concatenate([current, cand[ok]])
            picked.extend(idx[ok].tolist())
        if not picked:
            return sample
        new = self.db.boxes[picked].astype(np.float64)
        points = np.asarray(sample["points"])
        if points.shape[1] != self.db.points.shape[1]:
            raise ValueError(f"the scene has {points.shape[1]} point columns but the GT database "
                             f"{self.db.points.shape[1]}")
        objects = []
        for i, box in zip(picked, new):
            obj = self.db.object_points(i).astype(np.float64)
            obj[:, :3] += box[:3]
            objects.append(obj)
        out = dict(sample)
        keep = ~points_in_boxes(points, new).any(1)
        out["points"] = np.concatenate([np.concatenate(objects).astype(points.dtype), points[keep]])
        lookup = {c: i + 1 for i, c in enumerate(self.db.classes)}
        dtype = np.asarray(sample.get("gt_boxes", np.zeros((0, 7), np.float32))).dtype
        out["gt_boxes"] = np.concatenate([boxes, new]).astype(dtype)
        out["gt_names"] = np.concatenate([names.astype(str), self.db.names[picked]])
        old_labels = np.asarray(sample.get("gt_labels", [lookup.get(str(n), 0) for n in names]), np.int64)
        pasted_labels = np.array([lookup[str(n)] for n in self.db.names[picked]], np.int64)
        out["gt_labels"] = np.concatenate([old_labels, pasted_labels])
        old_diff = np.asarray(sample.get("gt_difficulty", np.zeros(len(boxes), np.int64)), np.int64)
        out["gt_difficulty"] = np.concatenate([old_diff, self.db.difficulty[picked]])
        return out
