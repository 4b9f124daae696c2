"""Property-based robustness tests (hypothesis), single process.

Over shapes (including zero-size dimensions), every data format, float16/32/64,
non-contiguous views and non-finite values:

* valid input: output, input gradient (for a random ``dy``), parameter
  gradients and eval outputs of the right shape and dtype, finite, and close
  to a float64 NumPy reference on the same (already rounded) values, with
  tolerances from the dtype and the problem's conditioning; no NaN anywhere,
  also for empty batches;
* NaN/Inf in one channel: propagates to that channel only; every other
  channel's output and running statistics are bitwise what they are without it;
* invalid input: a clear ValueError/TypeError naming the argument, with the
  layer left exactly as it was.

pytest turns cupysyncbn's RuntimeWarnings into errors (pyproject.toml), so a
NumPy floating-point warning here would fail the test too.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from support.bn_ref import ref_backward, ref_eval, ref_forward

import cupysyncbn as sbn
from cupysyncbn import functional as F

FORMATS = ("NC", "NCL", "NCHW", "NCDHW", "NLC", "NHWC", "NDHWC")
DTYPES = (np.float16, np.float32, np.float64)
EPS = 1e-5
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
# magnitude of the values and of the per-channel offsets, per dtype
BOUND = {np.float16: (100.0, 100.0), np.float32: (1e4, 1e4), np.float64: (1e6, 1e8)}


def _shape(fmt, n, c, spatial):
    return (n, *spatial, c) if fmt.endswith("C") else (n, c, *spatial)


def _caxis(fmt):
    return len(fmt) - 1 if fmt.endswith("C") else 1


def _layout(x, how):
    """The same values as a non-contiguous view (or x itself)."""
    if how == "contiguous" or x.ndim < 2:
        return x
    if how == "fortran":
        return np.asfortranarray(x)
    if how == "strided":
        big = np.zeros((x.shape[0] * 2, *x.shape[1:]), x.dtype)
        big[::2] = x
        return big[::2]
    rev = np.ascontiguousarray(x[..., ::-1])  # "reversed": negative strides
    return rev[..., ::-1]


@st.composite
def batches(draw, min_n=0, min_spatial=0):
    fmt = draw(st.sampled_from(FORMATS))
    dtype = draw(st.sampled_from(DTYPES))
    c = draw(st.integers(1, 4))
    n = draw(st.integers(min_n, 5))
    spatial = tuple(draw(st.lists(st.integers(min_spatial, 3), min_size=len(fmt) - 2,
                                  max_size=len(fmt) - 2)))
    if n * int(np.prod(spatial)) == 1:
        n = 2  # a global count of 1 in training raises (SPEC §2, tests/nn/test_errors.py)
    shape = _shape(fmt, n, c, spatial)
    vb, ob = BOUND[dtype]
    size = int(np.prod(shape))
    vals = draw(st.lists(st.floats(-vb, vb, allow_nan=False, width=32), min_size=size,
                         max_size=size))
    offsets = draw(st.lists(st.floats(-ob, ob, allow_nan=False, width=32), min_size=c,
                            max_size=c))
    base = np.asarray(vals, np.float64).reshape(shape)
    off = np.asarray(offsets, np.float64).reshape(
        [c if i == _caxis(fmt) else 1 for i in range(len(shape))]
    )
    x = (base + off).astype(dtype)
    layout = draw(st.sampled_from(("contiguous", "fortran", "strided", "reversed")))
    return fmt, c, x, _layout(x, layout)


def _reference(x, fmt):
    """float64 global-batch batch norm (weight 1, bias 0) of the rounded values."""
    ax = _caxis(fmt)
    red = tuple(i for i in range(x.ndim) if i != ax)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=red, keepdims=True)
    var = ((x64 - mean) ** 2).mean(axis=red, keepdims=True)
    return (x64 - mean) / np.sqrt(var + EPS), mean.reshape(-1), var.reshape(-1)


@SETTINGS
@given(batches(), st.integers(0, 2**32 - 1))
def test_valid_input_finite_and_close_to_reference(case, seed):
    fmt, c, x, view = case
    layer = sbn.SyncBatchNorm(c, epsilon=EPS, data_format=fmt)
    assert layer.comm.size == 1
    y = layer(view)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert np.isfinite(y).all()
    assert np.isfinite(layer._mean).all() and np.isfinite(layer._variance).all()
    dy = _random_dy(x, seed)
    dx = layer.backward(dy)
    assert dx.shape == x.shape and dx.dtype == x.dtype and np.isfinite(dx).all()
    assert np.isfinite(layer.weight.grad).all() and np.isfinite(layer.bias.grad).all()
    if x.size == 0:
        # empty global batch: running statistics untouched, zero gradients
        np.testing.assert_array_equal(layer._mean, np.zeros(c, np.float32))
        np.testing.assert_array_equal(layer._variance, np.ones(c, np.float32))
        np.testing.assert_array_equal(layer.weight.grad, np.zeros(c, np.float32))
        return
    ref, mean, var = _reference(x, fmt)
    # error budget: rounding of the mean in the compute dtype, relative to the std
    unit = {np.float16: 1e-3, np.float32: 1e-6, np.float64: 1e-15}[x.dtype.type]
    compute = 1e-15 if x.dtype == np.float64 else 1e-6
    cond = 1 + np.abs(mean) / np.sqrt(var + EPS)
    shape = [c if i == _caxis(fmt) else 1 for i in range(x.ndim)]
    tol = (2 * compute * cond + 2 * unit).reshape(shape) * (1 + np.abs(ref))
    err = np.abs(y.astype(np.float64) - ref)
    assert (err <= tol).all(), (float(err.max()), float(tol.min()))
    _check_backward(x, dy, fmt, None, dx, layer.weight.grad, layer.bias.grad, mean, var)


def _random_dy(x, seed):
    """A random upstream gradient in [-1, 1] of ``x``'s shape and dtype."""
    return np.random.default_rng(seed).uniform(-1, 1, x.shape).astype(x.dtype)


def _units(dtype):
    """(rounding unit of values of ``dtype``, of its compute dtype)."""
    unit = {np.float16: 1e-3, np.float32: 1e-6, np.float64: 1e-15}[np.dtype(dtype).type]
    return unit, (1e-15 if np.dtype(dtype) == np.float64 else 1e-6)


def _check_backward(x, dy, fmt, w, dx, dw, db, mean, var):
    """``dx`` and the parameter gradients against the float64 reference.

    Budget: the statistics' rounding, amplified by the channel's conditioning
    (mean over std, as in the forward) and by the sums over ``m`` values,
    relative to the scale of each term (``|w| * invstd * max|dy|`` for dx,
    ``sum|dy|`` for the parameter gradients), plus the output's rounding.
    """
    c = mean.shape[0]
    ax = _caxis(fmt)
    red = tuple(i for i in range(x.ndim) if i != ax)
    rdx, rdw, rdb = ref_backward(x, dy, fmt, weight=w, eps=EPS)
    unit, compute = _units(x.dtype)
    m = x.size // c
    cond = 1 + np.abs(mean) / np.sqrt(var + EPS)
    wabs = np.ones(c) if w is None else np.abs(np.asarray(w, np.float64))
    scale = wabs / np.sqrt(var + EPS) * np.abs(dy.astype(np.float64)).max(axis=red)
    # (dx is stored in x's dtype: nothing below its smallest subnormal survives)
    tiny = float(np.finfo(x.dtype).smallest_subnormal)
    tol = (8 * compute * cond * np.sqrt(m) + 4 * unit) * scale + tiny
    err = np.abs(dx.astype(np.float64) - rdx).max(axis=red)
    assert (err <= tol).all(), ("dx", err.max(), tol.min())
    gsum = np.abs(dy.astype(np.float64)).sum(axis=red) + 1e-300
    # parameter gradients are stored in the layer's dtype (float32 here)
    gtol = (8 * compute * cond * np.sqrt(m) + 4 * unit + 2e-7) * gsum
    for name, got, ref in (("dweight", dw, rdw), ("dbias", db, rdb)):
        g = np.abs(np.asarray(got, np.float64) - ref)
        assert (g <= gtol).all(), (name, g.max(), gtol.min())


@SETTINGS
@given(batches(min_n=1, min_spatial=1), st.data())
def test_valid_input_functional_api(case, data):
    fmt, c, x, view = case
    w = data.draw(st.lists(st.floats(-3, 3, width=32), min_size=c, max_size=c))
    b = data.draw(st.lists(st.floats(-3, 3, width=32), min_size=c, max_size=c))
    seed = data.draw(st.integers(0, 2**32 - 1))
    w, b = np.asarray(w, np.float32), np.asarray(b, np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    res = F.batch_norm_forward(view, w, b, rm, rv, data_format=fmt, epsilon=EPS)
    assert np.isfinite(res.y).all() and res.y.dtype == x.dtype
    # nothing the caller passed was mutated
    assert (rm == 0).all() and (rv == 1).all()
    ref, mean, var, _ = ref_forward(x, fmt, w.astype(np.float64), b.astype(np.float64), EPS)
    unit, compute = _units(x.dtype)
    cond = (1 + np.abs(mean) / np.sqrt(var + EPS)) * (1 + np.abs(w))
    shape = [c if i == _caxis(fmt) else 1 for i in range(x.ndim)]
    tol = (2 * compute * cond + 2 * unit).reshape(shape) * (1 + np.abs(ref))
    assert (np.abs(res.y.astype(np.float64) - ref) <= tol).all()
    dy = _random_dy(x, seed)
    dx, dw, db = F.batch_norm_backward(dy, res.ctx)
    assert np.isfinite(dx).all() and np.isfinite(dw).all() and np.isfinite(db).all()
    _check_backward(x, dy, fmt, w, dx, dw, db, mean, var)
    # eval mode with the new running statistics, against the float64 reference
    ev = F.batch_norm_forward(view, w, b, res.running_mean, res.running_var,
                              training=False, data_format=fmt, epsilon=EPS)
    assert np.isfinite(ev.y).all()
    rm64, rv64 = (np.asarray(v, np.float64) for v in (res.running_mean, res.running_var))
    eref = ref_eval(x, fmt, rm64, rv64, w.astype(np.float64), b.astype(np.float64), EPS)
    econd = (1 + np.abs(rm64) / np.sqrt(rv64 + EPS)) * (1 + np.abs(w))
    etol = (2 * compute * econd + 2 * unit).reshape(shape) * (1 + np.abs(eref))
    assert (np.abs(ev.y.astype(np.float64) - eref) <= etol).all()


@SETTINGS
@given(batches(min_n=1, min_spatial=1), st.data())
def test_nonfinite_values_stay_in_their_channel(case, data):
    fmt, c, x, _ = case
    assume(c >= 2)
    k = data.draw(st.integers(0, c - 1))
    bad_value = data.draw(st.sampled_from((np.nan, np.inf, -np.inf)))
    ax = _caxis(fmt)
    xk = np.moveaxis(x.copy(), ax, 0)
    flat = xk[k].reshape(-1)
    idx = data.draw(st.lists(st.integers(0, flat.size - 1), min_size=1, max_size=3))
    flat[idx] = bad_value
    xk[k] = flat.reshape(xk[k].shape)
    x_bad = np.moveaxis(xk, 0, ax)

    clean = sbn.SyncBatchNorm(c, data_format=fmt)
    dirty = sbn.SyncBatchNorm(c, data_format=fmt)
    y_clean, y_bad = clean(x), dirty(x_bad)  # must not raise, even under -W error
    others = [i for i in range(c) if i != k]
    take = lambda a: np.take(a, others, axis=ax)  # noqa: E731
    np.testing.assert_array_equal(take(y_bad), take(y_clean))
    np.testing.assert_array_equal(dirty._mean[others], clean._mean[others])
    np.testing.assert_array_equal(dirty._variance[others], clean._variance[others])
    assert not np.isfinite(dirty._mean[k])  # the bad channel shows it
    g_clean = clean.backward(np.ones_like(y_clean))
    g_bad = dirty.backward(np.ones_like(y_bad))
    np.testing.assert_array_equal(take(g_bad), take(g_clean))
    np.testing.assert_array_equal(dirty.weight.grad[others], clean.weight.grad[others])
    # a clean batch afterwards is normalized correctly again in every channel
    # (the non-finite mean is not reused as the merge shift)
    y2 = dirty(x)
    np.testing.assert_array_equal(take(y2), take(clean(x)))
    assert np.isfinite(y2).all()


BAD_DTYPES = (np.int8, np.int32, np.int64, np.uint8, np.bool_, np.complex64, np.complex128)


def _state(layer):
    return [np.array(v, copy=True) for v in layer.state_dict().values()]


@SETTINGS
@given(batches(min_n=1), st.data())
def test_invalid_input_names_argument_and_changes_nothing(case, data):
    fmt, c, x, _ = case
    layer = sbn.SyncBatchNorm(c, data_format=fmt)
    layer(x)  # one good step, so there is state to protect
    before = _state(layer)
    kind = data.draw(st.sampled_from(("channels", "ndim", "dtype", "not-array", "scalar")))
    if kind == "channels":
        c2 = data.draw(st.integers(1, 6).filter(lambda v: v != c))
        shape = list(x.shape)
        shape[_caxis(fmt)] = c2
        bad, etype, pattern = np.zeros(shape, x.dtype), ValueError, r"x has \d+ channels"
    elif kind == "ndim":
        nd = data.draw(st.sampled_from((0, 1, 6)))  # every name takes 2-5 dimensions
        bad, etype, pattern = np.zeros((2,) * nd, x.dtype), ValueError, "x must have"
    elif kind == "dtype":
        dt = data.draw(st.sampled_from(BAD_DTYPES))
        bad, etype, pattern = x.astype(dt), TypeError, "x must have a floating dtype"
    elif kind == "not-array":
        bad = data.draw(st.sampled_from((None, "x", [1.0, 2.0], {"a": 1})))
        etype, pattern = TypeError, "x must be"
    else:
        bad, etype, pattern = 1.5, TypeError, "x must be"
    with pytest.raises(etype, match=pattern):
        layer(bad)
    for a, b in zip(before, _state(layer)):
        np.testing.assert_array_equal(a, b)


@SETTINGS
@given(batches(min_n=1, min_spatial=1), st.data())
def test_invalid_dy_names_argument(case, data):
    fmt, c, x, _ = case
    layer = sbn.SyncBatchNorm(c, data_format=fmt)
    y = layer(x)
    kind = data.draw(st.sampled_from(("shape", "dtype", "not-array")))
    if kind == "shape":
        dy, etype = np.ones((y.shape[0] + 1, *y.shape[1:]), y.dtype), ValueError
    elif kind == "dtype":
        other = np.float64 if y.dtype != np.float64 else np.float32
        dy, etype = np.ones(y.shape, other), ValueError
    else:
        dy, etype = y.tolist(), TypeError
    with pytest.raises(etype, match="dy must"):
        layer.backward(dy)
    assert layer.weight.grad is None  # nothing accumulated


@SETTINGS
@given(
    st.one_of(st.integers(-3, 0), st.floats(0.5, 3), st.just(True), st.text(max_size=3)),
)
def test_bad_num_features_named(nf):
    with pytest.raises((TypeError, ValueError), match="num_features"):
        sbn.SyncBatchNorm(nf)


@SETTINGS
@given(st.text(max_size=6).filter(
    lambda s: s.upper() not in FORMATS + ("NCW", "NWC")))
def test_bad_data_format_named(fmt):
    with pytest.raises(ValueError, match="data_format"):
        sbn.SyncBatchNorm(2, data_format=fmt)


@SETTINGS
@given(st.one_of(st.floats(-10, -1e-9), st.floats(1.0001, 10), st.just(float("nan"))))
def test_bad_momentum_named(m):
    with pytest.raises(ValueError, match="momentum"):
        sbn.SyncBatchNorm(2, momentum=m)


@SETTINGS
@given(st.one_of(st.floats(max_value=-1e-12), st.just(float("nan"))))
def test_bad_epsilon_named(e):
    with pytest.raises(ValueError, match="epsilon"):
        sbn.SyncBatchNorm(2, epsilon=e)


def test_backward_before_forward_named():
    with pytest.raises(ValueError, match="before forward"):
        sbn.SyncBatchNorm(2).backward(np.ones((2, 2), np.float32))
