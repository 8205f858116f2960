"""``sparseconv info``: what a point-cloud or voxel file holds."""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import zipfile
from typing import Dict, List

EPILOG = """examples:
  sparseconv info ../shared/data/kitti/velodyne/000000.bin
  sparseconv info voxels/*.npz --json
  sparseconv info scan.ply scan.laz voxels/000000.npz

Point-cloud files: point count, fields, bounds of the finite points, intensity range, number of
points with a non-finite x, y or z. Voxel files (sparseconv voxelize / sparseconv.io.save_voxels):
voxel count, channels, grid, batch size, occupancy, and the voxelization settings stored with them.
Exit status: 0 all files read, 1 some file could not be read (the others are still printed).
"""

_VOXEL_MEMBERS = {"coords.npy", "feats.npy", "spatial_shape.npy"}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "info",
        help="describe point-cloud files and voxel files",
        description=textwrap.fill(
            "Prints what each point-cloud file (KITTI .bin, .npy, .npz, PLY, PCD, LAS) or voxel file "
            "(.npz written by sparseconv voxelize) holds.",
            88,
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="point-cloud or voxel files")
    p.add_argument("--json", action="store_true", help="print a JSON list with one object per file")
    p.set_defaults(func=run)


def is_voxel_file(path: str) -> bool:
    """True if ``path`` is an ``.npz`` archive with the arrays of :func:`sparseconv.io.save_voxels`."""
    if not path.lower().endswith(".npz") or not os.path.isfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return _VOXEL_MEMBERS <= set(z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _plain(value):
    """A metadata value as JSON-friendly Python (lists, numbers, strings)."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def describe_points(path: str) -> Dict:
    """A JSON-friendly summary of a point-cloud file (see :func:`sparseconv.io.read_points`)."""
    import numpy as np

    from ..io import read_points

    cloud = read_points(path)
    finite = cloud.finite_mask()
    info = {
        "file": path,
        "kind": "points",
        "bytes": os.path.getsize(path),
        "points": len(cloud),
        "nonfinite": int((~finite).sum()),
        "fields": {n: {"dtype": str(v.dtype), "columns": 1 if v.ndim == 1 else int(v.shape[1])}
                   for n, v in cloud.fields.items()},
        "bounds": None,
        "intensity": None,
    }
    if finite.any():
        lo, hi = cloud.bounds()
        info["bounds"] = {a: [float(lo[i]), float(hi[i])] for i, a in enumerate("xyz")}
    if "intensity" in cloud.fields:
        v = np.asarray(cloud.fields["intensity"], np.float64).reshape(len(cloud), -1)
        ok = np.isfinite(v)
        info["intensity"] = [float(v[ok].min()), float(v[ok].max())] if ok.any() else None
    return info


def describe_voxels(path: str) -> Dict:
    """A JSON-friendly summary of a voxel file (see :func:`sparseconv.io.load_voxels`)."""
    import numpy as np

    from ..io import load_voxels

    x, meta = load_voxels(path)
    cells = int(np.prod(x.spatial_shape)) * x.batch_size
    info = {
        "file": path,
        "kind": "voxels",
        "bytes": os.path.getsize(path),
        "voxels": x.num_voxels,
        "channels": x.num_channels,
        "dtype": str(x.features.dtype).replace("torch.", ""),
        "spatial_shape": list(x.spatial_shape),
        "stride": list(x.stride),
        "batch_size": x.batch_size,
        "occupancy": x.num_voxels / cells if cells else 0.0,
    }
    counts = meta.get("counts")
    if isinstance(counts, np.ndarray) and counts.size:
        info["points_per_voxel"] = {"mean": float(counts.mean()), "max": int(counts.max())}
    info["meta"] = {k: _plain(v) for k, v in meta.items() if k != "counts"}
    return info


def describe(path: str) -> Dict:
    """:func:`describe_voxels` for voxel files, :func:`describe_points` for the others."""
    return describe_voxels(path) if is_voxel_file(path) else describe_points(path)


def _fmt_range(r) -> str:
    return f"[{r[0]:.3f}, {r[1]:.3f}]"


def _print_points(info: Dict) -> None:
    print(f"{info['file']}  (point cloud, {info['bytes']:,} bytes)")
    print(f"  points      {info['points']:,} ({info['nonfinite']:,} with a non-finite x, y or z)")
    fields = ", ".join(f"{n} ({f['dtype']}{'' if f['columns'] == 1 else ' x ' + str(f['columns'])})"
                       for n, f in info["fields"].items())
    print(f"  fields      x, y, z{', ' + fields if fields else ''}")
    b = info["bounds"]
    print("  bounds      " + ("no finite point" if b is None else
                              "  ".join(f"{a} {_fmt_range(b[a])}" for a in "xyz")))
    if "intensity" in info["fields"]:
        print(f"  intensity   {'no finite value' if info['intensity'] is None else _fmt_range(info['intensity'])}")


def _print_voxels(info: Dict) -> None:
    meta = info["meta"]
    names = meta.get("feature_names")
    print(f"{info['file']}  (sparseconv voxels, {info['bytes']:,} bytes)")
    print(f"  voxels      {info['voxels']:,} x {info['channels']} channels ({info['dtype']})"
          + (f": {', '.join(names)}" if isinstance(names, list) else ""))
    print(f"  grid        {tuple(info['spatial_shape'])}, batch size {info['batch_size']}, "
          f"stride {tuple(info['stride'])}")
    print(f"  occupancy   {100 * info['occupancy']:.4f}% of the grid cells")
    if "voxel_size" in meta:
        print(f"  voxel size  {tuple(meta['voxel_size'])}")
    if "point_range" in meta:
        print(f"  range       {tuple(meta['point_range'])}")
    if "points_per_voxel" in info:
        p = info["points_per_voxel"]
        print(f"  points      {p['mean']:.2f} per voxel on average, at most {p['max']}"
              + (f" (reduce: {meta['reduce']})" if "reduce" in meta else ""))
    if "num_points" in meta:
        print(f"  source      {meta.get('source', '?')}: {meta['num_points']:,} points; dropped "
              f"{meta.get('dropped_nonfinite', 0):,} non-finite, {meta.get('dropped_out_of_range', 0):,} out of "
              f"range, {meta.get('dropped_max_voxels', 0):,} over max voxels, "
              f"{meta.get('dropped_max_points', 0):,} over max points per voxel")


def run(args) -> int:
    records: List[Dict] = []
    failed = 0
    for path in args.files:
        try:
            info = describe(path)
        except (ValueError, OSError, KeyError, ImportError) as e:
            failed += 1
            reason = str(e) if not (isinstance(e, OSError) and e.filename) else f"{e.filename}: {e.strerror}"
            if path not in reason:
                reason = f"{path}: {reason}"
            records.append({"file": path, "error": reason})
            print(f"sparseconv info: error: {reason}", file=sys.stderr)
            continue
        records.append(info)
        if not args.json:
            (_print_voxels if info["kind"] == "voxels" else _print_points)(info)
    if args.json:
        print(json.dumps(records, indent=2))
    return 1 if failed else 0
