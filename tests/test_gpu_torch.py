"""The PyTorch adapter on CUDA tensors, on the default and on a non-default stream.

Needs a CUDA GPU and a CUDA build of PyTorch (skipped with the reason
otherwise; ``scripts/gpu_check.sh`` fails on any skip). The layer runs the
whole synchronized path on one GPU (``force_collectives``) and is compared
with ``torch.nn.BatchNorm2d`` in float64 on the CPU over three training
steps: outputs, input and parameter gradients, running statistics, and an
eval pass. On a non-default stream the input is produced behind a spinning
kernel, so work that is not ordered after it on that stream reads garbage.
"""

import numpy as np
import pytest


def _skip_reason():
    try:
        import torch
    except Exception as e:
        return f"PyTorch is not importable ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA GPU (or is a CPU build)"
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() == 0:
            return "CuPy sees no GPU"
    except Exception as e:
        return f"CuPy is not usable ({type(e).__name__}: {e})"
    return None


REASON = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=str(REASON))]


@pytest.fixture
def forced():
    import cupysyncbn as sbn

    comm = sbn.init("none", force_collectives=True)
    yield comm
    sbn.set_default_comm(None)


def _run(layer, ref, xs, dys, stream=None):
    import torch

    errs = {}

    def put(k, v):
        errs[k] = max(errs.get(k, 0.0), float(v))

    for x_host, dy_host in zip(xs, dys):
        ctx = torch.cuda.stream(stream) if stream is not None else torch.cuda.stream(None)
        with ctx:
            if stream is not None:
                torch.cuda._sleep(20_000_000)  # the input is late on this stream
            x = torch.from_numpy(x_host).cuda(non_blocking=True).float().requires_grad_(True)
            dy = torch.from_numpy(dy_host).cuda(non_blocking=True).float()
            y = layer(x)
            y.backward(dy)
            got = (y.detach().cpu().double(), x.grad.cpu().double())
        xr = torch.from_numpy(x_host).double().requires_grad_(True)
        yr = ref(xr)
        yr.backward(torch.from_numpy(dy_host).double())
        put("y", (got[0] - yr.detach()).abs().max())
        put("dx", (got[1] - xr.grad).abs().max())
    torch.cuda.synchronize()
    put("dweight", (layer.weight.grad.cpu().double() - ref.weight.grad).abs().max())
    put("dbias", (layer.bias.grad.cpu().double() - ref.bias.grad).abs().max())
    put("running_mean", (layer.running_mean.cpu().double() - ref.running_mean).abs().max())
    put("running_var", (layer.running_var.cpu().double() - ref.running_var).abs().max())
    layer.eval()
    ref.eval()
    x = torch.from_numpy(xs[0]).cuda().float()
    put("eval", (layer(x).detach().cpu().double() - ref(torch.from_numpy(xs[0]).double()))
        .abs().max())
    return errs


@pytest.mark.parametrize("where", ["default stream", "side stream"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "channels_last"])
def test_torch_adapter_on_cuda_equals_torch_float64(forced, where, channels_last):
    import torch

    from cupysyncbn.interop.torch import SyncBatchNorm

    rng = np.random.default_rng(5)
    shape = (8, 16, 24, 24)
    xs = [(rng.standard_normal(shape) * 3 + 2).astype(np.float32) for _ in range(3)]
    dys = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    if channels_last:
        xs = [np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2) for x in xs]
    layer = SyncBatchNorm(16, comm=forced).cuda()
    ref = torch.nn.BatchNorm2d(16).double()
    stream = torch.cuda.Stream() if where == "side stream" else None
    errs = _run(layer, ref, xs, dys, stream)
    assert layer.weight.is_cuda and layer.running_mean.is_cuda
    tol = {"y": 2e-5, "dx": 2e-5, "dweight": 5e-3, "dbias": 5e-3, "running_mean": 2e-5,
           "running_var": 2e-5, "eval": 2e-5}
    bad = {k: v for k, v in errs.items() if not v <= tol[k]}
    assert not bad, errs
