#!/usr/bin/env bash
# The GPU proof in one command: at most 5 minutes on one H100/H200-class GPU,
# whatever hangs (every step has a time budget; see scripts/gpu_check.py).
#
#   scripts/gpu_check.sh [--dry-run] [WHEEL_DIR] [-- extra pytest arguments]
#
# For a GPU machine whose Python (python, else python3; or $PYTHON) has CuPy
# for its CUDA (cupy-cuda12x or cupy-cuda13x >= 14.2), PyTorch (CUDA build)
# and mpi4py, maybe without mpiexec and without network. WHEEL_DIR (default:
# $WHEELS, else ./wheels) holds the wheels the image may lack; they are
# installed offline and never replace the image's CuPy or PyTorch. Fill it on
# a machine with network (about 15 MB with mpich, 2 MB without):
#
#   pip download -d wheels --only-binary=:all: pytest pytest-timeout hypothesis mpich
#
# (mpich brings mpiexec and libmpi, for an mpi4py built on MPICH; add
# --python-version / --platform when the target differs from the downloading
# machine.) Whatever is still missing is reported as "NOT RUN: <reason>".
#
# Writes ONE report, markdown ending with a JSON block, as it goes:
# $OUT/gpu_check.md (or gpu_check_out/gpu_check.md). Exit status 0 only if
# everything passed; 1 if something failed; 3 if nothing failed but something
# could not run; 2 without a GPU (said within 15 s).
#
# --dry-run (no GPU needed): installs, probes the environment, compiles every
# kernel with NVRTC, collects the GPU tests and lists the steps with their
# budgets; exit 0 when all of that worked.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif command -v python >/dev/null 2>&1; then PY=python
elif command -v python3 >/dev/null 2>&1; then PY=python3
else echo "cupysyncbn GPU check: no python or python3 on PATH" >&2; exit 1
fi
OUTDIR=${OUT:-gpu_check_out}
mkdir -p "$OUTDIR"
REPORT="$OUTDIR/gpu_check.md"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"

WHEELS=${WHEELS:-wheels}
if [ $# -gt 0 ] && [ "$1" != "--" ]; then WHEELS=$1; shift; fi
[ "${1:-}" = "--" ] && shift

# 1. Is there a GPU at all? Answer within 15 s, before installing anything.
probe=$(timeout -k 2 15 "$PY" - <<'PYEOF' 2>&1
try:
    import cupy
except Exception as e:
    raise SystemExit(f"NO GPU: CuPy is not importable ({type(e).__name__}: {e})")
try:
    n = cupy.cuda.runtime.getDeviceCount()
except Exception as e:
    raise SystemExit(f"NO GPU: CUDA reports no usable device ({type(e).__name__}: {e})")
if n == 0:
    raise SystemExit("NO GPU: CuPy sees 0 CUDA devices")
print(f"{n} GPU(s)")
PYEOF
)
rc=$?
if [ $rc -ne 0 ] && [ $DRY -eq 0 ]; then
  [ $rc -eq 124 ] && probe="NO GPU: the CUDA device query did not answer within 15 s"
  msg="cupysyncbn GPU check: there is no GPU on this machine; nothing was run. ${probe}"
  printf '# cupysyncbn GPU check\n\nFAILED: %s\n\n```json\n{"status": "no-gpu", "detail": %s}\n```\n' \
    "$msg" "$("$PY" -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$probe" 2>/dev/null || echo '""')" > "$REPORT"
  echo "$msg" >&2
  exit 2
fi
echo "cupysyncbn GPU check: $probe"

# 2. Offline install of what the image lacks (never CuPy or PyTorch), 20 s at most.
if [ -d "$WHEELS" ]; then
  mapfile -t whl < <(ls "$WHEELS"/*.whl 2>/dev/null | grep -viE '/(cupy|torch)[-_]')
  if [ ${#whl[@]} -gt 0 ]; then
    echo "installing ${#whl[@]} wheel(s) from $WHEELS (offline)"
    timeout -k 2 20 "$PY" -m pip install -q --no-index --find-links "$WHEELS" "${whl[@]}" 2>&1 \
      | tail -5 || echo "pip install from $WHEELS failed or timed out: going on with what is installed"
  fi
else
  echo "no wheel folder $WHEELS: using what is installed"
fi

# 3. Environment, kernels, GPU tests, benchmark: one report, written as it goes.
args=(--report "$REPORT")
[ $DRY -eq 1 ] && args+=(--dry-run)
"$PY" scripts/gpu_check.py "${args[@]}" "$@"
status=$?
echo "report: $REPORT (exit status $status)"
exit $status
