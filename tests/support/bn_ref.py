"""Independent references for the core tests (no cupysyncbn math is used here).

* :func:`ref_forward` / :func:`ref_backward`: textbook batch norm in float64
  NumPy on the *global* batch, written from the formulas of SPEC §2-§3.
* :func:`split_counts`: uneven ways to cut a batch across ranks.
* :func:`run_conformance_case`: replays one ``cupysyncbn/conformance/data/*.npz`` vector through
  a ``SyncBatchNorm`` on any communicator and returns the worst errors. It is
  used in-process (1 rank) and inside the mpiexec scripts (K ranks).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from support import ROOT

# The conformance vectors live once, shipped with the package.
DATA = ROOT / "cupysyncbn" / "conformance" / "data"
F64 = np.float64


def eps(dtype) -> float:
    """Machine epsilon of ``dtype`` (the spacing of its numbers at 1)."""
    return float(np.finfo(dtype).eps)


def compute_dtype(in_dt, layer_dt) -> np.dtype:
    """The documented statistics precision: float64 if input or layer is float64, else float32.

    Written out here, not imported, so that a test using it checks the package's rule.
    """
    wide = np.float64 in (np.dtype(in_dt), np.dtype(layer_dt))
    return np.dtype(np.float64 if wide else np.float32)


def rounding_tol(out_dt, cdt, cond: float = 1.0, k: float = 2.0) -> float:
    """Error bound relative to a result's scale: output rounding plus compute rounding.

    Half an ulp of the output dtype (the final cast; relative to the largest
    value it is at most ``eps(out) / 2``) plus ``k`` roundings in the
    compute dtype amplified by the problem's condition number ``cond``
    (e.g. ``max |x| / std``: centering ``x`` loses ``eps * |x|`` against a
    spread of ``std``). ``k`` is a small constant, not a fudge factor: a bug
    that computes in a narrower dtype exceeds it by orders of magnitude.
    """
    return 0.5 * eps(out_dt) + k * eps(cdt) * cond


def channel_axis(fmt: str, ndim: int) -> int:
    """Channel axis of an input of ``ndim`` dims in ``fmt``.

    Paddle's rule, written out independently of ``cupysyncbn.arrays.formats``:
    channel-first names put the channels on axis 1, channel-last names on the
    last axis, whatever the rank.
    """
    if fmt.upper() in ("NC", "NCL", "NCW", "NCHW", "NCDHW"):
        return 1
    if fmt.upper() in ("NLC", "NWC", "NHWC", "NDHWC"):
        return ndim - 1
    raise ValueError(fmt)


def to_numpy(a):
    """A host NumPy copy of a NumPy or CuPy array."""
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def _b(v, ndim, ca):
    shape = [1] * ndim
    shape[ca] = -1
    return np.asarray(v, dtype=F64).reshape(shape)


def ref_forward(x, fmt, weight=None, bias=None, eps=1e-5):
    """Float64 training forward on the global batch: ``(y, mean, biased_var, m)``."""
    x = np.asarray(x, dtype=F64)
    ca = channel_axis(fmt, x.ndim)
    axes = tuple(i for i in range(x.ndim) if i != ca)
    c = x.shape[ca]
    w = np.ones(c) if weight is None else weight
    b = np.zeros(c) if bias is None else bias
    m = x.size // c if c else 0
    mean = x.mean(axis=axes)
    var = ((x - _b(mean, x.ndim, ca)) ** 2).mean(axis=axes)
    xhat = (x - _b(mean, x.ndim, ca)) / np.sqrt(_b(var, x.ndim, ca) + eps)
    y = xhat * _b(w, x.ndim, ca) + _b(b, x.ndim, ca)
    return y, mean, var, m


def ref_eval(x, fmt, mean, var, weight=None, bias=None, eps=1e-5):
    """Float64 eval forward with given running statistics."""
    x = np.asarray(x, dtype=F64)
    ca = channel_axis(fmt, x.ndim)
    c = x.shape[ca]
    w = np.ones(c) if weight is None else weight
    b = np.zeros(c) if bias is None else bias
    xhat = (x - _b(mean, x.ndim, ca)) / np.sqrt(_b(var, x.ndim, ca) + eps)
    return xhat * _b(w, x.ndim, ca) + _b(b, x.ndim, ca)


def ref_backward(x, dy, fmt, weight=None, eps=1e-5):
    """Float64 training backward on the global batch: ``(dx, dweight, dbias)``."""
    x = np.asarray(x, dtype=F64)
    dy = np.asarray(dy, dtype=F64)
    ca = channel_axis(fmt, x.ndim)
    axes = tuple(i for i in range(x.ndim) if i != ca)
    c = x.shape[ca]
    w = np.ones(c) if weight is None else np.asarray(weight, F64)
    m = x.size // c
    mean = x.mean(axis=axes)
    var = ((x - _b(mean, x.ndim, ca)) ** 2).mean(axis=axes)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - _b(mean, x.ndim, ca)) * _b(invstd, x.ndim, ca)
    sdy = dy.sum(axis=axes)
    sdyx = (dy * xhat).sum(axis=axes)
    dx = _b(w * invstd, x.ndim, ca) * (
        dy - _b(sdy / m, x.ndim, ca) - xhat * _b(sdyx / m, x.ndim, ca)
    )
    return dx, sdyx, sdy


def ref_running(rm, rv, mean, var, m, momentum, unbiased=False):
    """One Paddle-convention running-stats update in float64."""
    v = var * m / (m - 1) if unbiased else var
    return rm * momentum + mean * (1 - momentum), rv * momentum + v * (1 - momentum)


def check_training_step(layer, x, dy, fmt, w, b, momentum):
    """One forward and backward of a float64 ``layer`` (weight ``w``, bias
    ``b``, running statistics 0 and 1) against the references: output,
    input and parameter gradients, running statistics. Returns the expected
    running ``(mean, var)``."""
    y = layer(x)
    dx = layer.backward(dy)
    yr, mean, var, m = ref_forward(x, fmt, w, b)
    dxr, dwr, dbr = ref_backward(x, dy, fmt, w)
    np.testing.assert_allclose(y, yr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dx, dxr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(layer.weight.grad, dwr, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.bias.grad, dbr, rtol=1e-12, atol=1e-12)
    c = w.shape[0]
    rm, rv = ref_running(np.zeros(c), np.ones(c), mean, var, m, momentum)
    np.testing.assert_allclose(layer._mean, rm, atol=1e-14)
    np.testing.assert_allclose(layer._variance, rv, atol=1e-14)
    return rm, rv


def split_counts(n: int, k: int, empty: int | None = None) -> list[int]:
    """Uneven counts summing to ``n`` over ``k`` ranks; rank ``empty`` gets 0.

    The other ranks get shares proportional to 1, 2, 3, ... (rounded down, the
    remainder going to the first ranks), so no two ranks hold the same amount
    when ``n`` allows it.
    """
    ranks = [r for r in range(k) if r != empty]
    wts = np.arange(1, len(ranks) + 1, dtype=F64)
    base = np.floor(n * wts / wts.sum()).astype(int)
    for i in range(n - int(base.sum())):
        base[i % len(ranks)] += 1
    out = [0] * k
    for r, c in zip(ranks, base):
        out[r] = int(c)
    assert sum(out) == n
    return out


def local_slice(counts: list[int], rank: int) -> slice:
    """Rows of the global batch that ``rank`` holds."""
    start = sum(counts[:rank])
    return slice(start, start + counts[rank])


def load_case(path) -> dict:
    """A conformance vector as a dict of arrays / Python scalars."""
    with np.load(path, allow_pickle=False) as z:
        return {k: (z[k].item() if z[k].ndim == 0 else z[k]) for k in z.files}


def case_paths() -> list[Path]:
    """Every conformance vector shipped with the tests."""
    return sorted(DATA.glob("*.npz"))


def step_counts(n: int, k: int, step: int) -> list[int]:
    """The split used for ``step`` of a conformance replay on ``k`` ranks.

    Step 0 is uneven with no empty rank (when ``n >= k``), the next steps
    each leave a different rank empty, so every run mixes both situations.
    """
    if k == 1:
        return [n]
    if step == 0 and n >= k:
        return split_counts(n, k)
    return split_counts(n, k, empty=(step * 2 + 1) % k)


def run_conformance_case(path, sbn, comm, rank: int, size: int, allsum) -> dict:
    """Replay vector ``path`` on this rank's share; return the worst errors.

    ``allsum(array)`` must sum a float64 array over the ranks (identity on one
    rank); the caller reduces the returned per-rank errors with MAX.
    Errors: ``y``/``dx`` max abs against the vector, ``dweight``/``dbias``
    max abs of the rank-summed local gradients, ``stats`` max relative error
    of the running statistics (floor 0.1 on the denominator), ``eval_self``
    max abs between the eval output and float64 normalization with this
    layer's own running statistics, and
    ``eval_ref`` max abs against the vector's ``y_eval``.
    """
    case = load_case(path)
    fmt = case["format"]
    dt = np.dtype(case["dtype"])
    momentum = case.get("momentum", case.get("momentum_paddle"))
    unbiased = bool(case.get("unbiased_running_var", False))
    affine = bool(case.get("affine", True))
    eps = float(case["epsilon"])
    layer = sbn.SyncBatchNorm(
        case["weight"].shape[0], epsilon=eps, momentum=momentum,
        weight_attr=None if affine else False, bias_attr=None if affine else False,
        data_format=fmt, comm=comm, unbiased_running_var=unbiased, dtype=dt,
    )
    c = case["weight"].shape[0]
    names = ("running_mean", "running_var") if unbiased else ("_mean", "_variance")
    layer.set_state_dict({
        "weight": case["weight"].astype(dt), "bias": case["bias"].astype(dt),
        names[0]: np.zeros(c, dt), names[1]: np.ones(c, dt),
    })
    err = dict.fromkeys(("y", "dx", "dweight", "dbias", "stats", "eval_self", "eval_ref"), 0.0)
    for s in range(int(case["steps"])):
        x, dy = case[f"x{s}"], case[f"dy{s}"]
        sl = local_slice(step_counts(x.shape[0], size, s), rank)
        layer.train()
        layer.clear_gradients()
        y = layer(np.ascontiguousarray(x[sl]))
        dx = layer.backward(np.ascontiguousarray(dy[sl]))
        assert y.dtype == dt and dx.dtype == dt and y.shape == x[sl].shape
        if y.size:
            err["y"] = max(err["y"], float(np.abs(y - case[f"y{s}"][sl]).max()))
            err["dx"] = max(err["dx"], float(np.abs(dx - case[f"dx{s}"][sl]).max()))
        if affine:
            g = allsum(np.concatenate([layer.weight.grad, layer.bias.grad]).astype(F64))
            err["dweight"] = max(err["dweight"], float(np.abs(g[:c] - case[f"dweight{s}"]).max()))
            err["dbias"] = max(err["dbias"], float(np.abs(g[c:] - case[f"dbias{s}"]).max()))
        else:
            assert layer.weight.grad is None and layer.bias.grad is None
        sd = layer.state_dict()
        for mine, ref in ((sd["_mean"], case[f"mean{s}"]), (sd["_variance"], case[f"variance{s}"])):
            # rtol 1e-6, with an absolute floor of 1e-7 for entries below 0.1
            # (a running mean near 0 is the cancellation of O(0.1) terms).
            rel = np.abs(mine.astype(F64) - ref) / np.maximum(np.abs(ref), 0.1)
            err["stats"] = max(err["stats"], float(rel.max()))
    if "x_eval" in case:
        n = case["x_eval"].shape[0]
        sl = local_slice(step_counts(n, size, 1), rank)
        layer.eval()
        ye = layer(np.ascontiguousarray(case["x_eval"][sl]))
        assert ye.dtype == dt
        if ye.size:
            sd = layer.state_dict()
            own = ref_eval(case["x_eval"][sl], fmt, sd["_mean"].astype(F64),
                           sd["_variance"].astype(F64), sd["weight"].astype(F64),
                           sd["bias"].astype(F64), eps)
            err["eval_self"] = float(np.abs(ye - own).max())
            err["eval_ref"] = float(np.abs(ye - case["y_eval"][sl]).max())
    return err


def tolerances(path) -> dict:
    """Tolerances for :func:`run_conformance_case`'s errors on vector ``path``.

    float32: 2e-5 absolute on O(1) values (a few float32 ulps of the two
    frameworks' different summation orders). float64: 1e-10. Running stats:
    rtol 1e-6 (Paddle keeps momentum in float32, see cupysyncbn/conformance/data/README.md).
    ``eval_ref``: the eval output of the vector inherits Paddle's running-stat
    rounding, |dy| <= |w| * 1e-6 * |mean| / sqrt(var + eps); bounded with the
    vector's own numbers, plus the base tolerance.
    """
    case = load_case(path)
    base = 2e-5 if case["dtype"] == "float32" else 1e-10
    tol = {"y": base, "dx": base, "dweight": base * 10, "dbias": base * 10,
           "stats": 1e-6, "eval_self": base}
    last = int(case["steps"]) - 1
    w = np.abs(case["weight"]).max()
    mean_rel = 1e-6 * np.abs(case[f"mean{last}"]).max() / np.sqrt(
        case[f"variance{last}"].min() + case["epsilon"])
    tol["eval_ref"] = base + w * mean_rel * 2
    return tol


def parse_result(stdout: str) -> dict:
    """The dict printed by ``mpi_cases.Checks.emit`` (name -> [value, bound, op])."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise AssertionError("no RESULT line in the job's output:\n" + stdout)
    return json.loads(lines[-1][len("RESULT "):])


def failures(result: dict) -> dict:
    """The checks whose value is outside the bound."""
    bad = {}
    for k, (v, b, op) in result.items():
        ok = v <= b if op == "le" else v >= b
        if not ok:
            bad[k] = (v, op, b)
    return bad


def check_group(result: dict, prefix: str, min_count: int = 1) -> None:
    """Assert every check whose name starts with ``prefix`` passed (and there are some)."""
    group = {k: v for k, v in result.items() if k.startswith(prefix)}
    assert len(group) >= min_count, f"only {len(group)} checks named {prefix!r}"
    bad = failures(group)
    assert not bad, f"{len(bad)} of {len(group)} {prefix!r} checks failed: {bad}"


class ThreadGroup:
    """An in-process group of ``size`` ranks run as threads (no MPI needed).

    ``member(r)`` is a cupysyncbn ``Communicator`` whose ``allreduce_sum`` sums
    the ranks' buffers in rank order, so every rank gets bitwise the same
    result, like a real all-reduce. A barrier timeout turns a hang into an
    error. :meth:`run` calls ``fn(rank, comm)`` on every rank and returns the
    results in rank order (re-raising the first exception).
    """

    def __init__(self, size: int, timeout: float = 20.0):
        import threading

        self.size = size
        self.slots: list = [None] * size
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.calls = [0] * size

    def member(self, rank: int):
        from cupysyncbn.comm.base import Communicator

        group = self

        class Member(Communicator):
            backend = "threads"

            def allreduce_sum(self, buf):
                return self._reduce(buf, np.add)

            def allreduce_max(self, buf):
                return self._reduce(buf, np.maximum)

            def _reduce(self, buf, op):
                group.calls[rank] += 1
                group.slots[rank] = np.array(buf, copy=True)
                group.barrier.wait()
                total = group.slots[0].copy()
                for other in group.slots[1:]:
                    total = op(total, other)
                group.barrier.wait()
                buf[...] = total
                return buf

        m = Member()
        m.rank, m.size = rank, self.size
        return m

    def run(self, fn):
        import threading

        results: list = [None] * self.size
        errors: list = [None] * self.size

        def body(r):
            try:
                results[r] = fn(r, self.member(r))
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors[r] = e
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for e in errors:
            if e is not None and not isinstance(e, threading.BrokenBarrierError):
                raise e
        for e in errors:
            if e is not None:
                raise e
        return results


def relu_batch(shape, fmt, dtype, seed, eval_stats=None, delta=0.05):
    """``(x, dy, weight, bias)`` for ``act="relu"`` tests: no pre-activation near 0.

    A pre-activation within rounding of 0 could fall on either side of the
    ReLU in two correct implementations; inputs are moved (iteratively, the
    batch statistics move with them) until every ``|bn(x)| >= delta``.
    ``eval_stats=(mean, var)``: the running statistics the pass uses
    instead of the batch's. Weights have both signs.
    """
    rng = np.random.default_rng(seed)
    ca = channel_axis(fmt, len(shape))
    c = shape[ca]
    w = rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)
    b = rng.uniform(-0.8, 0.8, c)
    x = rng.standard_normal(shape) * 2.0 + 0.5
    for _ in range(20):
        if eval_stats is None:
            pre, mean, var, _ = ref_forward(x, fmt, w, b)
        else:
            mean, var = eval_stats
            pre = ref_eval(x, fmt, mean, var, w, b)
        near = np.abs(pre) < delta
        if not near.any():
            break
        step = 3 * delta * np.sqrt(_b(var, x.ndim, ca) + 1e-5) / _b(w, x.ndim, ca)
        push = np.where(pre >= 0, 1.0, -1.0) * np.broadcast_to(step, x.shape)
        x = np.where(near, x + push, x)
    else:  # pragma: no cover - the loop converges in a few steps
        raise AssertionError("relu_batch: could not move the inputs off the kink")
    dy = rng.standard_normal(shape)
    return x.astype(dtype), dy.astype(dtype), w, b


def ref_relu(x, dy, fmt, weight, bias, eval_stats=None, eps=1e-5):
    """Float64 ``relu(bn(x))`` and its gradient: ``(y, dx, dweight, dbias)``.

    Training statistics of the global batch, or ``eval_stats=(mean, var)``.
    """
    x = np.asarray(x, F64)
    dy = np.asarray(dy, F64)
    ca = channel_axis(fmt, x.ndim)
    axes = tuple(i for i in range(x.ndim) if i != ca)
    if eval_stats is None:
        pre = ref_forward(x, fmt, weight, bias, eps)[0]
        g = np.where(pre > 0, dy, 0.0)
        dx, dw, db = ref_backward(x, g, fmt, weight, eps)
        return np.maximum(pre, 0.0), dx, dw, db
    mean, var = (np.asarray(v, F64) for v in eval_stats)
    pre = ref_eval(x, fmt, mean, var, weight, bias, eps)
    g = np.where(pre > 0, dy, 0.0)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - _b(mean, x.ndim, ca)) * _b(invstd, x.ndim, ca)
    dx = g * _b(np.asarray(weight, F64) * invstd, x.ndim, ca)
    return np.maximum(pre, 0.0), dx, (g * xhat).sum(axis=axes), g.sum(axis=axes)
