"""``sparseconv sparsity``: per-layer activation sparsity of a model on LiDAR scans."""
from __future__ import annotations

import argparse
import glob
import inspect
import json
import os
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..voxelize import KITTI_POINT_RANGE

EPILOG = """examples:
  sparseconv sparsity                                   # VoxelBackBone8x, random weights, a simulated scan
  sparseconv sparsity --checkpoint second.pt --data ../shared/data/kitti/velodyne --scans 20 --plot sparsity.png
  sparseconv sparsity --data scan1.bin scan2.bin --voxel-size 0.1 0.1 0.1 --json
  sparseconv sparsity --config sparsity.json --layers conv_out.0    # config file; also measure a conv output

--config is a JSON file; every key is optional and a command-line option overrides it:
  {"model": "VoxelBackBone8x", "kwargs": {"input_channels": 4},
   "voxel_size": [0.05, 0.05, 0.1], "point_range": [0, -40, -3, 70.4, 40, 1]}
"kwargs" go to the model's constructor; input_channels and grid_size, when the constructor takes
them and they are not given, come from the voxelized scans.
--checkpoint is a state_dict saved with torch.save (or a dict holding one under "state_dict",
"model_state" or "model"); without it the weights are random (seeded by --seed).
The model runs in eval mode under torch.no_grad, one scan per forward pass. Columns: zero % (values
exactly 0), near0 % (|a| < --eps), Hoyer (mean per-voxel Hoyer sparsity, 1 = one active channel,
all-zero voxels count as 1), 0-rows % (voxels whose whole feature vector is 0), dead (channels
that were 0 on every voxel of every scan). See docs/activation_sparsity.md.
Exit status: 0 done, 1 a file could not be read or the checkpoint does not fit, 2 bad arguments.
"""

DEFAULT_MODEL = "VoxelBackBone8x"
DEFAULT_VOXEL_SIZE = (0.05, 0.05, 0.1)
CONFIG_KEYS = ("model", "kwargs", "voxel_size", "point_range")


class CliError(Exception):
    """A failure reported as ``sparseconv sparsity: message`` with an exit status."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sparsity",
        help="per-layer activation sparsity (zeros, Hoyer, dead units) of a model on LiDAR scans",
        description="Runs a model of sparseconv.models (default VoxelBackBone8x) on voxelized LiDAR scans "
        "(KITTI .bin files, or built-in simulated scans) with an ActivationMonitor on every activation "
        "layer, and prints per-layer activation-sparsity statistics.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", metavar="NAME", help=f"a model of sparseconv.models (default: {DEFAULT_MODEL})")
    p.add_argument("--config", metavar="CFG", help="JSON file with model, kwargs, voxel_size, point_range")
    p.add_argument("--checkpoint", metavar="CKPT", help="state_dict .pt file (default: random weights)")
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="point-cloud files (KITTI .bin, ...), folders (their .bin files) or glob patterns; "
                        "default: simulated scans")
    p.add_argument("--scans", type=int, metavar="N",
                   help="number of scans: simulated ones (default 1) or the first N of --data (default: all)")
    p.add_argument("--voxel-size", type=float, nargs=3, metavar=("VX", "VY", "VZ"),
                   help=f"voxel size in metres (default: {DEFAULT_VOXEL_SIZE})")
    p.add_argument("--range", type=float, nargs=6, metavar=("XMIN", "YMIN", "ZMIN", "XMAX", "YMAX", "ZMAX"),
                   dest="point_range", help=f"point range (default: KITTI's {KITTI_POINT_RANGE})")
    p.add_argument("--eps", type=float, default=1e-3, help="near-zero threshold |a| < EPS (default: %(default)s)")
    p.add_argument("--layers", nargs="+", metavar="NAME", default=(),
                   help="also measure these modules (names as in model.named_modules())")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated scans and the random weights")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--plot", metavar="PNG", help="write a bar chart of zero fraction and Hoyer per layer")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def available_models() -> Dict[str, type]:
    """The ``torch.nn.Module`` classes exported by ``sparseconv.models``."""
    from sparseconv import models

    return {n: getattr(models, n) for n in models.__all__
            if inspect.isclass(getattr(models, n)) and issubclass(getattr(models, n), torch.nn.Module)}


def read_config(path: str) -> dict:
    """Reads and checks a ``--config`` JSON file."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except OSError as e:
        raise CliError(f"cannot read config {path}: {e.strerror or e}", 2)
    except json.JSONDecodeError as e:
        raise CliError(f"config {path} is not valid JSON: {e}", 2)
    if not isinstance(cfg, dict):
        raise CliError(f"config {path} must hold a JSON object, got {type(cfg).__name__}", 2)
    unknown = sorted(set(cfg) - set(CONFIG_KEYS))
    if unknown:
        raise CliError(f"config {path}: unknown key(s) {unknown}; allowed: {list(CONFIG_KEYS)}", 2)
    if "kwargs" in cfg and not isinstance(cfg["kwargs"], dict):
        raise CliError(f"config {path}: 'kwargs' must be an object, got {type(cfg['kwargs']).__name__}", 2)
    for key, n in (("voxel_size", 3), ("point_range", 6)):
        value = cfg.get(key)
        if value is not None and (not isinstance(value, list) or len(value) != n
                                  or not all(isinstance(v, (int, float)) for v in value)):
            raise CliError(f"config {path}: '{key}' must be a list of {n} numbers, got {value!r}", 2)
    if "model" in cfg and not isinstance(cfg["model"], str):
        raise CliError(f"config {path}: 'model' must be a name, got {cfg['model']!r}", 2)
    return cfg


def build_model(name: str, kwargs: dict, input_channels: int, grid_size: Sequence[int]) -> torch.nn.Module:
    """Instantiates ``sparseconv.models.<name>``, filling ``input_channels`` / ``grid_size`` from the data."""
    models = available_models()
    if name not in models:
        raise CliError(f"unknown model {name!r}; sparseconv.models has: {', '.join(sorted(models))}", 2)
    cls = models[name]
    kwargs = dict(kwargs)
    params = inspect.signature(cls.__init__).parameters
    if "input_channels" in params and "input_channels" not in kwargs:
        kwargs["input_channels"] = input_channels
    if "grid_size" in params and "grid_size" not in kwargs:
        kwargs["grid_size"] = tuple(grid_size)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise CliError(f"cannot build {name} with kwargs {kwargs}: {e}", 2)


def load_checkpoint(net: torch.nn.Module, path: str) -> None:
    """Loads a state_dict file into ``net`` (strict), with an error that says what does not fit."""
    if not os.path.isfile(path):
        raise CliError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or foreign file
        raise CliError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    state = obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state", "model"):
            if isinstance(obj.get(key), dict):
                state = obj[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CliError(f"checkpoint {path} does not hold a state_dict (a dict of tensors); got {type(state).__name__}")
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        def few(items):
            return ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")

        parts = [f"missing keys: {few(missing)}" if missing else "",
                 f"unexpected keys: {few(unexpected)}" if unexpected else "",
                 f"shape mismatches: {few(mismatched)}" if mismatched else ""]
        raise CliError(f"checkpoint {path} does not fit {type(net).__name__}: " + "; ".join(p for p in parts if p))
    net.load_state_dict(state)


def data_files(paths: Sequence[str]) -> List[str]:
    """Files named by ``--data``: files, folders (their ``.bin`` files, sorted) and glob patterns."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(p, "*.bin")))
            if not found:
                raise CliError(f"no .bin file in the folder {p}")
            files += found
        elif os.path.isfile(p):
            files.append(p)
        elif any(c in p for c in "*?["):
            found = sorted(f for f in glob.glob(p) if os.path.isfile(f))
            if not found:
                raise CliError(f"no file matches {p}")
            files += found
        else:
            raise CliError(f"no such file or folder: {p}")
    return files


def _scans(args) -> List[Tuple[str, object]]:
    """``(source, loader)`` pairs; ``loader()`` returns the float32 ``[N, 4]`` points."""
    if args.scans is not None and args.scans < 1:
        raise CliError(f"--scans must be >= 1, got {args.scans}", 2)
    if args.data:
        files = data_files(args.data)
        if args.scans is not None:
            files = files[:args.scans]

        def load(path):
            from ..io import PointCloudError, read_points

            try:
                return read_points(path).to_array()
            except (PointCloudError, OSError) as e:
                raise CliError(str(e))

        return [(f, (lambda f=f: load(f))) for f in files]
    from .demo import simulated_scan

    n = args.scans or 1
    return [(f"simulated HDL-64E scan (seed {args.seed + i})", (lambda s=args.seed + i: np.asarray(simulated_scan(s).points, dtype=np.float32)))
            for i in range(n)]


def _voxels(points: np.ndarray, voxel_size, point_range):
    from sparseconv import voxelize

    voxels, _ = voxelize(torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32)), voxel_size, point_range)
    return voxels


def report(args) -> dict:
    """Does the work of ``sparseconv sparsity``; returns the JSON-able result."""
    from sparseconv import SparseTensor
    from sparseconv.sparsity import ActivationMonitor, plot_stats

    if not args.eps > 0:
        raise CliError(f"--eps must be > 0, got {args.eps}", 2)
    cfg = read_config(args.config) if args.config else {}
    name = args.model or cfg.get("model") or DEFAULT_MODEL
    if name not in available_models():  # before reading any scan
        raise CliError(f"unknown model {name!r}; sparseconv.models has: {', '.join(sorted(available_models()))}", 2)
    voxel_size = tuple(args.voxel_size or cfg.get("voxel_size") or DEFAULT_VOXEL_SIZE)
    point_range = tuple(args.point_range or cfg.get("point_range") or KITTI_POINT_RANGE)
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise CliError(f"checkpoint not found: {args.checkpoint}")
    scans = _scans(args)

    net = monitor = None
    done = []
    for source, load in scans:
        try:
            voxels = _voxels(load(), voxel_size, point_range)
        except ValueError as e:
            raise CliError(f"cannot voxelize {source} with voxel size {voxel_size} and range {point_range}: {e}", 2)
        if voxels.num_voxels == 0:
            print(f"sparseconv sparsity: skipped {source}: no point lies inside the range {point_range}",
                  file=sys.stderr)
            continue
        if net is None:
            torch.manual_seed(args.seed)
            net = build_model(name, cfg.get("kwargs", {}), voxels.num_channels, voxels.spatial_shape)
            if args.checkpoint:
                load_checkpoint(net, args.checkpoint)
            net.eval()
            try:
                monitor = ActivationMonitor(net, list(args.layers) or None, eps=args.eps)
            except ValueError as e:
                raise CliError(str(e), 2)
        shape = getattr(net, "sparse_shape", voxels.spatial_shape)
        try:
            x = SparseTensor(voxels.features, voxels.coords, shape)
            with torch.no_grad():
                net(x)
        except (RuntimeError, ValueError, TypeError) as e:
            raise CliError(f"{name} failed on {source}: {type(e).__name__}: {e}")
        done.append({"source": source, "voxels": voxels.num_voxels})
    if not done:
        raise CliError(f"no scan has a point inside the range {point_range}")
    monitor.remove()
    stats = monitor.stats()
    result = {
        "model": name,
        "weights": args.checkpoint or f"random (seed {args.seed})",
        "voxel_size": list(voxel_size),
        "point_range": list(point_range),
        "eps": args.eps,
        "scans": done,
        "layers": stats,
    }
    if args.plot:
        try:
            plot_stats(stats, args.plot, title=f"{name}: activation sparsity over {len(done)} scan(s)")
        except OSError as e:
            raise CliError(f"cannot write {args.plot}: {e.strerror or e}")
        result["plot"] = args.plot
    return result


def run(args) -> int:
    from sparseconv.sparsity import format_table

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = report(args)
    except CliError as e:
        print(f"sparseconv sparsity: {e}", file=sys.stderr)
        return e.status
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    voxels = sum(s["voxels"] for s in result["scans"])
    print(f"model     {result['model']}, weights: {result['weights']}")
    first = result["scans"][0]["source"]
    more = f" and {len(result['scans']) - 1} more" if len(result["scans"]) > 1 else ""
    print(f"data      {first}{more}: {voxels:,} voxels (voxel size {tuple(result['voxel_size'])})")
    print(format_table(result["layers"]))
    if "plot" in result:
        print(f"plot      {result['plot']}")
    return 0
