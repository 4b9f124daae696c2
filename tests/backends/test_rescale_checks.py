"""The per-channel decisions of issue #23 (shift redo, rescaled statistics, unit scale).

The numba backend answers the common case in one compiled call; its answers
must be the NumPy backend's (a redo decision that differed between ranks
running different backends would desynchronize their collectives). Also the
decisions themselves, on hand-made channels.
"""

import numpy as np
import pytest

from cupysyncbn.backends.channel_math import SHIFT_REDO, ChannelMath

NP = ChannelMath()
NP.xp = np
F32, F64 = np.dtype(np.float32), np.dtype(np.float64)


def _numba():
    pytest.importorskip("numba")
    from cupysyncbn.backends.numba.channel import NumbaChannelMath

    nb = NumbaChannelMath()
    nb.xp = np
    return nb


def _cases(rng):
    yield np.zeros(3), np.zeros(3)  # all-zero channels: never rescaled
    yield rng.standard_normal(5), rng.uniform(0.5, 2, 5)
    for scale in (1e-200, 1e-30, 1e-20, 1e20, 1e40, 1e150, 1e300):
        mean = rng.standard_normal(4) * scale
        with np.errstate(over="ignore"):  # 1e300 squared: an infinite variance
            var = (rng.uniform(0.5, 2, 4) * scale) ** 2
        yield mean, var
    yield np.array([1.0, np.nan, 2.0]), np.array([1.0, 1.0, np.inf])
    yield np.array([1e-320, 3.0]), np.array([0.0, 1.0])  # a tiny channel beside a normal one
    yield np.array([0.1, 5.0]), np.array([0.0, 0.0])  # constant channels


def test_numba_decisions_equal_numpy(rng):
    nb = _numba()
    for mean, var in _cases(rng):
        for shift in (mean, mean + np.sqrt(var) * 3, mean + np.sqrt(var) * 5, np.zeros_like(mean)):
            assert nb.shift_too_far(mean, var, shift) == NP.shift_too_far(mean, var, shift)
        for cdt in (F32, F64):
            a, b = nb.stats_scale(mean, var, cdt), NP.stats_scale(mean, var, cdt)
            assert (a is None) == (b is None) and (a is None or np.array_equal(a, b))
            for eps in (0.0, 1e-5):
                for count in (2, 10**6):
                    a = nb.data_unit(mean, var, None, count, eps, cdt)
                    b = NP.data_unit(mean, var, None, count, eps, cdt)
                    assert (a is None) == (b is None), (mean, var, cdt, eps)
                    assert a is None or np.array_equal(a, b)


def test_shift_too_far_threshold():
    var = np.array([4.0])
    edge = np.sqrt(SHIFT_REDO) * 2.0
    assert not NP.shift_too_far(np.array([10.0]), var, np.array([10.0 - edge * 0.99]))
    assert NP.shift_too_far(np.array([10.0]), var, np.array([10.0 - edge * 1.01]))
    # within the mean's own rounding: no redo even for a zero variance
    assert not NP.shift_too_far(np.array([1e8]), np.array([0.0]), np.array([1e8 * (1 + 1e-16)]))
    assert not NP.shift_too_far(np.array([np.nan]), var, np.array([0.0]))


def test_stats_scale_and_unit_values():
    p = NP.stats_scale(np.array([np.inf, 1e-300, 0.0, 1.0]), np.array([1.0, 0.0, 0.0, 1.0]), F64)
    assert p.tolist() == [2.0**-560, 2.0**600, 1.0, 1.0]
    assert NP.stats_scale(np.array([0.0, 1.0]), np.array([0.0, 1.0]), F64) is None
    # std 2^70 in float32 is outside [2^-60, 2^60]: a unit near 1/std
    u = NP.data_unit(np.zeros(2), np.array([2.0**140, 1.0]), None, 4, 0.0, F32)
    assert u.tolist() == [2.0**-70, 1.0]
    assert NP.data_unit(np.zeros(2), np.array([2.0**140, 1.0]), None, 4, 0.0, F64) is None
    # statistics of x * 2^-560 with std 2^-20 there: std 2^540, unit 2^-540
    u = NP.data_unit(np.zeros(1), np.array([2.0**-40]), np.array([2.0**-560]), 4, 1e-5, F64)
    assert u.tolist() == [2.0**-540]
    # var + eps == 0 (constant channel, eps=0): left alone
    assert NP.data_unit(np.zeros(1), np.zeros(1), None, 4, 0.0, F32) is None
