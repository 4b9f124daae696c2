"""The Paddle adapter's copies are new layers too (issue #23 item 3).

``copy.deepcopy`` of a ``cupysyncbn.interop.paddle.SyncBatchNorm`` shares the
communicator (``SharedComm``) and gets a fresh ``SyncState`` with the next
construction ordinal, so ranks that run a layer and its copy in different
orders are told apart (the header's identity slots) instead of being paired;
pickling drops the communicator and the state's buffers.
"""

import copy
import pickle

import numpy as np
import pytest

paddle = pytest.importorskip("paddle")

from cupysyncbn.comm.base import NoCommunicator  # noqa: E402
from cupysyncbn.interop import paddle as pi  # noqa: E402


def test_deepcopy_and_pickle_give_a_new_identity():
    comm = NoCommunicator()
    comm.force_collectives = True  # the synchronized path: a handshake, buffers
    bn = pi.SyncBatchNorm(3, comm=comm)
    bn(paddle.to_tensor(np.random.default_rng(0).standard_normal((4, 3, 2, 2)), "float32"))
    assert bn._sync_state.handshake_done
    twin = copy.deepcopy(bn)
    assert twin.comm is comm
    assert twin._sync_state is not bn._sync_state
    assert twin._sync_state.ordinal == bn._sync_state.ordinal + 1
    assert not twin._sync_state.handshake_done and not twin._sync_state._buffers

    fresh = pi.SyncBatchNorm(3)  # the lazy default communicator
    loaded = pickle.loads(pickle.dumps(fresh))
    assert loaded.comm is None
    assert loaded._sync_state.ordinal not in (0, fresh._sync_state.ordinal)
    # the copy trains like the original
    x = paddle.to_tensor(np.random.default_rng(1).standard_normal((5, 3, 2, 2)), "float32")
    np.testing.assert_allclose(twin(x).numpy(), bn(x).numpy(), rtol=1e-5, atol=1e-5)
