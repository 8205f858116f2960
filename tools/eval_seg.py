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
import sys
from typing import List, Optional

from sparseconv.engine.cli import (add_eval_run_arguments, add_eval_source_arguments, eval_session, tool_parser,
                                   write_json)


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser(__doc__)
    add_eval_source_arguments(p, "tools/train_seg.py", "split to evaluate: a name of data.splits, an official "
                              "SemanticKITTI split, or sequence numbers such as 08 or 0,8 (default: data.val_split)",
                              "scans")
    p.add_argument("--sparsity-scans", type=int, help="override eval.sparsity_scans (0: no sparsity table)")
    return add_eval_run_arguments(p)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from sparseconv.engine.seg import build_eval_loader, evaluate_with_config, load_seg_checkpoint

    with eval_session(args, "eval_seg", load_seg_checkpoint, build_eval_loader,
                      extra_overrides=[("eval.sparsity_scans", args.sparsity_scans)]) as s:
        d = s.cfg["data"]
        out = evaluate_with_config(s.model, s.loader, s.cfg, device=s.env.device, progress=not args.no_progress,
                                   env=s.env)
        if out is not None:
            total = out["points"] + out["points_outside_range"]
            print(f"{s.cfg['model']['name']} on {d['root']} split {s.split}: {out['scans']} scans, {out['points']:,} "
                  f"labelled points in range ({out['points_outside_range']:,} labelled points outside "
                  f"{d['point_range']} left out, {100 * out['points_outside_range'] / max(total, 1):.2f}%) "
                  f"{s.checkpoint_note()}")
            print(out["table"])
            print(f"mIoU over {len(out['iou'])} classes (data.eval_classes {d['eval_classes']})")
            print(s.speed_line(out, "; network, arg-max and projection to the points"))
            if out["sparsity"] is not None:
                print(f"activation sparsity on {out['sparsity']['scans']} scan(s) (eval mode):")
                print(out["sparsity"]["table"])
            if args.json:
                report = s.report(out, point_range=d["point_range"], voxel_size=d["voxel_size"])
                if report["sparsity"] is not None:
                    report["sparsity"] = {k: v for k, v in report["sparsity"].items() if k != "table"}
                write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
