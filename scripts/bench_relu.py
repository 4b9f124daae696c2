"""Cost of ``act="relu"`` against SyncBatchNorm followed by a NumPy ReLU and its mask.

Forward+backward of one layer (CPU backend of this process: numba unless
``CUPYSYNCBN_CPU_BACKEND=numpy``), float32, the two variants interleaved in
one process, each timed as the median of ``--repeat`` calls of a block of
``--inner`` steps::

    fused:    y = bn_relu(x);          dx = bn_relu.backward(dy)
    unfused:  y = bn(x); out = np.maximum(y, 0)
              dx = bn.backward(dy * (y > 0))

Run on 1 process or under ``mpiexec -n 2`` (the same batch per rank);
rank 0 prints the medians, their spread (min..max) and the load average.
Timings only: nothing is asserted (see issue #26 item 4).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

import cupysyncbn as sbn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="32,64,56,56", help="per-rank batch, NCHW")
    ap.add_argument("--repeat", type=int, default=9, help="timed blocks per variant (median)")
    ap.add_argument("--inner", type=int, default=3, help="steps per timed block")
    args = ap.parse_args()
    comm = sbn.init()
    shape = tuple(int(s) for s in args.shape.split(","))
    rng = np.random.default_rng(comm.rank)
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    fused = sbn.SyncBatchNorm(shape[1], act="relu")
    plain = sbn.SyncBatchNorm(shape[1])

    def step_fused() -> None:
        fused(x)
        fused.backward(dy)

    def step_unfused() -> None:
        y = plain(x)
        np.maximum(y, 0)  # the ReLU's output (what the next layer reads)
        plain.backward(dy * (y > 0))

    times: dict[str, list[float]] = {"fused": [], "unfused": []}
    for fn in (step_fused, step_unfused):  # warm up: compile, pool, handshake
        fn()
        fn()
    for _ in range(args.repeat):
        for name, fn in (("fused", step_fused), ("unfused", step_unfused)):
            comm.allreduce_sum(np.zeros(1))  # start together (a barrier)
            t0 = time.perf_counter()
            for _ in range(args.inner):
                fn()
            times[name].append((time.perf_counter() - t0) / args.inner)
    if comm.rank == 0:
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in times.items():
            print(f"{k:8s} median {med[k] * 1e3:8.2f} ms  spread {min(v) * 1e3:.2f}.."
                  f"{max(v) * 1e3:.2f} ms  (n={len(v)})")
        print(f"ratio fused/unfused {med['fused'] / med['unfused']:.3f}  ranks {comm.size}"
              f"  shape {shape}  backend {sbn.backends.cpu_backend().name}/"
              f"{type(sbn.backends.cpu_backend()).__name__}  loadavg {os.getloadavg()}")


if __name__ == "__main__":
    main()
