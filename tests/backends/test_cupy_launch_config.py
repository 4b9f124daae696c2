"""CuPy backend launch configuration and stream order, proven without a GPU.

The recording stand-in (:mod:`support.recording_cupy`) checks every launch
of a kernel instantiated with a 32-bit index against the largest index its
grid-stride loop reaches, and records the stream each launch, operation and
copy is ordered on. Sizes past 2**31 elements use logical arrays (one
element of memory): the launch is checked and recorded, not run.
"""

import numpy as np
import pytest
from support import cuda_emu, recording_cupy

import cupysyncbn as sbn
from cupysyncbn.comm.base import NoCommunicator

REC = recording_cupy.REC
INT32_MAX = 2**31 - 1


@pytest.fixture(scope="module")
def cp():
    try:
        with recording_cupy.installed() as mod:
            yield mod
    except cuda_emu.Unavailable as e:  # pragma: no cover - no g++ 12
        pytest.skip(str(e))


def _threads(launch):
    _, grid, block = launch
    return grid[0] * grid[1] * block[0] * block[1]


# sizes around the switch: small, just below 2**31 (where the grid-stride
# overshoot decides), just above, and far above
@pytest.mark.parametrize("total", [1000, 2**31 - 4096, 2**31 + 8, 3 * 2**31 + 5])
def test_index_type_switch_past_2_31_elements(cp, total):
    from cupysyncbn.backends.cupy.backend import get_cupy_backend

    be = get_cupy_backend()
    x = recording_cupy.logical((1, 1, total), np.float16)
    dy = recording_cupy.logical((1, 1, total), np.float16)
    vec = cp.asarray(np.array([0.25], np.float32))
    REC.clear()
    y = be.normalize(x, False, vec, vec, vec, np.float16)
    dx = be.backward_elemt(dy, x, False, vec, vec, vec, vec, np.float16)
    assert y.shape == dx.shape == (1, 1, total)
    names = [k[0] for k in REC.kernels]
    assert [n.split("<")[0] for n in names] == ["bn_normalize", "bn_backward_elemt"]
    for launch in REC.kernels:
        reach = total + _threads(launch) - 1  # the last index the grid-stride loop forms
        wide = launch[0].replace(" ", "").endswith(",longlong>")
        assert wide == (reach > INT32_MAX), (launch, reach)


def test_standin_refuses_a_32_bit_index_past_2_31(cp):
    # the check itself: the test above relies on it
    from cupysyncbn.backends.cupy import kernels as ks
    from cupysyncbn.backends.cupy.backend import get_cupy_backend

    be = get_cupy_backend()
    x = recording_cupy.logical((1, 1, 2**31 - 100), np.float32)
    vec = cp.asarray(np.array([1.0], np.float32))
    kern = be._kernel("elementwise.cu", ks.normalize("float", "float", "int"))
    n = np.int32(x.size)
    with pytest.raises(AssertionError, match="int32 index past 2"):
        kern((512,), (256,), (x, x, n, np.int32(1), n, vec, vec, vec, np.int32(0)))
    kern((1,), (64,), (x, x, n, np.int32(1), n, vec, vec, vec, np.int32(0)))  # reach < 2**31: fine


def test_every_launch_is_on_the_current_stream(cp):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3, 5, 6)) * 2 + 1
    dy = rng.standard_normal(x.shape)
    ref = sbn.SyncBatchNorm(3, comm=NoCommunicator(), dtype="float64")
    yr, dxr = ref(x), ref.backward(dy)
    layer = sbn.SyncBatchNorm(3, comm=NoCommunicator(), dtype="float64").to("cuda")
    side = cp.cuda.Stream(non_blocking=True)
    assert side.ptr != 0
    xd, dyd = cp.asarray(x), cp.asarray(dy)
    REC.clear()
    with side:
        assert cp.cuda.get_current_stream() is side
        y = layer(xd)
        dx = layer.backward(dyd)
    assert cp.cuda.get_current_stream() is cp.cuda.Stream.null
    kinds = {k for k, _, _ in REC.on_stream}
    assert "kernel" in kinds, REC.on_stream
    wrong = [w for w in REC.on_stream if w[2] != side.ptr]
    assert not wrong, f"work outside the current stream: {wrong}"
    np.testing.assert_allclose(cp.asnumpy(y), yr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(cp.asnumpy(dx), dxr, rtol=0, atol=1e-12)
