#!/usr/bin/env python
"""Activation-sparsity study: ReLU, GELU, TopK and a Hoyer penalty, trained side by side.

A small submanifold U-Net segments the voxels of simulated HDL-64E scans
(:func:`sparseconv.datasets.synthetic.simulate_scan`) into a handful of merged classes. Every
variant starts from the same initial weights (one seed), sees the same batches in the same order
and trains for the same number of steps; only the activation (or the loss) differs:

* ``relu``: :class:`sparseconv.nn.ReLU`;
* ``gelu``: :class:`sparseconv.nn.GELU`;
* ``topk``: :class:`sparseconv.nn.TopK` with ``k = C / 4`` in place of the activation (kept values
  pass unchanged, negative ones included);
* ``hoyer``: ReLU plus :func:`sparseconv.sparsity.hoyer_penalty` on every activation, through
  :class:`sparseconv.sparsity.ActivationPenalty` (one variant per ``--hoyer-lams`` value);
* ``gelu>relu``: the trained GELU model after :func:`sparseconv.sparsity.relufy`, measured as it is
  and after a short fine-tune (``--finetune-steps``).

Each trained model is evaluated on the validation scans in eval mode: voxel accuracy and mIoU
(:mod:`sparseconv.metrics`), and per-layer activation statistics from
:class:`sparseconv.sparsity.ActivationMonitor` (zero and near-zero fractions, mean Hoyer, all-zero
rows, dead units). The script writes ``results.json`` (everything, including the loss curves and
the confusion matrices), ``table.md`` (the side-by-side tables) and two PNGs
(``sparsity_study_layers.png``: per-layer zero fraction and Hoyer per variant;
``sparsity_study_loss.png``: training loss curves).

Data: the points of each scan inside ``POINT_RANGE`` (the front 0..40 m x -20..20 m), voxelized at
0.2 m with :func:`sparseconv.datasets.collate` (mean x, y, z, intensity per voxel); a voxel's label
is the majority class of its points (ties go to the lower class index). Scans are cached as
``.npz`` under ``--cache`` so reruns skip the simulation. The run is deterministic given ``--seed``
and the thread count (checked by ``tests/test_sparsity_study.py``).

Usage:
    OMP_NUM_THREADS=1 python tools/sparsity_study.py --out study --threads 1
    python tools/sparsity_study.py --out study --steps 300 --cache study/scans --hoyer-lams 0.003 0.01
    python tools/sparsity_study.py --out /tmp/smoke --smoke          # seconds: 2 scans, a few steps
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

import sparseconv as sc
from sparseconv import nn as snn
from sparseconv.datasets import collate
from sparseconv.datasets.synthetic import SEMANTIC_IDS, scene_seed, simulate_scan
from sparseconv.io import atomic_write
from sparseconv.metrics import confusion_matrix, iou_per_class, mean_iou
from sparseconv.sparsity import ActivationMonitor, ActivationPenalty, relufy

#: Merged classes of the study, in label order.
CLASSES = ("ground", "vehicle", "person", "structure")
#: SemanticKITTI id -> study class name (every id the simulator emits except "unlabeled").
CLASS_MAP = {
    "road": "ground", "parking": "ground", "sidewalk": "ground", "terrain": "ground",
    "car": "vehicle", "truck": "vehicle",
    "person": "person", "bicyclist": "person",
    "building": "structure", "fence": "structure", "vegetation": "structure", "trunk": "structure",
    "pole": "structure", "traffic-sign": "structure",
}
#: Label of points and voxels left out of the loss and the metrics.
IGNORE = 255
#: Cropped region (x_min, y_min, z_min, x_max, y_max, z_max) in the LiDAR frame (sensor 1.73 m above the road).
POINT_RANGE = (0.0, -20.0, -3.0, 40.0, 20.0, 3.4)
VOXEL_SIZE = (0.2, 0.2, 0.2)
# Fixed affine normalisation of the voxel features (mean x, y, z, intensity): roughly zero-centred, unit range.
FEATURE_SHIFT = (20.0, 0.0, -1.0, 0.3)
FEATURE_SCALE = (20.0, 20.0, 2.0, 0.3)

# Defaults of the full study (``--smoke`` overrides them).
DEFAULTS = dict(train_scans=48, val_scans=16, steps=400, batch_size=2, lr=3e-3, weight_decay=1e-4,
                hoyer_lams=(3e-3, 1e-2), finetune_steps=80, finetune_lr=1e-3)
SMOKE = dict(train_scans=1, val_scans=1, steps=3, batch_size=1, finetune_steps=1)
#: The variant groups ``--variants`` selects from ("hoyer": one run per ``--hoyer-lams`` value).
VARIANTS = ("relu", "gelu", "topk", "hoyer", "relufy")


# ----------------------------------------------------------------------------- data
def class_lookup() -> np.ndarray:
    """``lookup[semantic_id]`` -> study class index, :data:`IGNORE` for ids outside :data:`CLASS_MAP`.

    Returns:
        uint8 ``[65536]`` (indexable by any uint16 SemanticKITTI id).
    """
    table = np.full(1 << 16, IGNORE, np.uint8)
    for name, cls in CLASS_MAP.items():
        table[SEMANTIC_IDS[name]] = CLASSES.index(cls)
    return table


def load_scan(seed: int, cache: Optional[str], point_range: Sequence[float] = POINT_RANGE) -> Dict[str, np.ndarray]:
    """The points of simulated scan ``seed`` inside ``point_range`` and their study labels.

    The cropped points and their SemanticKITTI ids are cached as ``cache/scan_<seed>.npz``
    (re-simulated when the file was written for another range).

    Args:
        seed: the scene seed of :func:`simulate_scan`.
        cache: the cache folder (``None``: no cache).
        point_range: the crop ``(x_min, y_min, z_min, x_max, y_max, z_max)``.

    Returns:
        ``{"points": float32 [N, 4], "labels": uint8 [N]}`` (class indices of :data:`CLASSES`, or
        :data:`IGNORE`).
    """
    rng = np.asarray(point_range, np.float64)
    path = None if cache is None else os.path.join(cache, f"scan_{seed}.npz")
    data = None
    if path is not None and os.path.exists(path):
        with np.load(path) as f:
            if np.array_equal(f["point_range"], rng):
                data = {"points": f["points"], "semantic": f["semantic"]}
    if data is None:
        scan = simulate_scan(seed)
        p = scan.points
        keep = np.all((p[:, :3] >= rng[:3]) & (p[:, :3] < rng[3:]), axis=1)
        data = {"points": np.ascontiguousarray(p[keep]), "semantic": scan.semantic[keep]}
        if path is not None:
            os.makedirs(cache, exist_ok=True)
            with atomic_write(path, "wb") as f:
                np.savez_compressed(f, point_range=rng, **data)
    return {"points": data["points"].astype(np.float32), "labels": class_lookup()[data["semantic"]]}


def voxel_labels(point_to_voxel: np.ndarray, labels: np.ndarray, num_voxels: int, num_classes: int) -> np.ndarray:
    """The majority label of each voxel's points.

    Points with ``point_to_voxel < 0`` (dropped) or label :data:`IGNORE` do not vote; a voxel
    without a voting point gets :data:`IGNORE`; ties go to the lower class index.

    Args:
        point_to_voxel: int ``[N]`` voxel row of each point (``-1``: no voxel).
        labels: int ``[N]`` class of each point (``[0, num_classes)`` or :data:`IGNORE`).
        num_voxels: ``V``.
        num_classes: ``C``.

    Returns:
        int64 ``[V]``.

    Example:
        >>> voxel_labels(np.array([0, 0, 0, 1, -1]), np.array([2, 1, 2, 255, 0]), 2, 3).tolist()
        [2, 255]
    """
    p2v = np.asarray(point_to_voxel, np.int64)
    lab = np.asarray(labels, np.int64)
    if p2v.shape != lab.shape:
        raise ValueError(f"voxel_labels: {p2v.shape[0]} voxel indices for {lab.shape[0]} labels")
    vote = (p2v >= 0) & (lab != IGNORE)
    if np.any(lab[vote] >= num_classes) or np.any(lab[vote] < 0):
        raise ValueError(f"voxel_labels: a label outside [0, {num_classes}) that is not {IGNORE}")
    counts = np.bincount(p2v[vote] * num_classes + lab[vote], minlength=num_voxels * num_classes)
    counts = counts.reshape(num_voxels, num_classes)
    out = counts.argmax(1)
    out[counts.sum(1) == 0] = IGNORE
    return out


def make_batch(scans: Sequence[Dict[str, np.ndarray]]):
    """Voxelizes scans into one batch with :func:`collate`.

    Returns:
        ``(x, y)``: a SparseTensor (normalised mean x, y, z, intensity, 4 channels) and int64 ``[V]``
        voxel labels.
    """
    batch = collate([{"points": s["points"], "labels": s["labels"]} for s in scans], VOXEL_SIZE, POINT_RANGE)
    x = batch["voxels"]
    shift = torch.tensor(FEATURE_SHIFT, dtype=x.features.dtype)
    scale = torch.tensor(FEATURE_SCALE, dtype=x.features.dtype)
    x = x.replace_feature((x.features - shift) / scale)
    y = voxel_labels(batch["point_to_voxel"].numpy(), batch["labels"].numpy(), x.features.shape[0], len(CLASSES))
    return x, torch.from_numpy(y)


# ----------------------------------------------------------------------------- model
def make_activation(kind: str, channels: int) -> torch.nn.Module:
    """``relu`` / ``gelu`` / ``topk`` (``k = max(1, channels // 4)``) as a ``sparseconv.nn`` module."""
    if kind == "relu":
        return snn.ReLU()
    if kind == "gelu":
        return snn.GELU()
    if kind == "topk":
        return snn.TopK(max(1, channels // 4))
    raise ValueError(f"unknown activation {kind!r}; choose relu, gelu or topk")


class Block(snn.SparseSequential):
    """``conv -> BatchNorm -> activation``; the activation is the child ``act``."""

    def __init__(self, conv: torch.nn.Module, channels: int, act: str):
        super().__init__()
        self.add_module("conv", conv)
        self.add_module("bn", snn.BatchNorm(channels))
        self.add_module("act", make_activation(act, channels))


class UNet(torch.nn.Module):
    """A two-stage submanifold U-Net for per-voxel classification.

    Stages (widths ``w0, w1, w2``): ``stem1``, ``stem2`` (SubM 3^3, ``w0``); ``down1`` (SparseConv
    3^3 stride 2, ``w1``), ``enc1`` (SubM); ``down2`` (stride 2, ``w2``), ``enc2`` (SubM);
    ``up2`` (inverse conv to ``w1``), ``dec1`` (SubM on the concatenation with ``enc1``); ``up1``
    (inverse conv to ``w0``), ``dec0`` (SubM on the concatenation with ``stem2``); a linear head.
    Every conv is followed by BatchNorm and the activation ``act``: ten activation layers.

    Args:
        act: ``"relu"``, ``"gelu"`` or ``"topk"``.
        in_channels: input features.
        num_classes: output logits.
        widths: ``(w0, w1, w2)``.

    Shape:
        SparseTensor with ``[N, in_channels]`` features -> logits ``[N, num_classes]`` (same rows).

    Example:
        >>> net = UNet("relu")
        >>> logits = net(x)            # x from make_batch
    """

    def __init__(self, act: str, in_channels: int = 4, num_classes: int = len(CLASSES),
                 widths: Sequence[int] = (16, 32, 64)):
        super().__init__()
        w0, w1, w2 = widths
        self.stem1 = Block(snn.SubMConv3d(in_channels, w0, 3), w0, act)
        self.stem2 = Block(snn.SubMConv3d(w0, w0, 3), w0, act)
        self.down1 = Block(snn.SparseConv3d(w0, w1, 3, stride=2, padding=1, indice_key="d1"), w1, act)
        self.enc1 = Block(snn.SubMConv3d(w1, w1, 3), w1, act)
        self.down2 = Block(snn.SparseConv3d(w1, w2, 3, stride=2, padding=1, indice_key="d2"), w2, act)
        self.enc2 = Block(snn.SubMConv3d(w2, w2, 3), w2, act)
        self.up2 = Block(snn.SparseInverseConv3d(w2, w1, 3, indice_key="d2"), w1, act)
        self.dec1 = Block(snn.SubMConv3d(2 * w1, w1, 3), w1, act)
        self.up1 = Block(snn.SparseInverseConv3d(w1, w0, 3, indice_key="d1"), w0, act)
        self.dec0 = Block(snn.SubMConv3d(2 * w0, w0, 3), w0, act)
        self.head = torch.nn.Linear(w0, num_classes)

    def forward(self, x: sc.SparseTensor) -> torch.Tensor:
        s = self.stem2(self.stem1(x))
        e1 = self.enc1(self.down1(s))
        e2 = self.enc2(self.down2(e1))
        d1 = self.dec1(sc.cat([self.up2(e2), e1]))
        d0 = self.dec0(sc.cat([self.up1(d1), s]))
        return self.head(d0.features)


def activation_layers(model: torch.nn.Module) -> List[str]:
    """Names of the ``act`` children of ``model`` (the layers the monitor and the penalty see)."""
    return [n for n, _ in model.named_modules() if n.endswith(".act")]


# ----------------------------------------------------------------------------- training / evaluation
def batch_schedule(num_train: int, steps: int, batch_size: int, seed: int) -> List[List[int]]:
    """The scan indices of every step: shuffled epochs (one NumPy generator from ``seed``), the same for every variant."""
    rng = np.random.default_rng([seed, 2])
    order: List[int] = []
    while len(order) < steps * batch_size:
        order.extend(rng.permutation(num_train).tolist())
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def class_weights(batches) -> torch.Tensor:
    """Cross-entropy weights ``1 / sqrt(frequency)`` of the classes over the training voxels, mean 1."""
    counts = np.zeros(len(CLASSES), np.float64)
    for _, y in batches:
        y = y.numpy()
        counts += np.bincount(y[y != IGNORE], minlength=len(CLASSES))[:len(CLASSES)]
    w = 1.0 / np.sqrt(np.maximum(counts, 1.0) / max(counts.sum(), 1.0))
    return torch.tensor(w / w.mean(), dtype=torch.float32)


def train(model: torch.nn.Module, batches: Sequence, schedule: Sequence[Sequence[int]], weights: torch.Tensor,
          lr: float, weight_decay: float, penalty: Optional[ActivationPenalty] = None,
          log: Optional[Callable[[str], None]] = None) -> Dict[str, List[float]]:
    """AdamW with a cosine learning-rate decay over ``len(schedule)`` steps.

    Each step merges the pre-voxelized scans ``schedule[i]`` (``batches[j] = (x, y)`` per scan) into
    one batch. Returns the per-step ``loss`` (cross-entropy) and ``penalty`` values.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1.0 + math.cos(math.pi * min(i, len(schedule)) / max(len(schedule), 1))))
    hist: Dict[str, List[float]] = {"loss": [], "penalty": []}
    model.train()
    for step, idx in enumerate(schedule):
        x, y = merge([batches[i] for i in idx])
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y, weight=weights, ignore_index=IGNORE)
        pen = penalty.loss() if penalty is not None else torch.zeros(())
        opt.zero_grad(set_to_none=True)
        (loss + pen).backward()
        opt.step()
        sched.step()
        hist["loss"].append(float(loss.detach()))
        hist["penalty"].append(float(pen.detach()))
        if log is not None and (step + 1) % max(1, len(schedule) // 4) == 0:
            log(f"    step {step + 1}/{len(schedule)}  loss {hist['loss'][-1]:.3f}  penalty {hist['penalty'][-1]:.3f}")
    return hist


def merge(items: Sequence):
    """One batch from single-scan ``(x, y)`` pairs: batch index ``b`` for the ``b``-th scan.

    Always a new SparseTensor (a new coordinate set), so no kernel map is reused from an earlier
    forward pass: every pass, and every variant, pays for building its maps.
    """
    feats, coords, ys = [], [], []
    for b, (x, y) in enumerate(items):
        c = x.coords.clone()
        c[:, 0] = b
        coords.append(c)
        feats.append(x.features)
        ys.append(y)
    x0 = items[0][0]
    x = sc.SparseTensor(torch.cat(feats), torch.cat(coords), x0.spatial_shape, batch_size=len(items))
    return x, torch.cat(ys)


def evaluate(model: torch.nn.Module, batches: Sequence, eps: float = 1e-3, repeats: int = 3) -> Dict[str, object]:
    """Accuracy, mIoU, per-class IoU and per-layer activation statistics on ``batches`` (eval mode, one scan each).

    Returns:
        ``{"accuracy", "miou", "iou", "confusion", "layers", "forward_ms"}``; ``layers`` is
        :meth:`ActivationMonitor.stats` keyed by activation layer; ``forward_ms`` the mean over the
        scans of the best of ``repeats`` timed forward passes (without the monitor's hooks).
    """
    was_training = model.training
    model.eval()
    conf = np.zeros((len(CLASSES), len(CLASSES)), np.int64)
    with ActivationMonitor(model, eps=eps) as mon, torch.no_grad():
        for item in batches:
            x, y = merge([item])
            logits = model(x)
            conf += confusion_matrix(logits.argmax(1).numpy(), y.numpy(), len(CLASSES), ignore_index=IGNORE)
    seconds = 0.0
    with torch.no_grad():  # timing without hooks: per scan the best of `repeats` passes, kernel maps included
        for item in batches:
            best = math.inf
            for _ in range(repeats):
                x, _ = merge([item])
                t = time.perf_counter()
                model(x)
                best = min(best, time.perf_counter() - t)
            seconds += best
    model.train(was_training)
    total = conf.sum()
    iou = iou_per_class(conf)
    return {
        "accuracy": float(np.trace(conf) / total) if total else float("nan"),
        "miou": mean_iou(conf),
        "iou": {c: (None if math.isnan(v) else float(v)) for c, v in zip(CLASSES, iou)},
        "confusion": conf.tolist(),
        "layers": mon.stats(),
        "forward_ms": 1000.0 * seconds / max(len(batches), 1),
    }


def overall(layers: Dict[str, dict]) -> Dict[str, float]:
    """Totals over all layers: zero / near-zero fractions weighted by values, Hoyer and zero rows weighted by rows."""
    values = sum(s["values"] for s in layers.values())
    rows = sum(s["rows"] for s in layers.values())
    return {
        "zero_fraction": sum(s["zero_fraction"] * s["values"] for s in layers.values()) / values,
        "near_zero_fraction": sum(s["near_zero_fraction"] * s["values"] for s in layers.values()) / values,
        "hoyer": sum(s["hoyer"] * s["rows"] for s in layers.values()) / rows,
        "zero_row_fraction": sum(s["zero_row_fraction"] * s["rows"] for s in layers.values()) / rows,
        "dead_units": sum(s["dead_units"] for s in layers.values()),
        "channels": sum(s["channels"] for s in layers.values()),
    }


# ----------------------------------------------------------------------------- report
def short(layer: str) -> str:
    """``"enc1.act"`` -> ``"enc1"``."""
    return layer[:-4] if layer.endswith(".act") else layer


def format_tables(results: Dict[str, object]) -> str:
    """The markdown tables of ``table.md``: one summary row per variant, then per-layer zero % and Hoyer."""
    variants = results["variants"]
    names = list(variants)
    lines = ["| variant | steps | val acc % | val mIoU % | " + " | ".join(f"IoU {c} %" for c in CLASSES)
             + " | zero % | near-0 % | Hoyer | 0-rows % | dead units | train s | fwd ms/scan |",
             "|---|" + "---:|" * (10 + len(CLASSES))]
    for n in names:
        v = variants[n]
        o = v["overall"]
        ious = " | ".join("-" if v["iou"][c] is None else f"{100 * v['iou'][c]:.1f}" for c in CLASSES)
        lines.append(f"| {n} | {v['steps']} | {100 * v['accuracy']:.1f} | {100 * v['miou']:.1f} | {ious} | "
                     f"{100 * o['zero_fraction']:.1f} | {100 * o['near_zero_fraction']:.1f} | {o['hoyer']:.3f} | "
                     f"{100 * o['zero_row_fraction']:.1f} | {o['dead_units']}/{o['channels']} | "
                     f"{v['train_seconds']:.0f} | {v['forward_ms']:.0f} |")
    layers = list(variants[names[0]]["layers"])
    for key, title, fmt in (("zero_fraction", "zero % (values exactly 0)", lambda s: f"{100 * s:.1f}"),
                            ("near_zero_fraction", f"near-zero % (|a| < {results['config']['eps']:g})",
                             lambda s: f"{100 * s:.1f}"),
                            ("hoyer", "mean Hoyer", lambda s: f"{s:.3f}"),
                            ("zero_row_fraction", "all-zero rows %", lambda s: f"{100 * s:.1f}"),
                            ("dead_units", "dead units", lambda s: f"{s}")):
        lines += ["", f"Per layer, {title}:", "",
                  "| layer | C | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
        for layer in layers:
            ch = variants[names[0]]["layers"][layer]["channels"]
            lines.append(f"| {short(layer)} | {ch} | "
                         + " | ".join(fmt(variants[n]["layers"][layer][key]) for n in names) + " |")
    return "\n".join(lines) + "\n"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> None:
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


def plot_layers(results: Dict[str, object], path: str) -> None:
    """Grouped bars per layer: zero fraction (near-zero as an outline) and mean Hoyer, one colour per variant."""
    variants = results["variants"]
    names = list(variants)
    layers = list(variants[names[0]]["layers"])
    fig = _figure(max(8.0, 0.9 * len(layers) + 2.0), 7.0)
    ax_zero, ax_hoyer = fig.subplots(2, 1, sharex=True)
    width = 0.8 / len(names)
    colors = [f"C{i}" for i in range(len(names))]
    for i, n in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(layers))]
        st = [variants[n]["layers"][l] for l in layers]
        ax_zero.bar(xs, [s["near_zero_fraction"] for s in st], width, color="none", edgecolor=colors[i],
                    linestyle="--", linewidth=0.8)
        ax_zero.bar(xs, [s["zero_fraction"] for s in st], width, color=colors[i], label=n)
        ax_hoyer.bar(xs, [s["hoyer"] for s in st], width, color=colors[i], label=n)
    ax_zero.set_ylabel("zero fraction\n(dashed: |a| < eps)")
    ax_hoyer.set_ylabel("mean Hoyer sparsity")
    for ax in (ax_zero, ax_hoyer):
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    ax_zero.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=min(len(names), 4), frameon=False,
                   fontsize="small")
    ax_hoyer.set_xticks(range(len(layers)))
    ax_hoyer.set_xticklabels([f"{short(l)}\n({variants[names[0]]['layers'][l]['channels']})" for l in layers],
                             fontsize="small")
    fig.suptitle("validation activations per layer (channels in brackets)", x=0.02, ha="left")
    _save(fig, path)


def plot_losses(results: Dict[str, object], path: str, window: int = 20) -> None:
    """Training cross-entropy per variant (moving average over ``window`` steps), and the penalty terms."""
    variants = results["variants"]
    fig = _figure(9.0, 4.5)
    ax_loss, ax_pen = fig.subplots(1, 2)
    for i, (n, v) in enumerate(variants.items()):
        for key, ax in (("loss", ax_loss), ("penalty", ax_pen)):
            y = np.asarray(v["history"][key], np.float64)
            if len(y) == 0 or (key == "penalty" and not np.any(y)):
                continue
            k = max(1, min(window, len(y)))
            smooth = np.convolve(y, np.ones(k) / k, mode="valid")
            start = v["history"].get("start_step", 0)
            ax.plot(np.arange(k, len(y) + 1) + start, smooth, color=f"C{i}", label=n)
    ax_loss.set_title(f"cross-entropy (mean of {window} steps)", fontsize="medium")
    if ax_loss.lines:
        ax_loss.set_yscale("log")
    ax_pen.set_title("Hoyer penalty term (lam x sum of layers)", fontsize="medium")
    for ax in (ax_loss, ax_pen):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small", frameon=False)
    _save(fig, path)


# ----------------------------------------------------------------------------- study
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (results.json, table.md, PNGs)")
    p.add_argument("--steps", type=int, default=None, help=f"training steps per variant ({DEFAULTS['steps']})")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    p.add_argument("--smoke", action="store_true", help="tiny run for tests: 2 scans, a few steps")
    p.add_argument("--cache", default=None, help="folder of cached scans (default OUT/scans)")
    p.add_argument("--seed", type=int, default=0, help="data, init and order seed (0)")
    p.add_argument("--train-scans", type=int, default=None, help=f"({DEFAULTS['train_scans']})")
    p.add_argument("--val-scans", type=int, default=None, help=f"({DEFAULTS['val_scans']})")
    p.add_argument("--batch-size", type=int, default=None, help=f"scans per step ({DEFAULTS['batch_size']})")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="AdamW learning rate (cosine decay)")
    p.add_argument("--hoyer-lams", type=float, nargs="*", default=None,
                   help=f"one ReLU + Hoyer-penalty variant per weight {DEFAULTS['hoyer_lams']}")
    p.add_argument("--finetune-steps", type=int, default=None,
                   help=f"fine-tune steps after relufy of the GELU model ({DEFAULTS['finetune_steps']}; 0: skip)")
    p.add_argument("--variants", nargs="*", default=None, help=f"subset of: {' '.join(VARIANTS)} (all)")
    p.add_argument("--eps", type=float, default=1e-3, help="near-zero threshold of the monitor")
    args = p.parse_args(argv)
    cfg = dict(DEFAULTS)
    if args.smoke:
        cfg.update(SMOKE)
    for key in ("steps", "train_scans", "val_scans", "batch_size", "finetune_steps"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.hoyer_lams is not None:
        cfg["hoyer_lams"] = tuple(args.hoyer_lams)
    for key in ("steps", "train_scans", "val_scans", "batch_size"):
        if cfg[key] < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    if cfg["finetune_steps"] < 0:
        p.error(f"--finetune-steps must be >= 0, got {cfg['finetune_steps']}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if any(not (lam >= 0 and math.isfinite(lam)) for lam in cfg["hoyer_lams"]):
        p.error(f"--hoyer-lams must be finite and >= 0, got {list(cfg['hoyer_lams'])}")
    if args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")
    args.variants = list(args.variants) if args.variants else list(VARIANTS)
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {' '.join(VARIANTS)}")
    if "relufy" in args.variants and "gelu" not in args.variants:
        p.error("the relufy variant fine-tunes the trained GELU model: add gelu to --variants")
    args.cfg = cfg
    return args


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> Dict[str, object]:
    """Runs the study described by ``args`` and writes ``results.json``, ``table.md`` and the PNGs to ``args.out``.

    Args:
        args: from :func:`parse_args`.
        log: receives the progress lines.

    Returns:
        The contents of ``results.json``: ``config``, ``data_seconds``, ``total_seconds`` and
        ``variants`` (per variant: ``steps``, ``accuracy``, ``miou``, ``iou``, ``confusion``,
        ``layers`` (monitor statistics), ``overall``, ``history`` (per-step ``loss`` and
        ``penalty``), ``train_seconds``, ``eval_seconds``, ``forward_ms``, ...).

    Example:
        >>> results = run(parse_args(["--out", "/tmp/study", "--smoke"]))
        >>> results["variants"]["topk"]["overall"]["zero_fraction"]
        0.75
    """
    cfg = args.cfg
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    cache = args.cache if args.cache is not None else os.path.join(args.out, "scans")
    n_train, n_val = cfg["train_scans"], cfg["val_scans"]
    seeds = [scene_seed(args.seed, i) for i in range(n_train + n_val)]
    t0 = time.perf_counter()
    scans = [load_scan(s, cache) for s in seeds]
    data = [make_batch([s]) for s in scans]
    train_data, val_data = data[:n_train], data[n_train:]
    t_data = time.perf_counter() - t0
    log(f"data: {n_train} train + {n_val} val scans, "
        f"{np.mean([len(x.features) for x, _ in data]):.0f} voxels per scan on average ({t_data:.1f} s)")
    schedule = batch_schedule(n_train, cfg["steps"], cfg["batch_size"], args.seed)
    weights = class_weights(train_data)

    def fresh(act: str) -> UNet:
        torch.manual_seed(args.seed)
        return UNet(act)

    def finish(name: str, model, hist, steps, seconds, extra=None):
        t = time.perf_counter()
        ev = evaluate(model, val_data, eps=args.eps)
        ev["overall"] = overall(ev["layers"])
        rec = {"steps": steps, "train_seconds": seconds, "eval_seconds": time.perf_counter() - t,
               "history": hist, **ev, **(extra or {})}
        variants[name] = rec
        log(f"  {name}: acc {100 * rec['accuracy']:.1f} %, mIoU {100 * rec['miou']:.1f} %, "
            f"zero {100 * rec['overall']['zero_fraction']:.1f} %, Hoyer {rec['overall']['hoyer']:.3f} "
            f"(train {seconds:.0f} s)")

    variants: Dict[str, dict] = {}
    plan = [("relu", "relu", None), ("gelu", "gelu", None), ("topk", "topk", None)]
    plan = [p for p in plan if p[0] in args.variants]
    if "hoyer" in args.variants:
        plan += [(f"relu+hoyer {lam:g}", "relu", lam) for lam in cfg["hoyer_lams"]]
    gelu_model = None
    for name, act, lam in plan:
        log(f"training {name} ({cfg['steps']} steps)")
        model = fresh(act)
        penalty = None
        if lam is not None:
            penalty = ActivationPenalty(model, activation_layers(model), "hoyer", lam=lam)
        t = time.perf_counter()
        hist = train(model, train_data, schedule, weights, cfg["lr"], cfg["weight_decay"], penalty, log=log)
        seconds = time.perf_counter() - t
        if penalty is not None:
            penalty.remove()
        finish(name, model, hist, cfg["steps"], seconds, {"activation": act, "hoyer_lam": lam})
        if act == "gelu":
            gelu_model = model
    if "relufy" in args.variants and gelu_model is not None:
        swapped, replaced = relufy(gelu_model)
        finish("gelu>relu", swapped, {"loss": [], "penalty": []}, cfg["steps"], 0.0,
               {"activation": "relu (relufy of gelu)", "hoyer_lam": None, "replaced": replaced,
                "finetune_steps": 0})
        if cfg["finetune_steps"] > 0:
            log(f"fine-tuning gelu>relu ({cfg['finetune_steps']} steps)")
            tuned, _ = relufy(gelu_model)
            t = time.perf_counter()
            hist = train(tuned, train_data, schedule[:cfg["finetune_steps"]], weights, cfg["finetune_lr"],
                         cfg["weight_decay"], log=log)
            hist["start_step"] = cfg["steps"]
            finish(f"gelu>relu+ft{cfg['finetune_steps']}", tuned, hist, cfg["steps"] + cfg["finetune_steps"],
                   time.perf_counter() - t, {"activation": "relu (relufy of gelu)", "hoyer_lam": None,
                                             "replaced": replaced, "finetune_steps": cfg["finetune_steps"]})

    label_counts = np.zeros(len(CLASSES), np.int64)
    for _, y in val_data:
        yy = y.numpy()
        label_counts += np.bincount(yy[yy != IGNORE], minlength=len(CLASSES))[:len(CLASSES)]
    results = {
        "config": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
                   "seed": args.seed, "threads": args.threads, "smoke": bool(args.smoke), "eps": args.eps,
                   "classes": list(CLASSES), "class_map": CLASS_MAP, "point_range": list(POINT_RANGE),
                   "voxel_size": list(VOXEL_SIZE), "scan_seeds": seeds, "class_weights": weights.tolist(),
                   "val_voxels_per_class": dict(zip(CLASSES, label_counts.tolist())),
                   "torch": torch.__version__},
        "data_seconds": t_data,
        "variants": variants,
        "total_seconds": time.perf_counter() - t0,
    }
    with atomic_write(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with atomic_write(os.path.join(args.out, "table.md"), "w") as f:
        f.write(format_tables(results))
    plot_layers(results, os.path.join(args.out, "sparsity_study_layers.png"))
    plot_losses(results, os.path.join(args.out, "sparsity_study_loss.png"))
    log(f"done in {results['total_seconds']:.0f} s; wrote {args.out}/results.json, table.md, sparsity_study_*.png")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
