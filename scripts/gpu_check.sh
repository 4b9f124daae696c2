#!/usr/bin/env bash
# The GPU proof in one command (about 3-5 minutes on one H100/H200-class GPU).
#
#   scripts/gpu_check.sh [WHEEL_DIR] [-- extra pytest arguments]
#
# For a GPU machine whose Python has CuPy for its CUDA (cupy-cuda12x or
# cupy-cuda13x >= 14.2), PyTorch (CUDA build) and mpi4py, maybe without
# mpiexec and without network. WHEEL_DIR (default: $WHEELS, else ./wheels)
# holds the wheels the image may lack; they are installed offline and never
# replace the image's CuPy or PyTorch. Fill it on a machine with network:
#
#   pip download -d wheels --only-binary=:all: pytest pytest-timeout hypothesis \
#       mpich nvidia-nccl-cu12          # nvidia-nccl-cu13 for cupy-cuda13x
#
# (mpich, 13 MB, brings mpiexec and libmpi for mpi4py; add --python-version /
# --platform when the target differs from the downloading machine.)
#
# Writes ONE report, markdown ending with a JSON block: $OUT/gpu_check.md
# (or gpu_check_out/gpu_check.md). Exit status 0 only if everything passed:
# any GPU test that fails OR skips fails the check, by name. On a machine
# without a GPU it stops within a minute, saying so (exit status 2).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUTDIR=${OUT:-gpu_check_out}
mkdir -p "$OUTDIR"
REPORT="$OUTDIR/gpu_check.md"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"

WHEELS=${WHEELS:-wheels}
if [ $# -gt 0 ] && [ "$1" != "--" ]; then WHEELS=$1; shift; fi
[ "${1:-}" = "--" ] && shift

# 1. Is there a GPU at all? Answer within a minute, before installing anything.
probe=$(timeout 60 "$PY" - <<'EOF' 2>&1
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
EOF
)
rc=$?
if [ $rc -ne 0 ]; then
  [ $rc -eq 124 ] && probe="NO GPU: the CUDA device query did not answer within 60 s"
  msg="cupysyncbn GPU check: there is no GPU on this machine; nothing was run. ${probe}"
  printf '# cupysyncbn GPU check\n\nFAILED: %s\n\n```json\n{"status": "no-gpu", "detail": %s}\n```\n' \
    "$msg" "$("$PY" -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$probe" 2>/dev/null || echo '""')" > "$REPORT"
  echo "$msg" >&2
  exit 2
fi
echo "cupysyncbn GPU check: $probe"

# 2. Offline install of what the image lacks (never CuPy or PyTorch).
if [ -d "$WHEELS" ]; then
  mapfile -t whl < <(ls "$WHEELS"/*.whl 2>/dev/null | grep -viE '/(cupy|torch)[-_]')
  if [ ${#whl[@]} -gt 0 ]; then
    echo "installing ${#whl[@]} wheel(s) from $WHEELS (offline)"
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" "${whl[@]}" 2>&1 | tail -5
  fi
else
  echo "no wheel folder $WHEELS: using what is installed"
fi

# 3. Environment, kernel cache, GPU tests, benchmark: one report, flushed as it goes.
"$PY" scripts/gpu_check.py --report "$REPORT" "$@"
status=$?
echo "report: $REPORT (exit status $status)"
exit $status
