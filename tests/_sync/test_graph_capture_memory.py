"""Memory a captured CUDA graph writes stays allocated while it can replay (#20 item 5).

A replay writes to the addresses the capture saw. If an array a captured pass
used goes back to the pool (the saved statistics after the backward, a
workspace replaced by a larger one, the workspace of a stateless functional
call), the pool hands that address to someone else and every replay corrupts
it. On the recording stand-in, every array our kernels receive during a
capture is tracked by a weak reference to the allocation that owns it; after
the capture, the Python references a user does not keep are dropped, a larger
eager batch forces the workspaces to grow, and every such allocation must
still be alive.
"""

import gc
import weakref

import numpy as np
import pytest
from support import cuda_emu, recording_cupy

import cupysyncbn as sbn
from cupysyncbn import functional as F
from cupysyncbn.comm.base import NoCommunicator

REC = recording_cupy.REC


#: id -> weak reference of the allocations behind the kernel arguments of captures
_REFS: dict[int, weakref.ref] = {}


def _tracking(get_function):
    def tracked(self, name):
        call = get_function(self, name)

        def run(grid, block, args):
            if REC.capturing:
                for a in args:
                    if isinstance(a, np.ndarray):
                        while isinstance(a.base, np.ndarray):
                            a = a.base
                        _REFS.setdefault(id(a), weakref.ref(a))
            return call(grid, block, args)
        return run
    return tracked


@pytest.fixture(scope="module")
def cp():
    import cupysyncbn.backends.cupy.backend as cb

    try:
        # the backend fetches each kernel once per installation: track from the start
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(recording_cupy.RawModule, "get_function",
                       _tracking(recording_cupy.RawModule.get_function))
            mp.setattr(cb, "_THREADS", 64)  # smaller blocks: a faster emulation
            with recording_cupy.installed() as mod:
                yield mod
    except cuda_emu.Unavailable as e:  # pragma: no cover - no g++ 12
        pytest.skip(str(e))


@pytest.fixture()
def captured():
    _REFS.clear()
    yield _REFS
    _REFS.clear()


def _forced():
    comm = NoCommunicator()
    comm.force_collectives = True
    return comm


def _batch(n, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, 3, 4, 5)) * 2 + 5).astype("float32")
    return x, rng.standard_normal(x.shape).astype("float32")


def _freed(refs):
    gc.collect()
    return sum(r() is None for r in refs.values())


def test_a_captured_layer_step_keeps_what_its_graph_writes(cp, captured):
    layer = sbn.SyncBatchNorm(3, comm=_forced())
    layer.to("cuda")
    x, dy = _batch(2)
    layer(cp.asarray(x))
    layer.backward(cp.asarray(dy))  # eager warm-up: workspaces exist
    xd, dyd = cp.asarray(x), cp.asarray(dy)  # the graph's static input and output:
    REC.capturing = True                      # the user's to keep, as in CuPy
    try:
        y = layer(xd)
        dx = layer.backward(dyd)
    finally:
        REC.capturing = False
    assert len(captured) >= 6  # inputs, outputs, statistics, partials, wire buffers
    x8, dy8 = _batch(8, seed=1)  # a larger eager batch: the workspaces grow
    layer(cp.asarray(x8))
    layer.backward(cp.asarray(dy8))
    assert _freed(captured) == 0, "a replay would write to memory back in the pool"
    del xd, dyd, y, dx


def test_a_captured_functional_step_without_state_keeps_its_workspace(cp, captured):
    x, dy = _batch(2)
    w = cp.asarray(np.ones(3, "float32"))
    b = cp.asarray(np.zeros(3, "float32"))
    xd, dyd = cp.asarray(x), cp.asarray(dy)
    REC.capturing = True
    try:
        res = F.batch_norm_forward(xd, w, b, None, None, training=True, comm=_forced())
        dx, _, _ = F.batch_norm_backward(dyd, res.ctx)
    finally:
        REC.capturing = False
    y = res.y
    del res
    assert _freed(captured) == 0, "a replay would write to memory back in the pool"
    del xd, dyd, y, dx


def test_an_eager_step_frees_its_temporaries(cp, captured):
    """The control: outside a capture nothing is kept (no leak per pass)."""
    layer = sbn.SyncBatchNorm(3, comm=_forced())
    layer.to("cuda")
    x, dy = _batch(2)
    REC.capturing = True  # track the arguments of one pass ...
    try:
        layer(cp.asarray(x))
    finally:
        REC.capturing = False
    ws = next(iter(layer._sync_state._buffers.values()))
    assert ws.kept  # ... which was a capture: its statistics are kept
    kept = len(ws.kept)
    for _ in range(3):
        layer(cp.asarray(x))
        layer.backward(cp.asarray(dy))
    assert len(ws.kept) == kept


class _Stream:
    def __init__(self, ptr, capturing=False):
        self.ptr = ptr
        self.capturing = capturing

    def is_capturing(self):
        return self.capturing


def test_scratch_is_per_stream_and_kept_once_captured():
    """A side stream (PyTorch's, a capture stream) gets its own scratch, so a
    stream-ordered pool frees each array on the stream that used it; after a
    capture, an array replaced by a larger one is kept, not freed."""
    from cupysyncbn._sync.state import DeviceWorkspace

    current = [_Stream(0)]
    xp = type("xp", (), {"cuda": type("cuda", (), {
        "get_current_stream": staticmethod(lambda: current[0])}),
        "empty": staticmethod(np.empty), "zeros": staticmethod(np.zeros)})
    ws = DeviceWorkspace(xp, 4)
    assert not ws.begin_pass()
    a = ws("buf", 8, "f8")
    assert ws("buf", 8, "f8").base is a.base  # reused on its stream
    current[0] = _Stream(7)
    ws.begin_pass()
    b = ws("buf", 8, "f8")
    assert b.base is not a.base
    current[0] = _Stream(7, capturing=True)
    assert ws.begin_pass() and ws.capturing
    assert ws("buf", 8, "f8").base is b.base
    current[0] = _Stream(7)
    assert not ws.begin_pass() and not ws.capturing and ws.captured
    ref = weakref.ref(b.base)
    del b
    ws("buf", 64, "f8")  # grows: the captured array stays alive
    gc.collect()
    assert ref() is not None and ref() in [k.base if k.base is not None else k for k in ws.kept]
