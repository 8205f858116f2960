#!/usr/bin/env python
"""Evaluate a trained 3D detector: KITTI AP (BEV and 3D; R40 and R11; easy / moderate / hard) and speed.

examples:
  python tools/eval_det.py --ckpt output/second_synth/ckpt_e080_s00040800.pt
  python tools/eval_det.py --config configs/second_synth.yaml --ckpt CKPT --split val --limit 50 --json eval.json
  torchrun --nproc_per_node=2 tools/eval_det.py --ckpt CKPT --launcher pytorch
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from sparseconv.engine.cli import (add_eval_run_arguments, add_eval_source_arguments, eval_session, tool_parser,
                                   write_json)


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser(__doc__)
    add_eval_source_arguments(p, "tools/train_det.py", "split to evaluate (default: data.val_split)", "frames")
    p.add_argument("--save-txt", metavar="DIR", help="write KITTI-format result files (one per frame)")
    return add_eval_run_arguments(p)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from sparseconv.engine.det import build_eval_loader, evaluate_with_config, load_det_checkpoint

    with eval_session(args, "eval_det", load_det_checkpoint, build_eval_loader) as s:
        out = evaluate_with_config(s.model, s.loader, s.cfg, device=s.env.device, progress=not args.no_progress,
                                   save_dir=args.save_txt, env=s.env)
        if out is not None:
            print(f"{s.cfg['model']['name']} on {s.cfg['data']['root']} split {s.split}: {out['frames']} frames, "
                  f"{out['detections']} detections {s.checkpoint_note()}")
            print(out["table"])
            print(s.speed_line(out, ", model forward with post-processing"))
            if args.json:
                write_json(args.json, s.report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
