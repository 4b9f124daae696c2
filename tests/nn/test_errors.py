"""Every error case of SPEC §6: a clear ValueError/TypeError naming the argument,
nothing half-updated, and on several ranks the same error everywhere, no hang."""

import numpy as np
import pytest
from support.bn_ref import check_group, eps

import cupysyncbn as sbn
from cupysyncbn import functional as F
from cupysyncbn.comm.base import NoCommunicator

LOCAL = NoCommunicator()


def _layer(c=3, **kw):
    kw.setdefault("comm", LOCAL)
    return sbn.SyncBatchNorm(c, **kw)


def _snapshot(layer):
    return {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fmt", ["NCWH", "nchw4", "", "CHW"])
def test_bad_data_format(fmt):
    with pytest.raises(ValueError, match="data_format"):
        _layer(data_format=fmt)


def test_data_format_wrong_type_and_family():
    with pytest.raises(TypeError, match="data_format"):
        _layer(data_format=4)
    with pytest.raises(ValueError, match="data_format"):
        sbn.BatchNorm2D(3, data_format="NCL")
    with pytest.raises(ValueError, match="data_format"):
        sbn.BatchNorm1D(3, data_format="NCHW")
    with pytest.raises(ValueError, match="data_format"):
        F.batch_norm_forward(np.ones((2, 3), np.float32), data_format="XYZ")


@pytest.mark.parametrize("fmt,shape", [
    # any name takes 2-5 dimensions (Paddle's SyncBatchNorm); 1 and 6 do not
    ("NCHW", (2, 3, 4, 4, 1, 1)), ("NHWC", (3,)), ("NCDHW", (2, 3, 1, 1, 1, 1)),
    ("NDHWC", (3,)), ("NC", (2, 3, 1, 1, 1, 1)), ("NCL", (6,)),
])
def test_rank_format_mismatch(fmt, shape):
    layer = _layer(data_format=fmt)
    before = _snapshot(layer)
    with pytest.raises(ValueError, match="dimensions"):
        layer(np.ones(shape, np.float32))
    assert _same(before, _snapshot(layer))


def test_one_d_family_accepts_2d_and_3d():
    # Paddle's BatchNorm1D takes (N, C) and (N, C, L) with data_format NCL/NC.
    for fmt in ("NC", "NCL", "NLC"):
        layer = _layer(data_format=fmt)
        assert layer(np.ones((4, 3), np.float32)).shape == (4, 3)


@pytest.mark.parametrize("fmt,shape", [("NCHW", (2, 4, 3, 3)), ("NHWC", (2, 3, 3, 4)),
                                       ("NC", (5, 2)), ("NLC", (2, 3, 5))])
def test_wrong_channel_count(fmt, shape):
    layer = _layer(data_format=fmt)
    before = _snapshot(layer)
    with pytest.raises(ValueError, match="channels.*num_features|num_features"):
        layer(np.ones(shape, np.float32))
    assert _same(before, _snapshot(layer))


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_, np.complex64,
                                   np.complex128, object])
def test_non_float_dtypes(dtype):
    layer = _layer()
    before = _snapshot(layer)
    x = np.ones((2, 3, 2, 2), dtype=dtype)
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        layer(x)
    with pytest.raises(TypeError, match="dtype"):
        F.batch_norm_forward(x, comm=LOCAL)
    assert _same(before, _snapshot(layer))


def test_non_array_input():
    with pytest.raises(TypeError, match="x must be a numpy.ndarray or cupy.ndarray"):
        _layer()([[[[1.0]]] * 3])


def test_backward_before_forward():
    layer = _layer()
    with pytest.raises(ValueError, match="before forward"):
        layer.backward(np.ones((2, 3, 2, 2), np.float32))
    # A state load invalidates the saved forward as well.
    x = np.random.default_rng(0).standard_normal((2, 3, 2, 2)).astype(np.float32)
    layer(x)
    layer.set_state_dict(layer.state_dict())
    with pytest.raises(ValueError, match="before forward"):
        layer.backward(x)


@pytest.mark.parametrize("bad", ["shape", "dtype", "type"])
def test_dy_mismatch(bad):
    layer = _layer()
    x = np.random.default_rng(0).standard_normal((2, 3, 2, 2)).astype(np.float32)
    layer(x)
    dy = {"shape": x[:1], "dtype": x.astype(np.float64), "type": x.tolist()}[bad]
    with pytest.raises((ValueError, TypeError), match="dy"):
        layer.backward(dy)
    assert layer.weight.grad is None and layer.bias.grad is None
    # The forward is still usable after the rejected dy.
    dx = layer.backward(np.ones_like(x))
    assert dx.shape == x.shape


@pytest.mark.parametrize("key,value,exc", [
    ("weight", np.ones(4, np.float32), ValueError),
    ("_mean", np.ones((3, 1), np.float32), ValueError),
    ("_variance", np.ones(3, np.float64), TypeError),
    ("bias", np.ones(3, np.int32), TypeError),
    ("running_var", np.ones(2, np.float32), ValueError),
])
def test_state_dict_wrong_entry_leaves_layer_unchanged(key, value, exc):
    layer = _layer()
    x = np.random.default_rng(1).standard_normal((4, 3, 2, 2)).astype(np.float32)
    layer(x)
    before = _snapshot(layer)
    good = {k: v + 1 for k, v in before.items()}  # valid entries that would change it
    good.pop("_variance" if key == "running_var" else key)
    good[key] = value
    with pytest.raises(exc, match=key):
        layer.set_state_dict(good)
    assert _same(before, _snapshot(layer))


def test_state_dict_missing_and_unexpected_keys():
    layer = _layer()
    before = _snapshot(layer)
    sd = dict(before)
    sd.pop("bias")
    with pytest.raises(ValueError, match="missing"):
        layer.set_state_dict(sd)
    with pytest.raises(ValueError, match="unexpected"):
        layer.set_state_dict({**before, "extra": np.ones(3, np.float32)})
    assert _same(before, _snapshot(layer))
    missing, unexpected = layer.set_state_dict({"weight": before["weight"] * 2, "x": 1.0},
                                               strict=False)
    assert missing == ["bias", "_mean", "_variance"] and unexpected == ["x"]
    assert np.array_equal(layer.weight.data, before["weight"] * 2)


@pytest.mark.parametrize("shape,fmt", [((1, 3), "NC"), ((1, 3, 1, 1), "NCHW"),
                                       ((1, 1, 1, 3), "NHWC")])
def test_unbiased_running_var_count_one(shape, fmt):
    layer = _layer(unbiased_running_var=True, data_format=fmt)
    before = _snapshot(layer)
    with pytest.raises(ValueError, match="unbiased"):
        layer(np.ones(shape, np.float32))
    assert _same(before, _snapshot(layer))
    # SPEC §2: a global count of 1 raises in training for the biased
    # convention too, before anything is updated (PyTorch's error).
    plain = _layer(data_format=fmt)
    before = _snapshot(plain)
    with pytest.raises(ValueError, match="more than 1 value per channel.*count of 1"):
        plain(np.ones(shape, np.float32))
    assert _same(before, _snapshot(plain))


def test_constructor_arguments():
    with pytest.raises(ValueError, match="num_features"):
        _layer(0)
    with pytest.raises(TypeError, match="num_features"):
        _layer(2.5)
    with pytest.raises(TypeError, match="num_features"):
        _layer(True)
    with pytest.raises(ValueError, match="momentum"):
        _layer(momentum=1.5)
    with pytest.raises(TypeError, match="momentum"):
        _layer(momentum="0.9")
    with pytest.raises(ValueError, match="epsilon"):
        _layer(epsilon=-1.0)
    with pytest.raises(ValueError, match="dtype"):
        _layer(dtype="float16")
    with pytest.raises(TypeError, match="weight_attr"):
        _layer(weight_attr=3)
    with pytest.raises(TypeError, match="comm"):
        _layer(comm="world")
    with pytest.raises(ValueError, match="backend"):
        sbn.init("gloo")


def test_functional_argument_errors():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="running_mean and running_var"):
        F.batch_norm_forward(x, running_mean=np.zeros(3, np.float32), data_format="NC",
                             comm=LOCAL)
    with pytest.raises(ValueError, match="weight must have shape"):
        F.batch_norm_forward(x, weight=np.ones((3, 1), np.float32), data_format="NC",
                             comm=LOCAL)
    with pytest.raises(ValueError, match="running_mean must have shape"):
        F.batch_norm_forward(x, weight=np.ones(3, np.float32), running_mean=np.zeros(4),
                             running_var=np.ones(4), data_format="NC", comm=LOCAL)
    with pytest.raises(ValueError, match="num_features is 4"):
        F.batch_norm_forward(x, weight=np.ones(4, np.float32), data_format="NC", comm=LOCAL)
    with pytest.raises(ValueError, match="momentum"):
        F.batch_norm_forward(x, data_format="NC", momentum=2.0, comm=LOCAL)


_ERROR_GROUPS = [
    "num_features mismatch",  # same CollectiveMismatchError on every rank
    "wrong channel count", "integer dtype", "rank/format mismatch", "non-array input",
    "dy shape", "dy dtype", "dy not an array",  # faulty rank: its own error; others:
    # RemoteInputError
    "forward/backward out of step",
    "unbiased",  # global count 1 split over ranks: every rank raises
    "mixed input dtypes", "mixed data_format",  # differences that need not matter work
    "after", "at the end",  # the group is still in step after every error
]
# One rank with forced collectives (conftest.mpi_job): the faulty-rank paths of
# the synchronized pass; the two cases that need a second rank are left out.
_NEEDS_PEERS = ("num_features mismatch", "forward/backward out of step")


@pytest.mark.mpi
@pytest.mark.parametrize("k,group", [
    (k, g) for k in (1, 2, 3) for g in _ERROR_GROUPS if not (k == 1 and g in _NEEDS_PEERS)
])
def test_errors_across_ranks(mpi_job, k, group):
    check_group(mpi_job("errors", k), group)


# ---- issue 14: finite in, finite out; big-endian; one watchdog ----------------


@pytest.mark.parametrize("fmt,shape,value", [
    ("NC", (4096, 3), 4e35), ("NHWC", (8, 32, 32, 3), 4e35),
    ("NCHW", (2, 3, 64, 64), 1e25), ("NCHW", (2, 3, 64, 64), 3e38),
    ("NC", (4096, 3), -3.4e38),
])
def test_finite_float32_input_gives_finite_statistics(fmt, shape, value):
    layer = _layer(data_format=fmt)
    x = np.full(shape, value, np.float32)
    y = layer(x)
    assert np.isfinite(y).all() and np.array_equal(y, np.zeros_like(y))  # bias 0
    # every value equal: the batch mean is exact (rescaled, never overflowed),
    # the running mean is 0.1 * value rounded to float32 (the reference too:
    # at most one float32 ulp apart), the batch variance exactly 0
    np.testing.assert_allclose(layer._mean, 0.1 * np.float32(value), rtol=eps(np.float32))
    np.testing.assert_array_equal(layer._variance, np.float32(0.9))
    dx = layer.backward(np.ones_like(y))
    assert np.isfinite(dx).all()


def test_finite_float16_input_near_its_limit():
    layer = _layer(data_format="NC")
    x = np.full((8192, 3), 6.0e4, np.float16)
    y = layer(x)
    assert np.isfinite(y).all()
    # exact: 6e4 is a float16 number, so is the mean of equal values, and
    # 0.1 * 6e4 rounds to 6000 in the float32 running mean
    np.testing.assert_array_equal(layer._mean, np.float32(6000.0))


def test_overflowing_chunks_still_match_float64_reference(rng):
    # spread data whose float32 chunk sums overflow: redone in float64, exact
    x = (rng.standard_normal((4096, 2)) * 1e30 + 3e35).astype(np.float32)
    res = F.batch_norm_forward(x, data_format="NC", comm=LOCAL)
    ref = x.astype(np.float64)
    mean, std = ref.mean(0), ref.std(0)
    # float64 sums of n values: log2(n) roundings for the mean; the variance
    # is conditioned by |mean| / std (3e5 here: the shift is rounded to
    # float64 against a spread 3e5 times smaller)
    e64, n = eps(np.float64), x.shape[0]
    np.testing.assert_allclose(res.batch_mean, mean, rtol=2 * e64 * np.log2(n), atol=0)
    np.testing.assert_allclose(res.batch_var, ref.var(0),
                               rtol=2 * e64 * np.max(np.abs(mean) / std), atol=0)


def test_inf_input_still_propagates():
    x = np.ones((4, 2), np.float32)
    x[0, 0] = np.inf
    res = F.batch_norm_forward(x, data_format="NC", comm=LOCAL)
    assert not np.isfinite(res.y[:, 0]).all() and np.isfinite(res.y[:, 1]).all()


def test_epsilon_zero_constant_channel_is_finite(rng):
    """Chosen behaviour: var + epsilon == 0 normalizes to 0: y = bias, dx = 0."""
    x = rng.standard_normal((6, 3)).astype(np.float32)
    x[:, 1] = 2.5
    w = np.array([2.0, 3.0, 4.0], np.float32)
    b = np.array([0.5, -1.0, 0.25], np.float32)
    res = F.batch_norm_forward(x, w, b, epsilon=0.0, data_format="NC", comm=LOCAL)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx, dw, db = F.batch_norm_backward(dy, res.ctx)
    assert np.isfinite(res.y).all() and np.isfinite(dx).all() and np.isfinite(dw).all()
    np.testing.assert_array_equal(res.y[:, 1], -1.0)
    np.testing.assert_array_equal(dx[:, 1], 0.0)
    # the other channels are the ordinary batch norm with epsilon 0
    ref = x.astype(np.float64)[:, [0, 2]]
    xhat = (ref - ref.mean(0)) / ref.std(0)
    np.testing.assert_allclose(res.y[:, [0, 2]], xhat * w[[0, 2]] + b[[0, 2]], atol=1e-5)
    # eval mode with a zero running variance too
    layer = _layer(epsilon=0.0, data_format="NC")
    layer.set_state_dict({**layer.state_dict(), "_variance": np.zeros(3, np.float32)})
    layer.eval()
    assert np.isfinite(layer(x)).all()


@pytest.mark.parametrize("dt", [">f2", ">f4", ">f8"])
def test_big_endian_input_is_accepted_as_native(dt, rng):
    x = rng.standard_normal((4, 3, 2, 2)).astype(dt)
    dy = rng.standard_normal(x.shape).astype(dt)
    native = np.dtype(dt).newbyteorder("=")
    a, b = _layer(), _layer()
    ya, yb = a(x), b(x.astype(native))
    assert ya.dtype == native and ya.dtype.isnative
    np.testing.assert_array_equal(ya, yb)
    np.testing.assert_array_equal(a.backward(dy), b.backward(dy.astype(native)))
    assert sbn.SyncBatchNorm(3, dtype=">f8", comm=LOCAL).weight.data.dtype == np.float64


def test_watchdog_times_overlapping_collectives_each_on_its_own(monkeypatch):
    import threading

    from cupysyncbn.runtime import watchdog

    fired = []
    done = threading.Event()

    def fake_abort(comm, code, message):
        fired.append((comm, message))
        done.set()
        dog.stop()  # the real abort_job never returns

    monkeypatch.setattr(watchdog, "abort_job", fake_abort)
    dog = watchdog.CollectiveWatchdog(timeout=0.3)
    ta = dog.begin("layer A", comm="comm-A")
    tb = dog.begin("layer B", comm="comm-B")  # starts while A is in flight
    assert dog.in_flight == 2
    dog.end(ta)  # A completes; B never does
    assert done.wait(10)
    assert fired[0][0] == "comm-B" and "layer B" in fired[0][1]
    assert "0.3 s" in fired[0][1]
    dog.end(tb)
    assert dog._thread is None


def test_watchdog_forgets_async_collectives_that_complete(monkeypatch):
    from cupysyncbn.runtime import watchdog

    monkeypatch.setattr(watchdog, "abort_job", lambda *a: pytest.fail("aborted"))
    dog = watchdog.CollectiveWatchdog(timeout=0.2)
    dog.begin("nccl all-reduce", done=lambda: True)
    deadline = __import__("time").monotonic() + 5
    while dog.in_flight and __import__("time").monotonic() < deadline:
        __import__("time").sleep(0.02)
    assert dog.in_flight == 0
    assert dog.begin("disabled", timeout=0) is None
    dog.stop()


def test_one_timeout_parser_and_one_list_of_launcher_variables(monkeypatch):
    import inspect

    from cupysyncbn.comm import nccl
    from cupysyncbn.runtime import env, watchdog

    for bad in ("-1", "abc", "nan"):
        with pytest.raises(ValueError, match="CUPYSYNCBN_TIMEOUT"):
            env.parse_timeout(bad)
    monkeypatch.setenv("CUPYSYNCBN_NCCL_TIMEOUT", "-5")
    with pytest.raises(ValueError, match="CUPYSYNCBN_NCCL_TIMEOUT must be >= 0"):
        env.collective_timeout("CUPYSYNCBN_NCCL_TIMEOUT")
    with pytest.raises(ValueError, match="CUPYSYNCBN_NCCL_TIMEOUT must be >= 0"):
        nccl._timeout_from_env()
    monkeypatch.setenv("CUPYSYNCBN_NCCL_TIMEOUT", "")
    monkeypatch.setenv("CUPYSYNCBN_TIMEOUT", "7")
    assert env.collective_timeout("CUPYSYNCBN_NCCL_TIMEOUT") == 7.0
    assert nccl._timeout_from_env() == 7.0
    with pytest.raises(ValueError, match="timeout"):
        watchdog.CollectiveWatchdog(timeout=-1)
    # The launcher variables are listed once, in runtime/env.py, and read there only
    # (tests/system/test_layout.py checks that no other module reads os.environ).
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "3")
    assert env.launched_size() == 3
    monkeypatch.setenv("MPI_LOCALRANKID", "1")
    assert env.env_local_rank() == 1
    src = inspect.getsource(nccl._timeout_from_env)
    assert "collective_timeout" in src and "max(" not in src


def test_steady_state_skips_the_checks_but_every_change_is_checked(monkeypatch):
    """A layer's repeated passes skip the argument checks (per-state memo); any
    change of what the checks look at is checked again, and still refused."""
    from cupysyncbn._sync import checks

    calls = []
    real = checks._check_call
    monkeypatch.setattr(checks, "_check_call", lambda *a, **k: calls.append(1) or real(*a, **k))
    rng = np.random.default_rng(0)
    c = 3
    x = rng.standard_normal((4, c, 5)).astype(np.float32)
    w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    state = F.SyncState()

    def fwd(x_, *vectors, momentum=0.9, epsilon=1e-5, fmt="NCL"):
        args = vectors or (w, b, rm, rv)
        return F.batch_norm_forward(x_, *args, momentum=momentum, epsilon=epsilon,
                                    data_format=fmt, comm=LOCAL, sync_state=state)

    y0 = fwd(x).y
    assert np.array_equal(fwd(x.copy()).y, y0) and len(calls) == 1  # memo: no re-check
    refused = [
        (lambda: fwd(x[:, :2]), ValueError, "2 channels"),
        (lambda: fwd(x.astype(np.int32)), TypeError, "floating dtype"),
        (lambda: fwd(x.reshape(-1)), ValueError, "dimensions"),
        (lambda: fwd(x, fmt="NLC"), ValueError, "channels"),
        (lambda: fwd(x, momentum=True), TypeError, "momentum"),
        (lambda: fwd(x, epsilon=-1.0), ValueError, "epsilon"),
        (lambda: fwd(x, np.ones(c + 1, np.float32), b, rm, rv), ValueError, "shape"),
        (lambda: fwd(x, w, b, rm, None), ValueError, "together"),
        (lambda: fwd(x, w, b, rm, list(rv)), TypeError, "running_var"),
    ]
    for call, exc, match in refused:
        with pytest.raises(exc, match=match):
            call()
        assert np.array_equal(fwd(x).y, y0)  # a refused call leaves the memo alone
    assert len(calls) == 1 + len(refused)
    fwd(x, momentum=1)  # an int momentum is fine, and is memoized ...
    with pytest.raises(TypeError, match="momentum"):
        fwd(x, momentum=True)  # ... but True == 1 is still refused
    b.shape = (c, 1)  # a vector reshaped in place
    with pytest.raises(ValueError, match="bias must have shape"):
        fwd(x)
    b.shape = (c,)
    assert np.array_equal(fwd(x).y, y0)


def test_header_fast_check_agrees_with_the_full_check():
    """Steady-state passes check the reduced header with one scan
    (``protocol._in_step``); it must accept exactly what the full check accepts."""
    from cupysyncbn._sync import protocol as P

    rng = np.random.default_rng(3)
    kinds = (None, None, None, *P.ERROR_KINDS)
    seen = {True: 0, False: 0}
    for _ in range(3000):
        size = int(rng.integers(1, 4))
        phase = int(rng.integers(0, 4))
        base = [int(rng.integers(0, 5000)) for _ in range(5)]  # nf, layer, call, ident, evals
        heads = []
        for _ in range(size):
            vals = [v if rng.random() < 0.9 else v + int(rng.integers(1, 3)) for v in base]
            ph = phase if rng.random() < 0.95 else (phase + 1) % 4
            kind = kinds[int(rng.integers(0, len(kinds)))] if rng.random() < 0.1 else None
            nf, layer, call, ident, evals = vals
            heads.append(P._header(int(rng.integers(0, 100)), ph, kind, nf, layer, call,
                                   ident, evals))
        h = np.sum(heads, axis=0)
        full = (P._mismatch(h, phase, size) is None and not any(
            h[P._I[f"err_{k}"]] for k in P.ERROR_KINDS) and P._identity_mismatch(h, size) is None)
        assert P._in_step(h.tolist(), phase, size) == full
        seen[full] += 1
        if full:
            assert P.check_header(h, phase, size, None) == int(h[P._I["count"]])
        else:
            with pytest.raises((sbn.errors.CollectiveMismatchError, sbn.errors.RemoteInputError)):
                P.check_header(h, phase, size, None)
    assert min(seen.values()) > 300  # both verdicts were exercised
