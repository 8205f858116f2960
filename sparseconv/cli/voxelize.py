"""``sparseconv voxelize``: point-cloud files to voxel files, in batch."""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence

from ..voxelize import KITTI_POINT_RANGE as DEFAULT_RANGE
from ._files import (UsageError, add_command_parser, check_output_folder, error_reason, file_summary, finish,
                     interrupt, plan_outputs, print_file_lines, report_interrupted, sigterm_as_interrupt)
from ._files import expand_inputs, output_stem, point_cloud_extension  # noqa: F401  (names this module exposes)

EPILOG = """examples:
  sparseconv voxelize ../shared/data/kitti/velodyne -o voxels/
  sparseconv voxelize 'scans/*.bin' -o voxels/ --voxel-size 0.1 0.1 0.2 --max-points 5 --workers 2
  sparseconv voxelize scan.ply -o out/ --reduce max --format ply --overwrite --json

Each input FILE becomes OUTDIR/<stem>.npz (sparseconv.io.save_voxels: coords, feats, the voxel
size and range, the feature names, the points per voxel and the drop counts) or, with
--format ply, OUTDIR/<stem>.ply (voxel centres with the reduced features and the point count).
Features are x, y, z followed by every numeric per-point field (intensity first).
Exit status: 0 all done (or skipped because the output exists), 1 some file failed,
2 bad arguments or no input found.
"""

DEFAULT_VOXEL_SIZE = (0.05, 0.05, 0.1)


def add_parser(sub) -> None:
    p = add_command_parser(
        sub, "voxelize", "voxelize point-cloud files (KITTI .bin, .npy, .npz, PLY, PCD, LAS) into voxel files",
        "Reads each point-cloud file, voxelizes x, y, z and its numeric per-point fields with "
        "sparseconv.voxelize, and writes one voxel file per input. Outputs are written atomically; "
        "existing outputs are skipped unless --overwrite. A file that cannot be read is reported and "
        "skipped; the others are still done.",
        EPILOG, "output already exists", _add_own_arguments)
    p.set_defaults(func=run)


def _add_own_arguments(p: argparse.ArgumentParser) -> None:
    from ..voxelize import REDUCTIONS

    p.add_argument("--voxel-size", type=float, nargs=3, default=DEFAULT_VOXEL_SIZE, metavar=("VX", "VY", "VZ"),
                   help="voxel size in metres (default: %(default)s)")
    p.add_argument("--range", type=float, nargs=6, default=DEFAULT_RANGE, dest="point_range",
                   metavar=("XMIN", "YMIN", "ZMIN", "XMAX", "YMAX", "ZMAX"),
                   help="point range in metres; points outside are dropped (default: KITTI %(default)s)")
    p.add_argument("--reduce", choices=REDUCTIONS, default="mean",
                   help="how the points of a voxel make its features (default: mean)")
    p.add_argument("--max-points", type=int, default=None, metavar="N",
                   help="keep at most N points per voxel, the first in file order (default: all)")
    p.add_argument("--max-voxels", type=int, default=None, metavar="N",
                   help="keep at most N voxels per file, in order of their first point (default: all)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="files processed in parallel by N processes (default: 1); the output does not depend on N")
    p.add_argument("--format", choices=("npz", "ply"), default="npz",
                   help="npz: sparseconv voxel file; ply: voxel centres and features as a point cloud")


# ----------------------------------------------------------------------------- one file
def feature_fields(cloud) -> List[str]:
    """The numeric per-point fields of a cloud used as voxel features: ``intensity`` first, then in file order."""
    import numpy as np

    names = [n for n, v in cloud.fields.items() if np.issubdtype(v.dtype, np.number) or v.dtype == np.bool_]
    return sorted(names, key=lambda n: n != "intensity")


def feature_names(cloud, fields: Sequence[str], reduce: str) -> List[str]:
    """Names of the voxel feature columns: ``x, y, z``, then one per field column (``rgb_0``, ... for ``[N, k]``)."""
    if reduce == "count":
        return ["count"]
    names = ["x", "y", "z"]
    for f in fields:
        value = cloud.fields[f]
        names += [f] if value.ndim == 1 else [f"{f}_{i}" for i in range(value.shape[1])]
    return names


def voxelize_cloud(cloud, voxel_size, point_range, reduce="mean", max_points=None, max_voxels=None):
    """Voxelizes a :class:`~sparseconv.io.PointCloud` as the command does.

    Returns ``(result, feature_names)``: the :class:`sparseconv.voxelize.Voxels` (with counts) and
    the names of its feature columns.
    """
    import torch

    from ..voxelize import voxelize

    fields = feature_fields(cloud)
    points = torch.from_numpy(cloud.to_array(fields))
    result = voxelize(points, voxel_size, point_range, reduce=reduce, max_points_per_voxel=max_points,
                      max_voxels=max_voxels, return_counts=True)
    return result, feature_names(cloud, fields, reduce)


def _write_npz(path, result, names, task, source):
    from ..io import save_voxels

    stats = result.stats
    save_voxels(
        path, result.tensor,
        voxel_size=list(task["voxel_size"]), point_range=list(task["point_range"]), reduce=task["reduce"],
        source=source, feature_names=list(names), counts=result.counts,
        max_points_per_voxel=-1 if task["max_points"] is None else task["max_points"],
        max_voxels=-1 if task["max_voxels"] is None else task["max_voxels"],
        num_points=stats["points"], dropped_nonfinite=stats["dropped_nonfinite"],
        dropped_out_of_range=stats["dropped_out_of_range"], dropped_max_voxels=stats["dropped_max_voxels"],
        dropped_max_points=stats["dropped_max_points"],
    )


def voxel_centres(coords, voxel_size, point_range, stride=(1, 1, 1)):
    """World centres ``[V, 3]`` (float64) of voxel coordinates ``[V, 4]`` (batch, x, y, z)."""
    import numpy as np

    step = np.asarray(voxel_size, np.float64) * np.asarray(stride, np.float64)
    return np.asarray(point_range[:3], np.float64) + (np.asarray(coords)[:, 1:4].astype(np.float64) + 0.5) * step


def _write_ply(path, result, names, task):
    from ..io import PointCloud, write_ply

    x = result.tensor
    if x.num_voxels == 0:
        raise ValueError("no point lies inside --range, and a PLY file cannot hold 0 voxels")
    centres = voxel_centres(x.coords.numpy(), task["voxel_size"], task["point_range"])
    feats = x.features.numpy()
    fields = {}
    if task["reduce"] != "count":
        fields = {f"{task['reduce']}_{n}": feats[:, j] for j, n in enumerate(names)}
    fields["count"] = result.counts.numpy().astype("int32")
    write_ply(path, PointCloud(centres, fields))


def process_file(task: Dict) -> Dict:
    """Reads, voxelizes and writes one file; never raises for a bad file (returns ``status="error"``)."""
    import numpy as np

    from ..io import read_points
    from ..voxelize import grid_shape

    t0 = time.perf_counter()
    out = {"input": task["input"], "output": task["output"]}
    try:
        cloud = read_points(task["input"])
        result, names = voxelize_cloud(cloud, task["voxel_size"], task["point_range"], task["reduce"],
                                       task["max_points"], task["max_voxels"])
        if task["format"] == "ply":
            _write_ply(task["output"], result, names, task)
        else:
            _write_npz(task["output"], result, names, task, os.path.basename(task["input"]))
    except Exception as e:  # a bad file is reported and skipped; the others go on
        out.update(status="error", reason=error_reason(task["input"], e))
        return out
    stats = dict(result.stats)
    cells = int(np.prod(grid_shape(task["voxel_size"], task["point_range"])))
    out.update(status="done", features=names, **stats, grid_cells=cells, occupancy=stats["voxels"] / cells,
               seconds=time.perf_counter() - t0)
    return out


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, interrupt)


# ----------------------------------------------------------------------------- the command
def _validate(args) -> None:
    from ..voxelize import grid_shape

    try:
        grid_shape(args.voxel_size, args.point_range)
    except ValueError as e:
        raise UsageError(f"--voxel-size / --range: {e}") from None
    if any(lo >= hi for lo, hi in zip(args.point_range[:3], args.point_range[3:])):
        raise UsageError(f"--range must be XMIN YMIN ZMIN XMAX YMAX ZMAX with each min < max, got {args.point_range}")
    for name in ("max_points", "max_voxels"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    check_output_folder(args.output)


def _plan(args) -> List[Dict]:
    return [{"input": f, "output": out, "voxel_size": tuple(args.voxel_size), "point_range": tuple(args.point_range),
             "reduce": args.reduce, "max_points": args.max_points, "max_voxels": args.max_voxels, "format": args.format}
            for f, (out,) in plan_outputs(args.inputs, args.recursive, args.output, ["." + args.format], "voxelize")]


def _error(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"sparseconv voxelize: {msg}", file=sys.stderr)


def _execute(tasks: List[Dict], workers: int, quiet: bool) -> List[Dict]:
    from tqdm import tqdm

    results: List[Optional[Dict]] = [None] * len(tasks)
    bar = tqdm(total=len(tasks), unit="file", desc="voxelize", file=sys.stderr, dynamic_ncols=True,
               disable=quiet or not sys.stderr.isatty())

    def done(i, r):
        results[i] = r
        if r["status"] == "error":
            _error(f"skipped (error): {r['reason']}")
        bar.update(1)

    todo = []
    for i, t in enumerate(tasks):
        if t.get("skip"):
            done(i, {"input": t["input"], "output": t["output"], "status": "exists"})
        else:
            todo.append(i)
    try:
        if workers <= 1 or len(todo) <= 1:
            for i in todo:
                done(i, process_file(tasks[i]))
        else:
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx,
                                                        initializer=_init_worker) as pool:
                # the workers ignore Ctrl-C (they inherit SIG_IGN): the parent stops handing out files and
                # waits for the files in progress, whose outputs are then complete
                main = threading.current_thread() is threading.main_thread()
                previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
                try:
                    futures = {pool.submit(process_file, tasks[i]): i for i in todo}
                finally:
                    if main:
                        signal.signal(signal.SIGINT, previous)
                try:
                    for fut in concurrent.futures.as_completed(futures):
                        i = futures[fut]
                        try:
                            done(i, fut.result())
                        except Exception as e:  # the worker process died (e.g. killed for memory)
                            done(i, {"input": tasks[i]["input"], "output": tasks[i]["output"], "status": "error",
                                     "reason": error_reason(tasks[i]["input"], e)})
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        bar.close()
    return results  # type: ignore[return-value]


def summarize(results: List[Dict], seconds: float, workers: int) -> Dict:
    done = [r for r in results if r["status"] == "done"]
    total = {k: sum(r[k] for r in done) for k in ("points", "kept", "voxels", "dropped_nonfinite",
                                                   "dropped_out_of_range", "dropped_max_voxels",
                                                   "dropped_max_points")}
    return {
        **file_summary(results),
        "points": total["points"],
        "kept": total["kept"],
        "voxels": total["voxels"],
        "dropped": {"nonfinite": total["dropped_nonfinite"], "out_of_range": total["dropped_out_of_range"],
                    "max_voxels": total["dropped_max_voxels"], "max_points": total["dropped_max_points"]},
        "mean_occupancy": (sum(r["occupancy"] for r in done) / len(done)) if done else 0.0,
        "seconds": seconds,
        "workers": workers,
        "results": results,
    }


def _print_summary(s: Dict) -> None:
    d = s["dropped"]
    print_file_lines(s, "output exists")
    print(f"points     {s['points']:,} read, {s['kept']:,} kept in {s['voxels']:,} voxels")
    print(f"dropped    {d['nonfinite']:,} non-finite, {d['out_of_range']:,} out of range, "
          f"{d['max_voxels']:,} over --max-voxels, {d['max_points']:,} over --max-points")
    print(f"occupancy  {100 * s['mean_occupancy']:.4f}% of the grid cells (mean over the files done)")
    print(f"time       {s['seconds']:.2f} s ({s['workers']} worker{'s' if s['workers'] > 1 else ''})")


def run(args) -> int:
    t0 = time.perf_counter()
    try:
        _validate(args)
        tasks = _plan(args)
    except UsageError as e:
        print(f"sparseconv voxelize: error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.output, exist_ok=True)
    for t in tasks:
        t["skip"] = os.path.exists(t["output"]) and not args.overwrite
    workers = min(args.workers, max(1, sum(not t["skip"] for t in tasks)))
    try:
        with sigterm_as_interrupt():
            results = _execute(tasks, workers, args.quiet)
    except KeyboardInterrupt:
        return report_interrupted("sparseconv voxelize")
    return finish(summarize(results, time.perf_counter() - t0, workers), args.json, _print_summary)
