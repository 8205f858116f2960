"""The ``sparseconv`` command line."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import demo, info, segment, sparsity, synth, view, voxelize

EPILOG = """examples:
  sparseconv demo                                   # the shipped detector on a simulated scan -> demo_bev.png
  sparseconv demo --input ../shared/data/kitti/velodyne/000000.bin \
      --labels ../shared/data/kitti/label_2/000000.txt --calib ../shared/data/kitti/calib/000000.txt
  sparseconv demo --input scan.bin --json --check-dense   # machine-readable; backbone vs dense conv3d
  sparseconv voxelize ../shared/data/kitti/velodyne -o voxels/ --voxel-size 0.05 0.05 0.1 --workers 2
  sparseconv voxelize 'scans/*.bin' -o voxels/ --reduce max --max-points 5 --format ply
  sparseconv info ../shared/data/kitti/velodyne/000000.bin voxels/000000.npz --json
  sparseconv view ../shared/data/kitti/velodyne/000000.bin -o bev.png \\
      --labels ../shared/data/kitti/label_2/000000.txt --calib ../shared/data/kitti/calib/000000.txt
  sparseconv synth --out data/synth --scenes 100 --seed 0 --layout both --workers 2   # simulated, labelled
  sparseconv sparsity --checkpoint second.pt --data ../shared/data/kitti/velodyne --scans 20 --plot sparsity.png
  sparseconv segment data/synth/sequences/08/velodyne -o pred/ --config configs/minkunet_synth.yaml --ckpt CKPT --ply

  sparseconv bench --workload voxelize --repeats 30  # timings against spconv, side by side
  sparseconv bench -w layers -w minkunet --threads 1 # sparse layers and a U-Net vs spconv, dense, torch.mm

run 'sparseconv COMMAND --help' for the options and more examples of each command.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparseconv",
        description="3D sparse convolution for LiDAR point clouds and sparse volumes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo.add_parser(sub)
    voxelize.add_parser(sub)
    info.add_parser(sub)
    view.add_parser(sub)
    synth.add_parser(sub)
    sparsity.add_parser(sub)
    segment.add_parser(sub)
    _add_bench_parser(sub)
    return parser


def _add_bench_parser(sub) -> None:
    from .. import bench

    p = sub.add_parser("bench", help="benchmark sparseconv against spconv and dense baselines (tools/benchmark.py)",
                       description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  sparseconv bench                                  # everything (long)\n"
                              "  sparseconv bench -w layers --channels 16 64 --threads 1 --json layers.json\n"
                              "  sparseconv bench -w backbone -w minkunet -w kmap --input scan.bin --repeats 5\n"
                              "  sparseconv bench -w voxelize --input scan.bin --json out.json\n"
                              "  sparseconv bench --smoke --json smoke.json        # CI: tiny, every workload")
    bench.build_parser(p)
    p.set_defaults(func=bench.run)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
