#!/usr/bin/env python
"""Export a detector training checkpoint as shipped weights (models/weights/NAME.pt; see docs/detection.md).

examples:
  python tools/export_det.py --ckpt output/second_synth/ckpt_e020_s00010200.pt --name second_synth
  python tools/eval_det.py --ckpt CKPT --json eval.json && \\
      python tools/export_det.py --ckpt CKPT --name second_synth --metrics eval.json
  python tools/export_det.py --ckpt CKPT --name test --out /tmp/weights --command "python tools/train_det.py ..."

The file holds the model name and constructor arguments (class_names, point_range, voxel_size,
in_channels, model.args), the weights in float32 (no optimizer state), the config's data section and
a provenance record: the checkpoint (name, SHA-256, epoch, global step), the resolved training
config, the training command, the evaluation figures of --metrics, versions and the export time.
It holds only tensors and plain containers, so sparseconv.models.pretrained.load_pretrained reads it
with torch.load(weights_only=True).

Without --command the training command is reconstructed: --config BASE (--base-config, default the
configs/*.yaml named like the run's output folder, else configs/<model>_synth.yaml) plus one --set for
every value of the checkpoint's config that differs from BASE, --output, and --max-steps when the run
stopped before its last step; it is checked to resolve to the checkpoint's config exactly.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any, Dict, List, Mapping, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by tools/train_det.py")
    p.add_argument("--name", required=True, help="weights name: the file is OUT/NAME.pt")
    p.add_argument("--out", default=os.path.join(ROOT, "models", "weights"),
                   help="folder to write to (default: the shipped models/weights)")
    p.add_argument("--metrics", metavar="JSON", help="evaluation figures to record (tools/eval_det.py --json)")
    p.add_argument("--command", help="the training command to record (default: reconstructed from the config)")
    p.add_argument("--base-config", metavar="YAML", help="config the reconstructed command starts from")
    p.add_argument("--force", action="store_true",
                   help="overwrite OUT/NAME.pt; accept --metrics of another global step than the checkpoint's")
    return p


# ----------------------------------------------------------------------------- the training command
def _flat_diff(stored: Any, base: Any, prefix: str) -> List[Tuple[str, Any]]:
    """``(dotted key, stored value)`` for every value of ``stored`` that differs from ``base``; a mapping
    whose keys differ (a free-form section) is given whole."""
    if isinstance(stored, Mapping) and isinstance(base, Mapping) and set(stored) == set(base):
        out = []
        for k in stored:
            out += _flat_diff(stored[k], base[k], f"{prefix}.{k}" if prefix else str(k))
        return out
    if stored == base and isinstance(stored, bool) == isinstance(base, bool):
        return []
    return [(prefix, stored)]


def _yaml_text(value: Any) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10 ** 9)
    return text[:-5] if text.endswith("\n...\n") else text.rstrip("\n")


def base_config_for(cfg: Mapping[str, Any], given: Optional[str] = None) -> Optional[str]:
    """The config file a reconstructed command starts from (``given``, else ``configs/<output folder
    name>.yaml``, else ``configs/<model>_synth.yaml``), or None when there is none."""
    if given:
        return given
    candidates = []
    if cfg.get("output_dir"):
        candidates.append(os.path.basename(os.path.normpath(str(cfg["output_dir"]))) + ".yaml")
    candidates.append(f"{cfg['model']['name']}_synth.yaml")
    for c in candidates:
        path = os.path.join(ROOT, "configs", c)
        if os.path.isfile(path):
            return path
    return None


def reconstruct_command(state: Mapping[str, Any], base: str) -> Tuple[str, bool]:
    """A ``tools/train_det.py`` command line that resolves to the checkpoint's config.

    Returns:
        ``(command, exact)``: ``exact`` when ``load_det_config(base, overrides)`` gives the stored config
        (``output_dir`` included).
    """
    from sparseconv.engine.det import load_det_config

    cfg = state["config"]
    ref = load_det_config(base, [("output_dir", cfg.get("output_dir"))])
    stored = {k: v for k, v in cfg.items() if k != "output_dir"}
    pairs = _flat_diff(stored, {k: v for k, v in ref.items() if k != "output_dir"}, "")
    rel = os.path.relpath(base, ROOT) if os.path.abspath(base).startswith(ROOT + os.sep) else base
    argv = ["python", "tools/train_det.py", "--config", rel]
    if cfg.get("output_dir"):
        argv += ["--output", str(cfg["output_dir"])]
    for key, value in pairs:
        argv += ["--set", key, _yaml_text(value)]
    total, step = state.get("total_steps"), state.get("global_step")
    if isinstance(total, int) and isinstance(step, int) and step < total:
        argv += ["--max-steps", str(step)]
    try:
        check = load_det_config(base, [(k, v) for k, v in pairs] + [("output_dir", cfg.get("output_dir"))])
        exact = _normalise(check) == _normalise(cfg)
    except Exception:
        exact = False
    return " ".join(shlex.quote(a) for a in argv), exact


def _normalise(cfg: Any) -> Any:
    from sparseconv.models.pretrained import plain

    return json.loads(json.dumps(plain(cfg), sort_keys=True))


# ----------------------------------------------------------------------------- main
def _read_metrics(path: str, state: Mapping[str, Any], force: bool) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            metrics = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"export_det: --metrics {path}: cannot read it as JSON ({e})")
    if not isinstance(metrics, dict):
        raise SystemExit(f"export_det: --metrics {path}: expected a JSON object (tools/eval_det.py --json), got "
                         f"{type(metrics).__name__}")
    step = metrics.get("global_step")
    if step is not None and state.get("global_step") is not None and int(step) != int(state["global_step"]) \
            and not force:
        raise SystemExit(f"export_det: --metrics {path} evaluates global step {step}, the checkpoint is at "
                         f"{state['global_step']} (use --force to record it anyway)")
    metrics = dict(metrics)
    metrics["source"] = os.path.basename(path)
    return metrics


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from sparseconv.engine.checkpoint import load_checkpoint
    from sparseconv.models.pretrained import (check_name, load_pretrained, pretrained_from_checkpoint,
                                              save_pretrained)

    try:
        name = check_name(args.name)
    except ValueError as e:
        raise SystemExit(f"export_det: --name: {e}")
    out = os.path.join(args.out, name + ".pt")
    if os.path.exists(out) and not args.force:
        raise SystemExit(f"export_det: {out} exists (use --force to replace it)")
    try:
        state = load_checkpoint(args.ckpt)
    except (OSError, ValueError) as e:
        raise SystemExit(f"export_det: {e}")
    if not isinstance(state.get("config"), Mapping) or "model" not in state:
        raise SystemExit(f"export_det: {args.ckpt} is not a tools/train_det.py checkpoint (needs 'model' and "
                         f"'config')")
    metrics = _read_metrics(args.metrics, state, args.force) if args.metrics else None
    if args.command:
        command, source = args.command, "given"
    else:
        base = base_config_for(state["config"], args.base_config)
        if base is None:
            command, source = None, "unknown"
        else:
            try:
                command, exact = reconstruct_command(state, base)
                source = "reconstructed" if exact else "reconstructed (approximate: the stored config is the reference)"
            except Exception as e:  # a stale or broken base config: keep the export going
                command, source = None, f"unknown ({type(e).__name__}: {e})"
    try:
        obj = pretrained_from_checkpoint(state, args.ckpt, command=command, metrics=metrics,
                                         extra={"command_source": source})
    except ValueError as e:
        raise SystemExit(f"export_det: {args.ckpt}: {e}")
    save_pretrained(obj, out)
    # read it back as users will, and compare the weights
    model, info = load_pretrained(out)
    sd = model.state_dict()
    for k, v in obj["state_dict"].items():
        if not torch.equal(sd[k].cpu(), v):
            raise SystemExit(f"export_det: {out}: {k} differs after loading it back")
    p = info["provenance"]
    size = os.path.getsize(out)
    print(f"wrote {out} ({size / 2 ** 20:.1f} MiB): {info['model']} with {info['num_parameters'] / 1e6:.2f} M "
          f"parameters, classes {', '.join(info['class_names'])}, point range {list(info['point_range'])}, "
          f"voxel size {list(info['voxel_size'])}")
    print(f"provenance: {p['checkpoint']} (epoch {p['epoch']}, global step {p['global_step']} of "
          f"{p['total_steps']}); command [{source}]: {command}")
    if metrics is not None:
        summary = metrics.get("summary") or {}
        key = "mAP/3d_R40_moderate"
        print(f"metrics: {metrics['source']}" + (f", {key} = {summary[key]:.2f}" if isinstance(summary.get(key),
                                                                                          (int, float)) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
