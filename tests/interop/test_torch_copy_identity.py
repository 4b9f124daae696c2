"""The PyTorch adapter's copies are new layers (issue #23 item 3).

``copy.deepcopy`` (an EMA copy, say) and pickling give a fresh ``SyncState``
with the next construction ordinal, so ranks that run a layer and its copy in
different orders raise ``CollectiveMismatchError`` instead of being paired.
"""

import copy
import pickle

import pytest
from support.mpi_runner import run_mpi

torch = pytest.importorskip("torch")

from cupysyncbn.comm.base import NoCommunicator  # noqa: E402
from cupysyncbn.interop.torch import SyncBatchNorm  # noqa: E402


def test_deepcopy_and_pickle_give_a_new_identity():
    comm = NoCommunicator()
    comm.force_collectives = True  # the synchronized path: a handshake, buffers
    bn = SyncBatchNorm(3, comm=comm)
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    bn(x)
    assert bn._sync_state.handshake_done
    twin = copy.deepcopy(bn)
    assert twin._sync_state is not bn._sync_state
    assert twin._sync_state.ordinal == bn._sync_state.ordinal + 1
    assert not twin._sync_state.handshake_done
    loaded = pickle.loads(pickle.dumps(SyncBatchNorm(3)))
    assert loaded._sync_state.ordinal not in (0, bn._sync_state.ordinal)
    torch.testing.assert_close(twin(x), bn(x))


@pytest.mark.mpi
def test_two_copies_run_in_different_orders_raise(tmp_path):
    code = """
import copy
import torch
import cupysyncbn as sbn
from cupysyncbn.errors import CollectiveMismatchError
from cupysyncbn.interop.torch import SyncBatchNorm
comm = sbn.init("mpi")
a = SyncBatchNorm(3, comm=comm)
b, c = copy.deepcopy(a), copy.deepcopy(a)  # two EMA-style copies
x = torch.randn(4, 3, 2, 2)
order = (b, c) if comm.rank == 0 else (c, b)
try:
    for layer in order:
        layer(x)
    print("paired silently")
except CollectiveMismatchError as e:
    print("mismatch", comm.rank)
"""
    res = run_mpi(code, 2, timeout=120, tmp_path=tmp_path)
    assert res.stdout.count("mismatch") == 2, res.stdout + res.stderr
