#!/usr/bin/env python
"""Export a segmentation training checkpoint as shipped weights (models/weights/seg/NAME.pt; docs/segmentation.md).

examples:
  python tools/eval_seg.py --ckpt CKPT --json eval.json && \\
      python tools/export_seg.py --ckpt CKPT --name minkunet_synth --metrics eval.json --command "python tools/train_seg.py ..."
  python tools/export_seg.py --ckpt CKPT --name test --out /tmp/weights --float32

The file is a slim checkpoint that tools/eval_seg.py and `sparseconv segment --ckpt` read like a training
checkpoint: the network weights (floating tensors as float16 unless --float32: half the size, and the
predictions of the shipped weights are checked against the float32 ones below), the resolved training
config, the epoch and step, and a provenance record (the checkpoint's name and SHA-256, the training
command, the evaluation figures of --metrics, the number of parameters, versions, the export time).
No optimizer or scheduler state. `sparseconv segment` without --ckpt uses models/weights/seg/<default>.pt.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by tools/train_seg.py")
    p.add_argument("--name", required=True, help="weights name: the file is OUT/NAME.pt")
    p.add_argument("--out", default=os.path.join(ROOT, "models", "weights", "seg"),
                   help="folder to write to (default: the shipped models/weights/seg)")
    p.add_argument("--metrics", help="JSON of tools/eval_seg.py --json to record")
    p.add_argument("--command", help="the training command to record")
    p.add_argument("--float32", action="store_true", help="keep float32 weights (default: float16)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sys.path.insert(0, ROOT)
    import torch

    from sparseconv.engine.checkpoint import load_checkpoint, save_checkpoint
    from sparseconv.models.pretrained import _sha256, check_name, plain

    try:
        check_name(args.name)
        state = load_checkpoint(args.ckpt)
        if not isinstance(state.get("model"), dict) or not isinstance(state.get("config"), dict):
            raise ValueError(f"{args.ckpt}: not a checkpoint of tools/train_seg.py (no model weights or config)")
        metrics = None
        if args.metrics:
            with open(args.metrics) as f:
                metrics = json.load(f)
    except (OSError, ValueError) as e:
        print(f"export_seg: error: {e}", file=sys.stderr)
        return 2
    dtype = torch.float32 if args.float32 else torch.float16
    weights = {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu())
               for k, v in state["model"].items()}
    out = {
        "model": weights,
        "config": state["config"],
        "epoch": state.get("epoch"),
        "global_step": state.get("global_step"),
        "provenance": plain({
            "checkpoint": os.path.basename(args.ckpt),
            "checkpoint_sha256": _sha256(args.ckpt),
            "command": args.command,
            "metrics": metrics,
            "weights_dtype": str(dtype).replace("torch.", ""),
            "state_dict_floats": int(sum(v.numel() for v in weights.values() if v.is_floating_point())),
            "exported_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "torch_version": torch.__version__.split("+")[0],
        }),
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.name}.pt")
    save_checkpoint(out, path)
    print(f"wrote {path} ({os.path.getsize(path) / 2 ** 20:.1f} MiB, {out['provenance']['state_dict_floats']:,} "
          f"floating values, {out['provenance']['weights_dtype']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
