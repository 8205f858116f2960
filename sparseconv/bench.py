"""Benchmark harness (``tools/benchmark.py``, ``sparseconv bench``).

Every workload times sparseconv and its peers in the same run, alternating between them on
each repetition, and reports the median of the timed repetitions after warm-up and the ratio of
each peer's median to sparseconv's.  Speed lives here, never in the tests.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .voxelize import KITTI_POINT_RANGE as KITTI_RANGE

__all__ = ["Measurement", "time_alternating", "load_scans", "main", "WORKLOADS"]

DEFAULT_KITTI = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                             "kitti", "velodyne")


@dataclass
class Measurement:
    workload: str
    config: str
    impl: str
    median_ms: float
    times_ms: List[float] = field(repr=False)
    extra: Dict[str, object] = field(default_factory=dict)


def time_alternating(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int) -> Dict[str, List[float]]:
    """Runs every function ``warmup`` times, then ``repeats`` rounds in which each runs once, in turn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(1000.0 * (time.perf_counter() - t0))
    return times


def load_scans(inputs: Sequence[str]) -> List[Tuple[str, np.ndarray]]:
    """``(name, float32 [N, 4])`` scans: the given files, else the KITTI scans beside the repo, else a simulated one."""
    from .cli.demo import simulated_scan
    from .io import read_points

    paths = list(inputs) or sorted(glob.glob(os.path.join(DEFAULT_KITTI, "*.bin")))
    if paths:
        return [(os.path.basename(p), read_points(p).to_array()) for p in paths]
    return [("simulated", simulated_scan(0))]


def _spconv_point_to_voxel():
    try:
        from spconv.pytorch.utils import PointToVoxel
    except ImportError:
        return None
    return PointToVoxel


def bench_voxelize(scans, repeats: int, warmup: int) -> List[Measurement]:
    """Voxelizing a full scan: sparseconv (padded PointToVoxel layout, and mean-reduced SparseTensor) vs
    spconv's CPU ``PointToVoxel`` and a NumPy ``unique`` baseline."""
    from . import voxelize, voxelize_padded

    point_to_voxel = _spconv_point_to_voxel()
    configs = [("SECOND 0.05x0.05x0.1, 5 pts, 150k voxels", (0.05, 0.05, 0.1), 5, 150000),
               ("PointPillars 0.16x0.16x4, 32 pts, 40k voxels", (0.16, 0.16, 4.0), 32, 40000)]
    out = []
    for scan_name, pts_np in scans:
        pts = torch.from_numpy(np.ascontiguousarray(pts_np))
        for label, vs, max_points, max_voxels in configs:
            fns = {
                "sparseconv voxelize_padded": lambda: voxelize_padded(pts, vs, KITTI_RANGE, max_points, max_voxels),
                "sparseconv voxelize (mean)": lambda: voxelize(pts, vs, KITTI_RANGE, max_points_per_voxel=max_points,
                                                                max_voxels=max_voxels),
            }
            if point_to_voxel is not None:
                gen = point_to_voxel(vsize_xyz=list(vs), coors_range_xyz=list(KITTI_RANGE),
                                     num_point_features=pts.shape[1], max_num_voxels=max_voxels,
                                     max_num_points_per_voxel=max_points)
                fns["spconv PointToVoxel"] = lambda: gen(pts)
            lo, vsz = np.array(KITTI_RANGE[:3], np.float32), np.array(vs, np.float32)
            grid = np.round((np.array(KITTI_RANGE[3:]) - np.array(KITTI_RANGE[:3])) / np.array(vs)).astype(np.int64)

            def numpy_unique():
                q = np.floor((pts_np[:, :3] - lo) / vsz)
                keep = np.isfinite(q).all(1) & (q >= 0).all(1) & (q < grid).all(1)
                return np.unique(q[keep].astype(np.int64), axis=0, return_inverse=True)

            fns["numpy unique (no limits)"] = numpy_unique
            times = time_alternating(fns, repeats, warmup)
            for impl, ts in times.items():
                out.append(Measurement("voxelize", f"{scan_name}: {label}", impl, statistics.median(ts), ts,
                                       {"points": int(pts.shape[0])}))
    return out


def _spconv_backbone(input_channels: int, algo):
    """OpenPCDet's VoxelBackBone8x in spconv layers, with the module names of ``models.VoxelBackBone8x``."""
    import spconv.pytorch as spconv

    def block(cin, cout, k, s=1, p=0, conv="subm", key=None):
        if conv == "subm":
            layer = spconv.SubMConv3d(cin, cout, k, bias=False, indice_key=key, algo=algo)
        else:
            layer = spconv.SparseConv3d(cin, cout, k, s, p, bias=False, indice_key=key, algo=algo)
        return spconv.SparseSequential(layer, torch.nn.BatchNorm1d(cout, eps=1e-3, momentum=0.01), torch.nn.ReLU())

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_input = block(input_channels, 16, 3, key="subm1")
            self.conv1 = spconv.SparseSequential(block(16, 16, 3, key="subm1"))
            self.conv2 = spconv.SparseSequential(block(16, 32, 3, 2, 1, "spconv", "spconv2"),
                                                 block(32, 32, 3, key="subm2"), block(32, 32, 3, key="subm2"))
            self.conv3 = spconv.SparseSequential(block(32, 64, 3, 2, 1, "spconv", "spconv3"),
                                                 block(64, 64, 3, key="subm3"), block(64, 64, 3, key="subm3"))
            self.conv4 = spconv.SparseSequential(block(64, 64, 3, 2, (0, 1, 1), "spconv", "spconv4"),
                                                 block(64, 64, 3, key="subm4"), block(64, 64, 3, key="subm4"))
            self.conv_out = block(64, 128, (3, 1, 1), (2, 1, 1), 0, "spconv", "spconv_down2")

        def forward(self, x):
            return self.conv_out(self.conv4(self.conv3(self.conv2(self.conv1(self.conv_input(x))))))

    return Net()


def _useful_flops(net, x) -> Tuple[float, List[Tuple[int, int, int]]]:
    """Multiply-add FLOPs of the backbone's convolutions on ``x`` (pairs x C_in x C_out x 2) and the
    per-layer GEMM shapes ``(pairs, C_in, C_out)``; maps come from the tensors' caches."""
    from .nn.conv import SparseConv3d, SubMConv3d

    shapes = []

    def hook(module, inputs, output):
        x_in = inputs[0]
        cset = x_in.coordinate_set
        if isinstance(module, SubMConv3d):
            nbmap = cset.submanifold_map(module.kernel_size, module.dilation)
        else:
            nbmap = cset.strided(module.kernel_size, module.stride, module.padding, module.dilation).nbmap
        shapes.append((int((nbmap >= 0).sum()), module.in_channels, module.out_channels))

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (SubMConv3d, SparseConv3d))]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    return float(sum(2 * p * ci * co for p, ci, co in shapes)), shapes


def bench_backbone(scans, repeats: int, warmup: int) -> List[Measurement]:
    """OpenPCDet's VoxelBackBone8x (SECOND) on the front half of each scan, 0.05 x 0.05 x 0.1 m voxels:
    forward with the kernel maps built inside ("fresh input"), forward with cached maps, and forward +
    backward; sparseconv vs spconv (default algorithm and ConvAlgo.Native, same weights) and the GEMM
    floor (torch.mm on each layer's gathered shapes)."""
    from . import SparseTensor, voxelize
    from .interop import convert_to_spconv_weight, to_spconv
    from .nn.conv import _SparseConvBase

    from sparseconv.models import VoxelBackBone8x

    try:
        import spconv.pytorch as spconv
    except ImportError:
        spconv = None
    out = []
    for scan_name, pts_np in scans:
        pts = torch.from_numpy(np.ascontiguousarray(pts_np))
        vox, _ = voxelize(pts, (0.05, 0.05, 0.1), KITTI_RANGE)
        torch.manual_seed(0)
        net = VoxelBackBone8x(4, vox.spatial_shape).eval()
        feats, coords = vox.features.contiguous(), vox.coords.contiguous()

        def fresh():
            return SparseTensor(feats, coords, net.sparse_shape)

        x_cached = fresh()
        flops, shapes = _useful_flops(net, x_cached)
        fns: Dict[str, Callable[[], object]] = {}
        with torch.no_grad():
            fns["sparseconv forward (fresh)"] = lambda: net(fresh())
            fns["sparseconv forward (cached maps)"] = lambda: net(x_cached)
        mats = [(torch.randn(p, ci), torch.randn(ci, co)) for p, ci, co in shapes]
        fns["torch.mm on the same shapes"] = lambda: [torch.mm(a, b) for a, b in mats]
        if spconv is not None:
            sd = net.state_dict()
            convs = {n for n, m in net.named_modules() if isinstance(m, _SparseConvBase)}
            for name, m in net.named_modules():
                if name in convs:
                    sd[f"{name}.weight"] = convert_to_spconv_weight(m.weight.detach(), m.kernel_size)
            for label, algo in (("default algorithm", None), ("ConvAlgo.Native", spconv.ConvAlgo.Native)):
                ref = _spconv_backbone(4, algo).eval()  # algo=None: spconv's own default, as users run it
                ref.load_state_dict(sd)
                fns[f"spconv {label} forward (fresh)"] = (
                    lambda ref=ref: ref(to_spconv(SparseTensor._from_set(feats, fresh().coordinate_set))))
        with torch.no_grad():
            times = time_alternating(fns, repeats, warmup)
        for impl, ts in times.items():
            med = statistics.median(ts)
            out.append(Measurement("backbone", f"{scan_name}: VoxelBackBone8x forward, {vox.num_voxels} voxels, "
                                   f"{flops / 1e9:.2f} GFLOP", impl, med, ts,
                                   {"gflops_per_s": flops / 1e9 / (med / 1000.0)}))
        # Training step: forward + backward.
        train = VoxelBackBone8x(4, vox.spatial_shape).train()
        train.load_state_dict(net.state_dict())
        tfns = {"sparseconv forward+backward": lambda: train(fresh())["encoded"].features.sum().backward()}
        if spconv is not None:
            ref = _spconv_backbone(4, spconv.ConvAlgo.Native).train()
            ref.load_state_dict(sd)

            def spconv_step():
                ref(to_spconv(fresh())).features.sum().backward()

            try:
                spconv_step()
                tfns["spconv ConvAlgo.Native forward+backward"] = spconv_step
            except Exception as e:  # spconv 2.3.8's CPU backward asks torch.cuda for a stream
                print(f"note: spconv forward+backward is unavailable here: {type(e).__name__}: {e}")
        times = time_alternating(tfns, repeats, 1)
        for impl, ts in times.items():
            out.append(Measurement("backbone-train", f"{scan_name}: VoxelBackBone8x forward+backward", impl,
                                   statistics.median(ts), ts))
    return out


WORKLOADS: Dict[str, Callable] = {"voxelize": bench_voxelize, "backbone": bench_backbone}


def machine_info() -> Dict[str, object]:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "spconv": _version("spconv")}


def _version(pkg: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:
        return None


def format_table(results: List[Measurement], baseline: str = "sparseconv") -> str:
    lines = []
    groups: Dict[Tuple[str, str], List[Measurement]] = {}
    for m in results:
        groups.setdefault((m.workload, m.config), []).append(m)
    for (workload, config), ms in groups.items():
        ours = [m for m in ms if m.impl.startswith(baseline)]
        lines.append(f"\n{workload} — {config}")
        lines.append(f"  {'implementation':<32}{'median ms':>11}  " + "  ".join(f"{'÷ ' + o.impl.replace(baseline + ' ', ''):>22}" for o in ours))
        for m in ms:
            ratios = "  ".join(f"{m.median_ms / o.median_ms:>21.2f}x" for o in ours)
            lines.append(f"  {m.impl:<32}{m.median_ms:>11.3f}  {ratios}")
    return "\n".join(lines)


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="tools/benchmark.py", description=__doc__)
    parser.add_argument("--workload", "-w", action="append", choices=sorted(WORKLOADS),
                        help="workload to run (repeatable; default: all)")
    parser.add_argument("--input", action="append", default=[], help="KITTI-format .bin scan (repeatable)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions per implementation (>= 5)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--smoke", action="store_true", help="tiny run (CI): 1 warm-up, 2 repetitions")
    return parser


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats, warmup = (2, 1) if args.smoke else (max(args.repeats, 5), args.warmup)
    scans = load_scans(args.input)
    if args.smoke:
        scans = scans[:1]
    results: List[Measurement] = []
    for name in args.workload or sorted(WORKLOADS):
        results += WORKLOADS[name](scans, repeats, warmup)
    info = machine_info()
    print(f"machine: {info}")
    print(f"repetitions: {repeats} after {warmup} warm-up, alternating; ratios = row median / sparseconv median")
    print(format_table(results))
    if args.json:
        from .io import atomic_write

        payload = {"machine": info, "repeats": repeats, "warmup": warmup,
                   "results": [{"workload": m.workload, "config": m.config, "impl": m.impl,
                                "median_ms": m.median_ms, "times_ms": m.times_ms, **m.extra} for m in results]}
        with atomic_write(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return 0


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))
