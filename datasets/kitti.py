"""The KITTI 3D object detection dataset: file readers, box conversion and :class:`KittiDetection`.

Layouts read (``NNNNNN`` = six-digit frame id):

* the official one: ``root/training/{velodyne,label_2,calib}/NNNNNN.*``, ``root/testing/...``
  (no ``label_2``) and ``root/ImageSets/{train,val,trainval,test}.txt`` (one frame id a line);
* a flat one: ``root/velodyne``, ``root/label_2``, ``root/calib`` without ``ImageSets``: all frames
  of ``velodyne/`` are used (``ImageSets/<split>.txt`` is honoured if it exists).

Boxes are returned in the LiDAR frame as ``[M, 7]`` rows ``x, y, z, dx, dy, dz, yaw`` (box
centre, length along the heading, width, height, heading around +z with 0 facing +x), see
:mod:`sparseconv.datasets.boxes`.

Example:
    >>> ds = KittiDetection("../shared/data/kitti", fov_only=True)
    >>> s = ds[0]
    >>> s["points"].shape, s["gt_boxes"].shape, s["gt_names"].tolist()
    ((20799, 4), (1, 7), ['Pedestrian'])
"""
from __future__ import annotations

import errno
import glob
import os
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from .boxes import limit_period

__all__ = [
    "KITTI_IMAGE_SIZE",
    "read_kitti_calib",
    "read_kitti_labels",
    "kitti_difficulty",
    "camera_to_lidar_transform",
    "camera_boxes_to_lidar",
    "lidar_boxes_to_camera",
    "lidar_to_image",
    "fov_mask",
    "KittiDetection",
]

#: Image size ``(width, height)`` of the left colour camera used for the FOV crop when no image is found.
KITTI_IMAGE_SIZE = (1242, 375)
# KITTI label_2 columns: type, truncated, occluded, alpha, bbox (4), dimensions h w l, location x y z, rotation_y.
_LABEL_COLUMNS = 15


def _missing(path: str, what: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, f"no such file: {path} ({what})", path)


# ----------------------------------------------------------------------------- files
def read_kitti_calib(path: str, required: Sequence[str] = ("R0_rect", "Tr_velo_to_cam")) -> Dict[str, np.ndarray]:
    """Reads a KITTI object calib file into ``{name: matrix}``.

    ``P0``..``P3`` and ``Tr_velo_to_cam`` / ``Tr_imu_to_velo`` become ``[3, 4]``, ``R0_rect``
    ``[3, 3]``; other entries stay flat. The tracking dataset's names ``R_rect`` and
    ``Tr_velo_cam`` are also accepted (stored under the object names).

    Args:
        path: the ``calib/NNNNNN.txt`` file.
        required: entries that must be present (:class:`KittiDetection` also needs ``P2``).

    Raises:
        PointCloudError: a line is not ``name: numbers``, a matrix has the wrong size, or a
            required entry is missing.

    Example:
        >>> calib = read_kitti_calib("calib/000000.txt")
        >>> calib["P2"].shape, calib["R0_rect"].shape, calib["Tr_velo_to_cam"].shape
        ((3, 4), (3, 3), (3, 4))
    """
    from sparseconv.io import PointCloudError

    aliases = {"R_rect": "R0_rect", "Tr_velo_cam": "Tr_velo_to_cam", "Tr_imu_velo": "Tr_imu_to_velo"}
    shapes = {"R0_rect": (3, 3), "Tr_velo_to_cam": (3, 4), "Tr_imu_to_velo": (3, 4)}
    calib = {}
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            name, sep, rest = line.partition(":")
            if not sep:
                name, _, rest = line.partition(" ")  # "R_rect 1 0 0 ..." (tracking files)
            name = aliases.get(name.strip(), name.strip())
            try:
                values = np.array([float(v) for v in rest.split()], np.float64)
            except ValueError:
                raise PointCloudError(f"{path}:{number}: not a KITTI calib line ('name: numbers'): {line[:80]!r}") \
                    from None
            shape = shapes.get(name, (3, 4) if name.startswith("P") and len(name) == 2 else None)
            if shape is not None:
                if values.size != shape[0] * shape[1]:
                    raise PointCloudError(f"{path}:{number}: {name} has {values.size} numbers, expected "
                                          f"{shape[0] * shape[1]} ({shape[0]} x {shape[1]})")
                values = values.reshape(shape)
            calib[name] = values
    for need in required:
        if need not in calib:
            raise PointCloudError(f"{path}: not a KITTI calib file: no {need} (entries: {sorted(calib)})")
    return calib


def read_kitti_labels(path: str, skip_dontcare: bool = True) -> Dict[str, np.ndarray]:
    """Reads a KITTI ``label_2`` file (one object per line, camera frame).

    Returns ``{"type": [M] str, "truncated": [M], "occluded": [M] int, "alpha": [M], "bbox": [M, 4],
    "dimensions": [M, 3] (h, w, l), "location": [M, 3] (x, y, z: bottom centre, rectified camera
    frame), "rotation_y": [M], "score": [M] (1 when the file has no score column)}``.
    ``DontCare`` lines are skipped unless ``skip_dontcare=False``.

    Raises:
        PointCloudError: a line does not have 15 (or 16, with a score) columns of the right kind
            (the message gives ``file:line``).

    Example:
        >>> labels = read_kitti_labels("label_2/000000.txt")
        >>> labels["type"].tolist(), labels["dimensions"].tolist()
        (['Pedestrian'], [[1.89, 0.48, 1.2]])
    """
    from sparseconv.io import PointCloudError

    rows = []
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            words = line.split()
            if not words:
                continue
            if len(words) not in (_LABEL_COLUMNS, _LABEL_COLUMNS + 1):
                raise PointCloudError(f"{path}:{number}: a KITTI label line has 15 values (16 with a score), "
                                      f"got {len(words)}")
            try:
                values = [float(v) for v in words[1:]]
            except ValueError:
                raise PointCloudError(f"{path}:{number}: a KITTI label line is a type then 14 numbers: "
                                      f"{line.strip()[:80]!r}") from None
            if skip_dontcare and words[0] == "DontCare":
                continue
            rows.append((words[0], values + [1.0] * (_LABEL_COLUMNS - len(words) + 1)))
    v = np.array([r[1] for r in rows], np.float64).reshape(len(rows), _LABEL_COLUMNS)
    return {
        "type": np.array([r[0] for r in rows], dtype=str),
        "truncated": v[:, 0],
        "occluded": v[:, 1].astype(np.int64),
        "alpha": v[:, 2],
        "bbox": v[:, 3:7],
        "dimensions": v[:, 7:10],
        "location": v[:, 10:13],
        "rotation_y": v[:, 13],
        "score": v[:, 14],
    }


def kitti_difficulty(labels: Dict[str, np.ndarray]) -> np.ndarray:
    """KITTI evaluation difficulty per object: 0 easy, 1 moderate, 2 hard, -1 none of them.

    The official rules (devkit ``evaluate_object.cpp``): the 2D box height ``bbox[3] - bbox[1]`` in
    pixels, the occlusion level and the truncation must be at least 40 / 25 / 25 px, at most
    0 / 1 / 2 and at most 0.15 / 0.3 / 0.5 for easy / moderate / hard; the easiest level met wins.

    Example:
        >>> kitti_difficulty({"bbox": np.array([[0, 0, 10, 30.0]]), "occluded": np.array([1]),
        ...                   "truncated": np.array([0.2])}).tolist()
        [1]
    """
    height = np.asarray(labels["bbox"], np.float64).reshape(-1, 4)
    height = height[:, 3] - height[:, 1]
    occ = np.asarray(labels["occluded"]).reshape(-1)
    trunc = np.asarray(labels["truncated"], np.float64).reshape(-1)
    out = np.full(len(height), -1, np.int64)
    for level, (min_h, max_occ, max_trunc) in reversed(list(enumerate(((40, 0, 0.15), (25, 1, 0.3), (25, 2, 0.5))))):
        out[(height >= min_h) & (occ <= max_occ) & (trunc <= max_trunc)] = level
    return out


# ----------------------------------------------------------------------------- frames
def _rect_velo(calib: Dict[str, np.ndarray]) -> np.ndarray:
    r0 = np.eye(4)
    r0[:3, :3] = calib["R0_rect"]
    v2c = np.eye(4)
    v2c[:3, :] = calib["Tr_velo_to_cam"]
    return r0 @ v2c  # LiDAR -> rectified camera


def camera_to_lidar_transform(calib: Dict[str, np.ndarray]) -> np.ndarray:
    """``[4, 4]`` matrix taking rectified-camera points to the LiDAR frame: ``inv(R0_rect @ Tr_velo_to_cam)``."""
    return np.linalg.inv(_rect_velo(calib))


def camera_boxes_to_lidar(labels: Dict[str, np.ndarray], calib: Dict[str, np.ndarray]) -> np.ndarray:
    """KITTI camera-frame boxes as LiDAR boxes ``[M, 7]``: ``x, y, z`` (box centre), ``l, w, h``, ``yaw``.

    The bottom centre moves to the LiDAR frame with :func:`camera_to_lidar_transform` and is
    raised by ``h / 2``; ``yaw = -rotation_y - pi / 2`` (yaw 0 faces +x), wrapped to ``[-pi, pi)``
    (OpenPCDet's ``boxes3d_kitti_camera_to_lidar``).

    Example:
        >>> boxes = camera_boxes_to_lidar(read_kitti_labels("label_2/000000.txt"),
        ...                               read_kitti_calib("calib/000000.txt"))   # [M, 7]
    """
    loc = np.asarray(labels["location"], np.float64).reshape(-1, 3)
    h, w, l = np.asarray(labels["dimensions"], np.float64).reshape(-1, 3).T
    xyz = (np.c_[loc, np.ones(len(loc))] @ camera_to_lidar_transform(calib).T)[:, :3]
    xyz[:, 2] += h / 2
    yaw = -np.asarray(labels["rotation_y"], np.float64) - np.pi / 2
    yaw = (yaw + np.pi) % (2 * np.pi) - np.pi
    return np.column_stack([xyz, l, w, h, yaw])


def lidar_boxes_to_camera(boxes, calib: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The inverse of :func:`camera_boxes_to_lidar`: LiDAR boxes ``[M, 7]`` as KITTI label fields.

    Returns ``{"location": [M, 3] (bottom centre, rectified camera frame), "dimensions": [M, 3]
    (h, w, l), "rotation_y": [M] (in [-pi, pi))}``.

    Example:
        >>> cam = lidar_boxes_to_camera(boxes, calib)
        >>> np.allclose(camera_boxes_to_lidar(cam, calib), boxes)
        True
    """
    b = np.asarray(boxes, np.float64).reshape(-1, 7)
    bottom = b[:, :3].copy()
    bottom[:, 2] -= b[:, 5] / 2
    loc = (np.c_[bottom, np.ones(len(b))] @ _rect_velo(calib).T)[:, :3]
    return {"location": loc, "dimensions": b[:, [5, 4, 3]].copy(), "rotation_y": limit_period(-b[:, 6] - np.pi / 2)}


def lidar_to_image(points, calib: Dict[str, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Projects LiDAR points into the left colour image: ``(uv [N, 2] pixels, depth [N] metres)``.

    ``[u, v, 1] * depth = P2 @ R0_rect @ Tr_velo_to_cam @ [x, y, z, 1]``; ``depth`` is the rectified
    camera z (negative behind the camera).
    """
    xyz = np.asarray(points, np.float64)[:, :3]
    rect = np.c_[xyz, np.ones(len(xyz))] @ _rect_velo(calib).T  # [N, 4], rectified camera frame
    img = rect @ np.asarray(calib["P2"], np.float64).T  # [N, 3]
    depth = img[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = img[:, :2] / depth[:, None]
    return uv, rect[:, 2]


def fov_mask(points, calib: Dict[str, np.ndarray], image_size: Tuple[int, int] = KITTI_IMAGE_SIZE) -> np.ndarray:
    """Points seen by the left colour camera: bool ``[N]``.

    Kept: depth (rectified camera z) > 0 and ``0 <= u < width``, ``0 <= v < height`` after
    :func:`lidar_to_image` (OpenPCDet's ``get_fov_flag``).

    Example:
        >>> points = points[fov_mask(points, calib, (1242, 375))]
    """
    uv, depth = lidar_to_image(points, calib)
    w, h = image_size
    with np.errstate(invalid="ignore"):
        return (depth > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 1] < h)


def _annotations(labels: Dict[str, np.ndarray], keep: np.ndarray) -> Dict[str, np.ndarray]:
    """The ``annos`` dict of a sample (OpenPCDet names) for the label rows selected by ``keep``."""
    out = {"name": labels["type"][keep]}
    for key in ("truncated", "occluded", "alpha", "bbox", "dimensions", "location", "rotation_y"):
        out[key] = labels[key][keep]
    out["difficulty"] = np.where(out["name"] == "DontCare", -1, kitti_difficulty(out))  # no difficulty
    return out


# ----------------------------------------------------------------------------- dataset
class KittiDetection:
    """KITTI 3D object detection frames as dict samples (a map-style ``torch.utils.data.Dataset``).

    Each sample (``ds[i]``) is a dict:

    * ``points``: float32 ``[N, 4]`` ``x, y, z, intensity`` (LiDAR frame);
    * ``gt_boxes``: float32 ``[M, 7]`` LiDAR boxes of every labelled object but ``DontCare``;
    * ``gt_names``: str ``[M]``; ``gt_labels``: int64 ``[M]``, 1-based index in ``classes``
      (0: not one of ``classes``, e.g. ``Van``, ``Misc``; not a training target);
      ``gt_difficulty``: int64 ``[M]`` (0 easy, 1 moderate, 2 hard, -1 none);
    * ``annos``: the label file's objects (but DontCare) in the camera frame, OpenPCDet names:
      ``name``, ``truncated``, ``occluded``, ``alpha``, ``bbox`` ``[M, 4]`` (2D, pixels),
      ``dimensions`` (h, w, l), ``location``, ``rotation_y``, ``difficulty``; as in the file, not
      changed by the transforms;
    * ``dontcare``: the same fields for the ``DontCare`` regions (2D boxes only);
    * ``frame_id`` (str), ``calib`` (from :func:`read_kitti_calib`), ``image_size``.

    The test split (or a folder without ``label_2``) gives empty boxes. Order of processing:
    read, camera-FOV crop (``fov_only``), ``transforms(sample, rng)``, then the ``point_range``
    crop (points outside dropped; boxes kept when their centre's x and y are inside).

    Args:
        root: the KITTI folder (official or flat layout, see the module docs).
        split: ``"train"``, ``"val"``, ``"trainval"``, ``"test"`` (``ImageSets/<split>.txt``),
            or None for every frame in ``velodyne/``.
        classes: the training classes; ``gt_labels`` numbers them from 1.
        fov_only: keep only the points inside the left camera image.
        point_range: ``(x_min, y_min, z_min, x_max, y_max, z_max)`` crop, or None.
        transforms: callable ``(sample, rng) -> sample`` (e.g. :class:`~sparseconv.datasets.Compose`).
        image_size: ``(width, height)`` for the FOV crop; default the size of
            ``image_2/NNNNNN.png`` when present, else 1242 x 375.
        seed: with a seed, the transforms of frame ``i`` use ``np.random.default_rng([seed, epoch, i])``
            (reproducible with any number of DataLoader workers; see :meth:`set_epoch`);
            without one, fresh OS entropy.

    Raises:
        FileNotFoundError: ``root`` has no KITTI layout, or ``ImageSets/<split>.txt`` is missing
            (official layout); at access, a frame's scan, label or calib file is missing (named).
        PointCloudError: a malformed label line (``file:line``), a calib file without ``P2``,
            ``R0_rect`` or ``Tr_velo_to_cam``, or a truncated scan.

    Example:
        >>> from sparseconv.datasets import KittiDetection, Compose, GlobalRotation, RandomFlip
        >>> ds = KittiDetection("data/kitti", "train", point_range=(0, -40, -3, 70.4, 40, 1), fov_only=True,
        ...                     transforms=Compose([RandomFlip(), GlobalRotation()]), seed=0)
        >>> sample = ds[0]
    """

    def __init__(
        self,
        root: str,
        split: Optional[str] = "train",
        classes: Sequence[str] = ("Car", "Pedestrian", "Cyclist"),
        fov_only: bool = False,
        point_range: Optional[Sequence[float]] = None,
        transforms: Optional[Callable] = None,
        image_size: Optional[Tuple[int, int]] = None,
        seed: Optional[int] = None,
    ):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(errno.ENOENT, f"KITTI root folder not found: {root}", root)
        if os.path.isdir(os.path.join(root, "velodyne")):
            self.layout, folder = "flat", root
        elif os.path.isdir(os.path.join(root, "training")) or os.path.isdir(os.path.join(root, "testing")):
            self.layout = "official"
            folder = os.path.join(root, "testing" if split == "test" else "training")
            if not os.path.isdir(os.path.join(folder, "velodyne")):
                raise FileNotFoundError(errno.ENOENT, f"no such folder: {os.path.join(folder, 'velodyne')} "
                                        f"(KITTI scans of split {split!r})", os.path.join(folder, "velodyne"))
        else:
            raise FileNotFoundError(errno.ENOENT, f"{root}: not a KITTI object folder: expected training/velodyne "
                                    f"and ImageSets/ (official layout) or velodyne/, label_2/, calib/ (flat layout)",
                                    root)
        if point_range is not None:
            point_range = tuple(float(v) for v in point_range)
            if len(point_range) != 6 or any(point_range[i] >= point_range[i + 3] for i in range(3)):
                raise ValueError(f"point_range must be (x_min, y_min, z_min, x_max, y_max, z_max) with min < max, "
                                 f"got {point_range}")
        if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
            raise ValueError(f"image_size must be (width, height) in pixels, got {image_size}")
        self.root, self.folder, self.split = root, folder, split
        self.classes = tuple(classes)
        self.fov_only, self.point_range, self.transforms = bool(fov_only), point_range, transforms
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
        self.seed, self.epoch = seed, 0
        self.has_labels = os.path.isdir(os.path.join(folder, "label_2"))
        self.frame_ids = self._frame_list()

    def _frame_list(self):
        listed = os.path.join(self.root, "ImageSets", f"{self.split}.txt") if self.split is not None else None
        if listed is not None and os.path.isfile(listed):
            with open(listed, "r", encoding="utf-8", errors="replace") as f:
                return [w for line in f for w in line.split()[:1]]
        if listed is not None and self.layout == "official":
            raise FileNotFoundError(errno.ENOENT, f"no such file: {listed} (the frame list of split {self.split!r}; "
                                    f"split=None uses every frame of {self.folder}/velodyne)", listed)
        return sorted(os.path.basename(p)[:-4] for p in glob.glob(os.path.join(self.folder, "velodyne", "*.bin")))

    def __len__(self) -> int:
        return len(self.frame_ids)

    def __repr__(self) -> str:
        return (f"KittiDetection({self.root!r}, split={self.split!r}, {len(self)} frames, classes={self.classes}, "
                f"fov_only={self.fov_only}, point_range={self.point_range})")

    def set_epoch(self, epoch: int) -> None:
        """Changes the augmentation seeds (with ``seed`` set): call it at the start of every epoch."""
        self.epoch = int(epoch)

    def paths(self, index: int) -> Dict[str, str]:
        """The files of frame ``index``: ``velodyne``, ``label_2``, ``calib``, ``image_2``."""
        fid = self.frame_ids[index]
        ext = {"velodyne": ".bin", "label_2": ".txt", "calib": ".txt", "image_2": ".png"}
        return {k: os.path.join(self.folder, k, fid + e) for k, e in ext.items()}

    def _image_size(self, png: str) -> Tuple[int, int]:
        if self.image_size is not None:
            return self.image_size
        if os.path.isfile(png):
            from PIL import Image  # a matplotlib dependency; reads the header only

            with Image.open(png) as im:
                return tuple(int(v) for v in im.size)
        return KITTI_IMAGE_SIZE

    def __getitem__(self, index: int) -> Dict[str, object]:
        return self.get(index)

    def get(self, index: int, augment: bool = True) -> Dict[str, object]:
        """Sample ``index``; ``augment=False`` skips ``transforms`` (the crops still apply)."""
        from sparseconv.io import read_points

        if not -len(self) <= index < len(self):
            raise IndexError(f"frame index {index} out of range for {len(self)} frames")
        index = index % len(self)
        fid = self.frame_ids[index]
        paths = self.paths(index)
        if not os.path.isfile(paths["velodyne"]):
            raise _missing(paths["velodyne"], f"KITTI frame {fid}: the LiDAR scan")
        points = read_points(paths["velodyne"], format="kitti").to_array()
        calib = None
        if self.has_labels or self.fov_only:
            if not os.path.isfile(paths["calib"]):
                raise _missing(paths["calib"], f"KITTI frame {fid}: the calibration")
            calib = read_kitti_calib(paths["calib"], required=("P2", "R0_rect", "Tr_velo_to_cam"))
        if self.has_labels:
            if not os.path.isfile(paths["label_2"]):
                raise _missing(paths["label_2"], f"KITTI frame {fid}: the labels")
            labels = read_kitti_labels(paths["label_2"], skip_dontcare=False)
        else:
            labels = read_kitti_labels(os.devnull)
        care = labels["type"] != "DontCare"
        annos = _annotations(labels, care)
        boxes = camera_boxes_to_lidar({k: v[care] for k, v in labels.items()}, calib) if care.any() \
            else np.zeros((0, 7))
        lookup = {c: i + 1 for i, c in enumerate(self.classes)}
        image_size = None
        if self.fov_only:
            image_size = self._image_size(paths["image_2"])
            points = points[fov_mask(points, calib, image_size)]
        sample = {
            "frame_id": fid,
            "points": np.ascontiguousarray(points, np.float32),
            "gt_boxes": boxes.astype(np.float32),
            "gt_names": annos["name"].copy(),
            "gt_labels": np.array([lookup.get(n, 0) for n in annos["name"]], np.int64),
            "gt_difficulty": annos["difficulty"].copy(),
            "annos": annos,
            "dontcare": _annotations(labels, ~care),
            "calib": calib,
            "image_size": image_size,
        }
        if augment and self.transforms is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index]) if self.seed is not None \
                else np.random.default_rng()
            sample = self.transforms(sample, rng)
        if self.point_range is not None:
            from .augment import crop_to_range

            sample = crop_to_range(sample, self.point_range)
        return sample
