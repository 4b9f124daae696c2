"""PaddlePaddle adapter: a ``paddle.nn.SyncBatchNorm`` computed by cupysyncbn.

``SyncBatchNorm`` is a subclass of ``paddle.nn.SyncBatchNorm`` with Paddle's
names and behaviour (``weight``/``bias`` created through ``ParamAttr``, so
``weight_attr=False`` fixes the weight at 1 as in Paddle; ``_mean``/
``_variance`` updated in place; Paddle's ``state_dict()`` keys; ``momentum``
in Paddle's convention; any 2-5-D input). Unlike Paddle's it runs on CPU
tensors too (Paddle 3.3.1's CPU wheel has no ``sync_batch_norm`` kernel), and
its statistics are those of the global batch: exact with uneven and empty
per-rank batches (Paddle weights every rank equally) and merged from
per-rank centered sums (Paddle uses ``E[x^2] - E[x]^2`` in float32).

Autograd goes through a ``paddle.autograd.PyLayer`` whose forward and
backward are :func:`cupysyncbn.functional.batch_norm_forward` /
``batch_norm_backward``; tensors cross over through DLPack without copies
(CPU tensors become NumPy arrays, GPU tensors CuPy arrays, computed on
Paddle's current stream of the tensor's device).

``paddle.grad`` works for any subset of the input and parameters (first
order; ``create_graph=True`` raises); ``paddle.jit.to_static`` runs the layer
eagerly in SOT mode and refuses ``full_graph=True`` (docs/paddle.md).

Statistics are synchronized over a cupysyncbn communicator: MPI under
``mpiexec`` (CPU tensors; NCCL or MPI for GPU tensors), or
``paddle.distributed`` collectives under ``python -m paddle.distributed.launch``
(``comm=`` a Paddle group, or the global group found automatically once
``paddle.distributed.init_parallel_env()`` has run).

This module (and :mod:`cupysyncbn.comm.paddle`) are the only ones that import
``paddle``; ``import cupysyncbn`` does not.

Examples
--------
>>> import paddle
>>> from cupysyncbn.interop.paddle import convert_sync_batchnorm
>>> model = convert_sync_batchnorm(paddle.nn.Sequential(paddle.nn.BatchNorm2D(3)))
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import paddle
from paddle.autograd import PyLayer
from paddle.nn.layer.norm import _BatchNormBase

from .. import functional as F
from .._sync.checks import REPRO_ACT, check_act, check_reproducible
from .._sync.state import SyncState
from ..arrays.dlpack import to_native
from ..comm.base import LOCAL
from ..comm.select import as_communicator
from .shared_comm import SharedComm

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "batch_norm"]

_FORMATS = ("NC", "NCL", "NCHW", "NCDHW", "NLC", "NHWC", "NDHWC")
_CHANNEL_LAST = ("NLC", "NHWC", "NDHWC")
# Like Paddle's SyncBatchNorm, any format name accepts any 2-5-D input: only
# the channel placement (axis 1 or last) is taken from it.
_BY_NDIM = {
    False: {2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"},
    True: {2: "NC", 3: "NLC", 4: "NHWC", 5: "NDHWC"},
}


def _native(t: Any, name: str) -> Any:
    """Zero-copy NumPy/CuPy view of a Paddle tensor (None stays None)."""
    if t is None:
        return None
    return to_native(t.detach(), name)


def _export(a: Any) -> paddle.Tensor:
    """A Paddle tensor sharing ``a``'s memory (NumPy -> CPU, CuPy -> GPU)."""
    if not a.flags.c_contiguous:
        a = a.copy()  # pragma: no cover - the math returns contiguous arrays
    return paddle.from_dlpack(a)


@contextlib.contextmanager
def _paddle_stream(t: Any) -> Any:
    """Run CuPy work on Paddle's current stream of ``t``'s GPU (no-op on CPU)."""
    if not t.place.is_gpu_place():
        yield
        return
    import cupy

    dev = t.place.gpu_device_id()
    with warnings.catch_warnings():
        # paddle.device.cuda and cupy.cuda.ExternalStream are marked deprecated
        # (in Paddle 3 / CuPy 14) but are the forms both old and new versions have.
        warnings.simplefilter("ignore")
        ptr = int(paddle.device.cuda.current_stream(dev).cuda_stream)
        stream = cupy.cuda.ExternalStream(ptr, dev)
    with cupy.cuda.Device(dev), stream:
        yield


class _SyncBatchNormFunction(PyLayer):
    """Autograd bridge: forward/backward are cupysyncbn's functional passes.

    The tensors that need gradients (``stop_gradient=False`` among x, weight,
    bias) enter as ONE list argument, the others through ``cfg``. Paddle's
    ``paddle.grad`` prunes the graph per call (the gradient of x only, of some
    parameters only) and then refuses a gradient returned for a pruned input
    slot, which a PyLayer cannot see; inside one list slot it routes each
    gradient to its own tensor and drops the unrequested ones.
    """

    @staticmethod
    def forward(ctx: Any, diff: list, cfg: dict) -> paddle.Tensor:
        x, weight, bias = _unpack(diff, cfg)
        with _paddle_stream(x):
            rm = _native(cfg["running_mean"], "running_mean")
            rv = _native(cfg["running_var"], "running_var")
            res = F.batch_norm_forward(
                _native(x, "x"), _native(weight, "weight"), _native(bias, "bias"), rm, rv,
                training=cfg["training"], momentum=cfg["momentum"], epsilon=cfg["epsilon"],
                data_format=cfg["data_format"], comm=cfg["comm"],
                sync_state=cfg["sync_state"],
                inplace_running_stats=True,  # GPU: the kernel writes them, no copy
                act=cfg.get("act"),
            )
            if cfg["update"] and res.updated:
                # In place: the layer's _mean/_variance stay the same tensors
                # (the CPU path returns new arrays; the GPU path wrote them).
                for dst, src in ((rm, res.running_mean), (rv, res.running_var)):
                    if src is not dst:
                        dst[...] = src
            y = _export(res.y)
        ctx.fctx = res.ctx
        ctx.which = cfg["diff"]  # names of the list's tensors, in order
        # The backward reads x through the forward's view of its memory.
        ctx.x, ctx.x_version = x, x._inplace_version()
        return y

    @staticmethod
    def backward(ctx: Any, dy: paddle.Tensor) -> Any:
        if paddle.is_grad_enabled():
            raise NotImplementedError(
                "cupysyncbn.interop.paddle.SyncBatchNorm has no double backward:"
                " paddle.grad(..., create_graph=True) through it is not supported (first-order"
                " paddle.grad and backward() are; the PyTorch adapter,"
                " cupysyncbn.interop.torch, supports double backward)"
            )
        _check_not_modified(ctx.x, ctx.x_version)
        which = ctx.which
        need_p = "weight" in which or "bias" in which
        # Always run: in training mode the backward is a collective every rank joins.
        with _paddle_stream(dy):
            dx, dw, db = F.batch_norm_backward(
                _native(dy, "dy"), ctx.fctx, need_param_grads=need_p
            )
            grads = {"x": dx, "weight": dw, "bias": db}
            return [_export(grads[n]) for n in which]


def _unpack(diff: list, cfg: dict) -> tuple:
    """``(x, weight, bias)`` from the list of differentiable tensors and ``cfg``."""
    got = dict(zip(cfg["diff"], diff))
    return tuple(got.get(n, cfg["fixed"].get(n)) for n in ("x", "weight", "bias"))


def _check_not_modified(x: paddle.Tensor, version: int) -> None:
    """Raise if ``x`` was modified in place between the forward and the backward."""
    now = x._inplace_version()
    if now != version:
        raise RuntimeError(
            f"cupysyncbn.interop.paddle.SyncBatchNorm: its input was modified by an inplace"
            f" operation after the forward (inplace version {version} -> {now}); the"
            f" backward needs the original values. Use the out-of-place operation, or clone"
            f" the input before the layer"
        )


def batch_norm(
    x: paddle.Tensor,
    running_mean: paddle.Tensor | None,
    running_var: paddle.Tensor | None,
    weight: paddle.Tensor | None = None,
    bias: paddle.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.9,
    epsilon: float = 1e-5,
    data_format: str = "NCHW",
    use_global_stats: bool | None = None,
    name: str | None = None,
    *,
    comm: Any = None,
    sync_state: SyncState | None = None,
    act: str | None = None,
) -> paddle.Tensor:
    """Synchronized ``paddle.nn.functional.batch_norm``.

    Same arguments and conventions as ``paddle.nn.functional.batch_norm``;
    with batch statistics (``training=True`` and ``use_global_stats`` not
    True) they are those of the global batch over ``comm``, and in training
    mode the running statistics are updated in place.

    Parameters
    ----------
    x : paddle.Tensor
        2 to 5 dimensions, CPU or GPU. Only the channel placement of
        ``data_format`` matters (channel-first names: axis 1; ``NLC``,
        ``NHWC``, ``NDHWC``: the last axis).
    running_mean, running_var : paddle.Tensor or None
        Running statistics (C,), updated in place in training mode; None for
        batch statistics always.
    weight, bias : paddle.Tensor or None
        Affine parameters (C,); None means 1 / 0.
    training : bool
        Training mode: batch statistics of the global batch and the update.
    momentum : float
        Paddle convention: ``running = running * momentum + batch * (1 - momentum)``.
    epsilon : float
        Added to the variance.
    data_format : str
        ``NC, NCL, NCHW, NCDHW, NLC, NHWC, NDHWC``.
    use_global_stats : bool or None
        As in Paddle: True normalizes with the running statistics (no
        update), False with batch statistics, None follows ``training``.
    name : str, optional
        Unused (Paddle's naming argument).
    comm : Communicator, mpi4py.MPI.Comm, Paddle group or None, keyword-only
        Group to synchronize over (None: :func:`cupysyncbn.get_default_comm`).
    sync_state : cupysyncbn.functional.SyncState, optional
        Keep one per layer: one all-reduce per pass.
    act : {None, 'relu'}, keyword-only
        ``'relu'``: ``relu(batch_norm(...))``, the ReLU fused into the
        normalize pass and its mask into the backward's passes.

    Returns
    -------
    paddle.Tensor
    """
    _check_dynamic_mode()
    check_act(act)
    if not isinstance(x, paddle.Tensor):
        raise TypeError(f"x must be a paddle.Tensor; got {type(x).__name__}")
    if x.ndim not in (2, 3, 4, 5):
        raise ValueError(f"x must have 2 to 5 dimensions; got shape {list(x.shape)}")
    fmt = _check_data_format(data_format)
    if x.dtype == paddle.bfloat16:
        # Neither NumPy nor CuPy has bfloat16: compute from a float32 copy
        # (float32 statistics, as for float16) and cast back; autograd follows.
        y = batch_norm(
            x.astype("float32"), running_mean, running_var, weight, bias, training,
            momentum, epsilon, data_format, use_global_stats, name, comm=comm,
            sync_state=sync_state, act=act,
        )
        return y.astype("bfloat16")
    use_running = (not training) if use_global_stats is None else bool(use_global_stats)
    use_running = use_running and running_mean is not None
    cfg: dict[str, Any] = {
        "running_mean": running_mean,
        "running_var": running_var,
        "training": not use_running,
        "update": bool(training and not use_running and running_mean is not None),
        "momentum": float(momentum),
        "epsilon": float(epsilon),
        "data_format": _BY_NDIM[fmt in _CHANNEL_LAST][x.ndim],
        # Running statistics need no communication (and the default
        # communicator need not exist in eval-only processes).
        "comm": LOCAL if use_running else comm,
        "sync_state": sync_state,
        "act": act,
    }
    named = (("x", x), ("weight", weight), ("bias", bias))
    cfg["diff"] = [n for n, t in named if t is not None and not t.stop_gradient]
    cfg["fixed"] = {n: t for n, t in named if n not in cfg["diff"]}
    diff = [t for n, t in named if n in cfg["diff"]]
    if not diff:  # nothing to differentiate: no graph (an empty list slot is refused)
        ctx = _NoGrad()
        y = _SyncBatchNormFunction.forward(ctx, diff, cfg)  # type: ignore[arg-type]
        y.stop_gradient = True
        return y
    return _SyncBatchNormFunction.apply(diff, cfg)


class _NoGrad:
    """Stands for PyLayer's context when nothing needs a gradient."""


def _check_dynamic_mode() -> None:
    """Refuse static graphs (``to_static(full_graph=True)``, ``paddle.static``), clearly."""
    if not paddle.in_dynamic_mode():
        raise NotImplementedError(
            "cupysyncbn.interop.paddle.SyncBatchNorm runs in dynamic mode only (its"
            " synchronized pass computes on the tensors' memory through DLPack):"
            " paddle.jit.to_static(full_graph=True) and paddle.static programs are not"
            " supported; use paddle.jit.to_static(model) (SOT, full_graph=False: the layer"
            " runs eagerly between the captured subgraphs) or the dynamic-mode model"
        )


def _check_data_format(data_format: Any) -> str:
    if data_format not in _FORMATS:
        raise ValueError(
            f"data_format must be one of {', '.join(_FORMATS)}; got {data_format!r}"
        )
    return data_format


def _check_momentum(momentum: Any) -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not (
        0.0 <= float(momentum) <= 1.0
    ):
        raise ValueError(f"momentum must be a number in [0, 1]; got {momentum!r}")
    return float(momentum)


def _check_epsilon(epsilon: Any) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not (
        float(epsilon) >= 0.0
    ):
        raise ValueError(f"epsilon must be a number >= 0; got {epsilon!r}")
    return float(epsilon)


class SyncBatchNorm(paddle.nn.SyncBatchNorm):
    """``paddle.nn.SyncBatchNorm`` computed by cupysyncbn, on CPU and GPU tensors.

    Parameters
    ----------
    num_features : int
        Channels C.
    epsilon : float, default 1e-5
        Added to the variance. Note the order: the seed document's
        ``(num_features, epsilon, momentum, ...)``; Paddle 3's own class takes
        ``momentum`` second, so pass both by keyword in code meant for either.
    momentum : float, default 0.9
        Paddle convention: ``running = running * momentum + batch * (1 - momentum)``.
    weight_attr, bias_attr : ParamAttr, str, None or False
        As in Paddle: a ``ParamAttr`` (initializer, learning rate, regularizer,
        ``trainable``) for the parameter; ``False`` fixes the weight at 1 /
        the bias at 0 (still a parameter in ``state_dict()``, with
        ``stop_gradient=True``).
    data_format : str, default 'NCHW'
        ``NC, NCL, NCHW, NCDHW`` (channels on axis 1) or ``NLC, NHWC, NDHWC``
        (channels last); any 2-5-D input is accepted with any of them.
    name : str, optional
        Names the running statistics (``name + '_mean'``...), as in Paddle.
    comm : Communicator, mpi4py.MPI.Comm, Paddle group or None, keyword-only
        Group to synchronize over. None is cupysyncbn's default communicator
        (:func:`cupysyncbn.init`): all ranks of ``mpiexec``, or Paddle's global
        group once ``paddle.distributed.init_parallel_env()`` has run, else
        one process. ``comm=paddle.distributed.new_group(ranks)`` syncs a
        sub-group.
    act : {None, 'relu'}, keyword-only
        ``'relu'``: output ``relu(bn(x))`` (the ``act`` of Paddle's
        ``paddle.nn.BatchNorm``), the ReLU fused into the normalize pass and
        its mask into the backward's passes (no pass of its own).
    reproducible : bool, optional, keyword-only
        Bitwise-reproducible outputs, input gradients and running statistics
        for every world size and split (docs/reproducibility.md). None:
        ``CUPYSYNCBN_REPRODUCIBLE`` (default False). The parameter gradients
        stay local; ``paddle.DataParallel``'s sum of them is not covered. Not
        with ``act``.

    Notes
    -----
    Parameter gradients are those of the local batch, as in Paddle:
    ``paddle.DataParallel`` (or an all-reduce of the gradients) combines
    them. In training mode every rank must run the forward and the backward
    (each is one collective); ranks may hold different batch sizes,
    including zero. Eval mode uses the running statistics without
    communication.
    """

    def __init__(
        self,
        num_features: int,
        epsilon: float = 1e-5,
        momentum: float = 0.9,
        weight_attr: Any = None,
        bias_attr: Any = None,
        data_format: str = "NCHW",
        name: str | None = None,
        *,
        comm: Any = None,
        act: str | None = None,
        reproducible: bool | None = None,
    ) -> None:
        check_act(act)
        repro = check_reproducible(reproducible)
        if repro and act is not None:
            raise ValueError(REPRO_ACT)
        if isinstance(num_features, bool) or not isinstance(num_features, int) or (
            num_features < 1
        ):
            raise ValueError(f"num_features must be a positive int; got {num_features!r}")
        super().__init__(
            num_features, _check_momentum(momentum), _check_epsilon(epsilon), weight_attr,
            bias_attr, _check_data_format(data_format), name,  # type: ignore[arg-type]
        )
        # None stays lazy (resolved at each training pass, so init('auto') or
        # init_parallel_env() may run after the model is built); anything else
        # is resolved now so a bad ``comm`` fails at construction.
        self._comm_ref = SharedComm(None if comm is None else as_communicator(comm))
        # identity on every rank: order of construction (see cupysyncbn._sync.protocol)
        self._sync_state = SyncState.for_layer(self._comm_ref.comm)
        self._sync_state.reproducible = repro  # the functional passes read it
        # ``act``, or that of a converted paddle.nn.BatchNorm(act=...): 'relu'
        # is fused into the pass, another activation applied to the output.
        # trainable_statistics=True (converted too): batch statistics (with
        # the running update, as Paddle does) in eval mode too.
        self._act: str | None = act
        self._trainable_statistics = False

    @property
    def comm(self) -> Any:
        """The communicator this layer synchronizes over (None: cupysyncbn's default)."""
        return self._comm_ref.comm

    @comm.setter
    def comm(self, comm: Any) -> None:
        self._comm_ref = SharedComm(None if comm is None else as_communicator(comm))
        repro = self._sync_state.reproducible
        self._sync_state = SyncState()
        self._sync_state.reproducible = repro

    @paddle.jit.not_to_static
    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        """Normalize ``x`` with global-batch statistics (training) or running ones (eval).

        Under ``paddle.jit.to_static`` (SOT, the default) the layer runs eagerly
        between the captured subgraphs; ``full_graph=True`` is refused.
        """
        _check_dynamic_mode()
        err: BaseException | None = None
        if not isinstance(x, paddle.Tensor):
            err = TypeError(f"x must be a paddle.Tensor; got {type(x).__name__}")
        elif x.ndim not in (2, 3, 4, 5):
            err = ValueError(f"expected 2D to 5D input (got {x.ndim}D input)")
        if err is not None:
            ugs = self._use_global_stats
            if (not self._batch_mode()) if ugs is None else bool(ugs):
                raise err  # running statistics: no collective to join
            # The other ranks are already in the collective: join it, then raise
            # (they raise RemoteInputError instead of waiting for the watchdog).
            F.fail_collectively(
                err, "type" if isinstance(err, TypeError) else "ndim", comm=self.comm,
                sync_state=self._sync_state, num_features=self._num_features,
                backend="cupy" if self._mean.place.is_gpu_place() else "numpy",
            )
        comm = self.comm
        ugs = self._use_global_stats
        if not self.training and (self._trainable_statistics or ugs is False):
            # eval with batch statistics: agreed with the peers, or local
            # inside cupysyncbn.local_eval()
            comm = self._sync_state.eval_batch_pass(comm)
        y = batch_norm(
            x, self._mean, self._variance, self.weight, self.bias, self._batch_mode(),
            self._momentum, self._epsilon, self._data_format, self._use_global_stats,
            comm=comm, sync_state=self._sync_state,
            act="relu" if self._act == "relu" else None,
        )
        if self._act not in (None, "relu"):
            y = getattr(paddle.nn.functional, self._act)(y)
        return y

    def _batch_mode(self) -> bool:
        """Training statistics (and update): training mode, or trainable_statistics."""
        return self.training or self._trainable_statistics

    @property
    def reproducible(self) -> bool:
        """Bitwise-reproducible mode (docs/reproducibility.md); fixed at construction."""
        return bool(self._sync_state.reproducible)

    def extra_repr(self) -> str:
        return (
            f"num_features={self._num_features}, momentum={self._momentum},"
            f" epsilon={self._epsilon}, data_format={self._data_format}"
            + (f", act={self._act!r}" if self._act else "")
        ) + (", reproducible=True" if self.reproducible else "")

    @classmethod
    def convert_sync_batchnorm(cls, layer: paddle.nn.Layer, comm: Any = None) -> paddle.nn.Layer:
        """See :func:`convert_sync_batchnorm`."""
        return convert_sync_batchnorm(layer, comm)


# paddle.jit.to_static's SOT mode (the default) runs the layer eagerly, with a
# graph break around it, instead of simulating its Python (the synchronized
# pass computes on the tensors' memory). Paddle versions without the marker
# fall back to their own handling.
_force_dynamic = getattr(getattr(paddle.jit, "marker", None), "force_dynamic", None)
if _force_dynamic is not None:
    _force_dynamic(SyncBatchNorm)


def _local_bn_config(layer: Any) -> dict | None:
    """Constructor arguments of a Paddle batch norm to convert, or None if it is not one."""
    if isinstance(layer, SyncBatchNorm):
        return None
    if isinstance(layer, _BatchNormBase):  # BatchNorm1D/2D/3D, paddle.nn.SyncBatchNorm
        return {
            "num_features": layer._num_features, "momentum": layer._momentum,
            "epsilon": layer._epsilon, "weight_attr": layer._weight_attr,
            "bias_attr": layer._bias_attr, "data_format": layer._data_format,
            "name": layer._name, "use_global_stats": layer._use_global_stats, "act": None,
            "trainable_statistics": False,
        }
    if isinstance(layer, paddle.nn.BatchNorm):  # the older 2.x-style class
        # It has no use_global_stats=None: False means "follow the mode".
        return {
            "num_features": int(layer._mean.shape[0]), "momentum": layer._momentum,
            "epsilon": layer._epsilon, "weight_attr": layer._param_attr,
            "bias_attr": layer._bias_attr, "data_format": layer._data_layout,
            "name": None, "use_global_stats": True if layer._use_global_stats else None,
            "act": layer._act, "trainable_statistics": bool(layer._trainable_statistics),
        }
    return None


def _convert_one(layer: Any, cfg: dict, comm: Any) -> SyncBatchNorm:
    fmt = cfg["data_format"]
    if fmt not in _FORMATS:  # e.g. 'NCHW' spelled differently by old layers
        fmt = "NHWC" if str(fmt).upper().endswith("C") else "NCHW"
    # Fixed (False) attributes are kept; trainable ones are replaced below by
    # the original Parameter objects, so no new parameter is created for them.
    w_attr = False if layer.weight is None else None
    b_attr = False if layer.bias is None else None
    out = SyncBatchNorm(
        cfg["num_features"], cfg["epsilon"], cfg["momentum"], w_attr, b_attr, fmt,
        cfg["name"], comm=comm,
    )
    # Share (not copy) the parameters and statistics, as Paddle's conversion
    # does: an optimizer built before the conversion still updates them.
    with paddle.no_grad():
        if layer.weight is not None:
            out.weight = layer.weight
        if layer.bias is not None:
            out.bias = layer.bias
    out._mean = layer._mean
    out._variance = layer._variance
    out._weight_attr = cfg["weight_attr"]
    out._bias_attr = cfg["bias_attr"]
    out._use_global_stats = cfg["use_global_stats"]
    act = cfg["act"]
    if act is not None and not callable(getattr(paddle.nn.functional, str(act), None)):
        raise ValueError(
            f"cupysyncbn.interop.paddle.convert_sync_batchnorm: the activation act={act!r} of"
            f" {type(layer).__name__} is not a paddle.nn.functional function; supported:"
            f" act=None or a name such as 'relu', 'sigmoid', 'tanh'"
        )
    out._act = act
    out._trainable_statistics = cfg["trainable_statistics"]
    out.training = layer.training
    return out


def convert_sync_batchnorm(layer: paddle.nn.Layer, comm: Any = None) -> paddle.nn.Layer:
    """Replace every Paddle batch norm in ``layer`` by a cupysyncbn :class:`SyncBatchNorm`.

    Converts ``paddle.nn.BatchNorm1D/2D/3D``, ``paddle.nn.BatchNorm`` and
    ``paddle.nn.SyncBatchNorm``, like ``paddle.nn.SyncBatchNorm.convert_sync_batchnorm``:
    the new layers keep ``epsilon``, ``momentum``, ``data_format``, the
    parameter attributes, ``use_global_stats`` (and ``act`` of
    ``paddle.nn.BatchNorm``) and the training flag, and take over the
    ``weight``/``bias`` parameters and the ``_mean``/``_variance`` tensors
    themselves (an optimizer built before the conversion still updates them;
    dtype and device are unchanged). A parameter fixed by ``weight_attr=False``
    / ``bias_attr=False`` stays fixed (1 / 0), each on its own.

    Parameters
    ----------
    layer : paddle.nn.Layer
        A model, or a single batch-norm layer.
    comm : Communicator, mpi4py.MPI.Comm, Paddle group or None
        Group for the new layers.

    Returns
    -------
    paddle.nn.Layer
        ``layer`` with its batch norms replaced, or the new layer if ``layer``
        itself is one.
    """
    out = layer
    cfg = _local_bn_config(layer)
    if cfg is not None:
        out = _convert_one(layer, cfg, comm)
    for name, child in layer.named_children():
        out.add_sublayer(name, convert_sync_batchnorm(child, comm))
    return out

