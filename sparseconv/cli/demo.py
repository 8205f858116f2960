"""``sparseconv demo``: the shipped 3D detector on a LiDAR scan: detections, timings and a bird's-eye view.

The functions here (:func:`crop_scan`, :func:`detect`, :func:`gt_found`, :func:`draw_detections`) are
shared with ``tools/det_figures.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

EPILOG = """examples:
  sparseconv demo                                   # shipped detector on a simulated HDL-64E scan
  sparseconv demo --input ../shared/data/kitti/velodyne/000000.bin \\
      --labels ../shared/data/kitti/label_2/000000.txt --calib ../shared/data/kitti/calib/000000.txt
  sparseconv demo --weights second_synth --score-threshold 0.3 -o bev.png --json
  sparseconv demo --weights path/to/exported.pt --check-dense --threads 2

Weights: models/weights/*.pt (sparseconv.models.pretrained; list them with --list-weights), made
from training checkpoints by tools/export_det.py. The scan is cropped to the model's point range
and, with --front (the default when the weights were trained on front-camera crops), to the
camera's field of view: with --calib that of the calibration file, otherwise the simulator's KITTI
camera rig. The image shows the points seen from above coloured by height, the detections in
their class colours with scores, and the ground truth (--labels, or the simulated scan's own
boxes) dashed.
"""

GT_COLOR = "#40ff40"
SIM_SOURCE = "simulated HDL-64E scan (seed {seed})"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the shipped 3D detector on a LiDAR scan: detections, timings and a bird's-eye-view image",
        description=textwrap.fill(
            "Runs a shipped 3D object detector (sparse-convolution SECOND / CenterPoint) on a LiDAR scan: a "
            "built-in simulated HDL-64E scan, or any point-cloud file (KITTI .bin, .npy, .ply, ...). Prints "
            "the detections and the time of each stage, and writes a bird's-eye-view PNG with the points, "
            "the detected boxes and, when known, the ground-truth boxes.", 88),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", metavar="FILE", help="point-cloud file (KITTI velodyne .bin, ...); default: a "
                   "simulated HDL-64E scan")
    p.add_argument("--labels", metavar="LABEL_TXT", help="KITTI label_2 file: draw its boxes as ground truth "
                   "(needs --calib)")
    p.add_argument("--calib", metavar="CALIB_TXT", help="KITTI calib file (R0_rect, Tr_velo_to_cam, P2)")
    p.add_argument("--weights", metavar="NAME|PATH", help="shipped weights name or a .pt file from "
                   "tools/export_det.py (default: the best shipped weights)")
    p.add_argument("--weights-dir", metavar="DIR", help="where weights names are looked up (default: the shipped "
                   "models/weights)")
    p.add_argument("--list-weights", action="store_true", help="list the shipped weights and exit")
    p.add_argument("--front", action=argparse.BooleanOptionalAction, default=None,
                   help="keep only the points in the camera's field of view (default: as the weights were "
                   "trained, data.fov_only)")
    p.add_argument("-o", "--output", default="demo_bev.png", metavar="IMAGE",
                   help="bird's-eye-view PNG to write (default: demo_bev.png)")
    p.add_argument("--score-threshold", type=float, metavar="T",
                   help="report detections scoring at least T (default: the model's setting)")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated scan (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="torch device to run the detector on (default: cpu)")
    p.add_argument("--repeats", type=int, default=1, help="run the detector N times, report the median times")
    p.add_argument("--check-dense", action="store_true",
                   help="also check a SubMConv3d against dense conv3d on a crop of the voxelized scan")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


# ----------------------------------------------------------------------------- scans
def simulated_scan(seed: int = 0):
    """The bundled scan: :func:`sparseconv.datasets.simulate_scan` ``(seed)`` (a :class:`Scan`)."""
    from sparseconv.datasets import simulate_scan

    return simulate_scan(seed)


def crop_scan(points: np.ndarray, point_range: Sequence[float], calib: Optional[Mapping[str, np.ndarray]] = None,
              image_size: Optional[Sequence[int]] = None, gt_boxes: Optional[np.ndarray] = None,
              gt_types: Optional[Sequence[str]] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The points a detector sees, as in training (:class:`~sparseconv.datasets.KittiDetection`):
    the camera field of view first (when ``calib`` is given, :func:`~sparseconv.datasets.fov_mask`),
    then ``point_range`` (:func:`~sparseconv.datasets.crop_to_range`: points ``min <= xyz < max``,
    boxes by their centre).

    Args:
        points: ``[N, C]`` (x, y, z, features...), non-finite rows are dropped.
        point_range: ``(x0, y0, z0, x1, y1, z1)``.
        calib: KITTI calibration (``P2``, ``R0_rect``, ``Tr_velo_to_cam``) for the FOV crop, or None.
        image_size: ``(width, height)`` of the camera image (default KITTI's 1242 x 375).
        gt_boxes, gt_types: ground-truth boxes ``[M, 7]`` and their class names, cropped alike.

    Returns:
        ``(points [N', C] float32, gt_boxes [M', 7], gt_types [M'])``.
    """
    from sparseconv.datasets import crop_to_range, fov_mask
    from sparseconv.datasets.kitti import KITTI_IMAGE_SIZE

    pts = np.asarray(points, np.float32)
    pts = pts[np.isfinite(pts[:, :3]).all(1)]
    if calib is not None:
        pts = pts[fov_mask(pts, calib, tuple(image_size) if image_size else KITTI_IMAGE_SIZE)]
    boxes = np.zeros((0, 7)) if gt_boxes is None else np.asarray(gt_boxes, np.float64).reshape(-1, 7)
    types = np.asarray([] if gt_types is None else list(gt_types), dtype=object)
    sample = crop_to_range({"points": pts, "gt_boxes": boxes, "gt_names": types}, point_range)
    return (np.ascontiguousarray(sample["points"], np.float32), np.asarray(sample["gt_boxes"]).reshape(-1, 7),
            np.asarray(sample["gt_names"], dtype=object))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def detect(model: torch.nn.Module, points: np.ndarray, voxel_size: Sequence[float], point_range: Sequence[float],
           repeats: int = 1) -> Tuple[Dict[str, np.ndarray], Dict[str, Any], Dict[str, Any]]:
    """Runs a detector on one scan and times it.

    Voxelization is :func:`~sparseconv.datasets.collate` (the batch the detector was trained on).
    For the detectors of :mod:`sparseconv.models.detectors` the network (``bev_features`` and the
    dense head) and the post-processing (``dense_head.predict``: decoding, score threshold, NMS) are
    timed apart; any other model is timed as a whole (``postprocess_ms`` None).

    Args:
        model: a detector in eval mode.
        points: ``[N, C]`` the scan (already cropped).
        voxel_size, point_range: the model's.
        repeats: run it this many times; the times are medians.

    Returns:
        ``(dets, timings, batch)``: ``dets`` with ``boxes`` float32 ``[K, 7]``, ``scores`` ``[K]``,
        ``labels`` int64 ``[K]`` (1-based), as NumPy arrays; ``timings`` with ``voxelize_ms``,
        ``network_ms``, ``postprocess_ms``, ``total_ms``, ``threads``, ``repeats``; the collate batch.
    """
    from sparseconv.datasets import collate

    if int(repeats) < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    staged = hasattr(model, "bev_features") and hasattr(getattr(model, "dense_head", None), "predict")
    rows, preds, batch = [], None, None
    for _ in range(int(repeats)):
        t0 = time.perf_counter()
        batch = collate([{"points": points}], voxel_size, point_range)
        inputs = dict(batch, voxels=batch["voxels"].to(device))
        _sync(device)
        t1 = time.perf_counter()
        if staged:
            raw = model.dense_head(model.bev_features(inputs))
            _sync(device)
            t2 = time.perf_counter()
            preds = model.dense_head.predict(raw)
        else:
            preds = model(inputs)
            _sync(device)
            t2 = time.perf_counter()
        _sync(device)
        t3 = time.perf_counter()
        rows.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0))
    med = np.median(np.asarray(rows), axis=0) * 1000.0
    pred = preds[0]
    dets = {"boxes": pred["boxes"].detach().cpu().float().numpy().reshape(-1, 7),
            "scores": pred["scores"].detach().cpu().float().numpy().reshape(-1),
            "labels": pred["labels"].detach().cpu().long().numpy().reshape(-1)}
    timings = {"voxelize_ms": float(med[0]), "network_ms": float(med[1]),
               "postprocess_ms": float(med[2]) if staged else None, "total_ms": float(med[3]),
               "threads": torch.get_num_threads(), "repeats": int(repeats), "device": str(device)}
    return dets, timings, batch


def gt_found(dets: Mapping[str, np.ndarray], class_names: Sequence[str], gt_boxes: np.ndarray,
             gt_types: Sequence[str], iou: float = 0.5) -> Dict[str, Any]:
    """How many ground-truth boxes of the detector's classes some detection of the same class
    overlaps with bird's-eye-view IoU >= ``iou`` (a rough look, not KITTI AP).

    Returns:
        ``{"gt": n, "found": k, "iou": iou, "per_class": {class: [found, n]}}``.
    """
    from sparseconv.metrics import box_iou_bev

    names = [class_names[int(label) - 1] for label in dets["labels"]]
    per_class = {}
    for cls in class_names:
        g = np.asarray(gt_boxes, np.float64).reshape(-1, 7)[[str(t) == cls for t in gt_types]]
        d = np.asarray(dets["boxes"], np.float64).reshape(-1, 7)[[n == cls for n in names]]
        if not len(g):
            continue
        found = int((box_iou_bev(g, d) >= iou).any(1).sum()) if len(d) else 0
        per_class[cls] = [found, int(len(g))]
    return {"gt": sum(v[1] for v in per_class.values()), "found": sum(v[0] for v in per_class.values()),
            "iou": iou, "per_class": per_class}


def draw_detections(out_path: str, points: np.ndarray, dets: Mapping[str, np.ndarray], class_names: Sequence[str],
                    bev_range: Sequence[float], gt_boxes: Optional[np.ndarray] = None,
                    gt_types: Optional[Sequence[str]] = None, title: str = "") -> None:
    """A bird's-eye-view PNG (:func:`sparseconv.cli.view.render_bev`): points by height, detections in
    their class colours with scores, ground truth dashed in green."""
    from .view import render_bev

    xyz = np.asarray(points, np.float64)[:, :3]
    sets = []
    if gt_boxes is not None and len(gt_boxes):
        sets.append({"boxes": gt_boxes, "types": gt_types, "color": GT_COLOR, "linestyle": "--",
                     "label": "ground truth"})
    sets.append({"boxes": dets["boxes"], "types": [class_names[int(v) - 1] for v in dets["labels"]],
                 "scores": dets["scores"]})
    render_bev(xyz, xyz[:, 2], "height z (m)", out_path, tuple(bev_range), None, title=title, box_sets=sets)


def detection_rows(dets: Mapping[str, np.ndarray], class_names: Sequence[str]) -> List[Dict[str, Any]]:
    """JSON rows ``{"class", "label", "score", "box": [x, y, z, dx, dy, dz, yaw]}``."""
    return [{"class": class_names[int(label) - 1], "label": int(label), "score": float(score),
             "box": [float(v) for v in box]}
            for box, score, label in zip(dets["boxes"], dets["scores"], dets["labels"])]


# ----------------------------------------------------------------------------- dense check
@torch.no_grad()
def _dense_check(x, seed: int) -> float:
    """Max |difference| between SubMConv3d and dense conv3d on a 48 x 48 x Z crop of ``x``'s first scan."""
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


# ----------------------------------------------------------------------------- the command
def _error(msg: str, code: int = 1) -> int:
    print(f"sparseconv demo: error: {msg}", file=sys.stderr)
    return code


def _weights_line(info: Mapping[str, Any]) -> str:
    p = info.get("provenance") or {}
    parts = [f"{info['model']}, {info['num_parameters'] / 1e6:.2f} M parameters"]
    if p.get("global_step") is not None:
        parts.append(f"trained {p.get('epoch')} epochs / {p.get('global_step')} steps")
    root = ((p.get("config") or {}).get("data") or {}).get("root")
    if root:
        parts.append(f"on {root}")
    summary = ((p.get("metrics") or {}).get("summary") or {}) if isinstance(p.get("metrics"), dict) else {}
    ap = summary.get("mAP/3d_R40_moderate")
    if isinstance(ap, (int, float)):
        parts.append(f"3D mAP R40 moderate {ap:.1f}")
    return f"{info['name']} ({'; '.join(parts)})"


def _list_weights(args) -> int:
    from sparseconv.models.pretrained import WEIGHTS_DIR, default_pretrained, list_pretrained, read_pretrained

    folder = args.weights_dir or WEIGHTS_DIR
    names = list_pretrained(folder)
    if not names:
        print(f"no weights in {folder} (export a checkpoint with tools/export_det.py)")
        return 0
    best = default_pretrained(folder)
    for n in names:
        obj = read_pretrained(os.path.join(folder, n + ".pt"), mmap=True)
        a = obj["model_args"]
        print(f"{'*' if n == best else ' '} {n:<24} {obj['model']:<18} classes {','.join(a['class_names'])}  "
              f"voxel {a['voxel_size']}  range {a['point_range']}")
    return 0


def run(args) -> int:
    from sparseconv.io import PointCloudError

    if args.list_weights:
        return _list_weights(args)
    if args.labels and not args.calib:
        return _error("--labels needs --calib: KITTI boxes are in the camera frame", 2)
    if args.repeats < 1:
        return _error(f"--repeats must be >= 1, got {args.repeats}", 2)
    if args.score_threshold is not None and not 0.0 <= args.score_threshold <= 1.0:
        return _error(f"--score-threshold must be in [0, 1], got {args.score_threshold}", 2)
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        return _error(f"-o {args.output}: the folder {folder} does not exist", 2)
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError) as e:
        return _error(f"--device {args.device!r}: {e}", 2)
    if device.type == "cuda" and not torch.cuda.is_available():
        return _error(f"--device {args.device}: CUDA is not available in this torch build / machine", 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    notes: List[str] = []
    # ---- the scan (read first: a bad file is reported whatever the weights)
    calib, gt_boxes, gt_types, gt_source = None, None, None, None
    try:
        if args.input:
            from sparseconv.io import read_points

            cloud = read_points(args.input)
            if "intensity" in cloud.fields:
                points = cloud.to_array()
            else:
                points = np.concatenate([cloud.xyz.astype(np.float32), np.zeros((len(cloud), 1), np.float32)], 1)
                notes.append(f"{args.input} has no intensity: using 0")
            source = args.input
            if args.calib:
                from sparseconv.datasets import read_kitti_calib

                calib = read_kitti_calib(args.calib)
            if args.labels:
                from sparseconv.datasets import camera_boxes_to_lidar, read_kitti_labels

                labels = read_kitti_labels(args.labels)
                gt_boxes, gt_types = camera_boxes_to_lidar(labels, calib), list(labels["type"])
                gt_source = os.path.basename(args.labels)
        else:
            scan = simulated_scan(args.seed)
            points, source, calib = scan.points, SIM_SOURCE.format(seed=args.seed), scan.calib
            gt_source = "simulator"
    except (PointCloudError, OSError, KeyError) as e:  # PointCloudError: a malformed file
        reason = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e).strip("'\"")
        return _error(reason)
    # ---- the weights
    from sparseconv.models.pretrained import load_pretrained

    overrides = {} if args.score_threshold is None else {"score_threshold": float(args.score_threshold)}
    try:
        model, info = load_pretrained(args.weights, device=device, weights_dir=args.weights_dir, **overrides)
    except (ValueError, FileNotFoundError) as e:
        return _error(str(e))
    data = info.get("data") or {}
    front = bool(data.get("fov_only", False)) if args.front is None else bool(args.front)
    fov_calib = None
    if front:
        if calib is not None and "P2" in calib:
            fov_calib = calib
        else:
            from sparseconv.datasets import kitti_calib

            fov_calib = kitti_calib()
            notes.append("camera field of view from the simulator's KITTI camera rig (pass --calib for the scan's own)")
    if not args.input:  # the simulated objects hit by the scan (in image 2, as KITTI labels, with --front)
        keep = (scan.num_points > 0) & (scan.in_label_2 if front else True)
        gt_boxes, gt_types = scan.boxes[keep], list(scan.names[keep])
    image_size = data.get("image_size") or None
    pts, gt_boxes, gt_types = crop_scan(points, info["point_range"], fov_calib, image_size, gt_boxes, gt_types)
    if not len(pts):
        return _error(f"no point of {source} lies inside the model's range {list(info['point_range'])}"
                      + (" and the camera's field of view" if front else ""))
    dets, timings, batch = detect(model, pts, info["voxel_size"], info["point_range"], repeats=args.repeats)
    names = info["class_names"]
    found = gt_found(dets, names, gt_boxes, gt_types) if gt_source else None
    pr = info["point_range"]
    title = (f"{os.path.basename(source) if args.input else source}: {len(pts):,} points, {len(dets['scores'])} "
             f"detections ({info['name']})" + (f", ground truth dashed ({gt_source})" if gt_source else ""))
    try:
        draw_detections(args.output, pts, dets, names, (pr[0], pr[1], pr[3], pr[4]), gt_boxes, gt_types, title)
    except OSError as e:
        return _error(f"cannot write {args.output}: {e}")
    vox = batch["voxels"]
    result: Dict[str, Any] = {
        "source": source,
        "weights": {"name": info["name"], "path": info["path"], "model": info["model"],
                    "num_parameters": info["num_parameters"], "class_names": list(names),
                    "point_range": list(pr), "voxel_size": list(info["voxel_size"]),
                    "global_step": (info["provenance"] or {}).get("global_step")},
        "front": front,
        "points": int(len(points)),
        "points_used": int(len(pts)),
        "voxels": int(vox.num_voxels),
        "grid": list(vox.spatial_shape),
        "score_threshold": args.score_threshold,
        "timings": timings,
        "detections": detection_rows(dets, names),
        "ground_truth": None if gt_source is None else {
            "source": gt_source, "found": found,
            "boxes": [{"class": str(t), "box": [float(v) for v in b]} for b, t in zip(gt_boxes, gt_types)]},
        "image": args.output,
        "notes": notes,
    }
    err = None
    if args.check_dense:
        err = _dense_check(vox, args.seed)
        result["subm_vs_dense_max_abs_diff"] = err
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for n in notes:
            print(f"note: {n}", file=sys.stderr)
        t = timings
        crop = "range" + (" + camera FOV" if front else "")
        print(f"weights   {_weights_line(info)}")
        print(f"scan      {source}: {len(points):,} points, {len(pts):,} in the {crop} -> {vox.num_voxels:,} voxels "
              f"on {tuple(vox.spatial_shape)}")
        post = f"{t['postprocess_ms']:.0f} ms" if t["postprocess_ms"] is not None else "(in the network)"
        print(f"timing    voxelize {t['voxelize_ms']:.1f} ms, network {t['network_ms']:.0f} ms, post-processing "
              f"{post}, total {t['total_ms']:.0f} ms ({t['threads']} thread{'s' if t['threads'] != 1 else ''}"
              f"{', median of ' + str(t['repeats']) if t['repeats'] > 1 else ''})")
        print(f"detections: {len(dets['scores'])}")
        if len(dets["scores"]):
            print(f"  {'class':<12}{'score':>6}{'x':>9}{'y':>8}{'z':>7}{'dx':>7}{'dy':>6}{'dz':>6}{'yaw':>7}")
            for row in result["detections"]:
                x, y, z, dx, dy, dz, yaw = row["box"]
                print(f"  {row['class']:<12}{row['score']:>6.2f}{x:>9.2f}{y:>8.2f}{z:>7.2f}{dx:>7.2f}{dy:>6.2f}"
                      f"{dz:>6.2f}{yaw:>7.2f}")
        if found is not None:
            per = ", ".join(f"{c} {k}/{n}" for c, (k, n) in found["per_class"].items())
            print(f"truth     {len(gt_boxes)} boxes ({gt_source}); of the {', '.join(names)} ones "
                  f"{found['found']}/{found['gt']} found (same class, BEV IoU >= {found['iou']})"
                  + (f": {per}" if per else ""))
        print(f"image     wrote {args.output}")
        if err is not None:
            print(f"check     SubMConv3d vs dense conv3d on a 48x48 crop (float64): max |diff| = {err:.2e}")
    if err is not None and err > 1e-9:
        print("sparseconv demo: the sparse result differs from dense conv3d", file=sys.stderr, flush=True)
        return 1
    return 0
