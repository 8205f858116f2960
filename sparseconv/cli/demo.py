"""``sparseconv demo``: a SECOND-style sparse backbone on a LiDAR scan, checked against dense conv3d."""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

EPILOG = """examples:
  sparseconv demo
  sparseconv demo --input ../shared/data/kitti/velodyne/000000.bin --front
  sparseconv demo --voxel-size 0.1 0.1 0.2 --threads 2 --json
"""

# KITTI's standard detection range (OpenPCDet): x, y, z min then max, metres.
KITTI_RANGE = (0.0, -40.0, -3.0, 70.4, 40.0, 1.0)
FULL_RANGE = (-70.4, -40.0, -3.0, 70.4, 40.0, 1.0)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run a SECOND-style sparse backbone on a LiDAR scan and check it against dense conv3d",
        description="Voxelizes a LiDAR scan (KITTI .bin, or a built-in simulated scan), runs OpenPCDet's "
        "VoxelBackBone8x built from sparseconv layers, prints each stage, and checks a submanifold "
        "convolution against torch's dense conv3d on a crop of the scan.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", help="KITTI velodyne .bin (float32 x, y, z, intensity); default: simulated scan")
    p.add_argument("--voxel-size", type=float, nargs=3, default=(0.05, 0.05, 0.1), metavar=("VX", "VY", "VZ"))
    p.add_argument("--front", action="store_true", help="keep the KITTI front field of view (x >= 0) only")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated scan and the weights")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def simulated_scan(seed: int = 0, beams: int = 64, columns: int = 2048) -> np.ndarray:
    """A LiDAR-like scan: an HDL-64E-style beam pattern ray-cast onto a ground plane and a few boxes.

    Returns float32 ``[N, 4]`` (x, y, z, intensity).  Deterministic for a seed.
    """
    rng = np.random.default_rng(seed)
    elev = np.deg2rad(np.linspace(2.0, -24.9, beams))
    azim = np.linspace(-np.pi, np.pi, columns, endpoint=False)
    el, az = np.meshgrid(elev, azim, indexing="ij")
    d = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1).reshape(-1, 3)
    origin = np.array([0.0, 0.0, 1.73])
    t = np.full(len(d), np.inf)
    down = d[:, 2] < -1e-6
    t[down] = -origin[2] / d[down, 2]  # ground z = 0
    # Axis-aligned boxes (cars and walls) by the slab method.
    boxes = []
    for _ in range(14):
        cx, cy = rng.uniform(-50, 50), rng.uniform(-35, 35)
        if np.hypot(cx, cy) < 5:
            continue
        sx, sy, sz = (rng.uniform(3.5, 4.5), rng.uniform(1.5, 1.9), rng.uniform(1.4, 1.7))
        boxes.append((cx - sx / 2, cy - sy / 2, 0.0, cx + sx / 2, cy + sy / 2, sz))
    boxes += [(-60, 20, 0, 60, 21, 6), (-60, -22, 0, 60, -21, 5)]
    inv = 1.0 / np.where(np.abs(d) < 1e-9, 1e-9, d)
    for b in boxes:
        lo, hi = np.array(b[:3]), np.array(b[3:])
        t1, t2 = (lo - origin) * inv, (hi - origin) * inv
        tmin, tmax = np.minimum(t1, t2).max(1), np.maximum(t1, t2).min(1)
        hit = (tmax >= np.maximum(tmin, 0)) & (tmin > 0) & (tmin < t)
        t[hit] = tmin[hit]
    keep = np.isfinite(t) & (t < 120.0)
    r = t[keep] * (1 + rng.normal(0, 0.002, keep.sum()))
    pts = origin + d[keep] * r[:, None]
    pts[:, 2] -= 1.73  # sensor frame, as KITTI
    intensity = np.clip(rng.normal(0.3, 0.1, len(pts)), 0, 1)
    return np.concatenate([pts, intensity[:, None]], 1).astype(np.float32)


def mean_voxelize(points: np.ndarray, voxel_size, point_range):
    """Mean of the points in each voxel (MeanVFE) with NumPy; returns (coords ``[V, 3]`` x, y, z, feats, grid)."""
    vs = np.asarray(voxel_size, np.float64)
    lo, hi = np.asarray(point_range[:3], np.float64), np.asarray(point_range[3:], np.float64)
    grid = np.round((hi - lo) / vs).astype(np.int64)
    finite = np.isfinite(points).all(1)
    idx = np.floor((points[:, :3] - lo) / vs).astype(np.int64)
    keep = finite & (idx >= 0).all(1) & (idx < grid).all(1)
    idx, pts = idx[keep], points[keep].astype(np.float64)
    uniq, inverse = np.unique(idx, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    counts = np.bincount(inverse, minlength=len(uniq))
    feats = np.stack([np.bincount(inverse, pts[:, c], len(uniq)) for c in range(pts.shape[1])], 1) / counts[:, None]
    return uniq.astype(np.int32), feats.astype(np.float32), tuple(int(g) for g in grid)


@torch.no_grad()
def _dense_check(x, seed: int) -> float:
    """Max |difference| between SubMConv3d and dense conv3d on a 48 x 48 x Z crop around the busiest voxel."""
    from sparseconv import SparseTensor
    from sparseconv.nn import SubMConv3d

    coords = x.coords
    center = coords[coords.shape[0] // 2, 1:3]
    lo = (center - 24).clamp_min(0)
    inside = ((coords[:, 1:3] >= lo) & (coords[:, 1:3] < lo + 48)).all(1) & (coords[:, 0] == 0)
    c = coords[inside].clone()
    c[:, 1:3] -= lo.to(c.dtype)
    shape = (48, 48, x.spatial_shape[2])
    crop = SparseTensor(x.features[inside].double(), c, shape, batch_size=1)
    torch.manual_seed(seed)
    conv = SubMConv3d(crop.num_channels, 16, 3).double()
    sparse = conv(crop).features
    w = conv.weight.reshape(3, 3, 3, crop.num_channels, 16).permute(4, 3, 0, 1, 2)
    dense = torch.nn.functional.conv3d(crop.dense(), w, conv.bias, padding=1)
    idx = c.long()
    ref = dense[idx[:, 0], :, idx[:, 1], idx[:, 2], idx[:, 3]]
    return float((sparse - ref).abs().max()) if len(ref) else 0.0


def run(args) -> int:
    from sparseconv import SparseTensor
    from sparseconv.models import VoxelBackBone8x

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.input:
        from ..io import PointCloudError, read_points

        try:
            points, source = read_points(args.input).to_array(), args.input
        except (PointCloudError, OSError) as e:
            print(f"sparseconv demo: {e}", file=sys.stderr)
            return 1
    else:
        points, source = simulated_scan(args.seed), f"simulated HDL-64E-style scan (seed {args.seed})"
    point_range = KITTI_RANGE if args.front else FULL_RANGE
    t0 = time.perf_counter()
    coords, feats, grid = mean_voxelize(points, args.voxel_size, point_range)
    t_vox = time.perf_counter() - t0
    if len(coords) == 0:
        raise SystemExit(f"sparseconv demo: no point of {source} lies inside the range {point_range}")
    b = np.zeros((len(coords), 1), np.int32)
    net = VoxelBackBone8x(feats.shape[1], grid).eval()
    torch.manual_seed(args.seed)
    x = SparseTensor(torch.from_numpy(feats), torch.from_numpy(np.concatenate([b, coords], 1)), net.sparse_shape)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = net(x)
        t_first = time.perf_counter() - t0
        x2 = SparseTensor(x.features, x.coords.clone(), net.sparse_shape)
        t0 = time.perf_counter()
        net(x2)
        t_second = time.perf_counter() - t0
    stages = [("input", x)] + list(out["multi_scale"].items()) + [("encoded", out["encoded"])]
    err = _dense_check(x, args.seed)
    cells = grid[0] * grid[1] * (grid[2] + 1)
    result = {
        "source": source,
        "points": int(len(points)),
        "voxels": int(len(coords)),
        "grid": list(net.sparse_shape),
        "occupancy": len(coords) / cells,
        "voxelize_s": t_vox,
        "backbone_s": t_first,
        "backbone_repeat_s": t_second,
        "threads": torch.get_num_threads(),
        "stages": [
            {"name": n, "voxels": t.num_voxels, "channels": t.num_channels, "stride": list(t.stride),
             "spatial_shape": list(t.spatial_shape)} for n, t in stages
        ],
        "subm_vs_dense_max_abs_diff": err,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"scan      {source}: {len(points):,} points -> {len(coords):,} voxels on {net.sparse_shape} "
              f"({100 * result['occupancy']:.3f}% occupied), voxelized in {1000 * t_vox:.0f} ms")
        print(f"backbone  VoxelBackBone8x forward ({torch.get_num_threads()} threads): "
              f"{1000 * t_first:.0f} ms (first), {1000 * t_second:.0f} ms (again, maps rebuilt)")
        print(f"{'stage':<10}{'stride':>12}{'voxels':>10}{'channels':>10}  spatial_shape")
        for s in result["stages"]:
            print(f"{s['name']:<10}{str(tuple(s['stride'])):>12}{s['voxels']:>10,}{s['channels']:>10}  "
                  f"{tuple(s['spatial_shape'])}")
        print(f"check     SubMConv3d vs dense conv3d on a 48x48 crop (float64): max |diff| = {err:.2e}")
    if err > 1e-9:
        print("sparseconv demo: the sparse result differs from dense conv3d", flush=True)
        return 1
    return 0
