"""Benchmark harness (``tools/benchmark.py``, ``sparseconv bench``).

Every workload times sparseconv and its peers in the same run, alternating between them on
each repetition, and reports the median of the timed repetitions after warm-up, the ratio of
each peer's median to every sparseconv row's, the useful GFLOP/s (kernel-map pairs x C_in x C_out
x 2 per second), that as a fraction of ``torch.mm`` on the same GEMM shapes, and the peak RSS
increase of one call of each implementation, measured in a separate process.  Speed lives here,
never in the tests.

workloads:
  layers    SubMConv3d 3^3, SparseConv3d 3^3 stride 2, SparseInverseConv3d (its inverse),
            SparseMaxPool3d 3^3 stride 2 at C = 16, 32, 64, 128, on a crop of each scan
  backbone  OpenPCDet's VoxelBackBone8x (SECOND) on each scan
  minkunet  a compact MinkUNet-style encoder-decoder (4 down, 4 up, skip concatenation)
  kmap      building every kernel map of the VoxelBackBone8x sequence, nothing else
  voxelize  voxelizing a full scan
  sparse-blocks  SparseFFN sparse vs dense path at 50/80/90/95 % hidden sparsity (100k voxels, C 64, hidden 256),
            SparseMoEFFN (8 experts, top-2) vs a dense FFN of the same total width, SparseWindowAttention
            vs one SubMConv3d 3^3 and vs full attention (extrapolated from a 4096-voxel run)
"""
from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import platform
import select
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from .voxelize import KITTI_POINT_RANGE as KITTI_RANGE

__all__ = ["Measurement", "Scan", "Settings", "time_alternating", "load_scans", "format_table", "main", "run",
           "WORKLOADS", "minkunet", "spconv_minkunet", "spconv_state_dict"]

DEFAULT_KITTI = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                             "kitti", "velodyne")

SECOND_VOXEL = (0.05, 0.05, 0.1)
MINKUNET_VOXEL = (0.1, 0.1, 0.1)
# Single layers run on a crop in front of the sensor (the densest part of a scan), small enough for a
# dense conv3d peer: 12.8 m x 12.8 m x 4 m = a 256 x 256 x 40 grid of SECOND voxels.
LAYER_RANGE = (0.0, -6.4, -3.0, 12.8, 6.4, 1.0)
# --smoke: every workload on a 6.4 m x 6.4 m x 4 m crop (128 x 128 x 40 SECOND voxels) and C = 16.
SMOKE_RANGE = (0.0, -3.2, -3.0, 6.4, 3.2, 1.0)
LAYER_KINDS = ("subm", "conv", "inverse", "maxpool")
DEFAULT_CHANNELS = (16, 32, 64, 128)
# VoxelBackBone8x's strided layers in our (x, y, z) order: (kernel_size, stride, padding); a submanifold
# 3^3 map precedes each of them (see ``_spconv_backbone`` for the spconv (z, y, x) spelling).
BACKBONE_STRIDED = (((3, 3, 3), (2, 2, 2), (1, 1, 1)),
                    ((3, 3, 3), (2, 2, 2), (1, 1, 1)),
                    ((3, 3, 3), (2, 2, 2), (1, 1, 0)),
                    ((1, 1, 3), (1, 1, 2), (0, 0, 0)))
MINKUNET_ENCODER = (32, 32, 64, 128, 256)  # stem, then the 4 encoder stages
MINKUNET_DECODER = (256, 128, 96, 96)
MM_FORWARD = "torch.mm per offset [pairs_k, C_in] @ [C_in, C_out]"
MM_TRAIN = "torch.mm per offset, forward + input and weight grads"
PEAK_TIMEOUT_S = 600.0


@dataclass
class Measurement:
    """One row of the results: the timings of one implementation on one configuration.

    ``extra`` holds the derived columns (``gflops_per_s``, ``mm_fraction``, ``peak_mb``, ...).
    """

    workload: str
    config: str
    impl: str
    median_ms: float
    times_ms: List[float] = field(repr=False)
    extra: Dict[str, object] = field(default_factory=dict)


class Scan(NamedTuple):
    """A point cloud to benchmark on: ``points`` float32 ``[N, 4]``; ``path`` is ``None`` for the simulated scan."""

    name: str
    points: np.ndarray
    path: Optional[str]


@dataclass(frozen=True)
class Settings:
    """What one benchmark run does (built from the command line by :func:`run`).

    Attributes:
        repeats: timed repetitions per implementation.
        warmup: untimed calls of every implementation before timing.
        smoke: tiny crops and one channel count (CI).
        threads: torch CPU threads (``None``: torch's default); also used by the peak-memory children.
        channels: channel counts of the ``layers`` workload.
        dense_max_gb: skip a dense peer whose grid x C x 4 bytes x 3 exceeds this.
        dense_max_gflop: skip a dense peer whose dense arithmetic exceeds this per call.
        peak_memory: measure the peak RSS increase of every implementation.
        back_to_back: time each call right after an untimed call of the same implementation
            (:func:`time_alternating`).
    """

    repeats: int
    warmup: int
    smoke: bool = False
    threads: Optional[int] = None
    channels: Tuple[int, ...] = DEFAULT_CHANNELS
    dense_max_gb: float = 4.0
    dense_max_gflop: float = 100.0
    peak_memory: bool = True
    back_to_back: bool = False


@dataclass
class Peer:
    """One implementation of a benchmark case.

    Attributes:
        fn: one call (returns whatever it computes; the result is dropped).
        gflop: useful GFLOP of one call (pairs x C_in x C_out x 2, summed); ``None`` where no FLOP count applies.
        memory: whether to measure the peak RSS increase of one call.
        floor: this is the ``torch.mm`` row that the "of mm" column divides by.
    """

    fn: Callable[[], object]
    gflop: Optional[float] = None
    memory: bool = True
    floor: bool = False


@dataclass
class Built:
    """A benchmark case ready to run: its label, implementations and notes."""

    config: str
    peers: Dict[str, Peer]
    grad: bool = False
    extra: Dict[str, object] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


def time_alternating(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int,
                     back_to_back: bool = False) -> Dict[str, List[float]]:
    """Runs every function ``warmup`` times, then ``repeats`` rounds in which each runs once, in turn.

    Every timed call follows calls of the other functions, so it starts with whatever they left in
    the caches.  With ``back_to_back``, each timed call comes right after an untimed call of the
    same function (its code and buffers warm, as when one implementation processes a stream of
    scans); the rounds still alternate between the functions.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if back_to_back:
                fn()
            t0 = time.perf_counter()
            fn()
            times[name].append(1000.0 * (time.perf_counter() - t0))
    return times


def load_scans(inputs: Sequence[str]) -> List[Scan]:
    """The given files, else the KITTI scans beside the repo, else a simulated one."""
    from .io import read_points

    paths = list(inputs) or sorted(glob.glob(os.path.join(DEFAULT_KITTI, "*.bin")))
    if paths:
        return [Scan(os.path.basename(p), read_points(p).to_array(), os.path.abspath(p)) for p in paths]
    return [Scan("simulated", _simulated_points(), None)]


def _simulated_points() -> np.ndarray:
    from .cli.demo import simulated_scan

    return np.asarray(simulated_scan(0).points, dtype=np.float32)


def _spconv():
    """``spconv.pytorch``, or ``None`` where it is not importable."""
    try:
        import spconv.pytorch as spconv
    except ImportError:
        return None
    return spconv


def _range_label(point_range) -> str:
    x0, y0, z0, x1, y1, z1 = point_range
    return f"x {x0:g}..{x1:g} m, y {y0:g}..{y1:g} m, z {z0:g}..{z1:g} m"


def _tensor_points(points: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32))


def _spconv_indices(coords: torch.Tensor) -> torch.Tensor:
    """Our ``(b, x, y, z)`` rows as spconv's contiguous int32 ``(b, z, y, x)`` rows."""
    return torch.cat([coords[:, :1], coords[:, 1:].flip(1)], 1).to(torch.int32).contiguous()


def _clear_grads(*tensors) -> None:
    for t in tensors:
        t.grad = None


# --------------------------------------------------------------------------- GEMM accounting
GemmShape = Tuple[List[int], int, int, bool]  # (pairs per kernel offset, C_in, C_out, input gradient needed)


def _offset_pairs(nbmap: torch.Tensor) -> List[int]:
    """Pairs per kernel offset: the non-negative entries of each column of an ``[N_out, K]`` map."""
    return [int(v) for v in (nbmap >= 0).sum(0).tolist()]


def _gemm_gflop(shapes: Sequence[GemmShape], train: bool) -> float:
    """Useful GFLOP: pairs x C_in x C_out x 2 per GEMM; training adds the weight gradient and, where
    needed, the input gradient (the same count each)."""
    total = 0.0
    for counts, ci, co, input_grad in shapes:
        per = 2.0 * sum(counts) * ci * co
        total += per * ((2 + int(input_grad)) if train else 1)
    return total / 1e9


def _mm_floor(shapes: Sequence[GemmShape], train: bool) -> Callable[[], object]:
    """``torch.mm`` on the same shapes: per layer and kernel offset ``[pairs_k, C_in] @ [C_in, C_out]``
    (training: also ``[pairs_k, C_out] @ [C_out, C_in]`` where the input gradient is needed, and
    ``[C_in, pairs_k] @ [pairs_k, C_out]``)."""
    g = torch.Generator().manual_seed(0)
    mats = []
    for counts, ci, co, input_grad in shapes:
        b = torch.randn(ci, co, generator=g)
        for p in counts:
            if p:
                mats.append((torch.randn(p, ci, generator=g), b, torch.randn(p, co, generator=g) if train else None,
                             input_grad))

    def forward():
        return [torch.mm(a, b) for a, b, _, _ in mats]

    def training():
        out = []
        for a, b, grad, input_grad in mats:
            out.append(torch.mm(a, b))
            if input_grad:
                out.append(torch.mm(grad, b.t()))
            out.append(torch.mm(a.t(), grad))
        return out

    return training if train else forward


def _network_gemm_shapes(net, x) -> List[GemmShape]:
    """Per-offset GEMM shapes of every sparse convolution of ``net`` on ``x`` (maps from the tensors'
    caches).  The input gradient is counted for every convolution but those reading ``x`` itself."""
    from .nn.conv import SparseConv3d, SparseInverseConv3d, SubMConv3d

    shapes: List[GemmShape] = []

    def hook(module, inputs, output):
        x_in = inputs[0]
        cset = x_in.coordinate_set
        if isinstance(module, SubMConv3d):
            nbmap = cset.submanifold_map(module.kernel_size, module.dilation)
        elif isinstance(module, SparseInverseConv3d):
            nbmap = cset.inverse_record(module.indice_key, "bench").nbmap
        else:
            nbmap = cset.strided(module.kernel_size, module.stride, module.padding, module.dilation).nbmap
        shapes.append((_offset_pairs(nbmap), module.in_channels, module.out_channels,
                       x_in.features is not x.features))

    kinds = (SubMConv3d, SparseConv3d, SparseInverseConv3d)
    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, kinds)]
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(x)
    finally:
        net.train(was_training)
        for h in handles:
            h.remove()
    return shapes


def _add_mm_floor(peers: Dict[str, Peer], shapes: Sequence[GemmShape], train: bool, only: Optional[str]) -> float:
    """Adds the ``torch.mm`` row (unless another peer alone is wanted); returns the useful GFLOP."""
    gflop = _gemm_gflop(shapes, train)
    name = MM_TRAIN if train else MM_FORWARD
    if only is None or only == name:
        peers[name] = Peer(_mm_floor(shapes, train), gflop, memory=False, floor=True)
    return gflop


def _try_spconv_training(peers: Dict[str, Peer], name: str, step: Callable[[], object], gflop, notes: List[str]):
    """Adds spconv's forward+backward if it runs here (spconv 2.3.8's CPU backward asks torch.cuda for a stream)."""
    try:
        step()
    except Exception as e:
        notes.append(f"spconv forward+backward is unavailable here: {type(e).__name__}: {str(e).splitlines()[0]}")
        return
    peers[name] = Peer(step, gflop, memory=False)


# --------------------------------------------------------------------------- voxelize
VOXELIZE_CONFIGS = (("SECOND 0.05x0.05x0.1, 5 pts, 150k voxels", (0.05, 0.05, 0.1), 5, 150000),
                    ("PointPillars 0.16x0.16x4, 32 pts, 40k voxels", (0.16, 0.16, 4.0), 32, 40000))


def _build_voxelize(scan: Scan, params: Dict, only: Optional[str], settings: Settings) -> Built:
    """Voxelizing a full scan: sparseconv (padded PointToVoxel layout, and mean-reduced SparseTensor) vs
    spconv's CPU ``PointToVoxel`` and a NumPy ``unique`` baseline."""
    from . import voxelize, voxelize_padded

    label, vs, max_points, max_voxels = VOXELIZE_CONFIGS[params["config"]]
    pts_np = np.ascontiguousarray(scan.points, dtype=np.float32)
    pts = torch.from_numpy(pts_np)
    peers = {
        "sparseconv voxelize_padded": Peer(lambda: voxelize_padded(pts, vs, KITTI_RANGE, max_points, max_voxels)),
        "sparseconv voxelize (mean)": Peer(lambda: voxelize(pts, vs, KITTI_RANGE, max_points_per_voxel=max_points,
                                                            max_voxels=max_voxels)),
    }
    spconv = _spconv()
    if spconv is not None:
        from spconv.pytorch.utils import PointToVoxel

        gen = PointToVoxel(vsize_xyz=list(vs), coors_range_xyz=list(KITTI_RANGE), num_point_features=pts.shape[1],
                           max_num_voxels=max_voxels, max_num_points_per_voxel=max_points)
        peers["spconv PointToVoxel"] = Peer(lambda: gen(pts))
    lo, vsz = np.array(KITTI_RANGE[:3], np.float32), np.array(vs, np.float32)
    grid = np.round((np.array(KITTI_RANGE[3:]) - np.array(KITTI_RANGE[:3])) / np.array(vs)).astype(np.int64)

    def numpy_unique():
        q = np.floor((pts_np[:, :3] - lo) / vsz)
        keep = np.isfinite(q).all(1) & (q >= 0).all(1) & (q < grid).all(1)
        return np.unique(q[keep].astype(np.int64), axis=0, return_inverse=True)

    peers["numpy unique (no limits)"] = Peer(numpy_unique)
    return Built(f"{scan.name}: {label}", peers, extra={"points": int(pts.shape[0])})


def bench_voxelize(scans: Sequence[Scan], session: "Session") -> List[Measurement]:
    """Voxelization of each full scan (see :func:`_build_voxelize`)."""
    out = []
    for scan in scans:
        for i in range(len(VOXELIZE_CONFIGS)):
            out += session.run_case("voxelize", "voxelize", scan, {"config": i})
    return out


# --------------------------------------------------------------------------- single layers
def _layer_label(kind: str, c: int) -> str:
    return {"subm": f"SubMConv3d 3^3, {c} -> {c}",
            "conv": f"SparseConv3d 3^3 stride 2 padding 1, {c} -> {c}",
            "inverse": f"SparseInverseConv3d 3^3 (inverse of the stride-2 conv), {c} -> {c}",
            "maxpool": f"SparseMaxPool3d 3^3 stride 2 padding 1, C = {c}"}[kind]


def _dense_peer(kind, c, x, down, down_shape, settings: Settings, notes: List[str]) -> Optional[Tuple[str, Callable]]:
    """The dense ``torch.nn.functional`` equivalent on the pre-densified grid, or ``None`` (with a note)
    where the dense grid needs more than ``dense_max_gb`` or ``dense_max_gflop``."""
    F = torch.nn.functional
    shape = x.spatial_shape
    big = max(int(np.prod(shape)), int(np.prod(down_shape)))
    need_gb = big * c * 4 * 3 / 1e9
    out_voxels = int(np.prod(down_shape)) if kind in ("conv", "maxpool") else int(np.prod(shape))
    in_voxels = int(np.prod(down_shape)) if kind == "inverse" else out_voxels
    dense_gflop = 0.0 if kind == "maxpool" else 2.0 * in_voxels * 27 * c * c / 1e9
    what = f"dense peer of {_layer_label(kind, c)} on {shape[0]}x{shape[1]}x{shape[2]}"
    if need_gb > settings.dense_max_gb:
        notes.append(f"{what} skipped: grid {big} voxels x C {c} x 4 B x 3 = {need_gb:.2f} GB > "
                     f"{settings.dense_max_gb:g} GB (--dense-max-gb)")
        return None
    if dense_gflop > settings.dense_max_gflop:
        notes.append(f"{what} skipped: {dense_gflop:.0f} GFLOP of dense arithmetic per call > "
                     f"{settings.dense_max_gflop:g} (--dense-max-gflop)")
        return None
    g = torch.Generator().manual_seed(1)
    w = torch.randn(c, c, 3, 3, 3, generator=g) / np.sqrt(27 * c)
    if kind == "subm":
        dense = x.dense()
        return "dense conv3d (input already dense)", lambda: F.conv3d(dense, w, padding=1)
    if kind == "conv":
        dense = x.dense()
        return "dense conv3d stride 2 (input already dense)", lambda: F.conv3d(dense, w, stride=2, padding=1)
    if kind == "maxpool":
        dense = x.dense()
        return "dense max_pool3d (input already dense)", lambda: F.max_pool3d(dense, 3, 2, 1)
    dense = down.dense()
    opad = [s - ((n - 1) * 2 - 2 + 3) for s, n in zip(shape, down_shape)]
    return ("dense conv_transpose3d stride 2 (input already dense)",
            lambda: F.conv_transpose3d(dense, w, stride=2, padding=1, output_padding=opad))


def _build_layer(scan: Scan, params: Dict, only: Optional[str], settings: Settings) -> Built:
    """One layer at ``C -> C`` on a crop of the scan; forward (``mode="forward"``) or forward + backward."""
    from . import SparseTensor, nn as snn, voxelize
    from .interop import convert_to_spconv_weight

    kind, c, train, point_range = params["layer"], params["channels"], params["mode"] == "train", params["range"]
    notes: List[str] = []
    vox, _ = voxelize(_tensor_points(scan.points), SECOND_VOXEL, point_range)
    coords, shape, n = vox.coords.contiguous(), vox.spatial_shape, vox.num_voxels
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(n, c, generator=g).requires_grad_(train)
    torch.manual_seed(0)
    k3, s2, p1, d1 = (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1)
    layer = {"subm": lambda: snn.SubMConv3d(c, c, 3, bias=False),
             "conv": lambda: snn.SparseConv3d(c, c, 3, 2, 1, bias=False),
             "inverse": lambda: snn.SparseInverseConv3d(c, c, 3, bias=False),
             "maxpool": lambda: snn.SparseMaxPool3d(3, 2, 1)}[kind]()
    x_cached = SparseTensor(feats, coords, shape)
    down = x_cached.coordinate_set.strided(k3, s2, p1, d1)
    m = down.target.num_voxels
    feats_down = torch.randn(m, c, generator=g).requires_grad_(train)
    if kind == "subm":
        nbmap = x_cached.coordinate_set.submanifold_map(k3, d1)
    else:
        nbmap = down.nbmap
    pairs = _offset_pairs(nbmap)
    params_of_layer = [p for p in layer.parameters()]

    def step(out):
        if train:
            out.features.sum().backward()
            _clear_grads(feats, feats_down, *params_of_layer)
        return out

    peers: Dict[str, Peer] = {}
    gflop = None
    if kind != "maxpool" and (only is None or only.startswith("torch.mm")):
        gflop = _add_mm_floor(peers, [(pairs, c, c, True)], train, only)
    elif kind != "maxpool":
        gflop = _gemm_gflop([(pairs, c, c, True)], train)
    what = "forward+backward" if train else "forward"
    if kind == "inverse":
        x_down = SparseTensor._from_set(feats_down, down.target)
        peers[f"sparseconv {what} (cached maps)"] = Peer(lambda: step(layer(x_down)), gflop, memory=not train)
    else:
        peers[f"sparseconv {what} (fresh)"] = Peer(lambda: step(layer(SparseTensor(feats, coords, shape))), gflop,
                                                    memory=not train)
        peers[f"sparseconv {what} (cached maps)"] = Peer(lambda: step(layer(x_cached)), gflop, memory=not train)
    spconv = _spconv()
    if spconv is not None and (only is None or only.startswith("spconv")):
        idx, shape_sp = _spconv_indices(coords), list(reversed(shape))
        algos = [("ConvAlgo.Native", spconv.ConvAlgo.Native)] if train else \
            [("default algorithm", None), ("ConvAlgo.Native", spconv.ConvAlgo.Native)]
        for label, algo in algos:
            if kind == "maxpool":
                ref = spconv.SparseMaxPool3d(3, 2, 1, algo=algo)
            else:
                conv_cls = {"subm": spconv.SubMConv3d, "conv": spconv.SparseConv3d,
                            "inverse": spconv.SparseInverseConv3d}[kind]
                args = {"subm": (3,), "conv": (3, 2, 1), "inverse": (3,)}[kind]
                ref = conv_cls(c, c, *args, bias=False, indice_key="k", algo=algo)
                with torch.no_grad():
                    ref.weight.copy_(convert_to_spconv_weight(layer.weight.detach(), k3))
            ref_params = list(ref.parameters())

            def sp_step(out, ref_params=ref_params):
                if train:
                    out.features.sum().backward()
                    _clear_grads(feats, feats_down, *ref_params)
                return out

            def sp_fresh(ref=ref):
                return sp_step(ref(spconv.SparseConvTensor(feats, idx, shape_sp, 1)))

            rows: Dict[str, Callable] = {}
            if kind == "inverse":
                down_sp = spconv.SparseConv3d(c, c, 3, 2, 1, bias=False, indice_key="k", algo=algo)
                with torch.no_grad():
                    y = down_sp(spconv.SparseConvTensor(feats.detach(), idx, shape_sp, 1))
                if y.features.shape[0] != m:
                    raise RuntimeError(f"spconv's stride-2 conv gives {y.features.shape[0]} sites, ours {m}")
                y = y.replace_feature(feats_down)
                rows[f"spconv {label} {what} (cached maps)"] = lambda ref=ref, y=y: sp_step(ref(y))
            elif kind == "subm":
                with torch.no_grad():
                    y = ref(spconv.SparseConvTensor(feats.detach(), idx, shape_sp, 1))
                x_sp = y.replace_feature(feats)  # carries the submanifold pairs under indice_key "k"
                rows[f"spconv {label} {what} (fresh)"] = sp_fresh
                rows[f"spconv {label} {what} (cached maps)"] = lambda ref=ref, x_sp=x_sp: sp_step(ref(x_sp))
            else:
                rows[f"spconv {label} {what} (fresh)"] = sp_fresh
                if label == "ConvAlgo.Native":
                    notes.append("spconv reuses only submanifold (and inverse) maps: its strided conv and pooling "
                                 "rows build their maps on every call")
            for name, fn in rows.items():
                if train:
                    _try_spconv_training(peers, name, fn, gflop, notes)
                else:
                    peers[name] = Peer(fn, gflop)
    if not train and (only is None or only.startswith("dense")):
        dense = _dense_peer(kind, c, x_cached, SparseTensor._from_set(feats_down, down.target),
                            down.target.spatial_shape, settings, notes)
        if dense is not None:
            peers[dense[0]] = Peer(dense[1], gflop)
    crop = f"crop {_range_label(point_range)} ({shape[0]}x{shape[1]}x{shape[2]} grid of {SECOND_VOXEL} m voxels)"
    count = f"{n} voxels -> {m}" if kind in ("conv", "maxpool") else (f"{m} voxels -> {n}" if kind == "inverse"
                                                                       else f"{n} voxels")
    flop = "" if gflop is None else f", {gflop:.3f} useful GFLOP" + (" (fwd + both grads)" if train else "")
    config = f"{scan.name} {crop}: {_layer_label(kind, c)}, {count}, {sum(pairs)} pairs{flop}"
    return Built(config, peers, grad=train, extra={"voxels": n, "pairs": sum(pairs), "gflop": gflop}, notes=notes)


def bench_layers(scans: Sequence[Scan], session: "Session") -> List[Measurement]:
    """Single layers (:data:`LAYER_KINDS`) at every channel count, forward and forward + backward."""
    rng = SMOKE_RANGE if session.settings.smoke else LAYER_RANGE
    out = []
    for scan in scans:
        for kind in LAYER_KINDS:
            for c in session.settings.channels:
                for mode, workload in (("forward", "layers"), ("train", "layers-train")):
                    out += session.run_case(workload, "layer", scan,
                                            {"layer": kind, "channels": c, "mode": mode, "range": rng})
    return out


# --------------------------------------------------------------------------- networks
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


class _MinkUNet(torch.nn.Module):
    """A compact MinkUNet18-shaped encoder-decoder, built from either library's layers.

    Stem SubM 3^3 ``in -> 32``; 4 encoder stages, each ``SparseConv3d`` 2^3 stride 2 (channels kept)
    + SubM 3^3 (``32, 64, 128, 256``); 4 decoder stages, each ``SparseInverseConv3d`` 2^3 of the matching
    encoder conv (``256, 128, 96, 96``), concatenation with the encoder features at that stride, SubM 3^3.
    BatchNorm + ReLU after every convolution; no classification head.  MinkUNet18 has two residual
    blocks per stage and a 5^3 stem; this keeps its strides, channels and skips with one conv each.
    """

    def __init__(self, in_channels: int, lib: Dict[str, Callable]):
        super().__init__()
        seq, subm, down, up, bn, relu = (lib[k] for k in ("seq", "subm", "down", "up", "bn", "relu"))
        self._cat = lib["cat"]
        enc = MINKUNET_ENCODER
        self.stem = seq(subm(in_channels, enc[0], "subm0"), bn(enc[0]), relu())
        self.encoder = torch.nn.ModuleList(
            seq(down(enc[i], enc[i], f"down{i + 1}"), bn(enc[i]), relu(),
                subm(enc[i], enc[i + 1], f"subm{i + 1}"), bn(enc[i + 1]), relu()) for i in range(4))
        self.up = torch.nn.ModuleList()
        self.fuse = torch.nn.ModuleList()
        cin = enc[4]
        for i, cout in enumerate(MINKUNET_DECODER):
            level = 3 - i  # the encoder level this stage returns to (0 = the input's sites)
            self.up.append(seq(up(cin, cout, f"down{level + 1}"), bn(cout), relu()))
            self.fuse.append(seq(subm(cout + enc[level], cout, f"subm{level}"), bn(cout), relu()))
            cin = cout

    def forward(self, x):
        skips = [self.stem(x)]
        for stage in self.encoder:
            skips.append(stage(skips[-1]))
        y = skips.pop()
        for up, fuse in zip(self.up, self.fuse):
            y = fuse(self._cat(up(y), skips.pop()))
        return y


def minkunet(in_channels: int = 4) -> torch.nn.Module:
    """The benchmark's MinkUNet-style network in sparseconv layers (see :class:`_MinkUNet`).

    Example:
        >>> net = minkunet(4).eval()
        >>> y = net(x)  # 96 channels on the sites of x; x.spatial_shape divisible by 16
    """
    from . import cat, nn as snn

    lib = {"seq": snn.SparseSequential, "bn": snn.BatchNorm, "relu": snn.ReLU, "cat": lambda a, b: cat([a, b]),
           "subm": lambda ci, co, key: snn.SubMConv3d(ci, co, 3, bias=False, indice_key=key),
           "down": lambda ci, co, key: snn.SparseConv3d(ci, co, 2, 2, bias=False, indice_key=key),
           "up": lambda ci, co, key: snn.SparseInverseConv3d(ci, co, 2, indice_key=key, bias=False)}
    return _MinkUNet(in_channels, lib)


def spconv_minkunet(in_channels: int = 4, algo=None) -> torch.nn.Module:
    """:func:`minkunet` in spconv layers, with the same module names; ``algo=None`` is spconv's default.

    Raises:
        ImportError: spconv is not importable.
    """
    from .interop import _import_spconv

    spconv = _import_spconv()
    lib = {"seq": spconv.SparseSequential, "bn": torch.nn.BatchNorm1d, "relu": torch.nn.ReLU,
           "cat": lambda a, b: a.replace_feature(torch.cat([a.features, b.features], 1)),
           "subm": lambda ci, co, key: spconv.SubMConv3d(ci, co, 3, bias=False, indice_key=key, algo=algo),
           "down": lambda ci, co, key: spconv.SparseConv3d(ci, co, 2, 2, bias=False, indice_key=key, algo=algo),
           "up": lambda ci, co, key: spconv.SparseInverseConv3d(ci, co, 2, indice_key=key, bias=False, algo=algo)}
    return _MinkUNet(in_channels, lib)


def spconv_state_dict(net: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """``net.state_dict()`` with every sparse convolution weight converted to spconv's layout."""
    from .interop import convert_to_spconv_weight
    from .nn.conv import _SparseConvBase

    sd = net.state_dict()
    for name, m in net.named_modules():
        if isinstance(m, _SparseConvBase):
            sd[f"{name}.weight"] = convert_to_spconv_weight(m.weight.detach(), m.kernel_size)
    return sd


def _network_peers(net, spconv_net: Callable, feats, coords, shape, train: bool, only: Optional[str],
                   notes: List[str]) -> Tuple[Dict[str, Peer], float]:
    """sparseconv (fresh input, cached maps), ``torch.mm`` and spconv rows of one network.

    ``spconv_net(algo)`` builds the spconv twin (same module names); ``net``'s output may be a
    SparseTensor or OpenPCDet's dict with ``"encoded"``.
    """
    from . import SparseTensor

    def out_features(y):
        return (y["encoded"] if isinstance(y, dict) else y).features

    net.train(train)
    what = "forward+backward" if train else "forward"
    x_cached = SparseTensor(feats, coords, shape)
    peers: Dict[str, Peer] = {}
    if only is None or only.startswith("torch.mm"):
        gflop = _add_mm_floor(peers, _network_gemm_shapes(net, x_cached), train, only)
    else:
        gflop = None
    params = list(net.parameters())

    def step(x):
        y = net(x)
        if train:
            out_features(y).sum().backward()
            _clear_grads(*params)
        return y

    peers[f"sparseconv {what} (fresh)"] = Peer(lambda: step(SparseTensor(feats, coords, shape)), gflop,
                                                memory=not train)
    peers[f"sparseconv {what} (cached maps)"] = Peer(lambda: step(x_cached), gflop, memory=not train)
    spconv = _spconv()
    if spconv is not None and (only is None or only.startswith("spconv")):
        sd = spconv_state_dict(net)
        idx, shape_sp = _spconv_indices(coords), list(reversed(shape))
        algos = [("ConvAlgo.Native", spconv.ConvAlgo.Native)] if train else \
            [("default algorithm", None), ("ConvAlgo.Native", spconv.ConvAlgo.Native)]
        for label, algo in algos:
            ref = spconv_net(algo)  # algo=None: spconv's own default, as users run it
            ref.load_state_dict(sd)
            ref.train(train)
            ref_params = list(ref.parameters())

            def sp_step(ref=ref, ref_params=ref_params):
                y = ref(spconv.SparseConvTensor(feats, idx, shape_sp, 1))
                if train:
                    y.features.sum().backward()
                    _clear_grads(*ref_params)
                return y

            name = f"spconv {label} {what} (fresh)"
            if train:
                _try_spconv_training(peers, name, sp_step, gflop, notes)
            else:
                peers[name] = Peer(sp_step, gflop)
    return peers, gflop


def _build_backbone(scan: Scan, params: Dict, only: Optional[str], settings: Settings) -> Built:
    """OpenPCDet's VoxelBackBone8x (SECOND), 0.05 x 0.05 x 0.1 m voxels, eval (forward, no_grad) or train mode."""
    from . import voxelize
    from sparseconv.models import VoxelBackBone8x

    train, point_range = params["mode"] == "train", params["range"]
    vox, _ = voxelize(_tensor_points(scan.points), SECOND_VOXEL, point_range)
    torch.manual_seed(0)
    net = VoxelBackBone8x(4, vox.spatial_shape)
    notes: List[str] = []
    peers, gflop = _network_peers(net, lambda algo: _spconv_backbone(4, algo), vox.features.contiguous(),
                                  vox.coords.contiguous(), net.sparse_shape, train, only, notes)
    what = "forward+backward" if train else "forward"
    flop = "" if gflop is None else f", {gflop:.2f} useful GFLOP"
    config = f"{scan.name} {_range_label(point_range)}: VoxelBackBone8x {what}, {vox.num_voxels} voxels{flop}"
    return Built(config, peers, grad=train, extra={"voxels": vox.num_voxels, "gflop": gflop}, notes=notes)


def _minkunet_input(points: np.ndarray, point_range):
    """``(features, coords, spatial_shape)``: 0.1 m cubic voxels, the grid rounded up to multiples of 16."""
    from . import voxelize

    vox, _ = voxelize(_tensor_points(points), MINKUNET_VOXEL, point_range)
    shape = tuple(-(-s // 16) * 16 for s in vox.spatial_shape)
    return vox.features.contiguous(), vox.coords.contiguous(), shape


def _build_minkunet(scan: Scan, params: Dict, only: Optional[str], settings: Settings) -> Built:
    """The MinkUNet-style network (:func:`minkunet`) on 0.1 m cubic voxels, forward or forward + backward."""
    train, point_range = params["mode"] == "train", params["range"]
    feats, coords, shape = _minkunet_input(scan.points, point_range)
    torch.manual_seed(0)
    net = minkunet(4)
    notes: List[str] = []
    peers, gflop = _network_peers(net, lambda algo: spconv_minkunet(4, algo), feats, coords, shape, train, only,
                                  notes)
    what = "forward+backward" if train else "forward"
    flop = "" if gflop is None else f", {gflop:.2f} useful GFLOP"
    config = (f"{scan.name} {_range_label(point_range)}, 0.1 m cubic voxels on {shape[0]}x{shape[1]}x{shape[2]}: "
              f"MinkUNet-style {what}, {feats.shape[0]} voxels{flop}")
    return Built(config, peers, grad=train, extra={"voxels": int(feats.shape[0]), "gflop": gflop}, notes=notes)


def bench_backbone(scans: Sequence[Scan], session: "Session") -> List[Measurement]:
    """VoxelBackBone8x on each scan: forward (fresh input and cached maps) and forward + backward."""
    rng = SMOKE_RANGE if session.settings.smoke else KITTI_RANGE
    out = []
    for scan in scans:
        for mode, workload in (("forward", "backbone"), ("train", "backbone-train")):
            out += session.run_case(workload, "backbone", scan, {"mode": mode, "range": rng})
    return out


def bench_minkunet(scans: Sequence[Scan], session: "Session") -> List[Measurement]:
    """The MinkUNet-style network on each scan: forward (fresh input and cached maps) and forward + backward."""
    rng = SMOKE_RANGE if session.settings.smoke else KITTI_RANGE
    out = []
    for scan in scans:
        for mode, workload in (("forward", "minkunet"), ("train", "minkunet-train")):
            out += session.run_case(workload, "minkunet", scan, {"mode": mode, "range": rng})
    return out


# --------------------------------------------------------------------------- kernel maps
def backbone_kernel_maps(feats, coords, shape):
    """Builds every kernel map of the VoxelBackBone8x sequence with sparseconv, from a fresh tensor.

    For each resolution the submanifold 3^3 map, then the strided map to the next resolution
    (:data:`BACKBONE_STRIDED`).  Returns the ``[N_out, K]`` maps in that order.
    """
    from . import SparseTensor

    cset = SparseTensor(feats, coords, shape).coordinate_set
    maps = []
    for ks, st, pad in BACKBONE_STRIDED:
        maps.append(cset.submanifold_map((3, 3, 3), (1, 1, 1)))
        record = cset.strided(ks, st, pad, (1, 1, 1))
        maps.append(record.nbmap)
        cset = record.target
    return maps


def spconv_backbone_kernel_maps(coords, shape):
    """The same maps as :func:`backbone_kernel_maps`, built by ``spconv.pytorch.ops.get_indice_pairs``
    (``ConvAlgo.Native``) in spconv's ``(z, y, x)`` order.  Returns ``(indice_pairs, indice_pair_num)``
    per map."""
    from spconv.core import ConvAlgo
    from spconv.pytorch import ops

    indices, spatial = _spconv_indices(coords), list(reversed(shape))
    maps = []
    for ks, st, pad in BACKBONE_STRIDED:
        _, pairs, num = ops.get_indice_pairs(indices, 1, spatial, ConvAlgo.Native, [3, 3, 3], [1, 1, 1], [1, 1, 1],
                                             [1, 1, 1], [0, 0, 0], True, False)
        maps.append((pairs, num))
        ks, st, pad = list(reversed(ks)), list(reversed(st)), list(reversed(pad))
        indices, pairs, num = ops.get_indice_pairs(indices, 1, spatial, ConvAlgo.Native, ks, st, pad, [1, 1, 1],
                                                   [0, 0, 0], False, False)
        maps.append((pairs, num))
        spatial = ops.get_conv_output_size(spatial, ks, st, pad, [1, 1, 1])
    return maps


def _build_kmap(scan: Scan, params: Dict, only: Optional[str], settings: Settings) -> Built:
    """Kernel-map building alone for VoxelBackBone8x's layer sequence, fresh input every call."""
    from . import voxelize

    point_range = params["range"]
    vox, _ = voxelize(_tensor_points(scan.points), SECOND_VOXEL, point_range)
    feats, coords = vox.features.contiguous(), vox.coords.contiguous()
    shape = (vox.spatial_shape[0], vox.spatial_shape[1], vox.spatial_shape[2] + 1)  # as VoxelBackBone8x
    peers = {"sparseconv kernel maps (fresh)": Peer(lambda: backbone_kernel_maps(feats, coords, shape))}
    if _spconv() is not None:
        peers["spconv get_indice_pairs ConvAlgo.Native"] = Peer(lambda: spconv_backbone_kernel_maps(coords, shape))
    pairs = sum(int((m >= 0).sum()) for m in backbone_kernel_maps(feats, coords, shape))
    config = (f"{scan.name} {_range_label(point_range)}: VoxelBackBone8x's 8 kernel maps (4 submanifold 3^3, "
              f"4 strided), {vox.num_voxels} voxels, {pairs} pairs")
    return Built(config, peers, extra={"voxels": vox.num_voxels, "pairs": pairs})


def bench_kmap(scans: Sequence[Scan], session: "Session") -> List[Measurement]:
    """Kernel-map building alone (see :func:`_build_kmap`)."""
    rng = SMOKE_RANGE if session.settings.smoke else KITTI_RANGE
    out = []
    for scan in scans:
        out += session.run_case("kmap", "kmap", scan, {"range": rng})
    return out


# --------------------------------------------------------------------------- sparse blocks (FFN, MoE, attention)
BLOCK_VOXELS = 100_000
BLOCK_CHANNELS, BLOCK_HIDDEN = 64, 256
BLOCK_SPARSITIES = (0.5, 0.8, 0.9, 0.95)
BLOCK_EXPERTS, BLOCK_TOP_K = 8, 2
BLOCK_HEADS, BLOCK_WINDOW, BLOCK_GROUP = 4, 8, 64
FULL_ATTENTION_SAMPLE = 4096  # voxels of the measured full attention that is scaled by N^2


def _block_sizes(settings: Settings) -> Tuple[int, int, int]:
    """(voxels, C, hidden): 100k x 64 x 256, or 2000 x 16 x 64 with --smoke."""
    return (2000, 16, 64) if settings.smoke else (BLOCK_VOXELS, BLOCK_CHANNELS, BLOCK_HIDDEN)


def _block_voxels(scan: Scan, n: int, settings: Settings):
    """``n`` SECOND voxels of the scan (full KITTI range, or the smoke crop), batch elements repeating the scan
    until there are ``n``; returns ``(coords, spatial_shape, batch elements)``."""
    from . import voxelize

    vox, _ = voxelize(_tensor_points(scan.points), SECOND_VOXEL, SMOKE_RANGE if settings.smoke else KITTI_RANGE)
    coords = vox.coords
    copies = max(1, -(-n // max(1, coords.shape[0])))
    rows = [torch.cat([torch.full_like(coords[:, :1], b), coords[:, 1:]], 1) for b in range(copies)]
    return torch.cat(rows)[:n].contiguous(), vox.spatial_shape, copies


def _shift_for_sparsity(ffn, x: torch.Tensor, sparsity: float) -> None:
    """Sets ``ffn.fc1.bias`` so that a fraction ``sparsity`` of each hidden unit's pre-activations is <= 0."""
    with torch.no_grad():
        pre = torch.nn.functional.linear(x[:20000], ffn.fc1.weight)
        ffn.fc1.bias.copy_(-pre.quantile(sparsity, dim=0))


def _build_blocks(scan: Scan, params: Dict, only: Optional[str], settings: Settings) -> Built:
    """One case of the ``sparse-blocks`` workload (``params["case"]``: ``ffn``, ``moe`` or ``attention``)."""
    from . import SparseTensor
    from .nn import SparseFFN, SparseMoEFFN, SparseWindowAttention, SubMConv3d
    from .nn.ffn import hidden_sparsity

    n, c, hidden = _block_sizes(settings)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    case = params["case"]
    if case == "ffn":
        s = params["sparsity"]
        x = torch.randn(n, c, generator=g)
        dense = SparseFFN(c, hidden, sparse_path=False)
        _shift_for_sparsity(dense, x, s)
        sparse = SparseFFN(c, hidden, sparse_path=True)
        sparse.load_state_dict(dense.state_dict())
        h = torch.relu(dense.fc1(x)).detach()
        measured = hidden_sparsity(h)
        peers = {"sparseconv SparseFFN dense path": Peer(lambda: dense(x)),
                 "sparseconv SparseFFN sparse path": Peer(lambda: sparse(x)),
                 "sparseconv 2nd projection dense": Peer(lambda: dense.second_projection(h, False)),
                 "sparseconv 2nd projection sparse (zero-skipping kernel)": Peer(lambda: sparse.second_projection(h, True))}
        config = (f"SparseFFN {n} voxels, C {c}, hidden {hidden}, ReLU, {100 * s:.0f} % target sparsity "
                  f"(bias shift; measured {100 * measured:.1f} %), forward")
        return Built(config, peers, extra={"voxels": n, "sparsity": measured, "target_sparsity": s})
    if case == "moe":
        x = torch.randn(n, c, generator=g)
        moe = SparseMoEFFN(c, hidden, experts=BLOCK_EXPERTS, k=BLOCK_TOP_K)
        dense = SparseFFN(c, hidden * BLOCK_EXPERTS, sparse_path=False)
        peers = {"sparseconv SparseMoEFFN": Peer(lambda: moe(x)),
                 f"sparseconv dense FFN hidden {hidden * BLOCK_EXPERTS}": Peer(lambda: dense(x))}
        config = (f"SparseMoEFFN {BLOCK_EXPERTS} experts x hidden {hidden}, top-{BLOCK_TOP_K}, capacity 1.25 vs a "
                  f"dense FFN of the same total hidden width, {n} voxels, C {c}, forward")
        return Built(config, peers, extra={"voxels": n})
    coords, shape, copies = _block_voxels(scan, n, settings)
    m = coords.shape[0]
    feats = torch.randn(m, c, generator=g)
    x = SparseTensor(feats, coords, shape)
    attn = SparseWindowAttention(c, BLOCK_HEADS, BLOCK_WINDOW, max_group=BLOCK_GROUP)
    conv = SubMConv3d(c, c, 3, bias=False)
    conv(x)  # builds the kernel map into x's cache
    small = min(FULL_ATTENTION_SAMPLE, m)
    q = torch.randn(1, BLOCK_HEADS, small, c // BLOCK_HEADS, generator=g)
    peers = {"sparseconv SparseWindowAttention": Peer(lambda: attn(x)),
             "sparseconv SubMConv3d 3^3 (cached map)": Peer(lambda: conv(x)),
             f"full attention, {small} voxels (to extrapolate)": Peer(
                 lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), memory=False)}
    config = (f"{scan.name} x {copies} batch elements, SECOND voxels, first {m}: SparseWindowAttention C {c}, "
              f"{BLOCK_HEADS} heads, window {BLOCK_WINDOW}^3, max_group {BLOCK_GROUP} vs SubMConv3d 3^3 {c} -> {c}, "
              f"forward")
    return Built(config, peers, extra={"voxels": m, "full_attention_sample": small})


def _break_even(points: List[Tuple[float, float]]) -> Optional[float]:
    """The sparsity where ``sparse ms / dense ms`` crosses 1, interpolated linearly; ``None`` if it never does."""
    for (s0, r0), (s1, r1) in zip(points, points[1:]):
        if r0 >= 1.0 > r1:
            return s0 + (s1 - s0) * (r0 - 1.0) / (r0 - r1)
    if points and points[0][1] < 1.0:
        return points[0][0]
    return None


def bench_sparse_blocks(scans: Sequence[Scan], session: "Session") -> List[Measurement]:
    """Activation-sparse FFN (sparse vs dense path at 50/80/90/95 % hidden sparsity), MoE FFN vs dense FFN, and window
    attention vs one SubMConv3d 3^3 and vs (extrapolated) full attention."""
    out: List[Measurement] = []
    whole, second = [], []
    for s in BLOCK_SPARSITIES:
        rows = session.run_case("sparse-blocks", "blocks", scans[0], {"case": "ffn", "sparsity": s})
        ms = {m.impl: m.median_ms for m in rows}
        whole.append((rows[0].extra["sparsity"], ms["sparseconv SparseFFN sparse path"]
                      / ms["sparseconv SparseFFN dense path"]))
        second.append((rows[0].extra["sparsity"], ms["sparseconv 2nd projection sparse (zero-skipping kernel)"]
                       / ms["sparseconv 2nd projection dense"]))
        out += rows
    for label, points in (("whole FFN", whole), ("second projection", second)):
        be = _break_even(points)
        speedups = ", ".join(f"{100 * s:.0f} %: {1 / r:.2f}x" for s, r in points)
        session.note(f"SparseFFN {label}: sparse-path speed-up over dense by sparsity {speedups}; break-even sparsity "
                     + ("not reached" if be is None else f"{100 * be:.0f} %")
                     + " (sparseconv.nn.ffn.SPARSE_FFN_BREAK_EVEN is set from the whole-FFN value)")
    out += session.run_case("sparse-blocks", "blocks", scans[0], {"case": "moe"})
    for scan in scans[:1]:
        rows = session.run_case("sparse-blocks", "blocks", scan, {"case": "attention"})
        out += rows
        n, small = rows[0].extra["voxels"], rows[0].extra["full_attention_sample"]
        full = [m for m in rows if m.impl.startswith("full attention")][0]
        scale = (n / small) ** 2
        gb = n * n * BLOCK_HEADS * 4 / 1e9
        session.note(f"full attention over all {n} voxels, EXTRAPOLATED (not run): scores {n}^2 x {BLOCK_HEADS} "
                     f"heads x 4 B = {gb:.1f} GB; time ~ {full.median_ms:.2f} ms x ({n}/{small})^2 = "
                     f"{full.median_ms * scale / 1000:.1f} s")
        for m in rows:
            m.extra["full_attention_extrapolated_ms"] = full.median_ms * scale
            m.extra["full_attention_extrapolated_gb"] = gb
    return out


# Case builders by name: the main process and the peak-memory children build the same cases.
_BUILDERS: Dict[str, Callable[[Scan, Dict, Optional[str], Settings], Built]] = {
    "voxelize": _build_voxelize, "layer": _build_layer, "backbone": _build_backbone,
    "minkunet": _build_minkunet, "kmap": _build_kmap, "blocks": _build_blocks}

WORKLOADS: Dict[str, Callable] = {"voxelize": bench_voxelize, "layers": bench_layers, "backbone": bench_backbone,
                                  "minkunet": bench_minkunet, "kmap": bench_kmap, "sparse-blocks": bench_sparse_blocks}


# --------------------------------------------------------------------------- peak memory
def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {key}")


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark to the current RSS (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_kb("VmHWM")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Returns glibc's free heap pages to the OS so that the next call's allocations show up in the RSS."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _peak_child(request: Dict) -> Dict:
    """Measures the peak RSS increase of one call of one implementation (runs in a forked child).

    Builds the case, calls the implementation once (warm-up: code pages, thread pools, lazily
    initialised state), frees what it can (``gc``, ``malloc_trim``), resets the peak-RSS mark to the
    current RSS, calls it again and reports the peak minus the RSS before that call.  Where the mark
    cannot be reset it falls back to ``ru_maxrss`` before/after the first call.
    """
    import resource

    settings = Settings(**request["settings"])
    if settings.threads:
        torch.set_num_threads(settings.threads)
    scan_req = request["scan"]
    if scan_req["path"] is None:
        points = _simulated_points()
    else:
        from .io import read_points

        points = read_points(scan_req["path"]).to_array()
    built = _BUILDERS[request["builder"]](Scan(scan_req["name"], points, scan_req["path"]), request["params"],
                                          request["impl"], settings)
    fn = built.peers[request["impl"]].fn
    with torch.set_grad_enabled(built.grad):
        gc.collect()
        _malloc_trim()
        if _reset_peak_rss():
            fn()
            gc.collect()
            _malloc_trim()
            _reset_peak_rss()
            before = _proc_status_kb("VmRSS")
            fn()
            peak = _proc_status_kb("VmHWM")
            method = "VmHWM after clear_refs, second call"
        else:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            fn()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            method = "ru_maxrss, first call"
    return {"peak_mb": max(0, peak - before) / 1024.0, "method": method}


def _peak_memory_server() -> int:
    """Child process: imports torch, sparseconv (and spconv) once, then forks one grandchild per request.

    Requests are JSON lines on stdin; each answer is one JSON line on the original stdout (everything
    else printed goes to /dev/null).  Nothing parallel runs here before forking, so OpenMP starts fresh
    in every grandchild.
    """
    answers = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    import sparseconv  # noqa: F401
    import sparseconv.models  # noqa: F401

    _spconv()
    for line in sys.stdin:
        request = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # grandchild
            os.close(r)
            try:
                answer = _peak_child(request)
            except BaseException as e:  # reported to the parent, which prints a note
                answer = {"error": f"{type(e).__name__}: {e}"}
            os.write(w, json.dumps(answer).encode())
            os._exit(0)
        os.close(w)
        chunks = []
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        data = b"".join(chunks)
        answer = json.loads(data) if data else {"error": f"measuring process ended with status {status}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
    return 0


class PeakMemoryProbe:
    """Measures peak RSS increases in a helper process (see :func:`_peak_memory_server`).

    Use as a context manager; the helper starts on the first request and stops on exit.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self._proc: Optional[subprocess.Popen] = None
        self.method: Optional[str] = None

    def __enter__(self) -> "PeakMemoryProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._proc is not None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def _start(self) -> subprocess.Popen:
        if self._proc is None:
            code = "import sys; from sparseconv.bench import _peak_memory_server; sys.exit(_peak_memory_server())"
            self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, text=True, bufsize=1)
        return self._proc

    def measure(self, builder: str, scan: Scan, params: Dict, impl: str) -> Tuple[Optional[float], Optional[str]]:
        """``(peak MB, None)``, or ``(None, why)`` when the measurement failed."""
        proc = self._start()
        request = {"builder": builder, "scan": {"name": scan.name, "path": scan.path}, "params": params,
                   "impl": impl, "settings": self.settings.__dict__}
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], PEAK_TIMEOUT_S)
        line = proc.stdout.readline() if ready else ""
        if not line:
            proc.kill()
            proc.wait()
            self._proc = None
            return None, "no answer from the peak-memory process" if ready else f"timed out after {PEAK_TIMEOUT_S:g} s"
        answer = json.loads(line)
        if "error" in answer:
            return None, answer["error"]
        self.method = answer["method"]
        return float(answer["peak_mb"]), None


# --------------------------------------------------------------------------- running
class Session:
    """The state of one benchmark run: settings, the peak-memory helper and the notes printed so far."""

    def __init__(self, settings: Settings, probe: Optional[PeakMemoryProbe]):
        self.settings = settings
        self.probe = probe
        self.notes: List[str] = []

    def note(self, text: str) -> None:
        """Prints a note (once per distinct text) and keeps it for the JSON."""
        if text not in self.notes:
            self.notes.append(text)
            print(f"note: {text}", flush=True)

    def run_case(self, workload: str, builder: str, scan: Scan, params: Dict) -> List[Measurement]:
        """Builds one case, times its implementations alternating, derives the columns, measures memory."""
        s = self.settings
        built = _BUILDERS[builder](scan, params, None, s)
        for text in built.notes:
            self.note(text)
        with torch.set_grad_enabled(built.grad):
            times = time_alternating({name: p.fn for name, p in built.peers.items()}, s.repeats, s.warmup,
                                     s.back_to_back)
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        floor = [name for name, p in built.peers.items() if p.floor]
        mm_rate = None
        if floor and built.peers[floor[0]].gflop:
            mm_rate = built.peers[floor[0]].gflop / (medians[floor[0]] / 1000.0)
        rows = []
        for name, ts in times.items():
            peer = built.peers[name]
            rate = None if peer.gflop is None else peer.gflop / (medians[name] / 1000.0)
            rows.append((name, peer.memory, Measurement(workload, built.config, name, medians[name], ts, {
                **built.extra, "gflops_per_s": rate,
                "mm_gflops_per_s": mm_rate,
                "mm_fraction": None if rate is None or mm_rate is None else rate / mm_rate,
                "peak_mb": None})))
        del built, times
        gc.collect()
        if s.peak_memory and self.probe is not None:
            for name, memory, m in rows:
                if memory:
                    peak, why = self.probe.measure(builder, scan, params, name)
                    m.extra["peak_mb"] = peak
                    if why:
                        self.note(f"peak memory of {name} ({workload}) not measured: {why}")
        return [m for _, _, m in rows]


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


def _fmt(value, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def format_table(results: List[Measurement], baseline: str = "sparseconv") -> str:
    """The results as text tables, one per (workload, configuration).

    Columns: median ms; the ratio to every sparseconv row of the table; useful GFLOP/s; that as a
    fraction of the ``torch.mm`` row's; peak RSS increase of one call in MB ("-": not applicable).
    """
    lines = []
    groups: Dict[Tuple[str, str], List[Measurement]] = {}
    for m in results:
        groups.setdefault((m.workload, m.config), []).append(m)
    for (workload, config), ms in groups.items():
        ours = [m for m in ms if m.impl.startswith(baseline)]
        width = max(32, max(len(m.impl) for m in ms) + 2)
        heads = ["÷ " + o.impl.replace(baseline + " ", "") for o in ours]
        widths = [max(22, len(h) + 1) for h in heads]
        lines.append(f"\n{workload} — {config}")
        lines.append(f"  {'implementation':<{width}}{'median ms':>11}  "
                     + "  ".join(f"{h:>{w}}" for h, w in zip(heads, widths))
                     + f"  {'GFLOP/s':>8}  {'of mm':>6}  {'peak MB':>8}")
        for m in ms:
            ratios = "  ".join(f"{m.median_ms / o.median_ms:>{w - 1}.2f}x" for o, w in zip(ours, widths))
            frac = m.extra.get("mm_fraction")
            lines.append(f"  {m.impl:<{width}}{m.median_ms:>11.3f}  {ratios}  "
                         f"{_fmt(m.extra.get('gflops_per_s'), '.1f', 8)}  "
                         f"{_fmt(None if frac is None else 100.0 * frac, '.0f', 5)}{'%' if frac is not None else ' '}"
                         f"  {_fmt(m.extra.get('peak_mb'), '.1f', 8)}")
    return "\n".join(lines)


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="tools/benchmark.py", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", "-w", action="append", choices=sorted(WORKLOADS),
                        help="workload to run (repeatable; default: all)")
    parser.add_argument("--input", action="append", default=[], help="KITTI-format .bin scan (repeatable)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions per implementation (>= 5)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--channels", type=int, nargs="+", default=list(DEFAULT_CHANNELS), metavar="C",
                        help="channel counts of the layers workload (default: 16 32 64 128)")
    parser.add_argument("--dense-max-gb", type=float, default=4.0,
                        help="skip a dense peer whose grid x C x 4 B x 3 exceeds this many GB (default 4)")
    parser.add_argument("--dense-max-gflop", type=float, default=100.0,
                        help="skip a dense peer that needs more GFLOP per call (default 100)")
    parser.add_argument("--no-peak-memory", action="store_true",
                        help="skip the peak-memory measurements (one child process per implementation)")
    parser.add_argument("--back-to-back", action="store_true",
                        help="time each call right after an untimed call of the same implementation (warm "
                             "caches, as in a stream of scans) instead of right after the other implementations")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny run (CI): 1 warm-up, 2 repetitions, 6.4 m crops, C = 16, one scan, "
                             "1 thread unless --threads")
    return parser


def run(args) -> int:
    """Runs the benchmark described by ``args`` (see :func:`build_parser`); prints the tables."""
    if min(args.channels) < 1:
        raise SystemExit(f"--channels must be positive, got {args.channels}")
    # --smoke pins one thread unless told otherwise: OpenMP threads on shared cores make a tiny run crawl.
    threads = args.threads or (1 if args.smoke else None)
    if threads:
        torch.set_num_threads(threads)
    repeats, warmup = (2, 1) if args.smoke else (max(args.repeats, 5), args.warmup)
    settings = Settings(repeats, warmup, smoke=args.smoke, threads=threads,
                        channels=(16,) if args.smoke else tuple(args.channels), dense_max_gb=args.dense_max_gb,
                        dense_max_gflop=args.dense_max_gflop, peak_memory=not args.no_peak_memory,
                        back_to_back=args.back_to_back)
    scans = load_scans(args.input)
    if args.smoke:
        scans = scans[:1]
    results: List[Measurement] = []
    with PeakMemoryProbe(settings) as probe:
        session = Session(settings, probe)
        for name in args.workload or sorted(WORKLOADS):
            results += WORKLOADS[name](scans, session)
    info = machine_info()
    print(f"machine: {info}")
    order = "back to back (each timed call right after an untimed call of itself)" if args.back_to_back else "alternating"
    print(f"repetitions: {repeats} after {warmup} warm-up, {order}; ratios = row median / sparseconv median")
    print("GFLOP/s: useful (kernel-map pairs x C_in x C_out x 2, per call) / median; of mm: that / the torch.mm "
          "row's GFLOP/s on the same per-offset GEMM shapes;")
    print(f"peak MB: peak RSS increase of one call in a fresh child process ({probe.method or 'not measured'})")
    print(format_table(results))
    if args.json:
        from .io import atomic_write

        payload = {"machine": info, "repeats": repeats, "warmup": warmup, "smoke": args.smoke,
                   "back_to_back": args.back_to_back,
                   "peak_memory_method": probe.method, "notes": session.notes,
                   "results": [{"workload": m.workload, "config": m.config, "impl": m.impl,
                                "median_ms": m.median_ms, "times_ms": m.times_ms, **m.extra} for m in results]}
        with atomic_write(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return 0


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))
