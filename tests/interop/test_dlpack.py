"""DLPack in the functional API: foreign arrays in, the caller's arrays out, no copies."""

import numpy as np
import pytest

from cupysyncbn import functional as F
from cupysyncbn.arrays import dlpack as D

torch = pytest.importorskip("torch")


class Foreign:
    """A minimal non-NumPy array library: only the DLPack protocol (wraps an ndarray)."""

    def __init__(self, a):
        self.a = a

    def __dlpack__(self, **kw):
        return self.a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


def test_numpy_round_trip_without_copy():
    a = np.random.default_rng(0).normal(size=(4, 3))
    assert D.to_native(a) is a  # native arrays pass through untouched
    assert D.from_native(a, like=a) is a
    b = np.from_dlpack(Foreign(a))
    assert b.ctypes.data == a.ctypes.data
    n = D.to_native(Foreign(a))
    assert isinstance(n, np.ndarray) and n.ctypes.data == a.ctypes.data


def test_torch_cpu_round_trip_without_copy():
    t = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)
    n = D.to_native(t, "x")  # requires_grad tensors are detached, not copied
    assert isinstance(n, np.ndarray) and n.ctypes.data == t.data_ptr()
    back = D.from_native(n, like=t)
    assert isinstance(back, torch.Tensor) and back.data_ptr() == t.data_ptr()
    strided = t.detach().transpose(0, 2)  # non-contiguous views keep their strides
    ns = D.to_native(strided)
    assert ns.ctypes.data == strided.data_ptr()
    assert ns.strides == tuple(s * 8 for s in strided.stride())
    empty = D.to_native(torch.empty(0, 3))
    assert empty.shape == (0, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_functional_with_torch_tensors_equals_numpy(dtype):
    rng = np.random.default_rng(1)
    xn = rng.normal(size=(6, 3, 4, 2)).astype(np.float32 if dtype == torch.float32 else np.float64)
    dyn = rng.normal(size=xn.shape).astype(xn.dtype)
    wn, bn = rng.uniform(0.5, 1.5, 3), rng.normal(size=3)
    pdt = np.float64
    args_n = (xn, wn.astype(pdt), bn.astype(pdt), np.zeros(3, pdt), np.ones(3, pdt))
    args_t = tuple(torch.from_numpy(np.array(a)) for a in args_n)
    rn = F.batch_norm_forward(*args_n, momentum=0.8)
    rt = F.batch_norm_forward(*args_t, momentum=0.8)
    # zero-copy in: the math ran on the caller's memory
    assert rt.ctx.x.ctypes.data == args_t[0].data_ptr()
    for name in ("y", "running_mean", "running_var", "batch_mean", "batch_var"):
        got = getattr(rt, name)
        assert isinstance(got, torch.Tensor), name
        np.testing.assert_array_equal(got.numpy(), getattr(rn, name))
    dx_n, dw_n, db_n = F.batch_norm_backward(dyn, rn.ctx)
    dx_t, dw_t, db_t = F.batch_norm_backward(torch.from_numpy(dyn.copy()), rt.ctx)
    for got, ref in ((dx_t, dx_n), (dw_t, dw_n), (db_t, db_n)):
        assert isinstance(got, torch.Tensor)
        np.testing.assert_array_equal(got.numpy(), ref)
    # keyword arguments are converted as well
    rk = F.batch_norm_forward(x=args_t[0], weight=args_t[1], bias=args_t[2], momentum=0.8)
    np.testing.assert_array_equal(rk.y.numpy(), rn.y)


def test_native_inputs_take_the_fast_path(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("to_native called for NumPy input")

    monkeypatch.setattr(D, "to_native", boom)
    x = np.random.default_rng(2).normal(size=(4, 2))
    res = F.batch_norm_forward(x, np.ones(2), None, data_format="NC")
    assert type(res.y) is np.ndarray
    dx, _, _ = F.batch_norm_backward(np.ones_like(x), res.ctx)
    assert type(dx) is np.ndarray


def test_generic_dlpack_object_gives_numpy_output():
    x = np.random.default_rng(3).normal(size=(5, 2))
    res = F.batch_norm_forward(Foreign(x), data_format="NC")
    ref = F.batch_norm_forward(x, data_format="NC")
    np.testing.assert_array_equal(np.asarray(res.y), ref.y)  # library without from_dlpack


def test_clear_errors():
    with pytest.raises(TypeError, match="x must be"):
        F.batch_norm_forward([[1.0, 2.0]], data_format="NC")
    with pytest.raises(TypeError, match="bfloat16|cannot be imported"):
        F.batch_norm_forward(torch.ones(3, 2, dtype=torch.bfloat16), data_format="NC")
    with pytest.raises(TypeError, match="running_mean"):
        D.to_native(object(), "running_mean")
