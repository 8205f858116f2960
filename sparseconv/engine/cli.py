"""The command-line glue of the engine's tools (``tools/train_det.py``, ``tools/train_seg.py``,
``tools/eval_det.py``, ``tools/eval_seg.py``): their shared flags, the config overrides the flags
make, and the main loops.

* training: :func:`add_train_arguments` (``--config`` ... ``--no-progress``), :func:`train_overrides`,
  :func:`run_training` (seed, model, data, :class:`~sparseconv.engine.trainer.Trainer`, in a process
  group when started by ``torchrun``);
* evaluation: :func:`add_eval_source_arguments` (``--config``, ``--ckpt``, ``--split``, ``--limit``,
  ``--json``) and :func:`add_eval_run_arguments` (``--batch-size`` ... ``--no-progress``), with a
  tool's own flags between them; :func:`eval_overrides`; :func:`eval_session` (checkpoint, process
  group, loader) and :func:`write_json`.

Example:
    >>> parser = tool_parser(__doc__)
    >>> add_train_arguments(parser, "experiment YAML (configs/*.yaml)")
    >>> args = parser.parse_args(["--config", "configs/second_synth.yaml", "--max-steps", "2"])
    >>> train_overrides(args)
    []
    >>> run_training(args, load_det_config, build, make_det_evaluator)   # build(cfg, env) -> (model, ...)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

__all__ = ["tool_parser", "add_train_arguments", "train_overrides", "run_training", "add_eval_source_arguments",
           "add_eval_run_arguments", "eval_overrides", "EvalSession", "eval_session", "write_json", "set_threads"]


def tool_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the first line of ``doc`` (a tool's module docstring) and whose
    epilog is the rest after the blank line (the examples), kept as written."""
    head, _, rest = doc.partition("\n")
    return argparse.ArgumentParser(description=head, epilog=rest.lstrip("\n"),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def set_threads(args: argparse.Namespace):
    """``torch.set_num_threads(args.threads)`` when given; returns the ``torch`` module."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    return torch


def _add_set_argument(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"), help=help)


# ----------------------------------------------------------------------------- training
def add_train_arguments(p: argparse.ArgumentParser, config_help: str) -> argparse.ArgumentParser:
    """The flags of a training tool: ``--config`` (help ``config_help``), ``--epochs``, ``--batch-size``,
    ``--workers``, ``--resume``, ``--launcher``, ``--amp``, ``--sync-bn``, ``--device``, ``--output``,
    ``--set``, ``--max-steps``, ``--threads``, ``--no-progress``. Returns ``p``."""
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--batch-size", type=int, help="override train.batch_size (per process)")
    p.add_argument("--workers", type=int, help="override train.workers (DataLoader processes)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                   help="continue from the newest checkpoint of the output folder (or from CKPT)")
    p.add_argument("--launcher", choices=("none", "pytorch"), default="none",
                   help="pytorch: started by torchrun (one process per device)")
    p.add_argument("--amp", action="store_true", help="mixed precision (train.amp)")
    p.add_argument("--sync-bn", action="store_true", help="synchronise batch norms across processes (train.sync_bn)")
    p.add_argument("--device", help="override train.device (auto, cpu, cuda)")
    p.add_argument("--output", help="output folder (default: the config's output_dir, else output/<config name>)")
    _add_set_argument(p, "override a config value, e.g. --set train.lr 0.001 (value read as YAML); repeatable")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (with a checkpoint)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice / OMP_NUM_THREADS)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def train_overrides(args: argparse.Namespace) -> List[Tuple[str, Any]]:
    """The ``--set`` pairs followed by those of the dedicated flags (which therefore win)."""
    overrides = list(args.set)
    for key, value in (("train.epochs", args.epochs), ("train.batch_size", args.batch_size),
                       ("train.workers", args.workers), ("train.device", args.device),
                       ("output_dir", args.output)):
        if value is not None:
            overrides.append((key, value))
    if args.amp:
        overrides.append(("train.amp", True))
    if args.sync_bn:
        overrides.append(("train.sync_bn", True))
    return overrides


def run_training(args: argparse.Namespace, load_config: Callable, build: Callable, make_evaluator: Callable) -> int:
    """The main loop of a training tool.

    Sets the threads, loads the config (``load_config(args.config, train_overrides(args))``), joins the
    process group, seeds ``train.seed + rank``, builds ``(model, train_set, collate_fn, about) =
    build(cfg, env)`` and, when ``eval.every_epochs > 0``, ``make_evaluator(cfg, env, progress=...)``,
    prints a start-up line on rank 0 (``about`` describes the data), trains with
    :class:`~sparseconv.engine.trainer.Trainer` and prints where the last checkpoint is.

    Returns:
        0 (the exit status).
    """
    torch = set_threads(args)
    from .distributed import cleanup_distributed, init_distributed
    from .trainer import Trainer, set_seed

    cfg = load_config(args.config, train_overrides(args))
    env = init_distributed(args.launcher, cfg["train"]["device"], cfg["train"]["dist_timeout_min"])
    try:
        set_seed(int(cfg["train"]["seed"]) + env.rank)
        model, train_set, collate_fn, about = build(cfg, env)
        evaluate_fn = make_evaluator(cfg, env, progress=not args.no_progress) \
            if cfg["eval"]["every_epochs"] > 0 else None
        if env.is_main:
            n_params = sum(p.numel() for p in model.parameters())
            print(f"{cfg['model']['name']}: {n_params / 1e6:.2f} M parameters; {about}; {env.world_size} process(es) "
                  f"on {env.device}, {torch.get_num_threads()} threads each; output {cfg['output_dir']}", flush=True)
        trainer = Trainer(model, train_set, collate_fn, cfg["train"], cfg["output_dir"], env=env,
                          config=cfg, evaluate_fn=evaluate_fn, eval_every=cfg["eval"]["every_epochs"],
                          progress=not args.no_progress, max_steps=args.max_steps)
        summary = trainer.fit(resume=args.resume)
        if env.is_main:
            print(f"done: epoch {summary['epoch']}, global step {summary['global_step']}, last checkpoint "
                  f"{summary['last_checkpoint']}", flush=True)
    finally:
        cleanup_distributed(env)
    return 0


# ----------------------------------------------------------------------------- evaluation
def add_eval_source_arguments(p: argparse.ArgumentParser, trained_by: str, split_help: str,
                              unit: str) -> argparse.ArgumentParser:
    """``--config``, ``--ckpt`` (a checkpoint of the tool ``trained_by``), ``--split`` (help
    ``split_help``), ``--limit`` (the first N ``unit``), ``--json``. Returns ``p``."""
    p.add_argument("--config", help="experiment YAML (default: the config stored in the checkpoint)")
    p.add_argument("--ckpt", required=True, help=f"checkpoint written by {trained_by}")
    p.add_argument("--split", help=split_help)
    p.add_argument("--limit", type=int, help=f"only the first N {unit} of the split")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    return p


def add_eval_run_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--batch-size``, ``--workers``, ``--device``, ``--launcher``, ``--set``, ``--threads``,
    ``--no-progress``. Returns ``p``."""
    p.add_argument("--batch-size", type=int, help="override eval.batch_size (1: per-scan latency)")
    p.add_argument("--workers", type=int, help="override eval.workers")
    p.add_argument("--device", help="override train.device (auto, cpu, cuda)")
    p.add_argument("--launcher", choices=("none", "pytorch"), default="none", help="pytorch: under torchrun")
    _add_set_argument(p, "override a config value (value read as YAML); repeatable")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def eval_overrides(args: argparse.Namespace, extra: Sequence[Tuple[str, Any]] = ()) -> List[Tuple[str, Any]]:
    """The ``--set`` pairs followed by ``eval.batch_size``, ``eval.workers``, the ``extra`` ``(key, value)``
    pairs and ``train.device`` of the dedicated flags that were given (None values are left out)."""
    overrides = list(args.set)
    for key, value in (("eval.batch_size", args.batch_size), ("eval.workers", args.workers), *extra,
                       ("train.device", args.device)):
        if value is not None:
            overrides.append((key, value))
    return overrides


@dataclasses.dataclass
class EvalSession:
    """What :func:`eval_session` sets up: the config, the model (on ``env.device``), the checkpoint
    ``state``, where the config came from (``source``), the process group ``env``, the ``split`` and a
    ``loader`` over it."""

    args: argparse.Namespace
    cfg: Dict[str, Any]
    model: Any
    state: Dict[str, Any]
    source: str
    env: Any
    split: str
    loader: Any

    def checkpoint_note(self) -> str:
        """``(checkpoint CKPT, epoch E, global step S)``."""
        return (f"(checkpoint {self.args.ckpt}, epoch {self.state.get('epoch')}, "
                f"global step {self.state.get('global_step')})")

    def speed_line(self, out: Dict[str, Any], what: str) -> str:
        """``inference: T ms per scan (median<what>; batch size B, N threads, DEVICE, W process(es))``."""
        return (f"inference: {out['ms_per_scan']:.1f} ms per scan (median{what}; batch size {out['batch_size']}, "
                f"{out['threads']} threads, {out['device']}, {self.env.world_size} process(es))")

    def report(self, out: Dict[str, Any], **extra: Any) -> Dict[str, Any]:
        """The JSON report: ``config`` (source), ``ckpt``, ``model``, ``split``, ``epoch``, ``global_step``,
        the ``extra`` entries, then every entry of ``out`` but ``table``."""
        return {"config": self.source, "ckpt": self.args.ckpt, "model": self.cfg["model"]["name"],
                "split": self.split, "epoch": self.state.get("epoch"), "global_step": self.state.get("global_step"),
                **extra, **{k: v for k, v in out.items() if k != "table"}}


@contextlib.contextmanager
def eval_session(args: argparse.Namespace, prog: str, load_checkpoint: Callable, build_eval_loader: Callable,
                 extra_overrides: Sequence[Tuple[str, Any]] = ()) -> Iterator[EvalSession]:
    """Sets an evaluation tool up and leaves the process group afterwards.

    Sets the threads; ``(cfg, model, state, source) = load_checkpoint(args.ckpt, args.config,
    eval_overrides(args, extra_overrides))`` (an OSError or ValueError exits with ``prog: message``);
    joins the process group; moves the model to its device; builds ``build_eval_loader(cfg, split,
    env=env, limit=args.limit)`` over ``args.split`` (default ``data.val_split``).

    Example:
        >>> with eval_session(args, "eval_det", load_det_checkpoint, build_eval_loader) as s:
        ...     out = evaluate_with_config(s.model, s.loader, s.cfg, device=s.env.device, env=s.env)
    """
    set_threads(args)
    from .distributed import cleanup_distributed, init_distributed

    try:
        cfg, model, state, source = load_checkpoint(args.ckpt, args.config, eval_overrides(args, extra_overrides))
    except (OSError, ValueError) as e:
        raise SystemExit(f"{prog}: {e}") from None
    env = init_distributed(args.launcher, cfg["train"]["device"], cfg["train"]["dist_timeout_min"])
    try:
        model.to(env.device)
        split = args.split or cfg["data"]["val_split"]
        loader = build_eval_loader(cfg, split, env=env, limit=args.limit)
        yield EvalSession(args, cfg, model, state, source, env, split, loader)
    finally:
        cleanup_distributed(env)


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as indented strict JSON (:func:`~sparseconv.engine.trainer.json_safe`), atomically."""
    from sparseconv.io import atomic_write

    from .trainer import json_safe

    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(json_safe(obj), f, indent=1)
