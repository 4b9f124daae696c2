"""State dicts the layer refuses (issue #23 item 4), leaving it exactly as it was.

One entry under two names (``_mean`` and ``running_mean``, ...) with
different values, and running statistics no layer can hold (NaN or infinite
means, NaN, infinite or negative variances): a ``ValueError`` naming the
key(s), nothing assigned. Directly, through ``sbn.save``/``sbn.load``, and in
a model whose keys carry a dotted prefix.
"""

import numpy as np
import pytest

import cupysyncbn as sbn


def _trained(momentum=0.9, layer_cls=sbn.SyncBatchNorm, **kw):
    bn = layer_cls(3, momentum=momentum, dtype="float64", **kw)
    rng = np.random.default_rng(0)
    for _ in range(2):
        bn(rng.standard_normal((5, 3, 2, 2)) * 3 + 1)
    return bn


def _snapshot(layer):
    """Every state array of the layer (and its batch counter): the object and its value."""
    arrays = dict(layer.state_dict())
    arrays["<num_batches_tracked>"] = layer._num_batches_tracked
    return {k: (v, v.copy()) for k, v in arrays.items()}


def _assert_unchanged(layer, snap):
    now = dict(layer.state_dict())
    now["<num_batches_tracked>"] = layer._num_batches_tracked
    assert now.keys() == snap.keys()
    for key, (obj, value) in snap.items():
        assert now[key] is obj, key  # loads write in place: same arrays
        np.testing.assert_array_equal(now[key], value, err_msg=key)


def _sd(layer):
    return {k: v.copy() for k, v in layer.state_dict().items()}


@pytest.mark.parametrize("own, alias", [("_mean", "running_mean"), ("_variance", "running_var")])
def test_conflicting_aliases_are_refused_naming_both(own, alias):
    bn = _trained()
    snap = _snapshot(bn)
    sd = _sd(bn)
    sd[own] = sd[own] + 0.5
    sd[alias] = sd[own] + 0.25  # differs from its twin
    for order in (sd, dict(reversed(list(sd.items())))):  # whichever comes first
        with pytest.raises(ValueError, match=rf"'{own}'.*'{alias}'|'{alias}'.*'{own}'"):
            bn.set_state_dict(order)
        _assert_unchanged(bn, snap)


@pytest.mark.parametrize("own, alias", [("_mean", "running_mean"), ("_variance", "running_var")])
def test_equal_aliases_are_accepted(own, alias):
    bn = _trained()
    sd = _sd(bn)
    sd[own] = sd[own] + 0.5
    sd[alias] = sd[own].copy()
    bn.set_state_dict(sd)
    np.testing.assert_array_equal(getattr(bn, own), sd[own])


def test_conflicting_num_batches_tracked_aliases_are_refused():
    bn = _trained(momentum=None)  # cumulative average: the count is state
    assert int(bn._num_batches_tracked) == 2
    snap = _snapshot(bn)
    sd = _sd(bn)
    assert "_num_batches_tracked" in sd
    sd["num_batches_tracked"] = np.array(7, dtype=np.int64)
    with pytest.raises(ValueError, match="'_num_batches_tracked'.*'num_batches_tracked'"):
        bn.set_state_dict(sd)
    _assert_unchanged(bn, snap)
    sd["num_batches_tracked"] = sd["_num_batches_tracked"].copy()
    bn.set_state_dict(sd)  # the same value twice is fine
    assert int(bn._num_batches_tracked) == 2


BAD_STATS = [
    ("_variance", -1.0, "negative"),
    ("_variance", -1e-30, "negative"),
    ("_variance", np.nan, "non-finite"),
    ("_variance", np.inf, "non-finite"),
    ("running_var", -np.inf, "non-finite"),
    ("_mean", np.nan, "non-finite"),
    ("_mean", np.inf, "non-finite"),
    ("running_mean", -np.inf, "non-finite"),
]


@pytest.mark.parametrize("key, bad, what", BAD_STATS)
def test_non_finite_or_negative_statistics_are_refused(key, bad, what):
    bn = _trained()
    snap = _snapshot(bn)
    sd = _sd(bn)
    if key.startswith("running"):  # the PyTorch name alone
        own = {"running_mean": "_mean", "running_var": "_variance"}[key]
        sd[key] = sd.pop(own)
    sd[key] = sd[key].copy()
    sd[key][1] = bad
    with pytest.raises(ValueError, match=rf"state_dict\['{key}'\].*{what}"):
        bn.set_state_dict(sd)
    _assert_unchanged(bn, snap)
    # the layer still evaluates to finite values with what it had
    bn.eval()
    assert np.isfinite(bn(np.ones((2, 3, 2, 2)))).all()


def test_zero_variance_and_large_finite_statistics_are_accepted():
    bn = _trained()
    sd = _sd(bn)
    sd["_variance"][:] = [0.0, 1e300, 2.0]
    sd["_mean"][:] = [-1e300, 0.0, 5.0]
    bn.set_state_dict(sd)
    np.testing.assert_array_equal(bn._variance, [0.0, 1e300, 2.0])


def test_refused_through_save_load_and_nothing_changes(tmp_path):
    bn = _trained()
    snap = _snapshot(bn)
    sd = _sd(bn)
    sd["_variance"][0] = -0.5
    path = tmp_path / "bad.npz"
    sbn.save(sd, path)
    with pytest.raises(ValueError, match=r"state_dict\['_variance'\].*negative"):
        bn.set_state_dict(sbn.load(path))
    _assert_unchanged(bn, snap)

    sd = _sd(bn)
    sd["running_mean"] = sd["_mean"] + 1.0
    sbn.save(sd, path)
    with pytest.raises(ValueError, match="'_mean'.*'running_mean'"):
        bn.set_state_dict(sbn.load(path))
    _assert_unchanged(bn, snap)


def test_model_with_dotted_prefix_is_all_or_nothing():
    inner = sbn.Sequential(
        sbn.BatchNorm2D(3, dtype="float64"), sbn.SyncBatchNorm(3, dtype="float64")
    )
    model = sbn.Sequential(sbn.SyncBatchNorm(3, dtype="float64"), inner)
    rng = np.random.default_rng(1)
    model(rng.standard_normal((4, 3, 2, 2)))
    snaps = [_snapshot(layer) for layer in (model[0], inner[0], inner[1])]
    good = {k: v.copy() for k, v in model.state_dict().items()}
    assert "1.1._variance" in good and "1.0._mean" in good

    # a valid change to the first layer plus one bad entry deep inside: nothing is applied
    for key, value in (("1.1._variance", -2.0), ("1.0._mean", np.nan)):
        sd = {k: v.copy() for k, v in good.items()}
        sd["0._mean"] += 10.0
        sd[key][2] = value
        with pytest.raises(ValueError, match=rf"state_dict\['{key}'\]"):
            model.set_state_dict(sd)
        for layer, snap in zip((model[0], inner[0], inner[1]), snaps):
            _assert_unchanged(layer, snap)

    sd = {k: v.copy() for k, v in good.items()}
    sd["0._mean"] += 10.0
    sd["1.1.running_var"] = sd["1.1._variance"] * 2
    with pytest.raises(ValueError, match=r"'1\.1\._variance'.*'1\.1\.running_var'"):
        model.set_state_dict(sd)
    for layer, snap in zip((model[0], inner[0], inner[1]), snaps):
        _assert_unchanged(layer, snap)

    sd["1.1.running_var"] = sd["1.1._variance"].copy()
    model.set_state_dict(sd)  # consistent twins load
    np.testing.assert_array_equal(model[0]._mean, good["0._mean"] + 10.0)
