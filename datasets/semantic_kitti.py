"""The SemanticKITTI LiDAR segmentation dataset: :class:`SemanticKitti` and its label maps.

Layout (the official ``data_odometry_velodyne`` + ``data_odometry_labels`` unpacked together)::

    root/sequences/00/velodyne/000000.bin     float32 x, y, z, remission per point
    root/sequences/00/labels/000000.label     uint32 per point: semantic id (low 16 bits), instance id (high 16)
    ...
    root/sequences/21/velodyne/...            sequences 11-21 have no labels (the test split)

Raw semantic ids (:data:`RAW_LABELS`, e.g. 10 car, 252 moving-car) are mapped to the 19
training classes and 0 (ignore) by :data:`LEARNING_MAP`, the official ``learning_map`` of
``semantic-kitti.yaml``: moving classes map to their static class, ``bus`` / ``on-rails`` to
``other-vehicle``, ``lane-marking`` to ``road``, ``outlier`` / ``other-structure`` /
``other-object`` to 0. Raw ids not in the map also become 0.

Example:
    >>> ds = SemanticKitti("data/semantic_kitti", "val")
    >>> s = ds[0]
    >>> s["points"].shape, s["labels"].dtype, CLASS_NAMES[s["labels"].max() - 1]
"""
from __future__ import annotations

import errno
import glob
import os
from typing import Callable, Dict, Mapping, Optional, Sequence, Union

import numpy as np

__all__ = [
    "RAW_LABELS",
    "LEARNING_MAP",
    "LEARNING_MAP_INV",
    "CLASS_NAMES",
    "IGNORE_INDEX",
    "SEMANTIC_KITTI_SPLITS",
    "learning_map_lut",
    "SemanticKitti",
]

#: Raw SemanticKITTI semantic ids and their names (``labels`` of ``semantic-kitti.yaml``).
RAW_LABELS: Dict[int, str] = {
    0: "unlabeled", 1: "outlier", 10: "car", 11: "bicycle", 13: "bus", 15: "motorcycle", 16: "on-rails",
    18: "truck", 20: "other-vehicle", 30: "person", 31: "bicyclist", 32: "motorcyclist", 40: "road",
    44: "parking", 48: "sidewalk", 49: "other-ground", 50: "building", 51: "fence", 52: "other-structure",
    60: "lane-marking", 70: "vegetation", 71: "trunk", 72: "terrain", 80: "pole", 81: "traffic-sign",
    99: "other-object", 252: "moving-car", 253: "moving-bicyclist", 254: "moving-person",
    255: "moving-motorcyclist", 256: "moving-on-rails", 257: "moving-bus", 258: "moving-truck",
    259: "moving-other-vehicle",
}  # fmt: skip

#: Raw id -> training id (0 = ignore, 1..19 = :data:`CLASS_NAMES`): the official ``learning_map``.
LEARNING_MAP: Dict[int, int] = {
    0: 0,      # unlabeled
    1: 0,      # outlier -> unlabeled
    10: 1,     # car
    11: 2,     # bicycle
    13: 5,     # bus -> other-vehicle
    15: 3,     # motorcycle
    16: 5,     # on-rails -> other-vehicle
    18: 4,     # truck
    20: 5,     # other-vehicle
    30: 6,     # person
    31: 7,     # bicyclist
    32: 8,     # motorcyclist
    40: 9,     # road
    44: 10,    # parking
    48: 11,    # sidewalk
    49: 12,    # other-ground
    50: 13,    # building
    51: 14,    # fence
    52: 0,     # other-structure -> unlabeled
    60: 9,     # lane-marking -> road
    70: 15,    # vegetation
    71: 16,    # trunk
    72: 17,    # terrain
    80: 18,    # pole
    81: 19,    # traffic-sign
    99: 0,     # other-object -> unlabeled
    252: 1,    # moving-car -> car
    253: 7,    # moving-bicyclist -> bicyclist
    254: 6,    # moving-person -> person
    255: 8,    # moving-motorcyclist -> motorcyclist
    256: 5,    # moving-on-rails -> other-vehicle
    257: 5,    # moving-bus -> other-vehicle
    258: 4,    # moving-truck -> truck
    259: 5,    # moving-other-vehicle -> other-vehicle
}

#: Training id -> raw id (the official ``learning_map_inv``), e.g. to write predictions for the benchmark.
LEARNING_MAP_INV: Dict[int, int] = {
    0: 0, 1: 10, 2: 11, 3: 15, 4: 18, 5: 20, 6: 30, 7: 31, 8: 32, 9: 40, 10: 44, 11: 48, 12: 49, 13: 50,
    14: 51, 15: 70, 16: 71, 17: 72, 18: 80, 19: 81,
}  # fmt: skip

#: The 19 training classes: training id ``i`` (1..19) is ``CLASS_NAMES[i - 1]``.
CLASS_NAMES = (
    "car", "bicycle", "motorcycle", "truck", "other-vehicle", "person", "bicyclist", "motorcyclist", "road",
    "parking", "sidewalk", "other-ground", "building", "fence", "vegetation", "trunk", "terrain", "pole",
    "traffic-sign",
)  # fmt: skip

#: The training id ignored by the loss and the metrics.
IGNORE_INDEX = 0

#: The official sequence splits (test: no labels).
SEMANTIC_KITTI_SPLITS: Dict[str, tuple] = {
    "train": ("00", "01", "02", "03", "04", "05", "06", "07", "09", "10"),
    "val": ("08",),
    "trainval": ("00", "01", "02", "03", "04", "05", "06", "07", "08", "09", "10"),
    "test": tuple(f"{i:02d}" for i in range(11, 22)),
}


def learning_map_lut(learning_map: Optional[Mapping[int, int]] = None) -> np.ndarray:
    """A lookup table ``[65536]`` int64 of a learning map (raw 16-bit semantic id -> training id; unlisted: 0).

    Example:
        >>> learning_map_lut()[[10, 252, 60, 99]].tolist()
        [1, 1, 9, 0]
    """
    lut = np.zeros(1 << 16, np.int64)
    for raw, train in (LEARNING_MAP if learning_map is None else learning_map).items():
        raw = int(raw)
        if not 0 <= raw < (1 << 16):
            raise ValueError(f"learning_map key {raw} is not a 16-bit semantic id")
        lut[raw] = int(train)
    return lut


def _sequence_name(s: Union[int, str]) -> str:
    try:
        return f"{int(s):02d}"
    except (TypeError, ValueError):
        raise ValueError(f"sequence names are numbers such as 0 or '08', got {s!r}") from None


class SemanticKitti:
    """SemanticKITTI scans with per-point labels (a map-style ``torch.utils.data.Dataset``).

    Each sample (``ds[i]``) is a dict: ``points`` float32 ``[N, 4]`` (x, y, z, remission),
    ``labels`` int64 ``[N]`` (training ids after the learning map, 0 = ignore), ``instance`` int64
    ``[N]`` (the upper 16 bits of the raw label: instance id, 0 for stuff), ``frame_id``
    (``"08/000123"``). Sequences without a ``labels/`` folder (the test split) give no ``labels`` /
    ``instance`` keys.

    Args:
        root: the folder holding ``sequences/``.
        split: ``"train"`` (00-07, 09, 10), ``"val"`` (08), ``"trainval"``, ``"test"`` (11-21).
        sequences: explicit sequences (ints or names such as ``"08"``); overrides ``split``.
        learning_map: raw id -> training id (default :data:`LEARNING_MAP`).
        transforms: callable ``(sample, rng) -> sample``.
        seed: with a seed, frame ``i`` is augmented with ``np.random.default_rng([seed, epoch, i])``.

    Raises:
        FileNotFoundError: a requested sequence folder (or its ``velodyne/``) is missing; at
            access, a scan's ``.label`` file is missing in a labelled sequence.
        PointCloudError: a ``.label`` file whose count differs from its scan (both files named),
            a truncated scan.

    Example:
        >>> ds = SemanticKitti("data/semantic_kitti", sequences=[8])
        >>> len(ds), ds[0]["frame_id"]
        (4071, '08/000000')
    """

    def __init__(
        self,
        root: str,
        split: str = "train",
        sequences: Optional[Sequence[Union[int, str]]] = None,
        learning_map: Optional[Mapping[int, int]] = None,
        transforms: Optional[Callable] = None,
        seed: Optional[int] = None,
    ):
        root = os.fspath(root)
        base = os.path.join(root, "sequences")
        if not os.path.isdir(base):
            raise FileNotFoundError(errno.ENOENT, f"no such folder: {base} (SemanticKITTI keeps its scans in "
                                    f"root/sequences/NN/velodyne)", base)
        if sequences is None:
            if split not in SEMANTIC_KITTI_SPLITS:
                raise ValueError(f"unknown split {split!r}: use one of {sorted(SEMANTIC_KITTI_SPLITS)} or sequences=")
            sequences = SEMANTIC_KITTI_SPLITS[split]
        self.sequences = tuple(_sequence_name(s) for s in sequences)
        present = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))
        missing = [s for s in self.sequences if not os.path.isdir(os.path.join(base, s, "velodyne"))]
        if missing:
            raise FileNotFoundError(errno.ENOENT, f"{base}: sequence(s) {', '.join(missing)} missing (no NN/velodyne "
                                    f"folder; present: {', '.join(present) or 'none'}); pass sequences= to choose",
                                    os.path.join(base, missing[0]))
        self.root, self.split, self.transforms, self.seed, self.epoch = root, split, transforms, seed, 0
        self.learning_map = dict(LEARNING_MAP if learning_map is None else learning_map)
        self._lut = learning_map_lut(self.learning_map)
        self.scans, self.frame_ids, self.labelled = [], [], []
        for s in self.sequences:
            labelled = os.path.isdir(os.path.join(base, s, "labels"))
            for p in sorted(glob.glob(os.path.join(base, s, "velodyne", "*.bin"))):
                self.scans.append(p)
                self.frame_ids.append(f"{s}/{os.path.basename(p)[:-4]}")
                self.labelled.append(labelled)

    def __len__(self) -> int:
        return len(self.scans)

    def __repr__(self) -> str:
        return f"SemanticKitti({self.root!r}, sequences={list(self.sequences)}, {len(self)} scans)"

    def set_epoch(self, epoch: int) -> None:
        """Changes the augmentation seeds (with ``seed`` set): call it at the start of every epoch."""
        self.epoch = int(epoch)

    def label_path(self, index: int) -> str:
        """The ``.label`` file of scan ``index``."""
        seq, name = self.frame_ids[index].split("/")
        return os.path.join(self.root, "sequences", seq, "labels", name + ".label")

    def __getitem__(self, index: int) -> Dict[str, object]:
        return self.get(index)

    def get(self, index: int, augment: bool = True) -> Dict[str, object]:
        """Sample ``index``; ``augment=False`` skips ``transforms``."""
        from sparseconv.io import PointCloudError, read_labels, read_points

        if not -len(self) <= index < len(self):
            raise IndexError(f"scan index {index} out of range for {len(self)} scans")
        index = index % len(self)
        scan = self.scans[index]
        points = np.ascontiguousarray(read_points(scan, format="kitti").to_array(), np.float32)
        sample = {"frame_id": self.frame_ids[index], "points": points}
        if self.labelled[index]:
            path = self.label_path(index)
            if not os.path.isfile(path):
                raise FileNotFoundError(errno.ENOENT, f"no such file: {path} (the labels of {scan})", path)
            size = os.path.getsize(path)
            if size % 4 or size // 4 != len(points):
                raise PointCloudError(f"{path}: {size / 4:g} labels ({size} bytes, one uint32 per point) but the scan "
                                      f"{scan} has {len(points)} points; the label file belongs to another scan or is "
                                      f"truncated")
            semantic, instance = read_labels(path, num_points=len(points))
            sample["labels"] = self._lut[semantic]
            sample["instance"] = instance.astype(np.int64)
        if augment and self.transforms is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index]) if self.seed is not None \
                else np.random.default_rng()
            sample = self.transforms(sample, rng)
        return sample
