"""Synchronized batch normalization as pure functions of arrays.

This is the math of the package; the layers in :mod:`cupysyncbn.norm` only hold
state and call these functions. Nothing here mutates its inputs: the forward
returns the new running statistics and the layer decides to store them.

Data flow of a training forward::

    validate -> backend.moments (local mean, M2) -> pack shifted sums
             -> ONE comm.allreduce_sum -> merge (float64) -> backend.normalize

and of a training backward::

    backend.backward_reduce (local sums) -> ONE comm.allreduce_sum
             -> backend.backward_elemt

The merge (why it is exact and stable)
--------------------------------------
Rank ``r`` holds ``n_r`` elements per channel with mean ``m_r`` and centered
sum of squares ``M2_r`` (two-pass, stable). Against a shift ``K`` that every
rank knows bitwise-identically, it sends ``S_r = n_r (m_r - K)`` and
``Q_r = M2_r + n_r (m_r - K)^2``. After the sum all-reduce::

    mean = K + S / N,    M2 = Q - S^2 / N,    var = M2 / N

which is exact in exact arithmetic for any ``K``; rounding error is
``eps64 * (mean - K)^2 / var`` relative, negligible when ``K`` is near the
mean. With a :class:`SyncState` (the layers keep one) ``K`` is the previous
step's global mean, and the first step runs one extra all-reduce that
computes the global mean first. Without a state every call runs the
handshake, the mean pass and the statistics pass (three all-reduces), so the
functional API is exact by default.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import fused_passes, protocol
from .backends import Backend, get_backend
from .comm import as_communicator
from .comm.base import Communicator
from .dtypes import check_input_dtype, compute_dtype, to_native
from .formats import DataFormat, canonical_view, format_for_ndim
from .interop.dlpack import accepts_dlpack
from .validation import check_forward_arguments, fallback_backend

__all__ = [
    "SyncState",
    "ForwardContext",
    "ForwardResult",
    "batch_norm_forward",
    "batch_norm_backward",
    "running_stats_update",
    "fail_collectively",
]

_F64 = np.dtype(np.float64)
_F32 = np.dtype(np.float32)


@dataclass
class SyncState:
    """Per-layer state that makes the synchronized passes cheap.

    Holds the shift ``K`` of the merge (the previous global batch mean), whether
    the ``num_features`` handshake has been done, and reusable communication
    buffers. It never affects results beyond rounding: passing ``None`` instead
    gives the same values with more collectives.
    """

    shift: Any = None
    handshake_done: bool = False
    layer_id: int = 0  # agreed at the handshake (see protocol.next_layer_id)
    calls: int = 0  # synchronized passes run so far (sent in the header)
    evals: int = 0  # eval-mode forwards run so far (sent in the header)
    #: Order of construction (protocol.next_construction_ordinal): names the
    #: same layer on every rank, computed without communication. The layers
    #: set it; 0 (a bare functional-API state) leaves only the order of
    #: first synchronization to tell layers apart.
    ordinal: int = 0
    ident: int = 0  # protocol.layer_identity, fixed at the handshake
    num_features: int | None = None  # fixed at the handshake
    _buffers: dict = field(default_factory=dict, repr=False)
    #: ``(key, verdict)`` of the last forward whose checks passed (see
    #: ``_call_key``): a steady-state pass skips them.
    _checked: Any = field(default=None, repr=False)

    def buffer(self, backend: Backend, size: int) -> Any:
        """A reusable float64 buffer of ``size`` slots on ``backend``."""
        key = (backend.name, size, _device_key(backend))
        buf = self._buffers.get(key)
        if buf is None:
            buf = backend.xp.empty(size, dtype=_F64)
            self._buffers[key] = buf
        return buf

    def reset(self) -> None:
        """Forget the shift, the handshake and the buffers (e.g. after ``to()``)."""
        self.shift = None
        self.handshake_done = False
        self.layer_id = 0
        self.calls = 0
        self.evals = 0
        self.ident = 0
        self.num_features = None
        self._buffers.clear()
        self._checked = None


def _device_key(backend: Backend) -> Any:
    if backend.name == "numpy":
        return None
    return backend.xp.cuda.Device().id


@dataclass
class ForwardContext:
    """What :func:`batch_norm_backward` needs from the forward pass."""

    x: Any  # canonical, contiguous view of the input
    shape: tuple
    dtype: np.dtype
    fmt: DataFormat
    backend: Backend
    comm: Communicator
    mean: Any  # per-channel, compute dtype
    invstd: Any  # per-channel, compute dtype
    weight: Any  # per-channel, compute dtype, or None (weight fixed at 1)
    count: int  # global elements per channel
    batch_stats: bool  # True: training statistics (backward syncs)
    param_dtype: np.dtype
    sync_state: SyncState | None
    #: Fused (GPU) path: ``(stats64, statc, weight)`` the backward kernels read
    #: (float64 mean/var/count, compute-dtype mean/invstd, the live weight).
    fused: Any = None


@dataclass
class ForwardResult:
    """Outputs of :func:`batch_norm_forward`.

    Attributes
    ----------
    y : array
        Normalized output, same shape and dtype as the input.
    ctx : ForwardContext
        Pass to :func:`batch_norm_backward`.
    running_mean, running_var : array or None
        Updated running statistics (new arrays), or the inputs unchanged when
        no update happened (eval mode, empty global batch, no running stats).
    batch_mean, batch_var : array or None
        Global batch statistics in float64 (biased variance); None in eval.
    count : int or 0-d device array
        Global number of elements per channel (0 in eval mode). On the fused
        GPU path it stays on the device (``int(count)`` synchronizes).
    updated : bool
        Whether the running statistics were updated. On the fused GPU path:
        whether an update was requested; the device leaves them unchanged for
        an empty global batch.
    """

    y: Any
    ctx: ForwardContext
    running_mean: Any
    running_var: Any
    batch_mean: Any = None
    batch_var: Any = None
    count: int = 0
    updated: bool = False


def _validate_input(
    x: Any, fmt: DataFormat, num_features: int | None, backend: Backend, param: Any
) -> tuple[str, BaseException] | tuple[None, DataFormat]:
    """Check ``x``; return ``(None, fmt_for_x)`` or ``(kind, exception)``."""
    try:
        check_input_dtype(x, "x")
    except TypeError as e:
        return "dtype", e
    f = format_for_ndim(fmt, x.ndim)
    if f is None:
        return "ndim", ValueError(
            f"x must have 2 to 5 dimensions for data_format={fmt.name!r} (channels on"
            f" axis {'1' if fmt.channels_first_name else '-1'}); got shape {tuple(x.shape)}"
        )
    c = x.shape[f.channel_axis]
    if num_features is not None and c != num_features:
        return "channels", ValueError(
            f"x has {c} channels on axis {f.channel_axis} (data_format={fmt.name!r})"
            f" but num_features is {num_features}"
        )
    if param is not None:
        if not backend.owns(param):
            return "device", TypeError(
                f"x is a {backend.name} array but the parameters are"
                f" {type(param).__module__}.{type(param).__name__}; move the layer"
                " with .to(device) or pass arrays of the same library"
            )
        dx, dp = backend.device_of(x), backend.device_of(param)
        if dx != dp:
            return "device", ValueError(f"x is on {dx} but the parameters are on {dp}")
    return None, f


def _vec(backend: Backend, v: Any, cdt: np.dtype) -> Any:
    return None if v is None else v.astype(cdt, copy=False)


def _allreduce(
    comm: Communicator,
    backend: Backend,
    state: SyncState | None,
    payload: list,
    count: int,
    phase: int,
    error: tuple | None,
    num_features: int,
) -> tuple[int, list]:
    """Pack header + payload vectors, all-reduce once, check; the reduced vectors (views)."""
    c = num_features
    size = protocol.HEADER + c * len(payload)
    buf = state.buffer(backend, size) if state is not None else backend.xp.empty(size, _F64)
    kind, exc = error if error is not None else (None, None)
    layer, call, ident, evals = (
        (0, 0, 0, 0) if state is None
        else (state.layer_id, state.calls, state.ident, state.evals)
    )
    if state is not None:
        state.calls += 1
    protocol.fill_header(buf, count, phase, kind, c, layer, call, ident, evals)
    for i, vec in enumerate(payload):
        seg = buf[protocol.HEADER + i * c : protocol.HEADER + (i + 1) * c]
        if vec is None:
            seg[...] = 0
        else:
            seg[...] = vec
    buf = comm.allreduce_sum(buf)
    head = backend.to_host(buf[: protocol.HEADER])
    total = protocol.check_header(head, phase, comm.size, exc)
    # Views of the reduced buffer: every caller consumes them before the
    # layer's next pass reuses it.
    h = protocol.HEADER
    out = [buf[h + i * c : h + (i + 1) * c] for i in range(len(payload))]
    return total, out


def running_stats_update(
    running_mean: Any,
    running_var: Any,
    batch_mean: Any,
    batch_var: Any,
    count: int,
    momentum: float | None,
    unbiased_running_var: bool = False,
    num_batches_tracked: int = 0,
) -> tuple[Any, Any]:
    """New running statistics (Paddle convention), as new arrays.

    ``new = old * momentum + batch * (1 - momentum)``; ``momentum=None`` gives
    the cumulative average over ``num_batches_tracked + 1`` batches. With
    ``unbiased_running_var`` the variance stored is ``var * m / (m - 1)``.

    Raises
    ------
    ValueError
        ``unbiased_running_var`` with a global ``count`` of 1.
    """
    return get_backend(running_mean, "running_mean").running_update(
        running_mean, running_var, batch_mean, batch_var, count, momentum,
        unbiased_running_var, num_batches_tracked,
    )


def _quiet_fp(fn: Any) -> Any:
    """Run ``fn`` with NumPy's floating-point warnings off.

    NaN/Inf in the input propagate to the outputs of their own channels only;
    NumPy's ``invalid value`` warnings about them (errors under
    ``np.seterr(all='raise')`` or ``-W error``) would turn that into a crash.
    """

    @functools.wraps(fn)
    def inner(*args: Any, **kwargs: Any) -> Any:
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    return inner


@accepts_dlpack("x", "weight", "bias", "running_mean", "running_var")
@_quiet_fp
def batch_norm_forward(
    x: Any,
    weight: Any = None,
    bias: Any = None,
    running_mean: Any = None,
    running_var: Any = None,
    *,
    training: bool = True,
    momentum: float | None = 0.9,
    epsilon: float = 1e-5,
    data_format: str = "NCHW",
    comm: Any = None,
    unbiased_running_var: bool = False,
    num_batches_tracked: int = 0,
    sync_state: SyncState | None = None,
    param_dtype: Any = None,
    inplace_running_stats: bool = False,
) -> ForwardResult:
    """Synchronized batch-norm forward.

    Parameters
    ----------
    x : numpy.ndarray or cupy.ndarray
        Local part of the global batch, in ``data_format``. May be empty along
        the batch axis; may be non-contiguous.
        Any array implementing ``__dlpack__`` (PyTorch, JAX, ...) is accepted
        too, zero-copy; the outputs are then arrays of ``x``'s library
        (:mod:`cupysyncbn.interop.dlpack`).
    weight, bias : array of shape (C,), optional
        Affine parameters; ``None`` means weight 1 / bias 0.
    running_mean, running_var : array of shape (C,), optional
        Running statistics. Used for normalization when ``training`` is False;
        updated (returned as new arrays) when ``training`` is True.
    training : bool
        Batch statistics (synchronized) when True, or when no running
        statistics are given; running statistics otherwise.
    momentum : float or None
        Paddle convention: ``new = old * momentum + batch * (1 - momentum)``.
        ``None`` means a cumulative average over ``num_batches_tracked + 1``.
    epsilon : float
        Added to the variance.
    data_format : str
        ``NC, NCL, NCHW, NCDHW, NLC, NHWC, NDHWC``.
    comm : Communicator, mpi4py.MPI.Comm or None
        Group to synchronize over; ``None`` is the default communicator
        (:func:`cupysyncbn.init`), which is one process unless launched by
        ``mpiexec``.
    unbiased_running_var : bool
        Store ``var * m/(m-1)`` in the running variance (PyTorch convention).
    num_batches_tracked : int
        Batches seen so far (for ``momentum=None``).
    sync_state : SyncState, optional
        Makes the steady state one all-reduce per pass (see module docs).
    param_dtype : dtype, optional
        Dtype of the layer (float64 switches the math to float64). Defaults to
        the dtype of ``weight``/``running_mean`` or float32.
    inplace_running_stats : bool
        On the fused GPU path, update ``running_mean``/``running_var`` in place
        (what a layer wants: no allocation, CUDA-graph safe) instead of
        returning new arrays.

    Returns
    -------
    ForwardResult

    Raises
    ------
    ValueError, TypeError
        For invalid inputs, naming the argument (on every rank of the group:
        the faulty rank raises the specific error, the others
        :class:`~cupysyncbn.errors.RemoteInputError`).
    """
    comm_ = as_communicator(comm)
    x, weight, bias, running_mean, running_var = map(
        to_native, (x, weight, bias, running_mean, running_var)
    )
    batch_stats = training or running_mean is None
    sync = batch_stats and comm_.synchronizes
    vectors = (weight, bias, running_mean, running_var)
    key = _call_key(sync_state, x, data_format, momentum, epsilon, vectors, param_dtype)
    checked = sync_state._checked if key is not None else None
    if checked is not None and checked[0] == key:
        fmt_x, backend, nf, param_dtype, cdt = checked[1]
        _count_eval(sync_state, batch_stats)
    else:
        fmt_x, backend, nf, param_dtype, cdt = _check_call(
            comm_, sync_state, x, data_format, momentum, epsilon, vectors, param_dtype,
            batch_stats, sync,
        )
        if key is not None:
            sync_state._checked = (key, (fmt_x, backend, nf, param_dtype, cdt))
    xc = backend.ascontiguous(x)
    v = canonical_view(xc, fmt_x)
    n_local = v.size // nf if nf else 0

    if _fused_ok(backend, param_dtype, weight, bias, running_mean, running_var):
        return _forward_fused(
            backend, comm_, sync_state, x, v, fmt_x, nf, n_local, cdt, param_dtype,
            (weight, bias, running_mean, running_var), training, batch_stats, momentum,
            epsilon, unbiased_running_var, num_batches_tracked, sync, inplace_running_stats,
        )

    if not batch_stats:
        mean = _vec(backend, running_mean, cdt)
        invstd = backend.running_invstd(running_var, epsilon, cdt)
        y = _affine_normalize(backend, v, fmt_x, mean, invstd, weight, bias, cdt, x)
        ctx = ForwardContext(
            v, tuple(x.shape), np.dtype(x.dtype), fmt_x, backend, comm_, mean, invstd,
            _vec(backend, weight, cdt), 0, False, param_dtype, sync_state,
        )
        return ForwardResult(y.reshape(x.shape), ctx, running_mean, running_var)

    if sync:
        _handshake(comm_, backend, sync_state, nf, param_dtype)

    if n_local:
        mean_r, m2_r = backend.moments(v, fmt_x.channel_last, cdt)
    else:
        mean_r = m2_r = None
    count, mean, var = _global_stats(comm_, backend, sync_state, nf, n_local, mean_r, m2_r)

    new_rm, new_rv, updated = running_mean, running_var, False
    if running_mean is not None and training and count > 0:
        new_rm, new_rv = backend.running_update(
            running_mean, running_var, mean, var, count, momentum,
            unbiased_running_var, num_batches_tracked,
        )
        updated = True
    mean_c, invstd = backend.forward_coefficients(mean, var, count, epsilon, cdt)
    y = _affine_normalize(backend, v, fmt_x, mean_c, invstd, weight, bias, cdt, x)
    ctx = ForwardContext(
        v, tuple(x.shape), np.dtype(x.dtype), fmt_x, backend, comm_, mean_c, invstd,
        _vec(backend, weight, cdt), count, True, param_dtype, sync_state,
    )
    return ForwardResult(
        y.reshape(x.shape), ctx, new_rm, new_rv, mean, var, count, updated
    )


def _call_key(
    state: SyncState | None, x: Any, data_format: Any, momentum: Any, epsilon: Any,
    vectors: tuple, param_dtype: Any,
) -> tuple | None:
    """What the checks of a forward depend on, or None where no memo applies.

    Equal keys mean equal verdicts: the checks look at ``x``'s library, dtype
    and shape, the scalar arguments with their types (``True`` is not a
    momentum), and each vector's library, shape and dtype, never at values.
    Only for NumPy arrays and a layer's state (the CPU passes, where these
    checks cost a small layer's step several percent).
    """
    if state is None or type(x) is not np.ndarray or type(data_format) not in _FORMATS:
        return None
    if type(momentum) not in _SCALARS or type(epsilon) not in _SCALARS:
        return None
    key = [x.dtype, x.shape, data_format, type(momentum), momentum, type(epsilon), epsilon,
           param_dtype, get_backend(x)]
    for v in vectors:
        if v is None:
            key += (None, None)
        elif type(v) is np.ndarray:
            key += (v.shape, v.dtype)
        else:
            return None
    return tuple(key)


_SCALARS = (float, int, type(None))
_FORMATS = (str, DataFormat)


def _count_eval(state: SyncState | None, batch_stats: bool) -> None:
    """Count an eval-mode forward (see ``SyncState.evals``)."""
    if not batch_stats and state is not None and protocol.eval_is_counted():
        # A rank in eval mode while the others train is caught at the
        # layer's next synchronized pass (protocol "evals").
        state.evals += 1


def _check_call(
    comm: Communicator, state: SyncState | None, x: Any, data_format: Any, momentum: Any,
    epsilon: Any, vectors: tuple, param_dtype: Any, batch_stats: bool, sync: bool,
) -> tuple[DataFormat, Backend, int, np.dtype, np.dtype]:
    """Check a forward's arguments; return ``(fmt, backend, nf, param_dtype, cdt)``.

    A rank whose arguments fail joins the peers' collective with an error
    slot set, then raises (validation.py); without a collective it raises at
    once.
    """
    weight, bias, running_mean, running_var = vectors
    chk = check_forward_arguments(
        x, data_format, momentum, epsilon,
        weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
    )
    if chk.error is not None:
        if not sync:
            raise chk.error[1]
        backend = chk.backend or fallback_backend(comm, state)
        _forward_invalid(comm, backend, state, chk.num_features, chk.error)
    fmt, backend, nf, param = chk.fmt, chk.backend, chk.num_features, chk.param
    if param_dtype is None:
        param_dtype = param.dtype if param is not None else np.float32
    param_dtype = np.dtype(param_dtype)
    _count_eval(state, batch_stats)
    kind, info = _validate_input(x, fmt, nf, backend, param)
    if kind is not None:
        if not sync:
            raise info
        _forward_invalid(comm, backend, state, nf, (kind, info))
    fmt_x: DataFormat = info
    nf = x.shape[fmt_x.channel_axis] if nf is None else nf
    return fmt_x, backend, nf, param_dtype, compute_dtype(np.dtype(x.dtype), param_dtype)


def _fused_ok(backend: Backend, param_dtype: np.dtype, *vectors: Any) -> bool:
    """Whether this pass can run on the backend's fused kernels."""
    if not getattr(backend, "fused", False) or param_dtype not in (_F32, _F64):
        return False
    return all(v is None or np.dtype(v.dtype) == param_dtype for v in vectors)


def _forward_fused(
    backend: Backend, comm: Communicator, state: SyncState | None, x: Any, v: Any,
    fmt: DataFormat, nf: int, n_local: int, cdt: np.dtype, pdt: np.dtype, vectors: tuple,
    training: bool, batch_stats: bool, momentum: float | None, epsilon: float,
    unbiased: bool, num_batches_tracked: int, sync: bool, inplace: bool,
) -> ForwardResult:
    """A forward on the fused kernels (see :mod:`cupysyncbn.fused_passes`)."""
    with x.device:
        y, stats64, statc, new_rm, new_rv, updated = fused_passes.forward(
            backend=backend, comm=comm, state=state, v=v, channel_last=fmt.channel_last,
            nf=nf, n_local=n_local, cdt=cdt, pdt=pdt, vectors=vectors, training=training,
            batch_stats=batch_stats, momentum=momentum, epsilon=float(epsilon),
            unbiased=unbiased, num_batches_tracked=num_batches_tracked, sync=sync,
            handshake=lambda: _handshake(comm, backend, state, nf, pdt), inplace=inplace,
        )
    weight = vectors[0]
    count = stats64[2 * nf] if batch_stats else 0
    ctx = ForwardContext(
        v, tuple(x.shape), np.dtype(x.dtype), fmt, backend, comm, statc[:nf], statc[nf:],
        weight, count, batch_stats, pdt, state, fused=(stats64, statc, weight),
    )
    if not batch_stats:
        return ForwardResult(y.reshape(x.shape), ctx, new_rm, new_rv)
    return ForwardResult(
        y.reshape(x.shape), ctx, new_rm, new_rv, stats64[:nf], stats64[nf : 2 * nf], count,
        updated,
    )


def _affine_normalize(
    backend: Backend, v: Any, fmt: DataFormat, mean: Any, invstd: Any,
    weight: Any, bias: Any, cdt: np.dtype, x: Any,
) -> Any:
    scale, b = backend.affine(invstd, weight, bias, cdt)
    if v.size == 0:
        return backend.xp.empty(v.shape, dtype=x.dtype)
    return backend.normalize(v, fmt.channel_last, mean, scale, b, np.dtype(x.dtype))


def _global_stats(
    comm: Communicator, backend: Backend, state: SyncState | None, nf: int,
    n_local: int, mean_r: Any, m2_r: Any,
) -> tuple[int, Any, Any]:
    """Merge per-rank (n, mean, M2) into global float64 mean and biased var."""
    if not comm.synchronizes:
        return (n_local, *backend.local_stats(n_local, mean_r, m2_r, nf))
    shift = state.shift if state is not None else None
    if shift is None or shift.shape[0] != nf:
        # Two C-sized vectors like every other pass of the layer: equal
        # buffer sizes let the header detect ranks running different passes.
        total, (s, _) = _allreduce(
            comm, backend, state, [None if mean_r is None else mean_r * n_local, None],
            n_local, protocol.PHASE_MEAN, None, nf,
        )
        shift = s / max(total, 1)
    payload = backend.shifted_sums(n_local, mean_r, m2_r, shift)
    total, (s, q) = _allreduce(
        comm, backend, state, payload, n_local, protocol.PHASE_STATS, None, nf
    )
    mean, var = backend.merge_sums(total, s, q, shift, nf)
    if total == 0:
        return 0, mean, var
    if state is not None:
        # A NaN/Inf mean (non-finite input) must not become the next steps'
        # shift, or one bad batch would poison the channel forever. The merge
        # is exact for any shift, so such channels shift by 0 instead; done on
        # the device, without a host read. ``mean`` is identical on every rank.
        state.shift = backend.next_shift(mean)
    return total, mean, var


def _handshake(
    comm: Communicator, backend: Backend, state: SyncState | None, nf: int | None,
    param_dtype: Any = None, error: tuple | None = None,
) -> None:
    """The layer's first synchronized pass (every pass without a state)."""
    if state is not None and state.handshake_done:
        return
    layer = protocol.next_layer_id(comm) if state is not None else 0
    ident = evals = 0
    if state is not None:
        ident = protocol.layer_identity(state.ordinal, param_dtype)
        evals = state.evals
    protocol.handshake(
        comm, nf or 0, lambda h: backend.asarray(h), backend.to_host, layer,
        ident, evals, error,
    )
    if state is not None:
        state.layer_id = layer
        state.ident = ident
        state.num_features = nf
        state.handshake_done = True


def fail_collectively(
    error: BaseException,
    kind: str = "other",
    *,
    comm: Any = None,
    sync_state: SyncState | None = None,
    num_features: int | None = None,
    backend: str | None = None,
) -> None:
    """Join the training forward the other ranks are in, then raise ``error``.

    For adapters and wrappers whose own checks fail before they call
    :func:`batch_norm_forward` (a tensor of the wrong rank, an object that is
    not a tensor): instead of leaving the other ranks waiting in the
    collective, this rank takes part with an error slot set, so every rank
    raises — this one ``error``, the others
    :class:`~cupysyncbn.errors.RemoteInputError` naming ``kind``.

    Parameters
    ----------
    error : BaseException
        Raised on this rank.
    kind : str
        One of :data:`cupysyncbn.protocol.ERROR_KINDS`.
    comm, sync_state, num_features
        What the layer would have passed to :func:`batch_norm_forward`.
    backend : {'numpy', 'cupy'}, optional
        Where the layer's buffers live (default: from ``sync_state``/``comm``).
    """
    comm_ = as_communicator(comm)
    if comm_.synchronizes:
        if backend == "cupy":
            from .backends.cupy_backend import get_cupy_backend

            be = get_cupy_backend()
        elif backend == "numpy":
            from .backends import NUMPY_BACKEND as be
        else:
            be = fallback_backend(comm_, sync_state)
        _forward_invalid(comm_, be, sync_state, num_features, (kind, error))
    raise error


def _forward_invalid(
    comm: Communicator, backend: Backend, state: SyncState | None, nf: int | None,
    error: tuple,
) -> ForwardResult:
    """Take part in the peers' collectives with a zero payload, then raise.

    The peers run the handshake first unless the layer's state has done it,
    so a rank that does not know the channel count (``x`` not an array, no
    parameters) still joins the right collective.
    """
    if state is None or not state.handshake_done:
        _handshake(comm, backend, state, nf, None, error)
    else:
        nf = state.num_features
        fused_passes.remember_own_error(state, backend, comm, nf, error[1])
        if state.shift is None or state.shift.shape[0] != nf:
            # the peers run the two-pass path: a mean pass first
            _allreduce(comm, backend, state, [None, None], 0, protocol.PHASE_MEAN, error, nf)
        _allreduce(comm, backend, state, [None, None], 0, protocol.PHASE_STATS, error, nf)
    raise error[1]  # pragma: no cover - the collective raised already


@accepts_dlpack("dy")
@_quiet_fp
def batch_norm_backward(
    dy: Any, ctx: ForwardContext, *, need_param_grads: bool = True,
    accumulate_into: tuple | None = None,
) -> tuple[Any, Any, Any]:
    """Synchronized batch-norm backward.

    Parameters
    ----------
    dy : array
        Gradient of the loss with respect to the forward's output: same shape
        and dtype as the forward input.
    ctx : ForwardContext
        From :func:`batch_norm_forward` (``result.ctx``).
    need_param_grads : bool
        Compute ``dweight``/``dbias`` (else they are None).
    accumulate_into : (array, array), optional
        Gradient accumulators ``(weight_grad, bias_grad)`` of the parameter
        dtype. Where the pass can (the fused GPU path), it adds the local
        gradients to them in place (no temporaries: CUDA-graph safe) and
        returns these same arrays as ``dweight, dbias``; otherwise it ignores
        them and returns new arrays, so callers test ``dweight is grad``.

    Returns
    -------
    dx : array
        Same shape and dtype as the forward input.
    dweight, dbias : array of shape (C,) in the parameter dtype, or None
        Gradients over the LOCAL batch (average them across ranks with
        :func:`cupysyncbn.allreduce_gradients` when you have no data-parallel
        wrapper).

    Notes
    -----
    Training mode (batch statistics)::

        dx = w * invstd * (dy - sum(dy)/m - xhat * sum(dy * xhat)/m)

    with both sums all-reduced over the group in one collective. Eval mode
    (running statistics): ``dx = dy * w * invstd``, no communication.
    """
    backend = ctx.backend
    nf = ctx.mean.shape[0]
    dy = to_native(dy)
    err = None
    if not backend.owns(dy):
        err = ("type", TypeError(
            f"dy must be a {backend.name} array like the forward input; got"
            f" {type(dy).__module__}.{type(dy).__name__}"
        ))
    elif tuple(dy.shape) != ctx.shape or np.dtype(dy.dtype) != ctx.dtype:
        err = ("shape", ValueError(
            f"dy must have the forward input's shape {ctx.shape} and dtype"
            f" {ctx.dtype.name}; got shape {tuple(dy.shape)} and dtype {np.dtype(dy.dtype).name}"
        ))
    elif backend.device_of(dy) != backend.device_of(ctx.x):
        err = ("device", ValueError(
            f"dy is on {backend.device_of(dy)} but the forward input was on"
            f" {backend.device_of(ctx.x)}"
        ))
    sync = ctx.batch_stats and ctx.comm.synchronizes
    if err is not None:
        if sync:
            fused_passes.remember_own_error(ctx.sync_state, backend, ctx.comm, nf, err[1])
            _allreduce(ctx.comm, backend, ctx.sync_state, [None, None], 0,
                       protocol.PHASE_BACKWARD, err, nf)
        raise err[1]
    dyv = canonical_view(backend.ascontiguous(dy), ctx.fmt)
    cl = ctx.fmt.channel_last
    n_local = ctx.x.size // nf if nf else 0
    xp = backend.xp
    if ctx.fused is not None:
        stats64, statc, weight = ctx.fused
        acc = accumulate_into
        if acc is not None and not (
            need_param_grads and all(
                g is not None and backend.owns(g) and g.shape == (nf,)
                and np.dtype(g.dtype) == ctx.param_dtype and g.flags.c_contiguous
                for g in acc)
        ):
            acc = None
        with dy.device:
            dx, dweight, dbias = fused_passes.backward(
                backend=backend, comm=ctx.comm, state=ctx.sync_state, dyv=dyv, x=ctx.x,
                channel_last=cl, nf=nf, n_local=n_local, stats64=stats64, statc=statc,
                weight=weight, pdt=ctx.param_dtype, batch_stats=ctx.batch_stats,
                need_param_grads=need_param_grads, sync=sync, accumulate_into=acc,
            )
        return dx.reshape(ctx.shape), dweight, dbias
    if n_local:
        sum_dy, sum_dy_xhat = backend.backward_reduce(dyv, ctx.x, cl, ctx.mean, ctx.invstd)
    else:
        sum_dy = sum_dy_xhat = None
    g_dy, g_dy_xhat = sum_dy, sum_dy_xhat
    if sync:
        _, (g_dy, g_dy_xhat) = _allreduce(
            ctx.comm, backend, ctx.sync_state, [sum_dy, sum_dy_xhat], n_local,
            protocol.PHASE_BACKWARD, None, nf,
        )
    a, mean_dy, b = backend.backward_coefficients(
        ctx.weight, ctx.invstd, g_dy, g_dy_xhat, ctx.count, ctx.batch_stats, ctx.mean.dtype
    )
    if n_local:
        dx = backend.backward_elemt(dyv, ctx.x, cl, ctx.mean, a, mean_dy, b, ctx.dtype)
        dx = dx.reshape(ctx.shape)
    else:
        dx = xp.empty(ctx.shape, dtype=ctx.dtype)
    if not need_param_grads:
        return dx, None, None
    pdt = ctx.param_dtype
    if sum_dy is None:
        dweight = xp.zeros(nf, dtype=pdt)
        dbias = xp.zeros(nf, dtype=pdt)
    else:
        dweight = sum_dy_xhat.astype(pdt)
        dbias = sum_dy.astype(pdt)
    return dx, dweight, dbias
