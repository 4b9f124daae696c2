"""The layers' steady-state pass (``_sync.passes.SteadyPlan``): a repeated training
call skips the checks and runs the per-channel steps as one compiled call each.

It must be invisible: the same bits as the general path for every output,
gradient and running statistic, the same errors for bad input, and every change
of what the checks read (dtype, shape, layout, vectors, mode, options, state)
taken back through the checks. Each scenario runs twice, once as shipped and
once with the steady path switched off, and the two records must be identical.
"""

import numpy as np
import pytest

import cupysyncbn as sbn
from cupysyncbn._sync import passes

pytest.importorskip("numba")


@pytest.fixture
def steady_count(monkeypatch):
    """Counts the forwards the steady path completed."""
    n = [0]
    real = passes.steady_forward

    def counted(*a, **k):
        out = real(*a, **k)
        n[0] += out is not None and out[2] is None
        return out

    monkeypatch.setattr(passes, "steady_forward", counted)
    return n


def _record(out, tag, *arrays):
    for i, a in enumerate(arrays):
        out[f"{tag}/{i}"] = None if a is None else np.array(a, copy=True)


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, str) or x is None:
            assert x == y, k
        else:
            assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), k


def _without_steady(monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setattr(passes, "steady_plan", lambda *a, **k: None)
        return fn()


CASES = [
    ("NCHW", (4, 6, 3, 5), "float32", "float32", None, 0.9, False, False),
    ("NCHW", (4, 6, 3, 5), "float32", "float32", "relu", None, True, True),
    ("NHWC", (5, 3, 4, 7), "float32", "float32", None, 0.9, True, False),
    ("NHWC", (2, 2, 3, 300), "float64", "float64", "relu", 0.5, False, True),
    ("NCL", (3, 4, 300), "float32", "float64", None, None, False, True),
    ("NC", (9, 5), "float64", "float64", None, 0.9, True, False),
    # outputs from the pool (1 MiB and more): the backend's methods, not the steady kernels
    ("NCHW", (4, 8, 96, 96), "float32", "float32", "relu", 0.9, False, True),
]


@pytest.mark.parametrize("fmt, shape, dt, ldt, act, momentum, unbiased, forced", CASES)
def test_steady_pass_gives_the_general_paths_bits(
    monkeypatch, steady_count, fmt, shape, dt, ldt, act, momentum, unbiased, forced,
):
    c = shape[-1] if fmt in ("NHWC", "NC") and fmt != "NC" else shape[1]

    def scenario():
        comm = sbn.init("none", force_collectives=forced)
        rng = np.random.default_rng(5)
        bn = sbn.SyncBatchNorm(c, data_format=fmt, dtype=ldt, act=act, momentum=momentum,
                               unbiased_running_var=unbiased, comm=comm)
        bn.weight.data[...] = rng.standard_normal(c)
        bn.bias.data[...] = rng.standard_normal(c)
        out = {}
        for step in range(9):
            x = (rng.standard_normal(shape) * (1 + step) + 3 * step).astype(dt)
            if step == 5:
                x = x * np.asarray(1e25 if dt == "float32" else 1e200, dt)  # outside the safe range
            if step == 6:
                x = x * np.asarray(1e-30, dt)  # tiny spread: rescaled statistics
            if step == 7:
                x = x + np.asarray(1e6, dt)  # a jump: the shift is far from the mean
            dy = rng.standard_normal(shape).astype(dt)
            y = bn(x)
            if step == 3:  # two forwards pending, backwards in reverse order
                y2 = bn(x[::-1].copy())
                _record(out, f"{step}/second", y2, bn.backward(dy[::-1].copy()))
            _record(out, step, y, bn.backward(dy), bn.weight.grad, bn.bias.grad, bn._mean,
                    bn._variance, bn._num_batches_tracked)
        bn.eval()
        _record(out, "eval", bn(x))
        return out

    steady = scenario()
    assert steady_count[0] >= 4  # the steady path ran, and ran the rare cases' passes
    _same(steady, _without_steady(monkeypatch, scenario))


def test_every_change_goes_back_through_the_checks(monkeypatch, steady_count):
    """Changes of what the checks read, each after steady passes: the same results and
    the same errors as without the steady path; nothing changed by a refused call."""

    def scenario():
        rng = np.random.default_rng(1)
        c = 4
        bn = sbn.SyncBatchNorm(c, comm=sbn.init("none"))
        x = rng.standard_normal((3, c, 5, 2)).astype(np.float32)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        out = {}

        def step(tag, xx, dyy=None):
            try:
                y = bn(xx)
                dx = bn.backward(dy if dyy is None else dyy)
            except (TypeError, ValueError, RuntimeError) as e:
                out[f"{tag}/error"] = f"{type(e).__name__}: {e}"
                y = dx = None
            _record(out, tag, y, dx, bn.weight.grad, bn.bias.grad, bn._mean, bn._variance,
                    bn._num_batches_tracked)
            out[f"{tag}/pending"] = str(bn.num_pending)

        for i in range(3):
            step(f"warm{i}", x)
        step("float64", x.astype(np.float64))
        step("shape", x[:2].copy())
        step("fortran", np.asfortranarray(x))
        step("strided", x[:, :, ::2])
        step("ints", x.astype(np.int32))
        step("channels", x[:, :3].copy())
        step("again", x)
        bn.weight.data.shape = (2, 2)  # a vector reshaped in place
        step("reshaped", x)
        bn.weight.data.shape = (4,)
        step("unreshaped", x)
        bn.weight.data = rng.standard_normal(4).astype(np.float32)  # replaced
        step("new weight", x)
        bn.bias.data = rng.standard_normal(4)  # replaced by another dtype
        step("float64 bias", x)
        bn.bias.data = bn.bias.data.astype(np.float32)
        step("float32 bias", x)
        bn.eval()
        step("eval", x)
        bn.train()
        step("train", x)
        with sbn.no_grad():
            out["no_grad"] = bn(x).copy()
        out["no_grad/pending"] = str(bn.num_pending)
        step("bad dy", x, dy[:2])  # refused: the forward stays pending
        out["bad dy/dx"] = bn.backward(dy).copy()
        bn.set_state_dict({k: v.copy() * 0.5 for k, v in bn.state_dict().items()})
        step("loaded", x)
        bn.to(dtype="float64")
        step("to float64", x)
        step("to float64 again", x)
        bn._momentum = 0.5  # a private option changed
        step("momentum", x)
        bn.weight.trainable = False
        step("frozen", x)
        return out

    steady = scenario()
    assert steady_count[0] >= 5
    _same(steady, _without_steady(monkeypatch, scenario))
    assert "must have shape" in steady["reshaped/error"]
    assert "dy must have" in steady["bad dy/error"]  # and its forward stays pending:
    assert int(steady["bad dy/pending"]) == int(steady["no_grad/pending"]) + 1


def test_steady_state_on_two_ranks_is_the_general_paths_bits(tmp_path):
    """Uneven batches, a jump of the mean (redone statistics all-reduce) and a
    global count that changes: the same bits with and without the steady path."""
    pytest.importorskip("mpi4py")
    import json

    from support.mpi_runner import run_mpi

    code = r"""
import json, sys
import numpy as np
import cupysyncbn as sbn
from cupysyncbn._sync import passes
comm = sbn.init("mpi")
r = comm.rank
res = {}
for steady in (True, False):
    if not steady:
        passes.steady_plan = lambda *a, **k: None
    rng = np.random.default_rng(r)
    bn = sbn.SyncBatchNorm(3, comm=comm, momentum=None, unbiased_running_var=True)
    out = []
    for step in range(8):
        n = 2 + r + (step == 5)  # uneven, and the global count changes at step 5
        x = rng.standard_normal((n, 3, 4)).astype(np.float32) + (1e5 if step == 6 else 0)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        y = bn(x)
        dx = bn.backward(dy)
        out += [a.tobytes().hex() for a in (y, dx, bn.weight.grad, bn._mean, bn._variance)]
    res[steady] = out
assert res[True] == res[False], "steady and general paths differ"
print("OK", r)
"""
    res = run_mpi(code, 2, timeout=240, tmp_path=tmp_path)
    assert res.stdout.count("OK") == 2, res.stdout + res.stderr
    json.dumps(res.stdout)


def test_steady_pass_python_call_budget():
    """A count, not a time: Python function calls the package makes per steady-state
    forward+backward of a small NumPy batch on one process (issue 26 target 2).

    113 before the steady path (2026-12-08), 25 with it (the layer, the
    plan's checks, the environment's CPU backend choice, one compiled call
    per side); the bound catches a check or a step that stopped being cached.
    """
    import sys
    from pathlib import Path

    pkg = str(Path(sbn.__file__).parent)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 16, 4, 4)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    bn = sbn.SyncBatchNorm(16, comm=sbn.init("none"))
    for _ in range(3):
        bn(x)
        bn.backward(dy)
    assert bn._plan is not None
    calls = [0]

    def count(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(pkg):
            calls[0] += 1

    sys.setprofile(count)
    try:
        bn(x)
        bn.backward(dy)
    finally:
        sys.setprofile(None)
    assert 10 < calls[0] <= 40, calls
