"""Semantic-segmentation glue for the engine: config schema, SemanticKITTI data, loss wrapper, mIoU evaluation.

Used by ``tools/train_seg.py``, ``tools/eval_seg.py`` and ``sparseconv segment`` (see the "Training
and evaluation" section of ``docs/segmentation.md``). The networks are those of
:mod:`sparseconv.models.segmentation` (``minkunet18``, ``minkunet34``, ``sparse_unet_attn``, ...):
``create_model(name, in_channels=4, num_classes=data.num_classes, **model.args)`` gives per-voxel
logits; :class:`SegmentationModel` wraps such a network into the trainer's contract.

Choices:

* **Targets per voxel.** :func:`seg_collate` voxelizes the batch (:func:`sparseconv.datasets.collate`,
  mean of x, y, z, intensity per voxel) and gives each voxel the majority label of its points
  (:func:`~sparseconv.models.segmentation.voxel_labels_from_points`: ignored points do not vote, ties
  go to the smallest id, a voxel without a voting point is ignored). The loss is the (weighted)
  cross-entropy over the labelled voxels plus ``loss.lovasz`` x Lovász-softmax, on voxels: one term
  per voxel, not per point, so dense near-range voxels do not dominate. Computing the voxel labels
  in ``collate`` runs it in the data-loading workers.
* **Predictions per point.** Each point takes its voxel's arg-max class over the channels
  ``1 .. num_classes - 1`` (channel 0, *ignore*, is never a target and never predicted). Points that
  fall outside ``data.point_range`` have no voxel: they get the ignore label 0 and are **left out of
  every metric** (their fraction is reported as ``points_outside_range``).
* **mIoU over the classes that exist.** ``data.eval_classes`` lists the training ids averaged into
  the mIoU (default: every id ``1 .. num_classes - 1``). The simulator writes 14 of SemanticKITTI's
  19 classes (:data:`SYNTH_TRAIN_IDS`); its configs list them, so classes that cannot occur do not
  count as 0. The confusion matrix is over all ``num_classes`` classes: a point of an evaluated class
  predicted as any other class (simulated or not) is a miss.
* **Class weights** (``loss.class_weights``): ``null`` / ``"none"``, ``"inv_sqrt_freq"``
  (:func:`class_weights_from_counts` of the voxel-label counts of the unaugmented training split,
  computed once and cached as JSON, :func:`class_weights_path`) or an explicit list of
  ``num_classes`` numbers.

Example:
    >>> cfg = load_seg_config("configs/minkunet_synth.yaml", [("train.epochs", "1")])
    >>> model = build_segmenter(cfg)                   # SegmentationModel(net=MinkUNet)
    >>> loader = build_eval_loader(cfg, "val")
    >>> res = evaluate(model, loader, cfg["data"]["eval_classes"])
    >>> res["miou"], res["iou"]["car"]
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .common import (check_grid_config, create_configured_model, default_output_dir, epoch_evaluator,
                     geometric_augmentation, grid_collate_kwargs, load_weights, model_device, sharded_eval_loader,
                     speed_stats, synchronize)
from .config import REQUIRED, ConfigError, FreeForm, load_config
from .distributed import DistEnv, all_gather_objects, barrier
from .trainer import TRAIN_SCHEMA, to_device

__all__ = ["SEG_SCHEMA", "SYNTH_TRAIN_IDS", "SEMANTIC_KITTI_COLORS_BGR", "load_seg_config", "build_network",
           "build_segmenter", "SegmentationModel", "load_seg_checkpoint", "split_sequences", "build_seg_dataset",
           "build_augmentation", "build_train_set", "seg_collate", "seg_collate_fn", "class_counts",
           "class_weights_from_counts", "class_weights_path", "resolve_class_weights", "build_eval_loader",
           "predict_voxels", "segment_points", "class_names_for", "activation_layers", "sparsity_report",
           "evaluate", "evaluate_with_config", "make_seg_evaluator", "format_iou_table", "raw_label_colors"]


def _synth_train_ids() -> List[int]:
    from sparseconv.datasets.semantic_kitti import LEARNING_MAP
    from sparseconv.datasets.synthetic import SEMANTIC_IDS

    return sorted({LEARNING_MAP[raw] for raw in SEMANTIC_IDS.values()} - {0})


#: Training ids of the classes the LiDAR simulator writes (its raw ids 10, 18, 30, 31, 40, 44, 48, 50,
#: 51, 70, 71, 72, 80, 81 through the learning map): car 1, truck 4, person 6, bicyclist 7, road 9,
#: parking 10, sidewalk 11, building 13, fence 14, vegetation 15, trunk 16, terrain 17, pole 18,
#: traffic-sign 19. Bicycle, motorcycle, other-vehicle, motorcyclist and other-ground never occur.
SYNTH_TRAIN_IDS: Tuple[int, ...] = tuple(_synth_train_ids())

#: The official SemanticKITTI colours (``color_map`` of ``semantic-kitti.yaml``, **BGR**) by raw id.
SEMANTIC_KITTI_COLORS_BGR: Dict[int, Tuple[int, int, int]] = {
    0: (0, 0, 0), 1: (0, 0, 255), 10: (245, 150, 100), 11: (245, 230, 100), 13: (250, 80, 100),
    15: (150, 60, 30), 16: (255, 0, 0), 18: (180, 30, 80), 20: (255, 0, 0), 30: (30, 30, 255),
    31: (200, 40, 255), 32: (90, 30, 150), 40: (255, 0, 255), 44: (255, 150, 255), 48: (75, 0, 75),
    49: (75, 0, 175), 50: (0, 200, 255), 51: (50, 120, 255), 52: (0, 150, 255), 60: (170, 255, 150),
    70: (0, 175, 0), 71: (0, 60, 135), 72: (80, 240, 150), 80: (150, 240, 255), 81: (0, 0, 255),
    99: (255, 255, 50), 252: (245, 150, 100), 253: (200, 40, 255), 254: (30, 30, 255), 255: (90, 30, 150),
    256: (255, 0, 0), 257: (250, 80, 100), 258: (180, 30, 80), 259: (255, 0, 0),
}  # fmt: skip

#: Defaults and allowed keys of a segmentation experiment config.
SEG_SCHEMA: Dict[str, Any] = {
    "model": {
        "name": REQUIRED,           # a name of sparseconv.models.list_models() (minkunet18, sparse_unet_attn, ...)
        "args": FreeForm(),         # extra constructor keyword arguments (width, up, window, ...)
        "imports": [],              # modules imported first (they may register models)
    },
    "data": {
        "root": REQUIRED,           # a SemanticKITTI-layout folder (root/sequences/NN/{velodyne,labels})
        "train_split": "train",
        "val_split": "val",
        "splits": FreeForm(),       # split name -> sequences, e.g. {train: ["00"], val: ["08"]}; else the official
        "num_classes": 20,          # network outputs; channel i = training id i (0 = ignore)
        "eval_classes": None,       # training ids averaged into the mIoU; null: 1 .. num_classes - 1
        "point_range": [-51.2, -51.2, -4.0, 51.2, 51.2, 2.4],
        "voxel_size": [0.2, 0.2, 0.2],
        "max_points_per_voxel": None,
        "augment": {
            "enabled": True,
            "flip_x": True,         # RandomFlip along x (y -> -y), p = 0.5
            "flip_y": True,         # RandomFlip along y (x -> -x), p = 0.5
            "rotation": [-3.14159265, 3.14159265],  # GlobalRotation range (radians); null: off
            "scaling": [0.95, 1.05],                # GlobalScaling range; null: off
            "translation_std": None,                # GlobalTranslation std (x, y, z) metres; null: off
            "point_dropout": None,                  # RandomPointDropout rate; null: off
        },
    },
    "loss": {
        "lovasz": 0.0,              # weight of the Lovász-softmax term (0: cross-entropy only)
        "class_weights": None,      # null / "none", "inv_sqrt_freq", or a list of num_classes weights
        "class_weights_cache": None,  # path; null: <root>/seg_class_weights_<key>.json
        "label_smoothing": 0.0,
    },
    "train": TRAIN_SCHEMA,
    "eval": {
        "every_epochs": 0,          # evaluate after every N-th epoch and the last (0: never while training)
        "batch_size": 1,            # 1: per-scan latency
        "workers": 2,
        "limit": None,              # evaluate the first N scans only
        "sparsity_scans": 4,        # per-layer activation sparsity on this many scans (0: off)
    },
    "output_dir": None,             # null: output/<config file name>
}

_WEIGHT_MODES = ("none", "inv_sqrt_freq")


def load_seg_config(path: str, overrides: Optional[Sequence] = None) -> Dict[str, Any]:
    """:func:`~sparseconv.engine.config.load_config` with :data:`SEG_SCHEMA`, plus value checks.

    ``data.eval_classes`` is filled in (``1 .. num_classes - 1`` when null) and ``output_dir``
    defaults to ``output/<config file name>``.

    Raises:
        ConfigError: see ``load_config``; also a bad ``point_range`` / ``voxel_size``, ``num_classes``
            < 2, ``eval_classes`` outside ``[1, num_classes)``, an unknown ``loss.class_weights`` mode
            or a weight list of the wrong length, a negative ``loss.lovasz``, a split of ``data.splits``
            that is not a list of sequences.
    """
    cfg = load_config(path, overrides, schema=SEG_SCHEMA)
    d, lo = cfg["data"], cfg["loss"]
    check_grid_config(d, path)
    c = d["num_classes"]
    if c < 2:
        raise ConfigError(f"data.num_classes must be >= 2 (channel 0 is ignore), got {c} ({path})")
    if d["eval_classes"] is None:
        d["eval_classes"] = list(range(1, c))
    ev = d["eval_classes"]
    if not isinstance(ev, list) or not ev or not all(isinstance(k, int) and not isinstance(k, bool) and 1 <= k < c
                                                      for k in ev) or len(set(ev)) != len(ev):
        raise ConfigError(f"data.eval_classes must be distinct training ids in [1, {c}), got {ev!r} ({path})")
    for name, seqs in (d["splits"] or {}).items():
        if not isinstance(seqs, list) or not seqs:
            raise ConfigError(f"data.splits.{name} must be a non-empty list of sequences, got {seqs!r} ({path})")
    w = lo["class_weights"]
    if isinstance(w, str):
        if w not in _WEIGHT_MODES:
            raise ConfigError(f"loss.class_weights must be null, {' or '.join(map(repr, _WEIGHT_MODES))} or a "
                              f"list of {c} numbers, got {w!r} ({path})")
    elif w is not None:
        if not isinstance(w, list) or len(w) != c or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                             and v >= 0 for v in w):
            raise ConfigError(f"loss.class_weights must be a list of {c} non-negative numbers (one per class), "
                              f"got {w!r} ({path})")
    if lo["lovasz"] < 0:
        raise ConfigError(f"loss.lovasz must be >= 0, got {lo['lovasz']} ({path})")
    default_output_dir(cfg, path)
    return cfg


# ----------------------------------------------------------------------------- model
def build_network(cfg: Mapping[str, Any]) -> torch.nn.Module:
    """``sparseconv.models.create_model(model.name, in_channels=4, num_classes=data.num_classes,
    **model.args)`` after importing ``model.imports``: the bare network (per-voxel logits)."""
    return create_configured_model(cfg, in_channels=4, num_classes=int(cfg["data"]["num_classes"]))


class SegmentationModel(torch.nn.Module):
    """A per-voxel segmentation network with its training loss, in the trainer's contract.

    * training mode: ``forward(batch)`` (a :func:`seg_collate` batch) returns ``{"loss", "terms"}``:
      ``loss = CE(logits, voxel_labels; class_weights, ignore 0) + lovasz * Lovász-softmax``; the
      terms are ``ce``, ``lovasz`` (when its weight is > 0) and ``voxel_acc`` (accuracy on the
      labelled voxels, no gradient);
    * eval mode: ``forward(batch)`` (a batch dict or a :class:`~sparseconv.SparseTensor`) returns the
      logits, a SparseTensor ``[V, num_classes]`` on the sites of the voxels.

    The class weights are a non-persistent buffer: checkpoints hold the network's weights only (keys
    ``net.*``).

    Args:
        net: a network of :mod:`sparseconv.models.segmentation` (SparseTensor -> SparseTensor logits).
        class_weights: ``[num_classes]`` or None.
        lovasz: weight of the Lovász-softmax term.
        label_smoothing: passed to the cross-entropy.

    Example:
        >>> model = SegmentationModel(create_model("minkunet18", num_classes=20, width=0.5), lovasz=1.0)
        >>> out = model(seg_collate(samples, (0.2,) * 3, pr))
        >>> out["loss"].backward()
    """

    def __init__(self, net: torch.nn.Module, class_weights: Optional[torch.Tensor] = None, lovasz: float = 0.0,
                 label_smoothing: float = 0.0):
        super().__init__()
        if lovasz < 0:
            raise ValueError(f"lovasz must be >= 0, got {lovasz}")
        self.net = net
        self.lovasz = float(lovasz)
        self.label_smoothing = float(label_smoothing)
        self.register_buffer("class_weights", None if class_weights is None
                             else torch.as_tensor(class_weights, dtype=torch.float32).clone(), persistent=False)

    def extra_repr(self) -> str:
        return f"lovasz={self.lovasz}, class_weights={'yes' if self.class_weights is not None else 'no'}"

    def forward(self, batch: Any):
        from sparseconv import SparseTensor

        x = batch if isinstance(batch, SparseTensor) else batch["voxels"]
        logits = self.net(x)
        if not self.training:
            return logits
        from sparseconv.models.segmentation import lovasz_softmax, segmentation_loss

        if not isinstance(batch, Mapping) or "voxel_labels" not in batch:
            raise TypeError("in training mode SegmentationModel needs a seg_collate batch (with 'voxel_labels')")
        f = logits.features.float()
        y = batch["voxel_labels"]
        ce = segmentation_loss(f, y, class_weights=self.class_weights, ignore_index=0,
                               label_smoothing=self.label_smoothing)
        terms = {"ce": ce.detach()}
        loss = ce
        if self.lovasz:
            lz = lovasz_softmax(torch.softmax(f, 1), y, ignore_index=0)
            loss = loss + self.lovasz * lz
            terms["lovasz"] = lz.detach()
        with torch.no_grad():
            keep = y > 0
            terms["voxel_acc"] = ((predict_voxels(f) == y) & keep).sum().float() / keep.sum().clamp_min(1).float()
        return {"loss": loss, "terms": terms}


def build_segmenter(cfg: Mapping[str, Any], class_weights: Optional[torch.Tensor] = None) -> SegmentationModel:
    """:class:`SegmentationModel` of :func:`build_network` with ``loss.lovasz`` / ``label_smoothing`` and the
    given class weights (see :func:`resolve_class_weights`)."""
    lo = cfg["loss"]
    return SegmentationModel(build_network(cfg), class_weights, lovasz=float(lo["lovasz"]),
                             label_smoothing=float(lo["label_smoothing"]))


def shipped_seg_weights() -> List[str]:
    """The shipped segmentation weights (``sparseconv/models/weights/seg/*.pt``, written by ``tools/export_seg.py``),
    best first: by the mIoU recorded in their provenance (files without one last), then by name."""
    import glob

    from ..models.pretrained import WEIGHTS_DIR

    files = sorted(glob.glob(os.path.join(glob.escape(os.path.join(WEIGHTS_DIR, "seg")), "*.pt")))

    def miou(path: str) -> float:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
            value = ((state.get("provenance") or {}).get("metrics") or {}).get("miou")
            return float(value) if value is not None else -1.0
        except Exception:  # unreadable: last
            return -2.0

    return sorted(files, key=lambda p: -miou(p))


def load_seg_checkpoint(ckpt: str, config: Optional[str] = None, overrides: Optional[Sequence] = None
                        ) -> Tuple[Dict[str, Any], SegmentationModel, Dict[str, Any], str]:
    """Loads a training checkpoint of ``tools/train_seg.py`` into a :class:`SegmentationModel` (eval mode).

    Args:
        ckpt: the checkpoint.
        config: the experiment YAML; None: the config stored in the checkpoint.
        overrides: ``[(key, value)]`` applied to the config.

    Returns:
        ``(cfg, model, state, config_source)``.

    Raises:
        FileNotFoundError, ValueError: no such file / not a checkpoint (``load_checkpoint``), no
            ``model`` entry, no stored config and none given, or weights that do not fit the config's
            network (the message names both).
    """
    from .checkpoint import load_checkpoint_config

    cfg, state, source = load_checkpoint_config(ckpt, config, overrides, load_seg_config)
    weights = state["model"]
    if not any(k.startswith("net.") for k in weights):  # a bare network's state dict
        weights = {f"net.{k}": v for k, v in weights.items()}
    model = load_weights(build_segmenter(cfg), weights, ckpt, cfg, source)
    model.eval()
    return cfg, model, state, source


# ----------------------------------------------------------------------------- data
_SEQ_LIST = re.compile(r"^\d+(,\d+)*$")


def split_sequences(cfg: Mapping[str, Any], split: str) -> Optional[List[str]]:
    """The sequences of ``split``: ``data.splits[split]`` when given, the sequences themselves when
    ``split`` is a comma-separated list of numbers (``"08"``, ``"0,1"``), else None (the official
    SemanticKITTI split of that name)."""
    splits = cfg["data"]["splits"] or {}
    if split in splits:
        return [str(s) for s in splits[split]]
    if _SEQ_LIST.match(str(split)):
        return str(split).split(",")
    return None


def build_augmentation(cfg: Mapping[str, Any]):
    """The training transforms of ``data.augment`` (a :class:`~sparseconv.datasets.Compose`) or None:
    random flips, global rotation, scaling, translation and point dropout, in that order. Every one
    moves (or drops) the points with their ``labels`` / ``instance``; samples have no boxes."""
    from sparseconv.datasets import Compose, RandomPointDropout

    a = cfg["data"]["augment"]
    if not a["enabled"]:
        return None
    ts = geometric_augmentation(a)
    if a["point_dropout"]:
        ts.append(RandomPointDropout(float(a["point_dropout"])))
    return Compose(ts) if ts else None


def build_seg_dataset(cfg: Mapping[str, Any], split: str, augment: bool = False):
    """A :class:`~sparseconv.datasets.SemanticKitti` of ``split`` (a name of ``data.splits``, an official
    split, or sequence numbers), with the training augmentation (seeded by ``train.seed``) when ``augment``."""
    from sparseconv.datasets import SemanticKitti

    seqs = split_sequences(cfg, split)
    return SemanticKitti(cfg["data"]["root"], split=split if seqs is None else "custom", sequences=seqs,
                         transforms=build_augmentation(cfg) if augment else None, seed=int(cfg["train"]["seed"]))


def build_train_set(cfg: Mapping[str, Any]):
    """The augmented training split ``data.train_split``."""
    return build_seg_dataset(cfg, cfg["data"]["train_split"], augment=True)


def seg_collate(samples: Sequence[Mapping[str, Any]], voxel_size: Sequence[float], point_range: Sequence[float],
                max_points_per_voxel: Optional[int] = None) -> Dict[str, Any]:
    """:func:`sparseconv.datasets.collate` plus ``voxel_labels`` (int64 ``[V]``, majority vote of each
    voxel's points, 0 = ignore) when the samples have ``labels``.

    Example:
        >>> batch = seg_collate([ds[0], ds[1]], (0.2, 0.2, 0.2), (-51.2, -51.2, -4, 51.2, 51.2, 2.4))
        >>> batch["voxels"].num_voxels == len(batch["voxel_labels"])
        True
    """
    from sparseconv.datasets import collate
    from sparseconv.models.segmentation import voxel_labels_from_points

    out = collate(samples, voxel_size=voxel_size, point_range=point_range, max_points_per_voxel=max_points_per_voxel)
    if "labels" in out:
        out["voxel_labels"] = voxel_labels_from_points(out["labels"], out["point_to_voxel"],
                                                       out["voxels"].num_voxels, ignore_index=0)
    return out


def seg_collate_fn(cfg: Mapping[str, Any]):
    """``functools.partial(seg_collate, voxel_size=..., point_range=..., max_points_per_voxel=...)`` (picklable)."""
    return partial(seg_collate, **grid_collate_kwargs(cfg))


# ----------------------------------------------------------------------------- class weights
def class_counts(dataset, collate_fn, num_classes: int, workers: int = 0, batch_size: int = 4) -> np.ndarray:
    """Voxel-label counts ``[num_classes]`` (int64) over a dataset (index 0: ignored voxels).

    Args:
        dataset: samples with ``labels`` (use an unaugmented one).
        collate_fn: :func:`seg_collate` with the training voxel size and range.
        num_classes: ``C``; a voxel label ``>= C`` is an error.
        workers, batch_size: of the DataLoader.

    Raises:
        ValueError: a sample without labels, or a label ``>= num_classes``.
    """
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=collate_fn)
    counts = np.zeros(num_classes, np.int64)
    for batch in loader:
        if "voxel_labels" not in batch:
            raise ValueError("class_counts needs labelled samples (a sequence without labels/?)")
        y = batch["voxel_labels"].numpy()
        if y.size and y.max() >= num_classes:
            raise ValueError(f"voxel label {int(y.max())} >= num_classes={num_classes}")
        counts += np.bincount(y, minlength=num_classes)
    return counts


def class_weights_from_counts(counts: Sequence[int]) -> np.ndarray:
    """Inverse square root of the class frequencies, normalised to mean 1 over the classes present.

    ``f_c = n_c / sum_{k >= 1} n_k`` and ``w_c = f_c^(-1/2) / mean_{k >= 1, n_k > 0} f_k^(-1/2)`` for
    ``c >= 1`` with ``n_c > 0``; ``w_c = 0`` for absent classes and for class 0 (ignore: never a target).

    Example:
        >>> class_weights_from_counts([5, 1, 4, 0]).round(4).tolist()   # f = 0.2, 0.8: 1/sqrt = 2.236, 1.118
        [0.0, 1.3333, 0.6667, 0.0]
    """
    n = np.asarray(counts, np.float64)
    if n.ndim != 1 or len(n) < 2 or (n < 0).any():
        raise ValueError(f"counts must be [C >= 2] non-negative numbers, got {counts!r}")
    w = np.zeros_like(n)
    total = n[1:].sum()
    if total <= 0:
        raise ValueError("class_weights_from_counts: no labelled element (every count of classes >= 1 is 0)")
    present = np.flatnonzero(n > 0)
    present = present[present >= 1]
    w[present] = 1.0 / np.sqrt(n[present] / total)
    w[present] /= w[present].mean()
    return w


def class_weights_path(cfg: Mapping[str, Any]) -> str:
    """Where the class-weight cache lives: ``loss.class_weights_cache``, or
    ``<root>/seg_class_weights_<key>.json`` with ``key`` a hash of what the counts depend on (the
    training sequences, the number of classes, voxel size, point range, points per voxel)."""
    d = cfg["data"]
    if cfg["loss"]["class_weights_cache"]:
        return cfg["loss"]["class_weights_cache"]
    seqs = split_sequences(cfg, d["train_split"]) or d["train_split"]
    key = json.dumps([seqs, int(d["num_classes"]), [float(v) for v in d["voxel_size"]],
                      [float(v) for v in d["point_range"]], d["max_points_per_voxel"]], sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return os.path.join(d["root"], f"seg_class_weights_{digest}.json")


def resolve_class_weights(cfg: Mapping[str, Any], env: Optional[DistEnv] = None,
                          log=print) -> Optional[torch.Tensor]:
    """The class weights of ``loss.class_weights``: None, the given list, or the inverse square root of
    the voxel-label frequencies of the unaugmented training split, read from the cache
    (:func:`class_weights_path`) or counted (on rank 0, the others wait) and cached atomically. A
    cache counted over another number of training scans (a dataset that has grown) is recounted.

    Raises:
        OSError: the cache cannot be written (set ``loss.class_weights_cache`` to a writable path).
    """
    from sparseconv.io import atomic_write

    w = cfg["loss"]["class_weights"]
    c = int(cfg["data"]["num_classes"])
    if w is None or w == "none":
        return None
    if isinstance(w, list):
        return torch.tensor([float(v) for v in w], dtype=torch.float32)
    path = class_weights_path(cfg)
    main = env is None or env.is_main
    if main:
        ds = build_seg_dataset(cfg, cfg["data"]["train_split"])
        stale = False
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    stale = json.load(f).get("scans") != len(ds)
            except (OSError, ValueError):
                stale = True
            if stale:
                log(f"{path} was counted over another number of training scans: recounting")
    if main and (stale or not os.path.isfile(path)):
        t0 = time.perf_counter()
        log(f"counting voxel labels of {len(ds)} training scans for the class weights (once; cached in {path})")
        counts = class_counts(ds, seg_collate_fn(cfg), c, workers=int(cfg["train"]["workers"]))
        weights = class_weights_from_counts(counts)
        try:
            with atomic_write(path, "w", encoding="utf-8") as f:
                json.dump({"counts": counts.tolist(), "weights": weights.tolist(), "scans": len(ds),
                           "mode": "inv_sqrt_freq", "seconds": time.perf_counter() - t0}, f, indent=1)
        except OSError as e:
            raise OSError(f"cannot write the class-weight cache {path} ({e}); set loss.class_weights_cache to a "
                          f"writable path") from None
    barrier()
    with open(path, encoding="utf-8") as f:
        cached = json.load(f)
    weights = cached.get("weights")
    if not isinstance(weights, list) or len(weights) != c:
        raise ValueError(f"{path}: not a class-weight cache for {c} classes; delete it to recount")
    return torch.tensor(weights, dtype=torch.float32)


# ----------------------------------------------------------------------------- evaluation
def build_eval_loader(cfg: Mapping[str, Any], split: Optional[str] = None, env: Optional[DistEnv] = None,
                      limit: Optional[int] = None, batch_size: Optional[int] = None,
                      workers: Optional[int] = None) -> torch.utils.data.DataLoader:
    """The labelled scans of ``split`` (a name of ``data.splits``, an official split or sequence numbers;
    default ``data.val_split``) without augmentation, in order, with per-voxel labels
    (:func:`seg_collate_fn`): :func:`~sparseconv.engine.common.sharded_eval_loader` (each rank of a
    process group gets every ``world_size``-th scan; ``limit``, ``batch_size``, ``workers`` default to
    the ``eval`` settings)."""
    split = split or cfg["data"]["val_split"]
    return sharded_eval_loader(cfg, build_seg_dataset(cfg, split), split, seg_collate_fn(cfg), env=env, limit=limit,
                               batch_size=batch_size, workers=workers, unit="scans")


def predict_voxels(logits: Any) -> torch.Tensor:
    """Arg-max class ``[V]`` (int64) over the channels ``1 .. C - 1`` (channel 0, *ignore*, is never
    predicted) of ``[V, C]`` logits or a SparseTensor of them."""
    f = logits.features if hasattr(logits, "features") else logits
    if f.dim() != 2 or f.shape[1] < 2:
        raise ValueError(f"logits must be [V, C >= 2], got {tuple(f.shape)}")
    return f[:, 1:].argmax(1) + 1


@torch.no_grad()
def segment_points(model: torch.nn.Module, points: Union[np.ndarray, torch.Tensor], voxel_size: Sequence[float],
                   point_range: Sequence[float], device: Optional[torch.device] = None,
                   max_points_per_voxel: Optional[int] = None) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Training ids of the points of one scan.

    Args:
        model: a :class:`SegmentationModel` or a bare network (SparseTensor -> logits), in eval mode.
        points: ``[N, 4]`` x, y, z, intensity.
        voxel_size, point_range: the training grid.
        device: where to run (default: the model's).

    Returns:
        ``(labels, info)``: int64 ``[N]`` training ids, 0 for points outside ``point_range`` (or
        non-finite) that have no voxel; ``info`` holds ``voxels``, ``outside`` (points without a
        voxel) and ``seconds`` (network, arg-max and projection; voxelization excluded).
    """
    from sparseconv.datasets import collate
    from sparseconv.models.segmentation import voxel_to_point_labels

    pts = np.asarray(points, np.float32)
    if pts.ndim != 2 or pts.shape[1] != 4:
        raise ValueError(f"points must be [N, 4] (x, y, z, intensity), got shape {pts.shape}")
    device = model_device(model, device)
    batch = collate([{"points": pts}], voxel_size=voxel_size, point_range=point_range,
                    max_points_per_voxel=max_points_per_voxel)
    p2v = batch["point_to_voxel"]
    x = batch["voxels"]
    if x.num_voxels == 0:
        return np.zeros(len(pts), np.int64), {"voxels": 0, "outside": len(pts), "seconds": 0.0}
    x = x.to(device)
    synchronize(device)
    t0 = time.perf_counter()
    vpred = predict_voxels(model(x))
    labels = voxel_to_point_labels(vpred, p2v.to(device), ignore_index=0)
    synchronize(device)
    dt = time.perf_counter() - t0
    return labels.cpu().numpy(), {"voxels": int(x.num_voxels), "outside": int((p2v < 0).sum()), "seconds": dt}


def class_names_for(num_classes: int) -> List[str]:
    """Names of the training ids ``0 .. num_classes - 1``: SemanticKITTI's (``ignore``, ``car``, ...) for
    20 classes, ``class_<i>`` otherwise."""
    from sparseconv.datasets.semantic_kitti import CLASS_NAMES

    if num_classes == len(CLASS_NAMES) + 1:
        return ["ignore", *CLASS_NAMES]
    return ["ignore"] + [f"class_{i}" for i in range(1, num_classes)]


def activation_layers(net: torch.nn.Module) -> List[str]:
    """Names of the modules measured for activation sparsity besides the activation modules that
    :class:`~sparseconv.sparsity.ActivationMonitor` hooks by itself: the residual blocks
    (:class:`~sparseconv.models.segmentation.BasicBlock`, whose output is a ReLU's, applied
    functionally inside)."""
    from sparseconv.models.segmentation import BasicBlock

    return [n for n, m in net.named_modules() if isinstance(m, BasicBlock)]


@torch.no_grad()
def sparsity_report(model: torch.nn.Module, batches: Sequence[Any], device: Optional[torch.device] = None,
                    eps: float = 1e-3) -> Dict[str, Any]:
    """Per-layer activation sparsity of the network on a few batches (eval mode).

    Hooks every activation module (:data:`sparseconv.sparsity.ACTIVATION_TYPES`) and every residual
    block (:func:`activation_layers`) with :class:`~sparseconv.sparsity.ActivationMonitor`.

    Returns:
        ``{"scans": n, "layers": ActivationMonitor.stats(), "table": format_table text}``.
    """
    from sparseconv.sparsity import ActivationMonitor, format_table

    net = model.net if isinstance(model, SegmentationModel) else model
    device = model_device(net, device)
    was_training = net.training
    net.eval()
    scans = 0
    try:
        with ActivationMonitor(net, modules=activation_layers(net), eps=eps) as mon:
            for b in batches:
                net(to_device(b["voxels"] if isinstance(b, Mapping) else b, device))
                scans += int(b["batch_size"]) if isinstance(b, Mapping) else 1
    finally:
        net.train(was_training)
    stats = mon.stats()
    return {"scans": scans, "layers": stats, "table": format_table(stats)}


def format_iou_table(iou: Mapping[str, float], miou: float, accuracy: float) -> str:
    """A text table of per-class IoU (percent), then the mIoU and the accuracy."""
    width = max([len(n) for n in iou] + [8])
    lines = [f"{'class':<{width}}  IoU %", "-" * (width + 8)]
    for name, v in iou.items():
        lines.append(f"{name:<{width}} {'-' if v is None or math.isnan(v) else f'{100 * v:6.2f}':>7}")
    lines.append("-" * (width + 8))
    lines.append(f"{'mIoU':<{width}} {100 * miou:7.2f}" if not math.isnan(miou) else f"{'mIoU':<{width}}       -")
    lines.append(f"{'accuracy':<{width}} {100 * accuracy:7.2f}" if not math.isnan(accuracy)
                 else f"{'accuracy':<{width}}       -")
    return "\n".join(lines)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, eval_classes: Sequence[int], num_classes: Optional[int] = None,
             device: Optional[torch.device] = None, progress: bool = False, env: Optional[DistEnv] = None,
             sparsity_scans: int = 0) -> Optional[Dict[str, Any]]:
    """Per-point mIoU, per-class IoU, accuracy, speed and activation sparsity of a segmentation network.

    Every point takes its voxel's class (:func:`predict_voxels`, channels ``1 .. C - 1``); points
    labelled 0 (ignore) and points outside the voxel grid (no voxel: the ignore label) are left out
    of every count. The confusion matrix is ``[C, C]`` over all training ids; the mIoU is the mean IoU
    over ``eval_classes`` (a class absent from both targets and predictions of the whole split has
    no IoU and is left out of the mean, reported as None).

    Args:
        model: a :class:`SegmentationModel` or bare network (put in eval mode here).
        loader: :func:`seg_collate` batches of unaugmented labelled scans (:func:`build_eval_loader`).
        eval_classes: training ids averaged into the mIoU.
        num_classes: ``C`` (default: the network's ``num_classes``).
        device: where to run (default: the model's).
        progress: a tqdm bar.
        env: in a process group every rank evaluates its shard and rank 0 sums the confusion matrices.
        sparsity_scans: measure per-layer activation sparsity on the first batches of rank 0 until this
            many scans (0: off), after the timed pass.

    Returns:
        On rank 0: ``{"miou", "iou": {name: IoU or None} over eval_classes, "iou_all": [C] (None where
        undefined), "accuracy" (overall point accuracy over every labelled point in range),
        "class_accuracy": {name: ...}, "confusion": [C, C], "class_names": [C], "eval_classes",
        "scans", "points" (labelled points in range, counted), "points_outside_range" (labelled points
        without a voxel, left out), "ms_per_scan" (median time of the network, arg-max and
        projection per scan, data loading and voxelization excluded; the first batch is left out as
        warm-up when there are more than two), "threads", "device", "batch_size", "sparsity" (see
        :func:`sparsity_report`, or None), "table" (text)}``; None on the other ranks.
    """
    from tqdm import tqdm

    from sparseconv.metrics import SegmentationMeter
    from sparseconv.models.segmentation import voxel_to_point_labels

    env = env or DistEnv()
    net = model.net if isinstance(model, SegmentationModel) else model
    if num_classes is None:
        num_classes = int(getattr(net, "num_classes"))
    device = model_device(model, device)
    eval_classes = [int(k) for k in eval_classes]
    if not eval_classes or any(not 1 <= k < num_classes for k in eval_classes):
        raise ValueError(f"eval_classes must be training ids in [1, {num_classes}), got {eval_classes}")
    names = class_names_for(num_classes)
    meter = SegmentationMeter(num_classes, ignore_index=0)
    times: List[Tuple[float, int]] = []
    kept: List[Any] = []
    kept_scans, scans, outside = 0, 0, 0
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(loader, desc="eval", disable=not (progress and env.is_main), leave=False,
                          dynamic_ncols=True):
            if "labels" not in batch:
                raise ValueError("evaluate needs labelled scans (this split has no labels/ folder)")
            bsz = int(batch["batch_size"])
            x = to_device(batch["voxels"], device)
            p2v = batch["point_to_voxel"].to(device)
            synchronize(device)
            t0 = time.perf_counter()
            logits = net(x)
            pred = voxel_to_point_labels(predict_voxels(logits), p2v, ignore_index=0)
            synchronize(device)
            times.append(((time.perf_counter() - t0) / bsz, bsz))
            labels = batch["labels"]
            inside = batch["point_to_voxel"] >= 0
            outside += int(((labels > 0) & ~inside).sum())
            meter.update(pred.cpu()[inside].numpy(), labels[inside].numpy())
            scans += bsz
            if sparsity_scans and kept_scans < sparsity_scans and env.is_main:
                kept.append(batch)
                kept_scans += bsz
    finally:
        model.train(was_training)
    gathered = all_gather_objects((meter.conf, times, scans, outside))
    sparsity = sparsity_report(net, kept, device) if kept else None
    if not env.is_main:
        return None
    conf = sum(g[0] for g in gathered)
    times = [t for g in gathered for t in g[1]]
    scans, outside = sum(g[2] for g in gathered), sum(g[3] for g in gathered)
    meter.conf = conf
    res = meter.compute()
    iou_all = [None if math.isnan(v) else float(v) for v in res["iou"]]
    iou = {names[k]: iou_all[k] for k in eval_classes}
    vals = [v for v in iou.values() if v is not None]
    miou = float(np.mean(vals)) if vals else float("nan")
    out = {
        "miou": miou,
        "iou": iou,
        "iou_all": iou_all,
        "accuracy": res["accuracy"],
        "class_accuracy": {names[k]: (None if math.isnan(res["class_accuracy"][k]) else float(res["class_accuracy"][k]))
                           for k in eval_classes},
        "confusion": conf.tolist(),
        "class_names": names,
        "eval_classes": eval_classes,
        "scans": scans,
        "points": int(conf.sum()),
        "points_outside_range": outside,
        **speed_stats(times, device),
        "sparsity": sparsity,
    }
    out["table"] = format_iou_table(iou, miou, res["accuracy"])
    return out


def evaluate_with_config(model: torch.nn.Module, loader, cfg: Mapping[str, Any],
                         device: Optional[torch.device] = None, progress: bool = False, env: Optional[DistEnv] = None,
                         sparsity_scans: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """:func:`evaluate` with ``data.eval_classes`` and ``data.num_classes`` of ``cfg``; ``sparsity_scans``
    defaults to ``eval.sparsity_scans``."""
    d = cfg["data"]
    return evaluate(model, loader, d["eval_classes"], int(d["num_classes"]), device=device, progress=progress, env=env,
                    sparsity_scans=int(cfg["eval"]["sparsity_scans"] if sparsity_scans is None else sparsity_scans))


def make_seg_evaluator(cfg: Mapping[str, Any], env: Optional[DistEnv] = None, progress: bool = True):
    """``evaluate_fn(model, epoch)`` for :class:`~sparseconv.engine.trainer.Trainer`: evaluates on
    ``data.val_split`` with the ``eval`` settings (no sparsity pass), prints the table on rank 0 and
    returns a flat summary (``epoch``, ``miou``, ``accuracy``, ``ms_per_scan``, ``scans``,
    ``iou/<class>``) or None on the other ranks."""
    return epoch_evaluator(
        lambda: build_eval_loader(cfg, env=env),
        lambda model, loader: evaluate_with_config(model, loader, cfg, device=(env or DistEnv()).device,
                                                   progress=progress, env=env, sparsity_scans=0),
        "scans",
        lambda out, epoch: {"epoch": epoch, "miou": out["miou"], "accuracy": out["accuracy"], "scans": out["scans"],
                            "ms_per_scan": out["ms_per_scan"],
                            **{f"iou/{k}": (float("nan") if v is None else v) for k, v in out["iou"].items()}})


def raw_label_colors(raw_ids: np.ndarray) -> np.ndarray:
    """RGB uint8 ``[N, 3]`` colours of raw SemanticKITTI ids (the official colour map; unknown ids black)."""
    lut = np.zeros((1 << 16, 3), np.uint8)
    for raw, (b, g, r) in SEMANTIC_KITTI_COLORS_BGR.items():
        lut[raw] = (r, g, b)
    return lut[np.asarray(raw_ids, np.int64) & 0xFFFF]
