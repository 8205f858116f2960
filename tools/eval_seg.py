#!/usr/bin/env python
"""Evaluate a segmentation network: per-point mIoU, per-class IoU, accuracy, speed, activation sparsity.

examples:
  python tools/eval_seg.py --config configs/minkunet_synth.yaml --ckpt output/minkunet_synth/ckpt_e020_s00010200.pt
  python tools/eval_seg.py --ckpt CKPT --split val --limit 50 --json eval.json     # the config stored in CKPT
  python tools/eval_seg.py --ckpt CKPT --split 08 --threads 2 --sparsity-scans 8
  torchrun --nproc_per_node=2 tools/eval_seg.py --ckpt CKPT --launcher pytorch

Each point takes its voxel's class (arg-max over the training ids 1..C-1). Points labelled 0
(ignore) and points outside data.point_range (they have no voxel and get the ignore label) are left
out of every metric; the report gives the number left out. The mIoU is the mean IoU over
data.eval_classes (the configs for simulated data list the 14 classes the simulator produces).
Speed: median milliseconds per scan of the network, arg-max and projection to the points (data
loading and voxelization excluded), batch size eval.batch_size, with the thread count.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="experiment YAML (default: the config stored in the checkpoint)")
    p.add_argument("--ckpt", required=True, help="checkpoint written by tools/train_seg.py")
    p.add_argument("--split", help="split to evaluate: a name of data.splits, an official SemanticKITTI split, "
                                   "or sequence numbers such as 08 or 0,8 (default: data.val_split)")
    p.add_argument("--limit", type=int, help="only the first N scans of the split")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--sparsity-scans", type=int, help="override eval.sparsity_scans (0: no sparsity table)")
    p.add_argument("--batch-size", type=int, help="override eval.batch_size (1: per-scan latency)")
    p.add_argument("--workers", type=int, help="override eval.workers")
    p.add_argument("--device", help="override train.device (auto, cpu, cuda)")
    p.add_argument("--launcher", choices=("none", "pytorch"), default="none", help="pytorch: under torchrun")
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="override a config value (value read as YAML); repeatable")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from sparseconv.engine.distributed import cleanup_distributed, init_distributed
    from sparseconv.engine.seg import build_eval_loader, evaluate, load_seg_checkpoint
    from sparseconv.engine.trainer import json_safe

    overrides = list(args.set)
    for key, value in (("eval.batch_size", args.batch_size), ("eval.workers", args.workers),
                       ("eval.sparsity_scans", args.sparsity_scans), ("train.device", args.device)):
        if value is not None:
            overrides.append((key, value))
    try:
        cfg, model, state, source = load_seg_checkpoint(args.ckpt, args.config, overrides)
    except (OSError, ValueError) as e:
        raise SystemExit(f"eval_seg: {e}") from None
    env = init_distributed(args.launcher, cfg["train"]["device"], cfg["train"]["dist_timeout_min"])
    try:
        model.to(env.device)
        split = args.split or cfg["data"]["val_split"]
        loader = build_eval_loader(cfg, split, env=env, limit=args.limit)
        d, e = cfg["data"], cfg["eval"]
        out = evaluate(model, loader, d["eval_classes"], int(d["num_classes"]), device=env.device,
                       progress=not args.no_progress, env=env, sparsity_scans=int(e["sparsity_scans"]))
        if out is not None:
            total = out["points"] + out["points_outside_range"]
            print(f"{cfg['model']['name']} on {d['root']} split {split}: {out['scans']} scans, {out['points']:,} "
                  f"labelled points in range ({out['points_outside_range']:,} labelled points outside "
                  f"{d['point_range']} left out, {100 * out['points_outside_range'] / max(total, 1):.2f}%) "
                  f"(checkpoint {args.ckpt}, epoch {state.get('epoch')}, global step {state.get('global_step')})")
            print(out["table"])
            print(f"mIoU over {len(out['iou'])} classes (data.eval_classes {d['eval_classes']})")
            print(f"inference: {out['ms_per_scan']:.1f} ms per scan (median; network, arg-max and projection to the "
                  f"points; batch size {out['batch_size']}, {out['threads']} threads, {out['device']}, "
                  f"{env.world_size} process(es))")
            if out["sparsity"] is not None:
                print(f"activation sparsity on {out['sparsity']['scans']} scan(s) (eval mode):")
                print(out["sparsity"]["table"])
            if args.json:
                from sparseconv.io import atomic_write

                report = {"config": source, "ckpt": args.ckpt, "model": cfg["model"]["name"], "split": split,
                          "epoch": state.get("epoch"), "global_step": state.get("global_step"),
                          "point_range": d["point_range"], "voxel_size": d["voxel_size"],
                          **{k: v for k, v in out.items() if k != "table"}}
                if report["sparsity"] is not None:
                    report["sparsity"] = {k: v for k, v in report["sparsity"].items() if k != "table"}
                with atomic_write(args.json, "w", encoding="utf-8") as f:
                    json.dump(json_safe(report), f, indent=1)
    finally:
        cleanup_distributed(env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
