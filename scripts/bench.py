#!/usr/bin/env python
"""Per-layer SyncBatchNorm benchmark: time, bandwidth, collectives, vs copy and PyTorch.

Usage::

    python scripts/bench.py                 # full table, 1/2/4 ranks (launches mpiexec itself)
    python scripts/bench.py --smoke         # CI-sized: one tiny shape, 1 and 2 ranks
    python scripts/bench.py --shapes 32x64x56x56 --formats NCHW --dtypes float32 --ranks 2
    python scripts/bench.py ... --cpu-backend numpy,numba   # both CPU backends, same run
    python scripts/bench.py --suite resnet50 --per-rank 2,4   # ResNet-50's BN shapes, 2 ranks
    python scripts/bench.py --smoke --fixed-cost --gpu-host --no-torch   # per-pass costs (us)

For every row (global batch shape, data format, dtype, ranks K) it reports
the median over repeated runs (after warm-up) of forward, backward and
forward+backward, the slowest rank of each run counting, and the quartiles
of forward+backward. Forward and backward are timed in the same repetitions
(one forward, then its backward), f+b being their sum, so the columns add up;
PyTorch likewise, each of its calls followed by ``--torch-idle`` seconds of
sleep so that its OpenMP workers stop spinning before ours run. A progress
line per row goes to stderr. The batch need not
split evenly: rank r holds ceil(N/K) samples if r < N mod K, else floor(N/K)
(so with N < K some ranks hold none, the case synchronized batch norm exists
for); the time is then the slowest rank's, the bandwidth that of the global
batch.

* effective bandwidth from the minimum bytes (forward reads x twice and writes
  y; backward reads x and dy twice and writes dx), summed over the K ranks;
* ``vs copy``: that bandwidth over the machine's copy bandwidth measured in the
  same run with K processes copying at once (``np.copyto`` / ``cupy`` copy),
  right before each row (a shared machine's bandwidth drifts within a run);
  ``x bound`` is forward+backward time over the 8-pass copy-bandwidth bound;
* ``vs torch``: our time over PyTorch's in the same run (CPU:
  ``torch.nn.BatchNorm2d`` on the whole batch with K threads; GPU: cuDNN
  ``BatchNorm2d`` and ``torch.nn.SyncBatchNorm`` in a 1-rank NCCL group);
  below 1 means faster than PyTorch;
* collectives and bytes sent per rank per training step (forward+backward),
  counted by wrapping the communicator.

``--cpu-backend numpy,numba`` times each listed CPU backend in turn (it sets
``CUPYSYNCBN_CPU_BACKEND`` for the worker ranks; the table then gets a
``backend`` column naming the class that actually ran, and both share the
same PyTorch baseline). The default, ``auto``, is what a user gets: numba
when it is importable, else NumPy.

Launches and host synchronizations per pass: ``--recorder MODULE:NAME`` names
an object with ``clear()`` and ``summary() -> dict`` (keys ``kernels``,
``ops``, ``syncs``, ``d2h``). With the recording CuPy stand-in of the tests,
``--recorder support.recording_cupy:REC`` (``tests/`` is put on ``sys.path``; needs
g++ >= 12), each row's layer is rebuilt on the stand-in (CuPy path, a small
batch of the row's format and dtype: the counts do not depend on its size,
forced collectives so the all-reduce path runs) and its third forward and
backward are counted, on any machine. With another recorder, each rank runs
one more forward and backward of the timed layer between ``clear()`` and
``summary()``. The rows get ``launches_fwd``/``launches_bwd`` (our kernels +
other device operations) and ``syncs_fwd``/``syncs_bwd``, and the table a
``launch/sync f;b`` column (see ``count_pass``). Without a recorder the
column is left out.

Errors in the arguments are reported by the driver before any rank starts;
an error inside the ranks is printed once, with the ranks that raised it.

Writes ``OUT/bench.json`` and ``OUT/bench.md`` (default OUT=bench_out) and
prints the markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FULL_SHAPES = [
    (32, 64, 112, 112),
    (32, 64, 56, 56),
    (32, 256, 56, 56),
    (32, 128, 28, 28),
    (32, 512, 28, 28),
    (32, 256, 14, 14),
    (32, 1024, 14, 14),
    (32, 512, 7, 7),
    (32, 2048, 7, 7),
]
SMOKE_SHAPES = [(4, 8, 6, 6)]
#: Every BatchNorm2d of torchvision's ResNet-50 (v1.5: stride in the 3x3 conv) as
#: (channels, spatial size, how many layers of the network have that shape): 53 layers.
RESNET50_BN = [
    (64, 112, 1),  # stem
    (64, 56, 6), (256, 56, 4),  # layer1: 3 blocks x (64, 64, 256) + downsample 256
    (128, 56, 1), (128, 28, 7), (512, 28, 5),  # layer2: 4 blocks, first 1x1 at 56
    (256, 28, 1), (256, 14, 11), (1024, 14, 7),  # layer3: 6 blocks
    (512, 14, 1), (512, 7, 5), (2048, 7, 4),  # layer4: 3 blocks
]
#: The fixed-cost row: a tiny per-rank batch where the time is all per-pass overhead.
FIXED_SHAPE = (4, 16, 4, 4)
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# --------------------------------------------------------------------------- args
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="CI-sized run: one tiny shape, 1 and 2 ranks, 3 reps, float32")
    p.add_argument("--suite", choices=("resnet50",), default=None,
                   help="resnet50: every BatchNorm shape of ResNet-50 (12 distinct shapes of its"
                   " 53 layers) at --per-rank images per rank on 2 ranks, float32, plus the"
                   " fixed-cost row (default: off, the --shapes table)")
    p.add_argument("--per-rank", default="4",
                   help="with --suite: comma-separated images per rank, e.g. 2,4 (default 4)")
    p.add_argument("--shapes", default=None,
                   help="comma-separated NxCxHxW global shapes (default: the ResNet table of"
                   " 32-image batches)")
    p.add_argument("--formats", default="NCHW,NHWC",
                   help="comma-separated data formats, NCHW and/or NHWC (default NCHW,NHWC)")
    p.add_argument("--dtypes", default="float32,float16",
                   help="comma-separated dtypes of x: float16, float32, float64"
                   " (default float32,float16; --smoke and --suite: float32)")
    p.add_argument("--ranks", default=None,
                   help="comma-separated rank counts (default 1,2,4; --smoke 1,2; --suite 2)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions per row; medians and quartiles are over them"
                   " (default 10, --smoke 3)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed forward+backward passes before each timing (default 2,"
                   " --smoke at most 1)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="auto: a GPU when CuPy sees one, else the CPU (default auto)")
    p.add_argument("--no-torch", action="store_true",
                   help="skip the PyTorch baselines (default: time them)")
    p.add_argument("--torch-idle", type=float, default=0.25,
                   help="seconds to sleep after each PyTorch CPU call before timing ours, so"
                   " that its OpenMP workers have stopped spinning (default 0.25)")
    p.add_argument("--fixed-cost", action="store_true",
                   help="add the fixed-cost rows: forward+backward of a tiny batch"
                   f" {'x'.join(map(str, FIXED_SHAPE))} per rank, NCHW float32, on each rank"
                   " count, in microseconds per pass (default: off; on with --suite)")
    p.add_argument("--gpu-host", action="store_true",
                   help="add the GPU host-path row: Python time per synchronized pass on the"
                   " CuPy path, on the tests' recording stand-in with launches not executed"
                   " (needs g++ >= 12; default: off; on with --suite)")
    p.add_argument("--copy-mib", type=int, default=None,
                   help="array size for the copy-bandwidth probe (default 256, --suite 64,"
                   " --smoke 8)")
    p.add_argument("--cpu-backend", default="auto",
                   help="comma-separated CPU backends to time: auto (numba when importable),"
                   " numba, numpy (sets CUPYSYNCBN_CPU_BACKEND for the ranks; default auto)")
    p.add_argument("--recorder", default=None, metavar="MODULE:NAME",
                   help="object with clear()/summary() counting launches and host syncs"
                   " (e.g. support.recording_cupy:REC); adds a launches/syncs per pass column"
                   " (default: none)")
    p.add_argument("--reproducible", action="store_true",
                   help="time layers built with reproducible=True (docs/reproducibility.md;"
                   " default: off)")
    p.add_argument("--out", type=Path, default=Path("bench_out"),
                   help="folder for bench.json and bench.md (default bench_out, relative to"
                   " the current directory)")
    # internal: one worker job under mpiexec
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.suite == "resnet50":
        try:
            per = [int(v) for v in a.per_rank.split(",")]
        except ValueError:
            per = []
        if not per or min(per) < 1:
            raise SystemExit(f"--per-rank: expected positive integers, got {a.per_rank!r}")
        a.ranks = a.ranks or "2"
        k = max(parse_ranks(a.ranks))
        a.shapes = a.shapes or ",".join(
            f"{n * k}x{c}x{s}x{s}" for n in per for c, s, _ in RESNET50_BN)
        if a.dtypes == "float32,float16":
            a.dtypes = "float32"
        a.copy_mib = a.copy_mib or 64
        a.fixed_cost = a.gpu_host = True
    if a.smoke:
        a.shapes = a.shapes or ",".join("x".join(map(str, s)) for s in SMOKE_SHAPES)
        a.ranks = a.ranks or "1,2"
        a.reps = a.reps or 3
        a.warmup = min(a.warmup, 1)
        a.copy_mib = a.copy_mib or 8
        if a.dtypes == "float32,float16":
            a.dtypes = "float32"
    a.reps = a.reps or 10
    a.copy_mib = a.copy_mib or 256
    a.ranks = a.ranks or "1,2,4"
    return a


def parse_shapes(text: str | None) -> list[tuple[int, ...]]:
    if not text:
        return list(FULL_SHAPES)
    out = []
    for item in text.split(","):
        try:
            dims = tuple(int(v) for v in item.strip().lower().split("x"))
        except ValueError:
            dims = ()
        if len(dims) != 4 or min(dims) < 1:
            raise SystemExit(f"--shapes: expected NxCxHxW with positive sizes, got {item!r}")
        out.append(dims)
    return out


def parse_ranks(text: str) -> list[int]:
    try:
        ranks = [int(v) for v in text.split(",")]
    except ValueError:
        ranks = []
    if not ranks or min(ranks) < 1:
        raise SystemExit(f"--ranks: expected comma-separated positive integers, got {text!r}")
    return ranks


def parse_dtypes(text: str) -> list[str]:
    out = [d.strip() for d in text.split(",")]
    for d in out:
        if d not in ("float16", "float32", "float64"):
            raise SystemExit(f"--dtypes: float16, float32 or float64, got {d!r}")
    return out


# ------------------------------------------------------------------ array helpers
def gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def use_gpu(device: str) -> bool:
    if device == "cpu":
        return False
    ok = gpu_available()
    if device == "gpu" and not ok:
        raise SystemExit("--device gpu: CuPy sees no GPU")
    return ok


def rank_batches(n: int, k: int) -> list[int]:
    """Samples per rank: ceil(n/k) for the first n % k ranks, floor(n/k) for the rest."""
    return [n // k + (1 if r < n % k else 0) for r in range(k)]


def local_shape(shape: tuple, fmt: str, k: int, rank: int = 0) -> tuple:
    """Rank ``rank``'s part of the global batch ``shape`` (N, C, H, W), in ``fmt``."""
    n, c, h, w = shape
    nr = rank_batches(n, k)[rank]
    return (nr, c, h, w) if fmt == "NCHW" else (nr, h, w, c)


# ------------------------------------------------------------------------- worker
class CountingComm:
    """Wraps a communicator; counts all-reduce calls and bytes."""

    def __new__(cls, inner):  # subclass at run time so isinstance(Communicator) holds
        from cupysyncbn.comm.base import Communicator

        class _Counting(Communicator):
            def __init__(self, inner):
                self.inner = inner
                self.rank, self.size, self.backend = inner.rank, inner.size, inner.backend
                self.calls = 0
                self.bytes = 0

            def allreduce_sum(self, buf):
                self.calls += 1
                self.bytes += int(buf.nbytes)
                return self.inner.allreduce_sum(buf)

            def allreduce_max(self, buf):  # the reproducible mode's bound pass
                self.calls += 1
                self.bytes += int(buf.nbytes)
                return self.inner.allreduce_max(buf)

            def supports(self, array):
                return self.inner.supports(array)

            def abort(self, errorcode=1):
                self.inner.abort(errorcode)

        return _Counting(inner)


class Timer:
    """Median over reps of the slowest rank's time, after warm-up."""

    def __init__(self, mpi_comm, xp, gpu: bool, reps: int, warmup: int):
        self.mpi, self.xp, self.gpu, self.reps, self.warmup = mpi_comm, xp, gpu, reps, warmup

    def sync(self):
        if self.gpu:
            self.xp.cuda.get_current_stream().synchronize()

    def barrier(self):
        self.sync()
        if self.mpi is not None:
            self.mpi.Barrier()

    def slowest(self, t: float) -> float:
        if self.mpi is None:
            return t
        from mpi4py import MPI

        return self.mpi.allreduce(t, op=MPI.MAX)

    def once(self, fn) -> float:
        """One timed call, all ranks together; the slowest rank's time."""
        self.barrier()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return self.slowest(time.perf_counter() - t0)

    def __call__(self, fn, before=None) -> float:
        for _ in range(self.warmup):
            if before:
                before()
            fn()
        times = []
        for _ in range(self.reps):
            if before:
                before()
            self.barrier()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(self.slowest(time.perf_counter() - t0))
        return statistics.median(times)

    def fwd_bwd(self, fwd, bwd) -> dict:
        """Forward and backward timed in the same repetitions: consistent columns.

        Each repetition times one forward and the backward right after it
        (no barrier in between, as in training); f+b is that repetition's
        sum. Each of the three is the slowest rank's, so the median f+b is
        within the spread of median fwd + median bwd. Returns the medians
        (``fwd_s``, ``bwd_s``, ``fwdbwd_s``) and their quartiles
        (``*_q1``/``*_q3``).
        """
        for _ in range(self.warmup):
            fwd()
            bwd()
        rows = []
        for _ in range(self.reps):
            self.barrier()
            t0 = time.perf_counter()
            fwd()
            self.sync()
            t1 = time.perf_counter()
            bwd()
            self.sync()
            t2 = time.perf_counter()
            rows.append([self.slowest(v) for v in (t1 - t0, t2 - t1, t2 - t0)])
        return summarize(rows, ("fwd_s", "bwd_s", "fwdbwd_s"))


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3) of ``values`` (the median itself for fewer than 4)."""
    med = statistics.median(values)
    if len(values) < 4:
        return med, med, med
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, med, q3


def summarize(rows: list[list[float]], keys: tuple[str, ...]) -> dict:
    """Median and quartiles of each column of ``rows``, keyed ``KEY``, ``KEY_q1``, ``KEY_q3``."""
    out = {}
    for i, key in enumerate(keys):
        q1, med, q3 = quartiles([r[i] for r in rows])
        out[key], out[key + "_q1"], out[key + "_q3"] = med, q1, q3
    return out


def copy_bandwidth(timer: Timer, xp, mib: int) -> float:
    """Aggregate copy bandwidth (bytes/s read + written) with every rank copying at once."""
    n = mib * 2**20 // 4
    src = xp.ones(n, dtype=np.float32)
    dst = xp.empty_like(src)
    t = timer(lambda: xp.copyto(dst, src))
    k = 1 if timer.mpi is None else timer.mpi.Get_size()
    return k * 2 * src.nbytes / t


def load_recorder(spec: str | None):
    """The ``--recorder MODULE:NAME`` object, or None."""
    if not spec:
        return None
    import importlib

    mod, _, name = spec.partition(":")
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.append(tests)  # the recording CuPy stand-in: tests/support/recording_cupy.py
    obj = importlib.import_module(mod)
    for part in (name or "REC").split("."):
        obj = getattr(obj, part)
    return obj


def count_pass(recorder, fn) -> tuple[int, int]:
    """(launches, host synchronizations) of one call of ``fn``, from the recorder.

    Launches are our kernels plus every other device operation the recorder
    saw (its ``kernels`` and ``ops``); synchronizations its ``syncs``.
    """
    recorder.clear()
    fn()
    got = recorder.summary()
    return int(got.get("kernels", 0)) + int(got.get("ops", 0)), int(got.get("syncs", 0))


def idle_wait(mpi) -> None:
    """Wait for every rank without spinning: a rank blocked in an MPI call spins
    at 100% and would steal a core from PyTorch's threads on rank 0."""
    if mpi is None:
        return
    req = mpi.Ibarrier()
    while not req.Test():
        time.sleep(0.0005)


def beside_rounds(timer, mpi, rank, k, shape, fmt, dt, ours_fb, xbytes, copy_mib,
                  with_torch, torch_idle=0.25) -> dict:
    """Ratios measured side by side, right after our row (CPU).

    Rank 0 first times ``torch.nn.BatchNorm2d`` on the whole global batch with
    k threads while the other ranks sleep (:func:`idle_wait`), forward and
    backward in the same repetitions as ours (:meth:`Timer.fwd_bwd`), then
    sleeps ``torch_idle`` seconds: PyTorch's OpenMP workers spin for a while
    after each call and would take a core from our next timing. Then ``reps``
    rounds of: one forward+backward of ours (all ranks), one copy of
    ``copy_mib`` MiB on every rank at once, one PyTorch forward+backward
    (rank 0, the others asleep) and ``torch_idle`` of sleep. ``paired_x_bound`` and
    ``paired_fwdbwd_vs_torch`` are the medians of the per-round ratios: load
    that drifts during a run on a shared machine affects both sides of each
    ratio alike. Returns the keys for rank 0's row ({} elsewhere).
    """
    fns = torch_cpu_fns(tuple(shape), fmt, dt, k) if (with_torch and rank == 0) else None
    res = {}
    if fns is not None:
        alone = Timer(None, np, False, timer.reps, timer.warmup)
        res = {f"torch_{key}": v for key, v in alone.fwd_bwd(fns[0], fns[1]).items()}
        res.update({"torch_threads": k, "torch_version": fns[3],
                    "torch_timed": "in the job, other ranks asleep"})
        time.sleep(torch_idle)  # its OpenMP workers stop spinning before ours run
    idle_wait(mpi)
    src = np.ones(copy_mib * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # first touch outside the timing
    bounds, ratios = [], []
    for _ in range(timer.reps):
        ours = timer.once(ours_fb)
        t_copy = timer.once(lambda: np.copyto(dst, src))
        bounds.append(ours / (8 * xbytes / (k * 2 * src.nbytes / t_copy)))
        if fns is not None:
            t0 = time.perf_counter()
            fns[2]()
            ratios.append(ours / (time.perf_counter() - t0))
            time.sleep(torch_idle)  # as above: no spinning PyTorch worker during ours
        idle_wait(mpi)
    res["paired_x_bound"] = statistics.median(bounds)
    if ratios:
        res["paired_fwdbwd_vs_torch"] = statistics.median(ratios)
    return res if rank == 0 else {}


def standin_counts(sbn, installed, recorder, shape, fmt, dt) -> dict:
    """Launches and host syncs of a steady-state pass of this row's layer, CuPy path.

    Runs on the recording stand-in (``installed()`` makes ``import cupy`` give
    it); a small batch of the row's format and dtype, forced collectives.
    """
    from cupysyncbn.comm.base import NoCommunicator

    comm = NoCommunicator()
    comm.force_collectives = True
    c = min(int(shape[1]), 8)
    small = (2, 3, 4, c) if fmt.endswith("C") else (2, c, 3, 4)
    rng = np.random.default_rng(0)
    with installed() as cp:
        bn = sbn.SyncBatchNorm(c, data_format=fmt, comm=comm)
        bn.weight.data, bn.bias.data = cp.ones(c, "float32"), cp.zeros(c, "float32")
        object.__setattr__(bn, "_mean", cp.zeros(c, "float32"))
        object.__setattr__(bn, "_variance", cp.ones(c, "float32"))
        x = cp.asarray(rng.standard_normal(small).astype(dt))
        dy = cp.asarray(rng.standard_normal(small).astype(dt))
        for _ in range(2):  # the first pass adds the handshake and the mean pass
            bn(x)
            bn.backward(dy)
        lf, sf = count_pass(recorder, lambda: bn(x))
        lb, sb = count_pass(recorder, lambda: bn.backward(dy))
    return {"launches_fwd": lf, "syncs_fwd": sf, "launches_bwd": lb, "syncs_bwd": sb}


def measure_row(sbn, xp, gpu, timer, counting, rng, shape, fmt, dt, recorder=None,
                torch_cpu=False, copy_mib=256, torch_idle=0.25, reproducible=False) -> dict:
    """Time one row on this rank's part of the batch; count its collectives."""
    ls = local_shape(tuple(shape), fmt, counting.size, counting.rank)
    x = xp.asarray(rng.standard_normal(ls, dtype=np.float32) + 1.0).astype(dt)
    dy = xp.asarray(rng.standard_normal(ls, dtype=np.float32)).astype(dt)
    bn = sbn.SyncBatchNorm(shape[1], data_format=fmt, comm=counting, reproducible=reproducible)
    from cupysyncbn.backends import get_backend

    impl = type(get_backend(x)).__name__  # what actually runs (numba may be missing)
    bn.to("cuda" if gpu else "cpu")  # set_device('auto') may have put it on a GPU
    times = timer.fwd_bwd(lambda: bn(x), lambda: bn.backward(dy))
    beside = {}
    if not gpu:
        beside = beside_rounds(timer, timer.mpi, counting.rank, counting.size, shape, fmt, dt,
                               lambda: (bn(x), bn.backward(dy)),
                               int(np.prod(shape)) * np.dtype(dt).itemsize, copy_mib, torch_cpu,
                               torch_idle)
    counts = {}
    standin = getattr(sys.modules.get(type(recorder).__module__), "installed", None)
    if standin is not None:  # the CuPy path, counted on the recording stand-in
        counts.update(standin_counts(sbn, standin, recorder, shape, fmt, dt))
    elif recorder is not None:  # launches and host syncs of one steady-state pass each
        timer.barrier()
        counts["launches_fwd"], counts["syncs_fwd"] = count_pass(recorder, lambda: bn(x))
        counts["launches_bwd"], counts["syncs_bwd"] = count_pass(
            recorder, lambda: bn.backward(dy))
        timer.barrier()
    bn.clear_gradients()
    counting.calls = counting.bytes = 0
    bn(x)
    bn.backward(dy)
    xbytes = int(np.prod(shape)) * np.dtype(dt).itemsize  # the whole global batch
    return {
        "shape": list(shape), "format": fmt, "dtype": dt, "ranks": counting.size,
        "local_shape": list(local_shape(tuple(shape), fmt, counting.size)),
        "rank_batches": rank_batches(shape[0], counting.size), "backend": impl, **counts,
        "reproducible": reproducible,
        **beside,
        **times,
        "fwd_bytes": 3 * xbytes, "bwd_bytes": 5 * xbytes,
        "collectives_per_step": counting.calls, "comm_bytes_per_step": counting.bytes,
    }


def fixed_cost(sbn, comm, mpi, reps: int, inner: int = 100) -> dict:
    """Per-pass fixed cost: forward+backward of a tiny batch, in microseconds.

    ``FIXED_SHAPE`` per rank, NCHW float32, NumPy arrays. ``reps`` blocks of
    ``inner`` consecutive forward+backward passes each (after 200 warm-up
    passes); each block's time per pass is the slowest rank's wall time on
    several ranks and this thread's CPU time (``time.thread_time_ns``, robust
    to other load on the machine) on one. Median and quartiles over blocks.
    """
    rng = np.random.default_rng(comm.rank)
    x = rng.standard_normal(FIXED_SHAPE, dtype=np.float32)
    dy = rng.standard_normal(FIXED_SHAPE, dtype=np.float32)
    bn = sbn.SyncBatchNorm(FIXED_SHAPE[1], comm=comm)
    for _ in range(200):
        bn(x)
        bn.backward(dy)
    clock = time.perf_counter_ns if mpi is not None else time.thread_time_ns
    blocks = []
    for _ in range(max(reps, 5) * 3):
        if mpi is not None:
            mpi.Barrier()
        t0 = clock()
        for _ in range(inner):
            bn(x)
            bn.backward(dy)
        t = (clock() - t0) / inner / 1e3
        if mpi is not None:
            from mpi4py import MPI

            t = mpi.allreduce(t, op=MPI.MAX)
        blocks.append([t])
    out = summarize(blocks, ("fixed_us",))
    out.update({"kind": "fixed_cost", "shape": list(FIXED_SHAPE), "ranks": comm.size,
                "clock": "wall, slowest rank" if mpi is not None else "thread CPU time",
                "backend": type(sbn.backends.get_backend(x)).__name__})
    return out


def gpu_host_cost(reps: int, inner: int = 50) -> dict:
    """Python time per synchronized pass on the CuPy path, without a GPU (issue 26 item 3).

    The layer runs on the recording CuPy stand-in of the tests
    (``tests/support/recording_cupy.py``) in its null mode: launches are
    recorded, not executed. A (4,16,4,4) float32 NCHW batch, a
    ``NoCommunicator`` with forced collectives (the all-reduce path). The time
    per pass (half a forward+backward; this thread's CPU time, median of
    blocks of ``inner`` forward+backward) includes the stand-in's own NumPy
    work for allocations and copies (a real CuPy call costs about as much);
    ``py_calls`` counts the Python function calls per pass made from the
    package's own modules (``sys.setprofile``).
    """
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.append(tests)
    from support import recording_cupy

    import cupysyncbn as sbn
    from cupysyncbn.comm.base import NoCommunicator

    rec = recording_cupy.REC
    comm = NoCommunicator()
    comm.force_collectives = True
    n, c, h, w = FIXED_SHAPE
    rng = np.random.default_rng(0)
    with recording_cupy.installed() as cp:
        bn = sbn.SyncBatchNorm(c, comm=comm)
        bn.weight.data, bn.bias.data = cp.ones(c, "float32"), cp.zeros(c, "float32")
        object.__setattr__(bn, "_mean", cp.zeros(c, "float32"))
        object.__setattr__(bn, "_variance", cp.ones(c, "float32"))
        x = cp.asarray(rng.standard_normal(FIXED_SHAPE, dtype=np.float32))
        dy = cp.asarray(rng.standard_normal(FIXED_SHAPE, dtype=np.float32))
        for _ in range(3):  # executed: the handshake, the mean pass, the shift
            bn(x)
            bn.backward(dy)
        rec.execute = False
        try:
            for _ in range(inner):
                bn(x)
                bn.backward(dy)
            blocks = []
            for _ in range(max(reps, 5) * 3):
                rec.clear()
                t0 = time.thread_time_ns()
                for _ in range(inner):
                    bn(x)
                    bn.backward(dy)
                blocks.append([(time.thread_time_ns() - t0) / inner / 2 / 1e3])
            launches = len(rec.kernels) / inner / 2
            calls = [0]
            pkg = str(ROOT / "cupysyncbn")

            def count(frame, event, arg):
                if event == "call" and frame.f_code.co_filename.startswith(pkg):
                    calls[0] += 1

            sys.setprofile(count)
            try:
                bn(x)
                bn.backward(dy)
            finally:
                sys.setprofile(None)
        finally:
            rec.execute = True
    out = summarize(blocks, ("host_us",))
    out.update({"py_calls": calls[0] / 2, "launches": launches,
                "shape": list(FIXED_SHAPE), "clock": "thread CPU time"})
    return out


def progress(text: str) -> None:
    """A progress line for the driver (which echoes it on stderr): rank 0 only."""
    print(f"[bench] {text}", flush=True)


def run_worker(spec: dict) -> list[dict] | None:
    """Time our layer for every row on this job's ranks; rank 0 returns the rows."""
    import cupysyncbn as sbn

    gpu = spec["gpu"]
    if gpu:
        import cupy as xp
    else:
        xp = np
    comm = sbn.init("auto" if gpu else ("mpi" if spec["k"] > 1 else "none"))
    sbn.install_abort_hook(comm)  # a failing rank ends the job, never a hang
    mpi = None
    if comm.size > 1:
        from mpi4py import MPI

        mpi = MPI.COMM_WORLD
    if gpu:
        dev = getattr(comm, "device_id", -1)
        if dev is None or dev < 0:
            dev = 0
        xp.cuda.Device(dev).use()
    timer = Timer(mpi, xp, gpu, spec["reps"], spec["warmup"])
    counting = CountingComm(comm)
    recorder = load_recorder(spec.get("recorder"))
    rows = []
    rng = np.random.default_rng(comm.rank)
    todo = [(tuple(s), f, d) for s in spec["shapes"] for f in spec["formats"]
            for d in spec["dtypes"]]
    k = comm.size
    for i, (shape, fmt, dt) in enumerate(todo):
        t0 = time.perf_counter()
        # the bound of this row, measured just before it
        copy_bw = copy_bandwidth(timer, xp, spec["copy_mib"])
        rows.append(measure_row(sbn, xp, gpu, timer, counting, rng, shape, fmt, dt,
                                recorder, spec.get("torch", False), spec["copy_mib"],
                                spec.get("torch_idle", 0.25), spec.get("reproducible", False)))
        rows[-1]["copy_bw"] = copy_bw
        if comm.rank == 0:
            r = rows[-1]
            vs = r.get("torch_fwdbwd_s")
            progress(f"{k} rank(s) row {i + 1}/{len(todo)}: {'x'.join(map(str, shape))} {fmt}"
                     f" {dt}: f+b {r['fwdbwd_s'] * 1e3:.3f} ms"
                     + (f", {r['fwdbwd_s'] / vs:.2f}x PyTorch" if vs else "")
                     + f" ({time.perf_counter() - t0:.1f}s)")
    if spec.get("fixed_cost") and not gpu:
        rows.append(fixed_cost(sbn, comm, mpi, spec["reps"]))
        if comm.rank == 0:
            progress(f"{k} rank(s) fixed cost: {rows[-1]['fixed_us']:.1f} us per f+b")
    return rows if comm.rank == 0 else None


# -------------------------------------------------------------------------- torch
def torch_cpu_fns(shape, fmt, dt, threads):
    """``(fwd, bwd, fwd+bwd, version)`` of CPU ``torch.nn.BatchNorm2d`` on the
    whole batch with ``threads`` threads; None without PyTorch."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    n, c, h, w = shape
    mf = torch.channels_last if fmt == "NHWC" else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    tdt = getattr(torch, dt)
    x = (torch.randn(n, c, h, w, generator=gen) + 1).to(tdt).contiguous(memory_format=mf)
    dy = torch.randn(n, c, h, w, generator=gen).to(tdt).contiguous(memory_format=mf)
    x.requires_grad_(True)
    bn = torch.nn.BatchNorm2d(c)
    try:
        y = bn(x)
    except RuntimeError:
        bn = bn.to(tdt)  # a torch build without mixed-dtype batch norm
        y = bn(x)

    def fb():
        bn(x).backward(dy)

    last = [y]

    def fwd():
        last[0] = bn(x)

    def bwd():  # the graph of the forward just before it, as in training
        last[0].backward(dy)

    return fwd, bwd, fb, torch.__version__


def torch_baselines(shape, fmt, dt, threads, gpu, timer_args) -> dict:
    """PyTorch times for the whole global batch (one process)."""
    try:
        import torch
    except ImportError:
        return {}
    reps, warmup = timer_args
    res = {}
    dev = "cuda" if gpu else "cpu"
    if not gpu:
        torch.set_num_threads(threads)
    tdt = getattr(torch, dt)
    n, c, h, w = shape
    mf = torch.channels_last if fmt == "NHWC" else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(n, c, h, w, generator=gen) + 1).to(dev, tdt).contiguous(memory_format=mf)
    dy = torch.randn(n, c, h, w, generator=gen).to(dev, tdt).contiguous(memory_format=mf)
    x.requires_grad_(True)

    def sync():
        if gpu:
            torch.cuda.synchronize()

    def measure(bn, key):
        bn = bn.to(dev)
        try:
            bn(x)
        except RuntimeError:
            bn = bn.to(tdt)  # a torch build without mixed-dtype batch norm
        rows = []
        for i in range(warmup + reps):  # forward and backward in the same repetitions
            sync()
            t0 = time.perf_counter()
            y = bn(x)
            sync()
            t1 = time.perf_counter()
            y.backward(dy)
            sync()
            t2 = time.perf_counter()
            if i >= warmup:
                rows.append([t1 - t0, t2 - t1, t2 - t0])
        res.update(summarize(rows, tuple(f"{key}_{p}_s" for p in ("fwd", "bwd", "fwdbwd"))))

    if gpu:
        measure(torch.nn.BatchNorm2d(c), "torch")  # cuDNN
        try:
            import torch.distributed as dist

            if not dist.is_initialized():
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
                dist.init_process_group("nccl", rank=0, world_size=1)
            measure(torch.nn.SyncBatchNorm(c), "torch_sync")
        except Exception as e:  # report, do not fail the benchmark
            res["torch_sync_error"] = f"{type(e).__name__}: {e}"
    else:
        measure(torch.nn.BatchNorm2d(c), "torch")
    res["torch_threads"] = threads if not gpu else None
    res["torch_version"] = torch.__version__
    return res


# ------------------------------------------------------------------------- driver
def worker_rank() -> int:
    """This worker's rank, from the process manager (before MPI is initialized)."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def worker_main(path: Path) -> int:
    """Run one worker; on error leave the message in ``path.err.RANK`` for the driver."""
    import traceback

    try:
        rows = run_worker(json.loads(path.read_text()))
    except BaseException as e:
        text = "".join(traceback.format_exception_only(type(e), e)).strip()
        if not isinstance(e, (SystemExit, KeyboardInterrupt)):
            text = "".join(traceback.format_exception(type(e), e, e.__traceback__)).strip()
        Path(f"{path}.err.{worker_rank()}").write_text(text + "\n")
        if isinstance(e, SystemExit):  # sys.exit does not trip the abort hook: make it
            raise RuntimeError(str(e)) from None
        raise
    if rows is not None:
        Path(str(path) + ".out").write_text(json.dumps(rows))
    return 0


def worker_errors(tmp: Path, k: int) -> str:
    """The ranks' error messages, each distinct one once, with the ranks that raised it."""
    by_text: dict[str, list[int]] = {}
    for f in sorted(tmp.glob("spec.json.err.*")):
        rank = int(f.name.rsplit(".", 1)[1])
        by_text.setdefault(f.read_text().strip(), []).append(rank)
    parts = []
    for text, ranks in by_text.items():
        who = "every rank" if len(ranks) == k and k > 1 else (
            "rank " if len(ranks) == 1 else "ranks ") + ",".join(map(str, sorted(ranks)))
        parts.append(f"[{who}] {text}")
    return "\n".join(parts)


def launch(spec: dict, k: int, timeout: float, cpu_backend: str = "auto") -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.json"
        path.write_text(json.dumps({**spec, "k": k}))
        env = dict(os.environ)
        for var in THREAD_VARS:
            env[var] = "1"  # one thread per rank: K ranks use K cores
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["CUPYSYNCBN_CPU_BACKEND"] = cpu_backend
        if k == 1 and not spec["gpu"]:
            cmd = [sys.executable, __file__, "--worker", str(path)]
        else:
            from cupysyncbn.runtime.env import find_mpiexec  # imported where used

            mpiexec = find_mpiexec()
            if mpiexec is None:
                raise SystemExit("mpiexec not found (pip install mpich)")
            cmd = [mpiexec, "-n", str(k), sys.executable, __file__, "--worker", str(path)]
        # stdout and stderr merged, read line by line: the ranks' progress
        # lines go to our stderr as they come, the rest is kept for errors
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        import threading

        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        raw = []
        try:
            for line in proc.stdout:
                if line.startswith("[bench] "):
                    sys.stderr.write(line)
                    sys.stderr.flush()
                else:
                    raw.append(line)
            rc = proc.wait()
        finally:
            killer.cancel()
        if rc != 0:
            errors = worker_errors(Path(tmp), k)
            # the ranks' own messages, once each; the raw output only if they left none
            sys.stderr.write((errors or "".join(raw)).rstrip() + "\n")
            raise SystemExit(f"benchmark worker on {k} rank(s) failed ({rc})")
        return json.loads((Path(tmp) / "spec.json.out").read_text())


def finish_row(r: dict) -> dict:
    tot = r["fwd_bytes"] + r["bwd_bytes"]
    r["fwd_bw"] = r["fwd_bytes"] / r["fwd_s"]
    r["bwd_bw"] = r["bwd_bytes"] / r["bwd_s"]
    r["fwdbwd_bw"] = tot / r["fwdbwd_s"]
    r["fwdbwd_vs_copy"] = r["fwdbwd_bw"] / r["copy_bw"]
    # time over the 8-pass bound (3 + 5 passes over x at copy bandwidth)
    r["fwdbwd_x_bound"] = r["fwdbwd_s"] / (tot / r["copy_bw"])
    for key in ("torch", "torch_sync"):
        if key + "_fwdbwd_s" in r:
            for p in ("fwd", "bwd", "fwdbwd"):
                r[f"{p}_vs_{key}"] = r[f"{p}_s"] / r[f"{key}_{p}_s"]
    return r


def _span(values: list[float]) -> str:
    """``a`` or ``a-b`` (GB/s, one decimal) for bandwidths in bytes/s."""
    lo, hi = min(values) / 1e9, max(values) / 1e9
    return f"{lo:.1f}" if f"{lo:.1f}" == f"{hi:.1f}" else f"{lo:.1f}-{hi:.1f}"


def _iqr(r: dict, key: str, scale: float = 1e3, fmt: str = ".2f") -> str:
    """``q1-q3`` of ``key`` (scaled), or n/a for rows without quartiles."""
    if key + "_q1" not in r:
        return "n/a"
    return f"{r[key + '_q1'] * scale:{fmt}}-{r[key + '_q3'] * scale:{fmt}}"


def fixed_table(fixed: list[dict]) -> list[str]:
    """The fixed-cost rows: microseconds per forward+backward of a tiny batch."""
    if not fixed:
        return []
    lines = ["", "| fixed cost | K | backend | us (median) | IQR us | clock |",
             "|---|---|---|---|---|---|"]
    for r in fixed:
        if r["kind"] == "gpu_host":
            if "error" in r:
                lines.append(f"| GPU host path, per pass | 1 | CuPy stand-in | n/a | n/a |"
                             f" {r['error']} |")
            else:
                lines.append(f"| GPU host path, per pass ({r['launches']:g} launches,"
                             f" {r['py_calls']:g} Python calls) | 1 | null CuPy stand-in |"
                             f" {r['host_us']:.1f} | {_iqr(r, 'host_us', 1.0, '.1f')} |"
                             f" {r['clock']} |")
            continue
        lines.append(f"| f+b of {'x'.join(map(str, r['shape']))} NCHW float32 per rank |"
                     f" {r['ranks']} |"
                     f" {r['backend']} | {r['fixed_us']:.1f} |"
                     f" {_iqr(r, 'fixed_us', 1.0, '.1f')} | {r['clock']} |")
    return lines


def markdown(rows: list[dict], meta: dict, fixed: list[dict] | None = None) -> str:
    gpu = meta["gpu"]
    show_backend = not gpu
    show_counts = any("launches_fwd" in r for r in rows)
    head = ["shape (global)", "fmt", "dtype", "K"] + (["backend"] if show_backend else [])
    head += ["fwd ms", "bwd ms", "f+b ms", "f+b IQR ms", "f+b GB/s", "vs copy", "x bound"]
    show_paired = any("paired_x_bound" in r for r in rows)
    head += ["torch f+b ms", "vs torch f/b/f+b"] + (["vs torch Sync f+b"] if gpu else [])
    head += ["paired x bound", "paired vs torch"] if show_paired else []
    head += ["coll/step", "bytes/step"] + (["launch/sync f;b"] if show_counts else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vt = ("/".join(f"{r[f'{p}_vs_torch']:.2f}" for p in ("fwd", "bwd", "fwdbwd"))
              if "fwdbwd_vs_torch" in r else "n/a")
        cells = [
            "x".join(map(str, r["shape"])), r["format"], r["dtype"], str(r["ranks"]),
        ] + ([r.get("backend", "?")] if show_backend else []) + [
            f"{r['fwd_s'] * 1e3:.3f}", f"{r['bwd_s'] * 1e3:.3f}", f"{r['fwdbwd_s'] * 1e3:.3f}",
            _iqr(r, "fwdbwd_s", 1e3, ".3f"),
            f"{r['fwdbwd_bw'] / 1e9:.1f}", f"{r['fwdbwd_vs_copy']:.2f}",
            f"{r['fwdbwd_x_bound']:.2f}",
            f"{r['torch_fwdbwd_s'] * 1e3:.3f}" if "torch_fwdbwd_s" in r else "n/a", vt,
        ]
        if gpu:
            vs = r.get("fwdbwd_vs_torch_sync")
            cells.append("n/a" if vs is None else f"{vs:.2f}")
        if show_paired:
            for key in ("paired_x_bound", "paired_fwdbwd_vs_torch"):
                cells.append(f"{r[key]:.2f}" if key in r else "n/a")
        cells += [str(r["collectives_per_step"]), str(r["comm_bytes_per_step"])]
        if show_counts:
            cells.append(f"{r['launches_fwd']}/{r['syncs_fwd']};{r['launches_bwd']}/{r['syncs_bwd']}"
                         if "launches_fwd" in r else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    copy: dict = {}
    for r in rows:
        copy.setdefault(r["ranks"], []).append(r["copy_bw"])
    notes = [
        "",
        f"{meta['device']}; {meta['date']}; numpy {meta['numpy']}"
        + (f", torch {meta['torch']}" if meta.get("torch") else ""),
        "copy bandwidth (K processes copying at once, read+write, measured before each row): "
        + ", ".join(f"K={k}: {_span(bws)} GB/s" for k, bws in sorted(copy.items())),
        "vs copy = effective f+b bandwidth / copy bandwidth; x bound = f+b time / 8-pass bound;"
        " vs torch = our time / PyTorch's (< 1: faster).",
        f"times: medians over {meta['reps']} repetitions after {meta['warmup']} warm-up passes;"
        " each repetition times one forward and the backward right after it (ours: the"
        " slowest rank's), f+b is their sum in that repetition; IQR = quartiles of f+b.",
    ]
    if show_paired:
        notes.append("CPU: PyTorch timed inside the job on rank 0 while the other ranks sleep,"
                     " right after each row. paired = median over rounds of one f+b of ours,"
                     " one copy on every rank at once and one f+b of PyTorch: our f+b over the"
                     " 8-pass bound of that round's copy, and over PyTorch's f+b.")
    uneven = {}
    for r in rows:
        if len(set(r.get("rank_batches", [0]))) > 1:
            key = f"{'x'.join(map(str, r['shape']))} on {r['ranks']}"
            uneven[key] = "/".join(map(str, r["rank_batches"]))
    if uneven:
        notes.append("uneven splits (samples per rank; times are the slowest rank's): "
                     + ", ".join(f"{k}: {v}" for k, v in uneven.items()))
    if show_counts:
        notes.append("launch/sync f;b = device launches / host synchronizations per forward;"
                     " per backward pass (from --recorder).")
    return "\n".join(lines + notes + fixed_table(fixed or [])) + "\n"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.worker is not None:
        return worker_main(a.worker)
    ranks = parse_ranks(a.ranks)
    shapes = parse_shapes(a.shapes)
    dtypes = parse_dtypes(a.dtypes)
    gpu = use_gpu(a.device)
    if gpu:
        import cupy

        ndev = cupy.cuda.runtime.getDeviceCount()
        ranks = [k for k in ranks if k <= ndev] or [1]
    spec = {
        "shapes": [list(s) for s in shapes],
        "formats": [f.strip().upper() for f in a.formats.split(",")],
        "dtypes": dtypes,
        "reps": a.reps, "warmup": a.warmup, "copy_mib": a.copy_mib, "gpu": gpu,
        "recorder": a.recorder, "reproducible": a.reproducible,
        # CPU: PyTorch timed inside the job (rank 0, others asleep), right after each row
        "torch": not a.no_torch and not gpu, "torch_idle": a.torch_idle,
        "fixed_cost": a.fixed_cost,
    }
    for f in spec["formats"]:
        if f not in ("NCHW", "NHWC"):
            raise SystemExit(f"--formats: NCHW or NHWC, got {f!r}")
    backends = ["auto"] if gpu else [b.strip().lower() for b in a.cpu_backend.split(",")]
    for b in backends:
        if b not in ("auto", "numpy", "numba"):
            raise SystemExit(f"--cpu-backend: auto, numpy or numba, got {b!r}")
    if a.reps < 1 or a.warmup < 0:
        raise SystemExit(f"--reps must be >= 1 and --warmup >= 0, got {a.reps}, {a.warmup}")
    rows = []
    for b in backends:
        for k in ranks:
            t0 = time.perf_counter()
            got = launch(spec, k, timeout=3600, cpu_backend=b)
            print(f"[bench] {b}, {k} rank(s): {len(got)} rows in"
                  f" {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
            rows += got
    fixed = [r for r in rows if r.get("kind") == "fixed_cost"]
    rows = [r for r in rows if r.get("kind") != "fixed_cost"]
    if a.gpu_host:
        try:
            host = gpu_host_cost(a.reps)
        except Exception as e:  # no g++ 12 for the stand-in's emulation: say so
            host = {"error": f"{type(e).__name__}: {e}"}
        print(f"[bench] GPU host path: {host.get('host_us', float('nan')):.1f} us per pass",
              file=sys.stderr, flush=True)
        fixed.append({"kind": "gpu_host", **host})
    if not a.no_torch:
        cache = {}
        for r in rows:
            if "torch_fwdbwd_s" in r:
                continue  # timed beside our row, inside the job
            key = (tuple(r["shape"]), r["format"], r["dtype"], 1 if gpu else r["ranks"])
            if key not in cache:
                cache[key] = torch_baselines(key[0], key[1], key[2], key[3], gpu,
                                             (a.reps, a.warmup))
            r.update(cache[key])
    rows = [finish_row(r) for r in rows]
    # the version of the PyTorch that was timed (none timed: none named)
    tv = next((r["torch_version"] for r in rows if r.get("torch_version")), None)
    if gpu:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"]
        device = "GPU " + (name.decode() if isinstance(name, bytes) else str(name))
    else:
        device = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    device = f"CPU {line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
                    break
        except OSError:
            pass
    meta = {
        "gpu": gpu, "device": device, "numpy": np.__version__, "torch": tv,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python scripts/bench.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "reps": a.reps, "warmup": a.warmup, "smoke": a.smoke, "cpu_backends": backends,
    }
    md = markdown(rows, meta, fixed)
    a.out.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "rows": rows, "fixed_cost": fixed}
    (a.out / "bench.json").write_text(json.dumps(data, indent=1) + "\n")
    (a.out / "bench.md").write_text(md)
    print(md)
    print(f"[bench] wrote {a.out / 'bench.json'} and {a.out / 'bench.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
