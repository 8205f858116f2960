"""``sparseconv synth``: simulated LiDAR scans with labels, in the KITTI and SemanticKITTI layouts."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import textwrap
import threading

EPILOG = """examples:
  sparseconv synth --out data/synth --scenes 100 --seed 0
  sparseconv synth --out data/synth --scenes 500 --layout both --workers 2      # resumes: existing scenes are kept
  sparseconv synth --out data/vlp --scenes 20 --sensor vlp32c --layout semantickitti --json

Layouts (NNNNNN = scene index, SS = sequence):
  kitti          OUT/training/{velodyne,label_2,calib}/NNNNNN.{bin,txt,txt}, OUT/ImageSets/{train,val,trainval}.txt
  semantickitti  OUT/sequences/SS/{velodyne,labels}/FFFFFF.{bin,label} + calib.txt, poses.txt, times.txt
                 (training scenes in sequence 00, validation scenes in 08, frames in scene order)
  both           both, under the same OUT

Scene i is simulated from scene_seed(SEED, i), so a dataset is reproducible byte for byte and can
be extended: rerunning with more --scenes adds scenes without changing the existing ones or their
split. Every ceil(1 / VAL_FRACTION)-th scene or so is a validation scene (see docs/synthetic.md).
Sensors: hdl64 (KITTI's Velodyne HDL-64E), vlp32c (Velodyne VLP-32C), os1-128 (Ouster OS1-128).
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "synth",
        help="simulate labelled LiDAR scans of procedural street scenes (KITTI / SemanticKITTI layout)",
        description=textwrap.fill(
            "Generates street scenes (roads, sidewalks, buildings, vegetation, poles, signs, cars, vans, trucks, "
            "pedestrians, cyclists), ray-casts a LiDAR through each, and writes the points with 3D boxes "
            "(KITTI label_2 + calib) and per-point semantic / instance labels (SemanticKITTI).",
            88,
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--scenes", type=int, required=True, metavar="N", help="number of scenes")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="dataset seed (default 0)")
    p.add_argument("--sensor", default="hdl64", metavar="NAME", help="hdl64 (default), vlp32c or os1-128")
    p.add_argument("--layout", choices=("kitti", "semantickitti", "both"), default="kitti",
                   help="folder layout to write (default kitti)")
    p.add_argument("--val-fraction", type=float, default=0.15, metavar="F",
                   help="fraction of validation scenes, in [0, 1] (default 0.15)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="processes (default 1)")
    p.add_argument("--overwrite", action="store_true", help="regenerate scenes whose files already exist")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _usage(msg: str) -> int:
    print(f"sparseconv synth: error: {msg}", file=sys.stderr)
    return 2


def _interrupt(signum, frame):
    """SIGTERM as Ctrl-C: unwinds, so that atomic writes remove their temporary files."""
    raise KeyboardInterrupt


def _print_summary(s: dict) -> None:
    objects = ", ".join(f"{n} {k}" for k, n in s["objects"].items() if n)
    print(f"scenes     {s['scenes']}: {s['written']} written, {s['skipped']} skipped (files exist)")
    print(f"split      {s['train']} train, {s['val']} val")
    if s["written"]:
        print(f"points     {s['points']:,} ({s['points'] / s['written']:,.0f} per scan, sensor {s['sensor']})")
        print(f"objects    {objects or 'none'} (all around, within 70 m); {s['label_2']} in label_2 (camera view)")
        print(f"time       {s['seconds']:.1f} s; {s['simulate_s']:.2f} s to simulate one scan")
    else:
        print(f"time       {s['seconds']:.1f} s")
    print(f"output     {s['out']} ({s['layout']} layout)")


def run(args) -> int:
    from ..datasets.synthetic import generate_dataset, get_sensor

    if args.scenes < 1:
        return _usage(f"--scenes must be >= 1, got {args.scenes}")
    if args.seed < 0:
        return _usage(f"--seed must be >= 0, got {args.seed}")
    if not 0 <= args.val_fraction <= 1:
        return _usage(f"--val-fraction must be in [0, 1], got {args.val_fraction}")
    if args.workers < 1:
        return _usage(f"--workers must be >= 1, got {args.workers}")
    try:
        sensor = get_sensor(args.sensor)
    except ValueError as e:
        return _usage(f"--sensor: {e}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return _usage(f"--out {args.out}: exists and is not a folder")
    from tqdm import tqdm

    bar = tqdm(total=args.scenes, unit="scene", desc="synth", file=sys.stderr, dynamic_ncols=True,
               disable=args.quiet or not sys.stderr.isatty())
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if on_main else None
    try:
        summary = generate_dataset(args.out, args.scenes, seed=args.seed, sensor=sensor, layout=args.layout,
                                   val_fraction=args.val_fraction, workers=args.workers, overwrite=args.overwrite,
                                   on_scene=lambda r: bar.update(1))
    except KeyboardInterrupt:
        bar.close()
        print("sparseconv synth: interrupted; the scenes written so far are complete (rerun the same command to "
              "resume)", file=sys.stderr)
        return 130
    except OSError as e:
        bar.close()
        reason = f"{e.filename}: {e.strerror}" if e.filename else str(e)
        print(f"sparseconv synth: error: {reason}", file=sys.stderr)
        return 1
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)
    bar.close()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    return 0
