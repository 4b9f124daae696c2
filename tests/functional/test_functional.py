"""The functional API: pure functions of arrays, exact with or without SyncState.

Multi-rank behaviour is checked in-process with :class:`bn_ref.ThreadGroup`
(ranks as threads, a rank-ordered sum as the all-reduce), and against torch's
``functional.batch_norm`` with autograd.
"""

import numpy as np
import pytest
from support import bn_ref

import cupysyncbn as sbn
from cupysyncbn import functional as F
from cupysyncbn.comm.base import NoCommunicator

LOCAL = NoCommunicator()


def _x(rng, shape, dtype=np.float64, offset=0.5):
    return (rng.standard_normal(shape) * 2 + offset).astype(dtype)


def _params(rng, c, dtype=np.float64):
    return (rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype),
            rng.standard_normal(c).astype(dtype), rng.random(c).astype(dtype) + 0.5)


def test_pure_inputs_not_mutated(rng):
    x, dy = _x(rng, (4, 3, 5)), _x(rng, (4, 3, 5))
    w, b, rm, rv = _params(rng, 3)
    saved = [a.copy() for a in (x, dy, w, b, rm, rv)]
    res = F.batch_norm_forward(x, w, b, rm, rv, training=True, momentum=0.8,
                               data_format="NCL", comm=LOCAL)
    dx, dw, db = F.batch_norm_backward(dy, res.ctx)
    for a, s in zip((x, dy, w, b, rm, rv), saved):
        assert np.array_equal(a, s)
    assert res.updated and res.running_mean is not rm and res.running_var is not rv
    assert not np.shares_memory(res.running_mean, rm)
    yr, mean, var, m = bn_ref.ref_forward(x, "NCL", w, b)
    nrm, nrv = bn_ref.ref_running(rm, rv, mean, var, m, 0.8)
    np.testing.assert_allclose(res.y, yr, atol=1e-12)
    np.testing.assert_allclose(res.running_mean, nrm, atol=1e-14)
    np.testing.assert_allclose(res.running_var, nrv, atol=1e-14)
    np.testing.assert_allclose(res.batch_mean, mean, atol=1e-14)
    np.testing.assert_allclose(res.batch_var, var, atol=1e-14)
    assert res.count == m == 20
    dxr, dwr, dbr = bn_ref.ref_backward(x, dy, "NCL", w)
    np.testing.assert_allclose(dx, dxr, atol=1e-12)
    np.testing.assert_allclose(dw, dwr, atol=1e-12)
    np.testing.assert_allclose(db, dbr, atol=1e-12)
    # Calling again gives bitwise the same: no hidden state without SyncState.
    res2 = F.batch_norm_forward(x, w, b, rm, rv, training=True, momentum=0.8,
                                data_format="NCL", comm=LOCAL)
    assert np.array_equal(res.y, res2.y) and np.array_equal(res.running_var, res2.running_var)


def test_eval_mode_uses_running_stats_and_returns_them_unchanged(rng):
    x = _x(rng, (3, 4, 2, 2))
    w, b, rm, rv = _params(rng, 4)
    res = F.batch_norm_forward(x, w, b, rm, rv, training=False, comm=LOCAL)
    assert not res.updated and res.running_mean is rm and res.running_var is rv
    np.testing.assert_allclose(res.y, bn_ref.ref_eval(x, "NCHW", rm, rv, w, b), atol=1e-12)
    dy = _x(rng, x.shape)
    dx, dw, db = F.batch_norm_backward(dy, res.ctx)
    np.testing.assert_allclose(dx, dy * (w / np.sqrt(rv + 1e-5))[None, :, None, None],
                               atol=1e-12)


def test_no_params_and_no_running_stats(rng):
    x = _x(rng, (5, 3), np.float32)
    res = F.batch_norm_forward(x, data_format="NC", comm=LOCAL)
    assert res.running_mean is None and not res.updated
    np.testing.assert_allclose(res.y, bn_ref.ref_forward(x, "NC")[0], atol=2e-6)
    dx, dw, db = F.batch_norm_backward(x, res.ctx, need_param_grads=False)
    assert dw is None and db is None and dx.dtype == np.float32
    # eval request without running stats falls back to batch statistics
    res_e = F.batch_norm_forward(x, training=False, data_format="NC", comm=LOCAL)
    assert np.array_equal(res_e.y, res.y)


def test_running_stats_update():
    rm, rv = np.array([1.0, 2.0]), np.array([3.0, 4.0])
    mean, var = np.array([0.5, -1.0]), np.array([2.0, 0.5])
    nm, nv = F.running_stats_update(rm, rv, mean, var, 10, 0.9)
    np.testing.assert_allclose(nm, 0.9 * rm + 0.1 * mean)
    np.testing.assert_allclose(nv, 0.9 * rv + 0.1 * var)
    nm, nv = F.running_stats_update(rm, rv, mean, var, 10, 0.9, unbiased_running_var=True)
    np.testing.assert_allclose(nv, 0.9 * rv + 0.1 * var * 10 / 9)
    nm, nv = F.running_stats_update(rm, rv, mean, var, 10, None, num_batches_tracked=3)
    np.testing.assert_allclose(nm, 0.75 * rm + 0.25 * mean)
    assert np.array_equal(rm, [1.0, 2.0])  # pure
    nm32, _ = F.running_stats_update(rm.astype(np.float32), rv.astype(np.float32), mean, var,
                                     10, 0.9)
    assert nm32.dtype == np.float32
    with pytest.raises(ValueError, match="unbiased"):
        F.running_stats_update(rm, rv, mean, var, 1, 0.9, unbiased_running_var=True)


@pytest.mark.parametrize("fmt,shape", [("NCHW", (3, 2, 2)), ("NHWC", (2, 2, 3)),
                                       ("NC", (3,))])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_threads_with_and_without_syncstate(rng, fmt, shape, dtype, tol):
    k, n = 3, 8
    xs = [_x(rng, (n, *shape), dtype, offset=50.0) for _ in range(3)]
    dys = [_x(rng, (n, *shape), dtype) for _ in range(3)]
    w, b, rm0, rv0 = _params(rng, 3, dtype)
    group = bn_ref.ThreadGroup(k)

    def rank_fn(r, comm, state):
        rm, rv = rm0, rv0
        out = []
        for s, (x, dy) in enumerate(zip(xs, dys)):
            sl = bn_ref.local_slice(bn_ref.step_counts(n, k, s), r)
            res = F.batch_norm_forward(x[sl], w, b, rm, rv, momentum=0.9, data_format=fmt,
                                       comm=comm, sync_state=state)
            dx, dw, db = F.batch_norm_backward(dy[sl], res.ctx)
            rm, rv = res.running_mean, res.running_var
            out.append((res.y, dx, dw, db, rm, rv))
        return out

    with_state = group.run(lambda r, c: rank_fn(r, c, F.SyncState()))
    calls_state = list(group.calls)
    group.calls = [0] * k
    without = group.run(lambda r, c: rank_fn(r, c, None))
    calls_none = list(group.calls)
    # With a state: handshake + mean pass once, then one per pass (3 fwd + 3 bwd).
    assert calls_state == [2 + 3 + 3] * k
    assert calls_none == [3 * 3 + 3] * k
    rm, rv = rm0.astype(np.float64), rv0.astype(np.float64)
    for s, (x, dy) in enumerate(zip(xs, dys)):
        yr, mean, var, m = bn_ref.ref_forward(x, fmt, w, b)
        dxr, dwr, dbr = bn_ref.ref_backward(x, dy, fmt, w)
        rm, rv = bn_ref.ref_running(rm, rv, mean, var, m, 0.9)
        counts = bn_ref.step_counts(n, k, s)
        for run in (with_state, without):
            y = np.concatenate([run[r][s][0] for r in range(k)])
            dx = np.concatenate([run[r][s][1] for r in range(k)])
            assert np.abs(y - yr).max() <= tol * 10
            assert np.abs(dx - dxr).max() <= tol * 10
            assert np.abs(sum(run[r][s][2] for r in range(k)) - dwr).max() <= tol * 100
            assert np.abs(sum(run[r][s][3] for r in range(k)) - dbr).max() <= tol * 100
            for r in range(k):
                np.testing.assert_allclose(run[r][s][4], rm, rtol=tol, atol=tol * 10)
                np.testing.assert_allclose(run[r][s][5], rv, rtol=tol, atol=tol)
                # bitwise identical across ranks
                assert run[r][s][4].tobytes() == run[0][s][4].tobytes()
                assert run[r][s][5].tobytes() == run[0][s][5].tobytes()
                assert run[r][s][0].shape[0] == counts[r]
        a = np.concatenate([with_state[r][s][0] for r in range(k)])
        bb = np.concatenate([without[r][s][0] for r in range(k)])
        assert np.abs(a - bb).max() <= tol


def test_threads_layers_match_local_on_whole_batch(rng):
    # The layer API over the thread group: same as local BN on the whole batch.
    k, n = 4, 9
    x = _x(rng, (n, 3, 4), np.float32)
    dy = _x(rng, (n, 3, 4), np.float32)
    local = sbn.BatchNorm1D(3)
    yl, dxl = local(x), local.backward(dy)
    counts = bn_ref.split_counts(n, k, empty=2)

    def fn(r, comm):
        layer = sbn.SyncBatchNorm(3, data_format="NCL", comm=comm)
        sl = bn_ref.local_slice(counts, r)
        return layer(x[sl]), layer.backward(dy[sl]), layer._mean, layer._variance

    res = bn_ref.ThreadGroup(k).run(fn)
    assert np.abs(np.concatenate([o[0] for o in res]) - yl).max() <= 1e-5
    assert np.abs(np.concatenate([o[1] for o in res]) - dxl).max() <= 1e-5
    assert np.abs(res[0][2] - local._mean).max() <= 1e-6
    assert np.abs(res[3][3] - local._variance).max() <= 1e-6


def test_matches_torch_functional_with_autograd(rng):
    torch = pytest.importorskip("torch")
    x, dy = _x(rng, (4, 3, 3, 2)), _x(rng, (4, 3, 3, 2))
    w, b, rm, rv = _params(rng, 3)
    res = F.batch_norm_forward(x, w, b, rm, rv, momentum=0.9, unbiased_running_var=True,
                               comm=LOCAL)
    dx, dw, db = F.batch_norm_backward(dy, res.ctx)
    xt = torch.from_numpy(x).requires_grad_(True)
    wt = torch.from_numpy(w).requires_grad_(True)
    bt = torch.from_numpy(b).requires_grad_(True)
    rmt, rvt = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    yt = torch.nn.functional.batch_norm(xt, rmt, rvt, wt, bt, training=True, momentum=0.1,
                                        eps=1e-5)
    yt.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(res.y, yt.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), atol=1e-12)
    np.testing.assert_allclose(dw, wt.grad.numpy(), atol=1e-12)
    np.testing.assert_allclose(db, bt.grad.numpy(), atol=1e-12)
    np.testing.assert_allclose(res.running_mean, rmt.numpy(), atol=1e-14)
    np.testing.assert_allclose(res.running_var, rvt.numpy(), atol=1e-14)


def test_default_comm_is_one_process_outside_mpiexec(rng):
    x = _x(rng, (3, 2))
    res = F.batch_norm_forward(x, data_format="NC")  # comm=None: the default
    np.testing.assert_allclose(res.y, bn_ref.ref_forward(x, "NC")[0], atol=1e-12)
    assert sbn.get_default_comm().size == 1


@pytest.mark.parametrize("bad", ["dtype", "ndim"])
def test_invalid_input_without_params_does_not_hang(bad):
    # No weight/running stats: the faulty rank still joins the collectives
    # (the handshake, which needs no channel count), so its peers raise
    # RemoteInputError naming the fault instead of waiting forever.
    from cupysyncbn.errors import CollectiveMismatchError, RemoteInputError

    group = bn_ref.ThreadGroup(2, timeout=10)

    def fn(r, comm):
        x = np.ones((2, 3), np.float32)
        if r == 0:
            x = x.astype(np.int32) if bad == "dtype" else np.ones((2, 3, 1, 1, 1, 1), np.float32)
        try:
            F.batch_norm_forward(x, data_format="NC", comm=comm)
        except (TypeError, ValueError) as e:
            return e
        return None

    errs = group.run(fn)
    if bad == "dtype":
        assert isinstance(errs[0], TypeError) and "dtype" in str(errs[0])
    else:
        assert isinstance(errs[0], ValueError) and "dimensions" in str(errs[0])
        assert "dimensions" in str(errs[1])
    assert isinstance(errs[1], RemoteInputError)
    assert not isinstance(errs[0], CollectiveMismatchError)


FORMAT_SHAPES = {"NC": (), "NCL": (3,), "NCHW": (2, 3), "NCDHW": (1, 2, 2), "NLC": (3,),
                 "NHWC": (2, 3), "NDHWC": (1, 2, 2)}


def test_threads_random_splits_fuzz():
    # Random group sizes, formats, dtypes and splits (many empty ranks, tiny
    # counts): layers over the thread group vs the float64 reference.
    rng = np.random.default_rng(2024)
    for trial in range(40):
        k = int(rng.integers(1, 5))
        fmt = str(rng.choice(list(FORMAT_SHAPES)))
        c = int(rng.integers(1, 4))
        in_dt = rng.choice([np.float32, np.float64])
        layer_dt = str(rng.choice(["float32", "float64"]))
        spatial = FORMAT_SHAPES[fmt]
        # a global count of 1 in training raises (SPEC §2)
        n = int(rng.integers(2 if int(np.prod(spatial)) == 1 else 1, 7))
        counts = list(rng.multinomial(n, np.ones(k) / k))
        shape = (n, *spatial, c) if fmt.endswith("C") else (n, c, *spatial)
        x = (rng.standard_normal(shape) * rng.uniform(0.1, 3) + rng.uniform(-5, 5)).astype(in_dt)
        dy = rng.standard_normal(shape).astype(in_dt)
        w = rng.standard_normal(c)
        b = rng.standard_normal(c)

        def fn(r, comm, x=x, dy=dy, w=w, b=b, counts=counts, fmt=fmt, c=c, layer_dt=layer_dt):
            layer = sbn.SyncBatchNorm(c, data_format=fmt, comm=comm, dtype=layer_dt,
                                      momentum=0.5)
            layer.weight.data = w.astype(layer_dt)
            layer.bias.data = b.astype(layer_dt)
            sl = bn_ref.local_slice(counts, r)
            y = layer(x[sl])
            dx = layer.backward(dy[sl])
            return y, dx, layer.weight.grad, layer.bias.grad, layer._mean, layer._variance

        out = bn_ref.ThreadGroup(k).run(fn)
        wl, bl = w.astype(layer_dt).astype(np.float64), b.astype(layer_dt).astype(np.float64)
        yr, mean, var, m = bn_ref.ref_forward(x, fmt, wl, bl)
        dxr, dwr, dbr = bn_ref.ref_backward(x, dy, fmt, wl)
        f64 = in_dt == np.float64 or layer_dt == "float64"
        # float32 math: relative to the size of what is computed (var can be tiny
        # for n=1-2, where xhat is rounding noise amplified by invstd).
        tol = 1e-10 if in_dt == np.float64 else (1e-6 if f64 else 1e-4)
        gtol = tol if layer_dt == "float64" else max(tol, 1e-6)  # grads in layer dtype
        what = f"trial {trial}: k={k} {fmt} {np.dtype(in_dt).name}/{layer_dt} counts={counts}"
        y = np.concatenate([o[0] for o in out]).astype(np.float64)
        dx = np.concatenate([o[1] for o in out]).astype(np.float64)
        assert np.isfinite(y).all() and np.isfinite(dx).all(), what
        if f64 or var.min() > 1e-3:
            assert np.abs(y - yr).max() <= tol * max(1, np.abs(yr).max()), what
            assert np.abs(dx - dxr).max() <= tol * max(1, np.abs(dxr).max()), what
            assert np.abs(sum(o[2] for o in out) - dwr).max() <= gtol * max(1, m), what
        assert np.abs(sum(o[3] for o in out) - dbr).max() <= gtol * max(1, m) * 10, what
        rm = 0.5 * mean
        rv = 0.5 + 0.5 * var
        st = 1e-12 if layer_dt == "float64" else 1e-5
        for o in out:
            assert np.abs(o[4] - rm).max() <= st * max(1, np.abs(rm).max()), what
            assert np.abs(o[5] - rv).max() <= st * max(1, np.abs(rv).max()), what
            assert o[4].tobytes() == out[0][4].tobytes(), what
