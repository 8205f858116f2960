#!/usr/bin/env python
"""Run a shipped detector on real KITTI scans: a bird's-eye-view PNG per scan (detections, ground truth), a JSON.

examples:
  python tools/det_figures.py --weights second_synth --kitti ../shared/data/kitti --out docs/images/
  python tools/det_figures.py --weights exported.pt --kitti /data/kitti/training --out /tmp/figs --frames 000000 000002

KITTI folder: velodyne/NNNNNN.bin with label_2/NNNNNN.txt and calib/NNNNNN.txt (or the same under
training/); frames without a label or calib file are skipped. Each scan is cropped like the
training data: the left camera's field of view (the frame's calib) and the model's point range
(sparseconv.cli.demo.crop_scan). Writes OUT/det_<weights>_<frame>.png (points by height, detections
in class colours with scores, KITTI ground truth dashed green) and OUT/det_<weights>.json (per scan:
points, voxels, timings, detections, ground-truth boxes and how many a same-class detection overlaps
with BEV IoU >= 0.5). When the KITTI folder is absent it says so and exits with 0.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="shipped weights name or exported .pt file (default: the best shipped)")
    p.add_argument("--kitti", default=os.path.join(ROOT, "..", "shared", "data", "kitti"),
                   help="KITTI folder with velodyne/, label_2/, calib/ (default: ../shared/data/kitti)")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "images"), help="output folder (default docs/images)")
    p.add_argument("--frames", nargs="+", metavar="ID", help="only these frame ids (default: all)")
    p.add_argument("--score-threshold", type=float, help="report detections scoring at least this")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=1, help="run each scan N times, report median times")
    return p


def kitti_frames(root: str) -> List[dict]:
    """``[{"frame", "velodyne", "label_2", "calib"}]`` of the complete frames under ``root`` (or
    ``root/training``), sorted by frame id."""
    base = root if os.path.isdir(os.path.join(root, "velodyne")) else os.path.join(root, "training")
    out = []
    for path in sorted(glob.glob(os.path.join(glob.escape(base), "velodyne", "*.bin"))):
        fid = os.path.basename(path)[:-4]
        label = os.path.join(base, "label_2", fid + ".txt")
        calib = os.path.join(base, "calib", fid + ".txt")
        if os.path.isfile(label) and os.path.isfile(calib):
            out.append({"frame": fid, "velodyne": path, "label_2": label, "calib": calib})
    return out


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.kitti):
        print(f"det_figures: {args.kitti} is absent: nothing to do")
        return 0
    frames = kitti_frames(args.kitti)
    if args.frames:
        wanted = set(args.frames)
        frames = [f for f in frames if f["frame"] in wanted]
    if not frames:
        print(f"det_figures: no complete KITTI frame (velodyne + label_2 + calib) in {args.kitti}"
              + (f" among {args.frames}" if args.frames else "") + ": nothing to do")
        return 0
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from sparseconv.cli.demo import crop_scan, detect, detection_rows, draw_detections, gt_found
    from sparseconv.datasets import camera_boxes_to_lidar, read_kitti_calib, read_kitti_labels
    from sparseconv.engine.trainer import json_safe
    from sparseconv.io import atomic_write, read_points
    from sparseconv.models.pretrained import load_pretrained

    overrides = {} if args.score_threshold is None else {"score_threshold": float(args.score_threshold)}
    try:
        model, info = load_pretrained(args.weights, **overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"det_figures: error: {e}", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    names, pr = info["class_names"], info["point_range"]
    image_size = (info.get("data") or {}).get("image_size") or None
    scans = []
    for f in frames:
        points = read_points(f["velodyne"], format="kitti").to_array()
        calib = read_kitti_calib(f["calib"], required=("P2", "R0_rect", "Tr_velo_to_cam"))
        labels = read_kitti_labels(f["label_2"])
        gt = camera_boxes_to_lidar(labels, calib)
        pts, gt, types = crop_scan(points, pr, calib, image_size, gt, list(labels["type"]))
        dets, timings, batch = detect(model, pts, info["voxel_size"], pr, repeats=args.repeats)
        found = gt_found(dets, names, gt, types)
        image = os.path.join(args.out, f"det_{info['name']}_{f['frame']}.png")
        title = (f"KITTI {f['frame']}: {len(pts):,} points in the camera view, {len(dets['scores'])} detections "
                 f"({info['name']}), ground truth dashed")
        draw_detections(image, pts, dets, names, (pr[0], pr[1], pr[3], pr[4]), gt, types, title)
        scans.append({"frame": f["frame"], "velodyne": os.path.abspath(f["velodyne"]), "image": os.path.basename(image),
                      "points": int(len(points)), "points_used": int(len(pts)),
                      "voxels": int(batch["voxels"].num_voxels), "timings": timings,
                      "detections": detection_rows(dets, names),
                      "ground_truth": [{"class": str(t), "box": [float(v) for v in b]} for b, t in zip(gt, types)],
                      "found": found})
        print(f"{f['frame']}: {len(pts):,} points, {len(dets['scores'])} detections, {found['found']}/{found['gt']} "
              f"{'/'.join(names)} boxes found (BEV IoU >= 0.5), {timings['total_ms']:.0f} ms -> {image}")
    prov = info.get("provenance") or {}
    report = {"weights": {"name": info["name"], "model": info["model"], "path": info["path"],
                          "global_step": prov.get("global_step"), "checkpoint": prov.get("checkpoint"),
                          "class_names": list(names), "point_range": list(pr),
                          "voxel_size": list(info["voxel_size"])},
              "kitti": os.path.abspath(args.kitti), "score_threshold": args.score_threshold,
              "threads": torch.get_num_threads(), "scans": scans,
              "found": {"gt": sum(s["found"]["gt"] for s in scans), "found": sum(s["found"]["found"] for s in scans)},
              "median_total_ms": float(np.median([s["timings"]["total_ms"] for s in scans]))}
    out_json = os.path.join(args.out, f"det_{info['name']}.json")
    with atomic_write(out_json, "w", encoding="utf-8") as fh:
        json.dump(json_safe(report), fh, indent=1)
    print(f"wrote {out_json} ({len(scans)} scans)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
