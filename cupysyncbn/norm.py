"""Batch-norm layers: local ``BatchNorm1D/2D/3D`` and ``SyncBatchNorm``.

Both are the same class with a different communicator: the local layers use
the one-process communicator, ``SyncBatchNorm`` the group given by ``comm``
(default: :func:`cupysyncbn.init`'s). The math is in
:mod:`cupysyncbn.functional`.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from . import functional as F
from .comm import as_communicator
from .comm.base import LOCAL, Communicator
from .dtypes import parse_param_dtype
from .formats import DataFormat, parse_data_format
from .layer import Layer, ParamAttr, Parameter

__all__ = ["BatchNorm1D", "BatchNorm2D", "BatchNorm3D", "SyncBatchNorm"]


def _check_num_features(num_features: Any) -> int:
    if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
        raise TypeError(f"num_features must be a positive int; got {num_features!r}")
    if num_features <= 0:
        raise ValueError(f"num_features must be a positive int; got {num_features}")
    return int(num_features)


def _check_momentum(momentum: Any) -> float | None:
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a float in [0, 1] or None; got {momentum!r}")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] or None; got {momentum}")
    return float(momentum)


def _check_epsilon(epsilon: Any) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
        raise TypeError(f"epsilon must be a float >= 0; got {epsilon!r}")
    if not float(epsilon) >= 0.0:
        raise ValueError(f"epsilon must be >= 0; got {epsilon}")
    return float(epsilon)


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
    ) -> None:
        dt = parse_param_dtype(dtype)
        super().__init__(name, dtype=dt)
        self._num_features = _check_num_features(num_features)
        self._momentum = _check_momentum(momentum)
        self._epsilon = _check_epsilon(epsilon)
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
        self._sync_state = F.SyncState()
        self._ctx: F.ForwardContext | None = None

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
    def comm(self) -> Communicator:
        """The communicator this layer synchronizes over."""
        if self._comm is None:
            self._comm = as_communicator(self._comm_arg)
        return self._comm

    @property
    def track_running_stats(self) -> bool:
        """Whether running statistics are kept and used in eval mode."""
        return self._track_running_stats

    def extra_repr(self) -> str:
        return (
            f"num_features={self._num_features}, momentum={self._momentum},"
            f" epsilon={self._epsilon}, data_format={self._data_format},"
            f" dtype={self._dtype.name}"
        )

    def _state_aliases(self) -> dict[str, str | None]:
        return {
            "running_mean": "_mean",
            "running_var": "_variance",
            "num_batches_tracked": "_num_batches_tracked" if self._momentum is None else None,
        }

    def _on_state_loaded(self) -> None:
        self._ctx = None

    # passes ------------------------------------------------------------------
    def forward(self, x: Any) -> Any:
        """Normalize ``x`` (see :func:`cupysyncbn.functional.batch_norm_forward`).

        In training mode (or with ``track_running_stats=False``) uses the
        statistics of the global batch, synchronized over :attr:`comm`, and
        updates the running statistics; in eval mode uses the running
        statistics without communication.
        """
        if self._use_global_stats is None:
            batch_stats = self.training or not self._track_running_stats
        else:
            batch_stats = not self._use_global_stats
        update = self.training and batch_stats and self._track_running_stats
        use_running = self._track_running_stats
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
            comm=self.comm if batch_stats else LOCAL,
            unbiased_running_var=self._unbiased_running_var and update,
            num_batches_tracked=int(self._num_batches_tracked),
            sync_state=self._sync_state,
            param_dtype=self._dtype,
            inplace_running_stats=True,  # GPU: the live arrays, no allocation
        )
        if update and res.updated:
            object.__setattr__(self, "_mean", res.running_mean)
            object.__setattr__(self, "_variance", res.running_var)
            object.__setattr__(
                self, "_num_batches_tracked", np.asarray(self._num_batches_tracked + 1)
            )
        self._ctx = res.ctx
        return res.y

    def backward(self, dy: Any) -> Any:
        """Input gradient of the last forward; accumulates parameter gradients.

        Returns
        -------
        dx : array
            Same shape and dtype as the last forward's input.

        Raises
        ------
        ValueError
            If no forward ran since the layer was built or loaded, or ``dy``
            does not match the forward's input.
        """
        if self._ctx is None:
            raise ValueError(
                f"{type(self).__name__}.backward(dy) called before forward(x): run a"
                " forward pass first"
            )
        need = self.weight.trainable or self.bias.trainable
        gw, gb = self.weight.grad, self.bias.grad
        acc = (gw, gb) if self.weight.trainable and self.bias.trainable else None
        dx, dweight, dbias = F.batch_norm_backward(
            dy, self._ctx, need_param_grads=need, accumulate_into=acc
        )
        if need:  # the GPU path may have added to .grad in place already
            if dweight is not gw:
                self.weight.accumulate_grad(dweight)
            if dbias is not gb:
                self.bias.accumulate_grad(dbias)
        return dx


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
    ) -> None:
        super().__init__(
            num_features, momentum, epsilon, weight_attr, bias_attr,
            self._default_format if data_format is None else data_format,
            use_global_stats, name, track_running_stats=track_running_stats,
            unbiased_running_var=unbiased_running_var, dtype=dtype,
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

    Notes
    -----
    The positional order after ``num_features`` is Paddle's ``BatchNorm1D``
    order (``momentum`` before ``epsilon``); ``SyncBatchNorm`` has Paddle's
    ``SyncBatchNorm`` order (``epsilon`` first). Prefer keywords.
    """

    _formats = ("NC", "NCL", "NLC")
    _default_format = "NCL"


class BatchNorm2D(_LocalBatchNorm):
    """Local batch norm over ``(N, C, H, W)`` or ``(N, H, W, C)`` inputs.

    Same parameters as :class:`BatchNorm1D`, with ``data_format`` in
    ``{'NCHW', 'NHWC'}`` (default ``'NCHW'``).
    """

    _formats = ("NCHW", "NHWC")
    _default_format = "NCHW"


class BatchNorm3D(_LocalBatchNorm):
    """Local batch norm over ``(N, C, D, H, W)`` or ``(N, D, H, W, C)`` inputs.

    Same parameters as :class:`BatchNorm1D`, with ``data_format`` in
    ``{'NCDHW', 'NDHWC'}`` (default ``'NCDHW'``).
    """

    _formats = ("NCDHW", "NDHWC")
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
        ``NC, NCL, NCHW, NCDHW`` (channels on axis 1) or ``NLC, NHWC, NDHWC``
        (channels last). The input's rank must match (``NC``/``NCL``/``NLC``
        accept 2-D and 3-D inputs).
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
    ) -> None:
        super().__init__(
            num_features, momentum, epsilon, weight_attr, bias_attr, data_format,
            None, name, track_running_stats=track_running_stats,
            unbiased_running_var=unbiased_running_var, dtype=dtype, comm=comm,
        )

    @classmethod
    def convert_sync_batchnorm(cls, layer: Layer, comm: Any = None) -> Layer:
        """Replace every local ``BatchNorm1D/2D/3D`` in ``layer`` by a ``SyncBatchNorm``.

        Keeps ``data_format``, ``epsilon``, ``momentum``, the running-stats
        options, the dtype and the training flag, and copies the weight, bias
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
