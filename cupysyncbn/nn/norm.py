"""Batch-norm layers: local ``BatchNorm1D/2D/3D`` and ``SyncBatchNorm``.

Both are the same class with a different communicator: the local layers use
the one-process communicator, ``SyncBatchNorm`` the group given by ``comm``
(default: :func:`cupysyncbn.init`'s). The math is in
:mod:`cupysyncbn.functional`.
"""

from __future__ import annotations

import copy
import numbers
from typing import Any

import numpy as np

from .. import functional as F
from .._sync import checks, collective, fused, passes
from .._sync.checks import (
    REPRO_ACT,
    check_act,
    check_epsilon,
    check_momentum,
    check_reproducible,
)
from .._sync.state import SyncState
from ..arrays.devices import device_of, to_host
from ..arrays.dtypes import parse_param_dtype
from ..arrays.formats import DataFormat, parse_data_format
from ..backends import get_backend
from ..comm.base import LOCAL, Communicator
from ..comm.select import as_communicator
from ..errors import NoPendingForwardError
from ..modes import is_grad_enabled
from ..runtime.placement import layer_device
from .layer import Layer, ParamAttr, Parameter

__all__ = ["BatchNorm1D", "BatchNorm2D", "BatchNorm3D", "SyncBatchNorm"]


def _check_num_features(num_features: Any) -> int:
    if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
        raise TypeError(f"num_features must be a positive int; got {num_features!r}")
    if num_features <= 0:
        raise ValueError(f"num_features must be a positive int; got {num_features}")
    return int(num_features)


def _make_param(
    attr: Any, argname: str, shape: tuple, dtype: np.dtype, default: float
) -> Parameter:
    """Parameter from a Paddle-style attr: None, False, a ParamAttr or a name."""
    if attr is False:
        return Parameter(np.full(shape, default, dtype=dtype), trainable=False, name=argname)
    if attr is None or attr is True:
        attr = ParamAttr()
    elif isinstance(attr, str):
        attr = ParamAttr(name=attr)
    elif not isinstance(attr, ParamAttr):
        raise TypeError(f"{argname} must be None, False, a str or a ParamAttr; got {attr!r}")
    return Parameter(attr.make(shape, dtype, default), trainable=attr.trainable, name=attr.name)


class _BatchNormBase(Layer):
    """Shared implementation of the batch-norm layers (see :class:`SyncBatchNorm`)."""

    _formats: tuple[str, ...] = ("NC", "NCL", "NCHW", "NCDHW", "NLC", "NHWC", "NDHWC")
    # Input ranks accepted (Paddle: SyncBatchNorm any of 2-5, BatchNormND their own).
    _ndims: tuple[int, ...] = (2, 3, 4, 5)
    #: Most forward contexts kept for ``backward`` (oldest dropped first).
    #: Set it on a layer used more times than this before its backwards.
    max_pending_contexts: int = 8
    # Buffers, registered in __init__ (register_buffer).
    _mean: Any
    _variance: Any
    _num_batches_tracked: Any

    def __init__(
        self,
        num_features: int,
        momentum: float | None = 0.9,
        epsilon: float = 1e-5,
        weight_attr: Any = None,
        bias_attr: Any = None,
        data_format: str = "NCHW",
        use_global_stats: bool | None = None,
        name: str | None = None,
        *,
        track_running_stats: bool = True,
        unbiased_running_var: bool = False,
        dtype: Any = "float32",
        comm: Any = LOCAL,
        reproducible: bool | None = None,
        act: str | None = None,
    ) -> None:
        dt = parse_param_dtype(dtype)
        super().__init__(name, dtype=dt)
        self._num_features = _check_num_features(num_features)
        self._momentum = check_momentum(momentum)
        self._epsilon = check_epsilon(epsilon)
        self._act = check_act(act)
        fmt = parse_data_format(data_format)
        if fmt.name not in self._formats:
            raise ValueError(
                f"data_format must be one of {', '.join(self._formats)} for"
                f" {type(self).__name__}; got {data_format!r}"
            )
        self._fmt: DataFormat = fmt
        self._data_format = fmt.name
        if use_global_stats not in (None, True, False):
            raise TypeError(f"use_global_stats must be None or a bool; got {use_global_stats!r}")
        self._use_global_stats = use_global_stats
        self._track_running_stats = bool(track_running_stats)
        self._unbiased_running_var = bool(unbiased_running_var)
        self._reproducible = check_reproducible(reproducible)
        if self._reproducible and self._act is not None:
            raise ValueError(REPRO_ACT)
        self._weight_attr = weight_attr
        self._bias_attr = bias_attr
        self._name = name
        shape = (self._num_features,)
        self.weight = _make_param(weight_attr, "weight_attr", shape, dt, 1.0)
        self.bias = _make_param(bias_attr, "bias_attr", shape, dt, 0.0)
        self.register_buffer("_mean", np.zeros(shape, dtype=dt))
        self.register_buffer("_variance", np.ones(shape, dtype=dt))
        self.register_buffer(
            "_num_batches_tracked", np.zeros((), dtype=np.int64), persistable=momentum is None
        )
        self._comm_arg = comm
        # None stays lazy (the default communicator is created at first use);
        # anything else is resolved now so a bad ``comm`` fails at construction.
        self._comm: Communicator | None = None if comm is None else as_communicator(comm)
        self._new_identity()
        self._place_new_layer()

    def _new_identity(self) -> None:
        """Make this a new layer: a fresh ``SyncState`` and no pending forwards.

        The state's construction ordinal names the layer on every rank: its
        order of construction (or copy, or unpickling) among the layers of
        its communicator, counted without communication, so ranks that run
        the same program agree on it.
        """
        self._sync_state = SyncState.for_layer(None if self._comm_arg is None else self._comm)
        self._sync_state.reproducible = self.reproducible
        # Forward contexts awaiting their backward, most recent last (LIFO).
        self._pending: list[F.ForwardContext] = []
        self._dropped = 0  # contexts dropped by the bound, not yet asked for
        # The checked steady-state pass (see _steady_forward), or None.
        self._plan: Any = None

    # copies --------------------------------------------------------------
    def __deepcopy__(self, memo: dict) -> _BatchNormBase:
        """A new layer with copies of the parameters and buffers.

        It shares the communicator (an EMA copy syncs over the same group;
        a communicator is a live connection, not state) and gets its own
        identity: a new construction ordinal, counted on every rank in
        program order like a construction, and a fresh ``SyncState`` (no
        shared buffers, shift or handshake). Pending forward contexts are
        not copied: a ``backward`` on the copy needs a forward of its own.
        """
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            if name in _FRESH_ON_COPY:
                continue
            if name not in _SHARED_ON_COPY:
                value = copy.deepcopy(value, memo)
            object.__setattr__(new, name, value)
        new._new_identity()
        return new

    def __copy__(self) -> _BatchNormBase:
        """A shallow copy (same arrays and communicator) that is still a new layer.

        Sharing the ``SyncState`` would give two layers one identity and one
        shift; the copy gets its own, as a deep copy does.
        """
        new = type(self).__new__(type(self))
        for name, value in self.__dict__.items():
            if name not in _FRESH_ON_COPY:
                object.__setattr__(new, name, value)
        new._new_identity()
        return new

    def __getstate__(self) -> dict:
        """What pickling stores: parameters, buffers and options, no communicator.

        No ``SyncState`` (buffers, device workspaces), no pending forward
        contexts and no communicator: the unpickled layer is a new layer
        that synchronizes over the default communicator (a local
        ``BatchNorm*D`` stays local).
        """
        state = {k: v for k, v in self.__dict__.items()
                 if k not in _FRESH_ON_COPY and k not in _SHARED_ON_COPY}
        state["_comm_is_local"] = self._comm_arg is LOCAL
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        local = state.pop("_comm_is_local", False)
        self.__dict__.update(state)
        self._comm_arg = LOCAL if local else None
        self._comm = LOCAL if local else None
        self._new_identity()

    def _place_new_layer(self) -> None:
        """Under ``set_device('auto'|'gpu'...)`` with a GPU, hold CuPy arrays there."""
        dev = layer_device()
        if dev is not None:
            self.to(dev)
        self._state_device = self._device_now()

    def _device_now(self) -> str:
        return device_of(self.weight.data)

    # read-only views of the configuration ----------------------------------
    @property
    def num_features(self) -> int:
        """Number of channels."""
        return self._num_features

    @property
    def momentum(self) -> float | None:
        """Running-statistics momentum (Paddle convention), or None (cumulative)."""
        return self._momentum

    @property
    def epsilon(self) -> float:
        """Added to the variance."""
        return self._epsilon

    @property
    def data_format(self) -> str:
        """The layer's data format."""
        return self._data_format

    @property
    def act(self) -> str | None:
        """The activation fused into the pass (``'relu'``), or None."""
        return getattr(self, "_act", None)  # layers pickled before ``act`` existed

    @property
    def comm(self) -> Communicator:
        """The communicator this layer synchronizes over."""
        if self._comm is None:
            self._comm = as_communicator(self._comm_arg)
        return self._comm

    @property
    def track_running_stats(self) -> bool:
        """Whether running statistics are kept and used in eval mode."""
        return self._track_running_stats

    @property
    def reproducible(self) -> bool:
        """Bitwise-reproducible mode (docs/reproducibility.md); fixed at construction."""
        return getattr(self, "_reproducible", False)

    def extra_repr(self) -> str:
        return (
            f"num_features={self._num_features}, momentum={self._momentum},"
            f" epsilon={self._epsilon}, data_format={self._data_format},"
            f" dtype={self._dtype.name}" + (f", act={self.act!r}" if self.act else "")
        ) + (", reproducible=True" if self.reproducible else "")

    def _state_aliases(self) -> dict[str, str | None]:
        return {
            "running_mean": "_mean",
            "running_var": "_variance",
            "num_batches_tracked": "_num_batches_tracked" if self._momentum is None else None,
        }

    def _check_state_value(self, attr: str, key: str, value: Any) -> None:
        # Running statistics feed every eval pass: a NaN, an infinity or a
        # negative variance would make eval outputs non-finite much later.
        if attr not in ("_mean", "_variance"):
            return
        host = np.asarray(to_host(value))
        if not np.isfinite(host).all():
            bad = host[~np.isfinite(host)][0]
            raise ValueError(
                f"state_dict[{key!r}] holds a non-finite value ({bad}); running"
                f" {'variances' if attr == '_variance' else 'means'} must be finite"
            )
        if attr == "_variance" and (host < 0).any():
            raise ValueError(
                f"state_dict[{key!r}] holds a negative value ({host[host < 0][0]}); a running"
                " variance is >= 0"
            )

    def _on_state_loaded(self) -> None:
        self.clear_pending()
        self._plan = None
        # The batch counter is a host quantity: forward reads it into kernel
        # arguments, and reading a device copy would be a host synchronization
        # per pass (an illegal one inside a CUDA graph capture). ``.to`` and
        # state loads move every buffer; bring this one back (once, here).
        nbt = self._num_batches_tracked
        if type(nbt) is not np.ndarray:  # CuPy (or a NumPy subclass standing in)
            object.__setattr__(self, "_num_batches_tracked", np.array(to_host(nbt)))
        # A move (``.to``) invalidates the shift and buffers kept on the old
        # device: the next synchronized pass must not mix NumPy and CuPy.
        now = self._device_now()
        if now != getattr(self, "_state_device", now):
            self._sync_state.reset()
        self._state_device = now

    def clear_pending(self) -> None:
        """Forget every pending forward context (frees the inputs they hold)."""
        self._pending.clear()
        self._dropped = 0

    @property
    def num_pending(self) -> int:
        """Number of forward contexts waiting for a ``backward``."""
        return len(self._pending)

    # passes ------------------------------------------------------------------
    def forward(self, x: Any) -> Any:
        """Normalize ``x`` (see :func:`cupysyncbn.functional.batch_norm_forward`).

        In training mode (or with ``track_running_stats=False``) uses the
        statistics of the global batch, synchronized over :attr:`comm`, and
        updates the running statistics in place; in eval mode uses the
        running statistics without communication.

        Unless under :func:`cupysyncbn.no_grad`, the forward's context is kept
        for :meth:`backward` (at most :attr:`max_pending_contexts`).
        """
        plan = self._plan
        if plan is not None and type(x) is plan.array_type:
            y = self._steady_forward(plan, x)
            if y is not None:
                return y
        ndim = getattr(x, "ndim", None)
        # Only the local BatchNormND narrow the ranks, and they never
        # synchronize: a synchronized layer must reach the collective (where
        # functional reports a bad rank on every rank) instead of raising here.
        if self._ndims != (2, 3, 4, 5) and isinstance(ndim, int) and ndim not in self._ndims:
            raise ValueError(
                f"{type(self).__name__} takes inputs of {_ranks(self._ndims)} dimensions;"
                f" got shape {tuple(x.shape)} with data_format={self._data_format!r}"
            )
        if self._use_global_stats is None:
            batch_stats = self.training or not self._track_running_stats
        else:
            batch_stats = not self._use_global_stats
        update = self.training and batch_stats and self._track_running_stats
        use_running = self._track_running_stats
        comm = self.comm if batch_stats else LOCAL
        if batch_stats and not self.training:
            comm = self._sync_state.eval_batch_pass(comm)
        res = F.batch_norm_forward(
            x,
            self.weight.data,
            self.bias.data,
            self._mean if use_running else None,
            self._variance if use_running else None,
            training=batch_stats,
            momentum=self._momentum,
            epsilon=self._epsilon,
            data_format=self._fmt,
            comm=comm,
            unbiased_running_var=self._unbiased_running_var and update,
            num_batches_tracked=int(self._num_batches_tracked),
            sync_state=self._sync_state,
            param_dtype=self._dtype,
            inplace_running_stats=True,  # GPU: the live arrays, no allocation
            reproducible=self.reproducible,
            act=self.act,
        )
        self._finish_forward(res, update)
        if update and batch_stats and not self.reproducible:
            self._plan = self._make_plan(x, comm, res)
        return res.y

    def _finish_forward(self, res: F.ForwardResult | None, update: bool,
                        ctx: F.ForwardContext | None = None) -> None:
        """Store the running statistics a forward returned, keep its context."""
        if res is not None:
            ctx = res.ctx
            if update and res.updated:
                # In place (as Paddle and PyTorch): references to the running
                # statistics and earlier state_dict() results stay current.
                _store(self._mean, res.running_mean)
                _store(self._variance, res.running_var)
                self._num_batches_tracked[...] += 1
        # else: a steady pass updated the running statistics and counted the
        # batch in place
        assert ctx is not None
        if is_grad_enabled():
            self._pending.append(ctx)
            if len(self._pending) > max(1, int(self.max_pending_contexts)):
                del self._pending[0]
                self._dropped += 1

    def _plan_key(self) -> tuple:
        """Everything of the layer a steady-state plan was checked with, besides the arrays."""
        return (self._use_global_stats, self._track_running_stats, self._momentum,
                self._epsilon, self.act, self._unbiased_running_var, self._fmt, self._dtype,
                self._comm, self.reproducible)

    def _make_plan(self, x: Any, comm: Any, res: F.ForwardResult) -> Any:
        """The steady-state plan of the training forward that just passed its checks.

        ``passes.SteadyPlan`` (NumPy arrays, numba backend), ``fused.FusedPlan``
        (CuPy), or None.
        """
        state = self._sync_state
        vectors = (self.weight.data, self.bias.data,
                   *((self._mean, self._variance) if self._track_running_stats else (None, None)))
        key = checks.call_key(state, x, self._fmt, self._momentum, self._epsilon, vectors,
                              self._dtype, self.act)
        verdict = state.memo(key) if key is not None else None
        if verdict is None or res.ctx.unit is not None:
            return None
        on_gpu = getattr(verdict.backend, "fused", False)
        make = fused.steady_plan if on_gpu else passes.steady_plan
        plan = make(
            comm, state, x, verdict, vectors, self._momentum, self._epsilon,
            self._unbiased_running_var, self.act == "relu", comm.synchronizes,
        )
        if plan is not None:
            plan.owner = self._plan_key()
        return plan

    def _steady_forward(self, plan: Any, x: Any) -> Any:
        """``y`` by ``plan`` when the call is the one it was checked for; else None.

        The memo's key: ``x``'s dtype, shape and strides, the same vector
        arrays with the same shape and dtype, training mode, the layer's
        options, the communicator (and whether it synchronizes) and the CPU
        backend the environment picks (chosen per pass).
        """
        if (x.dtype is not plan.dtype or x.shape != plan.shape or x.strides != plan.strides
                or not self.training):
            return None
        w, b, rm, rv = plan.vectors
        if self.weight.data is not w or self.bias.data is not b:
            return None
        if rm is not None and (self._mean is not rm or self._variance is not rv):
            return None
        shape, pdt = w.shape, plan.pdt
        for vec in plan.vectors if rm is not None else plan.vectors[:2]:
            if vec.shape != shape or vec.dtype is not pdt:  # reshaped or retyped in place
                return None
        if (self._plan_key() != plan.owner or plan.comm.synchronizes is not plan.sync
                or get_backend(x) is not plan.backend):
            return None
        out = plan.forward(x, self._num_batches_tracked)
        if out is None:
            return None
        y, ctx, res = out
        self._finish_forward(res, plan.update, ctx)
        return y

    def backward(self, dy: Any) -> Any:
        """Input gradient of the most recent pending forward; accumulates parameter gradients.

        Forwards are consumed last in, first out: a layer used k times before
        its backwards gets k backward calls, in reverse order, and the
        parameter gradients of all of them add up (as in Paddle and PyTorch).
        A ``backward`` that raises leaves its forward pending.

        Returns
        -------
        dx : array
            Same shape and dtype as that forward's input.

        Raises
        ------
        NoPendingForwardError (a RuntimeError)
            If no forward is pending: none ran since the layer was built or
            loaded, every one already had its backward, they ran under
            :func:`cupysyncbn.no_grad`, or the one needed was dropped because
            more than :attr:`max_pending_contexts` were pending.
        ValueError, TypeError
            If ``dy`` does not match the forward's input.
        """
        if not self._pending:
            name = type(self).__name__
            if self._dropped:
                self._dropped -= 1
                self._raise_no_pending(NoPendingForwardError(
                    f"{name}.backward(dy): the forward it belongs to was dropped: at most"
                    f" max_pending_contexts={self.max_pending_contexts} forwards are kept"
                    " awaiting backward (raise layer.max_pending_contexts, or run"
                    " forward-only passes under cupysyncbn.no_grad())"
                ))
            self._raise_no_pending(NoPendingForwardError(
                f"{name}.backward(dy) called before forward(x): no forward is pending"
                " (each training forward allows one backward; forwards under"
                " cupysyncbn.no_grad() keep none)"
            ))
        ctx = self._pending.pop()
        need = self.weight.trainable or self.bias.trainable
        gw, gb = self.weight.grad, self.bias.grad
        acc = (gw, gb) if self.weight.trainable and self.bias.trainable else None
        try:
            out = None
            plan = ctx.plan
            if (plan is not None and type(dy) is plan.array_type and dy.dtype is plan.dtype
                    and dy.shape == plan.shape and dy.strides == plan.strides):
                out = plan.backward(ctx, dy, need, acc)
            if out is None:
                out = F.batch_norm_backward(dy, ctx, need_param_grads=need, accumulate_into=acc)
            dx, dweight, dbias = out
        except BaseException:
            # A rejected dy (raised on every rank of the group alike) leaves
            # the forward pending, so a corrected backward can follow.
            self._pending.append(ctx)
            raise
        if need:  # the GPU path may have added to .grad in place already
            if dweight is not gw:
                self.weight.accumulate_grad(dweight)
            if dbias is not gb:
                self.bias.accumulate_grad(dbias)
            glob = ctx.global_grads  # reproducible mode: identical on every rank
            if glob is not None:
                self.weight.accumulate_global_grad(glob[0], gw)
                self.bias.accumulate_global_grad(glob[1], gb)
        return dx

    def _raise_no_pending(self, err: NoPendingForwardError) -> None:
        """Raise ``err``, on every rank when the peers may be in a pass of this layer.

        Once a layer has synchronized, a peer that did run a forward waits in
        this layer's collective: join it with an error slot set (zero
        payload, the buffer size of every pass) so that every rank raises --
        this one ``err``, the others a mismatch or ``RemoteInputError`` --
        instead of leaving them waiting.
        """
        state = self._sync_state
        if self._use_global_stats is None:
            batch_stats = self.training or not self._track_running_stats
        else:
            batch_stats = not self._use_global_stats
        if not (state.handshake_done and batch_stats and self.comm.synchronizes):
            raise err
        backend = get_backend(self.weight.data, "weight")
        dev = getattr(self.weight.data, "device", None)  # CuPy: the layer's GPU
        collective.backward_invalid(
            self.comm, backend, state, self._num_features, ("other", err), device=dev,
            remember=False,
        )
        raise err  # pragma: no cover - check_header raised


#: Attributes a deep copy shares with the original (pickling drops them).
_SHARED_ON_COPY = frozenset({"_comm", "_comm_arg"})
#: Attributes a copy (deep copy or unpickled) makes afresh: it is a new layer.
_FRESH_ON_COPY = frozenset({"_sync_state", "_pending", "_dropped", "_plan"})


def _ranks(ndims: tuple[int, ...]) -> str:
    if len(ndims) == 1:
        return str(ndims[0])
    return ", ".join(map(str, ndims[:-1])) + f" or {ndims[-1]}"


def _store(dst: Any, src: Any) -> None:
    """Copy ``src`` into ``dst`` unless the functional layer already wrote there."""
    if src is not dst:
        dst[...] = src


class _LocalBatchNorm(_BatchNormBase):
    """Local (unsynchronized) batch norm with Paddle's ``BatchNormND`` signature."""

    _default_format = "NCHW"

    def __init__(
        self,
        num_features: int,
        momentum: float | None = 0.9,
        epsilon: float = 1e-5,
        weight_attr: Any = None,
        bias_attr: Any = None,
        data_format: str | None = None,
        use_global_stats: bool | None = None,
        name: str | None = None,
        *,
        track_running_stats: bool = True,
        unbiased_running_var: bool = False,
        dtype: Any = "float32",
        reproducible: bool | None = None,
        act: str | None = None,
    ) -> None:
        super().__init__(
            num_features, momentum, epsilon, weight_attr, bias_attr,
            self._default_format if data_format is None else data_format,
            use_global_stats, name, track_running_stats=track_running_stats,
            unbiased_running_var=unbiased_running_var, dtype=dtype,
            reproducible=reproducible, act=act,
        )


class BatchNorm1D(_LocalBatchNorm):
    """Local batch norm over ``(N, C)`` or ``(N, C, L)`` inputs (Paddle's ``BatchNorm1D``).

    Parameters
    ----------
    num_features : int
        Number of channels C.
    momentum : float or None, default 0.9
        ``running = running * momentum + batch * (1 - momentum)``; None gives
        a cumulative average.
    epsilon : float, default 1e-5
    weight_attr, bias_attr : None, False, str or ParamAttr
        False fixes the weight at 1 / the bias at 0 (not trainable).
    data_format : {'NCL', 'NC', 'NLC'}, default 'NCL' (None)
    use_global_stats : bool, optional
        True: always normalize with the running statistics; False: always with
        batch statistics; None: batch statistics in training, running in eval.
    name : str, optional
    track_running_stats : bool, keyword-only, default True
    unbiased_running_var : bool, keyword-only, default False
        Store the unbiased batch variance in ``_variance`` (PyTorch).
    dtype : {'float32', 'float64'}, keyword-only
        Dtype of parameters and running statistics.
    reproducible : bool, keyword-only, optional
        Bitwise-reproducible statistics and gradients (docs/reproducibility.md);
        None: ``CUPYSYNCBN_REPRODUCIBLE`` (default False).
    act : {None, 'relu'}, keyword-only, default None
        ``'relu'``: output ``max(bn(x), 0)``, the ReLU fused into the
        normalize pass and its mask into the backward's passes (as Paddle's
        ``BatchNorm(act='relu')``); in eval mode too.

    Notes
    -----
    The positional order after ``num_features`` is Paddle's ``BatchNorm1D``
    order (``momentum`` before ``epsilon``); ``SyncBatchNorm`` has Paddle's
    ``SyncBatchNorm`` order (``epsilon`` first). Prefer keywords.
    """

    _formats = ("NC", "NCL", "NLC")
    _ndims = (2, 3)
    _default_format = "NCL"


class BatchNorm2D(_LocalBatchNorm):
    """Local batch norm over ``(N, C, H, W)`` or ``(N, H, W, C)`` inputs.

    Same parameters as :class:`BatchNorm1D`, with ``data_format`` in
    ``{'NCHW', 'NHWC'}`` (default ``'NCHW'``).
    """

    _formats = ("NCHW", "NHWC")
    _ndims = (4,)
    _default_format = "NCHW"


class BatchNorm3D(_LocalBatchNorm):
    """Local batch norm over ``(N, C, D, H, W)`` or ``(N, D, H, W, C)`` inputs.

    Same parameters as :class:`BatchNorm1D`, with ``data_format`` in
    ``{'NCDHW', 'NDHWC'}`` (default ``'NCDHW'``).
    """

    _formats = ("NCDHW", "NDHWC")
    _ndims = (5,)
    _default_format = "NCDHW"


class SyncBatchNorm(_BatchNormBase):
    """Batch norm whose statistics are synchronized over a group of processes.

    Modelled on ``paddle.nn.SyncBatchNorm``: same arguments, parameter names
    and momentum convention; exact for uneven and empty local batches.

    Parameters
    ----------
    num_features : int
        Number of channels C.
    epsilon : float, default 1e-5
        Added to the variance.
    momentum : float or None, default 0.9
        ``_mean = _mean * momentum + batch_mean * (1 - momentum)``; None gives
        a cumulative average (PyTorch's ``momentum=None``).
    weight_attr, bias_attr : None, False, str or ParamAttr
        False fixes the weight at 1 / the bias at 0 (not trainable, no
        gradient, still in ``state_dict``); each acts on its own parameter.
    data_format : str, default 'NCHW'
        ``NC, NCL, NCHW, NCDHW`` (alias ``NCW``: channels on axis 1) or
        ``NLC, NHWC, NDHWC`` (alias ``NWC``: channels on the last axis). As in
        Paddle, any of them takes inputs of 2 to 5 dimensions: the name says
        where the channels are, not the rank.
    name : str, optional
    comm : Communicator, mpi4py.MPI.Comm or None, keyword-only
        Group to synchronize over; None is the default communicator
        (:func:`cupysyncbn.init`; one process unless launched by ``mpiexec``).
    track_running_stats : bool, keyword-only, default True
        False: no running statistics; batch statistics in eval mode too.
    unbiased_running_var : bool, keyword-only, default False
        Store the unbiased batch variance ``var * m/(m-1)`` (PyTorch).
    dtype : {'float32', 'float64'}, keyword-only, default 'float32'
        Dtype of parameters and running statistics; float64 layers compute
        in float64.
    reproducible : bool, keyword-only, optional
        Bitwise-reproducible mode (docs/reproducibility.md): outputs, input
        gradients, running statistics and the parameter gradients summed by
        ``allreduce_gradients(layer, average=False)`` are the same bits for
        every number of ranks and every split of the global batch, on NumPy and
        CuPy arrays. None: ``CUPYSYNCBN_REPRODUCIBLE`` (default False). Not
        with ``act``.
    act : {None, 'relu'}, keyword-only, default None
        ``'relu'``: output ``max(bn(x), 0)`` (Paddle's ``BatchNorm(act=...)``,
        Apex's ``fuse_relu``): the ReLU is applied inside the normalize pass
        and its mask inside the backward's passes, so it costs no pass over
        the data of its own; in eval mode too.

    Examples
    --------
    >>> import numpy as np, cupysyncbn as sbn
    >>> bn = sbn.SyncBatchNorm(2)
    >>> x = np.array([[[[0.3, 0.4], [0.3, 0.07]], [[0.83, 0.37], [0.18, 0.93]]]], "float32")
    >>> y = bn(x); dx = bn.backward(np.ones_like(y))
    """

    def __init__(
        self,
        num_features: int,
        epsilon: float = 1e-5,
        momentum: float | None = 0.9,
        weight_attr: Any = None,
        bias_attr: Any = None,
        data_format: str = "NCHW",
        name: str | None = None,
        *,
        comm: Any = None,
        track_running_stats: bool = True,
        unbiased_running_var: bool = False,
        dtype: Any = "float32",
        reproducible: bool | None = None,
        act: str | None = None,
    ) -> None:
        super().__init__(
            num_features, momentum, epsilon, weight_attr, bias_attr, data_format,
            None, name, track_running_stats=track_running_stats,
            unbiased_running_var=unbiased_running_var, dtype=dtype, comm=comm,
            reproducible=reproducible, act=act,
        )

    @classmethod
    def convert_sync_batchnorm(cls, layer: Layer, comm: Any = None) -> Layer:
        """Replace every local ``BatchNorm1D/2D/3D`` in ``layer`` by a ``SyncBatchNorm``.

        Keeps ``data_format``, ``epsilon``, ``momentum``, ``act``, the
        running-stats options, the dtype and the training flag, and copies the weight, bias
        and running statistics (each independently: a trained weight is kept
        even when only ``bias_attr`` is False).

        Parameters
        ----------
        layer : Layer
            A model, or a single batch-norm layer.
        comm : Communicator, mpi4py.MPI.Comm or None
            Group for the new layers (None: the default communicator).

        Returns
        -------
        Layer
            ``layer`` converted in place, or the new layer if ``layer`` itself
            is a local batch norm.
        """
        if isinstance(layer, _BatchNormBase) and not isinstance(layer, SyncBatchNorm):
            return cls._from_local(layer, comm)
        for parent in layer.sublayers(include_self=True):
            for name, sub in list(parent._sub_layers.items()):
                if isinstance(sub, _BatchNormBase) and not isinstance(sub, SyncBatchNorm):
                    setattr(parent, name, cls._from_local(sub, comm))
        return layer

    @classmethod
    def _from_local(cls, bn: _BatchNormBase, comm: Any) -> SyncBatchNorm:
        new = cls(
            bn._num_features,
            epsilon=bn._epsilon,
            momentum=bn._momentum,
            weight_attr=False if not bn.weight.trainable else None,
            bias_attr=False if not bn.bias.trainable else None,
            data_format=bn._data_format,
            name=bn._name,
            comm=comm,
            track_running_stats=bn._track_running_stats,
            unbiased_running_var=bn._unbiased_running_var,
            dtype=bn._dtype,
            reproducible=bn.reproducible,
            act=bn.act,
        )
        new._use_global_stats = bn._use_global_stats
        # Copy values (not the attrs): Paddle re-initializes a trained weight
        # when only one attr is False; here each array is copied as it is.
        new.weight.data = bn.weight.data.copy()
        new.bias.data = bn.bias.data.copy()
        new.weight.trainable = bn.weight.trainable
        new.bias.trainable = bn.bias.trainable
        object.__setattr__(new, "_mean", bn._mean.copy())
        object.__setattr__(new, "_variance", bn._variance.copy())
        object.__setattr__(new, "_num_batches_tracked", bn._num_batches_tracked.copy())
        object.__setattr__(new, "training", bn.training)
        return new
