#!/usr/bin/env python
"""Train a 3D detector from a YAML config (see docs/training.md).

examples:
  python tools/train_det.py --config configs/second_synth.yaml
  python tools/train_det.py --config configs/second_synth.yaml --resume          # continue a killed run
  python tools/train_det.py --config configs/centerpoint_synth.yaml --set train.lr 0.001 --set data.root /data/kitti
  torchrun --nproc_per_node=2 tools/train_det.py --config configs/second_synth.yaml --launcher pytorch --sync-bn
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from sparseconv.engine.cli import add_train_arguments, run_training, tool_parser


def build_parser() -> argparse.ArgumentParser:
    return add_train_arguments(tool_parser(__doc__), config_help="experiment YAML (configs/*.yaml)")


def _build(cfg, env):
    """``(model, train_set, collate_fn, about)`` for :func:`~sparseconv.engine.cli.run_training`."""
    from sparseconv.engine.det import build_detector, build_train_set, det_collate_fn

    model = build_detector(cfg)
    train_set = build_train_set(cfg, env)
    d = cfg["data"]
    about = f"{len(train_set)} training frames ({d['root']}, split {d['train_split']})"
    return model, train_set, det_collate_fn(cfg), about


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from sparseconv.engine.det import load_det_config, make_det_evaluator

    return run_training(args, load_det_config, _build, make_det_evaluator)


if __name__ == "__main__":
    sys.exit(main())
