"""Failure behaviour under real mpiexec jobs: no hang, every rank gets an error.

Each launch runs many fault injections in one job (cheap on a 2-core CI
machine). Inside the jobs every rank asserts its own outcome and prints
``OK <case> <rank>``; the abort hook is installed, so a failed assertion ends
the job (non-zero exit) instead of hanging it. ``run_mpi``'s timeout turns a
hang into a failure.
"""

from __future__ import annotations

import time

import pytest
from support.mpi_runner import run_mpi

pytestmark = pytest.mark.mpi

N = 3
BAD = 1

FAULTS = r"""
import os, re, sys
import numpy as np
from mpi4py import MPI
import cupysyncbn as sbn
from cupysyncbn.errors import CollectiveMismatchError, RemoteInputError
from support.rank_outcomes import expecter, say

sbn.install_abort_hook()
world = MPI.COMM_WORLD
rank, size = world.rank, world.size
BAD = 1
expect = expecter(rank, BAD)
comm = sbn.init("mpi")
rng = np.random.default_rng(rank)
C = 4


def x_good(n=3, c=C):
    return rng.standard_normal((n, c, 2, 3)).astype(np.float32)


def state_equal_everywhere(layer, case):
    mine = np.concatenate([np.asarray(layer._mean), np.asarray(layer._variance)])
    all_ = world.allgather(mine.tobytes())
    assert all(a == all_[0] for a in all_), case
    say(f"OK {case} {rank}")


remote = (RemoteInputError, "rank\\(s\\) passed")

# ---- 1. one rank's input invalid, at the first step (handshake + two-pass) and later
for when in ("first", "steady"):
    bn = sbn.SyncBatchNorm(C)
    if when == "steady":
        bn(x_good())
    before = (np.copy(bn._mean), np.copy(bn._variance))
    bad_inputs = {
        "channels": (x_good(c=C + 1), ValueError, "channels.*num_features"),
        "ndim": (np.zeros((3, C, 1, 1, 1, 1), np.float32), ValueError, "dimensions.*data_format"),
        "dtype": (np.zeros((3, C, 2, 2), np.int64), TypeError, "x must have a floating dtype"),
        "list": ([[1.0, 2.0]], TypeError, "x must be"),
        "none": (None, TypeError, "x must be"),
    }
    for name, (xb, etype, pattern) in bad_inputs.items():
        x = xb if rank == BAD else x_good()
        expect(f"{when}-{name}", lambda: bn(x), bad=(etype, pattern), other=remote)
        # nothing was updated, on any rank
        assert np.array_equal(bn._mean, before[0]) and np.array_equal(bn._variance, before[1])
    # the layer is still usable and in step afterwards
    expect(f"{when}-recovers", lambda: bn(x_good()))
    state_equal_everywhere(bn, f"{when}-state-equal")

# ---- 2. backward with a bad dy on one rank
bn = sbn.SyncBatchNorm(C)
y = bn(x_good())
dy = np.ones((2, C, 2, 3), np.float32) if rank == BAD else np.ones_like(y)
expect("dy-shape", lambda: bn.backward(dy), bad=(ValueError, "dy must have"), other=remote)
dy = [1.0] if rank == BAD else np.ones_like(y)
expect("dy-not-array", lambda: bn.backward(dy), bad=(TypeError, "dy must be"),
       other=(RemoteInputError, "not an array"))
expect("dy-recovers", lambda: bn.backward(np.ones_like(y)))

# ---- 3. forward on some ranks, backward on another (same layer, same buffer size)
bn = sbn.SyncBatchNorm(C)
y = bn(x_good())  # steady state from now on: one all-reduce per pass
op = (lambda: bn.backward(np.ones_like(y))) if rank == BAD else (lambda: bn(x_good()))
expect("fwd-vs-bwd", op, everyone=(CollectiveMismatchError, "backward on 1"))
# ... and where the forward runs its two-pass path (mean pass first): a NaN
# batch must leave a finite shift; then the shift is dropped on every rank so
# the next forward starts with a mean pass
bn = sbn.SyncBatchNorm(C)
xn = x_good(n=0 if rank == 2 else 3)
xn[:, 0] = np.nan
y = bn(xn)
assert np.isfinite(bn._sync_state.shift).all()
bn._sync_state.shift = None
op = (lambda: bn.backward(np.ones_like(y))) if rank == BAD else (lambda: bn(x_good()))
expect("fwd-mean-pass-vs-bwd", op, everyone=(CollectiveMismatchError, "backward on 1"))

# (a layer's first pass -- the header-only handshake -- against another pass
# of another layer is a size mismatch that MPI itself reports: test_first_pass_...)

# ---- 4. ranks disagree on num_features (detected by the handshake)
bn = sbn.SyncBatchNorm(C + 1 if rank == BAD else C)
xb = x_good(c=C + 1) if rank == BAD else x_good()
expect("num-features", lambda: bn(xb), everyone=(CollectiveMismatchError, "num_features"))

# ---- 5. ranks call different layers (same num_features) / different call counts
a, b = sbn.SyncBatchNorm(C), sbn.SyncBatchNorm(C)
a(x_good()), b(x_good())
op = (lambda: b(x_good())) if rank == BAD else (lambda: a(x_good()))
expect("other-layer", op, everyone=(CollectiveMismatchError, "different layers"))
# layer a ran one pass more on the other ranks: its counters now disagree
expect("call-count", lambda: a(x_good()),
       everyone=(CollectiveMismatchError, "different number of times"))

# ---- 6. differences that need not matter work: input dtype per rank
bn = sbn.SyncBatchNorm(C)
xd = x_good().astype(np.float64 if rank == BAD else np.float16)
expect("mixed-dtype", lambda: bn(xd))
state_equal_everywhere(bn, "mixed-dtype-state")

# ---- 7. a rank with an empty batch and one with NaN still agree
bn = sbn.SyncBatchNorm(C)
xn = x_good()
if rank == BAD:
    xn[:, 0] = np.nan
expect("nan-one-rank", lambda: bn(xn))
assert np.isnan(bn._mean[0]) and np.isfinite(bn._mean[1:]).all()
expect("after-nan-clean", lambda: bn(x_good(n=0 if rank == 0 else 3)))
out = bn(x_good())
assert np.isfinite(out).all()  # the NaN batch did not poison the shift
state_equal_everywhere(bn, "nan-state")
say(f"DONE {rank}")
"""


def _assert_all_ok(res, cases_per_rank_min: int):
    for r in range(N):
        assert f"DONE {r}" in res.stdout, res.stdout + res.stderr
        assert res.stdout.count(f" {r}\n") >= cases_per_rank_min


def test_bad_input_on_one_rank_never_hangs(tmp_path):
    t0 = time.monotonic()
    res = run_mpi(FAULTS, N, timeout=90, tmp_path=tmp_path)
    _assert_all_ok(res, 20)
    for case in ("first-channels", "steady-channels", "steady-dtype", "first-list",
                 "dy-shape", "fwd-vs-bwd", "num-features", "other-layer", "call-count"):
        for r in range(N):
            assert f"OK {case} {r}" in res.stdout
    assert time.monotonic() - t0 < 90


FIRST_PASS_MISMATCH = r"""
import numpy as np
import cupysyncbn as sbn

sbn.install_abort_hook()
comm = sbn.init("mpi")
a, b = sbn.SyncBatchNorm(4, data_format="NCL"), sbn.SyncBatchNorm(4, data_format="NCL")
x = np.ones((2, 4, 3), np.float32)
a(x)
# rank 1 runs a's second pass while the others run b's first (its handshake)
try:
    a(x) if comm.rank == 1 else b(x)
except Exception as e:
    print("RAISED", comm.rank, type(e).__name__, e, flush=True)
    raise
"""


def test_first_pass_against_other_pass_never_hangs(tmp_path):
    # Buffers of different sizes: depending on the MPI algorithm the header
    # mismatch raises on every rank, or MPI reports "Message truncated" and the
    # abort hook (or MPI's own fatal handler) ends the job. Never a hang.
    res = run_mpi(FIRST_PASS_MISMATCH, N, timeout=60, tmp_path=tmp_path, check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "out of step" in out or "truncated" in out, out


USER_ERROR = r"""
import sys, threading, time
import numpy as np
import cupysyncbn as sbn

if "hook" in sys.argv:
    sbn.install_abort_hook()
comm = sbn.init("mpi")
bn = sbn.SyncBatchNorm(3)
rng = np.random.default_rng(comm.rank)
for step in range(1000):
    if comm.rank == 1 and step == 5:
        if "thread" in sys.argv:
            def work():
                raise RuntimeError("injected failure in a worker thread")
            threading.Thread(target=work).start()
            time.sleep(60)  # main thread would carry on; the hook aborts first
        elif "exit" in sys.argv:
            sys.exit(0)  # leaves the loop early, no exception
        elif "eval" in sys.argv:
            bn.eval()  # this rank stops communicating; the others wait
        else:
            raise RuntimeError("injected failure in user code")
    y = bn(rng.standard_normal((4, 3, 2, 2)).astype("float32"))
    bn.backward(np.ones_like(y))
print("UNREACHABLE", comm.rank, flush=True)
"""


@pytest.mark.parametrize("where", ["main", "thread"])
def test_exception_on_one_rank_aborts_job(tmp_path, where):
    t0 = time.monotonic()
    res = run_mpi(USER_ERROR, N, timeout=60, tmp_path=tmp_path, check=False,
                  args=("hook", where), env={"CUPYSYNCBN_TIMEOUT": "0"})
    elapsed = time.monotonic() - t0
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "injected failure" in out  # the traceback is printed
    assert "aborting the MPI job" in out
    assert "UNREACHABLE" not in out
    assert elapsed < 30, elapsed  # in practice ~2 s (startup included)


@pytest.mark.parametrize("how", ["exit", "eval"])
def test_rank_leaving_early_ends_by_timeout(tmp_path, how):
    # No exception anywhere: rank 1 leaves the loop (e.g. fewer batches) or
    # switches to eval mode (no collectives); the others wait in the all-reduce
    # until CUPYSYNCBN_TIMEOUT aborts the job.
    t0 = time.monotonic()
    res = run_mpi(USER_ERROR, N, timeout=60, tmp_path=tmp_path, check=False,
                  args=(how,), env={"CUPYSYNCBN_TIMEOUT": "2"})
    elapsed = time.monotonic() - t0
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "has not completed after 2 s" in out
    assert elapsed < 30, elapsed


def test_exception_without_hook_ends_by_timeout(tmp_path):
    # Without the hook the failing rank exits with status 1. Either MPICH's
    # mpiexec notices that exit and kills the job, or the other ranks' 2 s
    # collective timeout aborts it first: which one wins is a race, but the job
    # must end, non-zero, within seconds -- never hang.
    t0 = time.monotonic()
    res = run_mpi(USER_ERROR, N, timeout=60, tmp_path=tmp_path, check=False,
                  args=("main",), env={"CUPYSYNCBN_TIMEOUT": "2"})
    elapsed = time.monotonic() - t0
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "injected failure" in out
    assert "UNREACHABLE" not in out
    assert elapsed < 30, elapsed


KILLED = r"""
import os, signal
import numpy as np
import cupysyncbn as sbn

comm = sbn.init("mpi")
bn = sbn.SyncBatchNorm(3)
rng = np.random.default_rng(comm.rank)
for step in range(100000):
    if comm.rank == 1 and step == 20:
        os.kill(os.getpid(), signal.SIGKILL)
    y = bn(rng.standard_normal((4, 3, 2, 2)).astype("float32"))
    bn.backward(np.ones_like(y))
print("UNREACHABLE", comm.rank, flush=True)
"""


def test_sigkill_one_rank_ends_job(tmp_path):
    # No hook, timeout disabled: Hydra itself tears the job down.
    t0 = time.monotonic()
    res = run_mpi(KILLED, N, timeout=60, tmp_path=tmp_path, check=False,
                  env={"CUPYSYNCBN_TIMEOUT": "0"})
    elapsed = time.monotonic() - t0
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "UNREACHABLE" not in out
    assert "signal 9" in out or "Killed" in out or "KILLED" in out, out
    assert elapsed < 30, elapsed  # measured ~1-2 s; the contract is 60 s


def test_abort_hook_is_noop_in_one_process():
    import subprocess
    import sys

    code = (
        "import cupysyncbn as sbn; sbn.install_abort_hook();"
        "raise ValueError('plain single-process error')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1
    assert "plain single-process error" in res.stderr
    assert "aborting" not in res.stderr


def test_timeout_env_validation(monkeypatch):
    from cupysyncbn.runtime import env

    monkeypatch.setenv(env.TIMEOUT_ENV, "abc")
    with pytest.raises(ValueError, match="CUPYSYNCBN_TIMEOUT"):
        env.collective_timeout()
    monkeypatch.setenv(env.TIMEOUT_ENV, "-1")
    with pytest.raises(ValueError, match=">= 0"):
        env.collective_timeout()
    monkeypatch.setenv(env.TIMEOUT_ENV, "12.5")
    assert env.collective_timeout() == 12.5
    monkeypatch.delenv(env.TIMEOUT_ENV)
    assert env.collective_timeout() == env.DEFAULT_TIMEOUT


def test_install_uninstall_restores_hooks():
    import sys
    import threading

    import cupysyncbn as sbn

    before = (sys.excepthook, threading.excepthook)
    sbn.install_abort_hook()
    sbn.install_abort_hook()  # idempotent: replaces, does not chain twice
    assert sys.excepthook is not before[0] and threading.excepthook is not before[1]
    sbn.uninstall_abort_hook()
    assert (sys.excepthook, threading.excepthook) == before
