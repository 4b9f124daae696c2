"""``act="relu"``: the ReLU fused into the normalize pass, its mask into the backward.

Every CPU backend (NumPy, numba), every data format (2-D to 5-D, channels
first and last), training, eval (running statistics) and eval with batch
statistics, float32 and float64: ``y`` and the gradients equal

* the float64 ``relu(bn(x))`` of the global batch and its gradient
  (``support.bn_ref.ref_relu``),
* the unfused composition on the same backend (``np.maximum(bn(x), 0)``,
  then the backward of ``dy * (y > 0)``),
* PyTorch CPU ``F.relu(F.batch_norm(...))`` with autograd,

on one process and on two ranks (one ``mpiexec`` job for every case). The
CUDA kernels are checked the same way in the emulation
(``tests/backends/test_cuda_kernels_emulated.py``,
``tests/_sync/test_launch_budget.py``).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from support import bn_ref
from support.mpi_runner import run_mpi

from cupysyncbn import functional as F
from cupysyncbn.backends import get_backend

CASES = {"NC": (6, 3), "NCL": (3, 4, 5), "NCHW": (2, 3, 4, 5), "NCDHW": (2, 2, 3, 2, 4),
         "NLC": (3, 5, 4), "NHWC": (2, 4, 3, 3), "NDHWC": (2, 2, 3, 2, 3)}
MODES = ("train", "eval", "eval_batch")
#: fused vs unfused on one backend (the NumPy channel-first fold rounds differently)
SAME = {"float32": 3e-6, "float64": 1e-12}
#: against float64 truth and PyTorch
TRUTH = {"float32": 2e-4, "float64": 1e-9}


def _stats(c, seed):
    rng = np.random.default_rng(seed + 100)
    return rng.uniform(-0.5, 0.5, c), rng.uniform(0.5, 2.0, c)


def _case(fmt, dt, mode, seed=0, shape=None):
    shape = shape or CASES[fmt]
    c = shape[bn_ref.channel_axis(fmt, len(shape))]
    stats = _stats(c, seed) if mode == "eval" else None
    x, dy, w, b = bn_ref.relu_batch(shape, fmt, dt, seed, eval_stats=stats)
    return x, dy, w, b, stats


def _run(x, dy, w, b, stats, fmt, dt, mode, act, comm=None):
    """One forward + backward through the functional API: ``(y, dx, dw, db)``."""
    rm = rv = None
    if stats is not None:
        rm, rv = (s.astype(dt) for s in stats)
    res = F.batch_norm_forward(
        x, w.astype(dt), b.astype(dt), rm, rv, training=mode == "train", data_format=fmt,
        act=act, comm=comm,
    )
    g = dy if act else np.where(res.y > 0, dy, 0).astype(dy.dtype)
    dx, dw, db = F.batch_norm_backward(g, res.ctx)
    y = res.y if act else np.maximum(res.y, 0)
    return y, dx, dw, db


def _torch(x, dy, w, b, stats, fmt, mode):
    """PyTorch CPU ``relu(batch_norm)`` and its autograd gradients (channels moved first)."""
    ca = bn_ref.channel_axis(fmt, x.ndim)
    xt = torch.from_numpy(np.moveaxis(x, ca, 1).copy()).requires_grad_()
    dyt = torch.from_numpy(np.moveaxis(dy, ca, 1).copy())
    wt = torch.tensor(w, dtype=xt.dtype, requires_grad=True)
    bt = torch.tensor(b, dtype=xt.dtype, requires_grad=True)
    rm = rv = None
    if stats is not None:
        rm, rv = (torch.tensor(s, dtype=xt.dtype) for s in stats)
    y = torch.relu(torch.nn.functional.batch_norm(
        xt, rm, rv, wt, bt, training=mode != "eval", eps=1e-5))
    y.backward(dyt)
    y, gx = (np.moveaxis(t.detach().numpy(), 1, ca) for t in (y, xt.grad))
    return y, gx, wt.grad.numpy(), bt.grad.numpy()


@pytest.fixture(params=["numpy", "numba"])
def cpu(request, monkeypatch):
    monkeypatch.setenv("CUPYSYNCBN_CPU_BACKEND", request.param)
    want = {"numpy": "NumpyBackend", "numba": "NumbaBackend"}[request.param]
    assert type(get_backend(np.zeros(1))).__name__ == want
    return request.param


def _close(got, want, tol, what):
    for name, a, e in zip(("y", "dx", "dweight", "dbias"), got, want):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        scale = max(1.0, float(np.abs(e).max()) if e.size else 1.0)
        np.testing.assert_allclose(a, e, rtol=tol, atol=tol * scale, err_msg=f"{what}: {name}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dt", ["float32", "float64"])
@pytest.mark.parametrize("fmt", list(CASES))
def test_relu_equals_truth_unfused_and_torch(cpu, fmt, dt, mode):
    x, dy, w, b, stats = _case(fmt, dt, mode)
    fused = _run(x, dy, w, b, stats, fmt, dt, mode, "relu")
    assert fused[0].dtype == x.dtype and fused[1].dtype == x.dtype
    assert (fused[0] >= 0).all() and (fused[0] == 0).any() and (fused[0] > 0).any()
    _close(fused, _run(x, dy, w, b, stats, fmt, dt, mode, None), SAME[dt], "unfused")
    _close(fused, bn_ref.ref_relu(x, dy, fmt, w, b, stats), TRUTH[dt], "float64 truth")
    _close(fused, _torch(x, dy, w, b, stats, fmt, mode), TRUTH[dt], "torch")


def test_relu_large_inputs_take_the_streamed_and_blocked_kernels(cpu):
    # Outputs of STREAM_MIN_BYTES and more (streamed numba writers), long
    # channel-last rows (register blocks), rows regrouped into wide rows.
    for fmt, shape in (("NCHW", (4, 8, 128, 64)), ("NHWC", (2, 40, 40, 1040)),
                       ("NHWC", (4, 64, 64, 5))):
        x, dy, w, b, stats = _case(fmt, "float32", "train", seed=3, shape=shape)
        fused = _run(x, dy, w, b, stats, fmt, "float32", "train", "relu")
        _close(fused, _run(x, dy, w, b, stats, fmt, "float32", "train", None), 1e-5, fmt)
        _close(fused, bn_ref.ref_relu(x, dy, fmt, w, b), 2e-4, fmt)


def test_relu_keeps_nan_and_masks_every_sum(cpu):
    # NaN passes the ReLU (as torch.relu); dy is zeroed before both backward
    # sums, so dweight/dbias are those of the masked dy.
    x = np.array([[-3.0, 1.0], [0.0, 2.0], [3.0, np.nan]], np.float32)
    res = F.batch_norm_forward(x, data_format="NC", act="relu")
    assert np.isnan(res.y[:, 1]).all() and res.y[0, 0] == 0 and res.y[2, 0] > 0
    dy = np.ones_like(x)
    dx, dw, db = F.batch_norm_backward(dy, res.ctx)
    assert db[0] == 1.0  # one element of channel 0 is above 0
    assert np.isfinite(dx[:, 0]).all()


@pytest.mark.parametrize("act", ["Relu", "gelu", "", 1, True, ("relu",)])
def test_bad_act_raises_naming_it(act):
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"act must be None or 'relu'"):
        F.batch_norm_forward(x, data_format="NC", act=act)


MPI_ALL = r"""
import json, os, sys
import numpy as np
from mpi4py import MPI
sys.path.insert(0, sys.argv[1])
from support import bn_ref
from test_relu import CASES, MODES, _case, _run
comm = MPI.COMM_WORLD
r, k = comm.rank, comm.size
out = {}
for backend in ("numpy", "numba"):
    os.environ["CUPYSYNCBN_CPU_BACKEND"] = backend  # the backend is chosen per pass
    for fmt in CASES:
        for dt in ("float32", "float64"):
            for mode in MODES:
                x, dy, w, b, stats = _case(fmt, dt, mode, seed=7)
                # uneven, and an empty rank for two formats
                empty = 1 if fmt in ("NCHW", "NHWC") else None
                cut = bn_ref.split_counts(x.shape[0], k, empty=empty)
                sl = bn_ref.local_slice(cut, r)
                y, dx, dw, db = _run(x[sl], dy[sl], w, b, stats, fmt, dt, mode, "relu", comm)
                y, dx = (np.concatenate(comm.allgather(a)) for a in (y, dx))
                dw, db = (comm.allreduce(np.asarray(a, np.float64)) for a in (dw, db))
                out[f"{backend}/{fmt}/{dt}/{mode}"] = [
                    a.astype(np.float64).ravel().tolist() for a in (y, dx, dw, db)]
if r == 0:
    print("RESULT " + json.dumps(out))
"""


@pytest.mark.parametrize("ranks", [2])
def test_relu_on_two_ranks_every_case(tmp_path, ranks):
    here = str(Path(__file__).parent)
    res = run_mpi(MPI_ALL, ranks, timeout=600, tmp_path=tmp_path, args=(here,))
    line = [s for s in res.stdout.splitlines() if s.startswith("RESULT ")]
    assert line, res.stdout + res.stderr
    got = json.loads(line[0][7:])
    assert len(got) == 2 * len(CASES) * 2 * len(MODES)
    for key, vals in got.items():
        _, fmt, dt, mode = key.split("/")
        x, dy, w, b, stats = _case(fmt, dt, mode, seed=7)
        want = bn_ref.ref_relu(x, dy, fmt, w, b, stats)
        _close([np.array(v) for v in vals], [np.ravel(a) for a in want], TRUTH[dt], key)


MPI_BAD = r"""
import numpy as np
from mpi4py import MPI
from cupysyncbn import functional as F
comm = MPI.COMM_WORLD
x = np.ones((3, 2), np.float32) * (comm.rank + np.arange(3)[:, None])
try:
    F.batch_norm_forward(x, data_format="NC", comm=comm, act="gelu" if comm.rank else "relu")
    print(f"RANK {comm.rank} no error", flush=True)
except ValueError as e:  # RemoteInputError is one too
    print(f"RANK {comm.rank} {type(e).__name__}: {e}", flush=True)
"""


def test_bad_act_on_one_rank_raises_on_every_rank(tmp_path):
    res = run_mpi(MPI_BAD, 2, timeout=120, tmp_path=tmp_path)
    assert "RANK 1 ValueError: act must be None or 'relu'" in res.stdout, res.stdout
    assert "RANK 0 RemoteInputError:" in res.stdout, res.stdout
