"""The CuPy path (our CUDA kernels) equals the NumPy path on the same data.

Needs a CUDA GPU; skipped with the reason otherwise. Covers every data
format and input dtype (float16/32/64, float32 and float64 layers), train and
eval, forward and backward, non-contiguous inputs, the grid shapes of the
reductions (small C / large S, large C, C > 65535), numerical stability, the
layer API on ``cuda``, and one large tensor (over 2^31 elements when the GPU
has the memory, else 256M) against a float64 reference of its statistics.
"""

import numpy as np
import pytest
from support.bn_ref import ref_backward, ref_forward


def _gpu_skip_reason():
    try:
        import cupy
    except Exception as e:  # ImportError or a broken CUDA install
        return f"CuPy is not importable ({type(e).__name__}: {e})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"no usable CUDA GPU ({type(e).__name__}: {e})"
    return None if n > 0 else "no CUDA GPU on this machine"


REASON = _gpu_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=str(REASON))]

if REASON is None:
    import cupy as cp

    from cupysyncbn import functional as F
    from cupysyncbn.backends import NUMPY_BACKEND
    from cupysyncbn.backends.cupy.backend import get_cupy_backend
    from cupysyncbn.comm.base import LOCAL

SHAPES = {
    "NC": [(64, 5), (3, 1000)],
    "NCL": [(4, 3, 1000), (2, 300, 7), (5, 2, 1)],
    "NCHW": [(2, 3, 33, 17), (1, 2, 64, 65)],
    "NCDHW": [(2, 3, 4, 5, 6)],
    "NLC": [(4, 50, 3)],
    "NHWC": [(2, 16, 16, 5), (2, 4, 4, 67)],
    "NDHWC": [(2, 3, 4, 5, 6)],
}
CASES = [(f, s) for f, shapes in SHAPES.items() for s in shapes]
# (input dtype, layer dtype)
DTYPES = [("float16", "float32"), ("float32", "float32"), ("float64", "float64"),
          ("float32", "float64"), ("float16", "float64"), ("float64", "float32")]
# Max error relative to max(1, |reference|): elementwise outputs (input dtype)
# and per-channel results (compute dtype).
OUT_TOL = {"float16": 8e-3, "float32": 2e-5, "float64": 1e-11}
VEC_TOL = {"float32": 2e-5, "float64": 1e-11}


def _close(got, ref, tol, what):
    got = cp.asnumpy(got) if isinstance(got, cp.ndarray) else np.asarray(got)
    got, ref = got.astype(np.float64), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, what
    assert np.all(np.isfinite(got)), what
    err = np.max(np.abs(got - ref)) / max(1.0, np.max(np.abs(ref))) if ref.size else 0.0
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def _data(shape, dtype, seed, offset=3.0, scale=2.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale + offset).astype(dtype)


def _params(c, pdt, seed):
    rng = np.random.default_rng(seed)
    return [rng.uniform(0.5, 1.5, c).astype(pdt), rng.uniform(-1, 1, c).astype(pdt),
            rng.uniform(-1, 1, c).astype(pdt), rng.uniform(0.5, 2, c).astype(pdt)]


def _run(x, dy, params, fmt, training):
    w, b, rm, rv = params
    res = F.batch_norm_forward(x, w, b, rm, rv, training=training, momentum=0.9,
                               epsilon=1e-5, data_format=fmt, comm=LOCAL)
    dx, dw, db = F.batch_norm_backward(dy, res.ctx)
    return res.y, res.running_mean, res.running_var, dx, dw, db


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: f"{d[0]}-{d[1]}")
@pytest.mark.parametrize("fmt,shape", CASES, ids=lambda v: str(v))
def test_gpu_functional_equals_numpy(fmt, shape, dt, training):
    idt, pdt = dt
    c = shape[-1] if fmt.endswith("C") else shape[1]
    x = _data(shape, idt, 1)
    dy = _data(shape, idt, 2, offset=0.1, scale=1.0)
    params = _params(c, pdt, 3)
    ref = _run(x, dy, params, fmt, training)
    got = _run(cp.asarray(x), cp.asarray(dy), [cp.asarray(p) for p in params], fmt, training)
    cdt = "float64" if "float64" in dt else "float32"
    names = ("y", "running_mean", "running_var", "dx", "dweight", "dbias")
    for name, g, r in zip(names, got, ref):
        assert isinstance(g, cp.ndarray), name
        assert g.dtype == r.dtype, name
        # per-channel results are computed in cdt and stored in pdt
        tol = OUT_TOL[idt] if name in ("y", "dx") else VEC_TOL[min(cdt, pdt)]
        _close(g, r, tol, f"{fmt}{shape} {idt}/{pdt} {'train' if training else 'eval'} {name}")
    if training and idt != "float16":
        # and both equal the float64 textbook formulas
        y64, *_ = ref_forward(x, fmt, params[0], params[1])
        dx64, dw64, db64 = ref_backward(x, dy, fmt, params[0])
        _close(got[0], y64, 10 * OUT_TOL[idt], "y vs float64 reference")
        _close(got[3], dx64, 10 * OUT_TOL[idt], "dx vs float64 reference")


# Canonical (N, C, S) and (M, C) shapes: G > 1 along S and along N, large C,
# C beyond the 65535 grid limit, S = 1, a single element.
PRIM_SHAPES = [(1, 1, 1 << 22), (300, 2, 999), (3, 70000, 3), (2, 4096, 49), (7, 3, 1),
               (1 << 16, 2), (1 << 14, 67), (9, 70000), (1, 1)]


@pytest.mark.parametrize("shape", PRIM_SHAPES, ids=str)
@pytest.mark.parametrize("idt", ["float16", "float32", "float64"])
def test_gpu_primitives_equal_float64_truth(shape, idt):
    channel_last = len(shape) == 2
    be = get_cupy_backend()
    x = _data(shape, idt, 4)
    dy = _data(shape, idt, 5, offset=0.0, scale=1.0)
    cdt = np.dtype("float64" if idt == "float64" else "float32")
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    axes = (0,) if channel_last else (0, 2)
    n = x.size // x.shape[1]
    mean64 = x64.mean(axis=axes)
    bshape = (1, -1) if channel_last else (1, -1, 1)
    xc = x64 - mean64.reshape(bshape)
    m2_64 = (xc * xc).sum(axis=axes)
    gx = cp.asarray(x)
    mean, m2 = be.moments(gx, channel_last, cdt)
    assert mean.dtype == m2.dtype == np.float64
    tol = VEC_TOL[cdt.name]
    _close(mean, mean64, tol, "mean")
    _close(m2 / n, m2_64 / n, 10 * tol, "m2/n")
    # the NumPy backend agrees too
    nm, nm2 = NUMPY_BACKEND.moments(x, channel_last, cdt)
    _close(mean, nm, 2 * tol, "mean vs numpy backend")
    mean_c = mean64.astype(cdt)
    invstd = (1 / np.sqrt(m2_64 / n + 1e-5)).astype(cdt)
    sdy, sdyx = be.backward_reduce(cp.asarray(dy), gx, channel_last, cp.asarray(mean_c),
                                   cp.asarray(invstd))
    ref_sdy = dy64.sum(axis=axes)
    ref_sdyx = (dy64 * (x64 - mean_c.astype(np.float64).reshape(bshape))).sum(axis=axes) \
        * invstd.astype(np.float64)
    scale = np.sqrt(n)  # sums of n unit-variance terms
    _close(sdy / scale, ref_sdy / scale, 10 * tol, "sum_dy")
    _close(sdyx / scale, ref_sdyx / scale, 10 * tol, "sum_dy_xhat")
    vecs = [v.astype(cdt) for v in _params(x.shape[1], np.float64, 6)]
    y = be.normalize(gx, channel_last, *(cp.asarray(v) for v in vecs[:3]), np.dtype(idt))
    yref = (x64 - vecs[0].reshape(bshape)) * vecs[1].reshape(bshape) + vecs[2].reshape(bshape)
    _close(y, yref, OUT_TOL[idt], "normalize")
    a, mdy, b = vecs[1], vecs[2], vecs[3]
    dx = be.backward_elemt(cp.asarray(dy), gx, channel_last, cp.asarray(vecs[0]), cp.asarray(a),
                           cp.asarray(mdy), cp.asarray(b), np.dtype(idt))
    dxref = a.reshape(bshape) * (dy64 - mdy.reshape(bshape)) \
        - b.reshape(bshape) * (x64 - vecs[0].reshape(bshape))
    _close(dx, dxref, OUT_TOL[idt], "backward_elemt")


def test_gpu_noncontiguous_inputs():
    x = _data((4, 6, 10, 8), "float32", 7)
    dy = _data((4, 6, 10, 8), "float32", 8, offset=0.0)
    gx = cp.asarray(x).transpose(0, 3, 2, 1)  # NHWC view of NCHW memory
    gdy = cp.asarray(dy).transpose(0, 3, 2, 1)
    assert not gx.flags.c_contiguous
    params = _params(6, "float32", 9)
    ref = _run(np.ascontiguousarray(x.transpose(0, 3, 2, 1)),
               np.ascontiguousarray(dy.transpose(0, 3, 2, 1)), params, "NHWC", True)
    got = _run(gx, gdy, [cp.asarray(p) for p in params], "NHWC", True)
    for g, r in zip(got, ref):
        _close(g, r, 2e-5, "non-contiguous")


def test_gpu_stability_large_mean():
    # float32 data with mean 1e4 and std 1: variance within 1e-3 of the truth.
    x = _data((16, 3, 64, 64), "float32", 10, offset=1e4, scale=1.0)
    res = F.batch_norm_forward(cp.asarray(x), training=True, data_format="NCHW", comm=LOCAL)
    truth = x.astype(np.float64).var(axis=(0, 2, 3))
    rel = np.abs(cp.asnumpy(res.batch_var) - truth) / truth
    assert rel.max() < 1e-3, rel


def test_gpu_layer_to_cuda_matches_cpu_layer():
    import cupysyncbn as sbn

    x = _data((4, 5, 6, 7), "float32", 11)
    dy = _data((4, 5, 6, 7), "float32", 12, offset=0.0)
    cpu = sbn.SyncBatchNorm(5, comm=LOCAL)
    gpu = sbn.SyncBatchNorm(5, comm=LOCAL).to("cuda")
    assert isinstance(gpu.weight.data, cp.ndarray)
    for _ in range(2):  # second step runs the shifted one-pass path
        y_c, y_g = cpu(x), gpu(cp.asarray(x))
        dx_c, dx_g = cpu.backward(dy), gpu.backward(cp.asarray(dy))
        _close(y_g, y_c, 2e-5, "layer y")
        _close(dx_g, dx_c, 2e-5, "layer dx")
    sd_c, sd_g = cpu.state_dict(), gpu.state_dict()
    for k in sd_c:
        _close(sd_g[k], sd_c[k], 2e-5, f"state {k}")
    _close(gpu.weight.grad, cpu.weight.grad, 2e-5, "weight.grad")
    _close(gpu.bias.grad, cpu.bias.grad, 2e-5, "bias.grad")
    gpu.eval()
    cpu.eval()
    _close(gpu(cp.asarray(x)), cpu(x), 2e-5, "eval y")


def _chunked_channel_stats(x, channel_last):
    """Float64 two-pass statistics of a huge float16 array, in slices."""
    c = x.shape[-1] if channel_last else x.shape[1]
    axes = (0,) if channel_last else (0, 2)
    step = max(1, (1 << 26) // (x[0].size))
    s = cp.zeros(c, dtype=cp.float64)
    for i in range(0, x.shape[0], step):
        s += x[i:i + step].astype(cp.float64).sum(axis=axes)
    n = x.size // c
    mean = s / n
    bshape = (1, -1) if channel_last else (1, -1, 1)
    q = cp.zeros(c, dtype=cp.float64)
    for i in range(0, x.shape[0], step):
        d = x[i:i + step].astype(cp.float64) - mean.reshape(bshape)
        q += (d * d).sum(axis=axes)
    return mean, q, n


@pytest.mark.slow
def test_gpu_large_tensor_against_float64_reference():
    free, _ = cp.cuda.runtime.memGetInfo()
    # float16 x, y and dx (3 x 2 bytes per element) plus float64 slices.
    big = (1 << 31) + (1 << 21)
    _check_large(big if free > 3 * 2 * big + (4 << 30) else (1 << 28))


def _check_large(total, c=4, s=1 << 16):
    n = total // (c * s)
    shape = (n, c, s)
    x = cp.empty(shape, dtype=cp.float16)
    rs = cp.random.RandomState(13)
    for i in range(n):  # fill in slices: no float32 copy of the whole tensor
        x[i] = (rs.standard_normal((c, s), dtype=cp.float32) * 2 + 3).astype(cp.float16)
    be = get_cupy_backend()
    f32 = np.dtype(np.float32)
    print(f"large case: {x.size} elements ({x.size / 2**31:.3f} x 2^31)")
    for channel_last, v in ((False, x), (True, x.reshape(-1, 2 * c))):
        mean64, m2_64, cnt = _chunked_channel_stats(v, channel_last)
        mean, m2 = be.moments(v, channel_last, f32)
        rel_mean = float(cp.max(cp.abs(mean - mean64) / cp.sqrt(m2_64 / cnt)))
        rel_var = float(cp.max(cp.abs(m2 - m2_64) / m2_64))
        assert rel_mean < 1e-4 and rel_var < 1e-4, (channel_last, rel_mean, rel_var)
        # dy = x: sum(dy) = n * mean and sum(dy * (x - mean)) = M2 (exactly, in float64)
        invstd = cp.ones(v.shape[1], dtype=cp.float32)
        sdy, sdyx = be.backward_reduce(v, v, channel_last, mean64.astype(cp.float32), invstd)
        assert float(cp.max(cp.abs(sdy - cnt * mean64) / (cnt * cp.abs(mean64)))) < 1e-4
        assert float(cp.max(cp.abs(sdyx - m2_64) / m2_64)) < 1e-3
        # elementwise kernels past index 2^31: check the last slice
        mc = mean64.astype(cp.float32)
        sc = cp.full(v.shape[1], 0.5, dtype=cp.float32)
        bi = cp.full(v.shape[1], -1.0, dtype=cp.float32)
        y = be.normalize(v, channel_last, mc, sc, bi, np.dtype(np.float16))
        tail = slice(v.shape[0] - 3, v.shape[0])
        bshape = (1, -1) if channel_last else (1, -1, 1)
        yref = (v[tail].astype(cp.float64) - mean64.reshape(bshape)) * 0.5 - 1.0
        assert float(cp.max(cp.abs(y[tail].astype(cp.float64) - yref))) < 8e-3
        del y
        zero = cp.zeros(v.shape[1], dtype=cp.float32)
        # dy = x, mean_dy = mean, b = 0: dx = 0.5 * (x - mean) = y + 1
        dx = be.backward_elemt(v, v, channel_last, mc, sc, mc, zero, np.dtype(np.float16))
        assert float(cp.max(cp.abs(dx[tail].astype(cp.float64) - (yref + 1.0)))) < 8e-3
        del dx


# -- fused synchronized passes (issue 10) --------------------------------------

def _forced_comm():
    from cupysyncbn.comm.base import NoCommunicator

    comm = NoCommunicator()
    comm.force_collectives = True  # the whole synchronized path on one GPU
    return comm


def _layer_pair(fmt, c, comm_cpu, comm_gpu):
    import cupysyncbn as sbn

    cpu = sbn.SyncBatchNorm(c, data_format=fmt, comm=comm_cpu)
    gpu = sbn.SyncBatchNorm(c, data_format=fmt, comm=comm_gpu).to("cuda")
    w = np.linspace(0.5, 2.0, c).astype("float32")
    cpu.weight.data = w.copy()
    gpu.weight.data = cp.asarray(w)
    return cpu, gpu


@pytest.mark.parametrize("fmt,shape", [("NCHW", (2, 8, 17, 9)), ("NHWC", (2, 9, 7, 16)),
                                       ("NC", (5, 24)), ("NCDHW", (1, 3, 4, 5, 6))])
@pytest.mark.parametrize("dt", ["float16", "float32", "float64"])
def test_gpu_fused_steady_state_equals_cpu(fmt, shape, dt):
    c = shape[-1] if fmt[-1] == "C" else shape[1]
    cpu, gpu = _layer_pair(fmt, c, _forced_comm(), _forced_comm())
    tol = OUT_TOL[dt]
    for step in range(3):  # the handshake + mean pass, then the steady state
        x = _data(shape, dt, 20 + step)
        dy = _data(shape, dt, 30 + step, offset=0.0)
        _close(gpu(cp.asarray(x)), cpu(x), tol, "y")
        _close(gpu.backward(cp.asarray(dy)), cpu.backward(dy), tol, "dx")
        _close(gpu._mean, cpu._mean, 2e-5, "running mean")
        _close(gpu._variance, cpu._variance, 2e-5, "running var")
        _close(gpu.weight.grad, cpu.weight.grad, 50 * tol, "weight.grad")
    import cupysyncbn as sbn

    sbn.check_errors()


def test_gpu_training_step_replays_from_a_cuda_graph():
    # Capture fails on any host synchronization or pageable copy in the step,
    # so this is also the on-GPU proof of "no host sync in steady state".
    import cupysyncbn as sbn

    if not hasattr(cp.cuda.Stream, "begin_capture"):
        pytest.skip("this CuPy has no stream capture")
    shape = (2, 16, 12, 10)
    x = cp.asarray(_data(shape, "float32", 1))
    dy = cp.asarray(_data(shape, "float32", 2, offset=0.0))
    graphed = sbn.SyncBatchNorm(16, comm=_forced_comm()).to("cuda")
    eager = sbn.SyncBatchNorm(16, comm=_forced_comm()).to("cuda")
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        for layer in (graphed, eager):
            for _ in range(2):  # warm-up: handshake, mean pass, workspaces
                layer(x)
                layer.backward(dy)
        stream.synchronize()
        stream.begin_capture()
        y = graphed(x)
        dx = graphed.backward(dy)
        graph = stream.end_capture()
        for _ in range(3):
            graph.launch(stream)
            y_e = eager(x)
            dx_e = eager.backward(dy)
            stream.synchronize()
            _close(y, y_e, 1e-6, "graph y")
            _close(dx, dx_e, 1e-6, "graph dx")
            _close(graphed._mean, eager._mean, 1e-7, "graph running mean")
            _close(graphed._variance, eager._variance, 1e-7, "graph running var")
            _close(graphed.weight.grad, eager.weight.grad, 1e-5, "graph weight.grad")
    sbn.check_errors()


def test_gpu_misaligned_rows_take_the_scalar_path():
    # A view starting 2 elements into its buffer: rows are not 16-byte aligned.
    base = cp.asarray(_data((2 * 3 * 7 * 5 + 2,), "float32", 3))
    x = base[2:].reshape(2, 3, 7, 5)
    cpu, gpu = _layer_pair("NCHW", 3, LOCAL, LOCAL)
    _close(gpu(x), cpu(cp.asnumpy(x)), 2e-5, "misaligned y")


@pytest.mark.parametrize("fmt,shape", CASES, ids=str)
@pytest.mark.parametrize("idt,pdt", [("float32", "float32"), ("float64", "float64"),
                                     ("float16", "float32")])
@pytest.mark.parametrize("training", [True, False])
def test_relu_on_gpu_equals_numpy(fmt, shape, idt, pdt, training):
    # act="relu" on the fused kernels (train, eval) against the NumPy path.
    from support import bn_ref

    c = shape[bn_ref.channel_axis(fmt, len(shape))]
    rng = np.random.default_rng(c)
    stats = None if training else (rng.uniform(-0.5, 0.5, c), rng.uniform(0.5, 2, c))
    x, dy, w, b = bn_ref.relu_batch(shape, fmt, idt, 0, eval_stats=stats)
    rm, rv = (np.zeros(c, pdt), np.ones(c, pdt)) if stats is None else (
        stats[0].astype(pdt), stats[1].astype(pdt))
    outs = []
    for xp in (np, cp):
        args = [xp.asarray(a) for a in (x, w.astype(pdt), b.astype(pdt), rm, rv)]
        res = F.batch_norm_forward(*args, training=training, data_format=fmt, comm=LOCAL,
                                   act="relu")
        outs.append((res.y, *F.batch_norm_backward(xp.asarray(dy), res.ctx)))
    tol = OUT_TOL[idt]
    for got, ref, what in zip(outs[1], outs[0], ("y", "dx", "dweight", "dbias")):
        _close(got, ref, tol if what in ("y", "dx") else 50 * VEC_TOL[pdt], what)
