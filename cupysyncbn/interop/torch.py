"""PyTorch adapter: a ``torch.nn.Module`` SyncBatchNorm computed by cupysyncbn.

``SyncBatchNorm`` has ``torch.nn.SyncBatchNorm``'s conventions (``momentum=0.1``
as PyTorch defines it, unbiased running variance, ``momentum=None`` cumulative
average, ``weight``/``bias`` Parameters, ``running_mean``/``running_var``/
``num_batches_tracked`` buffers, state-dict layout) and is a subclass of
``torch.nn.modules.batchnorm._BatchNorm``. Autograd goes through a
``torch.autograd.Function`` whose forward and backward are
:func:`cupysyncbn.functional.batch_norm_forward` / ``batch_norm_backward``;
tensors cross over through DLPack without copies (CPU tensors become NumPy
arrays, CUDA tensors CuPy arrays on PyTorch's current stream). Statistics are
synchronized over a cupysyncbn communicator: a ``torch.distributed`` process
group (under ``torchrun``: gloo for CPU tensors, which
``torch.nn.SyncBatchNorm`` refuses, NCCL for CUDA tensors), MPI, or NCCL,
exact with uneven and empty per-rank batches.

Double backward (``create_graph=True``) is supported with the synchronized
statistics; bfloat16 modules compute from float32 copies; under
``torch.compile`` (``fullgraph=True`` too) and ``torch.export`` the module's
passes are the custom operators ``cupysyncbn::sync_batch_norm`` and
``cupysyncbn::sync_batch_norm_backward``; ``torch.jit`` and ``torch.func``
raise ``NotImplementedError`` naming what is supported (docs/torch.md).

With :mod:`cupysyncbn.comm.torch`, the only modules of cupysyncbn that import
``torch``.

Examples
--------
>>> import torch, cupysyncbn
>>> from cupysyncbn.interop.torch import convert_sync_batchnorm
>>> model = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)))
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import warnings
import weakref
from typing import Any

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .. import functional as F
from .._sync import fused
from .._sync.checks import REPRO_ACT, check_act, check_reproducible
from .._sync.state import SyncState, workspace
from ..arrays.dlpack import from_native, to_native
from ..backends import get_backend
from ..comm.select import as_communicator
from .shared_comm import SharedComm
from .state_dict import momentum_torch_to_paddle, paddle_to_torch, torch_to_paddle

__all__ = [
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "batch_norm",
    "forward_arrays",
    "backward_arrays",
    "from_paddle_state_dict",
    "to_paddle_state_dict",
]

_FORMATS = {2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"}
# Channels-last memory layouts are computed as NHWC/NDHWC views (no copy).
_CL = {
    4: ("NHWC", (0, 2, 3, 1), (0, 3, 1, 2), torch.channels_last),
    5: ("NDHWC", (0, 2, 3, 4, 1), (0, 4, 1, 2, 3), torch.channels_last_3d),
}


def _layout(x: torch.Tensor) -> tuple[str, tuple | None, tuple | None]:
    """(data_format, permutation to it, inverse permutation) for ``x``'s memory layout."""
    cl = _CL.get(x.dim())
    if cl is not None and not x.is_contiguous() and x.is_contiguous(memory_format=cl[3]):
        return cl[0], cl[1], cl[2]
    return _FORMATS[x.dim()], None, None


def _on_torch_stream(t: torch.Tensor) -> Any:
    """Context running CuPy work on PyTorch's current stream and memory of ``t``'s device.

    CUDA tensors become CuPy arrays; without this CuPy would launch on its own
    current stream, unordered with PyTorch's work on a non-default stream, and
    allocate from its own pool, which ``torch.cuda.graph`` does not know.
    """
    if not t.is_cuda:
        return contextlib.nullcontext()
    import cupy

    stream = torch.cuda.current_stream(t.device)
    return _CupyStream(cupy, t.device.index, stream.cuda_stream)


class _CupyStream:
    """``with``: CuPy's device, stream and allocator set to PyTorch's.

    CuPy's allocations (outputs, saved statistics, the layer's workspaces)
    come from PyTorch's caching allocator on the current stream, so that
    inside ``torch.cuda.graph`` they land in the graph's private pool, as
    PyTorch's own tensors do, instead of CuPy's pool (whose ``cudaMalloc`` is
    refused during a capture, and whose blocks a replay would overwrite after
    reuse).
    """

    def __init__(self, cupy: Any, device: int, ptr: int) -> None:
        self._device = cupy.cuda.Device(device)
        self._stream = _cupy_stream(cupy, device, ptr)
        self._alloc = cupy.cuda.using_allocator(_torch_allocator(cupy))

    def __enter__(self) -> None:
        self._device.__enter__()
        self._stream.__enter__()
        self._alloc.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._alloc.__exit__(*exc)
        self._stream.__exit__(*exc)
        self._device.__exit__(*exc)


@functools.lru_cache(maxsize=64)
def _cupy_stream(cupy: Any, device: int, ptr: int) -> Any:
    """CuPy's handle of PyTorch's stream ``ptr`` (made once: no per-pass warning)."""
    if ptr == 0:
        return cupy.cuda.Stream.null  # the legacy default stream (PyTorch's default)
    with warnings.catch_warnings():
        # deprecated in CuPy 14 for Stream.from_external, which older CuPy lacks
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(ptr, device)


@functools.cache
def _torch_allocator(cupy: Any) -> Any:
    """A CuPy allocator (``size -> MemoryPointer``) over PyTorch's caching allocator."""

    def malloc(size: int, device: int) -> int:
        stream = cupy.cuda.get_current_stream().ptr
        return torch.cuda.caching_allocator_alloc(size, device, stream)

    def free(ptr: int, device: int) -> None:
        if ptr:
            torch.cuda.caching_allocator_delete(ptr)

    return cupy.cuda.memory.PythonFunctionAllocator(malloc, free).malloc


# ----------------------------------------------------------------------------
# The passes on arrays. The autograd bridge below turns tensors into NumPy
# (CPU) or CuPy (CUDA) views by DLPack and calls these; the GPU launch-budget
# tests call them with the recording CuPy stand-in, so the counted path is
# the adapter's own.
# ----------------------------------------------------------------------------


def forward_arrays(
    x: Any,
    weight: Any,
    bias: Any,
    running_mean: Any,
    running_var: Any,
    num_batches_tracked: Any = None,
    *,
    data_format: str,
    training: bool,
    update: bool,
    momentum: float | None,
    eps: float,
    comm: Any = None,
    sync_state: SyncState | None = None,
    act: str | None = None,
) -> tuple[Any, F.ForwardContext]:
    """The adapter's forward on NumPy or CuPy arrays (PyTorch conventions).

    Parameters
    ----------
    x, weight, bias, running_mean, running_var : array or None
        Views of the module's tensors. With ``update`` the running statistics
        are updated in place: on the GPU by the normalize kernel itself (no
        other launch), on the CPU by a copy into them.
    num_batches_tracked : 0-d int64 array, optional
        PyTorch's count before this pass; read only for ``momentum=None``
        with ``update``. A CuPy array is never read by the host: on the fused
        path it is copied into the layer's device count (one small device
        copy), so a steady-state pass stays free of host synchronizations and
        can be captured in a CUDA graph. The caller increments it.
    data_format : str
        Format of ``x`` (``NC``, ``NCL``, ``NCHW``, ``NCDHW``, ``NHWC``, ``NDHWC``).
    training : bool
        Batch statistics of the global batch (synchronized) when True.
    update : bool
        Update the running statistics (PyTorch: unbiased variance).
    momentum : float or None
        Paddle convention (``running = running * m + batch * (1 - m)``); None
        is PyTorch's cumulative average over ``num_batches_tracked + 1`` batches.
    eps : float
        Added to the variance.
    comm, sync_state, act
        As for :func:`cupysyncbn.functional.batch_norm_forward`.

    Returns
    -------
    y : array
        Like ``x``.
    ctx : cupysyncbn.functional.ForwardContext
        For :func:`backward_arrays`.
    """
    nbt = 0
    if update and momentum is None and num_batches_tracked is not None:
        nbt = _batches_before(num_batches_tracked, sync_state, weight, bias,
                              running_mean, running_var)
    res = F.batch_norm_forward(
        x, weight, bias, running_mean, running_var,
        training=training, momentum=momentum, epsilon=eps, data_format=data_format,
        comm=comm, unbiased_running_var=update, num_batches_tracked=nbt,
        sync_state=sync_state,
        inplace_running_stats=True,  # GPU: the kernel writes the buffers, no copy
        act=act,
    )
    if update and res.updated:
        # The CPU path returns new arrays: store them, so the module's buffers
        # stay the same tensors. (On the GPU they are the buffers themselves.)
        for dst, src in ((running_mean, res.running_mean), (running_var, res.running_var)):
            if src is not dst:
                dst[...] = src
    return res.y, res.ctx


def backward_arrays(
    dy: Any, ctx: F.ForwardContext, need_param_grads: bool = True
) -> tuple[Any, Any, Any]:
    """The adapter's backward on NumPy or CuPy arrays: ``(dx, dweight, dbias)``.

    The parameter gradients are new arrays that autograd accumulates into
    ``.grad`` (not ``accumulate_into``): that keeps gradient hooks, DDP's
    among them, and ``torch.autograd.grad`` working.
    """
    return F.batch_norm_backward(dy, ctx, need_param_grads=need_param_grads)


def _batches_before(count: Any, state: SyncState | None, *vectors: Any) -> int:
    """The host count for ``momentum=None``; on the fused path set on the device instead.

    The fused kernels average over a device count of the layer (which, in
    Paddle's convention, skips empty global batches); PyTorch counts every
    training forward. Copying PyTorch's count into it before each pass gives
    PyTorch's average without a host read; the host value handed on then
    only has to equal the workspace's (so it does not overwrite the copy).
    """
    backend = get_backend(count, "num_batches_tracked")
    present = [v for v in vectors if v is not None]
    pdt = np.dtype(present[0].dtype) if present else np.dtype(np.float32)
    if state is None or not fused.applies(backend, pdt, *present):
        return int(count)  # a CPU tensor (free), or the unfused GPU path (which syncs)
    ws = workspace(state, backend, vectors[2].shape[0])
    ws.nbt[1:] = count
    ws.nbt_host = 0
    return 0


class _SyncBatchNormFunction(torch.autograd.Function):
    """Autograd bridge: tensors to arrays by DLPack, then :func:`forward_arrays`.

    The first-order backward is :func:`backward_arrays` (one all-reduce).
    Under ``create_graph=True`` (a gradient penalty, Hessian-vector products)
    it is :func:`_differentiable_backward` instead: the same formulas as
    torch operations over the saved input and the forward's synchronized
    statistics, so that autograd can differentiate them once more.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: Any, bias: Any, cfg: dict) -> torch.Tensor:
        y, fctx = _forward_tensors(x, weight, bias, cfg)
        ctx.fctx = fctx
        ctx.perm, ctx.inv = _layout(x)[1:]
        # x for autograd's check that it was not modified in place after the
        # forward (the backward reads it), and with the weight (and the bias:
        # the fused ReLU's mask) for the differentiable backward.
        ctx.save_for_backward(x, weight, bias)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        x, weight, bias = ctx.saved_tensors  # raises if x was modified after the forward
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: the gradients get a graph
            dx, dw, db = _differentiable_backward(ctx.fctx, x, weight, dy, bias)
            return (dx if need_x else None), (dw if need_w else None), (
                db if need_b else None), None
        if ctx.perm is not None:
            dy = dy.permute(*ctx.perm)
        # Always run: in training mode the backward is a collective every rank joins.
        with _on_torch_stream(dy):
            dxn, dwn, dbn = backward_arrays(to_native(dy, "dy"), ctx.fctx, need_w or need_b)
            if ctx.inv is not None:
                dxn = dxn.transpose(*ctx.inv)
            dx, dw, db = (from_native(a, dy) for a in (dxn, dwn, dbn))
        return (dx if need_x else None), (dw if need_w else None), (db if need_b else None), None


def _forward_tensors(x: torch.Tensor, weight: Any, bias: Any, cfg: dict) -> tuple:
    """:func:`forward_arrays` on tensors: ``(y, ForwardContext)``; counts the batch."""
    fmt, perm, inv = _layout(x)
    xv = x if perm is None else x.permute(*perm)
    count = cfg["num_batches_tracked"]
    with _on_torch_stream(x):
        y, fctx = forward_arrays(
            to_native(xv, "input"), to_native(weight, "weight"), to_native(bias, "bias"),
            to_native(cfg["running_mean"], "running_mean"),
            to_native(cfg["running_var"], "running_var"),
            to_native(count, "num_batches_tracked") if cfg["nbt_read"] else None,
            data_format=fmt, training=cfg["training"], update=cfg["update"],
            momentum=cfg["momentum"], eps=cfg["eps"], comm=cfg["comm"],
            sync_state=cfg["sync_state"], act=cfg.get("act"),
        )
        # The channels-last result is exported already transposed back to
        # (N, C, *): a tensor of its own with channels-last strides, not a
        # view of an NHWC tensor (autograd forbids in-place ops such as
        # ReLU(inplace=True) on views created inside a Function). No copy.
        y = from_native(y if inv is None else y.transpose(*inv), x)
    if count is not None:
        # PyTorch counts every training forward, an empty global batch too
        # (the statistics are then unchanged); every rank runs this forward.
        count.add_(1)
    return y, fctx


def _allreduce_tensor(t: torch.Tensor, comm: Any) -> torch.Tensor:
    """Sum ``t`` over ``comm``'s group (float64 on the wire); a new tensor of ``t``'s dtype."""
    buf = t.detach().to(torch.float64).contiguous().reshape(-1)
    with _on_torch_stream(buf):
        native = to_native(buf, "gradient sums")
        if comm.supports(native):
            out = from_native(comm.allreduce_sum(native), buf)
        else:  # e.g. CUDA tensors over MPI without CUDA-aware MPI: O(C) through the host
            out = torch.from_numpy(comm.allreduce_host(buf.cpu().numpy())).to(buf.device)
        return out.reshape(t.shape).to(t.dtype)


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over the group: the backward is the same all-reduce.

    Every rank's loss depends on the sum of every rank's local terms, and the
    gradients of a data-parallel job are summed over the ranks, so the
    gradient of a local term is the all-reduced sum of the output gradients.
    """

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, comm: Any) -> torch.Tensor:
        ctx.comm = comm
        return _allreduce_tensor(t, comm) if comm.synchronizes else t.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        return _AllReduceSum.apply(g, ctx.comm), None


def _channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A (C,) vector shaped to broadcast over an (N, C, *) tensor."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


class _BatchStats(torch.autograd.Function):
    """The forward's synchronized ``(mean, invstd)`` as differentiable functions of ``x``.

    The values are the forward's own (no communication); the backward is the
    derivative of the global-batch mean and ``1/sqrt(var + eps)`` with respect
    to this rank's ``x``, its per-channel gradients all-reduced first (one
    collective). It is written with differentiable operations, so any order
    of derivative works.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                count: float, comm: Any) -> tuple:
        ctx.save_for_backward(x, mean, invstd)
        ctx.count, ctx.comm = count, comm
        return mean.clone(), invstd.clone()

    @staticmethod
    def backward(ctx: Any, dmean: torch.Tensor, dinvstd: torch.Tensor) -> tuple:
        x, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            mean, invstd = _BatchStats.apply(x, mean, invstd, ctx.count, ctx.comm)
        c = mean.shape[0]
        g = _AllReduceSum.apply(torch.cat([dmean, dinvstd]), ctx.comm)
        m = max(ctx.count, 1.0)
        dvar = g[c:] * (-0.5) * invstd**3  # d invstd / d var
        nd = x.dim()
        dx = _channel_view(g[:c] / m, nd) + _channel_view(2.0 * dvar / m, nd) * (
            x - _channel_view(mean, nd))
        return dx, None, None, None, None


def _differentiable_backward(
    fctx: F.ForwardContext, x: torch.Tensor, weight: torch.Tensor | None, dy: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple:
    """``(dx, dweight, dbias)`` as torch operations, for ``create_graph=True``.

    Training mode: ``dx = w * invstd * (dy - S1/m - xhat * S2/m)`` with ``S1 =
    sum(dy)``, ``S2 = sum(dy * xhat)`` all-reduced by :class:`_AllReduceSum`
    and ``mean``/``invstd`` from :class:`_BatchStats`, so a second backward
    differentiates through the global-batch statistics too, with their own
    all-reduces. Eval mode: the affine map with running statistics. After
    ``act="relu"`` ``dy`` is masked first (a constant mask: the ReLU's second
    derivative is 0 almost everywhere).
    """
    cdt = torch.float64 if np.dtype(fctx.mean.dtype) == np.float64 else torch.float32
    mean = from_native(fctx.mean, x).to(device=x.device, dtype=cdt)
    invstd = from_native(fctx.invstd, x).to(device=x.device, dtype=cdt)
    return _backward_ops(x, weight, dy, mean, invstd, float(fctx.count), fctx.batch_stats,
                         fctx.comm, bias, fctx.act is not None)


def _backward_ops(
    x: torch.Tensor, weight: torch.Tensor | None, dy: torch.Tensor, mean: torch.Tensor,
    invstd: torch.Tensor, count: float, batch_stats: bool, comm: Any,
    bias: torch.Tensor | None = None, relu: bool = False,
) -> tuple:
    """The backward's formulas as torch operations (see :func:`_differentiable_backward`).

    ``relu``: ``dy`` is 0 where the forward's ``(x - mean) * scale + bias <= 0``
    (recomputed from the forward's statistics, not differentiated).
    """
    cdt = mean.dtype
    xc, dyc = x.to(cdt), dy.to(cdt)
    if relu:
        nd = x.dim()
        with torch.no_grad():
            scale = invstd if weight is None else invstd * weight.to(cdt)
            pre = (xc - _channel_view(mean, nd)) * _channel_view(scale, nd)
            if bias is not None:
                pre = pre + _channel_view(bias.to(cdt), nd)
            cut = pre <= 0
        dyc = dyc.masked_fill(cut, 0.0)
    if batch_stats:
        mean, invstd = _BatchStats.apply(xc, mean, invstd, count, comm)
    nd = x.dim()
    dims = [d for d in range(nd) if d != 1]
    xhat = (xc - _channel_view(mean, nd)) * _channel_view(invstd, nd)
    db = dyc.sum(dims)
    dw = (dyc * xhat).sum(dims)
    w = invstd if weight is None else weight.to(cdt) * invstd
    if batch_stats:
        c = mean.shape[0]
        s = _AllReduceSum.apply(torch.cat([db, dw]), comm)
        m = max(count, 1.0)
        dx = _channel_view(w, nd) * (
            dyc - _channel_view(s[:c] / m, nd) - xhat * _channel_view(s[c:] / m, nd))
    else:
        dx = dyc * _channel_view(w, nd)
    pdt = weight.dtype if weight is not None else cdt
    return dx.to(x.dtype), dw.to(pdt), db.to(pdt)


@torch.compiler.disable(
    reason="cupysyncbn's functional batch_norm runs eagerly (DLPack, a collective): a graph"
    " break around it; the SyncBatchNorm module compiles with fullgraph=True",
)
def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    comm: Any = None,
    num_batches_tracked: torch.Tensor | None = None,
    sync_state: SyncState | None = None,
    act: str | None = None,
) -> torch.Tensor:
    """Synchronized ``torch.nn.functional.batch_norm``.

    Same arguments and conventions as ``torch.nn.functional.batch_norm``;
    with ``training=True`` (or no running statistics) the statistics are
    those of the global batch over ``comm``, and the running statistics are
    updated in place (unbiased variance).

    Parameters
    ----------
    input : torch.Tensor
        ``(N, C, *)``, 2 to 5 dimensions, CPU or CUDA; channels-last memory
        layouts are used as they are.
    running_mean, running_var : torch.Tensor or None
        Running statistics (C,): used in eval mode, updated in place in
        training mode; None for batch statistics always.
    weight, bias : torch.Tensor or None
        Affine parameters (C,); None means 1 / 0.
    training : bool
        Batch statistics of the global batch (and update) when True.
    momentum : float or None
        PyTorch convention (``running = (1-t) running + t batch``); None is the
        cumulative average over ``num_batches_tracked`` batches.
    eps : float
        Added to the variance.
    comm : Communicator, mpi4py.MPI.Comm or None, keyword-only
        Group to synchronize over (None: :func:`cupysyncbn.get_default_comm`).
    num_batches_tracked : torch.Tensor, optional
        Counter read for ``momentum=None`` and incremented in place on update.
    sync_state : cupysyncbn.functional.SyncState, optional
        Keep one per layer: one all-reduce per pass.
    act : {None, 'relu'}, keyword-only
        ``'relu'``: ``relu(batch_norm(...))`` in the same pass (the ReLU
        fused into the normalize, its mask into the backward).

    Returns
    -------
    torch.Tensor
    """
    check_act(act)
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor; got {type(input).__name__}")
    if input.dim() not in _FORMATS:
        raise ValueError(
            f"input must have 2 to 5 dimensions (N, C, *); got shape {tuple(input.shape)}"
        )
    _check_traceable(input, weight, bias)
    if any(t is not None and t.dtype == torch.bfloat16
           for t in (input, weight, bias, running_mean, running_var)):
        return _batch_norm_bf16(
            input, running_mean, running_var, weight, bias, training, momentum, eps,
            comm=comm, num_batches_tracked=num_batches_tracked, sync_state=sync_state, act=act,
        )
    batch_stats = training or running_mean is None
    update = bool(training and running_mean is not None)
    cfg = {
        "running_mean": running_mean,
        "running_var": running_var,
        "training": batch_stats,
        "update": update,
        "momentum": momentum_torch_to_paddle(momentum),
        "eps": float(eps),
        "comm": comm,
        # read for momentum=None's average (on the GPU by the device only)
        "nbt_read": update and momentum is None and num_batches_tracked is not None,
        "num_batches_tracked": num_batches_tracked if update else None,
        "sync_state": sync_state,
        "act": act,
    }
    return _SyncBatchNormFunction.apply(input, weight, bias, cfg)


def _batch_norm_bf16(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    **kw: Any,
) -> torch.Tensor:
    """:func:`batch_norm` with bfloat16 tensors (input, parameters or statistics).

    Neither NumPy nor CuPy has bfloat16: the math runs on float32 copies
    (float32 statistics, as for float16), autograd follows the casts (so
    gradients come back in each tensor's own dtype), and updated running
    statistics are stored back into the bfloat16 buffers, rounded.
    """

    def f32(t: torch.Tensor | None) -> torch.Tensor | None:
        return t.float() if t is not None and t.dtype == torch.bfloat16 else t

    rm, rv = f32(running_mean), f32(running_var)
    y = batch_norm(f32(input), rm, rv, f32(weight), f32(bias), training, momentum, eps, **kw)
    if training:
        with torch.no_grad():
            for dst, src in ((running_mean, rm), (running_var, rv)):
                if dst is not None and src is not None and src is not dst:
                    dst.copy_(src)
    return y.to(input.dtype)


def _check_traceable(*tensors: torch.Tensor | None) -> None:
    """Refuse, naming cupysyncbn, tensors our DLPack bridge cannot compute on.

    ``torch.func`` transforms (vmap, grad, jacrev...) hand functorch wrappers,
    and tracers (``torch.export``, ``make_fx``, fake-tensor modes) tensors
    without data: the synchronized passes need real memory and a collective.
    """
    for t in tensors:
        if t is None:
            continue
        if torch._C._functorch.is_functorch_wrapped_tensor(t):
            raise NotImplementedError(
                "cupysyncbn.interop.torch.SyncBatchNorm does not support torch.func"
                " transforms (vmap, grad, jacrev, functional_call under them...): use"
                " torch.autograd.grad or torch.autograd.functional (double backward is"
                " supported), or torch.nn.BatchNorm for per-sample work"
            )
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type == "meta":
            raise NotImplementedError(
                f"cupysyncbn.interop.torch.SyncBatchNorm computes on real CPU or CUDA"
                f" tensors; got a {type(t).__name__} on {t.device}. The module traces under"
                f" torch.compile and torch.export (as the operator"
                f" cupysyncbn::sync_batch_norm); the functional batch_norm, make_fx, fake or"
                f" meta tensors outside them are not supported (docs/torch.md)"
            )


# ----------------------------------------------------------------------------
# torch.compile: the layer's passes as custom operators. Dynamo and AOTAutograd
# trace them through their fake implementations (shapes only), so a compiled
# model keeps the layer in its graph (fullgraph=True works); at run time the
# forward operator runs forward_arrays (one collective) and the backward
# operator the backward's formulas with one all-reduce. A layer is named by
# an integer key, since operators take tensors and numbers only.
# ----------------------------------------------------------------------------

_OP_LAYERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_OP_KEYS = itertools.count(1)


def _op_register(layer: SyncBatchNorm) -> int:
    key = next(_OP_KEYS)
    _OP_LAYERS[key] = layer
    return key


def _op_layer(key: int) -> SyncBatchNorm:
    layer = _OP_LAYERS.get(key)
    if layer is None:
        raise RuntimeError(f"cupysyncbn: the SyncBatchNorm of compiled key {key} no longer exists")
    return layer


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor | None,
                   running_mean: torch.Tensor | None) -> torch.dtype:
    like = weight if weight is not None else running_mean
    f64 = x.dtype == torch.float64 or (like is not None and like.dtype == torch.float64)
    return torch.float64 if f64 else torch.float32


@torch.library.custom_op(
    "cupysyncbn::sync_batch_norm", mutates_args=(),
    schema="(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean,"
    " Tensor? running_var, Tensor? num_batches_tracked, bool batch_stats, bool update,"
    " float? momentum, float eps, int key, bool relu=False)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _op_forward(x, weight, bias, running_mean, running_var, num_batches_tracked,  # type: ignore[no-untyped-def]
                batch_stats, update, momentum, eps, key, relu=False):
    # Functional (autograd formulas need it): the updated running statistics
    # are returned, and the caller copies them into the buffers.
    layer = _op_layer(key)
    rm = None if running_mean is None else running_mean.clone()
    rv = None if running_var is None else running_var.clone()
    cfg = {
        "running_mean": rm, "running_var": rv, "training": batch_stats, "update": update,
        "momentum": momentum_torch_to_paddle(momentum), "eps": eps, "comm": layer.comm,
        "nbt_read": update and momentum is None and num_batches_tracked is not None,
        "num_batches_tracked": None if num_batches_tracked is None or not update
        else num_batches_tracked.clone(),
        "sync_state": layer._sync_state,
        "act": "relu" if relu else None,
    }
    y, fctx = _forward_tensors(x, weight, bias, cfg)
    cdt = _compute_dtype(x, weight, running_mean)
    mean = from_native(fctx.mean, x).to(device=x.device, dtype=cdt, copy=True)
    invstd = from_native(fctx.invstd, x).to(device=x.device, dtype=cdt, copy=True)
    count = torch.tensor(float(fctx.count), dtype=torch.float64)
    none = x.new_empty((0,), dtype=cdt)
    return (_strided_like(x, y), mean, invstd, count, none if rm is None else rm,
            none if rv is None else rv)


@_op_forward.register_fake
def _(x, weight, bias, running_mean, running_var, num_batches_tracked,  # type: ignore[no-untyped-def]
      batch_stats, update, momentum, eps, key, relu=False):
    cdt = _compute_dtype(x, weight, running_mean)
    c = x.shape[1]
    none = x.new_empty((0,), dtype=cdt)
    return (torch.empty_like(x), x.new_empty((c,), dtype=cdt), x.new_empty((c,), dtype=cdt),
            x.new_empty((), dtype=torch.float64, device="cpu"),
            none if running_mean is None else torch.empty_like(running_mean),
            none if running_var is None else torch.empty_like(running_var))


@torch.library.custom_op(
    "cupysyncbn::sync_batch_norm_backward", mutates_args=(),
    schema="(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor invstd, Tensor count,"
    " bool batch_stats, int key, Tensor? bias=None, bool relu=False)"
    " -> (Tensor, Tensor, Tensor)",
)
def _op_backward(dy, x, weight, mean, invstd, count, batch_stats, key, bias=None,  # type: ignore[no-untyped-def]
                 relu=False):
    comm = as_communicator(_op_layer(key).comm) if batch_stats else None
    with torch.no_grad():
        dx, dw, db = _backward_ops(x, weight, dy, mean, invstd, float(count), batch_stats, comm,
                                   bias, relu)
    return _strided_like(x, dx), dw, db


@_op_backward.register_fake
def _(dy, x, weight, mean, invstd, count, batch_stats, key, bias=None,  # type: ignore[no-untyped-def]
      relu=False):
    pdt = weight.dtype if weight is not None else mean.dtype
    c = x.shape[1]
    return torch.empty_like(x), x.new_empty((c,), dtype=pdt), x.new_empty((c,), dtype=pdt)


def _strided_like(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides of ``torch.empty_like(x)``, what the fake implementations promise.

    The compiler plans its kernels with the fake strides; the passes return
    contiguous or channels-last results, so other dense layouts (a
    permuted input) get a copy instead of silently wrong indexing.
    """
    out = torch.empty_like(x)
    if out.stride() == t.stride():
        return t
    return out.copy_(t)


def _op_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, bias, *_, batch_stats, _update, _momentum, _eps, key, relu = inputs
    _y, mean, invstd, count, _rm, _rv = output
    ctx.save_for_backward(x, weight, mean, invstd, count, bias if relu else None)
    ctx.batch_stats, ctx.key, ctx.has_bias, ctx.relu = batch_stats, key, bias is not None, relu


def _op_autograd(ctx: Any, dy: torch.Tensor, *_: Any) -> tuple:
    x, weight, mean, invstd, count, bias = ctx.saved_tensors
    dx, dw, db = _op_backward(dy, x, weight, mean, invstd, count, ctx.batch_stats, ctx.key,
                              bias, ctx.relu)
    return (dx, dw if weight is not None else None, db if ctx.has_bias else None,
            None, None, None, None, None, None, None, None, None)


_op_forward.register_autograd(_op_autograd, setup_context=_op_setup)


class SyncBatchNorm(_BatchNorm):
    """``torch.nn.SyncBatchNorm`` computed by cupysyncbn, on CPU and CUDA tensors.

    Parameters
    ----------
    num_features : int
        Channels C of an ``(N, C, *)`` input.
    eps : float, default 1e-5
    momentum : float or None, default 0.1
        PyTorch convention: ``running = (1 - momentum) * running + momentum * batch``;
        None is the cumulative moving average.
    affine : bool, default True
        Learnable ``weight`` and ``bias`` Parameters.
    track_running_stats : bool, default True
        Keep ``running_mean``/``running_var`` (unbiased)/``num_batches_tracked``
        buffers and use them in eval mode. Without them, batch statistics of
        the global batch are used in eval mode too.
    comm : Communicator, mpi4py.MPI.Comm, torch.distributed.ProcessGroup or None
        Group to synchronize over (the position of ``torch.nn.SyncBatchNorm``'s
        ``process_group``); None is cupysyncbn's default communicator
        (:func:`cupysyncbn.init`: the initialized ``torch.distributed`` group
        under ``torchrun``, all ranks of ``mpiexec``). Use
        ``cupysyncbn.init('none')`` or a one-process group for local BN. For
        CPU tensors on a machine where the default is NCCL, pass the mpi4py
        communicator itself (``comm=MPI.COMM_WORLD``): MPI reduces host buffers.
    device, dtype : optional
        As for ``torch.nn.BatchNorm2d``.
    bias : bool, default True, keyword-only
        With ``affine=True``, False keeps no ``bias`` (it is None, as in
        ``torch.nn.BatchNorm2d(bias=False)``).
    process_group : torch.distributed.ProcessGroup, optional, keyword-only
        ``torch.nn.SyncBatchNorm``'s name for ``comm`` (give one of them).
    act : {None, 'relu'}, keyword-only
        ``'relu'``: output ``relu(bn(x))``, the ReLU fused into the normalize
        pass and its mask into the backward's passes (no pass of its own).
    fuse_relu : bool, keyword-only, default False
        Apex's spelling of ``act='relu'`` (``apex.parallel.SyncBatchNorm``).
    reproducible : bool, optional, keyword-only
        Bitwise-reproducible outputs, input gradients and running statistics
        for every world size and split (docs/reproducibility.md). None:
        ``CUPYSYNCBN_REPRODUCIBLE`` (default False). The parameter gradients
        stay local; DDP's average of them is not covered. Not with ``act``.

    Notes
    -----
    Parameter gradients are those of the local batch, as in PyTorch: a
    data-parallel wrapper (DDP, or an all-reduce of the gradients) averages
    them. In training mode every rank must run the forward and the backward
    (each is one collective); ranks may hold different batch sizes,
    including zero.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        comm: Any = None,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        process_group: Any = None,
        act: str | None = None,
        fuse_relu: bool = False,
        reproducible: bool | None = None,
    ) -> None:
        act = check_act(act)
        if fuse_relu not in (True, False):
            raise TypeError(f"fuse_relu must be a bool; got {fuse_relu!r}")
        if fuse_relu:
            if act not in (None, "relu"):  # pragma: no cover - check_act allows only these
                raise ValueError(f"fuse_relu=True contradicts act={act!r}")
            act = "relu"
        repro = check_reproducible(reproducible)
        if repro and act is not None:
            raise ValueError(REPRO_ACT)
        if process_group is not None:
            if comm is not None:
                raise TypeError("give comm or process_group, not both")
            comm = process_group
        extra = {}
        if not bias:
            if "bias" not in inspect.signature(_BatchNorm.__init__).parameters:
                raise TypeError(
                    f"bias=False needs a PyTorch whose BatchNorm has it (installed:"
                    f" {torch.__version__})"
                )
            extra["bias"] = False
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device,
            dtype=dtype, **extra,
        )
        self.comm = comm
        self.act = act
        # identity on every rank: order of construction (see cupysyncbn._sync.protocol)
        self._sync_state = SyncState.for_layer(comm)
        self._sync_state.reproducible = repro  # the functional passes read it
        self._op_key = _op_register(self)  # names this layer to the compiled operators

    @property
    def reproducible(self) -> bool:
        """Bitwise-reproducible mode (docs/reproducibility.md); fixed at construction."""
        return bool(self._sync_state.reproducible)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", act={self.act!r}" if self.act else "") + (
            ", reproducible=True" if self.reproducible else "")

    def __setstate__(self, state: dict) -> None:
        # A copy (pickle, deepcopy) is a new layer: its SyncState copied or
        # unpickled itself into a fresh state with the next construction
        # ordinal (cupysyncbn._sync.state), so copies made in the same order
        # on every rank keep telling layers apart.
        state.setdefault("act", None)  # pickled before ``act`` existed
        super().__setstate__(state)
        self._op_key = _op_register(self)  # a copy is another layer

    @property
    def comm(self) -> Any:
        """The group this layer synchronizes over (None: cupysyncbn's default)."""
        return self._comm_ref.comm

    @comm.setter
    def comm(self, comm: Any) -> None:
        self._comm_ref = SharedComm(comm)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in _FORMATS:
            raise ValueError(f"expected 2D to 5D input (got {input.dim()}D input)")

    def __prepare_scriptable__(self) -> SyncBatchNorm:
        # torch.jit.script calls this on every submodule before compiling.
        raise NotImplementedError(
            "cupysyncbn.interop.torch.SyncBatchNorm cannot be compiled by torch.jit.script"
            " (its synchronized pass runs outside TorchScript): run the eager module,"
            " torch.compile or torch.export; torch.fx.symbolic_trace keeps it as a leaf"
            " module"
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalize ``input`` with global-batch statistics (training) or running ones (eval).

        ``torch.fx.symbolic_trace`` records the layer as a leaf module
        (``call_module``).
        """
        if isinstance(input, torch.fx.Proxy):
            tracer = input.tracer
            return tracer.create_proxy(  # type: ignore[return-value]
                "call_module", tracer.path_of_module(self), (input,), {})
        if torch.jit.is_tracing():
            raise NotImplementedError(
                "cupysyncbn.interop.torch.SyncBatchNorm cannot be recorded by torch.jit.trace"
                " (its synchronized pass runs outside PyTorch's operators): run the eager"
                " module, torch.compile or torch.export"
            )
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        try:
            if not isinstance(input, torch.Tensor):
                raise TypeError(f"input must be a torch.Tensor; got {type(input).__name__}")
            self._check_input_dim(input)
        except (TypeError, ValueError) as e:
            if not bn_training:
                raise
            # The other ranks are already in the collective: join it, then raise
            # (they raise RemoteInputError instead of waiting for the watchdog).
            p = self.weight if self.weight is not None else self.running_mean
            F.fail_collectively(
                e, "type" if isinstance(e, TypeError) else "ndim", comm=self.comm,
                sync_state=self._sync_state, num_features=self.num_features,
                backend=None if p is None else ("cupy" if p.is_cuda else "numpy"),
            )
        # As in torch: running stats are passed when they are updated or used.
        use_running = not self.training or self.track_running_stats
        track = self.training and self.track_running_stats
        if torch.compiler.is_compiling() and not any(
            t is not None and t.dtype == torch.bfloat16
            for t in (input, self.weight, self.running_mean)
        ):
            return self._compiled_forward(input, bn_training, use_running, track)
        comm = self.comm
        if bn_training and not self.training:
            # eval with batch statistics (track_running_stats=False): agreed
            # with the peers, or local inside cupysyncbn.local_eval()
            comm = self._sync_state.eval_batch_pass(comm)
        return batch_norm(
            input,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            self.weight,
            self.bias,
            bn_training,
            self.momentum,
            self.eps,
            comm=comm,
            num_batches_tracked=self.num_batches_tracked if track else None,
            sync_state=self._sync_state,
            act=self.act,
        )

    def _compiled_forward(
        self, input: torch.Tensor, bn_training: bool, use_running: bool, track: bool
    ) -> torch.Tensor:
        """The forward as Dynamo traces it: one custom operator, then the buffer updates."""
        rm = self.running_mean if use_running else None
        rv = self.running_var if use_running else None
        update = bool(bn_training and rm is not None)
        y, _, _, _, new_rm, new_rv = _op_forward(
            input, self.weight, self.bias, rm, rv,
            self.num_batches_tracked if track else None, bn_training or rm is None, update,
            self.momentum, float(self.eps), self._op_key, self.act == "relu",
        )
        if update:
            with torch.no_grad():
                self.running_mean.copy_(new_rm)  # type: ignore[union-attr]
                self.running_var.copy_(new_rv)  # type: ignore[union-attr]
                if track:
                    self.num_batches_tracked.add_(1)  # type: ignore[union-attr,operator]
        return y

    @classmethod
    def convert_sync_batchnorm(
        cls, module: torch.nn.Module, comm: Any = None, *, process_group: Any = None
    ) -> torch.nn.Module:
        """See :func:`convert_sync_batchnorm`."""
        return convert_sync_batchnorm(module, comm, process_group=process_group)


def convert_sync_batchnorm(
    module: torch.nn.Module, comm: Any = None, *, process_group: Any = None
) -> torch.nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` (and ``torch.nn.SyncBatchNorm``) by ours.

    Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: the new layers
    keep ``eps``, ``momentum``, ``affine``, ``bias=False`` (no bias),
    ``track_running_stats`` and the training flag, and take over the
    ``weight``/``bias`` Parameters and the running-statistics buffers (so an
    optimizer built before the conversion still updates them, and device and
    dtype are unchanged).

    Parameters
    ----------
    module : torch.nn.Module
        A model, or a single batch-norm layer.
    comm : Communicator, mpi4py.MPI.Comm, torch.distributed.ProcessGroup or None
        Group for the new layers.
    process_group : torch.distributed.ProcessGroup, optional, keyword-only
        PyTorch's name for ``comm`` (give one of them).

    Returns
    -------
    torch.nn.Module
        ``module`` with its batch norms replaced, or the new layer if
        ``module`` itself is one.
    """
    if process_group is not None:
        if comm is not None:
            raise TypeError("give comm or process_group, not both")
        comm = process_group
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        like = next((t for t in (module.weight, module.running_mean) if t is not None), None)
        out = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats, comm=comm,
            bias=not module.affine or module.bias is not None,
            device=None if like is None else like.device,
            dtype=None if like is None else like.dtype,
        )
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, comm))
    return out


def _as_tensor(v: Any) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    if hasattr(v, "__dlpack__"):
        return torch.from_dlpack(v)
    return torch.as_tensor(v)


def from_paddle_state_dict(state_dict: dict, **conversion: Any) -> dict:
    """A PyTorch state dict (tensors) from a Paddle/cupysyncbn one.

    Parameters
    ----------
    state_dict : dict of str to array
        E.g. ``cupysyncbn_model.state_dict()`` or ``cupysyncbn.load(path)``.
    **conversion
        ``count``, ``paddle_momentum``, ``steps``, ``num_batches_tracked``:
        see :func:`cupysyncbn.interop.state_dict.paddle_to_torch`.

    Returns
    -------
    dict of str to torch.Tensor
        For ``module.load_state_dict``.
    """
    return {k: _as_tensor(v) for k, v in paddle_to_torch(state_dict, **conversion).items()}


def to_paddle_state_dict(module_or_state: Any, **conversion: Any) -> dict:
    """A Paddle/cupysyncbn state dict (NumPy or CuPy copies) from a PyTorch module or state dict.

    Parameters
    ----------
    module_or_state : torch.nn.Module or dict
        A PyTorch model or its ``state_dict()``.
    **conversion
        ``count``, ``paddle_momentum``, ``steps``, ``keep_num_batches_tracked``:
        see :func:`cupysyncbn.interop.state_dict.torch_to_paddle`.

    Returns
    -------
    dict of str to array
        For ``layer.set_state_dict`` or :func:`cupysyncbn.save`.
    """
    sd = module_or_state
    if isinstance(sd, torch.nn.Module):
        sd = sd.state_dict()
    conv = torch_to_paddle(sd, **conversion)
    return {k: to_native(_as_tensor(v).detach(), k).copy() for k, v in conv.items()}
