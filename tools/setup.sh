#!/usr/bin/env bash
# Set-up on a fresh machine (Python >= 3.9; no GPU needed).
#   bash tools/setup.sh          the library and its command line
#   bash tools/setup.sh --test   the same plus the test and file-format dependencies
# An installed torch >= 2.4 is kept; otherwise torch 2.13.0 is installed (on the project's
# machines pip takes its CPU build from the local wheel cache).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

python -m pip --version >/dev/null
if ! python - <<'PY' 2>/dev/null
import sys, torch
major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 4) else 1)
PY
then
  python -m pip install -q torch==2.13.0
fi
python -m pip install -q ninja "setuptools>=64"

if [ -n "$extras" ] && ! ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0'; then
  # Open3D's wheel (PLY/PCD reading and writing) loads libusb at import time.
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q libusb-1.0-0 >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q libusb-1.0-0 >/dev/null; }
  else
    echo "tools/setup.sh: libusb-1.0 is missing and cannot be installed here; Open3D formats will be unavailable" >&2
  fi
fi

python -m pip install -q --no-build-isolation -e ".${extras}"
