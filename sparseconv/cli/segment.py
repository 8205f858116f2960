"""``sparseconv segment``: per-point semantic labels of LiDAR scans with a trained segmentation network."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

from ._files import (UsageError, add_command_parser, check_output_folder, error_reason, file_summary, finish,
                     plan_outputs, print_file_lines, report_interrupted, sigterm_as_interrupt)

EPILOG = """examples:
  sparseconv segment data/synth/sequences/08/velodyne -o pred/ --config configs/minkunet_synth.yaml \\
      --ckpt output/minkunet_synth/ckpt_e015_s00015300.pt
  sparseconv segment 'scans/*.bin' -o pred/ --ckpt CKPT --ply --threads 2     # config stored in CKPT
  sparseconv segment scan.ply -o pred/ --ckpt CKPT --overwrite --json

Each input FILE (KITTI .bin, .npy, .npz, PLY, PCD, LAS; features x, y, z, intensity, with intensity
0 when the file has none) becomes OUTDIR/<stem>.label: one little-endian uint32 per point of the
file, in file order, in the SemanticKITTI encoding: the raw semantic id (the training id mapped back
by the inverse learning map, e.g. car -> 10, road -> 40) in the low 16 bits, instance id 0 in the
high 16. Points outside the config's data.point_range (and non-finite points) have no voxel and get
0 (unlabeled). With --ply also OUTDIR/<stem>.ply: the points with the SemanticKITTI colours
(red, green, blue), the raw id (label), the training id (class) and the intensity.
Existing outputs are skipped unless --overwrite; every file is written atomically.
Exit status: 0 all done (or skipped because the outputs exist), 1 some file failed (reported and
skipped, the others are done), 2 bad arguments, no input found, or a checkpoint / config that
cannot be loaded.
"""


def add_parser(sub) -> None:
    p = add_command_parser(
        sub, "segment",
        "label every point of LiDAR scans with a trained segmentation network (SemanticKITTI .label files)",
        "Reads each point-cloud file, voxelizes it on the training grid of the config, runs the "
        "segmentation network of the checkpoint (written by tools/train_seg.py), gives every point its "
        "voxel's class and writes the labels as a SemanticKITTI .label file (and optionally a coloured "
        "PLY). A file that cannot be read is reported and skipped; the others are still done.",
        EPILOG, "outputs already exist", _add_own_arguments)
    p.set_defaults(func=run)


def _add_own_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", metavar="CKPT", help="checkpoint written by tools/train_seg.py or tools/export_seg.py "
                   "(default: the best shipped weights, sparseconv/models/weights/seg/)")
    p.add_argument("--config", metavar="CFG", help="experiment YAML (default: the config stored in the checkpoint)")
    p.add_argument("--ply", action="store_true", help="also write OUTDIR/<stem>.ply coloured by class")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda (default: auto)")
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="override a config value (value read as YAML); repeatable")


# ----------------------------------------------------------------------------- planning
def _plan(args) -> List[Dict]:
    suffixes = [".label"] + ([".ply"] if args.ply else [])
    return [{"input": f, "outputs": outputs}
            for f, outputs in plan_outputs(args.inputs, args.recursive, args.output, suffixes, "segment")]


def _load(args):
    """``(cfg, model, lut, device)``: the network in eval mode and the training id -> raw id table."""
    import numpy as np

    from ..datasets.semantic_kitti import LEARNING_MAP_INV
    from ..engine.config import parse_overrides
    from ..engine.distributed import resolve_device
    from ..engine.seg import load_seg_checkpoint

    from ..engine.seg import shipped_seg_weights

    try:
        overrides = parse_overrides(args.set)
        if args.ckpt is None:
            shipped = shipped_seg_weights()
            if not shipped:
                raise ValueError("no --ckpt given and no shipped segmentation weights are installed "
                                 "(sparseconv/models/weights/seg/*.pt); train one with tools/train_seg.py")
            args.ckpt = shipped[0]
        cfg, model, _, _ = load_seg_checkpoint(args.ckpt, args.config, overrides)
        device = resolve_device(args.device)
    except (OSError, ValueError, TypeError, KeyError) as e:  # ConfigError is a ValueError
        raise UsageError(str(e)) from None
    c = int(cfg["data"]["num_classes"])
    lut = np.zeros(c, np.int64)
    for train_id in range(c):
        if train_id not in LEARNING_MAP_INV:
            raise UsageError(f"training id {train_id} has no raw SemanticKITTI id (LEARNING_MAP_INV covers 0..19); "
                             f"the network has {c} classes")
        lut[train_id] = LEARNING_MAP_INV[train_id]
    return cfg, model.to(device), lut, device


# ----------------------------------------------------------------------------- one file
def segment_file(task: Dict, cfg, model, lut, device, ply: bool) -> Dict:
    """Reads, segments and writes one file; never raises for a bad file (returns ``status="error"``)."""
    import numpy as np

    from ..engine.seg import raw_label_colors, segment_points
    from ..io import PointCloud, read_points, write_labels, write_ply

    t0 = time.perf_counter()
    out = {"input": task["input"], "outputs": task["outputs"]}
    try:
        cloud = read_points(task["input"])
        has_intensity = "intensity" in cloud.fields and cloud.fields["intensity"].ndim == 1
        intensity = cloud.fields["intensity"].astype(np.float32) if has_intensity \
            else np.zeros(len(cloud), np.float32)
        points = np.concatenate([cloud.xyz, intensity[:, None]], 1)
        d = cfg["data"]
        train_ids, info = segment_points(model, points, d["voxel_size"], d["point_range"], device=device,
                                         max_points_per_voxel=d["max_points_per_voxel"])
        raw = lut[train_ids]
        write_labels(task["outputs"][0], raw.astype(np.uint32))
        if ply:
            if len(cloud) == 0:
                raise ValueError("the scan has no points, and a PLY file cannot hold 0 points")
            write_ply(task["outputs"][1], PointCloud(cloud.xyz, {
                "colors": raw_label_colors(raw), "label": raw.astype(np.int32),
                "class": train_ids.astype(np.int32), "intensity": intensity}))
    except Exception as e:  # a bad file is reported and skipped; the others go on
        out.update(status="error", reason=error_reason(task["input"], e))
        return out
    out.update(status="done", points=len(points), outside=info["outside"], voxels=info["voxels"],
               intensity=has_intensity, counts=np.bincount(train_ids, minlength=len(lut)).tolist(),
               network_s=info["seconds"], seconds=time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------- the command
def summarize(results: List[Dict], seconds: float, num_classes: int, threads: int, device: str) -> Dict:
    from ..engine.seg import class_names_for

    done = [r for r in results if r["status"] == "done"]
    names = class_names_for(num_classes)
    counts = [sum(r["counts"][k] for r in done) for k in range(num_classes)]
    # the first file warms the network up (kernel-map caches, allocator): left out when there are more than two
    net = [r["network_s"] for r in (done[1:] if len(done) > 2 else done)]
    return {
        **file_summary(results),
        "points": sum(r["points"] for r in done),
        "outside_range": sum(r["outside"] for r in done),
        "without_intensity": [r["input"] for r in done if not r["intensity"]],
        "points_per_class": {names[k]: counts[k] for k in range(num_classes) if counts[k]},
        "ms_per_scan": 1000.0 * statistics.median(net) if net else None,
        "threads": threads,
        "device": device,
        "seconds": seconds,
        "results": results,
    }


def _print_summary(s: Dict) -> None:
    print_file_lines(s, "outputs exist")
    for f in s["without_intensity"]:
        print(f"  note: no intensity field, 0 used   {f}")
    print(f"points     {s['points']:,} in the files done, {s['outside_range']:,} of them outside the point range "
          f"(label 0, unlabeled)")
    if s["points_per_class"]:
        total = max(sum(s["points_per_class"].values()), 1)
        ranked = sorted(s["points_per_class"].items(), key=lambda kv: -kv[1])
        parts = [f"{'unlabeled' if n == 'ignore' else n} {100 * v / total:.1f}%" for n, v in ranked]
        print("classes    " + ", ".join(parts))
    if s["ms_per_scan"] is not None:
        print(f"speed      {s['ms_per_scan']:.1f} ms per scan (median; network, arg-max and projection; "
              f"{s['threads']} threads, {s['device']})")
    print(f"time       {s['seconds']:.2f} s")


def run(args) -> int:
    t0 = time.perf_counter()
    import torch

    try:
        if args.threads is not None:
            if args.threads < 1:
                raise UsageError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        check_output_folder(args.output)
        tasks = _plan(args)
        cfg, model, lut, device = _load(args)
    except UsageError as e:
        print(f"sparseconv segment: error: {e}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    os.makedirs(args.output, exist_ok=True)
    results: List[Optional[Dict]] = []
    try:
        with sigterm_as_interrupt(), tqdm(total=len(tasks), unit="file", desc="segment", file=sys.stderr,
                                          dynamic_ncols=True, disable=args.quiet or not sys.stderr.isatty()) as bar:
            for t in tasks:
                if not args.overwrite and all(os.path.exists(o) for o in t["outputs"]):
                    r = {"input": t["input"], "outputs": t["outputs"], "status": "exists"}
                else:
                    r = segment_file(t, cfg, model, lut, device, args.ply)
                    if r["status"] == "error":
                        tqdm.write(f"sparseconv segment: skipped (error): {r['reason']}", file=sys.stderr)
                results.append(r)
                bar.update(1)
    except KeyboardInterrupt:
        return report_interrupted("sparseconv segment")
    summary = summarize(results, time.perf_counter() - t0, len(lut), torch.get_num_threads(), str(device))
    return finish(summary, args.json, _print_summary)
