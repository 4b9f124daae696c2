"""Bodies of the multi-rank core test jobs (run under mpiexec by the test modules).

One launch runs many checks: every rank records ``name -> (value, bound, op)``,
rank 0 merges them (max of values for ``le``, min for ``ge``) and prints one
line ``RESULT {json}`` that :func:`bn_ref.parse_result` turns back into a dict. The
references are float64 NumPy on the global batch (:mod:`bn_ref`) and the local
(one-process) batch norm on the whole batch.

Run as ``python -c "from support import mpi_cases; mpi_cases.main()" JOB``
(``tests/`` on ``PYTHONPATH``).
"""

from __future__ import annotations

import json
import sys
import traceback
from functools import partial

import numpy as np
from mpi4py import MPI

import cupysyncbn as sbn
from cupysyncbn._sync import protocol
from cupysyncbn.comm.base import Communicator
from cupysyncbn.errors import CollectiveMismatchError, RemoteInputError
from support import bn_ref

F64 = np.float64
SHAPES = {  # per-sample shape (channels C=3 in place)
    "NC": (3,), "NCL": (3, 5), "NCHW": (3, 4, 5), "NCDHW": (3, 2, 3, 2),
    "NLC": (5, 3), "NHWC": (4, 5, 3), "NDHWC": (2, 3, 2, 3),
}
LOCAL_CLS = {2: sbn.BatchNorm1D, 3: sbn.BatchNorm1D, 4: sbn.BatchNorm2D, 5: sbn.BatchNorm3D}


class Checks:
    """Named numeric checks, merged over ranks on rank 0."""

    def __init__(self, world):
        self.world = world
        self.items: dict = {}

    def le(self, name, value, bound):
        value = float(value)
        old = self.items.get(name)
        if old is not None:
            value = max(value, old[0]) if np.isfinite(old[0]) else old[0]
        if not np.isfinite(value):
            value = float("inf")
        self.items[name] = (value, float(bound), "le")

    def ge(self, name, value, bound):
        value = float(value)
        old = self.items.get(name)
        if old is not None:
            value = min(value, old[0])
        self.items[name] = (value if np.isfinite(value) else float("-inf"), float(bound), "ge")

    def true(self, name, cond):
        self.le(name, 0.0 if cond else 1.0, 0.0)

    def emit(self):
        allitems = self.world.gather(self.items, root=0)
        if self.world.rank != 0:
            return
        merged: dict = {}
        for items in allitems:
            for k, (v, b, op) in items.items():
                if k in merged:
                    ov = merged[k][0]
                    v = max(v, ov) if op == "le" else min(v, ov)
                merged[k] = (v, b, op)
        print("RESULT " + json.dumps(merged), flush=True)


class Counting(Communicator):
    """Wraps a communicator and records the size of every collective."""

    def __init__(self, inner):
        self.inner = inner
        self.rank = inner.rank
        self.size = inner.size
        self.backend = inner.backend
        self.force_collectives = inner.force_collectives  # one rank: still synchronizes
        self.calls: list[int] = []

    def allreduce_sum(self, buf):
        self.calls.append(int(buf.size))
        return self.inner.allreduce_sum(buf)

    def allreduce_max(self, buf):
        self.calls.append(int(buf.size))
        return self.inner.allreduce_max(buf)


def _allsum(world, a):
    a = np.ascontiguousarray(a, dtype=F64)
    world.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)
    return a


def _maxabs(a, b):
    a = np.asarray(a, F64)
    b = np.asarray(b, F64)
    return float(np.abs(a - b).max()) if a.size else 0.0


def _data(rng, n, fmt, dtype, offset=0.0):
    shape = (n, *SHAPES[fmt])
    ca = bn_ref.channel_axis(fmt, len(shape))
    cshape = [1] * len(shape)
    cshape[ca] = 3
    center = (offset + np.array([0.5, -1.0, 2.0])).reshape(cshape)
    scale = np.array([1.0, 0.3, 2.0]).reshape(cshape)
    return (rng.standard_normal(shape) * scale + center).astype(dtype)


# --------------------------------------------------------------------------- oracle
def _oracle_case(ck, world, comm, rng, fmt, in_dt, layer_dt, momentum=0.8, unbiased=False,
                 track=True, tag=""):
    k, rank = world.size, world.rank
    in_dt, layer_dt = np.dtype(in_dt), np.dtype(layer_dt)
    name = f"{fmt}/{in_dt.name}/{layer_dt.name}{tag}"
    if in_dt == np.float16:
        tol = tol_ref = 4e-3  # one float16 ulp of |y| < 8: both sides round to float16
    elif in_dt == np.float64 or layer_dt == np.float64:
        tol, tol_ref = 1e-12, 1e-11
        if in_dt == np.float32:
            tol = tol_ref = 1e-6  # float64 math rounded to a float32 output
    else:
        tol, tol_ref = 1e-5, 1e-5
    stat_tol = 1e-12 if layer_dt == np.float64 else 1e-5
    # Parameter gradients are stored in the layer dtype: sums of 7*S terms.
    grad_tol = 20 * (tol if layer_dt == np.float64 else max(tol, 1e-5))
    n = 7
    w = (1 + 0.5 * rng.standard_normal(3)).astype(layer_dt)
    b = (0.3 * rng.standard_normal(3)).astype(layer_dt)
    kw = dict(momentum=momentum, epsilon=1e-5, data_format=fmt, dtype=layer_dt,
              unbiased_running_var=unbiased, track_running_stats=track)
    sync = sbn.SyncBatchNorm(3, comm=comm, **kw)
    local = LOCAL_CLS[len(SHAPES[fmt]) + 1](3, **kw)
    for layer in (sync, local):
        layer.weight.data = w.copy()
        layer.bias.data = b.copy()
    rm, rv = np.zeros(3), np.ones(3)
    differ = 0.0
    for step in range(3):
        x = _data(rng, n, fmt, in_dt, offset=step)
        dy = _data(rng, n, fmt, in_dt)
        sl = bn_ref.local_slice(bn_ref.step_counts(n, k, step), rank)
        xs, dys = x[sl], dy[sl]
        if step == 1:  # non-contiguous local inputs
            xs, dys = np.asfortranarray(xs), np.asfortranarray(dys)
        ys = sync(xs)
        dxs = sync.backward(dys)
        yl = local(x)
        dxl = local.backward(dy)
        ck.true(f"oracle {name} dtype kept", ys.dtype == in_dt and dxs.dtype == in_dt)
        ck.le(f"oracle {name} y vs local", _maxabs(ys, yl[sl]), tol)
        ck.le(f"oracle {name} dx vs local", _maxabs(dxs, dxl[sl]), tol)
        yr, mean, var, m = bn_ref.ref_forward(x, fmt, w, b, 1e-5)
        dxr, dwr, dbr = bn_ref.ref_backward(x, dy, fmt, w, 1e-5)
        ck.le(f"oracle {name} y vs float64 ref", _maxabs(ys, yr[sl]), tol_ref)
        ck.le(f"oracle {name} dx vs float64 ref", _maxabs(dxs, dxr[sl]), tol_ref)
        g = _allsum(world, np.concatenate([sync.weight.grad, sync.bias.grad]))
        gl = np.concatenate([local.weight.grad, local.bias.grad]).astype(F64)
        ck.le(f"oracle {name} summed grads vs local", _maxabs(g, gl), grad_tol)
        ck.le(f"oracle {name} summed grads vs ref", _maxabs(g, np.concatenate([dwr, dbr])),
              max(grad_tol, 20 * tol_ref))
        sync.clear_gradients()
        local.clear_gradients()
        if track:
            if momentum is None:
                rm = rm * step / (step + 1) + mean / (step + 1)
                rv = rv * step / (step + 1) + (var * m / (m - 1) if unbiased else var) / (step + 1)
            else:
                rm, rv = bn_ref.ref_running(rm, rv, mean, var, m, momentum, unbiased)
            pairs = ((sync._mean, local._mean, rm), (sync._variance, local._variance, rv))
            for mine, loc, ref in pairs:
                ck.le(f"oracle {name} running stats vs local", _maxabs(mine, loc), stat_tol)
                ck.le(f"oracle {name} running stats vs ref", _maxabs(mine, ref),
                      max(stat_tol, 1e-6))
        # Local BN on the same split must differ from the synchronized result.
        if xs.size // 3 > 1:  # a count of 1 raises in training (SPEC §2)
            shard = LOCAL_CLS[len(SHAPES[fmt]) + 1](3, **kw)
            shard.weight.data = w.copy()
            shard.bias.data = b.copy()
            differ = max(differ, _maxabs(shard(np.ascontiguousarray(xs)), ys))
    if k > 1:  # one rank (forced collectives): the split is the whole batch
        ck.ge(f"oracle {name} local BN on the split differs",
              world.allreduce(differ, op=MPI.MAX), 1e-2)
    if track:
        blobs = world.allgather(sync._mean.tobytes() + sync._variance.tobytes())
        ck.true(f"oracle {name} running stats bitwise identical", len(set(blobs)) == 1)
    # eval: running statistics (or batch statistics without tracking)
    sync.eval()
    local.eval()
    x = _data(rng, n, fmt, in_dt, offset=3)
    sl = bn_ref.local_slice(bn_ref.step_counts(n, k, 1), rank)
    ye = sync(x[sl])
    ck.le(f"oracle {name} eval y vs local", _maxabs(ye, local(x)[sl]), tol)
    if track:
        ref = bn_ref.ref_eval(x, fmt, rm, rv, w, b, 1e-5)
    else:
        ref = bn_ref.ref_forward(x, fmt, w, b, 1e-5)[0]
    ck.le(f"oracle {name} eval y vs float64 ref", _maxabs(ye, ref[sl]), max(tol_ref, 1e-6))


def _stability(ck, world, comm, rng):
    """float32 data, per-channel mean 1e4 and std 1: bounds from float32 rounding.

    The same bounds as ``tests/nn/test_numerical_stability.py``: the variance
    of ``m`` values to ``2 eps32 log2(m)`` relative (positive sums; the merge
    of the ranks' shifted sums adds one level per rank at most), ``y`` to
    ``eps32 (|mean| / std + |y|)`` (the mean of 1e4 rounded to float32).
    """
    k, rank = world.size, world.rank
    n = 9
    e32 = bn_ref.eps(np.float32)
    layer = sbn.SyncBatchNorm(3, momentum=0.0, comm=comm)  # running var = batch var
    for step in range(3):
        x = (1e4 + np.arange(3)[None, :, None, None] * 10
             + rng.standard_normal((n, 3, 8, 8))).astype(np.float32)
        truth = x.astype(F64).var(axis=(0, 2, 3))
        m = x.size // 3
        var_tol = 2 * e32 * (np.log2(m) + k)
        sl = bn_ref.local_slice(bn_ref.step_counts(n, k, step), rank)
        y = layer(x[sl])
        rel = np.abs(layer._variance.astype(F64) - truth) / truth
        ck.le("stability running var rel err (layer, float32)", rel.max(), var_tol)
        res = sbn.functional.batch_norm_forward(x[sl], comm=comm)
        rel = np.abs(res.batch_var - truth) / truth
        ck.le("stability batch var rel err (functional)", rel.max(), var_tol)
        yr, mean, var, _ = bn_ref.ref_forward(x, "NCHW")
        y_tol = e32 * (np.max(np.abs(mean) / np.sqrt(var)) + np.abs(yr).max())
        ck.le("stability y vs float64 ref", _maxabs(y, yr[sl]), y_tol)


def _subgroups(ck, world, comm):
    """Two groups of 2 in a 4-rank job: independent, each exact on its own batch."""
    rank = world.rank
    color = rank // 2
    subs = {"split": comm.split(color), "mpi4py": world.Split(color, rank)}
    for how, sub in subs.items():
        rng = np.random.default_rng(500 + color)  # different data per group
        layer = sbn.SyncBatchNorm(3, data_format="NCHW", comm=sub, momentum=0.5,
                                  dtype="float64")
        rm, rv = np.zeros(3), np.ones(3)
        for step in range(2):
            x = _data(rng, 5, "NCHW", np.float64, offset=10 * color)
            dy = _data(rng, 5, "NCHW", np.float64)
            sl = bn_ref.local_slice(bn_ref.step_counts(5, 2, step), rank % 2)
            y = layer(x[sl])
            dx = layer.backward(dy[sl])
            yr, mean, var, m = bn_ref.ref_forward(x, "NCHW")
            dxr = bn_ref.ref_backward(x, dy, "NCHW")[0]
            rm, rv = bn_ref.ref_running(rm, rv, mean, var, m, 0.5)
            ck.le(f"subgroup ({how}) y vs own group's batch", _maxabs(y, yr[sl]), 1e-12)
            ck.le(f"subgroup ({how}) dx vs own group's batch", _maxabs(dx, dxr[sl]), 1e-12)
            ck.le(f"subgroup ({how}) running mean", _maxabs(layer._mean, rm), 1e-12)
            ck.le(f"subgroup ({how}) running var", _maxabs(layer._variance, rv), 1e-12)
        means = world.allgather(layer._mean.copy())
        ck.true(f"subgroup ({how}) groups bitwise equal inside",
                means[0].tobytes() == means[1].tobytes()
                and means[2].tobytes() == means[3].tobytes())
        ck.ge(f"subgroup ({how}) groups differ", _maxabs(means[0], means[2]), 1.0)


def _counting(ck, world, comm):
    """One collective per training pass in steady state, none in eval; O(C) message."""
    cc = Counting(comm)
    c = 5
    layer = sbn.SyncBatchNorm(c, comm=cc)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, c, 2, 2)).astype(np.float32)
    layer(x)
    first = len(cc.calls)
    ck.le("collectives: first forward (handshake + two-pass) at most 3", first, 3)
    cc.calls.clear()
    layer.backward(x)
    ck.true("collectives: backward exactly 1", len(cc.calls) == 1)
    for _ in range(3):
        cc.calls.clear()
        layer(x)
        ck.true("collectives: steady-state forward exactly 1", len(cc.calls) == 1)
        ck.true("collectives: forward message is HEADER + 2C",
                cc.calls == [protocol.HEADER + 2 * c])
        cc.calls.clear()
        layer.backward(x)
        ck.true("collectives: steady-state backward exactly 1", len(cc.calls) == 1)
        ck.true("collectives: backward message is HEADER + 2C",
                cc.calls == [protocol.HEADER + 2 * c])
    layer.eval()
    cc.calls.clear()
    layer(x)
    layer.backward(x)
    ck.true("collectives: none in eval forward/backward", cc.calls == [])
    # A model of several layers: one collective per layer per pass.
    model = sbn.Sequential(sbn.SyncBatchNorm(c, comm=cc), sbn.SyncBatchNorm(c, comm=cc))
    model(x)
    model.backward(x)
    cc.calls.clear()
    model(x)
    model.backward(x)
    ck.true("collectives: 2 layers -> 2 forward + 2 backward", len(cc.calls) == 4)


def _empty(ck, world, comm):
    """Empty global batch: empty output, no NaN, stats unchanged, zero grads."""
    rng = np.random.default_rng(4)
    for warm in (False, True):
        layer = sbn.SyncBatchNorm(3, comm=comm, data_format="NHWC")
        if warm:  # steady state (shift known) as well as the very first pass
            x = rng.standard_normal((2, 2, 2, 3)).astype(np.float32)
            layer(x)
            layer.backward(x)
        layer.clear_gradients()
        before = (layer._mean.copy(), layer._variance.copy())
        e = np.zeros((0, 2, 2, 3), np.float32)
        y = layer(e)
        dx = layer.backward(e)
        tag = "warm" if warm else "first pass"
        ck.true(f"empty global batch ({tag}): shapes", y.shape == e.shape and dx.shape == e.shape)
        ck.true(f"empty global batch ({tag}): running stats unchanged",
                np.array_equal(before[0], layer._mean)
                and np.array_equal(before[1], layer._variance))
        ck.true(f"empty global batch ({tag}): zero finite grads",
                np.array_equal(layer.weight.grad, np.zeros(3))
                and np.array_equal(layer.bias.grad, np.zeros(3)))
        res = sbn.functional.batch_norm_forward(e, data_format="NHWC", comm=comm)
        ck.true(f"empty global batch ({tag}): functional count 0",
                res.count == 0 and not res.updated)
    # Some ranks empty, the others not (every rank but the last is empty).
    x = rng.standard_normal((4, 3)).astype(np.float64)
    mine = x if world.rank == world.size - 1 else x[:0]
    layer = sbn.SyncBatchNorm(3, comm=comm, data_format="NC", dtype="float64")
    y = layer(mine)
    dx = layer.backward(np.ones_like(mine))
    yr = bn_ref.ref_forward(x, "NC")[0]
    ck.le("one non-empty rank: y exact", _maxabs(y, yr[: len(mine)]), 1e-12)
    ck.true("one non-empty rank: dx finite", bool(np.isfinite(dx).all()))


def _allreduce_grads(ck, world, comm):
    rng = np.random.default_rng(5)
    model = sbn.Sequential(
        sbn.SyncBatchNorm(3, comm=comm, dtype="float64", data_format="NCL"),
        sbn.SyncBatchNorm(3, comm=comm, weight_attr=False, dtype="float64", data_format="NCL"),
    )
    x = rng.standard_normal((2 + world.rank, 3, 2)).astype(np.float64)
    model(x)
    model.backward(x)
    params = [p for p in model.parameters() if p.trainable]
    local = np.concatenate([p.grad for p in params])
    total = _allsum(world, local.copy())
    sbn.allreduce_gradients(model, comm)
    got = np.concatenate([p.grad for p in params])
    ck.le("allreduce_gradients averages", _maxabs(got, total / world.size), 1e-12)
    ck.true("allreduce_gradients leaves the fixed weight without grad",
            model[1].weight.grad is None)
    for p, v in zip(params, np.split(local, len(params))):
        p.grad = v.copy()
    sbn.allreduce_gradients(model.parameters(), comm, average=False)
    got = np.concatenate([p.grad for p in params])
    ck.le("allreduce_gradients(average=False) sums", _maxabs(got, total), 1e-12)


def oracle():
    world = MPI.COMM_WORLD
    comm = sbn.init("mpi")
    ck = Checks(world)
    ck.true("oracle: the communicator synchronizes (one rank: forced)", comm.synchronizes)
    # the CPU backend asked for (CUPYSYNCBN_CPU_BACKEND) is the one that runs
    from cupysyncbn.backends import cpu_backend
    from cupysyncbn.runtime import env

    asked = env.text(env.CPU_BACKEND_ENV, "auto").lower()
    running = "numba" if ".numba" in type(cpu_backend()).__module__ else "numpy"
    ck.true(f"oracle: the CPU backend is {running} (asked: {asked})",
            asked in ("auto", running))
    rng = np.random.default_rng(100)  # same stream on every rank: same global batch
    for fmt in SHAPES:
        _oracle_case(ck, world, comm, rng, fmt, np.float32, np.float32)
        _oracle_case(ck, world, comm, rng, fmt, np.float64, np.float64)
    _oracle_case(ck, world, comm, rng, "NCHW", np.float16, np.float32)
    _oracle_case(ck, world, comm, rng, "NHWC", np.float32, np.float64)
    _oracle_case(ck, world, comm, rng, "NCL", np.float64, np.float32)
    _oracle_case(ck, world, comm, rng, "NCHW", np.float64, np.float64, momentum=None,
                 unbiased=True, tag=" momentum=None unbiased")
    _oracle_case(ck, world, comm, rng, "NCDHW", np.float64, np.float64, track=False,
                 tag=" track_running_stats=False")
    _stability(ck, world, comm, rng)
    _counting(ck, world, comm)
    _empty(ck, world, comm)
    _allreduce_grads(ck, world, comm)
    if world.size == 4:
        _subgroups(ck, world, comm)
    ck.emit()


# --------------------------------------------------------------------------- errors
def _expect(ck, name, fn, types, words=()):
    """Run ``fn``; record whether it raised one of ``types`` mentioning ``words``."""
    try:
        fn()
    except types as e:
        msg = str(e)
        ck.true(f"{name}: message names {words}", all(w in msg for w in words))
        return e
    except Exception as e:  # wrong type
        ck.true(f"{name}: raised {type(e).__name__}: {e}", False)
        return e
    ck.true(f"{name}: raised", False)
    return None


def errors():
    world = MPI.COMM_WORLD
    comm = sbn.init("mpi")
    rank, k = world.rank, world.size
    ck = Checks(world)
    ck.true("after init: the communicator synchronizes (one rank: forced)", comm.synchronizes)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 4, 2, 2)).astype(np.float32)

    def normal_step(tag):
        layer = sbn.SyncBatchNorm(4, comm=comm, dtype="float64")
        # A fresh stream: the error cases above use rank-dependent draws.
        xg = np.random.default_rng(len(tag)).standard_normal((2 * k, 4, 2, 2))
        sl = slice(2 * rank, 2 * rank + 2)
        y = layer(xg[sl])
        yr = bn_ref.ref_forward(xg, "NCHW")[0]
        ck.le(f"{tag}: a normal step afterwards is exact", _maxabs(y, yr[sl]), 1e-12)

    # num_features differs across ranks: same error type on every rank, no hang.
    if k > 1:  # (one rank with forced collectives has no one to differ from)
        bad = sbn.SyncBatchNorm(3 if rank == 0 else 4, comm=comm)
        xx = rng.standard_normal((2, 3 if rank == 0 else 4, 2, 2)).astype(np.float32)
        e = _expect(ck, "num_features mismatch", partial(bad, xx), CollectiveMismatchError,
                    ("num_features",))
        msgs = world.allgather(f"{type(e).__name__}: {e}")
        ck.true("num_features mismatch: the same message on every rank", len(set(msgs)) == 1)
        normal_step("after num_features mismatch")

    # One rank's input invalid: specific error there, RemoteInputError elsewhere,
    # on the first pass (handshake + mean pass) and in the steady state.
    for warm in (False, True):
        tag = "steady" if warm else "first pass"
        cases = [
            ("wrong channel count", lambda: x[:, :3].copy(), ValueError, ("channels",)),
            ("integer dtype", lambda: x.astype(np.int32), TypeError, ("dtype",)),
            ("rank/format mismatch", lambda: x.reshape(x.shape + (1, 1)), ValueError,
             ("dimensions",)),
            ("non-array input", lambda: x.tolist(), TypeError, ("x must be",)),
        ]
        for what, make, etype, words in cases:
            layer = sbn.SyncBatchNorm(4, comm=comm)
            if warm:
                layer(x)
                layer.backward(x)
            before = layer._mean.copy()
            if rank == 0:
                _expect(ck, f"{what} ({tag}) on the faulty rank", partial(layer, make()),
                        etype, words)
            else:
                _expect(ck, f"{what} ({tag}) on the other ranks", partial(layer, x),
                        RemoteInputError, ())
            ck.true(f"{what} ({tag}): running stats unchanged", np.array_equal(before, layer._mean))
    # dy of the wrong shape / dtype on one rank.
    for what, dy_bad in (("dy shape", x[:2]), ("dy dtype", x.astype(np.float64)),
                         ("dy not an array", x.tolist())):
        layer = sbn.SyncBatchNorm(4, comm=comm)
        layer(x)
        if rank == k - 1:
            _expect(ck, f"{what} on the faulty rank", partial(layer.backward, dy_bad),
                    (ValueError, TypeError), ("dy",))
        else:
            _expect(ck, f"{what} on the other ranks", partial(layer.backward, x),
                    RemoteInputError, ())
    normal_step("after input errors")

    # Ranks out of step (forward on one rank, backward on the other) in steady state.
    if k > 1:
        layer = sbn.SyncBatchNorm(4, comm=comm)
        layer(x)
        layer.backward(x)
        layer(x)
        layer.backward(x)
        op = (lambda: layer(x)) if rank == 0 else (lambda: layer.backward(x))
        _expect(ck, "forward/backward out of step", op, CollectiveMismatchError, ("out of step",))
        normal_step("after out-of-step")

    # Unbiased running variance with a global count of 1: every rank raises,
    # the running statistics are left unchanged.
    layer = sbn.SyncBatchNorm(3, comm=comm, data_format="NC", unbiased_running_var=True)
    one = np.ones((1 if rank == 0 else 0, 3), np.float32)
    before = (layer._mean.copy(), layer._variance.copy())
    _expect(ck, "unbiased var with global count 1", lambda: layer(one), ValueError, ("unbiased",))
    ck.true("unbiased count 1: running stats unchanged",
            np.array_equal(before[0], layer._mean) and np.array_equal(before[1], layer._variance))
    two = np.ones((2 if k == 1 else 1, 3), np.float32) * rank  # global count >= 2 works
    layer(two)
    ck.true("unbiased: works again with count >= 2", bool(np.isfinite(layer._variance).all()))

    # Differences that need not matter: input dtype and data_format per rank.
    xg = np.random.default_rng(8).standard_normal((2 * k, 4, 3, 2))
    sl = slice(2 * rank, 2 * rank + 2)
    yr = bn_ref.ref_forward(xg, "NCHW")[0]
    dt = np.float32 if rank % 2 == 0 else np.float64
    layer = sbn.SyncBatchNorm(4, comm=comm)
    try:
        y = layer(xg[sl].astype(dt))
        ck.le("mixed input dtypes across ranks: y vs float64 ref", _maxabs(y, yr[sl]), 1e-5)
    except ValueError as e:  # allowed only as the same error everywhere
        ck.true(f"mixed dtypes raised {e}", False)
    fmt = "NCHW" if rank % 2 == 0 else "NHWC"
    layer = sbn.SyncBatchNorm(4, comm=comm, data_format=fmt, dtype="float64")
    xs = xg[sl] if fmt == "NCHW" else np.moveaxis(xg[sl], 1, -1)
    y = layer(xs)
    if fmt == "NHWC":
        y = np.moveaxis(y, -1, 1)
    ck.le("mixed data_format across ranks: y vs float64 ref", _maxabs(y, yr[sl]), 1e-12)
    normal_step("at the end")
    ck.emit()


def main():
    job = sys.argv[1]
    try:
        {"oracle": oracle, "errors": errors}[job]()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        MPI.COMM_WORLD.Abort(1)


if __name__ == "__main__":
    main()
