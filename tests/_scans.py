"""Small synthetic LiDAR scans and third-party writers for the I/O tests."""
from __future__ import annotations

from typing import Optional

import numpy as np


def make_scan(n: int = 300, seed: int = 0) -> dict:
    """A random scan: float32 ``xyz`` in a 100 m x 100 m x 6 m box, ``intensity`` in [0, 1), a ``ring`` per point."""
    rng = np.random.default_rng(seed)
    xyz = (rng.random((n, 3)) * [100.0, 100.0, 6.0] - [50.0, 50.0, 3.0]).astype(np.float32)
    return {
        "xyz": xyz,
        "intensity": rng.random(n).astype(np.float32),
        "ring": rng.integers(0, 32, n).astype(np.int32),
        "rgb": rng.integers(0, 256, (n, 3)).astype(np.uint8),
        "classification": rng.integers(0, 20, n).astype(np.uint8),
        "time": np.sort(rng.random(n)) * 0.1 + 1000.0,
    }


def write_las(path, xyz: np.ndarray, intensity: np.ndarray, classification: np.ndarray,
              gps_time: Optional[np.ndarray] = None, scale: float = 0.001) -> np.ndarray:
    """Writes a LAS / LAZ file with laspy (LAZ by extension); returns the coordinates as stored (quantized)."""
    import laspy

    header = laspy.LasHeader(point_format=1 if gps_time is not None else 0, version="1.2")
    offset = np.floor(xyz.min(axis=0).astype(np.float64))
    header.offsets = offset
    header.scales = np.full(3, scale)
    las = laspy.LasData(header)
    las.x, las.y, las.z = xyz.astype(np.float64).T
    las.intensity = intensity
    las.classification = classification
    las.return_number = np.ones(len(xyz), np.uint8)
    las.number_of_returns = np.ones(len(xyz), np.uint8)
    if gps_time is not None:
        las.gps_time = gps_time
    las.write(str(path))
    return np.round((xyz.astype(np.float64) - offset) / scale) * scale + offset
