"""``sparseconv voxelize``: point-cloud files to voxel files, in batch."""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import multiprocessing
import os
import signal
import sys
import textwrap
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

from ..voxelize import KITTI_POINT_RANGE as DEFAULT_RANGE

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
_GLOB_CHARS = set("*?[")


class UsageError(Exception):
    """Bad arguments or inputs: the command exits with status 2."""


def add_parser(sub) -> None:
    from ..voxelize import REDUCTIONS

    p = sub.add_parser(
        "voxelize",
        help="voxelize point-cloud files (KITTI .bin, .npy, .npz, PLY, PCD, LAS) into voxel files",
        description=textwrap.fill(
            "Reads each point-cloud file, voxelizes x, y, z and its numeric per-point fields with "
            "sparseconv.voxelize, and writes one voxel file per input. Outputs are written atomically; "
            "existing outputs are skipped unless --overwrite. A file that cannot be read is reported and "
            "skipped; the others are still done.",
            88,
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="point-cloud files, folders (their supported files) or glob patterns (quoted or not)")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created if missing)")
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
    p.add_argument("--recursive", action="store_true", help="also look for point-cloud files in sub-folders")
    p.add_argument("--overwrite", action="store_true", help="redo files whose output already exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=run)


# ----------------------------------------------------------------------------- inputs
def point_cloud_extension(path: str) -> Optional[str]:
    """The :data:`sparseconv.io.SUPPORTED_FORMATS` extension of ``path`` (longest match), or None."""
    from ..io import SUPPORTED_FORMATS

    name = os.path.basename(path).lower()
    for ext in sorted(SUPPORTED_FORMATS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return None


def output_stem(path: str) -> str:
    """File name without its point-cloud extension: ``a/000000.bin`` -> ``000000``, ``x.pcd.bin`` -> ``x``."""
    name = os.path.basename(path)
    ext = point_cloud_extension(name)
    return name[: -len(ext)] if ext and len(name) > len(ext) else os.path.splitext(name)[0] or name


def _folder_files(folder: str, recursive: bool) -> List[str]:
    found = []
    if recursive:
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            found += [os.path.join(root, f) for f in sorted(files)]
    else:
        found = [os.path.join(folder, f) for f in sorted(os.listdir(folder))]
    return [f for f in found if _is_point_cloud_file(f)]


def _is_point_cloud_file(path: str) -> bool:
    """A supported point-cloud file, not hidden (e.g. a temporary file) and not a voxel file."""
    from .info import is_voxel_file

    return (os.path.isfile(path) and point_cloud_extension(path) is not None
            and not os.path.basename(path).startswith(".") and not is_voxel_file(path))


def expand_inputs(inputs: Sequence[str], recursive: bool = False) -> Tuple[List[str], List[str]]:
    """Files named by ``inputs``: files as given, folders' supported point-cloud files, glob matches.

    Returns ``(files, problems)``: the files in order without duplicates, and a message for each
    input that names nothing.
    """
    files, problems, seen = [], [], set()

    def add(path):
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            files.append(path)

    for item in inputs:
        if os.path.isdir(item):
            found = _folder_files(item, recursive)
            if not found:
                problems.append(f"{item}: the folder holds no point-cloud file "
                                f"({'' if recursive else 'not searched recursively; '}"
                                f"supported: {', '.join(_supported())})")
            for f in found:
                add(f)
        elif os.path.exists(item):
            add(item)
        elif _GLOB_CHARS & set(item):
            matches = sorted(glob.glob(item, recursive=recursive))
            found = []
            for m in matches:
                if os.path.isdir(m):
                    found += _folder_files(m, recursive)
                elif _is_point_cloud_file(m):
                    found.append(m)
            if not found:
                problems.append(f"{item}: no point-cloud file matches this pattern")
            for f in found:
                add(f)
        else:
            problems.append(f"{item}: no such file or folder")
    return files, problems


def _supported() -> List[str]:
    from ..io import SUPPORTED_FORMATS

    return list(SUPPORTED_FORMATS)


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
        out.update(status="error", reason=_reason(task["input"], e))
        return out
    stats = dict(result.stats)
    cells = int(np.prod(grid_shape(task["voxel_size"], task["point_range"])))
    out.update(status="done", features=names, **stats, grid_cells=cells, occupancy=stats["voxels"] / cells,
               seconds=time.perf_counter() - t0)
    return out


def _reason(path: str, e: BaseException) -> str:
    text = str(e) if not isinstance(e, KeyError) else (e.args[0] if e.args else repr(e))
    if isinstance(e, FileNotFoundError) and e.filename:
        return f"{e.filename}: {e.strerror or 'no such file'}"
    if not text:
        text = type(e).__name__
    elif not isinstance(e, (ValueError, OSError)):
        text = f"{type(e).__name__}: {text}"
    return text if path in text else f"{path}: {text}"


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, frame):
    """SIGTERM as Ctrl-C: unwinds, so that atomic writes remove their temporary files."""
    raise KeyboardInterrupt


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
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UsageError(f"-o {args.output}: exists and is not a folder")


def _plan(args) -> List[Dict]:
    files, problems = expand_inputs(args.inputs, args.recursive)
    if problems:
        raise UsageError("; ".join(problems))
    if not files:
        raise UsageError("no input file found")
    suffix = "." + args.format
    tasks, by_output = [], {}
    for f in files:
        out = os.path.join(args.output, output_stem(f) + suffix)
        key = os.path.realpath(out)
        if key in by_output:
            raise UsageError(f"{by_output[key]} and {f} would both be written to {out}; voxelize them into "
                             f"different folders")
        if key == os.path.realpath(f):
            raise UsageError(f"{f} is in OUTDIR and would be overwritten by its own output; choose another -o")
        by_output[key] = f
        tasks.append({"input": f, "output": out, "voxel_size": tuple(args.voxel_size),
                      "point_range": tuple(args.point_range), "reduce": args.reduce, "max_points": args.max_points,
                      "max_voxels": args.max_voxels, "format": args.format})
    return tasks


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
                                     "reason": _reason(tasks[i]["input"], e)})
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
        "files": len(results),
        "done": len(done),
        "skipped_exists": [r["input"] for r in results if r["status"] == "exists"],
        "failed": [{"file": r["input"], "reason": r["reason"]} for r in results if r["status"] == "error"],
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
    print(f"files      {s['files']}: {s['done']} done, {len(s['skipped_exists'])} skipped (output exists), "
          f"{len(s['failed'])} skipped (error)")
    for f in s["skipped_exists"]:
        print(f"  skipped: exists   {f}")
    for f in s["failed"]:
        print(f"  skipped: error    {f['reason']}")
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
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if on_main_thread else None
    try:
        results = _execute(tasks, workers, args.quiet)
    except KeyboardInterrupt:
        print("sparseconv voxelize: interrupted; the outputs written so far are complete, no partial file is left",
              file=sys.stderr)
        return 130
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    summary = summarize(results, time.perf_counter() - t0, workers)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    return 1 if summary["failed"] else 0
