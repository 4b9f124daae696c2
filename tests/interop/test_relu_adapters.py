"""``act="relu"`` in the PyTorch and Paddle adapters (and Apex's ``fuse_relu``, Paddle's ``act``).

Against the frameworks' own ``relu(batch_norm(...))`` with their autograd,
CPU tensors, one process; double backward and ``torch.compile`` for PyTorch;
``convert_sync_batchnorm`` keeping ``paddle.nn.BatchNorm``'s ``act``.
"""

import copy
import pickle

import numpy as np
import paddle
import pytest
import torch
from support import bn_ref

import cupysyncbn.interop.paddle as pi
import cupysyncbn.interop.torch as ti
from cupysyncbn.comm.base import LOCAL


def _data(shape, seed, stats=None):
    x, dy, w, b = bn_ref.relu_batch(shape, "NCHW", "float64", seed, eval_stats=stats)
    return x, dy, w, b


def _torch_pair(w, b, **kw):
    ours = ti.SyncBatchNorm(len(w), comm=LOCAL, dtype=torch.float64, **kw)
    ref = torch.nn.BatchNorm2d(len(w), dtype=torch.float64)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.from_numpy(w))
            m.bias.copy_(torch.from_numpy(b))
    return ours, ref


def _grads(module, x, dy, create_graph=False):
    xt = torch.from_numpy(x).requires_grad_()
    y = module(xt)
    g = torch.autograd.grad(y, [xt, module.weight, module.bias], torch.from_numpy(dy),
                            create_graph=create_graph)
    return xt, y, g


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kw", [{"act": "relu"}, {"fuse_relu": True}], ids=["act", "fuse_relu"])
def test_torch_adapter_relu_equals_torch_relu_of_batch_norm(kw, channels_last):
    x, dy, w, b = _data((4, 3, 5, 6), 0)
    ours, ref = _torch_pair(w, b, **kw)
    assert ours.act == "relu" and "act='relu'" in repr(ours)
    for step in range(2):
        xs = x + step
        if channels_last:
            xs = np.ascontiguousarray(xs.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        _, y1, g1 = _grads(ours, xs, dy)
        xt = torch.from_numpy(np.ascontiguousarray(xs)).requires_grad_()
        y2 = torch.relu(ref(xt))
        g2 = torch.autograd.grad(y2, [xt, ref.weight, ref.bias], torch.from_numpy(dy))
        for a, e in zip((y1, *g1), (y2, *g2)):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval()
    ref.eval()
    stats = (ref.running_mean.numpy(), ref.running_var.numpy())
    x, dy, _, _ = _data((2, 3, 4, 4), 3, stats)
    _, y1, g1 = _grads(ours, x, dy)
    xt = torch.from_numpy(x).requires_grad_()
    y2 = torch.relu(ref(xt))
    g2 = torch.autograd.grad(y2, [xt, ref.weight, ref.bias], torch.from_numpy(dy))
    for a, e in zip((y1, *g1), (y2, *g2)):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


def test_torch_adapter_relu_double_backward():
    # The ReLU's second derivative is 0 almost everywhere: the mask is a
    # constant of the differentiable backward, as in torch.relu's.
    x, dy, w, b = _data((4, 3, 3, 3), 1)
    ours, ref = _torch_pair(w, b, act="relu")
    outs = []
    for fn, params in ((ours, ours), (lambda t: torch.relu(ref(t)), ref)):
        xt = torch.from_numpy(x).requires_grad_()
        y = fn(xt)
        gx, = torch.autograd.grad(y, xt, torch.from_numpy(dy), create_graph=True)
        outs.append(torch.autograd.grad(gx.square().sum(), [xt, params.weight]))
    for a, e in zip(*outs):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-8)


def test_torch_adapter_relu_copies_and_bad_values():
    m = ti.SyncBatchNorm(3, act="relu", comm=LOCAL)
    assert copy.deepcopy(m).act == "relu" and pickle.loads(pickle.dumps(m)).act == "relu"
    assert ti.SyncBatchNorm(3, comm=LOCAL).act is None
    for bad in ("gelu", "ReLU", 1):
        with pytest.raises(ValueError, match=r"act must be None or 'relu'"):
            ti.SyncBatchNorm(3, act=bad)
        with pytest.raises(ValueError, match=r"act must be None or 'relu'"):
            ti.batch_norm(torch.ones(4, 3), None, None, training=True, comm=LOCAL, act=bad)
    with pytest.raises(TypeError, match="fuse_relu"):
        ti.SyncBatchNorm(3, fuse_relu="yes")


def test_torch_compile_fullgraph_with_relu_equals_eager_torch():
    torch._dynamo.reset()
    x, dy, w, b = _data((5, 3, 4, 4), 4)
    ours, ref = _torch_pair(w, b, act="relu")
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    for step in range(2):
        xs = torch.from_numpy(x + step).requires_grad_()
        xr = torch.from_numpy(x + step).requires_grad_()
        ys, yr = compiled(xs), torch.relu(ref(xr))
        gs = torch.autograd.grad(ys, [xs, ours.weight, ours.bias], torch.from_numpy(dy))
        gr = torch.autograd.grad(yr, [xr, ref.weight, ref.bias], torch.from_numpy(dy))
        for a, e in zip((ys, *gs), (yr, *gr)):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


def _paddle_grads(fn, params, x, dy):
    xt = paddle.to_tensor(x, stop_gradient=False)
    y = fn(xt)
    return [y] + paddle.grad(y, [xt, *params], paddle.to_tensor(dy))


@pytest.mark.parametrize("train", [True, False])
def test_paddle_adapter_relu_equals_paddle_relu_of_batch_norm(train):
    x, dy, w, b = _data((4, 3, 5, 6), 5)
    ours = pi.SyncBatchNorm(3, act="relu", comm=LOCAL)
    ref = paddle.nn.BatchNorm2D(3)
    for m in (ours, ref):
        m.weight.set_value(paddle.to_tensor(w.astype("float32")))
        m.bias.set_value(paddle.to_tensor(b.astype("float32")))
        m.train() if train else m.eval()
    assert "act='relu'" in repr(ours)
    x = x.astype("float32")
    dy = dy.astype("float32")
    got = _paddle_grads(ours, [ours.weight, ours.bias], x, dy)
    want = _paddle_grads(lambda t: paddle.nn.functional.relu(ref(t)), [ref.weight, ref.bias],
                         x, dy)
    for a, e in zip(got, want):
        np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=2e-4, atol=2e-4)
    with pytest.raises(ValueError, match=r"act must be None or 'relu'"):
        pi.SyncBatchNorm(3, act="sigmoid")


def test_paddle_convert_keeps_batchnorm_act_and_fuses_relu():
    x, dy, w, b = _data((4, 3, 2, 2), 6)
    x = x.astype("float32")
    old = paddle.nn.BatchNorm(3, act="relu")
    old.weight.set_value(paddle.to_tensor(w.astype("float32")))
    old.bias.set_value(paddle.to_tensor(b.astype("float32")))
    want = old(paddle.to_tensor(x)).numpy()
    new = pi.convert_sync_batchnorm(old, comm=LOCAL)
    assert isinstance(new, pi.SyncBatchNorm) and new._act == "relu"
    y = new(paddle.to_tensor(x)).numpy()
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    assert (y >= 0).all() and (y == 0).any()
    other = pi.convert_sync_batchnorm(paddle.nn.BatchNorm(3, act="sigmoid"), comm=LOCAL)
    assert other._act == "sigmoid"  # any other activation: applied after the pass
