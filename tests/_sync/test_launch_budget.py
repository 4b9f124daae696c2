"""GPU launch budget, proven without a GPU (issue 10).

The real layer -> functional -> ``CupyBackend`` -> communicator path runs on
the recording CuPy stand-in (:mod:`support.recording_cupy`: NumPy-backed arrays, our
kernels executed by the C++ emulation of the CUDA sources). Asserted per
steady-state pass: our kernel launches, other CuPy operations, device->host
copies and host synchronizations; and the results against the NumPy backend
(float64 math on the host path) on the same or the whole global batch.
"""

import contextlib
import re
import threading

import numpy as np
import pytest
from support import cuda_emu, recording_cupy

import cupysyncbn as sbn
from cupysyncbn._sync import device_status, protocol
from cupysyncbn.backends.cupy import kernels as ks
from cupysyncbn.comm.base import Communicator, NoCommunicator
from cupysyncbn.errors import RemoteInputError

REC = recording_cupy.REC

SHAPES = {  # (format, local shape builder from N)
    "NC": lambda n: (n, 5), "NCL": lambda n: (n, 3, 7), "NCHW": lambda n: (n, 3, 4, 5),
    "NCDHW": lambda n: (n, 2, 2, 3, 4), "NLC": lambda n: (n, 6, 3), "NHWC": lambda n: (n, 3, 5, 8),
    "NDHWC": lambda n: (n, 2, 3, 2, 4),
}
TOL = {"float16": 1e-2, "float32": 2e-5, "float64": 1e-11}


@pytest.fixture(scope="module")
def cp():
    import cupysyncbn.backends.cupy.backend as cb

    try:
        with recording_cupy.installed() as mod, pytest.MonkeyPatch.context() as mp:
            mp.setattr(cb, "_THREADS", 64)  # smaller blocks: a faster emulation
            yield mod
    except cuda_emu.Unavailable as e:  # pragma: no cover - no g++ 12
        pytest.skip(str(e))


def _host(a):
    return np.array(a.view(np.ndarray) if isinstance(a, recording_cupy.ndarray) else a)


@contextlib.contextmanager
def _gpu_by_default():
    """``set_device('gpu')`` over the stand-in (placement caches are reset around it)."""
    from cupysyncbn.runtime import placement

    placement._reset_for_tests()
    old = placement.set_device("gpu")
    try:
        yield
    finally:
        placement.set_device("cpu" if old == "cpu" else "auto")
        placement._reset_for_tests()


def _layer(cp, fmt, c, comm, pdt="float32", on_device=True, placed="to", **kw):
    """A layer placed as users place it: ``.to('cuda')`` or made under ``set_device('gpu')``
    (every buffer on the device, the batch counter included), or a NumPy reference."""
    if on_device and placed == "set_device":
        with _gpu_by_default():
            layer = sbn.SyncBatchNorm(c, data_format=fmt, comm=comm, dtype=pdt, **kw)
    else:
        layer = sbn.SyncBatchNorm(c, data_format=fmt, comm=comm, dtype=pdt, **kw)
        if on_device:
            layer.to("cuda")
    rng = np.random.default_rng(c)
    w = rng.uniform(0.5, 2, c).astype(pdt)
    b = rng.uniform(-1, 1, c).astype(pdt)
    if layer.weight is not None:
        layer.weight.data[...] = w
        layer.bias.data[...] = b
    if on_device:
        for a in (layer._mean, layer._variance, layer.weight and layer.weight.data):
            assert a is None or isinstance(a, recording_cupy.ndarray)
    return layer


def _forced():
    comm = NoCommunicator()
    comm.force_collectives = True
    return comm


def _batch(fmt, n, dt, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(SHAPES[fmt](n)) * 3 + 20).astype(dt)
    dy = rng.standard_normal(x.shape).astype(dt)
    return x, dy


def _names(kernels):
    return [k[0].split("<")[0] for k in kernels]


def _step(cp, layer, x, dy):
    xd, dyd = cp.asarray(x), cp.asarray(dy)
    REC.clear()
    y = layer(xd)
    fwd = (REC.summary(), _names(REC.kernels), list(REC.ops), len(REC.async_d2h))
    REC.clear()
    dx = layer.backward(dyd)
    bwd = (REC.summary(), _names(REC.kernels), list(REC.ops), len(REC.async_d2h))
    return y, dx, fwd, bwd


def _close(a, b, tol):
    np.testing.assert_allclose(_host(a).astype("f8"), _host(b).astype("f8"), rtol=tol, atol=tol)


@pytest.mark.parametrize("dt", ["float16", "float32", "float64"])
@pytest.mark.parametrize("fmt", list(SHAPES))
def test_steady_state_budget_and_values(cp, fmt, dt):
    """Forward/backward: 3 kernels + 1 all-reduce, no host sync, same values."""
    comm = _forced()
    c = SHAPES[fmt](1)[-1 if fmt.startswith("NL") or fmt[-1] == "C" else 1]
    dev = _layer(cp, fmt, c, comm)
    ref = _layer(cp, fmt, c, _forced(), on_device=False)
    cl = "cl" if fmt[-1] == "C" else "cf"  # NC is (M, C) too
    mean_array = dev._mean
    for step, n in enumerate((4, 3, 5)):
        x, dy = _batch(fmt, n, dt, step)
        y, dx, fwd, bwd = _step(cp, dev, x, dy)
        yr = ref(x)
        dxr = ref.backward(dy)
        tol = TOL[dt]
        _close(y, yr, tol)
        _close(dx, dxr, tol)
        _close(dev._mean, ref._mean, TOL[dt] if dt != "float64" else 1e-6)
        _close(dev._variance, ref._variance, TOL[dt] if dt != "float64" else 1e-6)
        _close(dev.weight.grad, ref.weight.grad, 50 * tol)
        _close(dev.bias.grad, ref.bias.grad, 50 * tol)
        if step == 0:
            continue  # the first pass has the handshake and the mean pass
        summary, kernels, ops, copies = fwd
        assert kernels == [f"bn_stats_partial_{cl}", "bn_fwd_pack", f"bn_fwd_norm_{cl}"]
        assert summary["syncs"] == summary["d2h"] == 0 and ops == [], fwd
        # the status copy queued at the first pass is in flight (not done):
        # no other copy, no event query before it is due
        assert copies == summary["queries"] == 0
        # outputs only (y, saved statistics): workspaces are the layer's, reused
        assert summary["allocs"] == 3, REC.allocs
        summary, kernels, ops, copies = bwd
        assert kernels == [f"bn_bwd_partial_{cl}", "bn_bwd_pack", f"bn_bwd_elemt_{cl}"]
        assert summary["syncs"] == summary["d2h"] == summary["queries"] == 0, bwd
        # gradients are added to .grad by the pack kernel: no other op, and
        # only dx is allocated
        assert ops == [], ops
        assert summary["allocs"] == 1, REC.allocs
    assert dev._mean is mean_array  # running statistics updated in place
    assert type(dev._num_batches_tracked) is np.ndarray  # the counter stays on the host


@pytest.mark.parametrize("fmt", ["NCHW", "NHWC"])
def test_layer_made_under_set_device_gpu_has_no_host_sync(cp, fmt):
    """``set_device('gpu')`` puts every buffer on the device, the batch counter
    included; momentum=None reads that count each pass: still no host sync."""
    c = 3 if fmt == "NCHW" else 8
    dev = _layer(cp, fmt, c, _forced(), placed="set_device", momentum=None)
    ref = _layer(cp, fmt, c, _forced(), on_device=False, momentum=None)
    for step in range(4):
        x, dy = _batch(fmt, 2 + step, "float32", 110 + step)
        y, dx, fwd, bwd = _step(cp, dev, x, dy)
        _close(y, ref(x), 2e-5)
        _close(dx, ref.backward(dy), 2e-5)
        _close(dev._mean, ref._mean, 1e-6)
        _close(dev._variance, ref._variance, 1e-6)
        if step:
            for summary, _kernels, ops, _copies in (fwd, bwd):
                assert summary["kernels"] == 3 and ops == [], (summary, ops)
                assert summary["syncs"] == summary["d2h"] == summary["queries"] == 0, summary
    # the counter round-trips through a state dict and a checkpoint file
    sd = dev.state_dict()
    assert int(sd["_num_batches_tracked"]) == 4
    fresh = _layer(cp, fmt, c, _forced(), placed="set_device", momentum=None)
    fresh.set_state_dict({k: cp.asarray(np.asarray(_host(v))) for k, v in sd.items()})
    assert int(fresh._num_batches_tracked) == 4
    assert type(fresh._num_batches_tracked) is np.ndarray


def test_functional_backward_and_float64_layer_have_no_other_ops(cp):
    comm = _forced()
    state = sbn.functional.SyncState()
    x, dy = _batch("NCHW", 4, "float32", 1)
    w = cp.asarray(np.ones(3, "f8"))
    rm, rv = cp.asarray(np.zeros(3, "f8")), cp.asarray(np.ones(3, "f8"))
    for _ in range(2):
        xd, dyd = cp.asarray(x), cp.asarray(dy)
        REC.clear()
        res = sbn.functional.batch_norm_forward(
            xd, w, None, rm, rv, comm=comm, sync_state=state, inplace_running_stats=True)
        fwd = REC.summary()
        REC.clear()
        dx, dw, db = sbn.functional.batch_norm_backward(dyd, res.ctx)
        bwd = REC.summary()
    assert fwd["kernels"] == 3 and fwd["ops"] == fwd["syncs"] == fwd["queries"] == 0
    assert fwd["allocs"] == 3  # y and the two saved-statistics vectors
    assert bwd["kernels"] == 3 and bwd["ops"] == bwd["syncs"] == bwd["queries"] == 0
    assert res.running_mean is rm  # updated in place
    ref = sbn.functional.batch_norm_forward(x, np.ones(3, "f8"), comm=_forced())
    _close(res.y, ref.y, 1e-12)
    assert int(res.count) == 4 * 20


def test_eval_forward_is_one_kernel(cp):
    comm = _forced()
    dev = _layer(cp, "NHWC", 8, comm)
    ref = _layer(cp, "NHWC", 8, _forced(), on_device=False)
    x, dy = _batch("NHWC", 3, "float32", 3)
    _step(cp, dev, x, dy)
    ref(x)
    ref.backward(dy)
    dev.eval()
    ref.eval()
    y, dx, fwd, bwd = _step(cp, dev, x, dy)
    assert fwd[1] == ["bn_fwd_norm_cl"] and fwd[0]["syncs"] == fwd[0]["ops"] == 0
    assert "bn_bwd_elemt_cl" in bwd[1] and bwd[0]["syncs"] == 0
    _close(y, ref(x), 2e-5)
    _close(dx, ref.backward(dy), 2e-5)


class _Group:
    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size)
        self.bufs = [None] * size


class ThreadComm(Communicator):
    """Ranks as threads of this process (sum through a barrier)."""

    backend = "threads"

    def __init__(self, group, rank, strict=None):
        self.group, self.rank, self.size = group, rank, group.size
        self.strict_sync = strict

    def allreduce_sum(self, buf):
        g = self.group
        g.bufs[self.rank] = np.array(buf.view(np.ndarray))
        g.barrier.wait()
        total = np.sum(g.bufs, axis=0)
        g.barrier.wait()
        buf.view(np.ndarray)[...] = total  # in place, like NCCL (no CuPy op)
        return buf


def _run_ranks(fns):
    out, errs = [None] * len(fns), [None] * len(fns)

    def run(i):
        try:
            out[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - reported per rank
            errs[i] = e
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a rank hangs"
    return out, errs


@pytest.mark.parametrize("fmt", ["NCHW", "NHWC"])
@pytest.mark.parametrize("split", [(3, 0), (1, 4), (0, 0)])
def test_two_ranks_uneven_and_empty(cp, fmt, split):
    g = _Group(2)
    c = 3 if fmt == "NCHW" else 8
    layers = [_layer(cp, fmt, c, ThreadComm(g, r)) for r in range(2)]
    ref = _layer(cp, fmt, c, sbn.comm.base.LOCAL, on_device=False)
    for step in range(3):
        parts = [_batch(fmt, n, "float32", 10 * step + r) for r, n in enumerate(split)]
        res, errs = _run_ranks([
            (lambda r=r, p=parts: _step(cp, layers[r], *p[r])) for r in range(2)])
        assert errs == [None, None], errs
        xg = np.concatenate([p[0] for p in parts])
        dyg = np.concatenate([p[1] for p in parts])
        yr = ref(xg)
        dxr = ref.backward(dyg)
        _close(np.concatenate([_host(r[0]) for r in res]), yr, 2e-5)
        _close(np.concatenate([_host(r[1]) for r in res]), dxr, 2e-5)
        for layer in layers:
            _close(layer._mean, ref._mean, 2e-6)
            _close(layer._variance, ref._variance, 2e-6)
            assert np.isfinite(_host(layer._variance)).all()
        if step:
            fwd_syncs = REC.syncs  # both ranks' last passes: the backward
            assert fwd_syncs == []
    assert (_host(layers[0]._mean) == _host(layers[1]._mean)).all()  # bitwise


def _bad_x(fmt):
    return np.ones((2, 4, 3, 3), "float32")  # 4 channels instead of 3


def _until_raised(fns, limit):
    """Run passes on every rank until one raises; return (passes run, errors)."""
    for i in range(1, limit + 1):
        _, errs = _run_ranks(fns)
        if any(e is not None for e in errs):
            return i, errs
    return None, None


def test_deferred_error_surfaces_on_every_rank_at_the_same_bounded_pass(cp):
    B = device_status.CHECK_EVERY
    g = _Group(2)
    layers = [_layer(cp, "NCHW", 3, ThreadComm(g, r)) for r in range(2)]
    good = [_batch("NCHW", 2, "float32", r) for r in range(2)]

    def fwd(r, x):
        return lambda: layers[r](cp.asarray(x))
    good_fns = [fwd(0, good[0][0]), fwd(1, good[1][0])]
    for _ in range(3):
        _, errs = _run_ranks(good_fns)
        assert errs == [None, None]
    # rank 1 passes 4 channels: it raises at once, rank 0 finishes its pass
    _, errs = _run_ranks([fwd(0, good[0][0]), fwd(1, _bad_x("NCHW"))])
    assert errs[0] is None and isinstance(errs[1], ValueError)
    assert "channels" in str(errs[1])
    # later passes: rank 0 raises the agreed error, rank 1 its own again, at
    # the same pass (neither waits alone in a collective), within the bound
    REC.clear()
    at, errs = _until_raised(good_fns, 2 * B - 1)
    assert at is not None, "the verdict never surfaced"
    assert isinstance(errs[0], RemoteInputError), errs
    assert "channel count" in str(errs[0])
    assert isinstance(errs[1], ValueError) and "channels" in str(errs[1])
    # the events were never done: the reading pass waited once per rank, no other did
    assert REC.syncs == ["event", "event"], REC.syncs
    # and the group runs on, without a stale copy raising it again
    for _ in range(2 * B):
        _, errs = _run_ranks(good_fns)
        assert errs == [None, None]
    sbn.check_errors()


def test_status_is_read_every_check_every_passes_with_one_copy_in_flight(cp):
    """Events never done: one copy in flight at a time, read (and waited for) only
    CHECK_EVERY passes after it was queued; a done event is read without a wait."""
    B = device_status.CHECK_EVERY
    layer = _layer(cp, "NHWC", 8, _forced())
    x, dy = _batch("NHWC", 3, "float32", 5)
    log = []
    for _ in range(2 * B):
        _, _, fwd, bwd = _step(cp, layer, x, dy)
        log += [fwd, bwd]
    syncs = [i + 1 for i, p in enumerate(log) if p[0]["syncs"]]
    copies = [i + 1 for i, p in enumerate(log) if p[3]]
    assert copies == [1, 1 + B, 1 + 2 * B, 1 + 3 * B]  # passes whose end queued a copy
    # the first pass: the handshake's host read; then a copy queued after pass
    # q is read at the start of pass q + B, and waited for as it is not done
    assert syncs == [1, 1 + B, 1 + 2 * B, 1 + 3 * B]
    assert all(p[0]["syncs"] == 1 and p[0]["d2h"] == 0 for p in log[1:] if p[0]["syncs"])
    assert sum(p[0]["queries"] for p in log) == len(syncs) - 1  # none before a copy is due
    # the copy queued after pass 1 + 3B is due at pass 1 + 4B (the next one); when
    # the GPU kept up (here: the host synchronized), reading it does not wait
    cp.cuda.Device().synchronize()
    _, _, fwd, bwd = _step(cp, layer, x, dy)
    assert fwd[0]["queries"] + bwd[0]["queries"] == 1
    assert fwd[0]["syncs"] == bwd[0]["syncs"] == 0
    sbn.check_errors()


def test_strict_sync_raises_at_once(cp):
    g = _Group(2)
    layers = [_layer(cp, "NCHW", 3, ThreadComm(g, r, strict=True)) for r in range(2)]
    good = [_batch("NCHW", 2, "float32", r) for r in range(2)]
    for _ in range(2):
        REC.clear()
        _, errs = _run_ranks([lambda r=r: layers[r](cp.asarray(good[r][0])) for r in range(2)])
        assert errs == [None, None]
    assert len(REC.syncs) == 2  # one status read per rank per pass
    _, errs = _run_ranks([lambda: layers[0](cp.asarray(good[0][0])),
                          lambda: layers[1](cp.asarray(_bad_x("NCHW")))])
    assert isinstance(errs[0], RemoteInputError) and isinstance(errs[1], ValueError)


def test_unbiased_count_one_is_deferred_and_check_errors(cp):
    layer = _layer(cp, "NC", 5, _forced(), unbiased_running_var=True)
    x = np.arange(5, dtype="float32").reshape(1, 5)
    layer(cp.asarray(np.ones((2, 5), "float32")))  # the first pass (mean pass)
    before = _host(layer._variance)
    layer(cp.asarray(x))  # global count 1: no update, verdict latched
    assert (_host(layer._variance) == before).all()
    with pytest.raises(ValueError, match="unbiased_running_var=True needs more than 1"):
        sbn.check_errors()
    sbn.check_errors()  # consumed
    layer(cp.asarray(x))
    with pytest.raises(ValueError, match="unbiased"):  # at a later pass, within the bound
        for _ in range(2 * device_status.CHECK_EVERY - 1):
            layer(cp.asarray(np.ones((2, 5), "float32")))
    for _ in range(2 * device_status.CHECK_EVERY):  # consumed: not raised again
        layer(cp.asarray(np.ones((2, 5), "float32")))
    sbn.check_errors()


def test_capture_mode_has_no_host_interaction(cp):
    comm = _forced()
    layer = _layer(cp, "NCHW", 3, comm)
    x, dy = _batch("NCHW", 2, "float32", 0)
    _step(cp, layer, x, dy)
    REC.capturing = True
    try:
        y, dx, fwd, bwd = _step(cp, layer, x, dy)
    finally:
        REC.capturing = False
    assert fwd[3] == bwd[3] == 0 and fwd[0]["syncs"] == bwd[0]["syncs"] == 0
    assert fwd[0]["kernels"] == bwd[0]["kernels"] == 3
    sbn.check_errors()


def test_kernel_header_slots_match_protocol():
    src = ks.read_source("fused.cu")
    defs = dict(re.findall(r"#define SBN_H_(\w+) (\d+)", src))
    slots = protocol._I
    for name in ("count", "one", "nf", "nf_sq", "layer", "layer_sq", "call", "call_sq"):
        assert int(defs[name.upper()]) == slots[name]
    assert int(defs["PHASE0"]) == slots["phase_0"]
    assert int(defs["ERR0"]) == slots[f"err_{protocol.ERROR_KINDS[0]}"]
    assert int(re.search(r"#define SBN_HEADER (\d+)", src).group(1)) == protocol.HEADER
    assert int(re.search(r"#define SBN_N_ERRORS (\d+)", src).group(1)) == len(
        protocol.ERROR_KINDS)


@pytest.mark.parametrize("fmt", ["NCHW", "NHWC"])
def test_misaligned_input_uses_the_scalar_path(cp, fmt):
    # A view 1 element into its buffer: no row is 16-byte aligned.
    x, dy = _batch(fmt, 3, "float32", 7)
    base = cp.asarray(np.concatenate([[0.0], x.ravel()]).astype("float32"))
    xd = base[1:].reshape(x.shape)
    assert xd.ctypes.data % 16
    c = x.shape[-1] if fmt == "NHWC" else x.shape[1]
    dev = _layer(cp, fmt, c, _forced())
    ref = _layer(cp, fmt, c, _forced(), on_device=False)
    _close(dev(xd), ref(x), 2e-5)
    _close(dev.backward(cp.asarray(dy)), ref.backward(dy), 2e-5)


@pytest.mark.parametrize("kw", [
    {"momentum": None}, {"momentum": 0.7, "unbiased_running_var": True},
    {"track_running_stats": False}, {"weight_attr": False, "bias_attr": False},
    {"dtype": "float64"},
], ids=str)
@pytest.mark.parametrize("fmt,dt", [("NCHW", "float16"), ("NHWC", "float32")])
def test_conventions_match_the_numpy_backend(cp, kw, fmt, dt):
    c = 3 if fmt == "NCHW" else 8
    kw = dict(kw)
    pdt = kw.pop("dtype", "float32")
    dev = _layer(cp, fmt, c, _forced(), pdt=pdt, **kw)
    ref = _layer(cp, fmt, c, _forced(), pdt=pdt, on_device=False, **kw)
    tol = TOL[dt]
    for step in range(3):
        x, dy = _batch(fmt, 2 + step, dt, 40 + step)
        y, dx, fwd, bwd = _step(cp, dev, x, dy)
        _close(y, ref(x), tol)
        _close(dx, ref.backward(dy), tol)
        if kw.get("track_running_stats", True):
            _close(dev._mean, ref._mean, 1e-5)
            _close(dev._variance, ref._variance, 1e-5)
        if step:
            assert fwd[0]["kernels"] == bwd[0]["kernels"] == 3
            assert fwd[0]["syncs"] == bwd[0]["syncs"] == fwd[0]["ops"] == 0


def test_momentum_none_skips_empty_global_batches_like_the_host(cp):
    dev = _layer(cp, "NCHW", 3, _forced(), momentum=None)
    ref = _layer(cp, "NCHW", 3, _forced(), momentum=None, on_device=False)
    for step, n in enumerate((3, 0, 2, 4)):
        x, dy = _batch("NCHW", n, "float32", 50 + step)
        y, dx, fwd, bwd = _step(cp, dev, x, dy)
        ref(x)
        ref.backward(dy)
        _close(dev._mean, ref._mean, 1e-6)
        _close(dev._variance, ref._variance, 1e-6)
        if step >= 2:
            assert fwd[0]["ops"] == fwd[0]["syncs"] == 0  # the count stays on the device


def test_strict_sync_from_init_and_environment(monkeypatch):
    from cupysyncbn._sync import device_status
    from cupysyncbn.comm import set_default_comm

    monkeypatch.delenv("CUPYSYNCBN_STRICT_SYNC", raising=False)
    assert device_status.strict_sync(NoCommunicator()) is False
    monkeypatch.setenv("CUPYSYNCBN_STRICT_SYNC", "1")
    assert device_status.strict_sync(NoCommunicator()) is True
    try:
        comm = sbn.init("none", strict_sync=False)
        assert comm.strict_sync is False and device_status.strict_sync(comm) is False
        assert sbn.init("none").strict_sync is None  # the environment decides
    finally:
        set_default_comm(None)


# --- The PyTorch adapter's array-level passes (cupysyncbn.interop.torch) ---
#
# Its autograd Function turns CUDA tensors into CuPy views by DLPack and calls
# forward_arrays / backward_arrays (a test in interop/test_torch_adapter.py checks that
# it does); here they run on stand-in CuPy arrays, with PyTorch's own
# torch.nn.BatchNorm (float64, CPU) as the reference.


def _torch_ref(fmt, c, momentum):
    torch = pytest.importorskip("torch")
    nd = len(SHAPES[fmt](1))
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
           5: torch.nn.BatchNorm3d}[nd]
    ref = cls(c, momentum=momentum).double()
    rng = np.random.default_rng(c)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(rng.uniform(0.5, 2, c)))
        ref.bias.copy_(torch.from_numpy(rng.uniform(-1, 1, c)))
    return torch, ref


def _to_torch_layout(torch, a, fmt):
    """An array in ``fmt`` as PyTorch's (N, C, *) tensor (float64)."""
    t = torch.from_numpy(np.array(_host(a), dtype="f8"))
    if fmt[-1] == "C" and fmt != "NC":
        t = t.movedim(-1, 1)
    return t


class _TorchAdapterLayer:
    """What interop.torch.SyncBatchNorm holds, as stand-in CuPy arrays."""

    def __init__(self, cp, ref, comm, pdt="float32"):
        def dev(t):
            return cp.asarray(t.detach().numpy().astype(pdt))
        self.weight, self.bias = dev(ref.weight), dev(ref.bias)
        self.running_mean, self.running_var = dev(ref.running_mean), dev(ref.running_var)
        self.num_batches_tracked = cp.asarray(np.zeros((), np.int64))
        self.momentum = ref.momentum
        self.comm = comm
        self.state = sbn.functional.SyncState()
        self.grads = None

    def step(self, cp, fmt, x, dy):
        from cupysyncbn.interop import torch as ti
        from cupysyncbn.interop.state_dict import momentum_torch_to_paddle

        xd, dyd = cp.asarray(x), cp.asarray(dy)
        REC.clear()
        y, ctx = ti.forward_arrays(
            xd, self.weight, self.bias, self.running_mean, self.running_var,
            self.num_batches_tracked if self.momentum is None else None,
            data_format=fmt, training=True, update=True,
            momentum=momentum_torch_to_paddle(self.momentum), eps=1e-5, comm=self.comm,
            sync_state=self.state)
        # the Function's num_batches_tracked.add_(1) is a PyTorch op, not CuPy's
        self.num_batches_tracked.view(np.ndarray)[...] += 1
        fwd = (REC.summary(), _names(REC.kernels), list(REC.ops), len(REC.async_d2h))
        REC.clear()
        dx, dw, db = ti.backward_arrays(dyd, ctx, True)
        bwd = (REC.summary(), _names(REC.kernels), list(REC.ops), len(REC.async_d2h))
        g = (_host(dw).astype("f8"), _host(db).astype("f8"))
        self.grads = g if self.grads is None else (self.grads[0] + g[0], self.grads[1] + g[1])
        return y, dx, fwd, bwd


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("fmt,dt", [
    ("NCHW", "float32"), ("NHWC", "float16"), ("NC", "float32"), ("NCDHW", "float64"),
    ("NDHWC", "float32"), ("NCL", "float16"),
])
def test_torch_adapter_steady_state_budget_and_values(cp, fmt, dt, momentum):
    """The adapter's passes: 3 kernels + 1 all-reduce, no host sync, torch's values."""
    c = SHAPES[fmt](1)[-1 if fmt[-1] == "C" else 1]
    torch, ref = _torch_ref(fmt, c, momentum)
    layer = _TorchAdapterLayer(cp, ref, _forced())
    cl = "cl" if fmt[-1] == "C" else "cf"
    arrays = (layer.running_mean, layer.running_var)
    tol = TOL[dt] if dt != "float64" else 2e-5  # float32 parameters
    for step, n in enumerate((4, 3, 5)):
        x, dy = _batch(fmt, n, dt, 60 + step)
        y, dx, fwd, bwd = layer.step(cp, fmt, x, dy)
        xr = _to_torch_layout(torch, x, fmt).requires_grad_(True)
        yr = ref(xr)
        yr.backward(_to_torch_layout(torch, dy, fmt))
        _close(_to_torch_layout(torch, y, fmt).numpy(), yr.detach().numpy(), tol)
        _close(_to_torch_layout(torch, dx, fmt).numpy(), xr.grad.numpy(), tol)
        _close(layer.running_mean, ref.running_mean.numpy(), 1e-5)
        _close(layer.running_var, ref.running_var.numpy(), 1e-5)
        _close(layer.grads[0], ref.weight.grad.numpy(), 50 * tol)
        _close(layer.grads[1], ref.bias.grad.numpy(), 50 * tol)
        assert int(_host(layer.num_batches_tracked)) == int(ref.num_batches_tracked)
        if step == 0:
            continue  # the handshake and the mean pass
        summary, kernels, ops, copies = fwd
        assert kernels == [f"bn_stats_partial_{cl}", "bn_fwd_pack", f"bn_fwd_norm_{cl}"]
        assert summary["syncs"] == summary["d2h"] == 0, fwd
        # running statistics: written by bn_fwd_norm in place, no copy back;
        # momentum=None: PyTorch's count copied into the device count
        assert ops == ([] if momentum is not None else ["setitem"]), ops
        assert copies == summary["queries"] == 0  # the first pass's status copy in flight
        assert summary["allocs"] == 3, REC.allocs  # y and the saved statistics
        summary, kernels, ops, copies = bwd
        assert kernels == [f"bn_bwd_partial_{cl}", "bn_bwd_pack", f"bn_bwd_elemt_{cl}"]
        assert summary["syncs"] == summary["d2h"] == summary["queries"] == 0 and ops == [], bwd
        assert summary["allocs"] == 3, REC.allocs  # dx, dweight, dbias (autograd's)
    assert (layer.running_mean, layer.running_var) == arrays  # the same arrays


def test_torch_adapter_momentum_none_counts_empty_global_batches_like_torch(cp):
    """PyTorch counts every training forward; the device average follows it."""
    torch, ref = _torch_ref("NCHW", 3, None)
    layer = _TorchAdapterLayer(cp, ref, _forced())
    for step, n in enumerate((3, 0, 2, 4)):
        x, dy = _batch("NCHW", n, "float32", 70 + step)
        y, dx, fwd, bwd = layer.step(cp, "NCHW", x, dy)
        xr = torch.from_numpy(x.astype("f8")).requires_grad_(True)
        ref(xr).backward(torch.from_numpy(dy.astype("f8")))
        _close(layer.running_mean, ref.running_mean.numpy(), 1e-6)
        _close(layer.running_var, ref.running_var.numpy(), 1e-6)
        assert int(_host(layer.num_batches_tracked)) == int(ref.num_batches_tracked) == step + 1
        if step >= 2:
            assert fwd[0]["syncs"] == fwd[0]["d2h"] == 0 and fwd[2] == ["setitem"]


@pytest.mark.parametrize("split", [(3, 0), (0, 0), (2, 5)])
def test_torch_adapter_two_ranks_uneven_and_empty(cp, split):
    torch, ref = _torch_ref("NHWC", 8, 0.1)
    g = _Group(2)
    layers = [_TorchAdapterLayer(cp, ref, ThreadComm(g, r)) for r in range(2)]
    for step in range(3):
        parts = [_batch("NHWC", n, "float32", 80 + 10 * step + r) for r, n in enumerate(split)]
        res, errs = _run_ranks([
            (lambda r=r, p=parts: layers[r].step(cp, "NHWC", *p[r])) for r in range(2)])
        assert errs == [None, None], errs
        xr = torch.from_numpy(np.concatenate([p[0] for p in parts]).astype("f8"))
        xr = xr.movedim(-1, 1).requires_grad_(True)
        if xr.shape[0]:
            yr = ref(xr)
            yr.backward(torch.from_numpy(
                np.concatenate([p[1] for p in parts]).astype("f8")).movedim(-1, 1))
            y = np.concatenate([_host(r[0]) for r in res])
            dx = np.concatenate([_host(r[1]) for r in res])
            _close(np.moveaxis(y, -1, 1), yr.detach().numpy(), 2e-5)
            _close(np.moveaxis(dx, -1, 1), xr.grad.numpy(), 2e-5)
        for layer in layers:
            _close(layer.running_mean, ref.running_mean.numpy(), 2e-6)
            _close(layer.running_var, ref.running_var.numpy(), 2e-6)
        if step:
            assert REC.syncs == []  # both ranks' last passes (the backward)
    if sum(split):
        total = layers[0].grads[0] + layers[1].grads[0]  # DDP's sum over ranks
        _close(total, ref.weight.grad.numpy(), 1e-3)


def test_torch_adapter_capture_has_no_host_interaction(cp, monkeypatch):
    """A captured step: no host sync, no copy, and no event query (torch.cuda.graph's
    global capture mode refuses one) although the eager pass before left a verdict pending."""
    torch, ref = _torch_ref("NCHW", 3, None)
    layer = _TorchAdapterLayer(cp, ref, _forced())
    x, dy = _batch("NCHW", 2, "float32", 90)
    layer.step(cp, "NCHW", x, dy)
    layer.step(cp, "NCHW", x, dy)

    def done(self):
        assert not REC.capturing, "event queried during a capture"
        return True
    monkeypatch.setattr(recording_cupy.Event, "done", property(done))
    REC.capturing = True
    try:
        y, dx, fwd, bwd = layer.step(cp, "NCHW", x, dy)
    finally:
        REC.capturing = False
    assert fwd[3] == bwd[3] == 0 and fwd[0]["syncs"] == bwd[0]["syncs"] == 0
    assert fwd[0]["kernels"] == bwd[0]["kernels"] == 3
    layer.step(cp, "NCHW", x, dy)  # eager again: the pending verdict is read now
    sbn.check_errors()


def test_torch_adapter_eval_forward_is_one_kernel(cp):
    from cupysyncbn.interop import torch as ti

    torch, ref = _torch_ref("NHWC", 8, 0.1)
    layer = _TorchAdapterLayer(cp, ref, _forced())
    for step in range(2):
        x, dy = _batch("NHWC", 3, "float32", 95 + step)
        layer.step(cp, "NHWC", x, dy)
        ref(torch.from_numpy(x.astype("f8")).movedim(-1, 1))
    ref.eval()
    x, _ = _batch("NHWC", 2, "float32", 99)
    REC.clear()
    y, ctx = ti.forward_arrays(
        cp.asarray(x), layer.weight, layer.bias, layer.running_mean, layer.running_var,
        data_format="NHWC", training=False, update=False, momentum=0.9, eps=1e-5,
        comm=layer.comm, sync_state=layer.state)
    assert _names(REC.kernels) == ["bn_fwd_norm_cl"]
    assert REC.ops == [] and REC.syncs == [] and REC.d2h == []
    yr = ref(torch.from_numpy(x.astype("f8")).movedim(-1, 1)).detach().numpy()
    _close(np.moveaxis(_host(y), -1, 1), yr, 2e-5)


def _set_params(layer, w, b):
    layer.weight.data[...] = w.astype(layer.weight.data.dtype)
    layer.bias.data[...] = b.astype(layer.bias.data.dtype)


@pytest.mark.parametrize("dt", ["float16", "float32", "float64"])
@pytest.mark.parametrize("fmt", list(SHAPES))
def test_relu_keeps_the_three_kernel_budget_and_the_values(cp, fmt, dt):
    """act='relu' on the fused path: still 3 kernels + 1 all-reduce per pass, no other op.

    Values against the NumPy layer with act='relu' (itself checked against
    float64 truth and PyTorch in tests/functional/test_relu.py) and, for the
    ReLU itself, against its definition: y >= 0, dx of the masked dy.
    """
    from support import bn_ref

    comm = _forced()
    c = SHAPES[fmt](1)[-1 if fmt.startswith("NL") or fmt[-1] == "C" else 1]
    dev = _layer(cp, fmt, c, comm, act="relu")
    ref = _layer(cp, fmt, c, _forced(), on_device=False, act="relu")
    plain = _layer(cp, fmt, c, _forced(), on_device=False)
    cl = "cl" if fmt[-1] == "C" else "cf"
    for step, n in enumerate((4, 3, 5)):
        x, dy, w, b = bn_ref.relu_batch(SHAPES[fmt](n), fmt, dt, step)
        for layer in (dev, ref, plain):
            _set_params(layer, w, b)
        y, dx, fwd, bwd = _step(cp, dev, x, dy)
        tol = TOL[dt]
        _close(y, ref(x), tol)
        _close(dx, ref.backward(dy), tol)
        y0 = plain(x)  # the unfused composition
        _close(y, np.maximum(y0, 0), tol)
        _close(dx, plain.backward(np.where(y0 > 0, dy, 0).astype(dt)), tol)
        assert (_host(y) >= 0).all() and (_host(y) == 0).any()
        if step == 0:
            continue
        summary, kernels, ops, _ = fwd
        assert kernels == [f"bn_stats_partial_{cl}", "bn_fwd_pack", f"bn_fwd_norm_{cl}"]
        assert summary["syncs"] == summary["d2h"] == 0 and ops == [] and summary["allocs"] == 3
        summary, kernels, ops, _ = bwd
        assert kernels == [f"bn_bwd_partial_{cl}", "bn_bwd_pack", f"bn_bwd_elemt_{cl}"]
        assert summary["syncs"] == summary["d2h"] == 0 and ops == [] and summary["allocs"] == 1
    _close(dev.weight.grad, ref.weight.grad, 50 * TOL[dt])
    _close(dev.bias.grad, ref.bias.grad, 50 * TOL[dt])
    # eval (running statistics): one forward kernel; the backward masks too
    dev.eval()
    ref.eval()
    # the same running statistics (training left them equal to rounding only)
    dev._mean[...] = cp.asarray(_host(ref._mean))
    dev._variance[...] = cp.asarray(_host(ref._variance))
    stats = (_host(ref._mean).astype("f8"), _host(ref._variance).astype("f8"))
    x, dy, w, b = bn_ref.relu_batch(SHAPES[fmt](3), fmt, dt, 9, eval_stats=stats)
    for layer in (dev, ref):
        _set_params(layer, w, b)
    y, dx, fwd, bwd = _step(cp, dev, x, dy)
    assert fwd[1] == [f"bn_fwd_norm_{cl}"] and fwd[0]["ops"] == fwd[0]["syncs"] == 0
    assert bwd[1][-1] == f"bn_bwd_elemt_{cl}" and bwd[0]["ops"] == bwd[0]["syncs"] == 0
    _close(y, ref(x), TOL[dt])
    _close(dx, ref.backward(dy), TOL[dt])
    p32 = [v.astype("float32").astype("f8") for v in (w, b)]  # the layer's float32 values
    want = bn_ref.ref_relu(x, dy, fmt, *p32, stats)
    _close(y, want[0], 10 * TOL[dt])
    _close(dx, want[1], 10 * TOL[dt])
