"""Training checkpoints: atomic writes, the newest ``N`` kept, the latest found for resuming.

A checkpoint is one ``torch.save`` file (a dict). :func:`save_checkpoint` writes it to a temporary
file beside the target and moves it into place with ``os.replace`` (:func:`sparseconv.io.atomic_write`),
so a run killed while saving leaves the previous checkpoint intact and never a partial file.

:class:`CheckpointManager` names the files of a run ``ckpt_e{epoch:03d}_s{global_step:08d}.pt``
(``epoch``: completed epochs; ``global_step``: optimizer steps done), finds the newest by global
step, and deletes all but the newest ``keep`` after each save.

Example:
    >>> mgr = CheckpointManager("output/run1", keep=3)
    >>> path = mgr.save({"model": model.state_dict(), "epoch": 1, "global_step": 500}, epoch=1, global_step=500)
    >>> state = load_checkpoint(mgr.latest())
"""
from __future__ import annotations

import glob
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "load_checkpoint_config", "CheckpointManager", "checkpoint_name"]

_NAME = re.compile(r"^ckpt_e(\d+)_s(\d+)\.pt$")


def save_checkpoint(state: Dict[str, Any], path: str) -> str:
    """Saves ``state`` with ``torch.save`` atomically (temporary file, fsync, ``os.replace``).

    If serialisation fails, the exception propagates, the temporary file is removed and an
    existing file at ``path`` is left untouched.

    Returns:
        ``path``.
    """
    from sparseconv.io import atomic_write

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "wb") as f:
        torch.save(state, f)
    return path


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Reads a checkpoint written by :func:`save_checkpoint` (full unpickling: only load files you trust).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a checkpoint dict (the path is named).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(2, f"no such checkpoint: {path}", path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a checkpoint (expected a dict, got {type(state).__name__})")
    return state


def load_checkpoint_config(ckpt: str, config: Optional[str], overrides: Optional[Sequence],
                           load_config: Callable[[str, Optional[Sequence]], Dict[str, Any]]
                           ) -> Tuple[Dict[str, Any], Dict[str, Any], str]:
    """Reads a training checkpoint and the experiment config that goes with it.

    Args:
        ckpt: a checkpoint of :class:`~sparseconv.engine.trainer.Trainer` (with a ``model`` entry).
        config: the experiment YAML; None: the config stored in the checkpoint, written to a
            temporary file and loaded like one (so it is validated and overridden the same way).
        overrides: ``[(key, value)]`` applied to the config.
        load_config: ``load_config(path, overrides)``, e.g. ``load_det_config`` or ``load_seg_config``.

    Returns:
        ``(cfg, state, config_source)``: ``config_source`` is ``config`` or ``"<ckpt> (stored config)"``.

    Raises:
        FileNotFoundError, ValueError: no such file / not a checkpoint (:func:`load_checkpoint`), no
            ``model`` entry, or no stored config and none given; ConfigError from ``load_config``.

    Example:
        >>> cfg, state, source = load_checkpoint_config("output/run1/ckpt_e001_s00000500.pt", None, [],
        ...                                             load_det_config)
    """
    import tempfile

    from .config import dump_config

    state = load_checkpoint(ckpt)
    if "model" not in state:
        raise ValueError(f"{ckpt}: not a training checkpoint (no 'model' entry)")
    if config is not None:
        return load_config(config, overrides), state, config
    if not state.get("config"):
        raise ValueError(f"{ckpt} holds no config: pass the experiment config (--config)")
    with tempfile.TemporaryDirectory() as tmp:  # the stored config, validated like a file
        path = os.path.join(tmp, "config.yaml")
        dump_config(state["config"], path)
        cfg = load_config(path, overrides)
    return cfg, state, f"{ckpt} (stored config)"


def checkpoint_name(epoch: int, global_step: int) -> str:
    """``ckpt_e{epoch:03d}_s{global_step:08d}.pt``."""
    return f"ckpt_e{int(epoch):03d}_s{int(global_step):08d}.pt"


class CheckpointManager:
    """The checkpoints of one run in ``directory``: save (atomic, keep the newest ``keep``), list, latest.

    Args:
        directory: the folder (created on the first save).
        keep: how many checkpoints to keep (>= 1); older ones are deleted after each save.
    """

    def __init__(self, directory: str, keep: int = 3):
        if int(keep) < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory, self.keep = os.fspath(directory), int(keep)

    def list(self) -> List[Tuple[int, int, str]]:
        """``[(global_step, epoch, path), ...]`` of the checkpoints present, oldest first."""
        out = []
        for p in glob.glob(os.path.join(self.directory, "ckpt_e*_s*.pt")):
            m = _NAME.match(os.path.basename(p))
            if m:
                out.append((int(m.group(2)), int(m.group(1)), p))
        return sorted(out)

    def latest(self) -> Optional[str]:
        """The path of the newest checkpoint (largest global step), or None."""
        items = self.list()
        return items[-1][2] if items else None

    def save(self, state: Dict[str, Any], epoch: int, global_step: int) -> str:
        """Writes ``state`` as :func:`checkpoint_name` ``(epoch, global_step)`` and prunes to ``keep``."""
        path = save_checkpoint(state, os.path.join(self.directory, checkpoint_name(epoch, global_step)))
        for _, _, old in self.list()[:-self.keep]:
            if os.path.abspath(old) != os.path.abspath(path):
                try:
                    os.remove(old)
                except FileNotFoundError:
                    pass
        return path
