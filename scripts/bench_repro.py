"""Cost of ``reproducible=True`` against the default mode, forward+backward, interleaved.

Issue #21's cost row: the two layers run alternately in one job (same data,
same ranks, same moment of the machine's load), each timed as the median of
``--repeat`` blocks of ``--inner`` steps (one step: a forward and its
backward; every rank starts each block together)::

    mpiexec -n 2 python scripts/bench_repro.py --shapes 32x64x56x56,32x2048x7x7 \
        --formats NCHW,NHWC

``--shapes`` are global batches, split evenly over the ranks (samples are
the unit). Rank 0 prints one row per shape and format: both medians, their
spreads (min..max) and the ratio reproducible/default, and the load average.
Timings only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

import cupysyncbn as sbn


def _local(shape: tuple, fmt: str, size: int) -> tuple:
    n = shape[0] // size
    if fmt.endswith("C") and len(shape) > 2:  # channel-last: C moves to the end
        return (n, *shape[2:], shape[1])
    return (n, *shape[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="32x64x56x56,32x2048x7x7",
                    help="global batches N x C x spatial..., comma-separated")
    ap.add_argument("--formats", default="NCHW,NHWC", help="data formats, comma-separated")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeat", type=int, default=11, help="timed blocks per layer (median)")
    ap.add_argument("--inner", type=int, default=3, help="steps per timed block")
    args = ap.parse_args()
    comm = sbn.init()
    rng = np.random.default_rng(comm.rank)
    if comm.rank == 0:
        print("| shape (global) | fmt | ranks | default f+b ms (spread) |"
              " reproducible f+b ms (spread) | ratio |")
        print("|---|---|---|---|---|---|")
    for spec in args.shapes.split(","):
        shape = tuple(int(v) for v in spec.split("x"))
        for fmt in args.formats.split(","):
            ls = _local(shape, fmt, comm.size)
            x = (rng.standard_normal(ls) + 1.0).astype(args.dtype)
            dy = rng.standard_normal(ls).astype(args.dtype)
            layers = {m: sbn.SyncBatchNorm(shape[1], data_format=fmt, reproducible=m)
                      for m in (False, True)}
            times: dict[bool, list[float]] = {False: [], True: []}
            for bn in layers.values():  # warm up: compile, pools, handshake
                for _ in range(2):
                    bn(x)
                    bn.backward(dy)
            for _ in range(args.repeat):
                for m, bn in layers.items():
                    comm.allreduce_sum(np.zeros(1))  # start together (a barrier)
                    t0 = time.perf_counter()
                    for _ in range(args.inner):
                        bn(x)
                        bn.backward(dy)
                    times[m].append((time.perf_counter() - t0) / args.inner)
            if comm.rank == 0:
                med = {m: statistics.median(v) for m, v in times.items()}
                cells = [f"{med[m] * 1e3:.2f} ({min(times[m]) * 1e3:.2f}.."
                         f"{max(times[m]) * 1e3:.2f})" for m in (False, True)]
                print(f"| {spec} | {fmt} | {comm.size} | {cells[0]} | {cells[1]} |"
                      f" {med[True] / med[False]:.2f} |", flush=True)
    if comm.rank == 0:
        be = sbn.backends.cpu_backend()
        print(f"\n{args.dtype}, backend {type(be).__name__}, {args.repeat} blocks of"
              f" {args.inner} steps per layer, loadavg {os.getloadavg()}")


if __name__ == "__main__":
    main()
