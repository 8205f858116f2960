"""3D detection glue for the engine: config schema, datasets with augmentation, detector, KITTI evaluation.

Used by ``tools/train_det.py`` and ``tools/eval_det.py`` (see ``docs/training.md``). Detectors follow
the contract of :mod:`sparseconv.models` (``create_model(name, class_names=..., point_range=...,
voxel_size=..., in_channels=4, **args)``; training mode returns ``{"loss", "terms"}``, eval mode a
list of ``{"boxes" [K, 7], "scores" [K], "labels" [K] (1-based)}`` per scan, LiDAR frame).

Evaluation converts each frame to the records of :func:`sparseconv.metrics.kitti_eval`:

* ground truth from the label file as read (``sample["annos"]``, untouched by cropping): ``name``,
  ``truncated``, ``occluded``, ``bbox`` and ``boxes_lidar`` (the camera boxes converted with the
  frame's calibration, :func:`~sparseconv.datasets.camera_boxes_to_lidar`), followed by the
  ``DontCare`` regions (2D only);
* detections: ``name`` (``class_names[label - 1]``), ``score``, ``boxes_lidar`` and, with
  ``det_bbox`` (default), ``bbox``: the box projected into image 2 with ``P2`` and clipped to the
  image, exactly as the simulator computes the labels' 2D boxes
  (:func:`sparseconv.datasets.synthetic.lidar_boxes_to_kitti`). The devkit ignores detections whose
  2D box is lower than the difficulty's minimum height; without ``bbox`` every detection counts.

Example:
    >>> cfg = load_det_config("configs/second_synth.yaml", [("train.epochs", "1")])
    >>> model = build_detector(cfg)
    >>> loader = build_eval_loader(cfg, "val")
    >>> res = evaluate(model, loader, cfg["data"]["classes"])
    >>> print(res["table"])
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .common import (check_grid_config, create_configured_model, default_output_dir, epoch_evaluator,
                     geometric_augmentation, grid_collate_kwargs, load_weights, model_device, sharded_eval_loader,
                     speed_stats, synchronize)
from .config import REQUIRED, FreeForm, load_config
from .distributed import DistEnv, all_gather_objects, barrier
from .trainer import TRAIN_SCHEMA, to_device

__all__ = ["DET_SCHEMA", "load_det_config", "build_detector", "load_det_checkpoint", "build_det_dataset",
           "build_augmentation", "gt_database_path", "det_collate_fn", "build_train_set", "build_eval_loader",
           "gt_record", "detection_record", "kitti_prediction_lines", "evaluate", "evaluate_with_config",
           "make_det_evaluator", "summarize_result"]

#: Defaults and allowed keys of a detection experiment config.
DET_SCHEMA: Dict[str, Any] = {
    "model": {
        "name": REQUIRED,           # a name of sparseconv.models.list_models()
        "args": FreeForm(),         # extra constructor keyword arguments
        "imports": [],              # modules imported first (they may register models)
    },
    "data": {
        "root": REQUIRED,           # a KITTI-layout folder (sparseconv synth --out ...)
        "train_split": "train",
        "val_split": "val",
        "classes": ["Car", "Pedestrian", "Cyclist"],
        "point_range": [0.0, -40.0, -3.0, 70.4, 40.0, 1.0],
        "voxel_size": [0.1, 0.1, 0.2],
        "fov_only": True,
        "image_size": None,         # (width, height) for the FOV crop; null: image_2 or 1242 x 375
        "max_points_per_voxel": None,
        "gt_database": None,        # path; null: <root>/gt_database_<split>_<hash>.npz (built once)
        "augment": {
            "enabled": True,
            "gt_sampling": FreeForm({"Car": 15, "Pedestrian": 10, "Cyclist": 10}),  # null: off
            "gt_min_points": None,  # int or {class: int}; null: 5
            "flip_x": True,         # RandomFlip along x (y -> -y), p = 0.5
            "flip_y": False,
            "rotation": [-0.78539816, 0.78539816],  # GlobalRotation range (radians); null: off
            "scaling": [0.95, 1.05],                # GlobalScaling range; null: off
            "translation_std": None,                # GlobalTranslation std (x, y, z) metres; null: off
        },
    },
    "train": TRAIN_SCHEMA,
    "eval": {
        "every_epochs": 0,          # evaluate after every N-th epoch and the last (0: never while training)
        "batch_size": 1,
        "workers": 2,
        "limit": None,              # evaluate the first N frames only
        "overlap": "strict",        # strict (0.7 / 0.5 / 0.5) or lenient
        "sampling": "exact",        # exact or devkit (see sparseconv.metrics.kitti_eval)
        "recall_points": [40, 11],
        "det_bbox": True,           # give detections their 2D box (the devkit's height filter applies)
    },
    "output_dir": None,             # null: output/<config file name>
}


def load_det_config(path: str, overrides: Optional[Sequence] = None) -> Dict[str, Any]:
    """:func:`~sparseconv.engine.config.load_config` with :data:`DET_SCHEMA`, plus value checks.

    Raises:
        ConfigError: see ``load_config``; also a ``point_range`` / ``voxel_size`` of the wrong length
            or with ``min >= max`` / a non-positive size, or no classes.
    """
    from .config import ConfigError

    cfg = load_config(path, overrides, schema=DET_SCHEMA)
    d = cfg["data"]
    check_grid_config(d, path)
    if not d["classes"] or not all(isinstance(c, str) for c in d["classes"]):
        raise ConfigError(f"data.classes must be a non-empty list of class names, got {d['classes']} ({path})")
    default_output_dir(cfg, path)
    return cfg


# ----------------------------------------------------------------------------- model
def build_detector(cfg: Mapping[str, Any]) -> torch.nn.Module:
    """``sparseconv.models.create_model(model.name, class_names, point_range, voxel_size, in_channels=4,
    **model.args)`` after importing ``model.imports``."""
    d = cfg["data"]
    return create_configured_model(cfg, class_names=tuple(d["classes"]),
                                   point_range=tuple(float(v) for v in d["point_range"]),
                                   voxel_size=tuple(float(v) for v in d["voxel_size"]), in_channels=4)


def load_det_checkpoint(ckpt: str, config: Optional[str] = None, overrides: Optional[Sequence] = None
                        ) -> Tuple[Dict[str, Any], torch.nn.Module, Dict[str, Any], str]:
    """``(cfg, model, state, config_source)`` of a ``tools/train_det.py`` checkpoint: the experiment
    config ``config`` (None: the one stored in the checkpoint) with ``overrides`` ``[(key, value)]``
    (:func:`~sparseconv.engine.checkpoint.load_checkpoint_config`), and its detector with the
    checkpoint's weights, in eval mode.

    Raises:
        FileNotFoundError, ValueError: see :func:`~sparseconv.engine.checkpoint.load_checkpoint_config`;
            also weights that do not fit the config's detector (the message names both).

    Example:
        >>> cfg, model, state, source = load_det_checkpoint("output/second_synth/ckpt_e080_s00040800.pt")
    """
    from .checkpoint import load_checkpoint_config

    cfg, state, source = load_checkpoint_config(ckpt, config, overrides, load_det_config)
    model = load_weights(build_detector(cfg), state["model"], ckpt, cfg, source)
    model.eval()
    return cfg, model, state, source


# ----------------------------------------------------------------------------- data
def _kitti(cfg: Mapping[str, Any], split: str, transforms=None, seed=None):
    from sparseconv.datasets import KittiDetection

    d = cfg["data"]
    return KittiDetection(d["root"], split, classes=tuple(d["classes"]), fov_only=d["fov_only"],
                          point_range=tuple(d["point_range"]), transforms=transforms,
                          image_size=tuple(d["image_size"]) if d["image_size"] else None, seed=seed)


def _min_points(cfg: Mapping[str, Any]):
    v = cfg["data"]["augment"]["gt_min_points"]
    return 5 if v is None else (dict(v) if isinstance(v, Mapping) else int(v))


def gt_database_path(cfg: Mapping[str, Any]) -> str:
    """Where the GT database of the training split lives: ``data.gt_database``, or
    ``<root>/gt_database_<split>_<key>.npz`` with ``key`` a hash of what the database depends on
    (split, classes, FOV crop, point range, image size, minimum points)."""
    d = cfg["data"]
    if d["gt_database"]:
        return d["gt_database"]
    key = json.dumps([d["train_split"], list(d["classes"]), d["fov_only"], [float(v) for v in d["point_range"]],
                      d["image_size"], _min_points(cfg)], sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return os.path.join(d["root"], f"gt_database_{d['train_split']}_{digest}.npz")


def _gt_database(cfg: Mapping[str, Any], env: Optional[DistEnv]):
    """Loads the GT database, building it first (on rank 0, the others wait) when missing."""
    from sparseconv.datasets import GTDatabase

    path = gt_database_path(cfg)
    main = env is None or env.is_main
    if main and not os.path.isfile(path):
        print(f"building the GT database {path} (once)", flush=True)
        try:
            GTDatabase.build(_kitti(cfg, cfg["data"]["train_split"]), path, min_points=_min_points(cfg))
        except OSError as e:
            raise OSError(f"cannot write the GT database {path} ({e}); set data.gt_database to a writable "
                          f"path") from None
    barrier()
    return GTDatabase.load(path)


def build_augmentation(cfg: Mapping[str, Any], env: Optional[DistEnv] = None):
    """The training transforms of ``data.augment`` (a :class:`~sparseconv.datasets.Compose`) or None:
    GT sampling, random flip, global rotation, scaling and translation, in that order."""
    from sparseconv.datasets import Compose, GTSampler

    a = cfg["data"]["augment"]
    if not a["enabled"]:
        return None
    ts = []
    if a["gt_sampling"]:
        ts.append(GTSampler(_gt_database(cfg, env), {str(k): int(v) for k, v in a["gt_sampling"].items()}))
    ts += geometric_augmentation(a)
    return Compose(ts) if ts else None


def build_det_dataset(cfg: Mapping[str, Any], split: str, augment: bool = False, env: Optional[DistEnv] = None):
    """A :class:`~sparseconv.datasets.KittiDetection` of ``split`` (``"train"``, ``"val"``, ...), with the
    training augmentation (seeded by ``train.seed``) when ``augment``."""
    transforms = build_augmentation(cfg, env) if augment else None
    return _kitti(cfg, split, transforms, seed=int(cfg["train"]["seed"]))


def build_train_set(cfg: Mapping[str, Any], env: Optional[DistEnv] = None):
    """The augmented training split ``data.train_split``."""
    return build_det_dataset(cfg, cfg["data"]["train_split"], augment=True, env=env)


def det_collate_fn(cfg: Mapping[str, Any]):
    """``functools.partial(sparseconv.datasets.collate, voxel_size=..., point_range=..., max_points_per_voxel=...)``."""
    from sparseconv.datasets import collate

    return partial(collate, **grid_collate_kwargs(cfg))


def build_eval_loader(cfg: Mapping[str, Any], split: Optional[str] = None, env: Optional[DistEnv] = None,
                      limit: Optional[int] = None, batch_size: Optional[int] = None,
                      workers: Optional[int] = None) -> torch.utils.data.DataLoader:
    """The frames of ``split`` (default ``data.val_split``) without augmentation, in order, batched by
    :func:`det_collate_fn`: :func:`~sparseconv.engine.common.sharded_eval_loader` (each rank of a
    process group gets every ``world_size``-th frame; ``limit``, ``batch_size``, ``workers`` default to
    the ``eval`` settings)."""
    split = split or cfg["data"]["val_split"]
    return sharded_eval_loader(cfg, build_det_dataset(cfg, split), split, det_collate_fn(cfg), env=env, limit=limit,
                               batch_size=batch_size, workers=workers, unit="frames")


# ----------------------------------------------------------------------------- records
def _empty_labels() -> Dict[str, np.ndarray]:
    return {"name": np.zeros(0, str), "truncated": np.zeros(0), "occluded": np.zeros(0, np.int64),
            "bbox": np.zeros((0, 4))}


def gt_record(annos: Mapping[str, Any], calib: Mapping[str, np.ndarray],
              dontcare: Optional[Mapping[str, Any]] = None) -> Dict[str, np.ndarray]:
    """The :func:`~sparseconv.metrics.kitti_eval` ground truth of one frame from its label file.

    Args:
        annos: ``sample["annos"]`` of :class:`~sparseconv.datasets.KittiDetection` (camera frame,
            every object but DontCare).
        calib: the frame's calibration.
        dontcare: ``sample["dontcare"]``: appended after the objects (2D regions, no 3D box).

    Returns:
        ``{"name", "truncated", "occluded", "bbox", "boxes_lidar"}`` (``boxes_lidar`` for the objects only).
    """
    from sparseconv.datasets import camera_boxes_to_lidar

    dc = dontcare if dontcare is not None and len(dontcare.get("name", ())) else _empty_labels()
    n = len(annos["name"])
    boxes = camera_boxes_to_lidar(annos, calib) if n else np.zeros((0, 7))
    cat = lambda k: np.concatenate([np.asarray(annos[k]), np.asarray(dc[k])])  # noqa: E731
    return {"name": np.concatenate([np.asarray(annos["name"], str), np.asarray(dc["name"], str)]),
            "truncated": cat("truncated").astype(np.float64), "occluded": cat("occluded").astype(np.int64),
            "bbox": np.concatenate([np.asarray(annos["bbox"], np.float64).reshape(-1, 4),
                                    np.asarray(dc["bbox"], np.float64).reshape(-1, 4)]),
            "boxes_lidar": boxes}


def _check_prediction(pred: Any, b: int, num_classes: int) -> Dict[str, np.ndarray]:
    if not isinstance(pred, Mapping) or not {"boxes", "scores", "labels"} <= set(pred):
        raise TypeError(f"in eval mode the model must return, per scan, a dict with boxes, scores and labels; "
                        f"scan {b} got {type(pred).__name__} {sorted(pred) if isinstance(pred, Mapping) else ''}")
    boxes = pred["boxes"].detach().float().cpu().numpy().reshape(-1, 7).astype(np.float64)
    scores = pred["scores"].detach().float().cpu().numpy().reshape(-1).astype(np.float64)
    labels = pred["labels"].detach().cpu().numpy().reshape(-1).astype(np.int64)
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"scan {b}: {len(boxes)} boxes, {len(scores)} scores and {len(labels)} labels")
    if len(labels) and (labels.min() < 1 or labels.max() > num_classes):
        raise ValueError(f"scan {b}: labels must be 1..{num_classes} (1-based class indices), got "
                         f"{labels.min()}..{labels.max()}")
    return {"boxes": boxes, "scores": scores, "labels": labels}


def detection_record(pred: Mapping[str, np.ndarray], class_names: Sequence[str], calib: Mapping[str, np.ndarray],
                     image_size=None, det_bbox: bool = True) -> Dict[str, np.ndarray]:
    """The :func:`~sparseconv.metrics.kitti_eval` detections of one frame.

    Args:
        pred: ``boxes`` ``[K, 7]`` (LiDAR), ``scores`` ``[K]``, ``labels`` ``[K]`` (1-based), NumPy.
        class_names: names of the labels.
        calib: the frame's calibration (for the 2D boxes).
        image_size: ``(width, height)`` of image 2 (default 1242 x 375).
        det_bbox: add ``bbox`` (projection into image 2, clipped to the image).

    Returns:
        ``{"name", "score", "boxes_lidar"[, "bbox"]}``.
    """
    from sparseconv.datasets.kitti import KITTI_IMAGE_SIZE
    from sparseconv.datasets.synthetic import lidar_boxes_to_kitti

    names = np.asarray(class_names, dtype=object)[pred["labels"] - 1] if len(pred["labels"]) else np.zeros(0, str)
    rec = {"name": np.asarray(names, str), "score": pred["scores"], "boxes_lidar": pred["boxes"]}
    if det_bbox:
        size = tuple(image_size) if image_size is not None else KITTI_IMAGE_SIZE
        rec["bbox"] = lidar_boxes_to_kitti(pred["boxes"], calib, size)["bbox"] if len(pred["boxes"]) \
            else np.zeros((0, 4))
    return rec


def kitti_prediction_lines(pred: Mapping[str, np.ndarray], class_names: Sequence[str],
                           calib: Mapping[str, np.ndarray], image_size=None) -> List[str]:
    """KITTI ``label_2``-format result lines (with the score as 16th value) of one frame's detections:
    ``type -1 -1 alpha x1 y1 x2 y2 h w l x y z rotation_y score`` (camera frame, bottom centre)."""
    from sparseconv.datasets.kitti import KITTI_IMAGE_SIZE
    from sparseconv.datasets.synthetic import lidar_boxes_to_kitti

    if not len(pred["boxes"]):
        return []
    k = lidar_boxes_to_kitti(pred["boxes"], calib, tuple(image_size) if image_size is not None else KITTI_IMAGE_SIZE)
    lines = []
    for i, label in enumerate(pred["labels"]):
        h, w, l = k["dimensions"][i]
        x, y, z = k["location"][i]
        x0, y0, x1, y1 = k["bbox"][i]
        lines.append(f"{class_names[label - 1]} -1 -1 {k['alpha'][i]:.4f} {x0:.2f} {y0:.2f} {x1:.2f} {y1:.2f} "
                     f"{h:.4f} {w:.4f} {l:.4f} {x:.4f} {y:.4f} {z:.4f} {k['rotation_y'][i]:.4f} "
                     f"{pred['scores'][i]:.4f}")
    return lines


# ----------------------------------------------------------------------------- evaluation
def summarize_result(result: Mapping[str, Any]) -> Dict[str, float]:
    """Flat ``{"Car/3d_R40_moderate": AP, ..., "mAP/3d_R40_moderate": mean}`` of a ``kitti_eval`` result
    (the mean over the classes with ground truth)."""
    flat: Dict[str, float] = {}
    per_key: Dict[str, List[float]] = {}
    for cls, res in result.items():
        for m in ("bev", "3d"):
            for rk, row in (res.get(m) or {}).items():
                for diff, ap in row.items():
                    key = f"{m}_{rk}_{diff}"
                    flat[f"{cls}/{key}"] = float(ap)
                    if not math.isnan(ap):
                        per_key.setdefault(key, []).append(float(ap))
    for key, vals in per_key.items():
        flat[f"mAP/{key}"] = float(np.mean(vals))
    return flat


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, class_names: Sequence[str], device: Optional[torch.device] = None,
             overlap: Any = "strict", sampling: str = "exact", recall_points: Sequence[int] = (40, 11),
             det_bbox: bool = True, progress: bool = False, save_dir: Optional[str] = None,
             env: Optional[DistEnv] = None) -> Optional[Dict[str, Any]]:
    """Runs a detector over a loader and computes KITTI AP.

    Args:
        model: the detector (put in eval mode here).
        loader: batches of :func:`~sparseconv.datasets.collate` over unaugmented
            :class:`~sparseconv.datasets.KittiDetection` samples (``annos``, ``dontcare``, ``calib``,
            ``frame_id``, ``image_size`` kept), e.g. :func:`build_eval_loader`.
        class_names: the detector's classes (labels are 1-based into them).
        device: where to run (default: the model's).
        overlap, sampling, recall_points: passed to :func:`~sparseconv.metrics.kitti_eval`.
        det_bbox: give detections their projected 2D box (see the module docs).
        progress: a tqdm bar.
        save_dir: also write KITTI-format result files ``<frame_id>.txt`` there.
        env: in a process group, every rank evaluates its shard and rank 0 gathers the frames.

    Returns:
        On rank 0: ``{"result": kitti_eval result, "table": format_kitti_table text, "summary":
        :func:`summarize_result`, "frames": n, "detections": n, "ms_per_scan": median model time per
        scan (forward and post-processing, data loading and voxelization excluded; the first batch
        is left out as warm-up when there are more than two), "threads": torch threads, "device",
        "batch_size"}``; None on the other ranks.
    """
    from sparseconv.metrics import format_kitti_table, kitti_eval
    from tqdm import tqdm

    env = env or DistEnv()
    device = model_device(model, device)
    was_training = model.training
    model.eval()
    frames, times = [], []
    if save_dir is not None:
        os.makedirs(save_dir, exist_ok=True)
    try:
        for batch in tqdm(loader, desc="eval", disable=not (progress and env.is_main), leave=False, dynamic_ncols=True):
            inputs = to_device(batch, device)
            synchronize(device)
            t0 = time.perf_counter()
            preds = model(inputs)
            synchronize(device)
            dt = time.perf_counter() - t0
            bsz = int(batch["batch_size"])
            times.append((dt / bsz, bsz))
            if not isinstance(preds, (list, tuple)) or len(preds) != bsz:
                got = f"{type(preds).__name__}" + (f" of {len(preds)}" if hasattr(preds, "__len__") else "")
                raise TypeError(f"in eval mode the model must return a list of {bsz} per-scan dicts, got {got}")
            for b in range(bsz):
                pred = _check_prediction(preds[b], b, len(class_names))
                calib, size = batch["calib"][b], batch["image_size"][b]
                gt = gt_record(batch["annos"][b], calib, batch.get("dontcare", [None] * bsz)[b])
                det = detection_record(pred, class_names, calib, size, det_bbox)
                frames.append((str(batch["frame_id"][b]), gt, det))
                if save_dir is not None:
                    from sparseconv.io import atomic_write

                    with atomic_write(os.path.join(save_dir, f"{batch['frame_id'][b]}.txt"), "w",
                                      encoding="utf-8") as f:
                        f.write("".join(line + "\n" for line in kitti_prediction_lines(pred, class_names, calib,
                                                                                        size)))
    finally:
        model.train(was_training)
    gathered = all_gather_objects((frames, times))
    if not env.is_main:
        return None
    frames = sorted((f for fs, _ in gathered for f in fs), key=lambda f: f[0])
    times = [t for _, ts in gathered for t in ts]
    result = kitti_eval([f[1] for f in frames], [f[2] for f in frames], classes=tuple(class_names),
                        recall_points=tuple(recall_points), overlap=overlap, sampling=sampling)
    return {
        "result": result,
        "table": format_kitti_table(result),
        "summary": summarize_result(result),
        "frames": len(frames),
        "detections": int(sum(len(f[2]["name"]) for f in frames)),
        **speed_stats(times, device),
    }


def evaluate_with_config(model: torch.nn.Module, loader, cfg: Mapping[str, Any],
                         device: Optional[torch.device] = None, progress: bool = False, save_dir: Optional[str] = None,
                         env: Optional[DistEnv] = None) -> Optional[Dict[str, Any]]:
    """:func:`evaluate` with the classes ``data.classes`` and the ``eval`` settings (``overlap``,
    ``sampling``, ``recall_points``, ``det_bbox``) of ``cfg``."""
    e = cfg["eval"]
    return evaluate(model, loader, cfg["data"]["classes"], device=device, overlap=e["overlap"], sampling=e["sampling"],
                    recall_points=e["recall_points"], det_bbox=e["det_bbox"], progress=progress, save_dir=save_dir,
                    env=env)


def make_det_evaluator(cfg: Mapping[str, Any], env: Optional[DistEnv] = None, progress: bool = True):
    """``evaluate_fn(model, epoch)`` for :class:`~sparseconv.engine.trainer.Trainer`: evaluates on
    ``data.val_split`` with the ``eval`` settings, prints the table on rank 0 and returns the flat
    summary (with ``epoch``, ``ms_per_scan``, ``frames``) or None on the other ranks."""
    return epoch_evaluator(
        lambda: build_eval_loader(cfg, env=env),
        lambda model, loader: evaluate_with_config(model, loader, cfg, device=(env or DistEnv()).device,
                                                   progress=progress, env=env),
        "frames",
        lambda out, epoch: {"epoch": epoch, "frames": out["frames"], "ms_per_scan": out["ms_per_scan"],
                            **out["summary"]})
