"""``force_collectives``: a group of one runs the whole synchronized path.

``init(..., force_collectives=True)`` (or ``CUPYSYNCBN_FORCE_COLLECTIVES=1``)
makes one process do the handshake, the header and one all-reduce per pass
through its communicator, so one device exercises every line a multi-rank job
runs. The NumPy suite's multi-rank jobs also run this way on one rank
(``conftest.mpi_job`` with k = 1).
"""

import numpy as np
import pytest

import cupysyncbn as sbn
from cupysyncbn._sync import protocol
from cupysyncbn.comm.base import LOCAL


@pytest.fixture
def fresh_default(monkeypatch):
    monkeypatch.delenv("CUPYSYNCBN_FORCE_COLLECTIVES", raising=False)
    sbn.set_default_comm(None)
    yield
    sbn.set_default_comm(None)


def _count_calls(monkeypatch, comm):
    """Record the size of every all-reduce the real communicator object does."""
    calls = []
    inner = comm.allreduce_sum

    def counting(buf):
        calls.append(int(buf.size))
        return inner(buf)

    monkeypatch.setattr(comm, "allreduce_sum", counting)
    return calls


@pytest.mark.parametrize("dtype,tol", [("float32", 2e-6), ("float64", 1e-12)])
@pytest.mark.parametrize("fmt", ["NCHW", "NHWC", "NC"])
def test_one_allreduce_per_pass_and_same_results(fresh_default, monkeypatch, fmt, dtype, tol):
    comm = sbn.init("none", force_collectives=True)
    assert comm.force_collectives and comm.synchronizes and comm.size == 1
    calls = _count_calls(monkeypatch, comm)
    c = 4
    shape = {"NCHW": (5, c, 3, 2), "NHWC": (5, 3, 2, c), "NC": (5, c)}[fmt]
    layer = sbn.SyncBatchNorm(c, data_format=fmt, dtype=dtype)  # comm=None: the default
    ref = sbn.SyncBatchNorm(c, data_format=fmt, dtype=dtype, comm=LOCAL)
    assert layer.comm is comm
    rng = np.random.default_rng(1)
    for step in range(3):
        x = (rng.standard_normal(shape) * 2 + 3 + step).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        calls.clear()
        y = layer(x)
        n_fwd = len(calls)
        calls.clear()
        dx = layer.backward(dy)
        assert len(calls) == 1, calls  # backward: exactly one, every step
        if step == 0:  # handshake + the first pass (no shift known yet)
            assert 1 <= n_fwd <= 3
        else:  # steady state: exactly one all-reduce of header + 2C
            assert n_fwd == 1
        np.testing.assert_allclose(y, ref(x), atol=tol, rtol=0)
        np.testing.assert_allclose(dx, ref.backward(dy), atol=tol * 10, rtol=0)
    for k, v in ref.state_dict().items():
        np.testing.assert_allclose(layer.state_dict()[k], v, atol=tol, rtol=0)
    calls.clear()
    layer(x)
    assert calls == [protocol.HEADER + 2 * c]
    calls.clear()
    layer.eval()
    layer(x)
    assert calls == []  # eval: no communication, forced or not


def test_without_force_a_group_of_one_never_calls(fresh_default, monkeypatch):
    comm = sbn.init("none")
    assert not comm.force_collectives and not comm.synchronizes
    calls = _count_calls(monkeypatch, comm)
    layer = sbn.SyncBatchNorm(3)
    x = np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype(np.float32)
    layer(x)
    layer.backward(x)
    assert calls == []


def test_environment_variable(fresh_default, monkeypatch):
    monkeypatch.setenv("CUPYSYNCBN_FORCE_COLLECTIVES", "1")
    assert sbn.init().force_collectives  # 'auto' in one process
    assert sbn.init("none").force_collectives
    sbn.set_default_comm(None)
    assert sbn.get_default_comm().force_collectives  # the lazy default too
    assert not sbn.init("none", force_collectives=False).force_collectives  # argument wins
    monkeypatch.setenv("CUPYSYNCBN_FORCE_COLLECTIVES", "0")
    assert not sbn.init("none").force_collectives
    with pytest.raises(TypeError, match="force_collectives must be a bool"):
        sbn.init("none", force_collectives="yes")


def test_forced_errors_still_raise_and_leave_state(fresh_default):
    # The faulty-rank path of the protocol, on one rank: the specific error.
    sbn.init("none", force_collectives=True)
    layer = sbn.SyncBatchNorm(4)
    x = np.ones((2, 4, 2, 2), np.float32)
    layer(x)
    before = layer._mean.copy()
    with pytest.raises(ValueError, match="channels"):
        layer(np.ones((2, 3, 2, 2), np.float32))
    np.testing.assert_array_equal(before, layer._mean)
    layer(x)  # still in step afterwards
