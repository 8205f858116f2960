#!/usr/bin/env python
"""Benchmark harness: ``python tools/benchmark.py --help`` (same as ``sparseconv bench``)."""
import sys

from sparseconv.bench import main

if __name__ == "__main__":
    sys.exit(main())
