"""reproducible=True through the PyTorch and Paddle adapters (issue #21).

Ranks are threads (:class:`bn_ref.ThreadGroup`): the forward output, the
input gradient (autograd) and the running variance are the same bytes for
one rank and for splits over 2 and 3 ranks, empty ranks included; the
setting shows in the repr and survives copies.
"""

import copy
import pickle

import numpy as np
import pytest
from support.bn_ref import ThreadGroup

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from cupysyncbn.interop import paddle as pi  # noqa: E402
from cupysyncbn.interop import torch as ti  # noqa: E402

SPLITS = ([10], [5, 5], [0, 3, 7])


def _data():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((10, 3, 4)) * 3 + 500).astype(np.float32)
    return x, rng.standard_normal((10, 3, 4)).astype(np.float32)


def _torch_rank(x, dy):
    def fn(r, comm, cuts):
        m = ti.SyncBatchNorm(3, comm=comm, reproducible=True)
        xt = torch.tensor(x[cuts[r]:cuts[r + 1]], requires_grad=True)
        y = m(xt)
        y.backward(torch.tensor(dy[cuts[r]:cuts[r + 1]]))
        return y.detach().numpy(), xt.grad.numpy(), m.running_var.numpy().copy()
    return fn


def _paddle_rank(x, dy):
    def fn(r, comm, cuts):
        m = pi.SyncBatchNorm(3, data_format="NCL", comm=comm, reproducible=True)
        xt = paddle.to_tensor(x[cuts[r]:cuts[r + 1]], stop_gradient=False)
        y = m(xt)
        y.backward(paddle.to_tensor(dy[cuts[r]:cuts[r + 1]]))
        return y.numpy(), xt.grad.numpy(), m._variance.numpy().copy()
    return fn


@pytest.mark.parametrize("make", [_torch_rank, _paddle_rank], ids=["torch", "paddle"])
def test_adapter_outputs_are_the_same_bits_for_every_split(make):
    x, dy = _data()
    fn = make(x, dy)
    got = []
    for split in SPLITS:
        cuts = np.cumsum([0, *split])
        out = ThreadGroup(len(split), timeout=20).run(lambda r, c: fn(r, c, cuts))  # noqa: B023
        got.append([np.concatenate([o[0] for o in out]).tobytes(),
                    np.concatenate([o[1] for o in out]).tobytes(), out[-1][2].tobytes()])
    assert all(g == got[0] for g in got[1:])
    assert got[0][0] != np.zeros_like(x).tobytes()


def test_adapter_setting_repr_and_copies():
    t = ti.SyncBatchNorm(3, reproducible=True)
    assert t.reproducible and "reproducible=True" in repr(t)
    assert copy.deepcopy(t).reproducible and pickle.loads(pickle.dumps(t)).reproducible
    assert not ti.SyncBatchNorm(3).reproducible
    p = pi.SyncBatchNorm(3, reproducible=True)
    assert p.reproducible and "reproducible=True" in repr(p)
    assert copy.deepcopy(p).reproducible
    p.comm = None  # a new group keeps the setting
    assert p.reproducible
    with pytest.raises(TypeError, match="reproducible must be a bool"):
        ti.SyncBatchNorm(3, reproducible="yes")
    with pytest.raises(TypeError, match="reproducible must be a bool"):
        pi.SyncBatchNorm(3, reproducible=2)
