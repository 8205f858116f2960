"""A LiDAR scene simulator: procedural street scenes, exact ray casting, KITTI / SemanticKITTI files.

Each scene is generated from one seed: a street (lanes, parking lanes, raised sidewalks with
curbs, terrain strips, an optional cross street, gentle grade changes), buildings, walls,
fences, trees and bushes, street lights and traffic signs, and labelled objects (cars, vans,
trucks, pedestrians, cyclists) with KITTI-like sizes, placed on roads and sidewalks without
overlaps out to 70 m. A sensor model (:class:`Sensor`: real beam layouts of the Velodyne
HDL-64E, VLP-32C and Ouster OS1-128) casts every ray of one revolution against the scene
(:mod:`._raycast`: exact ray-plane, ray-slab, ray-cylinder and ray-ellipsoid tests, nearest
hit), then applies range noise, per-beam dropout, a detection threshold on the returned power
and an intensity model (material reflectivity, incidence angle, range).

A :class:`Scan` holds the points, per-point SemanticKITTI semantic and instance ids, the 3D
boxes in the LiDAR frame and their KITTI camera labels (truncation, occlusion, 2D box,
alpha, difficulty) for a fixed, documented camera rig (:func:`kitti_calib`). Writers produce
the KITTI object layout and the SemanticKITTI layout; :func:`generate_dataset` writes many
scenes (resumable, in parallel). See ``docs/synthetic.md``.

Example:
    >>> scan = simulate_scan(7)                       # HDL-64E, about 120k points
    >>> scan.points.shape, scan.boxes.shape           # ([N, 4] x y z intensity, [M, 7])
    >>> print("\\n".join(scan.label_lines()))         # KITTI label_2 lines
    >>> generate_dataset("data/synth", scenes=100, seed=0, layout="both", workers=2)
"""
from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from ._raycast import Ground, RayGrid, Scene, cast

__all__ = [
    "Sensor", "SENSORS", "get_sensor", "SEMANTIC_IDS", "KITTI_CLASSES", "KITTI_IMAGE_SIZE",
    "Scene", "Ground", "Scan", "generate_scene", "simulate_scan", "scene_seed", "is_val_scene",
    "kitti_calib", "format_kitti_calib", "lidar_boxes_to_kitti", "kitti_label_lines",
    "write_kitti_scene", "write_semantickitti_scene", "generate_dataset",
]

#: SemanticKITTI ids used by the simulator.
SEMANTIC_IDS = {
    "unlabeled": 0, "car": 10, "truck": 18, "person": 30, "bicyclist": 31, "road": 40, "parking": 44,
    "sidewalk": 48, "building": 50, "fence": 51, "vegetation": 70, "trunk": 71, "terrain": 72, "pole": 80,
    "traffic-sign": 81,
}
_S = SEMANTIC_IDS
#: KITTI object classes -> SemanticKITTI id of their points (vans are "car" in SemanticKITTI's definition).
KITTI_CLASSES = {"Car": 10, "Van": 10, "Truck": 18, "Pedestrian": 30, "Cyclist": 31}
#: ``(width, height)`` of the KITTI colour images the camera labels refer to.
KITTI_IMAGE_SIZE = (1242, 375)
_MAX_OBJECT_RANGE = 70.0  # objects are placed out to this distance (m)
_EXTENT = 150.0  # the ground and the street run this far from the sensor (m)


# ----------------------------------------------------------------------------- sensors
@dataclass(frozen=True)
class Sensor:
    """A spinning multi-beam LiDAR.

    Args:
        name: short name.
        elevations_deg: beam elevations in degrees, highest first (beam / ring 0 on top).
        columns: firings per beam and revolution (horizontal step ``360 / columns`` degrees).
        max_range, min_range: returns outside ``[min_range, max_range]`` (m) are dropped.
        height: mounting height above the road (m); the road under the vehicle is at ``z = -height``.
        range_noise: standard deviation of the Gaussian range noise (m).
        dropout: mean probability that a firing returns nothing, per beam; ``weak_beams`` beams
            drop ``weak_dropout`` of their firings instead.
        detect_range: range (m) at which a target of reflectivity 0.1 seen head-on is detected
            with probability 1/2; the returned power ``reflectivity * (0.2 + 0.8 cos(incidence)) / r^2``
            is compared with that of this reference target.
        intensity_range: range (m) at which the intensity has dropped to half (range attenuation
            ``1 / (1 + (r / intensity_range)^4)``).
        origin_z: height of each beam's emitter above the LiDAR frame origin (m), one number per
            beam (or one for all); a beam's points lie on a cone from ``(0, 0, origin_z)``.
        ego: boxes ``(x, y, z, l, w, h)`` (LiDAR frame, axis-aligned) of the vehicle carrying the
            sensor: rays that meet them return nothing (the self-occlusion seen in the lowest
            beams of real scans).

    Example:
        >>> s = get_sensor("hdl64")
        >>> s.beams, s.columns, round(s.elevations_deg[0], 2), round(s.elevations_deg[-1], 2)
        (64, 2083, 1.95, -25.0)
    """

    name: str
    elevations_deg: Tuple[float, ...]
    columns: int
    max_range: float
    min_range: float = 0.9
    height: float = 1.73
    range_noise: float = 0.02
    dropout: float = 0.01
    weak_beams: int = 2
    weak_dropout: float = 0.15
    detect_range: float = 50.0
    intensity_range: float = 55.0
    origin_z: Union[float, Tuple[float, ...]] = 0.0
    ego: Tuple[Tuple[float, ...], ...] = ()

    def __post_init__(self):
        el = tuple(float(e) for e in self.elevations_deg)
        object.__setattr__(self, "elevations_deg", el)
        oz = np.broadcast_to(np.asarray(self.origin_z, np.float64), (len(el),))
        object.__setattr__(self, "origin_z", tuple(float(v) for v in oz))
        if len(el) < 1 or any(b >= a for a, b in zip(el, el[1:])):
            raise ValueError(f"sensor {self.name!r}: elevations must be strictly decreasing, got {el}")
        if self.columns < 1 or not 0 <= self.min_range < self.max_range:
            raise ValueError(f"sensor {self.name!r}: need columns >= 1 and 0 <= min_range < max_range")

    @property
    def beams(self) -> int:
        return len(self.elevations_deg)

    def grid(self, az_start: float = -np.pi) -> RayGrid:
        """The :class:`~sparseconv.datasets._raycast.RayGrid` of one revolution."""
        return RayGrid(np.radians(self.elevations_deg), self.columns, az_start, np.asarray(self.origin_z))


def _hdl64_elevations() -> Tuple[float, ...]:
    # Two blocks of 32 lasers. Fitted to the rings of the real KITTI scans (each ring is a cone
    # z = z0 + d tan(elevation); tools/compare_synthetic.py --fit-rings): upper block +1.94 .. -8.71
    # deg, ~0.344 deg apart, emitters 0.20 m above the frame origin; lower block -9.02 .. -25.0 deg,
    # ~0.516 deg apart, emitters 0.12 m above it.
    upper = np.linspace(1.95, -8.70, 32)
    lower = np.linspace(-9.00, -25.0, 32)
    return tuple(np.round(np.concatenate([upper, lower]), 4).tolist())


# VLP-32C beam elevations (degrees), from the VLP-32C user manual, highest first.
_VLP32C = (15.0, 10.333, 7.0, 4.667, 3.333, 2.333, 1.667, 1.333, 1.0, 0.667, 0.333, 0.0, -0.333, -0.667, -1.0,
           -1.333, -1.667, -2.0, -2.333, -2.667, -3.0, -3.333, -3.667, -4.0, -4.667, -5.333, -6.148, -7.254,
           -8.843, -11.31, -15.639, -25.0)

# The KITTI recording car as seen from its HDL-64E (LiDAR frame): the hood edge 2.0 m ahead and
# 0.67 m below the sensor, the trunk edge 2.5 m behind and 0.77 m below, a mount 1 m to the right.
# In the real scans the lower block returns nothing ahead (|az| < 15 deg) below about -21.5 deg
# elevation, behind (|az| > 165 deg) below about -19.5 deg, and at az -75 +- 10 deg below about
# -17 deg; these boxes reproduce that.
_KITTI_EGO = ((1.0, 0.0, -1.10, 2.0, 1.8, 0.86), (-1.25, 0.0, -1.15, 2.5, 1.8, 0.76),
              (0.26, -0.97, -0.79, 0.3, 0.3, 1.2))

#: The built-in sensors by name.
SENSORS: Dict[str, Sensor] = {
    # KITTI's Velodyne HDL-64E S2: 64 beams in two blocks, ~0.17 deg steps at 10 Hz, 120 m, 1.73 m above the road
    "hdl64": Sensor("hdl64", _hdl64_elevations(), columns=2083, max_range=120.0, min_range=0.9, height=1.73,
                    range_noise=0.02, dropout=0.01, weak_beams=2, weak_dropout=0.15,
                    origin_z=(0.20,) * 32 + (0.12,) * 32, ego=_KITTI_EGO),
    # Velodyne VLP-32C: 32 beams +15..-25 deg, denser near the horizon, 0.2 deg at 10 Hz, 200 m
    "vlp32c": Sensor("vlp32c", _VLP32C, columns=1800, max_range=200.0, min_range=0.5, height=1.73,
                     range_noise=0.03, dropout=0.005, weak_beams=1, weak_dropout=0.1, detect_range=60.0),
    # Ouster OS1-128: 128 uniform beams +22.5..-22.5 deg, 2048 columns, 120 m
    "os1-128": Sensor("os1-128", tuple(np.linspace(22.5, -22.5, 128).tolist()), columns=2048, max_range=120.0,
                      min_range=0.5, height=1.73, range_noise=0.03, dropout=0.005, weak_beams=0, detect_range=45.0),
}


def get_sensor(sensor: Union[str, Sensor]) -> Sensor:
    """A :class:`Sensor` by name (``hdl64``, ``vlp32c``, ``os1-128``), or ``sensor`` itself.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if isinstance(sensor, Sensor):
        return sensor
    key = str(sensor).lower().replace("_", "-")
    key = {"hdl-64": "hdl64", "hdl-64e": "hdl64", "hdl64e": "hdl64", "vlp-32c": "vlp32c", "os1": "os1-128",
           "os1128": "os1-128"}.get(key, key)
    if key not in SENSORS:
        raise ValueError(f"unknown sensor {sensor!r}; known sensors: {', '.join(SENSORS)}")
    return SENSORS[key]


# ----------------------------------------------------------------------------- seeds and splits
def scene_seed(seed: int, index: int) -> int:
    """The seed of scene ``index`` of a dataset generated with ``seed`` (independent streams).

    Example:
        >>> scene_seed(0, 1) != scene_seed(0, 2) != scene_seed(1, 1)
        True
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed}, {index}")
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(2, np.uint32).view(np.uint64)[0]
               >> np.uint64(1))


def is_val_scene(index: int, val_fraction: float) -> bool:
    """Whether scene ``index`` is in the validation split: every ``1 / val_fraction``-th scene.

    Scene ``i`` is a validation scene when ``floor((i + 1) f) > floor(i f)``, so any prefix of
    ``n`` scenes holds ``floor(n f)`` validation scenes and adding scenes never moves one.
    """
    if not 0 <= val_fraction <= 1:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    return math.floor((index + 1) * val_fraction + 1e-9) > math.floor(index * val_fraction + 1e-9)


def _split_rank(index: int, val_fraction: float) -> int:
    """Position of scene ``index`` within its split (train or val)."""
    before_val = math.floor(index * val_fraction + 1e-9)
    return before_val if is_val_scene(index, val_fraction) else index - before_val


# ----------------------------------------------------------------------------- calibration
def kitti_calib() -> Dict[str, np.ndarray]:
    """A KITTI object calib for a simple rig (values in the docstring; no real calibration copied).

    * Camera 0 (reference, rectified) sits 0.27 m ahead of and 0.08 m below the LiDAR, looking
      along the LiDAR's +x: ``x_cam = -y_lidar, y_cam = -z_lidar, z_cam = x_lidar``;
      ``R0_rect`` is the identity (an ideally rectified rig).
    * All four cameras share ``K`` with focal length 720 px and principal point (621, 187.5)
      (the centre of a 1242 x 375 image); camera 1 is 0.54 m right of camera 0, camera 2
      0.06 m left, camera 3 0.48 m right: ``P_i = K [I | (-b_i, 0, 0)]``.
    * The IMU is 0.81 m behind, 0.32 m left of and 0.80 m below the LiDAR, axes aligned.

    Returns:
        ``{"P0".."P3": [3, 4], "R0_rect": [3, 3], "Tr_velo_to_cam": [3, 4], "Tr_imu_to_velo": [3, 4]}``.
    """
    f, cu, cv = 720.0, 621.0, 187.5
    K = np.array([[f, 0, cu], [0, f, cv], [0, 0, 1]])
    calib = {}
    for i, b in enumerate((0.0, 0.54, -0.06, 0.48)):
        calib[f"P{i}"] = K @ np.hstack([np.eye(3), [[-b], [0.0], [0.0]]])
    calib["R0_rect"] = np.eye(3)
    R = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    cam_in_lidar = np.array([0.27, 0.0, -0.08])
    calib["Tr_velo_to_cam"] = np.hstack([R, (-R @ cam_in_lidar)[:, None]])
    calib["Tr_imu_to_velo"] = np.hstack([np.eye(3), np.array([[-0.81], [0.32], [-0.80]])])
    return calib


def format_kitti_calib(calib: Dict[str, np.ndarray]) -> str:
    """The text of a KITTI object ``calib/NNNNNN.txt`` file (12 or 9 numbers per line, ``%.12e``)."""
    lines = []
    for name in ("P0", "P1", "P2", "P3", "R0_rect", "Tr_velo_to_cam", "Tr_imu_to_velo"):
        values = np.asarray(calib[name], np.float64).reshape(-1)
        lines.append(f"{name}: " + " ".join(f"{v:.12e}" for v in values))
    return "\n".join(lines) + "\n\n"


def _velo_to_rect(calib) -> np.ndarray:
    r0 = np.eye(4)
    r0[:3, :3] = calib["R0_rect"]
    v2c = np.eye(4)
    v2c[:3, :] = calib["Tr_velo_to_cam"]
    return r0 @ v2c


def _box_corners(boxes: np.ndarray) -> np.ndarray:
    """``[M, 8, 3]`` corners of LiDAR boxes ``[M, 7]``."""
    b = np.asarray(boxes, np.float64).reshape(-1, 7)
    sx = np.array([1, 1, -1, -1, 1, 1, -1, -1]) * 0.5
    sy = np.array([1, -1, -1, 1, 1, -1, -1, 1]) * 0.5
    sz = np.array([-1, -1, -1, -1, 1, 1, 1, 1]) * 0.5
    lx, ly, lz = sx[None] * b[:, 3:4], sy[None] * b[:, 4:5], sz[None] * b[:, 5:6]
    c, s = np.cos(b[:, 6:7]), np.sin(b[:, 6:7])
    return np.stack([b[:, 0:1] + c * lx - s * ly, b[:, 1:2] + s * lx + c * ly, b[:, 2:3] + lz], -1)


_BOX_EDGES = np.array([[0, 1], [1, 2], [2, 3], [3, 0], [4, 5], [5, 6], [6, 7], [7, 4], [0, 4], [1, 5], [2, 6],
                       [3, 7]])


def lidar_boxes_to_kitti(boxes, calib: Dict[str, np.ndarray], image_size=KITTI_IMAGE_SIZE) -> Dict[str, np.ndarray]:
    """Camera-frame KITTI fields of LiDAR boxes ``[M, 7]`` (``x, y, z`` centre, ``l, w, h``, ``yaw``).

    Returns:
        ``{"location": [M, 3]`` (bottom centre, rectified camera 0 frame), ``"dimensions": [M, 3]``
        (h, w, l), ``"rotation_y": [M]`` (``-yaw - pi/2``, in ``[-pi, pi)``), ``"alpha": [M]``
        (``rotation_y - atan2(x, z)``, in ``[-pi, pi)``), ``"bbox": [M, 4]`` (left, top, right,
        bottom in image 2, clipped to the image; the box's edges are clipped at 0.1 m in front of
        the camera before projecting with ``P2``; zeros for a box entirely behind the camera),
        ``"truncation": [M]`` (fraction of a 6 x 6 x 6 grid of points spread through the box that
        falls outside image 2 or behind the camera)``}``.
    """
    b = np.asarray(boxes, np.float64).reshape(-1, 7)
    M = len(b)
    T = _velo_to_rect(calib)
    P2 = np.asarray(calib["P2"], np.float64)
    W, H = image_size
    bottom = np.c_[b[:, 0], b[:, 1], b[:, 2] - b[:, 5] / 2, np.ones(M)]
    loc = (bottom @ T.T)[:, :3]
    ry = -b[:, 6] - np.pi / 2
    ry = ry - np.floor(ry / (2 * np.pi) + 0.5) * 2 * np.pi
    alpha = ry - np.arctan2(loc[:, 0], loc[:, 2])
    alpha = alpha - np.floor(alpha / (2 * np.pi) + 0.5) * 2 * np.pi
    # truncation: a grid of points through each box
    g = (np.arange(6) + 0.5) / 6 - 0.5
    gx, gy, gz = np.meshgrid(g, g, g, indexing="ij")
    local = np.stack([gx.ravel(), gy.ravel(), gz.ravel()], 1)  # [S, 3] in units of the box size
    lx, ly, lz = (local[None] * b[:, None, 3:6]).transpose(2, 0, 1)
    c, s = np.cos(b[:, 6:7]), np.sin(b[:, 6:7])
    pts = np.stack([b[:, 0:1] + c * lx - s * ly, b[:, 1:2] + s * lx + c * ly, b[:, 2:3] + lz, np.ones_like(lx)], -1)
    cam = pts @ T.T  # [M, S, 4]
    img = cam @ P2.T
    with np.errstate(divide="ignore", invalid="ignore"):
        u, v = img[..., 0] / img[..., 2], img[..., 1] / img[..., 2]
    inside = (cam[..., 2] > 0.1) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
    truncation = 1.0 - inside.mean(1) if M else np.zeros(0)
    # 2D box: project the box edges clipped at z_cam = 0.1
    corners = _box_corners(b)
    cc = np.concatenate([corners, np.ones((M, 8, 1))], -1) @ T.T  # [M, 8, 4]
    p, q = cc[:, _BOX_EDGES[:, 0]], cc[:, _BOX_EDGES[:, 1]]  # [M, 12, 4]
    near = 0.1
    zp, zq = p[..., 2:3], q[..., 2:3]
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.clip((near - zp) / (zq - zp), 0, 1)
        g = np.clip((near - zq) / (zp - zq), 0, 1)
    p_cl = np.where(zp < near, p + f * (q - p), p)
    q_cl = np.where(zq < near, q + g * (p - q), q)
    keep = ~((zp < near) & (zq < near))[..., 0]  # edges with some part in front
    ends = np.concatenate([p_cl, q_cl], 1) @ P2.T  # [M, 24, 3]
    ok = np.concatenate([keep, keep], 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        eu, ev = ends[..., 0] / ends[..., 2], ends[..., 1] / ends[..., 2]
    bbox = np.zeros((M, 4))
    for i in range(M):
        if ok[i].any():
            x0, x1 = eu[i, ok[i]].min(), eu[i, ok[i]].max()
            y0, y1 = ev[i, ok[i]].min(), ev[i, ok[i]].max()
            bbox[i] = [np.clip(x0, 0, W - 1), np.clip(y0, 0, H - 1), np.clip(x1, 0, W - 1), np.clip(y1, 0, H - 1)]
    return {"location": loc, "dimensions": b[:, [5, 4, 3]].copy(), "rotation_y": ry, "alpha": alpha, "bbox": bbox,
            "truncation": truncation}


def _difficulty(bbox_height, occluded, truncation) -> np.ndarray:
    """KITTI difficulty: 0 easy (>= 40 px, fully visible, <= 15 % truncated), 1 moderate (>= 25 px,
    partly occluded, <= 30 %), 2 hard (>= 25 px, largely occluded, <= 50 %), -1 none of them."""
    out = np.full(len(bbox_height), -1, np.int64)
    for level, (hmin, omax, tmax) in reversed(list(enumerate([(40, 0, 0.15), (25, 1, 0.30), (25, 2, 0.50)]))):
        ok = (bbox_height >= hmin) & (occluded <= omax) & (truncation <= tmax)
        out[ok] = level
    return out


def kitti_label_lines(names, kitti: Dict[str, np.ndarray], occluded) -> List[str]:
    """KITTI ``label_2`` lines: ``type truncated occluded alpha bbox(4) h w l x y z rotation_y``.

    Geometry is written with 4 decimals (KITTI uses 2), so that the boxes read back to 1e-4 m.
    """
    lines = []
    for i, name in enumerate(names):
        h, w, l = kitti["dimensions"][i]
        x, y, z = kitti["location"][i]
        x0, y0, x1, y1 = kitti["bbox"][i]
        lines.append(f"{name} {kitti['truncation'][i]:.2f} {int(occluded[i])} {kitti['alpha'][i]:.4f} "
                     f"{x0:.2f} {y0:.2f} {x1:.2f} {y1:.2f} {h:.4f} {w:.4f} {l:.4f} {x:.4f} {y:.4f} {z:.4f} "
                     f"{kitti['rotation_y'][i]:.4f}")
    return lines


# ----------------------------------------------------------------------------- the scan
@dataclass
class Scan:
    """One simulated revolution.

    Attributes:
        points: float32 ``[N, 4]``: ``x, y, z, intensity`` in the LiDAR frame (intensity in
            [0, 1], steps of 0.01 like KITTI), ordered by beam (top first) then azimuth.
        semantic: uint16 ``[N]`` SemanticKITTI ids (:data:`SEMANTIC_IDS`).
        instance: uint16 ``[N]``: the object's instance id, 0 for stuff.
        ring: uint16 ``[N]`` beam index (0 = highest beam); column: uint16 ``[N]`` firing index.
        boxes: float64 ``[M, 7]``: every object's box in the LiDAR frame, ``x, y, z`` (centre),
            ``l, w, h``, ``yaw`` (0 faces +x), out to 70 m all around.
        names: ``[M]`` KITTI classes (``Car``, ``Van``, ``Truck``, ``Pedestrian``, ``Cyclist``).
        box_instance: uint16 ``[M]`` instance id of each box.
        num_points: int64 ``[M]`` points of each object in the scan.
        occlusion: float64 ``[M]``: fraction of the rays meeting the object that something
            nearer blocks (NaN when no ray meets it); occluded: int64 ``[M]`` KITTI level
            (0: < 10 %, 1: < 60 %, 2: more, 3: no ray meets it).
        truncation, alpha, bbox, difficulty: KITTI camera fields of each box (see
            :func:`lidar_boxes_to_kitti`); difficulty 0 / 1 / 2 easy / moderate / hard, -1 none.
        in_label_2: bool ``[M]``: the object is written to ``label_2``: partly inside image 2
            (truncation < 1, a 2D box of positive size) and hit by at least one point.
        sensor, seed, calib: what produced it.
        kitti: every box's camera fields (:func:`lidar_boxes_to_kitti`: location, dimensions,
            rotation_y, alpha, bbox, truncation).
        scene: the :class:`Scene` (for inspection; not written anywhere).
    """

    points: np.ndarray
    semantic: np.ndarray
    instance: np.ndarray
    ring: np.ndarray
    column: np.ndarray
    boxes: np.ndarray
    names: np.ndarray
    box_instance: np.ndarray
    num_points: np.ndarray
    occlusion: np.ndarray
    occluded: np.ndarray
    truncation: np.ndarray
    alpha: np.ndarray
    bbox: np.ndarray
    difficulty: np.ndarray
    in_label_2: np.ndarray
    sensor: Sensor
    seed: Optional[int]
    calib: Dict[str, np.ndarray]
    kitti: Dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    scene: Optional[Scene] = field(repr=False, default=None)

    def __repr__(self) -> str:
        counts = {n: int((self.names == n).sum()) for n in KITTI_CLASSES if (self.names == n).any()}
        return (f"Scan({len(self.points)} points, sensor={self.sensor.name}, seed={self.seed}, boxes={counts}, "
                f"label_2={int(self.in_label_2.sum())})")

    def label_lines(self) -> List[str]:
        """The KITTI ``label_2`` lines of the objects in image 2 (``in_label_2``)."""
        k = {key: np.asarray(v)[self.in_label_2] for key, v in self.kitti.items()}
        return kitti_label_lines(self.names[self.in_label_2], k, self.occluded[self.in_label_2])

    def to_point_cloud(self):
        """A :class:`sparseconv.io.PointCloud` with ``intensity``, ``ring``, ``semantic`` and ``instance`` fields."""
        from ..io import PointCloud

        return PointCloud(self.points[:, :3], {"intensity": self.points[:, 3], "ring": self.ring,
                                               "semantic": self.semantic, "instance": self.instance})


def simulate_scan(seed: Optional[int] = 0, sensor: Union[str, Sensor] = "hdl64", scene: Optional[Scene] = None,
                  ideal: bool = False, calib: Optional[Dict[str, np.ndarray]] = None) -> Scan:
    """Simulates one revolution of ``sensor`` in the scene of ``seed`` (or in ``scene``).

    Args:
        seed: the scene and sensor-noise seed (a scene ``i`` of a dataset uses
            :func:`scene_seed` ``(seed, i)``). Same seed, same scan, byte for byte.
        sensor: a name from :data:`SENSORS` or a :class:`Sensor`.
        scene: a hand-built :class:`Scene` to scan instead of generating one (``seed`` then
            only seeds the noise).
        ideal: no range noise, dropout, detection threshold or intensity noise (exact hits,
            only ``min_range`` / ``max_range`` apply), column 0 at azimuth -pi exactly.
        calib: the camera rig for the KITTI labels (default :func:`kitti_calib`).

    Returns:
        :class:`Scan`.

    Example:
        >>> scan = simulate_scan(3, "vlp32c")
        >>> scan.points.dtype, scan.semantic.dtype, len(scan.boxes) == len(scan.names)
        (dtype('float32'), dtype('uint16'), True)
    """
    sensor = get_sensor(sensor)
    seed_i = 0 if seed is None else int(seed)
    if seed_i < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if scene is None:
        scene = generate_scene(seed_i, sensor)
    calib = kitti_calib() if calib is None else calib
    rng = np.random.default_rng([seed_i, 1])
    step = 2 * np.pi / sensor.columns
    az_start = -np.pi if ideal else -np.pi + rng.uniform(0, step)
    grid = sensor.grid(az_start)
    res = cast(scene, grid, salt=seed_i)
    R = len(res.t)
    B, C = sensor.beams, sensor.columns
    beam = np.repeat(np.arange(B), C)
    t = res.t
    geometric = np.isfinite(t) & (t >= sensor.min_range) & (t <= sensor.max_range)
    if sensor.ego:  # self-occlusion by the vehicle: no return
        ego = Scene(None)
        for x, y, z, l, w, h in sensor.ego:
            ego.add_box((x, y, z), (l, w, h))
        geometric &= ~np.isfinite(cast(ego, grid).t)
    refl = res.reflectivity.copy()
    _facade_windows(grid, res, refl)
    # per-beam dropout, the detection threshold on the returned power, noise: one draw per ray
    u_drop, u_det = rng.random(R), rng.random(R)
    n_range, n_int = rng.standard_normal(R), rng.standard_normal(R)
    beam_drop = np.full(B, sensor.dropout)
    if sensor.weak_beams:
        beam_drop[rng.choice(B, size=min(sensor.weak_beams, B), replace=False)] = sensor.weak_dropout
    cos_term = 0.2 + 0.8 * res.cos_incidence
    tt = np.where(geometric, t, 1.0)
    if ideal:
        ret = geometric
        rng_t = t
    else:
        power = refl * cos_term / tt ** 2
        ref = 0.1 / sensor.detect_range ** 2
        with np.errstate(divide="ignore"):
            p_det = 1.0 / (1.0 + (ref / np.maximum(power, 1e-30)) ** 3)
        ret = geometric & (u_drop >= beam_drop[beam]) & (u_det < p_det)
        rng_t = t + sensor.range_noise * n_range
    idx = np.nonzero(ret)[0]
    D = grid.directions()[idx]
    r = rng_t[idx]
    xyz = D * r[:, None]
    xyz[:, 2] += grid.ray_origin_z()[idx]
    cos_i = res.cos_incidence[idx]
    atten = 1.0 / (1.0 + (t[idx] / sensor.intensity_range) ** 4)
    inten = refl[idx] * (0.5 + 0.5 * cos_i) * atten
    if not ideal:
        inten = inten - 0.02 + 0.02 * n_int[idx]
    inten = np.round(np.clip(inten, 0.0, 1.0) * 100) / 100
    points = np.concatenate([xyz, inten[:, None]], 1).astype(np.float32)
    semantic, instance = res.semantic[idx], res.instance[idx]

    # objects
    objs = scene.objects
    M = len(objs)
    boxes = np.array([o["box"] for o in objs], np.float64).reshape(M, 7)
    names = np.array([o["name"] for o in objs], dtype="<U10")
    box_inst = np.array([o["instance"] for o in objs], np.uint16)
    max_inst = int(box_inst.max()) + 1 if M else 1
    num_points = np.bincount(instance.astype(np.int64), minlength=max_inst)[box_inst.astype(np.int64)] if M \
        else np.zeros(0, np.int64)
    # occlusion: rays meeting the object (within range) vs rays whose nearest hit is the object
    ah = res.any_hits
    ah = ah[geometric[ah[:, 1]]] if len(ah) else ah
    n_any = np.bincount(ah[:, 0], minlength=max_inst) if len(ah) else np.zeros(max_inst, np.int64)
    n_vis = np.bincount(res.instance[geometric].astype(np.int64), minlength=max_inst)
    n_any_b = n_any[box_inst.astype(np.int64)] if M else np.zeros(0)
    n_vis_b = n_vis[box_inst.astype(np.int64)] if M else np.zeros(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        occlusion = np.where(n_any_b > 0, 1.0 - n_vis_b / np.maximum(n_any_b, 1), np.nan)
    occluded = np.where(n_any_b == 0, 3, np.where(occlusion < 0.1, 0, np.where(occlusion < 0.6, 1, 2)))
    kitti = lidar_boxes_to_kitti(boxes, calib)
    bb = kitti["bbox"]
    in_image = (kitti["truncation"] < 1.0) & (bb[:, 2] > bb[:, 0]) & (bb[:, 3] > bb[:, 1])
    in_label_2 = in_image & (num_points > 0)
    difficulty = _difficulty(bb[:, 3] - bb[:, 1], occluded, kitti["truncation"])
    return Scan(points=points, semantic=semantic.astype(np.uint16), instance=instance.astype(np.uint16),
                ring=beam[idx].astype(np.uint16), column=(idx % C).astype(np.uint16), boxes=boxes, names=names,
                box_instance=box_inst, num_points=num_points.astype(np.int64), occlusion=occlusion,
                occluded=occluded.astype(np.int64), truncation=kitti["truncation"], alpha=kitti["alpha"],
                bbox=kitti["bbox"], difficulty=difficulty, in_label_2=in_label_2, sensor=sensor,
                seed=seed, calib=calib, kitti=kitti, scene=scene)


def _facade_windows(grid: RayGrid, res, refl: np.ndarray) -> None:
    """Glass on building walls: a grid of 1.4 m x 1.4 m windows every 3 m, reflectivity 0.03."""
    hit = np.nonzero((res.semantic == _S["building"]) & (np.abs(res.normal[:, 2]) < 0.5) & np.isfinite(res.t))[0]
    if len(hit) == 0:
        return
    p = grid.directions()[hit] * res.t[hit, None]
    p[:, 2] += grid.ray_origin_z()[hit]
    n = res.normal[hit]
    along = -p[:, 0] * n[:, 1] + p[:, 1] * n[:, 0]  # coordinate along the wall
    offset = (p * n).sum(1)  # distance of the wall plane: shifts the pattern from wall to wall
    window = (np.mod(along + offset, 3.0) < 1.4) & (np.mod(p[:, 2] + 0.3, 3.0) < 1.4) & (p[:, 2] > -0.9)
    refl[hit[window]] = 0.03


# ----------------------------------------------------------------------------- scene generation
# KITTI-like object sizes: mean and standard deviation of (l, w, h) in metres.
_SIZES = {
    "Car": ((3.9, 1.6, 1.56), (0.35, 0.08, 0.10)),
    "Van": ((5.0, 1.9, 2.2), (0.40, 0.10, 0.18)),
    "Truck": ((9.0, 2.5, 3.3), (2.20, 0.10, 0.35)),
    "Pedestrian": ((0.8, 0.6, 1.73), (0.12, 0.07, 0.09)),
    "Cyclist": ((1.76, 0.6, 1.73), (0.12, 0.06, 0.08)),
}


def _sample_size(rng, name) -> Tuple[float, float, float]:
    mean, std = _SIZES[name]
    z = np.clip(rng.standard_normal(3), -2.0, 2.0)
    l, w, h = (np.array(mean) + z * np.array(std)).tolist()
    if name == "Truck":
        l = float(np.clip(l, 5.5, 13.0))
    return l, w, h


def _object_parts(name: str, l: float, w: float, h: float, rng) -> List[tuple]:
    """Parts in the object frame (origin at the bottom centre, x forward), all inside ``l x w x h``.

    Each part: ``("box", (x, y, z_centre), (sx, sy, sz), reflectivity, porosity)`` or
    ``("ellipsoid", (x, y, z), (rx, ry, rz), reflectivity, 0)``.
    """
    parts = []
    if name in ("Car", "Van", "Truck"):
        paint = float(rng.choice([0.01, 0.05, 0.15, 0.25, 0.35, 0.5, 0.65],
                                 p=[0.15, 0.15, 0.15, 0.15, 0.15, 0.15, 0.1]))
        wd = 0.62 if name != "Truck" else 0.95
        axles = [l / 2 - 0.8, -(l / 2 - 0.8)] if name != "Truck" else [l / 2 - 1.1, -(l / 2 - 1.3), -(l / 2 - 2.7)]
        for ax in axles:
            for side in (1, -1):
                parts.append(("box", (ax, side * (w / 2 - 0.14), wd / 2), (wd, 0.26, wd), 0.02, 0.0))  # tyres
        if name == "Car":
            top = 0.6 * h
            parts.append(("box", (0.0, 0.0, (0.3 + top) / 2), (l, w, top - 0.3), paint, 0.0))
            cl = 0.5 * l
            parts.append(("box", (-0.06 * l, 0.0, (top + h) / 2), (cl, 0.86 * w, h - top), 0.02, 0.3))  # glass
        elif name == "Van":
            top = 0.5 * h
            parts.append(("box", (0.0, 0.0, (0.3 + top) / 2), (l, w, top - 0.3), paint, 0.0))
            ul = l - 0.9
            parts.append(("box", (-l / 2 + ul / 2, 0.0, (top + h) / 2), (ul, 0.96 * w, h - top), paint, 0.0))
        else:
            cab = 2.3
            parts.append(("box", (0.0, 0.0, 0.8), (l, 0.8 * w, 0.6), 0.1, 0.0))  # chassis
            parts.append(("box", (l / 2 - cab / 2, 0.0, (0.5 + 0.82 * h) / 2), (cab, w, 0.82 * h - 0.5), paint, 0.0))
            cargo = l - cab - 0.3
            parts.append(("box", (-l / 2 + cargo / 2, 0.0, (1.1 + h) / 2), (cargo, w, h - 1.1),
                          float(rng.uniform(0.3, 0.7)), 0.0))
    elif name == "Pedestrian":
        cloth = float(rng.uniform(0.1, 0.45))
        leg_h = 0.47 * h
        stride = float(rng.uniform(0.0, 0.5)) * (l / 2 - 0.1)
        for sx, sy in ((stride, 0.1), (-stride, -0.1)):
            parts.append(("box", (sx, sy * min(1.0, w / 0.6), leg_h / 2), (0.16, 0.15, leg_h), cloth, 0.0))
        torso_h = 0.33 * h
        parts.append(("box", (0.0, 0.0, leg_h + torso_h / 2), (0.26, min(0.42, w - 0.16), torso_h), cloth, 0.0))
        for side in (1, -1):
            parts.append(("box", (0.0, side * (w / 2 - 0.05), leg_h + torso_h * 0.55), (0.1, 0.09, 0.36 * h),
                          cloth, 0.0))
        head_r = 0.115
        parts.append(("ellipsoid", (0.0, 0.0, h - head_r), (0.1, 0.085, head_r), 0.3, 0.0))
    elif name == "Cyclist":
        cloth = float(rng.uniform(0.1, 0.45))
        wheel = min(0.68, h * 0.4)
        for sx in (l / 2 - wheel / 2, -(l / 2 - wheel / 2)):
            parts.append(("box", (sx, 0.0, wheel / 2), (wheel, 0.05, wheel), 0.25, 0.3))
        parts.append(("box", (0.0, 0.0, wheel * 0.85), (l - wheel, 0.06, 0.22), 0.35, 0.0))  # frame
        seat = 0.55 * h
        parts.append(("box", (-0.1, 0.0, (wheel * 0.5 + seat) / 2), (0.3, 0.3, seat - wheel * 0.5), cloth, 0.0))
        torso_h = 0.3 * h
        parts.append(("box", (0.05, 0.0, seat + torso_h / 2), (0.4, min(0.4, w - 0.1), torso_h), cloth, 0.0))
        for side in (1, -1):
            parts.append(("box", (0.35, side * (w / 2 - 0.06), seat + torso_h * 0.6), (0.45, 0.08, 0.08),
                          cloth, 0.0))
        head_r = 0.11
        parts.append(("ellipsoid", (0.1, 0.0, h - head_r), (0.11, 0.09, head_r), 0.3, 0.0))
    return parts


def _rect_overlap(a: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Separating-axis test of one BEV rectangle ``(x, y, l, w, yaw)`` against ``[K, 5]``: bool ``[K]``."""
    if len(others) == 0:
        return np.zeros(0, bool)

    def corners(r):
        r = np.atleast_2d(r)
        half = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]]) * 0.5
        loc = half[None] * r[:, None, 2:4]
        c, s = np.cos(r[:, 4])[:, None], np.sin(r[:, 4])[:, None]
        return np.stack([r[:, 0:1] + c * loc[..., 0] - s * loc[..., 1], r[:, 1:2] + s * loc[..., 0] + c * loc[..., 1]],
                        -1)

    ca, cb = corners(a), corners(others)  # [1, 4, 2], [K, 4, 2]
    K = len(others)
    sep = np.zeros(K, bool)
    axes = [np.broadcast_to([np.cos(a[4]), np.sin(a[4])], (K, 2)),
            np.broadcast_to([-np.sin(a[4]), np.cos(a[4])], (K, 2)),
            np.stack([np.cos(others[:, 4]), np.sin(others[:, 4])], 1),
            np.stack([-np.sin(others[:, 4]), np.cos(others[:, 4])], 1)]
    for ax in axes:
        pa = np.einsum("kd,cd->kc", ax, ca[0])
        pb = np.einsum("kd,kcd->kc", ax, cb)
        sep |= (pa.max(1) < pb.min(1)) | (pb.max(1) < pa.min(1))
    return ~sep


class _Builder:
    """Builds one procedural street scene (see :func:`generate_scene`)."""

    def __init__(self, seed: int, sensor: Sensor):
        self.rng = np.random.default_rng([int(seed), 0])
        self.sensor = sensor
        self._occ = np.zeros((1024, 5))  # BEV rectangles (x, y, l, w, yaw) in the LiDAR frame
        self._n_occ = 0
        self.next_instance = 1

    # ---------------------------------------------------------------- helpers
    def occupy(self, rect, margin=0.0) -> bool:
        """Registers a BEV rectangle unless it overlaps (with ``margin``) one already placed."""
        r = np.array(rect, np.float64)
        grown = r.copy()
        grown[2:4] += 2 * margin
        n = self._n_occ
        if n:
            occ = self._occ[:n]
            # bounding circles first, the separating-axis test only for the near ones
            reach = np.hypot(grown[2], grown[3]) / 2 + np.hypot(occ[:, 2], occ[:, 3]) / 2
            near = np.nonzero(np.hypot(occ[:, 0] - r[0], occ[:, 1] - r[1]) < reach)[0]
            if len(near) and _rect_overlap(grown, occ[near]).any():
                return False
        if n == len(self._occ):
            self._occ = np.concatenate([self._occ, np.zeros_like(self._occ)])
        self._occ[n] = r
        self._n_occ += 1
        return True

    def xy(self, u, v):
        x, y = self.ground.to_lidar(u, v)
        return float(x), float(y)

    def z_at(self, x, y) -> float:
        return float(self.ground.height_at(x, y))

    # ---------------------------------------------------------------- street layout
    def layout(self):
        rng, sensor = self.rng, self.sensor
        lane = float(rng.uniform(3.1, 3.7))
        n_fwd = int(rng.choice([1, 2], p=[0.75, 0.25]))
        n_back = int(rng.choice([0, 1, 2], p=[0.15, 0.7, 0.15]))
        ego_lane = int(rng.integers(n_fwd))
        self.lane, self.n_fwd, self.n_back = lane, n_fwd, n_back
        self.road_r, self.road_l = n_fwd * lane, n_back * lane  # road: v in [-road_r, road_l]
        v_ego = -(ego_lane + 0.5) * lane + float(rng.normal(0, 0.2))
        heading = float(rng.normal(0, 0.03))
        c, s = np.cos(heading), np.sin(heading)
        x0, y0 = v_ego * s, -v_ego * c  # the road-frame origin: sensor at (u, v) = (0, v_ego)
        # longitudinal profile: grade breaks ahead and behind, the ego's segment level with the car
        if rng.random() < 0.3:
            breaks, grades = [], [0.0]
        else:
            breaks = [float(rng.uniform(-80, -20)), float(rng.uniform(20, 80))]
            grades = [float(np.clip(rng.normal(0, 0.025), -0.05, 0.05)), 0.0,
                      float(np.clip(rng.normal(0, 0.025), -0.05, 0.05))]
        cross = float(np.clip(rng.normal(0, 0.005), -0.01, 0.01))
        curb = float(rng.uniform(0.10, 0.18))
        U = _EXTENT
        self.U = U
        sides = {}
        for side in (1, -1):
            park = float(rng.uniform(2.1, 2.5)) if rng.random() < 0.6 else 0.0
            walk = float(rng.uniform(1.5, 3.5))
            zone = str(rng.choice(["urban", "suburban", "green"], p=[0.45, 0.4, 0.15]))
            terrain = {"urban": float(rng.choice([0.0, rng.uniform(0.5, 1.5)])), "suburban": float(rng.uniform(1.5, 4)),
                       "green": float(rng.uniform(2, 6))}[zone]
            edge = self.road_l if side > 0 else self.road_r
            sides[side] = {"park": park, "walk": walk, "zone": zone, "terrain": terrain, "edge": edge,
                           "kerb": edge + park, "back": edge + park + walk + terrain}
        self.sides = sides
        # an optional cross street
        self.cross = None
        if rng.random() < 0.35:
            uc = float(rng.uniform(15, 55)) * (1 if rng.random() < 0.7 else -1)
            wc = float(rng.choice([2, 3, 4])) * lane
            sw = float(rng.uniform(2.0, 3.5))
            self.cross = (uc - wc / 2, uc + wc / 2, sw)
        road_refl = float(rng.uniform(0.46, 0.56))
        walk_refl = float(rng.uniform(0.45, 0.6))
        regions, raised, sem, refl = [], [], [], []

        def region(u0, u1, v0, v1, up, label, rf):
            if u1 > u0 and v1 > v0:
                regions.append((u0, u1, v0, v1))
                raised.append(up)
                sem.append(label)
                refl.append(rf)

        def u_pieces(u0, u1, gap):
            """[u0, u1] without the interval ``gap``."""
            if gap is None:
                return [(u0, u1)]
            out = []
            if gap[0] > u0:
                out.append((u0, min(u1, gap[0])))
            if gap[1] < u1:
                out.append((max(u0, gap[1]), u1))
            return out

        region(-U, U, -self.road_r, self.road_l, False, _S["road"], road_refl)
        curbs = []  # (u0, u1, v) along the road, or ("u", u, v0, v1) across
        cr = self.cross
        big_gap = None if cr is None else (cr[0] - cr[2], cr[1] + cr[2])
        road_gap = None if cr is None else (cr[0], cr[1])
        for side, sd in sides.items():
            def band(a, b):
                return (a, b) if side > 0 else (-b, -a)

            if sd["park"] > 0:
                for a, b in u_pieces(-U, U, big_gap):
                    region(a, b, *band(sd["edge"], sd["kerb"]), False, _S["parking"], road_refl + 0.02)
                if big_gap is not None:
                    region(big_gap[0], big_gap[1], *band(sd["edge"], sd["kerb"]), False, _S["road"], road_refl)
            for a, b in u_pieces(-U, U, big_gap):
                region(a, b, *band(sd["kerb"], sd["kerb"] + sd["walk"]), True, _S["sidewalk"], walk_refl)
                if sd["terrain"] > 0:
                    region(a, b, *band(sd["kerb"] + sd["walk"], sd["back"]), True,
                           _S["terrain"], 0.55)
                back_label = _S["sidewalk"] if sd["zone"] == "urban" else _S["terrain"]
                region(a, b, *band(sd["back"], U), True, back_label, walk_refl if sd["zone"] == "urban" else 0.55)
            for a, b in u_pieces(-U, U, road_gap):
                curbs.append(("v", a, b, side * sd["kerb"]))
            if cr is not None:
                region(cr[0], cr[1], *band(sd["kerb"], U), False, _S["road"], road_refl)
                region(cr[0] - cr[2], cr[0], *band(sd["kerb"], U), True, _S["sidewalk"], walk_refl)
                region(cr[1], cr[1] + cr[2], *band(sd["kerb"], U), True, _S["sidewalk"], walk_refl)
                v0, v1 = band(sd["kerb"], U)
                curbs.append(("u", cr[0], v0, v1))
                curbs.append(("u", cr[1], v0, v1))
        # lane markings
        paint = []
        w_line = float(rng.uniform(0.12, 0.15))
        if n_back > 0:
            solid = rng.random() < 0.5
            paint.append((0.0, w_line, 10.0, 10.0 if solid else 3.0, 0.0, -U, U))
        for k in range(1, n_fwd):
            paint.append((-k * lane, w_line, 12.0, 3.0, float(rng.uniform(0, 12)), -U, U))
        for k in range(1, n_back):
            paint.append((k * lane, w_line, 12.0, 3.0, float(rng.uniform(0, 12)), -U, U))
        for side, sd in sides.items():
            if sd["park"] == 0 and rng.random() < 0.6:
                paint.append((side * (sd["edge"] - 0.25), w_line, 10.0, 10.0, 0.0, -U, U))
        if cr is not None:  # no lines across the junction
            paint = [p for p0 in paint for p in ((*p0[:5], -U, cr[0]), (*p0[:5], cr[1], U))]
        self.ground = Ground(regions=regions, region_raised=raised, region_semantic=sem, region_reflectivity=refl,
                             x0=x0, y0=y0, heading=heading, breaks=breaks, grades=grades, z0=-sensor.height,
                             cross_slope=cross, curb_height=curb, paint=paint, paint_reflectivity=0.85)
        self.scene = Scene(self.ground)
        self.scene.info.update(lanes=(n_fwd, n_back), lane_width=lane, heading=heading, grades=grades, breaks=breaks,
                               curb=curb, cross_street=cr, sides={k: dict(v) for k, v in sides.items()})
        for kind, *geo in curbs:
            self._curb(kind, geo, walk_refl)
        # the ego vehicle
        self.occupy((-0.4, 0.0, 4.8, 2.0, 0.0))

    def _curb(self, kind, geo, refl):
        """Vertical curb faces, in pieces of at most 8 m that do not straddle a grade break."""
        g, h = self.ground, self.ground.curb_height
        if kind == "v":
            a, b, v = geo
            a, b = max(a, -self.U), min(b, self.U)
            cuts = sorted({a, b, *[x for x in g.breaks if a < x < b]})
            for s0, s1 in zip(cuts[:-1], cuts[1:]):
                n = max(1, int(math.ceil((s1 - s0) / 8.0)))
                edges = np.linspace(s0, s1, n + 1)
                for u0, u1 in zip(edges[:-1], edges[1:]):
                    p0 = np.array([*self.xy(u0, v), g.road_level(u0, v)])
                    p1 = np.array([*self.xy(u1, v), g.road_level(u1, v)])
                    self.scene.add_quad(p0, p1 - p0, (0, 0, h), semantic=_S["sidewalk"], reflectivity=refl)
        else:
            u, v0, v1 = geo
            n = max(1, int(math.ceil((v1 - v0) / 8.0)))
            edges = np.linspace(v0, v1, n + 1)
            for a, b in zip(edges[:-1], edges[1:]):
                p0 = np.array([*self.xy(u, a), g.road_level(u, a)])
                p1 = np.array([*self.xy(u, b), g.road_level(u, b)])
                self.scene.add_quad(p0, p1 - p0, (0, 0, h), semantic=_S["sidewalk"], reflectivity=refl)

    def in_junction(self, u, margin=0.0) -> bool:
        cr = self.cross
        return cr is not None and cr[0] - cr[2] - margin <= u <= cr[1] + cr[2] + margin

    # ---------------------------------------------------------------- static things
    def box_uv(self, u, v, l, w, h, yaw_rel, semantic, refl, porosity=0.0, sink=0.3, occupy=True):
        """A box centred at road (u, v), ``l`` along the road, standing on the ground (sunk by ``sink``)."""
        x, y = self.xy(u, v)
        yaw = self.ground.heading + yaw_rel
        if occupy and not self.occupy((x, y, l, w, yaw)):
            return False
        z = self.z_at(x, y) - sink
        self.scene.add_box((x, y, z + h / 2), (l, w, h), yaw, semantic=semantic, reflectivity=refl,
                           porosity=porosity)
        return True

    def buildings(self, side, sd):
        rng = self.rng
        u = -self.U
        front = sd["back"] + (0.0 if sd["zone"] == "urban" else float(rng.uniform(2, 6)))
        while u < self.U:
            width = float(rng.uniform(8, 30) if sd["zone"] == "urban" else rng.uniform(8, 14))
            gap = float(rng.choice([0.0, rng.uniform(1, 3), rng.uniform(4, 9)], p=[0.5, 0.3, 0.2])) \
                if sd["zone"] == "urban" else float(rng.uniform(4, 12))
            a, b = u, min(u + width, self.U)
            u = b + gap
            if self.in_junction(a, 1.0) or self.in_junction(b, 1.0) or (self.cross and a < self.cross[0] < b):
                continue
            depth = float(rng.uniform(8, 20))
            height = float(rng.uniform(5, 20) if sd["zone"] == "urban" else rng.uniform(5, 8.5))
            setback = front + float(rng.uniform(0, 1.0))
            v = side * (setback + depth / 2)
            self.box_uv((a + b) / 2, v, b - a, depth, height + 0.5, 0.0, _S["building"],
                        float(rng.uniform(0.25, 0.6)), sink=0.5)
        if self.cross is not None:  # closing rows along the cross street
            for ua, ub in ((self.cross[0] - self.cross[2] - 14, self.cross[0] - self.cross[2] - 1),
                           (self.cross[1] + self.cross[2] + 1, self.cross[1] + self.cross[2] + 14)):
                v = sd["back"] + 22
                while v < 110:
                    length = float(rng.uniform(10, 25))
                    self.box_uv((ua + ub) / 2, side * (v + length / 2), ub - ua, length, float(rng.uniform(6, 18)),
                                0.0, _S["building"], float(rng.uniform(0.25, 0.6)), sink=0.5)
                    v += length + float(rng.uniform(0, 5))

    def fence_line(self, side, v_abs, kind):
        """A fence, hedge or low wall along the road at |v| = v_abs, with gaps (driveways)."""
        rng = self.rng
        u = -self.U * 0.6
        height = float(rng.uniform(1.0, 1.8)) if kind == "fence" else float(rng.uniform(0.6, 1.5))
        while u < self.U * 0.6:
            length = float(rng.uniform(6, 25))
            a, b = u, u + length
            u = b + float(rng.choice([0.0, rng.uniform(3, 6)], p=[0.4, 0.6]))
            if self.in_junction(a, 1.0) or self.in_junction(b, 1.0) or (self.cross and a < self.cross[0] < b):
                continue
            if kind == "hedge":
                n = int(length / 0.9)
                for k in range(n):
                    uu = a + (k + 0.5) * length / n
                    x, y = self.xy(uu, side * v_abs)
                    r = float(rng.uniform(0.5, 0.9))
                    z = self.z_at(x, y)
                    self.scene.add_ellipsoid((x, y, z + height * 0.55), (r, 0.6, height * 0.6), self.ground.heading,
                                             semantic=_S["vegetation"], reflectivity=float(rng.uniform(0.45, 0.65)),
                                             porosity=0.15, jitter=0.3)
                self.occupy((*self.xy((a + b) / 2, side * v_abs), length, 1.2, self.ground.heading))
                continue
            # pieces of <= 8 m so that each is culled to its own footprint
            n = max(1, int(math.ceil(length / 8.0)))
            for k in range(n):
                ua, ub = a + k * length / n, a + (k + 1) * length / n
                if kind == "fence":
                    self.box_uv((ua + ub) / 2, side * v_abs, ub - ua, 0.06, height + 0.2, 0.0, _S["fence"],
                                float(rng.uniform(0.25, 0.45)), porosity=0.35, sink=0.2)
                else:
                    self.box_uv((ua + ub) / 2, side * v_abs, ub - ua, 0.25, height + 0.2, 0.0, _S["building"],
                                float(rng.uniform(0.3, 0.5)), sink=0.2)

    def tree(self, x, y, big=True):
        rng = self.rng
        trunk_r = float(rng.uniform(0.12, 0.3) if big else rng.uniform(0.06, 0.12))
        if not self.occupy((x, y, 2 * trunk_r + 0.2, 2 * trunk_r + 0.2, 0.0)):
            return
        z = self.z_at(x, y)
        crown_base = float(rng.uniform(1.2, 2.6) if big else rng.uniform(0.8, 1.5))
        R = float(rng.uniform(1.5, 3.0) if big else rng.uniform(0.6, 1.2))
        self.scene.add_cylinder((x, y, z - 0.2), trunk_r, crown_base + 0.2 + R * 0.5, semantic=_S["trunk"],
                                reflectivity=float(rng.uniform(0.3, 0.45)))
        centre = np.array([x, y, z + crown_base + R])
        refl = float(rng.uniform(0.3, 0.6))
        for _ in range(int(rng.integers(5, 10))):
            off = rng.normal(0, R * 0.45, 3) * [1, 1, 0.8]
            r = float(R * rng.uniform(0.45, 0.75))
            self.scene.add_ellipsoid(centre + off, (r, r * rng.uniform(0.8, 1.2), r * rng.uniform(0.7, 1.0)),
                                     float(rng.uniform(0, np.pi)), semantic=_S["vegetation"], reflectivity=refl,
                                     porosity=0.3, jitter=0.3)

    def bush(self, x, y, size):
        rng = self.rng
        if not self.occupy((x, y, 2 * size, 2 * size, 0.0)):
            return
        z = self.z_at(x, y)
        refl = float(rng.uniform(0.3, 0.6))
        for _ in range(int(rng.integers(2, 5))):
            off = rng.normal(0, size * 0.3, 3) * [1, 1, 0.3]
            r = float(size * rng.uniform(0.5, 0.9))
            self.scene.add_ellipsoid((x + off[0], y + off[1], z + r * 0.6 + off[2]), (r, r, r * 0.8), 0.0,
                                     semantic=_S["vegetation"], reflectivity=refl, porosity=0.15, jitter=0.3)

    def pole(self, x, y, height, radius, arm_towards=None):
        if not self.occupy((x, y, 2 * radius + 0.2, 2 * radius + 0.2, 0.0)):
            return False
        z = self.z_at(x, y)
        self.scene.add_cylinder((x, y, z - 0.2), radius, height + 0.2, semantic=_S["pole"],
                                reflectivity=float(self.rng.uniform(0.3, 0.45)))
        if arm_towards is not None:  # a street-light arm reaching over the road
            dx, dy = arm_towards
            arm = 1.6
            self.scene.add_box((x + dx * arm / 2, y + dy * arm / 2, z + height - 0.15), (arm, 0.12, 0.12),
                               float(np.arctan2(dy, dx)), semantic=_S["pole"], reflectivity=0.4)
        return True

    def sign(self, x, y, facing_yaw):
        rng = self.rng
        height = float(rng.uniform(2.0, 2.6))
        if not self.pole(x, y, height, 0.035):
            return
        z = self.z_at(x, y)
        sw = float(rng.uniform(0.6, 0.9))
        sh = sw if rng.random() < 0.7 else sw * 0.6
        self.scene.add_box((x, y, z + height + sh / 2 - 0.1), (0.04, sw, sh), facing_yaw, semantic=_S["traffic-sign"],
                           reflectivity=float(rng.uniform(0.85, 1.0)))

    def lights(self, side, v_abs):
        """Street lights every 20-35 m along the kerb, arms reaching over the road."""
        rng = self.rng
        heading = self.ground.heading
        step = float(rng.uniform(20, 35))
        first = float(rng.uniform(-step, 0))
        c, s = np.cos(heading), np.sin(heading)
        for k in range(-int(100 / step) - 1, int(100 / step) + 2):
            u = first + k * step
            if abs(u) <= 100 and not self.in_junction(u, 2.0):
                x, y = self.xy(u, side * v_abs)
                self.pole(x, y, float(rng.uniform(6, 9)), float(rng.uniform(0.08, 0.13)),
                          arm_towards=(s * side, -c * side))

    def static(self):
        rng = self.rng
        heading = self.ground.heading
        for side, sd in self.sides.items():
            kerb, walk, back, zone = sd["kerb"], sd["walk"], sd["back"], sd["zone"]
            if rng.random() < 0.8:
                self.lights(side, kerb + 0.5)
            # trees along the sidewalk or on the terrain strip, bushes and planters between them
            if rng.random() < {"urban": 0.7, "suburban": 0.9, "green": 1.0}[zone]:
                v_tree = (kerb + walk - 0.8) if sd["terrain"] < 1.5 else (kerb + walk + sd["terrain"] / 2)
                u = float(rng.uniform(-90, -80))
                step = float(rng.uniform(5, 11))
                while u < 90:
                    if not self.in_junction(u, 1.0) and rng.random() < 0.85:
                        self.tree(*self.xy(u + rng.normal(0, 0.5), side * (v_tree + rng.normal(0, 0.2))))
                    if sd["terrain"] >= 1.5 and rng.random() < 0.5:
                        self.bush(*self.xy(u + step / 2, side * (v_tree + rng.normal(0, 0.3))),
                                  float(rng.uniform(0.5, min(1.4, sd["terrain"] / 2))))
                    u += step * float(rng.uniform(0.8, 1.2))
            # the back of the street
            if zone == "urban":
                self.buildings(side, sd)
            elif zone == "suburban":
                kind = str(rng.choice(["fence", "hedge", "wall"], p=[0.4, 0.4, 0.2]))
                self.fence_line(side, back + 0.3, kind)
                self.buildings(side, sd)
                for _ in range(int(rng.integers(10, 30))):
                    u = float(rng.uniform(-90, 90))
                    if not self.in_junction(u, 1.0):
                        vv = back + float(rng.uniform(1.0, 6.0))
                        if rng.random() < 0.4:
                            self.tree(*self.xy(u, side * vv))
                        else:
                            self.bush(*self.xy(u, side * vv), float(rng.uniform(0.6, 1.5)))
            else:  # green: undergrowth, then a wood
                if rng.random() < 0.4:
                    self.fence_line(side, back - 0.3, "fence")
                for _ in range(int(rng.integers(20, 50))):
                    u = float(rng.uniform(-90, 90))
                    if not self.in_junction(u, 1.0):
                        self.bush(*self.xy(u, side * (back + float(rng.uniform(0.5, 6.0)))),
                                  float(rng.uniform(0.7, 2.0)))
                wood = back + float(rng.uniform(2, 6))
                u = -100.0
                while u < 100:
                    if not self.in_junction(u, 1.0):
                        self.tree(*self.xy(u, side * (wood + float(rng.uniform(0, 8)))))
                    u += float(rng.uniform(3, 7))
            # traffic signs at the kerb, facing oncoming traffic
            for _ in range(int(rng.integers(0, 4))):
                u = float(rng.uniform(-60, 60))
                if self.in_junction(u, 1.0):
                    continue
                x, y = self.xy(u, side * (kerb + 0.35))
                self.sign(x, y, heading + (np.pi if side < 0 else 0.0))  # plate normal along the road
        self.far_field()
        if self.cross is not None:  # signs at the corners
            for su in (self.cross[0] - 1.0, self.cross[1] + 1.0):
                for side, sd in self.sides.items():
                    if rng.random() < 0.6:
                        x, y = self.xy(su, side * (sd["kerb"] + 0.4))
                        self.sign(x, y, heading + (np.pi / 2 if rng.random() < 0.5 else 0.0))

    def far_field(self):
        """What closes the view far away: the street bending behind buildings or trees at both
        ends (35-90 m), and a second row of buildings or a wood behind each side."""
        rng = self.rng
        for end in (1, -1):
            if rng.random() < 0.2:
                continue
            u = end * float(rng.uniform(35, 90))
            v = -self.sides[-1]["back"] - float(rng.uniform(0, 15))
            v_max = self.sides[1]["back"] + float(rng.uniform(0, 15))
            tree_row = rng.random() < 0.35
            while v < v_max:
                width = float(rng.uniform(8, 20))
                if tree_row:
                    self.tree(*self.xy(u + rng.normal(0, 2), v))
                    v += float(rng.uniform(3, 7))
                    continue
                depth = float(rng.uniform(8, 15))
                self.box_uv(u + end * depth / 2, v + width / 2, depth, width, float(rng.uniform(6, 20)), 0.0,
                            _S["building"], float(rng.uniform(0.25, 0.6)), sink=0.5)
                v += width + float(rng.choice([0.0, rng.uniform(2, 6)]))
        for side, sd in self.sides.items():
            v0 = sd["back"] + float(rng.uniform(15, 30))
            if sd["zone"] == "green" or rng.random() < 0.3:
                u = -110.0
                while u < 110:
                    if not self.in_junction(u, 2.0):
                        self.tree(*self.xy(u, side * (v0 + float(rng.uniform(0, 10)))))
                    u += float(rng.uniform(3, 8))
            else:
                u = -110.0
                while u < 110:
                    width = float(rng.uniform(10, 30))
                    if not (self.in_junction(u, 2.0) or self.in_junction(u + width, 2.0)):
                        self.box_uv(u + width / 2, side * (v0 + 6), width, 12.0, float(rng.uniform(8, 25)), 0.0,
                                    _S["building"], float(rng.uniform(0.25, 0.6)), sink=0.5)
                    u += width + float(rng.uniform(0, 8))

    # ---------------------------------------------------------------- objects
    def add_object(self, name, x, y, yaw, size=None, margin=0.3) -> bool:
        rng = self.rng
        l, w, h = size if size is not None else _sample_size(rng, name)
        if math.hypot(x, y) > _MAX_OBJECT_RANGE:
            return False
        if not self.occupy((x, y, l, w, yaw), margin=margin):
            return False
        z = self.z_at(x, y)
        inst = self.next_instance
        self.next_instance += 1
        sem = KITTI_CLASSES[name]
        c, s = math.cos(yaw), math.sin(yaw)
        for kind, (px, py, pz), dims, refl, por in _object_parts(name, l, w, h, rng):
            cx, cy = x + c * px - s * py, y + s * px + c * py
            if kind == "box":
                self.scene.add_box((cx, cy, z + pz), dims, yaw, semantic=sem, instance=inst, reflectivity=refl,
                                   porosity=por)
            else:
                self.scene.add_ellipsoid((cx, cy, z + pz), dims, yaw, semantic=sem, instance=inst, reflectivity=refl)
        self.scene.add_object(name, inst, sem, (x, y, z + h / 2, l, w, h, (yaw + np.pi) % (2 * np.pi) - np.pi))
        return True

    def vehicle_name(self):
        return str(self.rng.choice(["Car", "Van", "Truck"], p=[0.86, 0.1, 0.04]))

    def objects(self):
        rng = self.rng
        heading = self.ground.heading
        R = _MAX_OBJECT_RANGE
        # parked vehicles
        for side, sd in self.sides.items():
            if sd["park"] <= 0:
                continue
            fill = float(rng.uniform(0.3, 0.9))
            u = -R + float(rng.uniform(0, 5))
            while u < R:
                name = self.vehicle_name() if rng.random() < 0.9 else "Car"
                l, w, h = _sample_size(rng, name)
                centre = u + l / 2
                u += l + float(rng.uniform(0.6, 3.0))
                if rng.random() > fill or self.in_junction(centre, l / 2):
                    continue
                v = side * (sd["edge"] + sd["park"] / 2 + rng.normal(0, 0.12))
                flip = np.pi if (rng.random() < 0.5 if side > 0 else rng.random() < 0.1) else 0.0
                self.add_object(name, *self.xy(centre, v), heading + flip + rng.normal(0, 0.03), (l, w, h), 0.2)
        # traffic in the lanes
        lanes = [(-(k + 0.5) * self.lane, 0.0) for k in range(self.n_fwd)]
        lanes += [((k + 0.5) * self.lane, np.pi) for k in range(self.n_back)]
        for v, direction in lanes:
            n = int(rng.poisson(2.0))
            for _ in range(n):
                for _try in range(10):
                    u = float(rng.uniform(-R, R))
                    name = self.vehicle_name()
                    yaw = heading + direction + float(rng.normal(0, 0.03))
                    if self.add_object(name, *self.xy(u, v + rng.normal(0, 0.25)), yaw, margin=1.5):
                        break
            if self.cross is not None and rng.random() < 0.5:  # a car turning out of the cross street
                uc = (self.cross[0] + self.cross[1]) / 2 + float(rng.normal(0, 1.0))
                vv = float(rng.uniform(8, 30)) * (1 if rng.random() < 0.5 else -1)
                self.add_object("Car", *self.xy(uc, vv), heading + np.pi / 2 * np.sign(-vv) + rng.normal(0, 0.05))
        # pedestrians on the sidewalks (sometimes in groups), a few crossing the junction
        n_ped = int(rng.choice([0, 1, 2, 3, 5, 8, 12], p=[0.15, 0.15, 0.2, 0.2, 0.15, 0.1, 0.05]))
        placed = 0
        for _try in range(n_ped * 8):
            if placed >= n_ped:
                break
            side = 1 if rng.random() < 0.5 else -1
            sd = self.sides[side]
            u = float(rng.uniform(-R, R))
            v = side * (sd["kerb"] + float(rng.uniform(0.4, max(0.5, sd["walk"] - 0.4))))
            group = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
            for g in range(group):
                yaw = float(rng.uniform(-np.pi, np.pi))
                if self.add_object("Pedestrian", *self.xy(u + g * 0.9, v + rng.normal(0, 0.2)), yaw, margin=0.1):
                    placed += 1
        if self.cross is not None:
            for _ in range(int(rng.integers(0, 3))):
                uc = float(rng.uniform(self.cross[0], self.cross[1]))
                vv = float(rng.uniform(-self.road_r, self.road_l))
                self.add_object("Pedestrian", *self.xy(uc, vv), heading + np.pi / 2 * (1 if rng.random() < 0.5 else -1),
                                margin=0.1)
        # cyclists near the right edge of their lane
        for _ in range(int(rng.choice([0, 1, 2, 3], p=[0.4, 0.35, 0.17, 0.08]))):
            for _try in range(10):
                u = float(rng.uniform(-R, R))
                if rng.random() < 0.7 or self.n_back == 0:
                    v, direction = -self.road_r + 0.8 + float(rng.uniform(0, 0.6)), 0.0
                else:
                    v, direction = self.road_l - 0.8 - float(rng.uniform(0, 0.6)), np.pi
                yaw = heading + direction + float(rng.normal(0, 0.08))
                if self.add_object("Cyclist", *self.xy(u, v), yaw, margin=0.5):
                    break


def generate_scene(seed: int, sensor: Union[str, Sensor] = "hdl64") -> Scene:
    """The procedural street scene of ``seed`` (ground at ``-sensor.height`` under the sensor).

    Layout (all drawn from ``seed``): 1-2 lanes each way (or one way) 3.1-3.7 m wide, the road
    heading within a few degrees of the sensor's x axis, grade changes of up to 5 % ahead and
    behind, a cross slope up to 1 %; per side an optional parking lane, a 1.5-4 m sidewalk
    behind a 0.10-0.18 m curb, and an urban (building row with alleys), suburban (terrain,
    fence / hedge / low wall, houses, bushes and trees) or green (terrain, bushes, a wood)
    back; street lights, trees and traffic signs along the kerbs; a cross street with
    probability 0.35. Objects: parked vehicles, traffic in the lanes, pedestrians on the
    sidewalks and crossing, cyclists; sizes around the KITTI means, cars aligned with the road
    (+- 0.03 rad), pedestrians at any yaw, no two footprints overlapping, all within 70 m.

    Example:
        >>> scene = generate_scene(0)
        >>> [o["name"] for o in scene.objects][:3]
    """
    b = _Builder(seed, get_sensor(sensor))
    b.layout()
    b.static()
    b.objects()
    return b.scene


# ----------------------------------------------------------------------------- writers
def _kitti_paths(root: str, index: int) -> Dict[str, str]:
    name = f"{index:06d}"
    return {"velodyne": os.path.join(root, "training", "velodyne", name + ".bin"),
            "label_2": os.path.join(root, "training", "label_2", name + ".txt"),
            "calib": os.path.join(root, "training", "calib", name + ".txt")}


def _semantickitti_paths(root: str, sequence: int, frame: int) -> Dict[str, str]:
    seq = os.path.join(root, "sequences", f"{sequence:02d}")
    return {"velodyne": os.path.join(seq, "velodyne", f"{frame:06d}.bin"),
            "labels": os.path.join(seq, "labels", f"{frame:06d}.label")}


def write_kitti_scene(root: str, index: int, scan: Scan) -> Dict[str, str]:
    """Writes ``training/{velodyne,label_2,calib}/NNNNNN.*`` of one scan under ``root`` (atomically).

    Returns:
        ``{"velodyne": path, "label_2": path, "calib": path}``.
    """
    from ..io import atomic_write, write_kitti_bin

    paths = _kitti_paths(root, index)
    for p in paths.values():
        os.makedirs(os.path.dirname(p), exist_ok=True)
    with atomic_write(paths["calib"], "w", encoding="utf-8") as f:
        f.write(format_kitti_calib(scan.calib))
    lines = scan.label_lines()
    with atomic_write(paths["label_2"], "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    write_kitti_bin(paths["velodyne"], scan.points)  # last: its presence marks a complete scene
    return paths


def write_semantickitti_scene(root: str, sequence: int, frame: int, scan: Scan) -> Dict[str, str]:
    """Writes ``sequences/SS/velodyne/FFFFFF.bin`` and ``sequences/SS/labels/FFFFFF.label`` (atomically).

    Labels are uint32: semantic id in the low 16 bits, instance id in the high 16.
    """
    from ..io import write_kitti_bin, write_labels

    paths = _semantickitti_paths(root, sequence, frame)
    for p in paths.values():
        os.makedirs(os.path.dirname(p), exist_ok=True)
    write_labels(paths["labels"], scan.semantic, scan.instance)
    write_kitti_bin(paths["velodyne"], scan.points)
    return paths


# ----------------------------------------------------------------------------- datasets
_LAYOUTS = ("kitti", "semantickitti", "both")
_VAL_SEQUENCE, _TRAIN_SEQUENCE = 8, 0


def _scene_task(task: Dict) -> Dict:
    """Simulates and writes one scene (runs in a worker process)."""
    t0 = time.perf_counter()
    scan = simulate_scan(task["scene_seed"], task["sensor"])
    t1 = time.perf_counter()
    if task["layout"] in ("kitti", "both"):
        write_kitti_scene(task["out"], task["index"], scan)
    if task["layout"] in ("semantickitti", "both"):
        write_semantickitti_scene(task["out"], task["sequence"], task["frame"], scan)
    counts = {n: int((scan.names == n).sum()) for n in KITTI_CLASSES}
    return {"index": task["index"], "status": "done", "points": int(len(scan.points)), "objects": counts,
            "label_2": int(scan.in_label_2.sum()), "simulate_s": t1 - t0, "seconds": time.perf_counter() - t0}


def _task_paths(task: Dict) -> List[str]:
    paths = []
    if task["layout"] in ("kitti", "both"):
        paths += list(_kitti_paths(task["out"], task["index"]).values())
    if task["layout"] in ("semantickitti", "both"):
        paths += list(_semantickitti_paths(task["out"], task["sequence"], task["frame"]).values())
    return paths


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; files in progress finish


def generate_dataset(out: str, scenes: int, seed: int = 0, sensor: Union[str, Sensor] = "hdl64",
                     layout: str = "kitti", val_fraction: float = 0.15, workers: int = 1, overwrite: bool = False,
                     on_scene: Optional[Callable[[Dict], None]] = None) -> Dict:
    """Simulates ``scenes`` scans and writes them in the KITTI and / or SemanticKITTI layout.

    Scene ``i`` is :func:`simulate_scan` ``(scene_seed(seed, i), sensor)``; every
    ``1 / val_fraction``-th scene is a validation scene (:func:`is_val_scene`).

    * ``kitti``: ``out/training/{velodyne,label_2,calib}/NNNNNN.*`` (``NNNNNN = i``) and
      ``out/ImageSets/{train,val,trainval}.txt``.
    * ``semantickitti``: training scenes as ``out/sequences/00/``, validation scenes as
      ``out/sequences/08/`` (SemanticKITTI's validation sequence), each with ``velodyne/``,
      ``labels/``, ``calib.txt``, ``poses.txt`` (identity: the scenes are independent) and
      ``times.txt`` (0.1 s apart), frames numbered in scene order.
    * ``both``: both, under the same ``out``.

    Resumable: a scene whose files all exist is skipped (unless ``overwrite``); every file is
    written atomically, so an interrupted run leaves only complete files, and rerunning
    recreates the same bytes.

    Args:
        out: the output folder (created).
        scenes: how many scenes.
        seed: the dataset seed.
        sensor: sensor name or :class:`Sensor`.
        layout: ``kitti``, ``semantickitti`` or ``both``.
        val_fraction: fraction of validation scenes, in [0, 1].
        workers: processes (1: in this process).
        overwrite: regenerate scenes whose files exist.
        on_scene: called in this process with each scene's result dict (progress bars).

    Returns:
        A summary: ``scenes``, ``written``, ``skipped``, ``train``, ``val``, ``points`` (total of
        the scenes written), ``objects`` (per class, written scenes), ``label_2`` (objects
        written to label_2), ``seconds``, ``simulate_s`` (mean per written scene), ``out``, ``layout``.

    Raises:
        ValueError: bad ``scenes``, ``layout``, ``val_fraction`` or ``workers``.
    """
    t0 = time.perf_counter()
    sensor = get_sensor(sensor)
    if int(scenes) < 1:
        raise ValueError(f"scenes must be >= 1, got {scenes}")
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(_LAYOUTS)}, got {layout!r}")
    if not 0 <= val_fraction <= 1:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{out}: exists and is not a folder")
    os.makedirs(out, exist_ok=True)
    tasks = []
    for i in range(int(scenes)):
        val = is_val_scene(i, val_fraction)
        tasks.append({"out": out, "index": i, "scene_seed": scene_seed(seed, i), "sensor": sensor, "layout": layout,
                      "val": val, "sequence": _VAL_SEQUENCE if val else _TRAIN_SEQUENCE,
                      "frame": _split_rank(i, val_fraction)})
    results: List[Optional[Dict]] = [None] * len(tasks)
    todo = []
    for t in tasks:
        if not overwrite and all(os.path.exists(p) for p in _task_paths(t)):
            results[t["index"]] = {"index": t["index"], "status": "exists"}
            if on_scene:
                on_scene(results[t["index"]])
        else:
            todo.append(t)
    if todo and (workers <= 1 or len(todo) == 1):
        for t in todo:
            results[t["index"]] = r = _scene_task(t)
            if on_scene:
                on_scene(r)
    elif todo:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(int(workers), len(todo)), mp_context=ctx,
                                                    initializer=_init_worker) as pool:
            futures = {pool.submit(_scene_task, t): t["index"] for t in todo}
            try:
                for fut in concurrent.futures.as_completed(futures):
                    results[futures[fut]] = r = fut.result()
                    if on_scene:
                        on_scene(r)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    _write_index_files(out, tasks, layout)
    written = [r for r in results if r and r["status"] == "done"]
    objects = {n: sum(r["objects"][n] for r in written) for n in KITTI_CLASSES}
    return {
        "out": out, "layout": layout, "sensor": sensor.name, "seed": seed, "scenes": len(tasks),
        "written": len(written), "skipped": len(tasks) - len(written),
        "train": sum(not t["val"] for t in tasks), "val": sum(t["val"] for t in tasks),
        "points": sum(r["points"] for r in written), "objects": objects,
        "label_2": sum(r["label_2"] for r in written),
        "simulate_s": (sum(r["simulate_s"] for r in written) / len(written)) if written else 0.0,
        "seconds": time.perf_counter() - t0,
    }


def _write_index_files(out: str, tasks: List[Dict], layout: str) -> None:
    from ..io import atomic_write

    if layout in ("kitti", "both"):
        os.makedirs(os.path.join(out, "ImageSets"), exist_ok=True)
        splits = {"train": [t for t in tasks if not t["val"]], "val": [t for t in tasks if t["val"]], "trainval": tasks}
        for name, ts in splits.items():
            with atomic_write(os.path.join(out, "ImageSets", f"{name}.txt"), "w", encoding="utf-8") as f:
                f.write("".join(f"{t['index']:06d}\n" for t in ts))
    if layout in ("semantickitti", "both"):
        calib = kitti_calib()
        for seq in (_TRAIN_SEQUENCE, _VAL_SEQUENCE):
            frames = sum(t["sequence"] == seq for t in tasks)
            if frames == 0:
                continue
            folder = os.path.join(out, "sequences", f"{seq:02d}")
            os.makedirs(folder, exist_ok=True)
            with atomic_write(os.path.join(folder, "calib.txt"), "w", encoding="utf-8") as f:
                for name in ("P0", "P1", "P2", "P3"):
                    f.write(f"{name}: " + " ".join(f"{v:.12e}" for v in calib[name].ravel()) + "\n")
                f.write("Tr: " + " ".join(f"{v:.12e}" for v in calib["Tr_velo_to_cam"].ravel()) + "\n")
            eye = " ".join(f"{v:.12e}" for v in np.eye(4)[:3].ravel())
            with atomic_write(os.path.join(folder, "poses.txt"), "w", encoding="utf-8") as f:
                f.write("".join(eye + "\n" for _ in range(frames)))
            with atomic_write(os.path.join(folder, "times.txt"), "w", encoding="utf-8") as f:
                f.write("".join(f"{0.1 * k:.6e}\n" for k in range(frames)))
