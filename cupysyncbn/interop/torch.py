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
import warnings
from typing import Any

import numpy as np
import torch
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from .. import functional as F
from .._sync import fused
from .._sync.state import SyncState, workspace
from ..arrays.dlpack import from_native, to_native
from ..backends import get_backend
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
    comm, sync_state
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
    """Autograd bridge: tensors to arrays by DLPack, then :func:`forward_arrays`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: Any, bias: Any, cfg: dict) -> torch.Tensor:
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
                sync_state=cfg["sync_state"],
            )
            y = from_native(y, x)
        if count is not None:
            # PyTorch counts every training forward, an empty global batch too
            # (the statistics are then unchanged); every rank runs this forward.
            count.add_(1)
        ctx.fctx = fctx
        ctx.perm, ctx.inv = perm, inv
        ctx.save_for_backward(x)  # only for autograd's in-place modification check
        return y if inv is None else y.permute(*inv)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        _ = ctx.saved_tensors  # raises if x was modified in place after the forward
        if ctx.perm is not None:
            dy = dy.permute(*ctx.perm)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        # Always run: in training mode the backward is a collective every rank joins.
        with _on_torch_stream(dy):
            dx, dw, db = (
                from_native(a, dy)
                for a in backward_arrays(to_native(dy, "dy"), ctx.fctx, need_w or need_b)
            )
        if ctx.inv is not None:
            dx = dx.permute(*ctx.inv)
        return (dx if need_x else None), (dw if need_w else None), (db if need_b else None), None


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

    Returns
    -------
    torch.Tensor
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor; got {type(input).__name__}")
    if input.dim() not in _FORMATS:
        raise ValueError(
            f"input must have 2 to 5 dimensions (N, C, *); got shape {tuple(input.shape)}"
        )
    if input.dtype == torch.bfloat16:
        # Neither NumPy nor CuPy has bfloat16: compute from a float32 copy
        # (float32 statistics, as for float16) and cast back; autograd follows.
        y = batch_norm(
            input.float(), running_mean, running_var, weight, bias, training, momentum, eps,
            comm=comm, num_batches_tracked=num_batches_tracked, sync_state=sync_state,
        )
        return y.to(torch.bfloat16)
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
    }
    return _SyncBatchNormFunction.apply(input, weight, bias, cfg)


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
    ) -> None:
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
        # identity on every rank: order of construction (see cupysyncbn._sync.protocol)
        self._sync_state = SyncState.for_layer(comm)

    def __getstate__(self) -> dict:
        # A copy (pickle, deepcopy) is a new layer: it agrees on its own layer
        # id and shift with its group at its first pass.
        state = dict(super().__getstate__())
        state["_sync_state"] = SyncState()
        return state

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

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalize ``input`` with global-batch statistics (training) or running ones (eval)."""
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
        return batch_norm(
            input,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            self.weight,
            self.bias,
            bn_training,
            self.momentum,
            self.eps,
            comm=self.comm,
            num_batches_tracked=self.num_batches_tracked if track else None,
            sync_state=self._sync_state,
        )

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
