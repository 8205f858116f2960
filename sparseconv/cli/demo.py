"""``sparseconv demo``: a SECOND-style sparse backbone on a LiDAR scan, checked against dense conv3d."""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from ..voxelize import KITTI_POINT_RANGE as KITTI_RANGE

EPILOG = """examples:
  sparseconv demo
  sparseconv demo --input ../shared/data/kitti/velodyne/000000.bin --front
  sparseconv demo --voxel-size 0.1 0.1 0.2 --threads 2 --json
"""

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


def simulated_scan(seed: int = 0) -> np.ndarray:
    """A simulated HDL-64E scan (:func:`sparseconv.datasets.synthetic.simulate_scan`): float32 ``[N, 4]``."""
    from sparseconv.datasets.synthetic import simulate_scan

    return simulate_scan(seed).points


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
    from sparseconv import SparseTensor, voxelize
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
        points, source = simulated_scan(args.seed), f"simulated HDL-64E scan (seed {args.seed})"
    point_range = KITTI_RANGE if args.front else FULL_RANGE
    t0 = time.perf_counter()
    voxels, _ = voxelize(torch.from_numpy(np.ascontiguousarray(points)), args.voxel_size, point_range)
    t_vox = time.perf_counter() - t0
    if voxels.num_voxels == 0:
        raise SystemExit(f"sparseconv demo: no point of {source} lies inside the range {point_range}")
    grid = voxels.spatial_shape
    coords = voxels.coords
    net = VoxelBackBone8x(voxels.num_channels, grid).eval()
    torch.manual_seed(args.seed)
    # OpenPCDet's backbone works on the grid with one extra z layer.
    x = SparseTensor(voxels.features, coords, net.sparse_shape)
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
