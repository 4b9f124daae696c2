"""Issue #23 item 2 / SPEC §5: finite inputs give finite outputs and gradients.

Adversarial channels (float32 values of +-3.4e38, a float32 subnormal spread
with ``epsilon=0``, float64 spreads of 1e160 and +-1e300, constant channels,
float64 subnormal spreads, beside ordinary channels) on the NumPy and numba
backends, on 1 and 2 ranks (a real ``mpiexec``). Checked: y, dx, running
statistics finite; y and dx equal across backends and rank counts within the
dtype's tolerance; y and dx exact against a reference computed with exact
rationals (``fractions``) where the true values are representable; dx
saturated at the dtype's largest value where the true one is not; the
running variance clamped to its dtype's largest value where the true
variance is beyond it.
"""

import json
import math
from fractions import Fraction

import numpy as np
import pytest
from support.mpi_runner import run_mpi

F32 = np.finfo(np.float32)
N = 8


def table(dtype):
    """Columns (channels) of an (N, C) batch: name -> values."""
    rng = np.random.default_rng(11)
    if dtype == np.float32:
        big = F32.max
        cols = {
            "f32 +-max": [big, -big, big, big, -big, 1.0, 0.0, big],
            "f32 1e20": rng.standard_normal(N) * 1e20,
            "f32 subnormal spread": np.arange(N) * F32.smallest_subnormal,
            "f32 constant": np.full(N, 7.0),
            "f32 normal": rng.standard_normal(N) * 3 + 1,
            "f32 tiny 1e-30": rng.standard_normal(N) * 1e-30,
        }
    else:
        cols = {
            "f64 1e160": rng.standard_normal(N) * 1e160,
            "f64 +-1e300": [1e300, -1e300, 1e300, 1e300, -1e300, 1.0, 0.0, 1.7e308],
            "f64 subnormal spread": np.arange(N) * 5e-324,
            "f64 constant": np.full(N, 0.1),
            "f64 normal": rng.standard_normal(N) * 3 + 1,
            "f64 tiny 1e-200": rng.standard_normal(N) * 1e-200,
        }
    names = list(cols)
    x = np.stack([np.asarray(cols[k], dtype=np.float64) for k in names], axis=1).astype(dtype)
    return names, x


def _dy(x, dt):
    """Upstream gradients, not a linear function of x (that would make dx 0 exactly)."""
    return np.random.default_rng(5).standard_normal(x.shape).astype(dt)


SNIPPET = r"""
import json, sys
import numpy as np
from mpi4py import MPI
sys.path.insert(0, sys.argv[1])
import cupysyncbn as sbn
from test_finite import _dy, table
comm = MPI.COMM_WORLD
r, k = comm.rank, comm.size
cut = [0, 3, 8] if k == 2 else [0, 8]
out = {}
for dt in (np.float32, np.float64):
    names, x = table(dt)
    c = x.shape[1]
    dy = _dy(x, dt)
    for eps in (1e-5, 0.0):
        for pdt in ("float32", "float64"):
            rm, rv = np.zeros(c, pdt), np.ones(c, pdt)
            res = sbn.functional.batch_norm_forward(
                x[cut[r]:cut[r + 1]], running_mean=rm, running_var=rv, training=True,
                momentum=0.5, epsilon=eps, data_format="NC", comm=comm,
                weight=np.linspace(0.5, 2, c).astype(pdt), bias=np.full(c, 0.25, pdt))
            dx, dw, db = sbn.functional.batch_norm_backward(dy[cut[r]:cut[r + 1]], res.ctx)
            y = np.concatenate(comm.allgather(res.y))
            dx = np.concatenate(comm.allgather(dx))
            key = f"{np.dtype(dt).name}/{eps}/{pdt}"
            out[key] = {"y": y.astype(np.float64).tolist(), "dx": dx.astype(np.float64).tolist(),
                        "rm": res.running_mean.astype(np.float64).tolist(),
                        "rv": res.running_var.astype(np.float64).tolist(),
                        "dw": float(np.isfinite(comm.allreduce(dw)).all())}
if r == 0:
    print("RESULT " + json.dumps(out))
"""


def _run(tmp_path, k, backend):
    here = str(__import__("pathlib").Path(__file__).parent)
    res = run_mpi(SNIPPET, k, timeout=300, tmp_path=tmp_path, args=(here,),
                  env={"CUPYSYNCBN_CPU_BACKEND": backend})
    line = [s for s in res.stdout.splitlines() if s.startswith("RESULT ")]
    assert line, res.stdout + res.stderr
    return json.loads(line[0][7:])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finite")
    return {(k, b): _run(tmp, k, b) for k in (1, 2) for b in ("numpy", "numba")}


def _float(q):
    try:
        return float(q)
    except OverflowError:
        return math.inf if q > 0 else -math.inf


def _exact(col, dycol, eps, w):
    """Exact-rational mean/var; y and dx to ~2 float64 ulps, computed at unit scale."""
    xs = [Fraction(float(v)) for v in col]
    n = len(xs)
    mean = sum(xs) / n
    var = sum((v - mean) ** 2 for v in xs) / n
    ve = var + Fraction(eps)
    if ve == 0:
        return None, None, var, mean
    # a power of two s with ve * s^2 near 1: every float conversion is normal
    e = (ve.numerator.bit_length() - ve.denominator.bit_length()) // 2
    s = Fraction(2) ** -e
    sd_s = math.sqrt(float(ve * s * s))  # std * s
    xhat = [float((v - mean) * s) / sd_s for v in xs]
    dys = [Fraction(float(d)) for d in dycol]
    mdy = sum(dys) / n
    mdx = sum(d * Fraction(h) for d, h in zip(dys, xhat)) / n
    try:
        inv = math.ldexp(1.0 / sd_s, -e)  # the true invstd, rounded once
    except OverflowError:
        inv = math.inf  # beyond float64 (a subnormal spread with eps=0)
    dx = [w * inv * float(d - mdy - Fraction(h) * mdx) for d, h in zip(dys, xhat)]
    return xhat, dx, var, mean


@pytest.mark.mpi
@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_finite_in_finite_out(results, dt):
    names, x = table(np.dtype(dt))
    c = x.shape[1]
    dy = _dy(x, dt)
    big = float(np.finfo(dt).max)
    ytol = 1e-6 if dt == "float32" else 1e-12
    for eps in (1e-5, 0.0):
        for pdt in ("float32", "float64"):
            key = f"{dt}/{eps}/{pdt}"
            w = np.linspace(0.5, 2, c).astype(pdt).astype(np.float64)
            runs = {rk: {f: np.array(v) for f, v in res[key].items()}
                    for rk, res in results.items()}
            for rk, got in runs.items():
                for f in ("y", "dx", "rm", "rv"):
                    assert np.isfinite(got[f]).all(), (key, rk, f, got[f])
                assert got["dw"] == 1.0
            exact = [_exact(x[:, j], dy[:, j], eps, w[j]) for j in range(c)]
            # var + eps == 0 (a constant channel with eps=0) has no defined
            # normalization: only finite (documented in docs/failure.md)
            defined = [j for j in range(c) if exact[j][0] is not None]
            # dx beyond the dtype (a subnormal spread with eps=0): saturated,
            # its finite entries carry the cancellation of a 1e323 scale
            fits = [j for j in defined if np.all(np.abs(exact[j][1]) < big)]
            base = runs[(1, "numpy")]
            for rk, got in runs.items():  # backends and rank counts agree
                np.testing.assert_allclose(got["y"][:, defined], base["y"][:, defined], rtol=0,
                                           atol=4 * ytol, err_msg=f"{key} {rk} y")
                scale = np.abs(base["dx"][:, fits]).max(axis=0)
                assert np.all(np.abs(got["dx"][:, fits] - base["dx"][:, fits])
                              <= 8 * ytol * scale + 1e-300), (key, rk, "dx")
            for j, name in enumerate(names):
                xhat, dxr, var, mean = exact[j]
                for rk, got in runs.items():
                    what = f"{key} {rk} {name}"
                    y = got["y"][:, j]
                    if xhat is not None:
                        yr = np.array(xhat) * w[j] + 0.25
                        assert np.abs(y - yr).max() <= ytol * (1 + np.abs(yr).max()), (
                            what, y, yr)
                        dxr_a = np.array(dxr)
                        ok = np.abs(dxr_a) < big
                        d = got["dx"][:, j]
                        assert np.all(np.abs(d[ok] - dxr_a[ok])
                                      <= 8 * ytol * np.abs(dxr_a).max() + 1e-300), (what, d, dxr_a)
                        # not representable: saturated with the right sign
                        assert np.all(d[~ok] == np.sign(dxr_a[~ok]) * big), (what, d, dxr_a)
                    pbig = float(np.finfo(pdt).max)
                    # documented: a batch variance beyond float64 counts as its
                    # largest value; the running variance is clamped to its dtype
                    bvar = min(_float(var), float(np.finfo(np.float64).max))
                    rv_true = bvar / 2 + 0.5
                    if rv_true >= pbig:
                        assert got["rv"][j] == pbig, (what, got["rv"][j])
                    else:
                        assert got["rv"][j] == pytest.approx(rv_true, rel=1e-5), what
                    tiny = 2 * float(np.finfo(pdt).smallest_subnormal)
                    rm_true = float(mean) / 2
                    if abs(rm_true) >= pbig:  # beyond the running mean's dtype: clamped
                        assert got["rm"][j] == math.copysign(pbig, rm_true), what
                    else:
                        assert got["rm"][j] == pytest.approx(rm_true, rel=1e-5, abs=tiny), what
