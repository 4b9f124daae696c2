"""The reproducible mode's CUDA kernels give the NumPy reference's bits (#21).

``kernels/exact.cu`` runs in the C++ emulation of the CUDA sources through the
real ``CupyBackend`` launch code (the recording CuPy stand-in), and its
per-channel results are compared byte for byte with
:mod:`cupysyncbn.backends.exact_sums`: the bounds, the moment folds and the
backward folds, for every storage dtype, channel-first and channel-last,
uneven block splits, values spanning many binades, zeros, a non-finite
channel, and data so tiny or huge that the scaling takes two steps. The
kernels use explicitly rounded float64 intrinsics, so a GPU gives these bits
too (no fused multiply-add).
"""

import ml_dtypes
import numpy as np
import pytest
from support import cuda_emu, recording_cupy

from cupysyncbn.backends import exact_samples as xp
from cupysyncbn.backends import exact_sums as xs

DTYPES = ["float16", "bfloat16", "float32", "float64"]


@pytest.fixture(scope="module")
def cp():
    import cupysyncbn.backends.cupy.backend as cb

    try:
        with recording_cupy.installed() as mod, pytest.MonkeyPatch.context() as mp:
            mp.setattr(cb, "_THREADS", 64)  # smaller blocks: a faster emulation
            mp.setattr(cb, "_MIN_PER_THREAD", 1)  # several blocks per channel
            yield mod
    except cuda_emu.Unavailable as e:  # pragma: no cover - no g++ 12
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def backend(cp):
    from cupysyncbn.backends.cupy.backend import get_cupy_backend

    return get_cupy_backend()


def _np_dtype(name):
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def _data(rng, shape, dt, channel_last):
    """Values over many binades, a zero channel, integers and a tiny channel."""
    c = shape[-1] if channel_last else shape[1]
    x = rng.standard_normal(shape) * np.exp(rng.uniform(-6, 6, shape)) + 3.0
    idx = (slice(None),) * (len(shape) - 1) if channel_last else (slice(None),)
    x[(*idx, 0)] = 0.0  # an all-zero channel
    if c > 2:
        x[(*idx, 2)] = np.round(x[(*idx, 2)])
    return x.astype(_np_dtype(dt))


def _host(a):
    return np.asarray(a.view(np.ndarray) if isinstance(a, recording_cupy.ndarray) else a)


def _same(a, b, what):
    a, b = _host(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert a.tobytes() == b.tobytes(), (what, a, b)


def _views(x, channel_last):
    """The canonical (N, C, S) or (M, C) view, as the passes hand it over."""
    if channel_last:
        return x.reshape(-1, x.shape[-1])
    return x.reshape(x.shape[0], x.shape[1], -1)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("channel_last", [False, True], ids=["cf", "cl"])
def test_forward_bounds_and_folds_are_bitwise_the_references(cp, backend, rng, dt, channel_last):
    shape = (5, 6, 3, 7) if not channel_last else (5, 3, 7, 6)
    v = _views(_data(rng, shape, dt, channel_last), channel_last)
    c = v.shape[1]
    a_ref = xs.absmax(v, channel_last)
    a = backend.exact_absmax(cp.asarray(v), channel_last)
    _same(a, a_ref, "absmax")
    e = xs.scale_exponent(xs.bound_exponent(a_ref, c))
    k = xs.folds_for(np.float64 if dt == "float64" else np.float32)
    p1_ref, p2_ref = xs.moment_folds(v, channel_last, e, k)
    p1, p2 = backend.exact_moment_folds(cp.asarray(v), channel_last, cp.asarray(e), k)
    _same(p1, p1_ref, "P1")
    _same(p2, p2_ref, "P2")


@pytest.mark.parametrize("dt", ["float32", "float64"])
@pytest.mark.parametrize("channel_last", [False, True], ids=["cf", "cl"])
def test_extreme_scales_and_a_non_finite_channel(cp, backend, rng, dt, channel_last):
    shape = (4, 3, 9) if not channel_last else (36, 3)
    x = rng.standard_normal(shape)
    idx = (slice(None), 0) if channel_last else (slice(None), 0, slice(None))
    x[idx] *= 1e-300 if dt == "float64" else 1e-40  # subnormal range: two-step scaling
    idx1 = (slice(None), 1) if channel_last else (slice(None), 1, slice(None))
    x[idx1] *= 1e300 if dt == "float64" else 1e35
    v = x.astype(dt)
    v[(3, 2) if channel_last else (1, 2, 4)] = np.nan
    e_ref = xs.bound_exponent(xs.absmax(v, channel_last), 3)
    _same(backend.exact_absmax(cp.asarray(v), channel_last), xs.absmax(v, channel_last), "absmax")
    e = xs.scale_exponent(e_ref)
    assert e_ref[2] == xs.NONFINITE_EXP
    for k in (3, 5):
        ref = xs.moment_folds(v, channel_last, e, k)
        got = backend.exact_moment_folds(cp.asarray(v), channel_last, cp.asarray(e), k)
        # NaN payloads aside (the non-finite channel's folds are discarded), bitwise
        for g, r in zip(got, ref):
            np.testing.assert_array_equal(np.isnan(_host(g)), np.isnan(r))
            _same(np.nan_to_num(_host(g)), np.nan_to_num(r), "folds")


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("channel_last", [False, True], ids=["cf", "cl"])
def test_backward_bounds_and_folds_are_bitwise_the_references(cp, backend, rng, dt, channel_last):
    shape = (4, 5, 11) if not channel_last else (44, 5)
    x = _data(rng, shape, dt, channel_last)
    dy = (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 3, shape)).astype(x.dtype)
    mean = rng.standard_normal(5) * 3
    g_ref, h_ref = xs.backward_bounds(dy, x, channel_last, mean)
    g, h = backend.exact_backward_bounds(cp.asarray(dy), cp.asarray(x), channel_last,
                                         cp.asarray(mean))
    _same(g, g_ref, "max|g|")
    _same(h, h_ref, "max|h|")
    e_g = xs.scale_exponent(xs.bound_exponent(g_ref, 5))
    e_h = xs.scale_exponent(xs.bound_exponent(h_ref, 5))
    k = xs.folds_for(np.float64 if dt == "float64" else np.float32)
    ref = xs.backward_folds(dy, x, channel_last, mean, e_g, e_h, k)
    got = backend.exact_backward_folds(cp.asarray(dy), cp.asarray(x), channel_last,
                                       cp.asarray(mean), cp.asarray(e_g), cp.asarray(e_h), k)
    _same(got[0], ref[0], "Pg")
    _same(got[1], ref[1], "Ph")


def test_the_folds_do_not_depend_on_the_block_split(cp, backend, rng, monkeypatch):
    """Other block counts (a GPU's multiprocessor count) give the same bits."""
    import cupysyncbn.backends.cupy.backend as cb

    v = _views(_data(rng, (9, 4, 5, 5), "float32", False), False)
    e = xs.scale_exponent(xs.bound_exponent(xs.absmax(v, False), 4))
    results = []
    for sms in (1, 3, 8):
        monkeypatch.setattr(backend, "_sm_count", lambda sms=sms: sms)
        monkeypatch.setattr(cb, "_BLOCKS_PER_SM", 2)
        results.append(backend.exact_moment_folds(cp.asarray(v), False, cp.asarray(e), 3))
    for p1, p2 in results[1:]:
        _same(p1, _host(results[0][0]), "P1")
        _same(p2, _host(results[0][1]), "P2")


@pytest.mark.parametrize("dt", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("channel_last", [False, True], ids=["cf", "cl"])
def test_per_sample_kernels_give_the_reference_bits(cp, backend, rng, dt, channel_last):
    npdt = _np_dtype(dt)
    for n, c, s in ((3, 5, 25), (2, 3, 70), (4, 2, 8)):  # lanes + 8-step + tail; tiles
        x = rng.standard_normal((n, c, s)) * np.exp(rng.uniform(-5, 5, (n, c, s))) + 3
        x[:, 0] = 0.0
        x = x.astype(npdt)
        dy = rng.standard_normal((n, c, s)).astype(npdt)
        if channel_last:
            x = np.ascontiguousarray(x.transpose(0, 2, 1)).reshape(n * s, c)
            dy = np.ascontiguousarray(dy.transpose(0, 2, 1)).reshape(n * s, c)
        for cdt in ((np.float64,) if dt == "float64" else (np.float32, np.float64)):
            mean = (rng.standard_normal(c) + 3).astype(cdt)
            got = backend.exact_sample_backward(cp.asarray(dy), cp.asarray(x), channel_last,
                                                cp.asarray(mean), n)
            for a, b in zip(_host(got), xp.sample_backward(dy, x, channel_last, mean, n)):
                _same(a, b, "sample partials")
        got = backend.exact_sample_moments(cp.asarray(x), channel_last, n)
        for a, b in zip(_host(got), xp.sample_moments(x, channel_last, n)):
            _same(a, b, "sample partials")
