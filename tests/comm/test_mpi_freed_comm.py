"""A layer whose MPI sub-communicator was freed raises ``CommunicatorError`` (issue #23 item 10a).

Not MPI's raw error stack, on every rank that uses it: checked before the
collective (``comm == MPI.COMM_NULL`` after ``Free()``), and MPI's
"invalid communicator" mapped to the same error when the communicator was
freed through another Python object of the same handle.
"""

import pytest
from support.mpi_runner import run_mpi

pytestmark = pytest.mark.mpi

SCRIPT = r"""
import numpy as np
from mpi4py import MPI
import cupysyncbn as sbn
from cupysyncbn.comm.mpi import MPICommunicator
from cupysyncbn.errors import CommunicatorError
from support.rank_outcomes import expecter

world = MPI.COMM_WORLD
rank = world.Get_rank()
expect = expecter(rank, bad_rank=-1)
FREED = (CommunicatorError, r"MPI communicator .*\(rank \d of 2\) has been freed")
x = np.random.default_rng(rank).standard_normal((4, 3, 2, 2)).astype("float32")

# a used layer: a training pass, then one forward pending, then Free()
sub = world.Split(0, rank)
bn = sbn.SyncBatchNorm(3, comm=sub)
y = bn(x); bn.backward(np.ones_like(y))
bn(x)
sub.Free()
expect("forward-after-free", lambda: bn(x), everyone=FREED)
expect("backward-after-free", lambda: bn.backward(np.ones_like(x)), everyone=FREED)
expect("new-layer-on-freed", lambda: sbn.SyncBatchNorm(3, comm=sub), everyone=(
    CommunicatorError, r"COMM_NULL \(a freed communicator"))
expect("wrap-freed", lambda: MPICommunicator(sub), everyone=(CommunicatorError, "COMM_NULL"))

# a layer that never ran before its communicator was freed (its first pass is the handshake)
sub = world.Split(0, rank)
sub.Set_name("my-group")
fresh = sbn.SyncBatchNorm(3, comm=sub)
sub.Free()
expect("first-pass-after-free", lambda: fresh(x), everyone=(
    CommunicatorError, r"MPI communicator 'my-group' \(rank \d of 2\) has been freed"))

# freed through another Python object of the same handle: this one keeps a stale handle
sub = world.Split(0, rank)
stale = sbn.SyncBatchNorm(3, comm=sub)
stale(x)
MPI.Intracomm(sub).Free()
assert sub != MPI.COMM_NULL
expect("stale-handle", lambda: stale(x), everyone=FREED)

# the world still works afterwards, and the job ends cleanly
ok = sbn.SyncBatchNorm(3, comm=world)
expect("world-still-works", lambda: ok(x))
"""


def test_freed_sub_communicator_raises_on_every_rank(tmp_path):
    res = run_mpi(SCRIPT, 2, timeout=60, tmp_path=tmp_path, env={"CUPYSYNCBN_TIMEOUT": "10"})
    for case in ("forward-after-free", "backward-after-free", "new-layer-on-freed",
                 "wrap-freed", "first-pass-after-free", "stale-handle", "world-still-works"):
        for r in range(2):
            assert f"OK {case} {r}" in res.stdout, (case, r, res.stdout, res.stderr)
    assert "error stack" not in res.stdout + res.stderr
