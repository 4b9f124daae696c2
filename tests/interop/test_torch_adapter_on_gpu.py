"""The PyTorch adapter on CUDA tensors, on the default and on a non-default stream.

Needs a CUDA GPU and a CUDA build of PyTorch (skipped with the reason
otherwise; ``scripts/gpu_check.sh`` fails on any skip). The layer runs the
whole synchronized path on one GPU (``force_collectives``) and is compared
with ``torch.nn.BatchNorm2d`` in float64 on the CPU over three training
steps: outputs, input and parameter gradients, running statistics, and an
eval pass. On a non-default stream the input is produced behind a spinning
kernel, so work that is not ordered after it on that stream reads garbage.
A training step of a converted model (forward, backward, optimizer) captured
with ``torch.cuda.graph`` replays to the values of the same steps run eagerly
(issue 10, point 3; counts per pass: tests/_sync/test_launch_budget.py).
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


def _small_model(comm):
    import torch

    from cupysyncbn.interop.torch import convert_sync_batchnorm

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(8, momentum=None), torch.nn.ReLU(),  # PyTorch's running average
        torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 5), torch.nn.BatchNorm1d(5),
    )
    return convert_sync_batchnorm(model, comm=comm).cuda()


def _train_step(model, opt, x, t):
    opt.zero_grad(set_to_none=True)
    loss = (model(x) - t).square().mean()
    loss.backward()
    opt.step()
    return loss


def test_training_step_captured_in_a_cuda_graph_replays_like_eager(forced):
    """torch.cuda.graph over forward + backward + SGD of a converted model (3 of our
    layers, one with momentum=None): each replay equals an eager step on the same data."""
    import torch

    import cupysyncbn as sbn
    from cupysyncbn.interop.torch import SyncBatchNorm

    eager, graphed = _small_model(forced), _small_model(forced)
    assert sum(isinstance(m, SyncBatchNorm) for m in graphed.modules()) == 3
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)
    opt_g = torch.optim.SGD(graphed.parameters(), lr=0.05)
    gen = torch.Generator(device="cuda").manual_seed(1)

    def batch():
        return (torch.randn(6, 3, 6, 6, device="cuda", generator=gen) * 2 + 1,
                torch.randn(6, 5, device="cuda", generator=gen))

    static_x, static_t = batch()
    # Warm-up on a side stream, as PyTorch's docs require before a capture:
    # kernels load, the layers' handshake and first (two-all-reduce) pass run,
    # workspaces are made. The eager twin runs the same steps.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            x, t = batch()
            static_x.copy_(x)
            static_t.copy_(t)
            _train_step(graphed, opt_g, static_x, static_t)
            _train_step(eager, opt_e, x, t)
    torch.cuda.current_stream().wait_stream(side)
    # A steady-state eager step makes no host synchronization PyTorch can see
    # (CuPy's would make the capture below fail).
    x, t = batch()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _train_step(eager, opt_e, x, t)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    static_x.copy_(x)
    static_t.copy_(t)
    _train_step(graphed, opt_g, static_x, static_t)

    graph = torch.cuda.CUDAGraph()
    opt_g.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = _train_step(graphed, opt_g, static_x, static_t)
    for _ in range(4):
        x, t = batch()
        static_x.copy_(x)
        static_t.copy_(t)
        graph.replay()
        loss = _train_step(eager, opt_e, x, t)
        torch.testing.assert_close(static_loss, loss, rtol=1e-5, atol=1e-6)
    torch.cuda.synchronize()
    sbn.check_errors()  # the verdicts latched during the replays: none
    for (name, a), b in zip(graphed.state_dict().items(), eager.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
        else:  # num_batches_tracked: 4 warm-up/eager steps + 4 replays
            assert int(a) == int(b) == 8, name
