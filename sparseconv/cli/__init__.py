"""The ``sparseconv`` command line."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import demo

EPILOG = """examples:
  sparseconv demo                                   # SECOND backbone on a built-in simulated scan
  sparseconv demo --input ../shared/data/kitti/velodyne/000000.bin
  sparseconv demo --input scan.bin --front --json   # KITTI front view, machine-readable output
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
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
