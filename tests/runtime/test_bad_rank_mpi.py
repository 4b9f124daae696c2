"""One bad rank never leaves the others waiting: issue 14's probes, each as a test.

The multi-rank probes run under real ``mpiexec`` with the abort hook, every
rank asserting its own outcome and printing ``OK <case> <rank>``. The jobs'
timeouts (``run_mpi``) are far below the collective watchdog's 600 s default,
so "every rank raises" never leans on the watchdog; where the watchdog itself
is under test, ``CUPYSYNCBN_TIMEOUT`` is a few seconds.
"""

from __future__ import annotations

import time

import pytest
from support.mpi_runner import run_mpi

pytestmark = pytest.mark.mpi

N = 3
HEAD = r"""
import os, re, sys
import numpy as np
from mpi4py import MPI
import cupysyncbn as sbn
from cupysyncbn import functional as F
from cupysyncbn.errors import CollectiveMismatchError, RemoteInputError
from support.rank_outcomes import expecter, say

sbn.install_abort_hook()
world = MPI.COMM_WORLD
rank, size = world.rank, world.size
BAD = 1
expect = expecter(rank, BAD)
rng = np.random.default_rng(rank)
C = 3


def remote(words):
    return (RemoteInputError, words)
"""

PROBES = HEAD + r"""
comm = sbn.init("mpi")
x_ok = lambda n=4: rng.standard_normal((n, C)).astype(np.float32)

# ---- functional API without parameters: x a list / 1-D / 0-d on one rank
for name, xb, etype, pat, rpat in [
    ("list", [[1.0, 2.0, 3.0]], TypeError, "x must be", "not an array"),
    ("1d", np.ones(C, np.float32), ValueError, "dimensions", "number of dimensions"),
    ("0d", np.ones((), np.float32), ValueError, "dimensions",
     "number of dimensions"),
]:
    x = xb if rank == BAD else x_ok()
    expect(f"fn-noparams-{name}", lambda: F.batch_norm_forward(x, data_format="NC", comm=comm),
           bad=(etype, pat), other=remote(rpat))
    # ... and with a SyncState that already did its first pass (steady state)
    st = F.SyncState()
    F.batch_norm_forward(x_ok(), data_format="NC", comm=comm, sync_state=st)
    expect(f"fn-state-{name}",
           lambda: F.batch_norm_forward(x, data_format="NC", comm=comm, sync_state=st),
           bad=(etype, pat), other=remote(rpat))
    expect(f"fn-state-{name}-recovers",
           lambda: F.batch_norm_forward(x_ok(), data_format="NC", comm=comm, sync_state=st))

# ---- invalid arguments on one rank: weight shape, momentum, epsilon, data_format
w, b = np.ones(C, np.float32), np.zeros(C, np.float32)
rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
good = dict(momentum=0.9, epsilon=1e-5, data_format="NC")
for name, kw, etype, pat in [
    ("weight-shape", dict(weight=np.ones(C + 1, np.float32)), ValueError, "must have shape"),
    ("weight-2d", dict(weight=np.ones((C, 1), np.float32)), ValueError, "weight must have"),
    ("weight-list", dict(weight=[1.0] * C), TypeError, "weight must be"),
    ("momentum", dict(momentum=2.0), ValueError, "momentum"),
    ("epsilon", dict(epsilon=-1.0), ValueError, "epsilon"),
    ("data-format", dict(data_format="XYZ"), ValueError, "data_format"),
    ("no-running-var", dict(running_var=None), ValueError, "together"),
]:
    args = dict(weight=w, bias=b, running_mean=rm, running_var=rv, **good)
    if rank == BAD:
        args.update(kw)
    expect(f"fn-arg-{name}", lambda: F.batch_norm_forward(x_ok(), comm=comm, **args),
           bad=(etype, pat), other=remote("invalid argument"))

# ---- layers synchronized in different orders from the very first pass
A, B = sbn.SyncBatchNorm(C, data_format="NC"), sbn.SyncBatchNorm(C, data_format="NC")
xa = np.full((4, C), 5.0 if rank == 0 else 0.0, np.float32)  # A's true mean: 5/size
order = (A, B) if rank == 0 else (B, A)
expect("swap-first-pass", lambda: [layer(xa) for layer in order],
       everyone=(CollectiveMismatchError, "different layers"))
assert np.array_equal(A._mean, np.zeros(C)) and np.array_equal(B._mean, np.zeros(C))
# same layers, same order: fine (and A's mean is the global one)
A, B = sbn.SyncBatchNorm(C, data_format="NC"), sbn.SyncBatchNorm(C, data_format="NC")
expect("same-order", lambda: [A(xa), B(xa)])
np.testing.assert_allclose(A._mean, 0.1 * 5.0 / size, rtol=1e-6)

# ---- one rank in eval mode for one step while the others train
L = sbn.SyncBatchNorm(C, data_format="NC")
for _ in range(2):
    L(x_ok())
    L.backward(np.ones((4, C), np.float32))

def step_with_eval_on_bad():
    if rank == BAD:
        L.eval()
        L(x_ok())
        L.train()
        L(x_ok())  # the next synchronized pass
    else:
        L(x_ok())
        L.backward(np.ones((4, C), np.float32))

expect("eval-one-rank", step_with_eval_on_bad,
       everyone=(CollectiveMismatchError, "eval-mode forwards"))
# all ranks evaluating together is fine
L = sbn.SyncBatchNorm(C, data_format="NC")
L(x_ok()); L.eval(); L(x_ok()); L.train()
expect("eval-all-ranks", lambda: L(x_ok()))
# only rank 0 evaluates, on purpose, inside local_eval(): training goes on
# exactly (the next pass's statistics are those of the global batch)
L = sbn.SyncBatchNorm(C, data_format="NC", dtype="float64")
xa = rng.standard_normal((2 + rank, C))
L(xa); L.backward(np.ones_like(xa))
if rank == 0:
    with sbn.local_eval():
        L.eval(); L(xa); L(xa); L.train()
xb = rng.standard_normal((1 + rank, C))
expect("eval-rank0-local", lambda: L(xb))
glob = np.concatenate(world.allgather(xb))
np.testing.assert_allclose(L._sync_state.shift, glob.mean(0), rtol=1e-12, atol=1e-12)

# ---- a valid program: sub-communicator layer, Free(), then a Dup() of the world
sub = world.Split(0 if rank < 2 else MPI.UNDEFINED, rank)
if sub != MPI.COMM_NULL:
    S = sbn.SyncBatchNorm(C, data_format="NC", comm=sub)
    S(x_ok()); S.backward(np.ones((4, C), np.float32))
    sub.Free()
dup = world.Dup()
D = sbn.SyncBatchNorm(C, data_format="NC", comm=dup)
xs = [rng.standard_normal((2 + rank, C)).astype(np.float32) for _ in range(2)]
expect("free-then-dup", lambda: [D(x) for x in xs])
glob = np.concatenate(world.allgather(xs[1])).astype(np.float64)
np.testing.assert_allclose(D._sync_state.shift, glob.mean(0), rtol=1e-5, atol=1e-6)
dup.Free()

# ---- collective save where only rank 0 knows the path
folder = world.bcast(os.environ.get("CASE_DIR") if rank == 0 else None)
path = os.path.join(folder, "ck.npz") if rank == 0 else None
sd = {"w": np.arange(3.0) + (0 if rank == 0 else 100)}
expect("save-path-rank0-only", lambda: sbn.save(sd, path, comm=comm))
assert np.array_equal(sbn.load(os.path.join(folder, "ck.npz"))["w"], np.arange(3.0))
bad_path = 12345 if rank == 0 else None
expect("save-bad-path-rank0", lambda: sbn.save(sd, bad_path, comm=comm), bad_rank=0,
       bad=(TypeError, "path must be"), other=remote("invalid state_dict or path"))

# ---- backward with no pending forward on one rank (its state was reloaded)
L2 = sbn.SyncBatchNorm(C, data_format="NC")
L2(x_ok())
if rank == BAD:
    L2.set_state_dict(L2.state_dict())  # forgets the pending forward
expect("backward-without-forward", lambda: L2.backward(np.ones((4, C), np.float32)),
       bad=(ValueError, "before forward"), other=remote("invalid input"))

# ---- PyTorch adapter: a 1-D, a 6-D tensor or a NumPy array on one rank
import torch
from cupysyncbn.interop import torch as sbt

T = sbt.SyncBatchNorm(C, comm=comm)
T(torch.randn(4, C))  # first pass done: the next ones are steady-state passes
for name, xb, etype, pat in [
    ("1d", torch.randn(C), ValueError, "2D to 5D"),
    ("6d", torch.randn(2, C, 1, 1, 1, 1), ValueError, "2D to 5D"),
    ("numpy", np.ones((4, C), np.float32), TypeError, "torch.Tensor"),
]:
    x = xb if rank == BAD else torch.randn(4, C)
    expect(f"torch-{name}", lambda: T(x), bad=(etype, pat), other=remote("rank\\(s\\) passed"))
T2 = sbt.SyncBatchNorm(C, comm=comm)  # and at a layer's very first pass
x = torch.randn(C) if rank == BAD else torch.randn(4, C)
expect("torch-first-1d", lambda: T2(x), bad=(ValueError, "2D to 5D"),
       other=remote("number of dimensions"))
expect("torch-recovers", lambda: T2(torch.randn(4, C)))
TA, TB = sbt.SyncBatchNorm(C, comm=world), sbt.SyncBatchNorm(C, comm=world)
order = (TA, TB) if rank == 0 else (TB, TA)
expect("torch-swap-first-pass", lambda: [m(torch.randn(4, C)) for m in order],
       everyone=(CollectiveMismatchError, "different layers"))
say(f"DONE {rank}")
"""


def test_one_bad_rank_never_leaves_the_others_waiting(tmp_path):
    """Every probe of the issue's "hangs" and "silent wrong results" lists, 3 ranks."""
    t0 = time.monotonic()
    res = run_mpi(PROBES, N, timeout=120, tmp_path=tmp_path, env={"CASE_DIR": str(tmp_path)})
    for r in range(N):
        assert f"DONE {r}" in res.stdout, res.stdout + res.stderr
    cases = {line.split()[1] for line in res.stdout.splitlines() if line.startswith("OK ")}
    for must in ("fn-noparams-list", "fn-noparams-1d", "fn-noparams-0d", "fn-state-list",
                 "fn-arg-weight-shape", "fn-arg-momentum", "fn-arg-epsilon",
                 "fn-arg-data-format", "swap-first-pass", "eval-one-rank", "eval-rank0-local",
                 "free-then-dup",
                 "save-path-rank0-only", "save-bad-path-rank0", "backward-without-forward",
                 "torch-1d", "torch-6d", "torch-numpy", "torch-first-1d", "torch-swap-first-pass"):
        assert must in cases, must
    # no probe waited for a timeout: the whole job is quick
    assert time.monotonic() - t0 < 100


WATCHDOG_THREADS = HEAD + r"""
# Two layers on two communicators driven from two threads on rank 0; rank 1
# serves A (late, so A is still in flight when B starts) and never calls B.
import threading, time
ca, cb = world.Dup(), world.Dup()
A = sbn.SyncBatchNorm(C, data_format="NC", comm=ca)
B = sbn.SyncBatchNorm(C, data_format="NC", comm=cb)
x = np.ones((4, C), np.float32)
if rank == 0:
    t = threading.Thread(target=lambda: A(x))
    t.start()
    time.sleep(0.5)
    B(x)  # never served: the watchdog must abort the job
    say("UNREACHABLE")
else:
    time.sleep(1.5)
    A(x)
    say("SERVED A")
    time.sleep(60)
"""


def test_watchdog_times_every_collective_in_flight(tmp_path):
    t0 = time.monotonic()
    res = run_mpi(WATCHDOG_THREADS, 2, timeout=60, tmp_path=tmp_path, check=False,
                  env={"CUPYSYNCBN_TIMEOUT": "2.5"})
    elapsed = time.monotonic() - t0
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "UNREACHABLE" not in out
    assert "SERVED A" in out, out
    assert "has not completed after 2.5 s" in out, out
    assert elapsed < 45, elapsed


CONFORMANCE_RAISE = r"""
import sys
import cupysyncbn.conformance.__main__ as cli
cli.RAISE_GRACE_S = 2.0
sys.exit(cli.main(sys.argv[1:]))
"""

IMPL = '''
def impl(case, rank, size):
    from cupysyncbn.conformance.impls import cupysyncbn_layer
    if rank == 1:
        raise RuntimeError("impl broken on rank 1")
    return cupysyncbn_layer(case, rank, size)
'''


def test_conformance_impl_raising_on_one_rank_ends_the_job(tmp_path):
    # First an implementation raising on every rank: reported in the table as
    # usual (the ranks agree); then one raising on rank 1 only, while rank 0
    # waits inside its collectives: the job ends within seconds.
    (tmp_path / "allimpl.py").write_text(
        "def impl(case, rank, size):\n    raise RuntimeError('broken everywhere')\n"
    )
    (tmp_path / "oneimpl.py").write_text(IMPL)
    t0 = time.monotonic()
    res = run_mpi(CONFORMANCE_RAISE, 2, timeout=60, tmp_path=tmp_path, check=False,
                  args=("--impl", f"{tmp_path / 'allimpl.py'}:impl",
                        "--impl", f"{tmp_path / 'oneimpl.py'}:impl",
                        "--case", "paddle_NC_float64"))
    out = res.stdout + res.stderr
    assert "broken everywhere" in res.stdout, out  # the first table was printed
    assert res.returncode != 0, out
    assert "impl broken on rank 1" in out and "aborting the job" in out, out
    assert time.monotonic() - t0 < 45


PADDLE_PROBES = HEAD + r"""
import paddle
from cupysyncbn.interop.paddle import SyncBatchNorm as PSBN

P = PSBN(C, data_format="NC", comm=world)
P(paddle.randn([4, C]))  # first pass done: the next ones are steady-state passes
for name, xb, etype, pat in [
    ("1d", paddle.randn([C]), ValueError, "2D to 5D"),
    ("6d", paddle.randn([2, C, 1, 1, 1, 1]), ValueError, "2D to 5D"),
    ("numpy", np.ones((4, C), np.float32), TypeError, "paddle.Tensor"),
]:
    x = xb if rank == BAD else paddle.randn([4, C])
    expect(f"paddle-{name}", lambda: P(x), bad=(etype, pat), other=remote("rank\\(s\\) passed"))
expect("paddle-recovers", lambda: P(paddle.randn([4, C])))
PA, PB = PSBN(C, data_format="NC", comm=world), PSBN(C, data_format="NC", comm=world)
order = (PA, PB) if rank == 0 else (PB, PA)
expect("paddle-swap-first-pass", lambda: [m(paddle.randn([4, C])) for m in order],
       everyone=(CollectiveMismatchError, "different layers"))
say(f"DONE {rank}")
"""


def test_paddle_adapter_bad_input_on_one_rank(tmp_path):
    pytest.importorskip("paddle")
    res = run_mpi(PADDLE_PROBES, 2, timeout=120, tmp_path=tmp_path)
    for r in range(2):
        assert f"DONE {r}" in res.stdout, res.stdout + res.stderr
    for case in ("paddle-1d", "paddle-6d", "paddle-numpy", "paddle-swap-first-pass"):
        assert f"OK {case} 0" in res.stdout and f"OK {case} 1" in res.stdout, case
