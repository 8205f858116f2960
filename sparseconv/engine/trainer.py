"""A generic, resumable training loop (AdamW + one-cycle, AMP, gradient clipping, DDP, checkpoints, logs).

The model contract (shared by the detectors and the segmentation networks): in training mode
``out = model(batch)`` returns a dict with ``out["loss"]`` (a scalar tensor) and optionally
``out["terms"]`` (``{name: 0-dim tensor}``, logged). ``batch`` is whatever the ``collate_fn``
returns; tensors and :class:`~sparseconv.SparseTensor` values in it are moved to the device.

**Exact resumption.** A checkpoint holds the model, optimizer, scheduler and AMP-scaler states, the
position (epoch and the number of batches done in it), the RNG states of every rank (torch, CUDA,
NumPy, ``random``) and the running epoch means. The sample order of epoch ``e`` depends only on
``(seed, e)`` (:class:`~sparseconv.engine.distributed.EpochSampler`), the augmentation of sample
``i`` only on ``(seed, e, i)`` (``dataset.set_epoch``, as
:class:`~sparseconv.datasets.KittiDetection` does), so a resumed run skips the batches already done
without loading them and continues with the same batches and random draws. On the CPU with
``workers=0`` a run of ``E`` epochs and a run stopped at any checkpoint and resumed end with
bitwise-equal weights (tested); data-loading workers do not change the data (their draws are
seeded per sample), so the same holds with workers.

Example:
    >>> trainer = Trainer(model, dataset, collate_fn, cfg["train"], "output/run1")
    >>> summary = trainer.fit(resume=True)        # continues from output/run1's newest checkpoint
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import numpy as np
import torch

from .checkpoint import CheckpointManager, load_checkpoint
from .distributed import (DistEnv, EpochSampler, all_gather_objects, all_reduce_mean, barrier, unwrap_model,
                          wrap_model)

__all__ = ["TRAIN_SCHEMA", "Trainer", "set_seed", "get_rng_state", "set_rng_state", "to_device",
           "build_optimizer", "build_scheduler", "CSVLogger", "amp_dtype", "json_safe"]

#: Defaults (and allowed keys) of the ``train`` config section.
TRAIN_SCHEMA: Dict[str, Any] = {
    "epochs": 20,
    "batch_size": 4,               # per process
    "lr": 0.003,                   # the one-cycle maximum
    "weight_decay": 0.01,
    "betas": [0.95, 0.99],
    "pct_start": 0.4,
    "div_factor": 10.0,            # initial lr = lr / div_factor
    "final_div_factor": 1.0e4,     # final lr = initial lr / final_div_factor
    "cycle_momentum": True,
    "momentum_range": [0.85, 0.95],  # beta1 cycles between these (low at the lr peak)
    "grad_clip": 10.0,             # max gradient norm; 0 = no clipping
    "workers": 2,
    "seed": 0,
    "ckpt_keep": 3,
    "ckpt_every_steps": 0,         # also checkpoint every N optimizer steps (0: only at epoch ends)
    "log_every": 10,
    "amp": False,
    "amp_dtype": "auto",           # auto: float16 on CUDA (with a GradScaler), bfloat16 elsewhere
    "device": "auto",
    "sync_bn": False,
    "find_unused_parameters": False,
    "tensorboard": True,           # when torch.utils.tensorboard imports
    "dist_timeout_min": 60.0,
}


# ----------------------------------------------------------------------------- helpers
def set_seed(seed: int) -> None:
    """Seeds ``random``, NumPy's global generator and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def get_rng_state(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """The global RNG states: torch CPU, CUDA (when ``device`` is a CUDA device), NumPy, ``random``."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device is not None and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, Any], device: Optional[torch.device] = None) -> None:
    """Restores what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def to_device(obj: Any, device: torch.device) -> Any:
    """Moves tensors and :class:`~sparseconv.SparseTensor` values in nested dicts / lists / tuples to
    ``device``; other values (NumPy arrays, strings, calibration dicts) are returned as they are."""
    from sparseconv.tensor import SparseTensor

    if isinstance(obj, (torch.Tensor, SparseTensor)):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_device(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_device(v, device) for v in obj)
    return obj


def amp_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"``: float16 on CUDA, bfloat16 elsewhere; else ``"float16"`` / ``"bfloat16"``."""
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16
    table = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"train.amp_dtype must be auto, float16 or bfloat16, got {name!r}")
    return table[name]


def build_optimizer(model: torch.nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters with ``cfg`` ``lr``, ``betas``, ``weight_decay``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    betas = tuple(float(b) for b in cfg["betas"])
    if len(betas) != 2:
        raise ValueError(f"train.betas must be two numbers, got {cfg['betas']}")
    return torch.optim.AdamW(params, lr=float(cfg["lr"]), betas=betas, weight_decay=float(cfg["weight_decay"]))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any],
                    total_steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """One-cycle schedule stepped once per optimizer step (``total_steps`` in all): lr from
    ``lr / div_factor`` up to ``lr`` over ``pct_start`` of the steps, then cosine down to
    ``lr / div_factor / final_div_factor``; beta1 cycles inversely within ``momentum_range``."""
    lo, hi = (float(m) for m in cfg["momentum_range"])
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=float(cfg["lr"]), total_steps=int(total_steps), pct_start=float(cfg["pct_start"]),
        div_factor=float(cfg["div_factor"]), final_div_factor=float(cfg["final_div_factor"]),
        cycle_momentum=bool(cfg["cycle_momentum"]), base_momentum=lo, max_momentum=hi)


class CSVLogger:
    """Appends dict rows to a CSV file (the header grows when a row brings new keys: the file is rewritten).

    Args:
        path: the CSV file.
        truncate_after: on resume, drop the rows whose ``global_step`` is larger (those logged after the
            checkpoint the run continues from).
    """

    def __init__(self, path: str, truncate_after: Optional[int] = None):
        self.path = path
        self.fields: List[str] = []
        rows: List[Dict[str, str]] = []
        if os.path.isfile(path):
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                self.fields = list(reader.fieldnames or [])
                rows = list(reader)
        if truncate_after is not None and rows:
            kept = [r for r in rows if _int(r.get("global_step")) <= truncate_after]
            if len(kept) != len(rows):
                self._rewrite(kept)

    def _rewrite(self, rows: List[Mapping[str, Any]]) -> None:
        from sparseconv.io import atomic_write

        with atomic_write(self.path, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, self.fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def log(self, row: Mapping[str, Any]) -> None:
        row = {k: _fmt(v) for k, v in row.items()}
        new = [k for k in row if k not in self.fields]
        if new or not os.path.isfile(self.path):
            old = []
            if os.path.isfile(self.path):
                with open(self.path, newline="", encoding="utf-8") as f:
                    old = list(csv.DictReader(f))
            self.fields += new
            self._rewrite(old + [row])
            return
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, self.fields, extrasaction="ignore").writerow(row)


def _int(v: Any) -> int:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return -1


def _fmt(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


class _TensorBoard:
    """``torch.utils.tensorboard.SummaryWriter`` when it imports, otherwise nothing."""

    def __init__(self, log_dir: str, enabled: bool, purge_step: Optional[int]):
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard is optional
                return
            self.writer = SummaryWriter(log_dir, purge_step=purge_step)

    def scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """Trains a model over epochs with checkpoints, logs and exact resumption.

    Args:
        model: the network (not yet wrapped; moved to the device, batch norms synchronised and wrapped
            in ``DistributedDataParallel`` in a process group).
        train_set: map-style dataset; its ``set_epoch(e)`` is called each epoch when it exists.
        collate_fn: batches samples (picklable when ``workers > 0``).
        cfg: the ``train`` section (:data:`TRAIN_SCHEMA` keys; missing ones take the defaults).
        output_dir: checkpoints (``ckpt_e*_s*.pt``), ``log.csv``, ``tb/`` (TensorBoard), ``config.yaml``.
        env: the process's :class:`~sparseconv.engine.distributed.DistEnv` (default: one process on
            ``cfg["device"]``).
        config: the whole experiment config, stored in checkpoints and written to ``config.yaml``.
        evaluate_fn: ``evaluate_fn(model, epoch) -> dict of metrics or None``, called on every rank
            (unwrapped model) after epochs ``eval_every, 2 * eval_every, ...`` and the last one.
        eval_every: evaluation period in epochs (0: never).
        progress: show a tqdm bar (rank 0 only).
        max_steps: stop (with a checkpoint) after this many optimizer steps in all (for smoke runs and
            to stop a run at a chosen point; the schedule still spans all epochs).

    Example:
        >>> t = Trainer(model, ds, partial(collate, voxel_size=vs, point_range=pr), cfg["train"], "output/x")
        >>> t.fit()
    """

    def __init__(self, model: torch.nn.Module, train_set, collate_fn: Callable, cfg: Mapping[str, Any],
                 output_dir: str, env: Optional[DistEnv] = None, config: Optional[Mapping[str, Any]] = None,
                 evaluate_fn: Optional[Callable[[torch.nn.Module, int], Optional[Dict[str, Any]]]] = None,
                 eval_every: int = 0, progress: bool = True, max_steps: Optional[int] = None):
        from .config import validate_config

        self.cfg = validate_config({"train": dict(cfg)}, {"train": TRAIN_SCHEMA}, source="the train config")["train"]
        c = self.cfg
        for key in ("epochs", "batch_size", "ckpt_keep", "log_every"):
            if c[key] < 1:
                raise ValueError(f"train.{key} must be >= 1, got {c[key]}")
        if c["workers"] < 0 or c["ckpt_every_steps"] < 0 or c["grad_clip"] < 0:
            raise ValueError("train.workers, train.ckpt_every_steps and train.grad_clip must be >= 0")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if env is None:
            from .distributed import resolve_device

            env = DistEnv(device=resolve_device(c["device"]))
        self.env, self.output_dir, self.config = env, os.fspath(output_dir), config
        self.train_set, self.collate_fn = train_set, collate_fn
        self.evaluate_fn, self.eval_every = evaluate_fn, int(eval_every)
        self.progress, self.max_steps = progress, max_steps
        self.device = env.device

        self.model = wrap_model(model, env, sync_bn=c["sync_bn"], find_unused_parameters=c["find_unused_parameters"])
        self.sampler = EpochSampler(len(train_set), shuffle=True, seed=c["seed"], rank=env.rank,
                                    world_size=env.world_size)
        self.loader_generator = torch.Generator()
        self.loader = torch.utils.data.DataLoader(
            train_set, batch_size=c["batch_size"], sampler=self.sampler, num_workers=c["workers"],
            collate_fn=collate_fn, drop_last=False, generator=self.loader_generator,
            pin_memory=self.device.type == "cuda", persistent_workers=False)
        self.steps_per_epoch = math.ceil(self.sampler.per_rank / c["batch_size"])
        self.total_steps = c["epochs"] * self.steps_per_epoch
        self.optimizer = build_optimizer(self.model, c)
        self.scheduler = build_scheduler(self.optimizer, c, self.total_steps)
        self.amp_dtype = amp_dtype(c["amp_dtype"], self.device)
        use_scaler = bool(c["amp"]) and self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.ckpt = CheckpointManager(self.output_dir, keep=c["ckpt_keep"])
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.meter = self._new_meter()
        self.csv: Optional[CSVLogger] = None
        self.tb: Optional[_TensorBoard] = None

    # ------------------------------------------------------------------ state
    @staticmethod
    def _new_meter() -> Dict[str, Any]:
        return {"steps": 0, "samples": 0, "seconds": 0.0, "sums": {}}

    def state_dict(self) -> Dict[str, Any]:
        """Everything a resumed run needs (called on every rank: it gathers the ranks' RNG states)."""
        rngs = all_gather_objects(get_rng_state(self.device))
        return {
            "format": "sparseconv.engine.trainer/1",
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "world_size": self.env.world_size,
            "rng": rngs,
            "meter": self.meter,
            "config": self.config,
        }

    def load_state_dict(self, state: Mapping[str, Any], source: str = "the checkpoint") -> None:
        """Restores a :meth:`state_dict` (same world size, batch size and dataset length required)."""
        for key, mine in (("steps_per_epoch", self.steps_per_epoch), ("total_steps", self.total_steps),
                          ("world_size", self.env.world_size)):
            if key in state and int(state[key]) != mine:
                raise ValueError(f"cannot resume exactly from {source}: it was written with {key}={state[key]}, "
                                 f"this run has {key}={mine} (keep the dataset, train.batch_size, train.epochs and "
                                 f"the number of processes unchanged to resume)")
        unwrap_model(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.meter = state.get("meter") or self._new_meter()
        rngs = state.get("rng") or []
        if rngs:
            set_rng_state(rngs[self.env.rank if self.env.rank < len(rngs) else 0], self.device)

    def save(self) -> Optional[str]:
        """Writes a checkpoint of the current position (rank 0 writes; every rank must call)."""
        state = self.state_dict()
        path = None
        if self.env.is_main:
            path = self.ckpt.save(state, self.epoch, self.global_step)
        barrier()
        return path

    def _resume(self, resume: Union[bool, str, None]) -> Optional[str]:
        if not resume:
            return None
        path = resume if isinstance(resume, str) else self.ckpt.latest()
        if path is None:
            self._print(f"no checkpoint in {self.output_dir}: starting from scratch")
            return None
        self.load_state_dict(load_checkpoint(path, map_location="cpu"), source=path)
        self._print(f"resumed from {path}: epoch {self.epoch + 1}, {self.step_in_epoch} of "
                    f"{self.steps_per_epoch} batches done, global step {self.global_step}")
        return path

    # ------------------------------------------------------------------ io
    def _print(self, *msg) -> None:
        if self.env.is_main:
            from tqdm import tqdm

            tqdm.write(" ".join(str(m) for m in msg), file=sys.stdout)
            sys.stdout.flush()

    def _log(self, row: Dict[str, Any], tb_prefix: str) -> None:
        if not self.env.is_main:
            return
        self.csv.log(row)
        skip = ("kind", "epoch", "step", "global_step")
        self.tb.scalars(tb_prefix, {k: v for k, v in row.items() if k not in skip}, self.global_step)

    # ------------------------------------------------------------------ training
    def _train_step(self, batch: Any) -> Dict[str, Any]:
        c = self.cfg
        batch = to_device(batch, self.device)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=bool(c["amp"])):
            out = self.model(batch)
        if not isinstance(out, Mapping) or "loss" not in out:
            raise TypeError(f"in training mode the model must return a dict with 'loss' (and 'terms'), "
                            f"got {type(out).__name__}")
        loss = out["loss"].float()
        lr = self.optimizer.param_groups[0]["lr"]  # the rate of this step (the scheduler moves it after)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = c["grad_clip"] if c["grad_clip"] > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if not self.scaler.is_enabled() and not torch.isfinite(norm):
            terms = {k: float(v) for k, v in (out.get("terms") or {}).items()}
            raise FloatingPointError(f"non-finite gradient norm at epoch {self.epoch + 1}, global step "
                                     f"{self.global_step + 1}: loss {loss.item():.6g}, terms {terms}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        terms = {k: v.detach().float() for k, v in sorted((out.get("terms") or {}).items())}
        return {"loss": loss.detach(), "terms": terms, "grad_norm": norm.detach().float(), "lr": lr}

    def _accumulate(self, res: Mapping[str, Any], samples: int, seconds: float) -> None:
        m = self.meter
        m["steps"] += 1
        m["samples"] += samples
        m["seconds"] += seconds
        vals = {"loss": float(res["loss"]), **{k: float(v) for k, v in res["terms"].items()}}
        for k, v in vals.items():
            m["sums"][k] = m["sums"].get(k, 0.0) + v

    def _epoch_end(self, epoch: int) -> None:
        m = self.meter
        keys = sorted(m["sums"])
        means = all_reduce_mean(torch.tensor([m["sums"][k] / max(m["steps"], 1) for k in keys],
                                             dtype=torch.float64, device=self.device))
        samples = m["samples"] * self.env.world_size
        row = {"kind": "epoch", "epoch": epoch + 1, "step": self.steps_per_epoch, "global_step": self.global_step,
               **{k: float(v) for k, v in zip(keys, means.tolist())},
               "samples_per_s": samples / max(m["seconds"], 1e-9), "seconds": m["seconds"]}
        self._log(row, "epoch")
        self._print(f"epoch {epoch + 1}/{self.cfg['epochs']}: loss {row.get('loss', float('nan')):.4f}, "
                    f"{row['samples_per_s']:.2f} samples/s, {m['seconds']:.0f} s")

    def _evaluate(self, epoch_done: int) -> None:
        if self.evaluate_fn is None or self.eval_every <= 0:
            return
        if epoch_done % self.eval_every and epoch_done != self.cfg["epochs"]:
            return
        model = unwrap_model(self.model)
        rng = get_rng_state(self.device)  # evaluation must not change the training's random draws
        metrics = self.evaluate_fn(model, epoch_done)
        set_rng_state(rng, self.device)
        model.train()
        if metrics and self.env.is_main:
            from sparseconv.io import atomic_write

            with atomic_write(os.path.join(self.output_dir, f"eval_epoch_{epoch_done:03d}.json"), "w",
                              encoding="utf-8") as f:
                json.dump(json_safe(metrics), f, indent=1)
            flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            self.tb.scalars("eval", flat, self.global_step)

    def fit(self, resume: Union[bool, str, None] = False) -> Dict[str, Any]:
        """Trains until ``train.epochs`` (or ``max_steps``).

        Args:
            resume: ``True``: continue from the newest checkpoint in ``output_dir`` (from scratch when
                there is none); a path: from that checkpoint; ``False``: from scratch.

        Returns:
            ``{"epoch", "global_step", "steps_per_epoch", "stopped_early", "last_checkpoint", "loss"}``.
        """
        c = self.cfg
        resumed = self._resume(resume)
        if not resumed and self.ckpt.list():
            raise FileExistsError(f"{self.output_dir} holds checkpoints of an earlier run "
                                  f"({os.path.basename(self.ckpt.latest())}): resume it (--resume) or choose "
                                  f"another output folder")
        if self.env.is_main:
            os.makedirs(self.output_dir, exist_ok=True)
            if self.config is not None:
                from .config import dump_config

                dump_config(self.config, os.path.join(self.output_dir, "config.yaml"))
            self.csv = CSVLogger(os.path.join(self.output_dir, "log.csv"),
                                 truncate_after=self.global_step if resumed else None)
            if not resumed and os.path.isfile(self.csv.path):
                os.remove(self.csv.path)
                self.csv = CSVLogger(self.csv.path)
            self.tb = _TensorBoard(os.path.join(self.output_dir, "tb"), c["tensorboard"],
                                   purge_step=self.global_step if resumed else None)
        self.model.train()
        last_ckpt, last_loss, stopped = resumed, float("nan"), False
        try:
            while self.epoch < c["epochs"] and not stopped:
                last_ckpt, last_loss, stopped = self._run_epoch(last_ckpt, last_loss)
        finally:
            if self.tb is not None:
                self.tb.close()
        return {"epoch": self.epoch, "global_step": self.global_step, "steps_per_epoch": self.steps_per_epoch,
                "stopped_early": stopped, "last_checkpoint": last_ckpt, "loss": last_loss}

    def _run_epoch(self, last_ckpt, last_loss):
        from tqdm import tqdm

        c, epoch, first = self.cfg, self.epoch, self.step_in_epoch
        if first == 0:
            self.meter = self._new_meter()
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(epoch)
        self.sampler.set_epoch(epoch, start=first * c["batch_size"])
        self.loader_generator.manual_seed(c["seed"] * 1_000_003 + epoch * 1_009 + self.env.rank)
        bar = tqdm(total=self.steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{c['epochs']}",
                   disable=not (self.progress and self.env.is_main), dynamic_ncols=True, leave=False,
                   file=sys.stderr)
        window_t, window_n = time.perf_counter(), 0
        tick = time.perf_counter()
        try:
            for k, batch in enumerate(self.loader, start=first):
                res = self._train_step(batch)
                self.global_step += 1
                self.step_in_epoch = k + 1
                now = time.perf_counter()
                samples = int(batch["batch_size"]) if isinstance(batch, Mapping) and "batch_size" in batch \
                    else c["batch_size"]
                self._accumulate(res, samples, now - tick)
                tick = now
                window_n += samples * self.env.world_size
                last_loss = float(res["loss"])
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}", sps=f"{window_n / max(now - window_t, 1e-9):.2f}",
                                refresh=False)
                if self.global_step % c["log_every"] == 0:
                    keys = ["loss", "grad_norm", *res["terms"]]
                    vals = torch.stack([res["loss"].float(), res["grad_norm"], *res["terms"].values()])
                    vals = all_reduce_mean(vals.to(self.device)).tolist()
                    row = {"kind": "step", "epoch": epoch + 1, "step": k + 1, "global_step": self.global_step,
                           "lr": res["lr"], **dict(zip(keys, vals)),
                           "samples_per_s": window_n / max(now - window_t, 1e-9), "seconds": now - window_t}
                    self._log(row, "train")
                    window_t, window_n = time.perf_counter(), 0
                done = self.max_steps is not None and self.global_step >= self.max_steps
                if k + 1 == self.steps_per_epoch:
                    break
                if done or (c["ckpt_every_steps"] and self.global_step % c["ckpt_every_steps"] == 0):
                    last_ckpt = self.save()
                if done:
                    self._print(f"stopped at global step {self.global_step} (max_steps); checkpoint {last_ckpt}")
                    return last_ckpt, last_loss, True
                tick = time.perf_counter()
        finally:
            bar.close()
        # end of the epoch
        self._epoch_end(epoch)
        self.epoch, self.step_in_epoch = epoch + 1, 0
        last_ckpt = self.save()
        self._evaluate(epoch + 1)
        done = self.max_steps is not None and self.global_step >= self.max_steps
        if done and self.epoch < c["epochs"]:
            self._print(f"stopped at global step {self.global_step} (max_steps); checkpoint {last_ckpt}")
            return last_ckpt, last_loss, True
        return last_ckpt, last_loss, False


def json_safe(o: Any) -> Any:
    """``o`` with NumPy / torch values as Python ones and NaN / infinities as None (strict JSON)."""
    if isinstance(o, Mapping):
        return {str(k): json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if isinstance(o, (np.ndarray, torch.Tensor)):
        return json_safe(o.tolist())
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(o) else None
    return o
