#!/usr/bin/env python
"""Trained models side by side: parameters and CPU (or GPU) latency per scan, measured in one process.

examples:
  python tools/compare_models.py --task det --ckpt runs/second/ckpt_e004_s00002040.pt \\
      --ckpt runs/centerpoint/ckpt_e002_s00001020.pt --ckpt runs/centerpoint_attn/ckpt_e001_s00000510.pt --threads 2
  python tools/compare_models.py --task seg --ckpt runs/minkunet/ckpt_e003_s00003060.pt \\
      --ckpt runs/sparse_unet_attn/ckpt_e001_s00001020.pt --scans 3 --repeats 9 --json latency.json

Each checkpoint (of tools/train_det.py for --task det, of tools/train_seg.py or tools/export_seg.py for
--task seg) is loaded with the config stored in it; the first --scans scans of its validation split are
loaded and voxelized once (not timed). Then, --repeats times, every model runs every scan in turn
(models alternate, so the machine's load drifts over all of them alike): detection times the forward
with post-processing (NMS), segmentation the network's forward. Reported per model: parameters and the
median over all timed runs of the time per scan (the first round is warm-up and left out), and the
ratio to the first model. Data paths: --set data.root DIR applies to every config.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("det", "seg"), required=True)
    p.add_argument("--ckpt", action="append", required=True, help="a checkpoint (repeat for each model)")
    p.add_argument("--scans", type=int, default=3, help="validation scans per model (default 3)")
    p.add_argument("--repeats", type=int, default=9, help="timed rounds over all scans and models (default 9)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="override a config value of every model (value read as YAML); repeatable")
    p.add_argument("--json", help="write the results as JSON")
    return p


def _load(task: str, ckpt: str, overrides):
    if task == "det":
        from sparseconv.engine.det import build_eval_loader, load_det_checkpoint

        cfg, model, _, _ = load_det_checkpoint(ckpt, None, overrides)
        return cfg, model, build_eval_loader, model
    from sparseconv.engine.seg import build_eval_loader, load_seg_checkpoint

    cfg, model, _, _ = load_seg_checkpoint(ckpt, None, overrides)
    return cfg, model, build_eval_loader, model.net


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.scans < 1 or args.repeats < 2:
        print("compare_models: error: --scans must be >= 1 and --repeats >= 2", file=sys.stderr)
        return 2
    sys.path.insert(0, ROOT)
    import torch

    from sparseconv.engine.common import synchronize
    from sparseconv.engine.config import parse_overrides
    from sparseconv.engine.trainer import to_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    overrides = parse_overrides(args.set)
    models = []
    for ckpt in args.ckpt:
        try:
            cfg, model, make_loader, timed = _load(args.task, ckpt, overrides)
        except (OSError, ValueError) as e:
            print(f"compare_models: error: {e}", file=sys.stderr)
            return 2
        loader = make_loader(cfg, limit=args.scans, batch_size=1, workers=0)
        batches = [to_device(b, device) for b in loader]
        if args.task == "seg":
            batches = [b["voxels"] for b in batches]
        params = sum(p.numel() for p in model.parameters())
        models.append({"ckpt": ckpt, "model": cfg["model"]["name"], "parameters": params,
                       "net": timed.to(device).eval(), "batches": batches, "times": []})
    with torch.no_grad():
        for r in range(args.repeats):
            for m in models:
                for b in m["batches"]:
                    synchronize(device)
                    t0 = time.perf_counter()
                    m["net"](b)
                    synchronize(device)
                    if r > 0:
                        m["times"].append(1000 * (time.perf_counter() - t0))
    base = statistics.median(models[0]["times"])
    rows = []
    print(f"{'model':<20} {'parameters':>12} {'ms / scan':>10} {'ratio':>7}  checkpoint")
    for m in models:
        ms = statistics.median(m["times"])
        rows.append({"model": m["model"], "ckpt": m["ckpt"], "parameters": m["parameters"], "ms_per_scan": ms,
                     "ratio_to_first": ms / base})
        print(f"{m['model']:<20} {m['parameters'] / 1e6:>10.2f} M {ms:>10.1f} {ms / base:>6.2f}x  {m['ckpt']}")
    print(f"({args.scans} scan(s) per model, {args.repeats - 1} timed rounds after one warm-up, "
          f"{torch.get_num_threads()} thread(s), {device})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"task": args.task, "scans": args.scans, "repeats": args.repeats,
                       "threads": torch.get_num_threads(), "device": str(device), "models": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
