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

from sparseconv.engine.cli import add_train_arguments, run_training, tool_parser, train_overrides

overrides_from_args = train_overrides  # the former name of the function


def build_parser() -> argparse.ArgumentParser:
    return add_train_arguments(tool_parser(__doc__), config_help="experiment YAML (configs/*_synth.yaml)")


def _build(cfg, env):
    """``(model, train_set, collate_fn, about)`` for :func:`~sparseconv.engine.cli.run_training`."""
    from sparseconv.engine.seg import build_segmenter, build_train_set, resolve_class_weights, seg_collate_fn

    log = print if env.is_main else (lambda *a, **k: None)
    weights = resolve_class_weights(cfg, env, log=lambda m: log(m, flush=True))
    model = build_segmenter(cfg, weights)
    train_set = build_train_set(cfg)
    d = cfg["data"]
    w = "none" if weights is None else ", ".join(f"{v:.2f}" for v in weights.tolist())
    about = (f"{len(train_set)} training scans ({d['root']}, split {d['train_split']}, sequences "
             f"{', '.join(train_set.sequences)}); voxel size {d['voxel_size']} in {d['point_range']}; lovasz "
             f"{cfg['loss']['lovasz']}; class weights [{w}]")
    return model, train_set, seg_collate_fn(cfg), about


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from sparseconv.engine.seg import load_seg_config, make_seg_evaluator

    return run_training(args, load_seg_config, _build, make_seg_evaluator)


if __name__ == "__main__":
    sys.exit(main())
