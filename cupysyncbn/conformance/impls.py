"""Implementations the conformance suite can run (``--impl cupysyncbn.conformance.impls:NAME``).

- :func:`cupysyncbn_layer` (the default): ``cupysyncbn.SyncBatchNorm``.
- :func:`local_batchnorm`: the same layer without synchronization; it passes on
  one rank and must fail on several (a check that the suite detects missing sync).
- :func:`torch_adapter`: ``cupysyncbn.interop.torch.SyncBatchNorm`` (needs torch);
  PyTorch's running variance is unbiased, so it returns ``variance{s}`` and
  ``y_eval`` only for cases with ``unbiased_running_var``.
- :func:`paddle_adapter`: ``cupysyncbn.interop.paddle.SyncBatchNorm`` (needs
  paddlepaddle); Paddle's running variance is biased, so it returns
  ``variance{s}`` and ``y_eval`` only for cases without ``unbiased_running_var``.

Each follows the interface documented in :mod:`cupysyncbn.conformance`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..comm.base import LOCAL
from ..nn.norm import SyncBatchNorm as NativeSyncBatchNorm

__all__ = ["cupysyncbn_layer", "local_batchnorm", "torch_adapter", "paddle_adapter"]


def _run_layer(case: dict, comm: Any) -> dict:
    xp: Any = np
    if case.get("device", "cpu").startswith("cuda"):
        import cupy

        xp = cupy
    affine = case["affine"]
    layer = NativeSyncBatchNorm(
        len(case["weight"]), epsilon=case["epsilon"], momentum=case["momentum"],
        weight_attr=None if affine else False, bias_attr=None if affine else False,
        data_format=case["format"], comm=comm,
        unbiased_running_var=case["unbiased_running_var"], dtype=case["dtype"],
    )
    layer.weight.data = np.asarray(case["weight"], dtype=case["dtype"]).copy()
    layer.bias.data = np.asarray(case["bias"], dtype=case["dtype"]).copy()
    layer.to(case.get("device", "cpu"))  # also where set_device('auto') put it on a GPU
    out: dict[str, Any] = {}
    for s in range(case["steps"]):
        out[f"y{s}"] = layer(xp.asarray(case[f"x{s}"]))
        out[f"dx{s}"] = layer.backward(xp.asarray(case[f"dy{s}"]))
        if affine:
            out[f"dweight{s}"] = layer.weight.grad
            out[f"dbias{s}"] = layer.bias.grad
        layer.clear_gradients()
        state = layer.state_dict()
        out[f"mean{s}"] = state["_mean"].copy()
        out[f"variance{s}"] = state["_variance"].copy()
    if "x_eval" in case:
        layer.eval()
        out["y_eval"] = layer(xp.asarray(case["x_eval"]))
    return out


def cupysyncbn_layer(case: dict, rank: int, size: int) -> dict:
    """``cupysyncbn.SyncBatchNorm`` synchronized over ``case['comm']``."""
    return _run_layer(case, case["comm"] if case["comm"] is not None else LOCAL)


def local_batchnorm(case: dict, rank: int, size: int) -> dict:
    """The same layer with a one-process communicator: per-rank statistics."""
    return _run_layer(case, LOCAL)


# channel-last formats -> permutation to PyTorch's channel-first layout
_TO_NCX = {"NLC": (0, 2, 1), "NHWC": (0, 3, 1, 2), "NDHWC": (0, 4, 1, 2, 3)}


def torch_adapter(case: dict, rank: int, size: int) -> dict:
    """``cupysyncbn.interop.torch.SyncBatchNorm`` (PyTorch conventions) over ``case['comm']``."""
    import torch

    from ..interop.torch import SyncBatchNorm

    dtype = getattr(torch, case["dtype"])
    dev = "cuda" if case.get("device", "cpu").startswith("cuda") else "cpu"
    comm = case["comm"] if case["comm"] is not None else LOCAL
    bn = SyncBatchNorm(
        len(case["weight"]), eps=case["epsilon"], momentum=case["torch_momentum"],
        affine=case["affine"], comm=comm, device=dev, dtype=dtype,
    )
    if case["affine"]:
        with torch.no_grad():
            bn.weight.copy_(torch.from_numpy(np.asarray(case["weight"])))
            bn.bias.copy_(torch.from_numpy(np.asarray(case["bias"])))
    perm = _TO_NCX.get(case["format"])
    inv = None if perm is None else tuple(int(i) for i in np.argsort(perm))

    def to_t(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a)).to(dev)
        return t if perm is None else t.permute(*perm)

    def from_t(t: torch.Tensor) -> np.ndarray:
        t = t.detach() if inv is None else t.detach().permute(*inv)
        return t.cpu().numpy().copy()

    out: dict[str, Any] = {}
    for s in range(case["steps"]):
        x = to_t(case[f"x{s}"]).requires_grad_(True)
        y = bn(x)
        y.backward(to_t(case[f"dy{s}"]))
        grads: Any = (x.grad, bn.weight.grad, bn.bias.grad)  # set by the backward
        out[f"y{s}"], out[f"dx{s}"] = from_t(y), from_t(grads[0])
        if case["affine"]:
            out[f"dweight{s}"] = grads[1].cpu().numpy().copy()
            out[f"dbias{s}"] = grads[2].cpu().numpy().copy()
            bn.weight.grad = bn.bias.grad = None
        stats: Any = (bn.running_mean, bn.running_var)
        out[f"mean{s}"] = stats[0].cpu().numpy().copy()
        if case["unbiased_running_var"]:
            out[f"variance{s}"] = stats[1].cpu().numpy().copy()
    if "x_eval" in case and case["unbiased_running_var"]:  # else the running var differs
        bn.eval()
        with torch.no_grad():
            out["y_eval"] = from_t(bn(to_t(case["x_eval"])))
    return out


def paddle_adapter(case: dict, rank: int, size: int) -> dict:
    """``cupysyncbn.interop.paddle.SyncBatchNorm`` (Paddle conventions) over ``case['comm']``."""
    import paddle

    from ..interop.paddle import SyncBatchNorm

    place = "gpu" if case.get("device", "cpu").startswith("cuda") else "cpu"
    paddle.set_device(place)
    affine = case["affine"]
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype(case["dtype"])  # Paddle layers take their dtype from it
    try:
        bn = SyncBatchNorm(
            len(case["weight"]), epsilon=case["epsilon"], momentum=case["momentum"],
            weight_attr=None if affine else False, bias_attr=None if affine else False,
            data_format=case["format"],
            comm=case["comm"] if case["comm"] is not None else LOCAL,
        )
    finally:
        paddle.set_default_dtype(previous)
    params: Any = (bn.weight, bn.bias)
    if affine:
        params[0].set_value(np.asarray(case["weight"], dtype=case["dtype"]))
        params[1].set_value(np.asarray(case["bias"], dtype=case["dtype"]))
    biased = not case["unbiased_running_var"]

    def to_p(a: np.ndarray, grad: bool = False) -> Any:
        return paddle.to_tensor(np.ascontiguousarray(a), place=place, stop_gradient=not grad)

    out: dict[str, Any] = {}
    for s in range(case["steps"]):
        x = to_p(case[f"x{s}"], grad=True)
        y = bn(x)
        y.backward(to_p(case[f"dy{s}"]))
        out[f"y{s}"], out[f"dx{s}"] = y.numpy(), x.grad.numpy()
        if affine:
            out[f"dweight{s}"] = params[0].grad.numpy()
            out[f"dbias{s}"] = params[1].grad.numpy()
        bn.clear_gradients()
        out[f"mean{s}"] = bn._mean.numpy()
        if biased:
            out[f"variance{s}"] = bn._variance.numpy()
    if "x_eval" in case and biased:  # else the running variance differs
        bn.eval()
        with paddle.no_grad():
            out["y_eval"] = bn(to_p(case["x_eval"])).numpy()
    return out
