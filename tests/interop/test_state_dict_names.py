"""Paddle <-> PyTorch state-dict names and the running-variance convention."""

import numpy as np
import pytest

import cupysyncbn as sbn
from cupysyncbn.comm.base import LOCAL
from cupysyncbn.interop import state_dict as S


def test_names_round_trip_on_a_model_state_dict():
    sd = {
        "conv.weight": np.ones((4, 3, 3, 3)),
        "block.bn.weight": np.full(4, 2.0),
        "block.bn.bias": np.zeros(4),
        "block.bn._mean": np.arange(4.0),
        "block.bn._variance": np.full(4, 3.0),
        "_mean": np.zeros(2),
        "_variance": np.ones(2),
    }
    t = S.paddle_to_torch(sd, num_batches_tracked=np.asarray(5))
    assert set(t) == {
        "conv.weight", "block.bn.weight", "block.bn.bias", "block.bn.running_mean",
        "block.bn.running_var", "block.bn.num_batches_tracked", "running_mean", "running_var",
        "num_batches_tracked",
    }
    assert t["block.bn.running_var"] is sd["block.bn._variance"]  # names only: same arrays
    back = S.torch_to_paddle(t)
    assert set(back) == set(sd)
    kept = S.torch_to_paddle(t, keep_num_batches_tracked=True)
    assert int(kept["block.bn._num_batches_tracked"]) == 5
    assert "block.bn.num_batches_tracked" in t and "block.bn._variance" in sd  # inputs untouched


def test_momentum_conversion():
    assert S.momentum_torch_to_paddle(0.1) == pytest.approx(0.9)
    assert S.momentum_paddle_to_torch(0.9) == pytest.approx(0.1)
    assert S.momentum_torch_to_paddle(None) is None


def test_rescale_errors_and_identity_at_start():
    with pytest.raises(ValueError, match="count"):
        S.rescale_running_var(np.ones(3), 1, to="torch")
    with pytest.raises(ValueError, match="to must be"):
        S.rescale_running_var(np.ones(3), 4, to="jax")
    # the initial running_var = 1 is the same in both conventions
    assert np.array_equal(S.rescale_running_var(np.ones(3), 8, to="torch", steps=0), np.ones(3))


@pytest.mark.parametrize("torch_momentum", [0.1, None])
def test_variance_conversion_is_exact_against_torch(torch_momentum):
    torch = pytest.importorskip("torch")
    pm = S.momentum_torch_to_paddle(torch_momentum)
    layer = sbn.SyncBatchNorm(3, momentum=pm, dtype="float64", comm=LOCAL)  # biased (Paddle)
    ref = torch.nn.BatchNorm2d(3, momentum=torch_momentum).double()
    rng = np.random.default_rng(7)
    steps, shape = 4, (6, 3, 2, 2)
    n = shape[0] * shape[2] * shape[3]
    for s in range(steps):
        x = rng.normal(size=shape) * (s + 1) + s
        layer(x)
        ref(torch.from_numpy(x))
    psd = layer.state_dict()
    tsd = {k: v.numpy() for k, v in ref.state_dict().items()}
    conv = S.paddle_to_torch(psd, count=n, paddle_momentum=pm, steps=steps)
    np.testing.assert_allclose(conv["running_mean"], tsd["running_mean"], rtol=1e-12)
    np.testing.assert_allclose(conv["running_var"], tsd["running_var"], rtol=1e-12)
    back = S.torch_to_paddle(tsd, count=n, paddle_momentum=pm)  # steps from num_batches_tracked
    np.testing.assert_allclose(back["_variance"], psd["_variance"], rtol=1e-12)
    if torch_momentum is not None:
        # without steps the initial value is taken as decayed: close, not exact
        approx = S.paddle_to_torch(psd, count=n, paddle_momentum=pm)["running_var"]
        rel = np.max(np.abs(approx - tsd["running_var"]) / tsd["running_var"])
        assert 1e-6 < rel < 0.9**steps / (n - 1) * 2
