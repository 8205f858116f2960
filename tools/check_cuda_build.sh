#!/usr/bin/env bash
# Compile check of the CUDA backend; needs nvcc, no GPU.
#
#   bash tools/check_cuda_build.sh
#
# 1. Makes (or reuses) a virtual environment with a CUDA build of torch:
#      $SPARSECONV_CUDA_VENV (default ~/.cache/sparseconv-cuda-venv), torch from
#      $SPARSECONV_CUDA_TORCH (default torch==2.14.1, a CUDA 13.0 build).
# 2. Builds sparseconv._C with the CUDA sources (SPARSECONV_FORCE_CUDA=1,
#      TORCH_CUDA_ARCH_LIST default "8.0;9.0", MAX_JOBS default 2) from a copy of the sources in a
#      temporary directory, so the checkout and its in-place CPU build are never touched
#      ($SPARSECONV_CUDA_BUILD_DIR keeps the build for incremental reruns).
# 3. Imports the built sparseconv._C in that environment (this works without a GPU) and checks
#      that the schema registry holds exactly the ops of sparseconv/ops.py's OP_NAMES and that
#      every one of them has a CPU and a CUDA kernel.
# Exits non-zero with a message naming what failed.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${SPARSECONV_CUDA_VENV:-$HOME/.cache/sparseconv-cuda-venv}"
TORCH_SPEC="${SPARSECONV_CUDA_TORCH:-torch==2.14.1}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
start=$(date +%s)

fail() {
  echo "check_cuda_build: FAILED: $*" >&2
  exit 1
}
log() { echo "check_cuda_build: [$(( $(date +%s) - start ))s] $*"; }

command -v nvcc >/dev/null || fail "nvcc is not on PATH"
if [ -z "${CUDA_HOME:-}" ]; then
  # The toolkit nvcc belongs to (nvcc on PATH may be a wrapper script outside the toolkit).
  top="$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)"
  [ -n "$top" ] && [ -d "$top" ] || fail "cannot locate the CUDA toolkit of $(command -v nvcc); set CUDA_HOME"
  CUDA_HOME="$(cd "$top" && pwd)"
fi
export CUDA_HOME
log "nvcc: $(nvcc --version | tail -n 1); CUDA_HOME=$CUDA_HOME; archs: $TORCH_CUDA_ARCH_LIST; MAX_JOBS=$MAX_JOBS"

# 1. The environment.
venv_ok() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - <<'PY' 2>/dev/null
import sys
import torch, setuptools, ninja  # noqa: F401
sys.exit(0 if torch.version.cuda else 1)
PY
}
if venv_ok; then
  log "reusing $VENV"
else
  log "creating $VENV with $TORCH_SPEC (a CUDA build of torch, several GB)"
  python3 -m venv "$VENV" || fail "python3 -m venv $VENV failed"
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" numpy ninja setuptools || fail "pip install $TORCH_SPEC failed"
  venv_ok || fail "$VENV: torch is not a CUDA build (torch.version.cuda is None) or setuptools/ninja are missing"
fi
PY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"
log "torch $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"

# torch's CUDA headers include cuBLAS/cuSPARSE headers that come with the pip wheels.
nv_inc="$("$PY" - <<'PY'
import glob, os, torch
site = os.path.dirname(os.path.dirname(torch.__file__))
cu = sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
print(":".join(cu or sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))))
PY
)"
export CPATH="${nv_inc}${CPATH:+:$CPATH}"

# 2. The build, in a copy of the sources.
if [ -n "${SPARSECONV_CUDA_BUILD_DIR:-}" ]; then
  BUILD="$SPARSECONV_CUDA_BUILD_DIR"
  mkdir -p "$BUILD"
else
  BUILD="$(mktemp -d "${TMPDIR:-/tmp}/sparseconv-cuda-build.XXXXXX")"
  trap 'rm -rf "$BUILD"' EXIT
fi
# Files whose content changed (or are new) are copied with a fresh time stamp, unchanged ones are
# left alone, files gone from the checkout are removed: a kept build dir rebuilds what changed.
"$PY" - "$ROOT" "$BUILD/src" <<'PY' || fail "copying the sources to $BUILD/src failed"
import filecmp, os, shutil, sys
root, dst = sys.argv[1], sys.argv[2]
wanted = set()
for top in ("setup.py", "pyproject.toml", "README.md", "csrc", "sparseconv", "models", "datasets"):
    src = os.path.join(root, top)
    paths = [src] if os.path.isfile(src) else [os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs]
    for path in paths:
        rel = os.path.relpath(path, root)
        if "__pycache__" in rel or (os.path.basename(rel).startswith("_C") and rel.endswith(".so")):
            continue
        wanted.add(rel)
        out = os.path.join(dst, rel)
        if not (os.path.exists(out) and filecmp.cmp(path, out, shallow=False)):
            os.makedirs(os.path.dirname(out), exist_ok=True)
            shutil.copyfile(path, out)
for d, _, fs in os.walk(dst):
    for f in fs:
        if os.path.relpath(os.path.join(d, f), dst) not in wanted:
            os.remove(os.path.join(d, f))
PY
ls "$BUILD"/src/csrc/cuda/*.cu >/dev/null 2>&1 || fail "no CUDA sources in csrc/cuda/"
log "building in $BUILD ($(ls "$BUILD"/src/csrc/cuda/*.cu | wc -l) CUDA sources)"
(
  cd "$BUILD/src"
  SPARSECONV_FORCE_CUDA=1 SPARSECONV_CPU_ONLY=0 "$PY" setup.py -q build_ext \
    --build-lib "$BUILD/lib" --build-temp "$BUILD/tmp"
) >"$BUILD/build.log" 2>&1 || { tail -n 60 "$BUILD/build.log" >&2; fail "the CUDA build failed (log above)"; }
grep -E "warning" "$BUILD/build.log" | grep -v -E "^\s*$" | grep -E "csrc/" | head -n 20 || true
SO="$(ls "$BUILD"/lib/sparseconv/_C*.so 2>/dev/null | head -n 1)"
[ -n "$SO" ] || fail "the build produced no sparseconv/_C*.so"
log "built $(basename "$SO") ($(du -h "$SO" | cut -f1))"

# 3. Every op has a CUDA kernel.
"$PY" - "$SO" "$ROOT/sparseconv/ops.py" <<'PY' || fail "op registration check failed (see above)"
import ast
import importlib.util
import sys

import torch

so, ops_py = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location("sparseconv._C", so)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)  # runs the TORCH_LIBRARY / TORCH_LIBRARY_IMPL registrations

tree = ast.parse(open(ops_py).read())
op_names = next(ast.literal_eval(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "OP_NAMES" for t in n.targets))
registered = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("sparseconv::"))
problems = []
if sorted(op_names) != registered:
    problems.append(f"schemas {registered} differ from ops.OP_NAMES {sorted(op_names)}")
# CUDA kernels registered from Python: torch.library.register_kernel("sparseconv::NAME", "cuda", fn) in ops.py
# (they run when sparseconv.ops is imported, which this check does not do).
python_cuda = {n.args[0].value.split("::", 1)[1] for n in ast.walk(tree)
               if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "register_kernel"
               and len(n.args) >= 2 and all(isinstance(a, ast.Constant) for a in n.args[:2])
               and str(n.args[0].value).startswith("sparseconv::") and n.args[1].value == "cuda"}
print(f"{'op':<26} CPU   CUDA")
for name in registered:
    has = {key: torch._C._dispatch_has_kernel_for_dispatch_key(f"sparseconv::{name}", key) for key in ("CPU", "CUDA")}
    cuda = "yes" if has["CUDA"] else ("py" if name in python_cuda else "NO")
    has["CUDA"] = has["CUDA"] or name in python_cuda
    print(f"{name:<26} {'yes' if has['CPU'] else 'NO ':<5} {cuda}")
    problems += [f"sparseconv::{name} has no {key} kernel" for key, ok in has.items() if not ok]
print(f"environment: torch {torch.__version__}, CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()}")
if problems:
    print("\n".join(problems), file=sys.stderr)
    sys.exit(1)
print(f"all {len(registered)} ops have CPU and CUDA kernels (py: registered from sparseconv/ops.py)")
PY
log "OK: the CUDA build compiles and registers a CUDA kernel for every op ($(( $(date +%s) - start ))s)"
