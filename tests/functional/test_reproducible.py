"""reproducible=True on one process: accuracy, the API surface and its bad inputs (issue #21).

Multi-rank bit-identity is tests/_sync/test_reproducible_mpi.py; since every
split gives the one-process bits, accuracy is checked here on one process
against exact references: ``fractions.Fraction`` statistics of the global
batch and an extended-precision (``np.longdouble``) normalization from them.
"""

import copy
import pickle
from fractions import Fraction

import numpy as np
import pytest
from support import bn_ref

import cupysyncbn as sbn
from cupysyncbn import functional as F
from cupysyncbn._sync import exact
from cupysyncbn._sync.state import SyncState
from cupysyncbn.backends.base import Backend
from cupysyncbn.comm.base import NoCommunicator
from cupysyncbn.errors import CollectiveMismatchError, RemoteInputError

LOCAL = NoCommunicator()
SCALES = np.array([1.0, 1e-3, 30.0])[None, :, None]


def _exact_stats(x):
    means, vars_ = [], []
    for c in range(x.shape[1]):
        vals = [Fraction(float(v)) for v in x[:, c].ravel()]
        m = sum(vals) / len(vals)
        means.append(m)
        vars_.append(sum((v - m) ** 2 for v in vals) / len(vals))
    return means, vars_


def _errors(res, x, dy, means, vars_, w):
    """(max mean error / std, max var relative error, max |y - y_ref|, max |dx - dx_ref|)."""
    em = max(abs(Fraction(float(res.batch_mean[c])) - m) / Fraction(float(v)) ** 0.5
             for c, (m, v) in enumerate(zip(means, vars_)))
    ev = max(abs(Fraction(float(res.batch_var[c])) - v) / v for c, v in enumerate(vars_))
    ml = np.array([float(m) for m in means], np.longdouble)[None, :, None]
    # the long-double reference carries the exact variance's rounding only
    vl = np.array([float(v) for v in vars_], np.longdouble)[None, :, None]
    xl = x.astype(np.longdouble)
    inv = 1 / np.sqrt(vl + np.longdouble(1e-5))
    xhat = (xl - ml) * inv
    y_ref = xhat * np.asarray(w, np.longdouble)[None, :, None]
    dyl = dy.astype(np.longdouble)
    n = x.shape[0] * x.shape[2]
    g1 = dyl.sum(axis=(0, 2), keepdims=True) / n
    g2 = (dyl * xhat).sum(axis=(0, 2), keepdims=True) / n
    dx_ref = np.asarray(w, np.longdouble)[None, :, None] * inv * (dyl - g1 - xhat * g2)
    dx, _, _ = F.batch_norm_backward(dy, res.ctx)
    ey = float(np.abs(res.y.astype(np.longdouble) - y_ref).max())
    edx = float(np.abs(dx.astype(np.longdouble) - dx_ref).max() / np.abs(dx_ref).max())
    return float(em), float(ev), ey, edx


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_at_least_as_accurate_as_the_default_mode_including_a_jumping_mean(rng, dtype):
    w = np.array([1.5, -0.5, 2.0], dtype)
    state = SyncState()  # the default mode's shift follows the batch means
    eps = np.finfo(dtype).eps
    seen = []
    for offset in (0.0, 1e4, 1e4 + 3.0, -2e5, 5.0):  # in standard deviations
        x = ((rng.standard_normal((23, 3, 5)) + offset) * SCALES).astype(dtype)
        dy = rng.standard_normal(x.shape).astype(dtype)
        means, vars_ = _exact_stats(x)
        kw = dict(data_format="NCL", comm=LOCAL)
        rep = _errors(F.batch_norm_forward(x, w, **kw, reproducible=True), x, dy, means,
                      vars_, w)
        dft = _errors(F.batch_norm_forward(x, w, **kw, sync_state=state), x, dy, means,
                      vars_, w)
        seen.append((offset, rep, dft))
        floors = (2.0**-52, 2.0**-50, 4 * eps * 4, 4 * eps * 4)  # stats in float64
        for what, r, d, floor in zip(("mean", "var", "y", "dx"), rep, dft, floors):
            assert r <= max(1.25 * d, floor), (offset, what, r, d, seen)
    # the jumps are far enough to cost the default mode something: not vacuous
    assert max(d[1] for _, _, d in seen) > 2.0**-52


@pytest.mark.parametrize("fmt,shape", [("NCHW", (4, 3, 2, 5)), ("NHWC", (4, 2, 5, 3)),
                                       ("NC", (9, 3))])
def test_eval_outputs_use_the_running_statistics_and_match_the_reference(rng, fmt, shape):
    layer = sbn.SyncBatchNorm(3, data_format=fmt, comm=LOCAL, reproducible=True,
                              dtype="float64")
    layer(rng.standard_normal(shape) + 3.0)
    layer.eval()
    x = rng.standard_normal(shape)
    ref = bn_ref.ref_eval(x, fmt, layer._mean, layer._variance)
    np.testing.assert_allclose(layer(x), ref, rtol=0, atol=1e-13)


def test_numpy_and_numba_give_the_same_bits(rng, monkeypatch):
    x = (rng.standard_normal((6, 3, 7)) * 5 + 100).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    out = {}
    for name in ("numpy", "numba"):
        monkeypatch.setenv("CUPYSYNCBN_CPU_BACKEND", name)
        layer = sbn.SyncBatchNorm(3, data_format="NCL", comm=LOCAL, reproducible=True)
        y = layer(x)
        out[name] = (y, layer.backward(dy), layer.weight.grad, layer._variance)
    for a, b in zip(out["numpy"], out["numba"]):
        assert a.tobytes() == b.tobytes()


def test_setting_env_default_repr_copies_and_bad_values(monkeypatch):
    monkeypatch.delenv("CUPYSYNCBN_REPRODUCIBLE", raising=False)
    assert not sbn.SyncBatchNorm(2).reproducible
    monkeypatch.setenv("CUPYSYNCBN_REPRODUCIBLE", "1")
    layer = sbn.BatchNorm2D(2)
    assert layer.reproducible and "reproducible=True" in repr(layer)
    assert not sbn.BatchNorm1D(2, reproducible=False).reproducible
    assert copy.deepcopy(layer).reproducible and pickle.loads(pickle.dumps(layer)).reproducible
    assert copy.deepcopy(layer)._sync_state.reproducible
    monkeypatch.setenv("CUPYSYNCBN_REPRODUCIBLE", "maybe")
    with pytest.raises(ValueError, match="CUPYSYNCBN_REPRODUCIBLE"):
        sbn.SyncBatchNorm(2)
    monkeypatch.delenv("CUPYSYNCBN_REPRODUCIBLE")
    for bad in (1, "yes", 0.0):
        with pytest.raises(TypeError, match="reproducible must be a bool"):
            sbn.SyncBatchNorm(2, reproducible=bad)
        with pytest.raises(TypeError, match="reproducible must be a bool"):
            F.batch_norm_forward(np.ones((2, 2), np.float32), data_format="NC", comm=LOCAL,
                                 reproducible=bad)
    converted = sbn.SyncBatchNorm.convert_sync_batchnorm(
        sbn.BatchNorm1D(2, reproducible=True), comm=LOCAL)
    assert converted.reproducible
    # a state keeps the mode of its first synchronized pass
    group = bn_ref.ThreadGroup(2, timeout=10)

    def fn(r, comm):
        st = SyncState()
        F.batch_norm_forward(np.ones((2, 2)) * r, data_format="NC", comm=comm, sync_state=st,
                             reproducible=True)
        with pytest.raises(ValueError, match="the mode is fixed"):
            F.batch_norm_forward(np.ones((2, 2)), data_format="NC", comm=comm, sync_state=st,
                                 reproducible=False)
        return st.reproducible

    assert group.run(fn) == [True, True]


def test_a_backend_without_the_primitives_raises_not_implemented():
    class NoExact(Backend):
        name = "cupy"

    with pytest.raises(NotImplementedError, match="reproducible=True is not available on the"):
        exact.ops_of(NoExact())  # CuPy has them: tests/backends/test_exact_cupy_layer.py


def test_ranks_that_disagree_on_the_mode_or_precision_raise_together():
    group = bn_ref.ThreadGroup(2, timeout=10)

    def mode(r, comm):
        layer = sbn.SyncBatchNorm(2, data_format="NC", comm=comm, reproducible=r == 0)
        with pytest.raises(CollectiveMismatchError, match="different layers"):
            layer(np.ones((3, 2), np.float32) * np.arange(3)[:, None])
        return True

    assert group.run(mode) == [True, True]

    def precision(r, comm):
        layer = sbn.SyncBatchNorm(2, data_format="NC", comm=comm, reproducible=True)
        layer(np.arange(6.0, dtype=np.float32).reshape(3, 2))
        x = np.arange(6.0).reshape(3, 2).astype(np.float64 if r else np.float32)
        with pytest.raises(CollectiveMismatchError, match="different precisions"):
            layer(x)
        return True

    assert group.run(precision) == [True, True]

    def bad_input(r, comm):
        layer = sbn.SyncBatchNorm(2, data_format="NC", comm=comm, reproducible=True)
        layer(np.arange(6.0, dtype=np.float32).reshape(3, 2))
        layer.backward(np.ones((3, 2), np.float32))
        x = np.ones((3, 5 if r else 2), np.float32)
        with pytest.raises(ValueError if r else RemoteInputError):
            layer(x)
        dy_bad = np.ones((4, 2), np.float32) if r else np.ones((3, 2), np.float32)
        layer(np.ones((3, 2), np.float32) * np.arange(3, dtype=np.float32)[:, None])
        with pytest.raises(ValueError if r else RemoteInputError):
            layer.backward(dy_bad)
        return True

    assert group.run(bad_input) == [True, True]


def test_allreduce_gradients_uses_the_exact_sum_only_while_every_rank_holds_it(rng):
    x = rng.standard_normal((7, 3)) * 1e3
    dy = rng.standard_normal((7, 3))
    one = sbn.SyncBatchNorm(3, data_format="NC", comm=LOCAL, reproducible=True, dtype="float64")
    one(x)
    one.backward(dy)
    one(x + 1)
    one.backward(dy * 2)
    group = bn_ref.ThreadGroup(3, timeout=10)
    cuts = [0, 2, 2, 7]

    def fn(r, comm, replace):
        layer = sbn.SyncBatchNorm(3, data_format="NC", comm=comm, reproducible=True,
                                  dtype="float64")
        for xs, ds in ((x, dy), (x + 1, dy * 2)):
            layer(xs[cuts[r]:cuts[r + 1]])
            layer.backward(ds[cuts[r]:cuts[r + 1]])
        if replace and r == 1:
            layer.weight.grad = layer.weight.grad.copy()  # a grad the layer did not write
        sbn.allreduce_gradients(layer, comm=comm, average=False)
        return layer.weight.grad, layer.bias.grad

    exact_out = group.run(lambda r, c: fn(r, c, False))
    for gw, gb in exact_out:
        assert gw.tobytes() == one.weight.grad.tobytes() and gb.tobytes() == one.bias.grad.tobytes()
    plain = group.run(lambda r, c: fn(r, c, True))
    # weight: the plain sum on every rank alike (close, not necessarily the same bits)
    assert len({gw.tobytes() for gw, _ in plain}) == 1
    np.testing.assert_allclose(plain[0][0], one.weight.grad, rtol=1e-12)
    assert all(gb.tobytes() == one.bias.grad.tobytes() for _, gb in plain)


def test_collective_budget_two_all_reduces_per_pass_of_c_sized_buffers(rng):
    from cupysyncbn._sync import protocol

    class Counting(NoCommunicator):
        force_collectives = True

        def __init__(self):
            self.calls = []

        def allreduce_sum(self, buf):
            self.calls.append(("sum", int(buf.size)))
            return buf

        def allreduce_max(self, buf):
            self.calls.append(("max", int(buf.size)))
            return buf

    c, h = 5, protocol.HEADER
    comm = Counting()
    x = rng.standard_normal((4, c, 3)).astype(np.float32)
    # the bound pass: header, 3 vectors of exponents, 2 tags; the forward's
    # folds: 5 per-sample quantities x 3 folds; the backward's: 2 x 3
    bound = ("max", 2 * h + 3 * c + 4)
    fwd, bwd = ("sum", h + 5 * 3 * c), ("sum", h + 2 * 3 * c)
    bn = sbn.SyncBatchNorm(c, data_format="NCL", comm=comm, reproducible=True)
    bn(x)
    assert comm.calls == [("sum", h), bound, fwd]  # handshake, bound pass, fold sums
    for _ in range(2):
        comm.calls.clear()
        bn(x)
        bn.backward(x)
        assert comm.calls == [bound, fwd, bound, bwd]
    comm.calls.clear()
    bn.eval()
    bn(x)
    bn.backward(x)
    assert comm.calls == []
    b64 = sbn.SyncBatchNorm(c, data_format="NCL", comm=comm, reproducible=True, dtype="float64")
    comm.calls.clear()
    b64(x)
    assert comm.calls[-1] == ("sum", h + 5 * 5 * c)  # 5 folds in float64
    # data a square could overflow: the per-element path, one more bound pass
    comm.calls.clear()
    b64(x.astype(np.float64) * 1e200)
    assert comm.calls == [bound, bound, ("sum", h + 2 * 5 * c)]


def test_cupy_arrays_run_the_reproducible_passes_not_the_fused_default_math():
    """On CuPy arrays the exact kernels run (kernels/exact.cu), never the fused
    default path (its bits: tests/backends/test_exact_cupy_layer.py)."""
    from support import cuda_emu, recording_cupy

    class Counting(NoCommunicator):
        force_collectives = True
        calls = 0

        def allreduce_sum(self, buf):
            Counting.calls += 1
            return buf

        allreduce_max = allreduce_sum

    try:
        with recording_cupy.installed() as cp:
            layer = sbn.SyncBatchNorm(3, data_format="NCL", comm=Counting(), reproducible=True)
            layer.to("cuda")
            x = cp.asarray(np.ones((4, 3, 2), np.float32) + np.arange(3)[:, None])
            layer(x)
            Counting.calls = 0
            recording_cupy.REC.clear()
            layer(x)
            names = {k[0].split("<")[0] for k in recording_cupy.REC.kernels}
            F.batch_norm_forward(x, data_format="NCL", comm=LOCAL, reproducible=True)
    except cuda_emu.Unavailable as e:  # pragma: no cover - no g++ for the stand-in
        pytest.skip(str(e))
    assert {"bn_exact_sample_cf", "bn_normalize"} <= names, names
    assert not any(n.startswith(("bn_fwd_", "bn_stats_")) for n in names), names
    assert Counting.calls == 2  # the MAX pass and the SUM pass


@pytest.mark.parametrize("scale", [1e200, 1e-200, 1e-310])
def test_data_near_float64_limits_finite_normalized_and_split_independent(rng, scale):
    x = (rng.standard_normal((6, 2, 3)) + 3) * scale
    dy = rng.standard_normal(x.shape)

    def run(cuts):
        def fn(r, comm):
            res = F.batch_norm_forward(x[cuts[r]:cuts[r + 1]], data_format="NCL", comm=comm,
                                       epsilon=0.0, reproducible=True)
            dx, _, _ = F.batch_norm_backward(dy[cuts[r]:cuts[r + 1]], res.ctx)
            return res.y, dx
        out = bn_ref.ThreadGroup(len(cuts) - 1, timeout=10).run(fn)
        return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])

    y1, dx1 = run([0, 6])
    y3, dx3 = run([0, 1, 1, 6])
    assert y1.tobytes() == y3.tobytes() and dx1.tobytes() == dx3.tobytes()
    assert np.isfinite(y1).all() and np.isfinite(dx1).all()
    ref_y = bn_ref.ref_forward(x / scale, "NCL", eps=0.0)[0]
    np.testing.assert_allclose(y1, ref_y, rtol=0, atol=1e-9)


def test_ranks_with_samples_of_different_sizes_take_the_per_element_path_together(rng):
    # no one-process equivalent exists (one array holds samples of one size);
    # the per-sample identity needs one size, so every rank sees the mismatch
    # in the bound pass and sums per element: exact statistics, no hang
    xs = [rng.standard_normal((2, 3, 4)) * 5 + 9, rng.standard_normal((3, 3, 7)) * 5 + 9]
    calls = []

    def fn(r, comm):
        inner = comm.allreduce_max

        def counted(buf):
            calls.append(r)
            return inner(buf)

        comm.allreduce_max = counted
        res = F.batch_norm_forward(xs[r], data_format="NCL", comm=comm, reproducible=True)
        return res.batch_mean, res.batch_var

    out = bn_ref.ThreadGroup(2, timeout=10).run(fn)
    assert calls.count(0) == calls.count(1) == 2  # the bound pass, then the data's bound
    flat = np.concatenate([x.transpose(1, 0, 2).reshape(3, -1) for x in xs], axis=1)
    for mean, var in out:
        assert mean.tobytes() == out[0][0].tobytes() and var.tobytes() == out[0][1].tobytes()
        np.testing.assert_allclose(mean, flat.mean(axis=1), rtol=1e-15)
        np.testing.assert_allclose(var, flat.var(axis=1), rtol=1e-14)
