#!/usr/bin/env bash
# GPU check: the CUDA path's tests and a kernel benchmark, all written to ONE file.
#
# For a GPU machine whose image has CuPy, mpi4py and PyTorch but no network.
# Wheels the image lacks (pytest, pytest-timeout, hypothesis, mpich,
# nvidia-nccl-cu12, ...) are carried in a folder: WHEELS=dir (default ./wheels).
#
#   scripts/gpu_check.sh [REPORT]      # default: $OUT/gpu_check.txt or gpu_check_out/gpu_check.txt
#
# Environment: WHEELS (wheel folder), PYTEST_ARGS (extra pytest arguments),
# BENCH_ITERS (timed iterations per case, default 50).
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-gpu_check_out}
mkdir -p "$OUTDIR"
REPORT=${1:-$OUTDIR/gpu_check.txt}
exec > >(tee "$REPORT") 2>&1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
status=0

echo "== cupysyncbn GPU check  $(date -u +%FT%TZ)  $(git rev-parse --short HEAD 2>/dev/null)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -5

echo "== install (offline)"
WHEELS=${WHEELS:-wheels}
if [ -d "$WHEELS" ]; then
  # everything carried in, without touching the image's CuPy / PyTorch
  pip install --no-index --find-links "$WHEELS" "$WHEELS"/*.whl 2>&1 | tail -3
fi
if ! pip install --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1; then
  echo "(editable install not possible offline: using PYTHONPATH=$(pwd))"
  export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
fi
python - <<'EOF'
import importlib
for m in ("numpy", "cupy", "mpi4py", "torch", "pytest"):
    try:
        mod = importlib.import_module(m)
        print(f"{m:8s} {getattr(mod, '__version__', '?')}")
    except Exception as e:
        print(f"{m:8s} MISSING ({e})")
try:
    import cupy
    from cupy.cuda import nccl
    print("cuda     runtime", cupy.cuda.runtime.runtimeGetVersion(),
          "devices", cupy.cuda.runtime.getDeviceCount(),
          "nccl", nccl.get_version() if nccl.available else "unavailable")
except Exception as e:
    print("cuda     unavailable:", e)
EOF
command -v mpiexec >/dev/null && echo "mpiexec  $(command -v mpiexec)" || echo "mpiexec  MISSING"

echo "== tests (nvrtc + gpu)"
# shellcheck disable=SC2086
python -m pytest -q -rs -p no:cacheprovider tests/test_nvrtc_kernels.py tests/test_gpu_*.py \
  ${PYTEST_ARGS:-} || status=1

echo "== benchmark: cupysyncbn kernels vs torch.nn.functional.batch_norm (same GPU, one process)"
python - <<'EOF' || status=1
import os

import cupy as cp
import numpy as np

from cupysyncbn import functional as F
from cupysyncbn.comm.base import LOCAL

try:
    ndev = cp.cuda.runtime.getDeviceCount()
except Exception as e:
    raise SystemExit(f"no CUDA GPU ({e}): benchmark not run")
print("GPU:", cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), f"({ndev} device(s))")
try:
    import torch
    has_torch = torch.cuda.is_available()
except Exception:
    has_torch = False
iters = int(os.environ.get("BENCH_ITERS", "50"))


def timeit(fn):
    for _ in range(3):
        fn()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(iters):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


cases = [("NCHW", (32, 64, 56, 56)), ("NCHW", (256, 3, 224, 224)), ("NCHW", (8, 2048, 7, 7)),
         ("NHWC", (32, 56, 56, 64)), ("NHWC", (64, 7, 7, 2048)), ("NC", (65536, 256))]
print(f"{'case':32s} {'dtype':8s} {'ours fwd+bwd ms':>16s} {'torch ms':>9s} {'ratio':>6s} {'GB/s':>6s}")
for fmt, shape in cases:
    for dt in ("float32", "float16"):
        c = shape[-1] if fmt.endswith("C") else shape[1]
        x = cp.random.standard_normal(shape, dtype=cp.float32).astype(dt)
        dy = cp.random.standard_normal(shape, dtype=cp.float32).astype(dt)
        w = cp.ones(c, dtype=cp.float32)
        b = cp.zeros(c, dtype=cp.float32)
        rm, rv = cp.zeros(c, cp.float32), cp.ones(c, cp.float32)

        def ours():
            res = F.batch_norm_forward(x, w, b, rm, rv, training=True, data_format=fmt,
                                       comm=LOCAL)
            F.batch_norm_backward(dy, res.ctx)

        t_ours = timeit(ours)
        # bytes moved by the ideal kernels: read x (stats), read x + write y,
        # read x, dy (reduce), read x, dy + write dx
        gbs = 8 * x.nbytes / (t_ours * 1e-3) / 1e9
        t_torch, ratio = float("nan"), float("nan")
        if has_torch:
            tx = torch.from_dlpack(x)
            if fmt.endswith("C") and x.ndim > 2:  # torch wants NC...: channels_last view
                tx = tx.movedim(-1, 1)
            tx = tx.detach().requires_grad_(True)
            tdy = torch.from_dlpack(dy)
            if fmt.endswith("C") and x.ndim > 2:
                tdy = tdy.movedim(-1, 1)
            tw = torch.from_dlpack(w).clone().requires_grad_(True)
            tb = torch.from_dlpack(b).clone().requires_grad_(True)
            trm, trv = torch.from_dlpack(rm).clone(), torch.from_dlpack(rv).clone()

            def theirs():
                y = torch.nn.functional.batch_norm(tx, trm, trv, tw, tb, training=True)
                y.backward(tdy)

            t_torch = timeit(theirs)
            ratio = t_ours / t_torch
        print(f"{fmt + str(shape):32s} {dt:8s} {t_ours:16.3f} {t_torch:9.3f} {ratio:6.2f} {gbs:6.0f}")
print("ratio = ours / torch (lower is better); torch runs cuDNN/native kernels")
EOF

echo "== done: status $status  (report: $REPORT)"
exit $status
