"""``init()`` and the lazy default communicator never hang (issue #23 item 5).

Every collective they run is timed by the collective watchdog: the backend
agreement's all-gather, the node-local-rank split, the NCCL bootstrap,
``MPICommunicator.split``; ``MPI_Init`` itself (run by the first import of
``mpi4py.MPI``, holding the GIL, where the watchdog's thread cannot run) by
``faulthandler``'s C-level timer. Under ``mpiexec`` with
``CUPYSYNCBN_TIMEOUT=3``, a rank that never joins ends the job with a message
naming what was waited for, well within the test's own timeout.
"""

import subprocess
import sys
import textwrap
import time
import types

import pytest
from support import ROOT
from support.mpi_runner import run_mpi

from cupysyncbn.comm import agreement, select
from cupysyncbn.comm.base import NoCommunicator
from cupysyncbn.runtime import env, placement
from cupysyncbn.runtime.watchdog import shared_watchdog

TIMEOUT = "3"


def _in_flight():
    """What the shared watchdog is timing now."""
    return [entry[2] for entry in shared_watchdog()._inflight.values()]


@pytest.fixture
def dog(monkeypatch):
    monkeypatch.setattr(shared_watchdog(), "timeout", 600.0)
    yield shared_watchdog()
    assert shared_watchdog().in_flight == 0  # every registration ended


class _FakeGroup:
    """An mpi4py-like group of two whose collectives record what is being timed."""

    def __init__(self):
        self.seen = []

    def Get_size(self):
        return 2

    def Get_rank(self):
        return 0

    def allgather(self, obj):
        self.seen.append(_in_flight())
        return [obj, obj]


def test_backend_agreement_is_timed(dog):
    group = _FakeGroup()
    infos = agreement.gather(group, "mpi")
    assert len(infos) == 2
    (whats,) = group.seen
    assert len(whats) == 1
    assert "backend agreement of cupysyncbn.init('mpi')" in whats[0]
    assert "allgather over the 2 ranks" in whats[0]

    agreement.gather(group, "auto", caller="the default communicator")
    assert "backend agreement of the default communicator" in group.seen[1][0]


def test_init_and_lazy_default_name_themselves(dog, monkeypatch):
    calls = []

    def fake_agreed(backend, group, caller):
        calls.append((backend, caller))
        return NoCommunicator()

    monkeypatch.setattr(select, "_agreed", fake_agreed)
    select._create("mpi", None, "cupysyncbn.init('mpi')")
    select.set_default_comm(None)
    monkeypatch.setattr(select, "launched_size", lambda: 2)  # as under mpiexec
    try:
        select.get_default_comm()
    finally:
        select.set_default_comm(None)
    assert calls[0] == ("mpi", "cupysyncbn.init('mpi')")
    assert calls[1][0] == "auto" and "default communicator" in calls[1][1]


def test_nccl_bootstrap_is_timed(dog, monkeypatch):
    seen = []

    class FakeNCCL(NoCommunicator):
        def __init__(self, group, _agreed_infos=None):
            seen.append(_in_flight())

    monkeypatch.setattr(select, "NCCLCommunicator", FakeNCCL)
    monkeypatch.setattr(select.agreement, "gather", lambda *a, **k: [{}, {}])
    monkeypatch.setattr(select.agreement, "decide", lambda backend, infos: ("nccl", ""))
    comm = select._agreed("nccl", _FakeGroup(), "cupysyncbn.init('nccl')")
    assert isinstance(comm, FakeNCCL)
    (whats,) = seen
    assert len(whats) == 1 and "NCCL bootstrap of cupysyncbn.init('nccl')" in whats[0]


def test_node_local_rank_split_is_timed(dog, monkeypatch):
    seen = []

    class Node:
        def Get_rank(self):
            return 1

        def Free(self):
            pass

    class World:
        def Get_size(self):
            return 2

        def Get_rank(self):
            return 0

        def Split_type(self, kind, key):
            seen.append(_in_flight())
            return Node()

    fake_mpi = types.SimpleNamespace(
        Is_initialized=lambda: True, Is_finalized=lambda: False, COMM_WORLD=World(),
        COMM_TYPE_SHARED=1,
    )
    for var in env.LOCAL_RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setitem(sys.modules, "mpi4py", types.SimpleNamespace(MPI=fake_mpi))
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", fake_mpi)
    placement._reset_for_tests()
    try:
        assert placement.node_local_rank() == 1
    finally:
        placement._reset_for_tests()
    (whats,) = seen
    assert len(whats) == 1 and "Split_type(COMM_TYPE_SHARED)" in whats[0]


def test_mpi_communicator_split_is_timed(dog):
    from mpi4py import MPI

    from cupysyncbn.comm.mpi import MPICommunicator

    seen = []

    class Comm:
        def Split(self, color, key):
            seen.append(_in_flight())
            return MPI.COMM_SELF

    comm = MPICommunicator(MPI.COMM_WORLD)
    comm.mpi_comm = Comm()
    sub = comm.split(0)
    assert sub.size == 1
    (whats,) = seen
    assert len(whats) == 1 and "MPICommunicator.split" in whats[0]


def test_deadline_holding_gil_ends_a_process_stuck_holding_the_gil(tmp_path):
    # sum(range(...)) runs in C without releasing the GIL: a Python watchdog
    # thread could not run, the C-level timer does.
    code = textwrap.dedent("""
        import time
        from cupysyncbn.runtime.watchdog import deadline_holding_gil
        with deadline_holding_gil(0.2):
            time.sleep(0.01)
        time.sleep(0.5)  # cancelled when the block ended: no exit here
        print("after the first block", flush=True)
        import io, sys
        sys.stderr = io.StringIO()  # redirected (no file descriptor): fd 2 still gets it
        with deadline_holding_gil(1):
            sum(range(10**13))
        print("UNREACHABLE", flush=True)
    """)
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=str(tmp_path),
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "after the first block" in res.stdout
    assert "UNREACHABLE" not in res.stdout
    assert "Timeout" in res.stderr and "<module>" in res.stderr
    assert time.monotonic() - t0 < 40


SCENARIOS = {
    # rank 0 asks for MPI, rank 1 for no communication at all
    "init-none": (
        """
        from mpi4py import MPI
        import cupysyncbn as sbn
        rank = MPI.COMM_WORLD.Get_rank()
        sbn.init("mpi" if rank == 0 else "none")
        print("DONE", rank, flush=True)
        """,
        "the backend agreement of cupysyncbn.init('mpi')",
    ),
    # rank 1 leaves before init() (MPI already initialized by the script)
    "exit-before-init": (
        """
        import sys
        from mpi4py import MPI
        import cupysyncbn as sbn
        rank = MPI.COMM_WORLD.Get_rank()
        if rank == 1:
            sys.exit(0)
        sbn.init("mpi")
        print("DONE", rank, flush=True)
        """,
        "the backend agreement of cupysyncbn.init('mpi')",
    ),
    # rank 1 leaves before MPI was ever initialized: rank 0 waits in MPI_Init
    "exit-before-mpi-init": (
        """
        import os, sys
        import cupysyncbn as sbn
        if os.environ["PMI_RANK"] == "1":
            sys.exit(0)
        sbn.init("mpi")
        print("DONE", 0, flush=True)
        """,
        "_mpi_init_waits_for_every_process_of_the_job",
    ),
    # the lazy default communicator, at a layer's first training pass
    "lazy-default": (
        """
        import sys
        import numpy as np
        from mpi4py import MPI
        import cupysyncbn as sbn
        rank = MPI.COMM_WORLD.Get_rank()
        bn = sbn.SyncBatchNorm(3)
        if rank == 1:
            sys.exit(0)
        bn(np.ones((4, 3), "float32"))
        print("DONE", rank, flush=True)
        """,
        "the backend agreement of the default communicator",
    ),
}


@pytest.mark.mpi
@pytest.mark.parametrize("case", sorted(SCENARIOS))
def test_a_rank_that_never_joins_init_ends_the_job(tmp_path, case):
    code, message = SCENARIOS[case]
    t0 = time.monotonic()
    res = run_mpi(code, 2, timeout=60, tmp_path=tmp_path, check=False,
                  env={"CUPYSYNCBN_TIMEOUT": TIMEOUT})
    elapsed = time.monotonic() - t0
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert message in res.stderr, out
    if case != "exit-before-mpi-init":  # faulthandler says "Timeout (0:00:03)!"
        assert f"has not completed after {TIMEOUT} s" in res.stderr, out
    else:
        assert "Timeout (0:00:03)" in res.stderr, out
    assert "DONE 0" not in res.stdout, out
    assert elapsed < 45, elapsed  # ~3 s timeout + start-up; never the 60 s hang limit
