#!/usr/bin/env python
"""Evaluate a trained 3D detector: KITTI AP (BEV and 3D; R40 and R11; easy / moderate / hard) and speed.

examples:
  python tools/eval_det.py --ckpt output/second_synth/ckpt_e080_s00040800.pt
  python tools/eval_det.py --config configs/second_synth.yaml --ckpt CKPT --split val --limit 50 --json eval.json
  torchrun --nproc_per_node=2 tools/eval_det.py --ckpt CKPT --launcher pytorch
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="experiment YAML (default: the config stored in the checkpoint)")
    p.add_argument("--ckpt", required=True, help="checkpoint written by tools/train_det.py")
    p.add_argument("--split", help="split to evaluate (default: data.val_split)")
    p.add_argument("--limit", type=int, help="only the first N frames of the split")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--save-txt", metavar="DIR", help="write KITTI-format result files (one per frame)")
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
    from sparseconv.engine.checkpoint import load_checkpoint
    from sparseconv.engine.config import dump_config
    from sparseconv.engine.det import build_detector, build_eval_loader, evaluate, load_det_config
    from sparseconv.engine.distributed import cleanup_distributed, init_distributed
    from sparseconv.engine.trainer import json_safe

    state = load_checkpoint(args.ckpt)
    if "model" not in state:
        raise SystemExit(f"{args.ckpt}: not a training checkpoint (no 'model' entry)")
    overrides = list(args.set)
    for key, value in (("eval.batch_size", args.batch_size), ("eval.workers", args.workers),
                       ("train.device", args.device)):
        if value is not None:
            overrides.append((key, value))
    config_path = args.config
    if config_path is None:
        if not state.get("config"):
            raise SystemExit(f"{args.ckpt} holds no config: pass --config")
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:  # the stored config, validated like a file
            config_path = os.path.join(tmp, "config.yaml")
            dump_config(state["config"], config_path)
            cfg = load_det_config(config_path, overrides)
        config_path = f"{args.ckpt} (stored config)"
    else:
        cfg = load_det_config(config_path, overrides)
    env = init_distributed(args.launcher, cfg["train"]["device"], cfg["train"]["dist_timeout_min"])
    try:
        model = build_detector(cfg)
        model.load_state_dict(state["model"])
        model.to(env.device)
        split = args.split or cfg["data"]["val_split"]
        loader = build_eval_loader(cfg, split, env=env, limit=args.limit)
        e = cfg["eval"]
        out = evaluate(model, loader, cfg["data"]["classes"], device=env.device, overlap=e["overlap"],
                       sampling=e["sampling"], recall_points=e["recall_points"], det_bbox=e["det_bbox"],
                       progress=not args.no_progress, save_dir=args.save_txt, env=env)
        if out is not None:
            print(f"{cfg['model']['name']} on {cfg['data']['root']} split {split}: {out['frames']} frames, "
                  f"{out['detections']} detections (checkpoint {args.ckpt}, epoch {state.get('epoch')}, "
                  f"global step {state.get('global_step')})")
            print(out["table"])
            print(f"inference: {out['ms_per_scan']:.1f} ms per scan (median, model forward with post-processing; "
                  f"batch size {out['batch_size']}, {out['threads']} threads, {out['device']}, "
                  f"{env.world_size} process(es))")
            if args.json:
                from sparseconv.io import atomic_write

                report = {"config": config_path, "ckpt": args.ckpt, "model": cfg["model"]["name"],
                          "split": split, "epoch": state.get("epoch"), "global_step": state.get("global_step"),
                          **{k: v for k, v in out.items() if k != "table"}}
                with atomic_write(args.json, "w", encoding="utf-8") as f:
                    json.dump(json_safe(report), f, indent=1)
    finally:
        cleanup_distributed(env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
