#!/usr/bin/env python
"""Train a LiDAR semantic-segmentation network (MinkUNet, SparseUNetAttn) from a YAML config.

examples:
  python tools/train_seg.py --config configs/minkunet_synth.yaml
  python tools/train_seg.py --config configs/minkunet_synth.yaml --resume         # continue a killed run
  python tools/train_seg.py --config configs/sparse_unet_attn_synth.yaml --set loss.lovasz 1.0 --set data.root /data/sk
  python tools/train_seg.py --config configs/minkunet_synth.yaml --max-steps 20 --output /tmp/smoke   # smoke run
  torchrun --nproc_per_node=2 tools/train_seg.py --config configs/minkunet_synth.yaml --launcher pytorch --sync-bn

Targets are per voxel (majority label of its points), the loss is cross-entropy (optionally class
weighted) plus loss.lovasz x Lovasz-softmax; see the "Training and evaluation" section of
docs/segmentation.md for every key. Output: checkpoints ckpt_e*_s*.pt, log.csv, config.yaml, and
eval_epoch_*.json when eval.every_epochs > 0.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML (configs/*_synth.yaml)")
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
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="override a config value, e.g. --set train.lr 0.001 (value read as YAML); repeatable")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (with a checkpoint)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice / OMP_NUM_THREADS)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def overrides_from_args(args: argparse.Namespace) -> list:
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


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from sparseconv.engine.distributed import cleanup_distributed, init_distributed
    from sparseconv.engine.seg import (build_segmenter, build_train_set, load_seg_config, make_seg_evaluator,
                                       resolve_class_weights, seg_collate_fn)
    from sparseconv.engine.trainer import Trainer, set_seed

    cfg = load_seg_config(args.config, overrides_from_args(args))
    env = init_distributed(args.launcher, cfg["train"]["device"], cfg["train"]["dist_timeout_min"])
    try:
        set_seed(int(cfg["train"]["seed"]) + env.rank)
        log = print if env.is_main else (lambda *a, **k: None)
        weights = resolve_class_weights(cfg, env, log=lambda m: log(m, flush=True))
        model = build_segmenter(cfg, weights)
        train_set = build_train_set(cfg)
        evaluate_fn = make_seg_evaluator(cfg, env, progress=not args.no_progress) \
            if cfg["eval"]["every_epochs"] > 0 else None
        if env.is_main:
            n_params = sum(p.numel() for p in model.parameters())
            d = cfg["data"]
            w = "none" if weights is None else ", ".join(f"{v:.2f}" for v in weights.tolist())
            print(f"{cfg['model']['name']}: {n_params / 1e6:.2f} M parameters; {len(train_set)} training scans "
                  f"({d['root']}, split {d['train_split']}, sequences {', '.join(train_set.sequences)}); voxel size "
                  f"{d['voxel_size']} in {d['point_range']}; lovasz {cfg['loss']['lovasz']}; class weights [{w}]; "
                  f"{env.world_size} process(es) on {env.device}, {torch.get_num_threads()} threads each; output "
                  f"{cfg['output_dir']}", flush=True)
        trainer = Trainer(model, train_set, seg_collate_fn(cfg), cfg["train"], cfg["output_dir"], env=env,
                          config=cfg, evaluate_fn=evaluate_fn, eval_every=cfg["eval"]["every_epochs"],
                          progress=not args.no_progress, max_steps=args.max_steps)
        summary = trainer.fit(resume=args.resume)
        if env.is_main:
            print(f"done: epoch {summary['epoch']}, global step {summary['global_step']}, last checkpoint "
                  f"{summary['last_checkpoint']}", flush=True)
    finally:
        cleanup_distributed(env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
