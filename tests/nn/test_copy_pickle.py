"""Deep copies and pickles of layers (issue #23 items 3 and 8).

A deep copy is a new layer: its own construction ordinal (so ranks that run
A, B against B, A raise instead of pairing them), a fresh ``SyncState``, the
same communicator object, copies of parameters and buffers, no pending
forwards. Pickling stores no communicator, ``SyncState`` or pending forward
context; the loaded layer synchronizes over the default communicator (local
``BatchNorm*D`` stay local). Both work on a layer that was used, with
forwards pending, under a real ``MPICommunicator``, and the copies train
exactly like the original.
"""

import copy
import pickle

import numpy as np
import pytest
from support.mpi_runner import run_mpi

import cupysyncbn as sbn
from cupysyncbn.comm.base import LOCAL, NoCommunicator


def _forced_comm():
    """A group of one that runs the whole synchronized path (handshake, SyncState buffers)."""
    comm = NoCommunicator()
    comm.force_collectives = True
    return comm


def _data(seed, n=6):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, 2, 2)) * np.array([1.0, 10.0, 0.1])[:, None, None] + 3.0
    return x, rng.standard_normal(x.shape)


def _step_all(layers, seed):
    """Train every layer on the same batch; return [(y, dx, mean, var, wgrad)] per layer."""
    x, dy = _data(seed)
    out = []
    for layer in layers:
        layer.clear_gradients()
        y = layer(x)
        dx = layer.backward(dy)
        bns = [m for m in layer.sublayers(include_self=True) if hasattr(m, "_mean")]
        out.append((y, dx, [b._mean.copy() for b in bns], [b._variance.copy() for b in bns],
                    [p.grad.copy() for p in layer.parameters() if p.grad is not None]))
    return out


def _assert_same_training(layers, steps=3):
    for step in range(steps):
        results = _step_all(layers, 100 + step)
        first = results[0]
        for other in results[1:]:
            for a, b in zip(first[:2], other[:2]):
                np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)
            for group_a, group_b in zip(first[2:], other[2:]):
                assert len(group_a) == len(group_b) > 0
                for a, b in zip(group_a, group_b):
                    np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)


def test_deep_copy_of_a_fresh_layer_is_a_new_layer():
    comm = _forced_comm()
    a = sbn.SyncBatchNorm(3, comm=comm)
    b = copy.deepcopy(a)
    c = copy.deepcopy(a)
    assert b.comm is a.comm is comm  # shared, not copied
    # construction ordinals, counted on comm in program order
    assert (a._sync_state.ordinal, b._sync_state.ordinal, c._sync_state.ordinal) == (
        a._sync_state.ordinal, a._sync_state.ordinal + 1, a._sync_state.ordinal + 2)
    assert b._sync_state is not a._sync_state
    for attr in ("_mean", "_variance", "_num_batches_tracked"):
        assert getattr(b, attr) is not getattr(a, attr)
        np.testing.assert_array_equal(getattr(b, attr), getattr(a, attr))
    assert b.weight is not a.weight and b.weight.data is not a.weight.data
    # the lazy default stays lazy and is the default's on both
    d = sbn.SyncBatchNorm(3)
    e = copy.deepcopy(d)
    assert d._comm is None and e._comm is None
    assert e._sync_state.ordinal == d._sync_state.ordinal + 1


def test_shallow_copy_shares_arrays_but_is_a_new_layer():
    a = sbn.SyncBatchNorm(3, comm=_forced_comm())
    x, dy = _data(3)
    a(x)
    b = copy.copy(a)
    assert b._mean is a._mean and b.weight is a.weight and b.comm is a.comm
    assert b._sync_state is not a._sync_state
    assert b._sync_state.ordinal == a._sync_state.ordinal + 1
    assert b.num_pending == 0 and a.num_pending == 1
    a.backward(dy)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_used_layer_with_pending_forwards_copies_and_trains_alike(how):
    comm = _forced_comm()
    default = _forced_comm()
    sbn.set_default_comm(default)
    try:
        a = sbn.SyncBatchNorm(3, comm=comm, dtype="float64", momentum=0.7)
        _step_all([a], 1)
        x, _ = _data(2)
        a(x)
        a(x)
        assert a.num_pending == 2 and a._sync_state.handshake_done
        assert a._sync_state._buffers  # workspaces exist to be dropped
        if how == "deepcopy":
            b = copy.deepcopy(a)
            assert b.comm is comm
        else:
            blob = pickle.dumps(a)
            assert b"NoCommunicator" not in blob and b"SyncState" not in blob
            assert b"ForwardContext" not in blob
            b = pickle.loads(blob)
            assert b._comm is None and b._comm_arg is None
            assert b.comm is default  # re-attached at first use
        assert b._sync_state is not a._sync_state
        assert not b._sync_state.handshake_done and not b._sync_state._buffers
        assert b._sync_state.shift is None
        assert b.num_pending == 0 and a.num_pending == 2
        with pytest.raises(sbn.NoPendingForwardError):
            b.backward(np.ones_like(x))
        for key, value in a.state_dict().items():
            assert b.state_dict()[key] is not value
            np.testing.assert_array_equal(b.state_dict()[key], value)
        a.clear_pending()
        _assert_same_training([a, b])
    finally:
        sbn.set_default_comm(None)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_model_copies_train_alike_and_local_layers_stay_local(how):
    comm = _forced_comm()
    sbn.set_default_comm(comm)
    try:
        model = sbn.Sequential(
            sbn.SyncBatchNorm(3, dtype="float64"),
            sbn.BatchNorm2D(3, dtype="float64"),
            sbn.Sequential(sbn.SyncBatchNorm(3, dtype="float64", momentum=None)),
        )
        _step_all([model], 5)
        model(_data(6)[0])  # pending forwards in every layer
        twin = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
        assert isinstance(twin, sbn.Sequential) and len(twin) == 3
        assert twin[1].comm is LOCAL  # a local layer stays local
        assert twin[0].comm is comm and twin[2][0].comm is comm
        assert [len(m._sub_layers) for m in twin.sublayers()] == [0, 0, 1, 0]
        ords = [m._sync_state.ordinal for m in (model[0], model[2][0], twin[0], twin[2][0])]
        assert len(set(ords)) == 4  # every copy is a new layer
        assert all(m.num_pending == 0 for m in (twin[0], twin[1], twin[2][0]))
        model.apply(lambda m: m.clear_pending() if hasattr(m, "clear_pending") else None)
        _assert_same_training([model, twin])
    finally:
        sbn.set_default_comm(None)


def test_unpickled_layer_uses_the_default_communicator_set_later():
    a = sbn.SyncBatchNorm(3, comm=_forced_comm())
    blob = pickle.dumps(a)
    later = _forced_comm()
    sbn.set_default_comm(later)
    try:
        b = pickle.loads(blob)
        assert b.comm is later
    finally:
        sbn.set_default_comm(None)


MPI_SCRIPT = r"""
import copy, pickle
import numpy as np
from mpi4py import MPI
import cupysyncbn as sbn
from cupysyncbn.comm.base import LOCAL
from cupysyncbn.comm.mpi import MPICommunicator
from cupysyncbn.errors import CollectiveMismatchError
from support.rank_outcomes import say

world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
default = sbn.init("mpi", force_collectives=True)  # a group of one runs the sync path too
COUNTS = [5, 2] if size == 2 else [7]
LO = sum(COUNTS[:rank])
SL = slice(LO, LO + COUNTS[rank])
TOL = dict(rtol=1e-12, atol=1e-12)


def batch(seed):
    rng = np.random.default_rng(seed)  # the same global batch on every rank
    x = rng.standard_normal((sum(COUNTS), 3, 2, 2)) * np.array([1, 10, 0.1])[:, None, None] + 4
    return x, rng.standard_normal(x.shape)


def close(a, b, what):
    np.testing.assert_allclose(a, b, err_msg=what, **TOL)


# item 3: a deep copy of a fresh layer is another layer: A, B against B, A raises
if size > 1:
    A = sbn.SyncBatchNorm(3, dtype="float64")
    B = copy.deepcopy(A)
    assert B.comm is A.comm is default
    first = A if rank == 0 else B
    try:
        first(batch(1)[0][SL])
    except CollectiveMismatchError as e:
        assert "different layers" in str(e), str(e)
    else:
        raise AssertionError("A and its copy B were paired silently")
    say(f"OK swap {rank}")

# ... and in the same order on every rank: one process's results on the global batch
A = sbn.SyncBatchNorm(3, dtype="float64", momentum=0.8)
B = copy.deepcopy(A)
refs = {id(A): sbn.SyncBatchNorm(3, dtype="float64", momentum=0.8, comm=LOCAL),
        id(B): sbn.SyncBatchNorm(3, dtype="float64", momentum=0.8, comm=LOCAL)}
for step in range(3):
    for layer, seed in ((A, 10 + step), (B, 20 + step)):
        ref = refs[id(layer)]
        x, dy = batch(seed)
        layer.clear_gradients(); ref.clear_gradients()
        close(layer(x[SL]), ref(x)[SL], "y")
        close(layer.backward(dy[SL]), ref.backward(dy)[SL], "dx")
        close(layer._mean, ref._mean, "mean"); close(layer._variance, ref._variance, "var")
        close(world.allreduce(layer.weight.grad), ref.weight.grad, "dweight")
        close(world.allreduce(layer.bias.grad), ref.bias.grad, "dbias")
say(f"OK same-order {rank}")

# item 8: a used layer with pending forwards, over an explicit MPICommunicator
mc = MPICommunicator(world)
mc.force_collectives = True
L = sbn.SyncBatchNorm(3, dtype="float64", momentum=0.6, comm=mc)
x, dy = batch(30)
for _ in range(2):
    L(x[SL]); L.backward(dy[SL])
L(x[SL])
assert L.num_pending == 1
C = copy.deepcopy(L)
blob = pickle.dumps(L)
assert b"mpi4py" not in blob and b"MPICommunicator" not in blob
P = pickle.loads(blob)
assert C.comm is mc and P._comm is None and P.comm is sbn.get_default_comm() is default
for twin in (C, P):
    assert twin.num_pending == 0 and not twin._sync_state.handshake_done
    assert not twin._sync_state._buffers and twin._sync_state is not L._sync_state
    for k, v in L.state_dict().items():
        np.testing.assert_array_equal(twin.state_dict()[k], v)
L.backward(dy[SL])  # the original's pending forward is still its own
for step in range(3):
    x, dy = batch(40 + step)
    got = []
    for layer in (L, C, P):
        layer.clear_gradients()
        got.append((layer(x[SL]), layer.backward(dy[SL]), layer._mean.copy(),
                    layer._variance.copy(), layer.weight.grad.copy(), layer.bias.grad.copy()))
    for other in got[1:]:
        for a, b in zip(got[0], other):
            close(b, a, "copy vs original")
say(f"OK used-layer {rank}")

# ... and a model: local layers stay local, synchronized ones share mc (copy)
# or use the default communicator (pickle)
model = sbn.Sequential(sbn.SyncBatchNorm(3, dtype="float64", comm=mc),
                       sbn.BatchNorm2D(3, dtype="float64"),
                       sbn.SyncBatchNorm(3, dtype="float64", comm=mc, momentum=None))
x, dy = batch(50)
model(x[SL]); model.backward(dy[SL]); model(x[SL])
MC = copy.deepcopy(model)
MP = pickle.loads(pickle.dumps(model))
assert MC[0].comm is mc and MC[2].comm is mc and MC[1].comm is LOCAL
assert MP[0].comm is default and MP[2].comm is default and MP[1].comm is LOCAL
model.backward(dy[SL])
for step in range(2):
    x, dy = batch(60 + step)
    got = []
    for m in (model, MC, MP):
        m.clear_gradients()
        got.append([m(x[SL]), m.backward(dy[SL])] + [b._variance.copy() for b in m]
                   + [p.grad.copy() for p in m.parameters()])
    for other in got[1:]:
        for a, b in zip(got[0], other):
            close(b, a, "model copy vs original")
say(f"OK model {rank}")
"""


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [1, 2])
def test_copies_and_pickles_under_mpi(tmp_path, ranks):
    res = run_mpi(MPI_SCRIPT, ranks, timeout=90, tmp_path=tmp_path,
                  env={"CUPYSYNCBN_TIMEOUT": "20"})
    cases = ["same-order", "used-layer", "model"] + (["swap"] if ranks > 1 else [])
    for case in cases:
        for r in range(ranks):
            assert f"OK {case} {r}" in res.stdout, (case, r, res.stdout, res.stderr)


def test_sync_state_copies_are_fresh_states_with_their_own_ordinal():
    from cupysyncbn._sync.state import SyncState

    comm = _forced_comm()
    state = SyncState.for_layer(comm)
    state.handshake_done, state.shift, state.calls = True, np.zeros(3), 5
    state.buffer(sbn.backends.get_backend(np.zeros(1)), 8)
    twin = copy.deepcopy(state)
    assert twin.ordinal == state.ordinal + 1  # counted on the same communicator
    assert not twin.handshake_done and twin.shift is None and twin.calls == 0
    assert not twin._buffers and state._buffers
    loaded = pickle.loads(pickle.dumps(state))  # no buffers, the default's sequence
    assert loaded.ordinal > 0 and not loaded._buffers and not loaded.handshake_done
    bare = SyncState()  # the functional API's: no construction identity to renew
    assert copy.deepcopy(bare).ordinal == 0 and pickle.loads(pickle.dumps(bare)).ordinal == 0
