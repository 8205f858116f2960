"""Helpers shared by the task glue of the engine (:mod:`~sparseconv.engine.det`, :mod:`~sparseconv.engine.seg`).

* config checks: :func:`check_grid_config` (``data.point_range`` / ``data.voxel_size``) and
  :func:`default_output_dir`;
* models: :func:`create_configured_model` (``model.imports``, ``model.name``, ``model.args``),
  :func:`load_weights` (a state dict with an error that names the config);
* data: :func:`geometric_augmentation` (flips, rotation, scaling, translation of ``data.augment``),
  :func:`grid_collate_kwargs` (the training grid as ``collate`` keyword arguments),
  :func:`sharded_eval_loader` (the first ``limit`` samples, one shard per rank, in order);
* evaluation: :func:`model_device`, :func:`synchronize`, :func:`speed_stats` (median time per
  scan with the first batch left out as warm-up), :func:`epoch_evaluator` (the ``evaluate_fn``
  of :class:`~sparseconv.engine.trainer.Trainer`).

Example:
    >>> check_grid_config(cfg["data"], "configs/x.yaml")     # ConfigError on a bad grid
    >>> loader = sharded_eval_loader(cfg, dataset, "val", collate_fn, unit="scans")
    >>> speed_stats([(0.02, 1), (0.01, 1), (0.012, 1)], torch.device("cpu"))["ms_per_scan"]
    11.0
"""
from __future__ import annotations

import importlib
import os
import statistics
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .config import ConfigError
from .distributed import DistEnv, ShardSampler

__all__ = ["check_grid_config", "default_output_dir", "create_configured_model", "load_weights",
           "geometric_augmentation", "grid_collate_kwargs", "sharded_eval_loader", "model_device", "synchronize",
           "speed_stats", "epoch_evaluator"]


# ----------------------------------------------------------------------------- config
def check_grid_config(data: Mapping[str, Any], path: str) -> None:
    """Checks ``data.point_range`` (6 numbers, ``min < max``) and ``data.voxel_size`` (3 positive numbers).

    Raises:
        ConfigError: naming the key, the value and ``path``.
    """
    pr, vs = data["point_range"], data["voxel_size"]
    if len(pr) != 6 or any(float(pr[i]) >= float(pr[i + 3]) for i in range(3)):
        raise ConfigError(f"data.point_range must be 6 numbers x0, y0, z0, x1, y1, z1 with min < max, got {pr} "
                          f"({path})")
    if len(vs) != 3 or any(float(v) <= 0 for v in vs):
        raise ConfigError(f"data.voxel_size must be 3 positive numbers, got {vs} ({path})")


def default_output_dir(cfg: Dict[str, Any], path: str) -> None:
    """Sets a null ``output_dir`` to ``output/<config file name without extension>`` (in place)."""
    if cfg["output_dir"] is None:
        cfg["output_dir"] = os.path.join("output", os.path.splitext(os.path.basename(path))[0])


# ----------------------------------------------------------------------------- models
def create_configured_model(cfg: Mapping[str, Any], **kwargs: Any) -> torch.nn.Module:
    """``sparseconv.models.create_model(model.name, **kwargs, **model.args)`` after importing
    ``model.imports`` (modules that may register models)."""
    import sparseconv.models as models

    for name in cfg["model"].get("imports") or ():
        importlib.import_module(name)
    return models.create_model(cfg["model"]["name"], **kwargs, **(cfg["model"].get("args") or {}))


def load_weights(model: torch.nn.Module, weights: Mapping[str, Any], ckpt: str, cfg: Mapping[str, Any],
                 source: str) -> torch.nn.Module:
    """``model.load_state_dict(weights)``; weights that do not fit raise a ValueError naming the
    checkpoint, the model name and args of ``cfg`` and the config ``source``."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"{ckpt}: the weights do not fit {cfg['model']['name']} with args {cfg['model']['args']} "
                         f"(config {source}): {str(e).splitlines()[0]}") from None
    return model


# ----------------------------------------------------------------------------- data
def geometric_augmentation(augment: Mapping[str, Any]) -> List[Any]:
    """The transforms of ``data.augment`` that move whole scans, in this order and where configured:
    :class:`~sparseconv.datasets.RandomFlip` (``flip_x`` / ``flip_y``), ``GlobalRotation``
    (``rotation``), ``GlobalScaling`` (``scaling``), ``GlobalTranslation`` (``translation_std``).

    Example:
        >>> geometric_augmentation({"flip_x": True, "flip_y": False, "rotation": None, "scaling": [0.95, 1.05],
        ...                         "translation_std": None})          # [RandomFlip, GlobalScaling]
    """
    from sparseconv.datasets import GlobalRotation, GlobalScaling, GlobalTranslation, RandomFlip

    a = augment
    ts = []
    if a["flip_x"] or a["flip_y"]:
        ts.append(RandomFlip(along_x=a["flip_x"], along_y=a["flip_y"]))
    if a["rotation"]:
        ts.append(GlobalRotation(tuple(a["rotation"])))
    if a["scaling"]:
        ts.append(GlobalScaling(tuple(a["scaling"])))
    if a["translation_std"]:
        ts.append(GlobalTranslation(tuple(a["translation_std"])))
    return ts


def grid_collate_kwargs(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """``{"voxel_size", "point_range", "max_points_per_voxel"}`` of ``data`` (floats), for ``collate``."""
    d = cfg["data"]
    return {"voxel_size": tuple(float(v) for v in d["voxel_size"]),
            "point_range": tuple(float(v) for v in d["point_range"]),
            "max_points_per_voxel": d["max_points_per_voxel"]}


def sharded_eval_loader(cfg: Mapping[str, Any], dataset, split: str, collate_fn: Callable,
                        env: Optional[DistEnv] = None, limit: Optional[int] = None,
                        batch_size: Optional[int] = None, workers: Optional[int] = None,
                        unit: str = "samples") -> torch.utils.data.DataLoader:
    """A loader over the first ``limit`` samples of ``dataset`` in order; in a process group each rank
    gets every ``world_size``-th sample (:class:`~sparseconv.engine.distributed.ShardSampler`).

    Args:
        dataset: the unaugmented dataset of ``split`` (it needs ``root``).
        limit, batch_size, workers: default ``eval.limit`` / ``eval.batch_size`` / ``eval.workers``.
        unit: what a sample is, for the error message (``"frames"``, ``"scans"``).

    Raises:
        ValueError: nothing to evaluate (an empty split or ``limit < 1``).
    """
    e = cfg["eval"]
    limit = e["limit"] if limit is None else limit
    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    if n < 1:
        raise ValueError(f"nothing to evaluate: split {split!r} of {dataset.root} has {len(dataset)} {unit} "
                         f"(limit {limit})")
    ds = torch.utils.data.Subset(dataset, range(n)) if n < len(dataset) else dataset
    env = env or DistEnv()
    return torch.utils.data.DataLoader(ds, batch_size=int(batch_size or e["batch_size"]),
                                       sampler=ShardSampler(n, env.rank, env.world_size),
                                       num_workers=int(e["workers"] if workers is None else workers),
                                       collate_fn=collate_fn)


# ----------------------------------------------------------------------------- evaluation
def model_device(model: torch.nn.Module, device: Optional[Any] = None) -> torch.device:
    """``device`` as a :class:`torch.device`, or (None) the device of the model's first parameter (CPU
    for a model without parameters)."""
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    return torch.device(device)


def synchronize(device: torch.device) -> None:
    """Waits for the queued work of an accelerator ``device`` (a no-op on the CPU), for timing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speed_stats(times: Sequence[Tuple[float, int]], device: torch.device) -> Dict[str, Any]:
    """``{"ms_per_scan", "threads", "device", "batch_size"}`` of per-batch ``(seconds per scan, batch
    size)`` pairs: the median over the batches, the first left out as warm-up when there are more
    than two (NaN without batches); the batch size of the first batch (0 without)."""
    per_scan = [t for t, _ in (times[1:] if len(times) > 2 else times)]
    return {
        "ms_per_scan": 1000.0 * statistics.median(per_scan) if per_scan else float("nan"),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "batch_size": int(times[0][1]) if times else 0,
    }


def epoch_evaluator(make_loader: Callable[[], Any], run: Callable[[torch.nn.Module, Any], Optional[Dict[str, Any]]],
                    unit: str, summarize: Callable[[Dict[str, Any], int], Dict[str, Any]]):
    """``evaluate_fn(model, epoch)`` for :class:`~sparseconv.engine.trainer.Trainer`.

    The loader is built on the first call (``make_loader()``) and kept; ``run(model, loader)`` returns the
    evaluation (None on ranks other than 0, which then return None); rank 0 prints
    ``evaluation after epoch E (N <unit>, T ms/scan):`` and ``out["table"]`` and returns
    ``summarize(out, epoch)``.
    """
    state: Dict[str, Any] = {}

    def evaluate_fn(model: torch.nn.Module, epoch: int) -> Optional[Dict[str, Any]]:
        if "loader" not in state:
            state["loader"] = make_loader()
        out = run(model, state["loader"])
        if out is None:
            return None
        print(f"\nevaluation after epoch {epoch} ({out[unit]} {unit}, {out['ms_per_scan']:.1f} ms/scan):\n"
              f"{out['table']}", flush=True)
        return summarize(out, epoch)

    return evaluate_fn
