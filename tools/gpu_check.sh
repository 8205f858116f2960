#!/usr/bin/env bash
# GPU check: on a machine with a GPU, nvcc and a CUDA build of torch (no network needed).
#
#   bash tools/gpu_check.sh            # logs and a summary in ${OUT:-gpu_out}/
#
# 1. builds the extension with CUDA in place (pip install --no-build-isolation --no-deps -e .),
#    for the visible GPU's architecture unless TORCH_CUDA_ARCH_LIST is set;
# 2. runs tests/test_cuda.py (CPU-vs-CUDA parity of every op), then the whole test suite;
# 3. runs tools/benchmark.py on the GPU if it has a --device option (it has none yet: skipped).
# Each step has a time limit so that the whole check ends within 8 minutes; the summary table is
# printed last.  Exits non-zero when a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
start=$(date +%s)
declare -a ROWS=()
status=0

elapsed() { echo $(( $(date +%s) - start )); }
# step NAME LIMIT_S LOG COMMAND...: runs COMMAND with a time limit, records the result.
step() {
  local name="$1" limit="$2" log="$3"
  shift 3
  local t0=$(date +%s) rc
  echo "gpu_check: [$(elapsed)s] $name (limit ${limit}s, log $OUT/$log)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$log" 2>&1
  rc=$?
  local secs=$(( $(date +%s) - t0 )) result="ok"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then result="TIMEOUT"; elif [ "$rc" != 0 ]; then result="FAILED rc=$rc"; fi
  [ "$result" = ok ] || status=1
  local detail
  detail="$(grep -E '^[0-9]+ (passed|failed)|^(FAILED|ERROR) |[0-9]+ (passed|failed|skipped|error)' "$OUT/$log" | tail -n 1)"
  ROWS+=("$(printf '%-22s %-14s %5ss  %s' "$name" "$result" "$secs" "$detail")")
  tail -n 3 "$OUT/$log"
  return "$rc"
}

{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
  nvcc --version 2>&1 | tail -n 1 || true
  python -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPU", torch.cuda.is_available())'
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if step "build (CUDA)" 300 build.log env SPARSECONV_FORCE_CUDA=1 \
    python -m pip install --no-build-isolation --no-deps -v -e .; then
  step "op registration" 60 registration.log python - <<'PY'
import torch
import sparseconv
from sparseconv import ops
print("sparseconv from", sparseconv.__file__)
missing = [n for n in ops.OP_NAMES if not torch._C._dispatch_has_kernel_for_dispatch_key(f"sparseconv::{n}", "CUDA")]
print("ops without a CUDA kernel:", missing or "none")
assert torch.cuda.is_available(), "no GPU visible"
raise SystemExit(1 if missing else 0)
PY
  step "tests/test_cuda.py" 150 test_cuda.log python -m pytest -q -x -p no:cacheprovider tests/test_cuda.py \
    --junitxml="$OUT/test_cuda.xml"
  remaining=$(( 450 - $(elapsed) ))
  if [ "$remaining" -gt 30 ]; then
    step "whole test suite" "$remaining" test_all.log python -m pytest -q -p no:cacheprovider \
      --junitxml="$OUT/test_all.xml"
  else
    ROWS+=("$(printf '%-22s %-14s' "whole test suite" "skipped (time)")")
  fi
  if python tools/benchmark.py --help 2>/dev/null | grep -q -- "--device"; then
    remaining=$(( 470 - $(elapsed) ))
    if [ "$remaining" -gt 20 ]; then
      step "benchmark (cuda)" "$remaining" benchmark.log python tools/benchmark.py --device cuda --smoke \
        --json "$OUT/benchmark.json"
    fi
  else
    ROWS+=("$(printf '%-22s %-14s' "benchmark" "skipped: tools/benchmark.py has no --device")")
  fi
fi

{
  echo
  echo "gpu_check summary ($(elapsed)s, logs in $OUT/)"
  printf '%-22s %-14s %6s  %s\n' "step" "result" "time" "detail"
  for r in "${ROWS[@]}"; do echo "$r"; done
} | tee "$OUT/summary.txt"
exit "$status"
