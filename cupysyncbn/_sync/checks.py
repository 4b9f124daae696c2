"""Every check of a forward or backward call, in one pass, without leaving peers waiting.

A check that raises *before* its rank joins the collective leaves the other
ranks blocked in it until the watchdog ends the job. So the functional API
does not raise from these checks directly: :func:`check_forward_arguments`
returns the error as ``(kind, exception)`` (``kind`` names a header error
slot, see :mod:`.protocol`), and :func:`check_forward` joins the collective
with that slot set (:mod:`.collective`), then raises. Every rank raises: the
faulty one its own ``ValueError``/``TypeError``, the others
:class:`~cupysyncbn.errors.RemoteInputError`.

:func:`check_forward` resolves the backend once and returns a
:class:`Verdict`; a layer's state remembers the last verdict, so a NumPy call
with the same array kinds, shapes, dtypes, vectors and scalars skips the
checks (:func:`call_key`). :func:`check_backward` checks ``dy``.
"""

from __future__ import annotations

import numbers
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..arrays.dtypes import check_input_dtype, compute_dtype
from ..arrays.formats import DataFormat, format_for_ndim, parse_data_format
from ..backends import Backend, get_backend, is_cupy_array
from ..comm.base import Communicator
from ..modes import eval_is_counted
from ..runtime import env
from . import collective
from .state import ForwardContext, SyncState

__all__ = [
    "ArgumentCheck", "Verdict", "check_epsilon", "check_forward", "check_forward_arguments",
    "check_momentum", "check_act", "check_backward", "call_key", "check_reproducible",
    "ACTIVATIONS", "REPRO_ACT",
]

#: Values of ``act`` (the activation fused into the normalize pass).
ACTIVATIONS = (None, "relu")

#: ``act`` with ``reproducible=True``: the reproducible mode's canonical
#: elementwise formulas have no activation (yet).
REPRO_ACT = (
    "act='relu' cannot be combined with reproducible=True (the reproducible mode's"
    " canonical passes have no fused activation yet): apply the ReLU after the layer"
)

_VECTORS = ("weight", "bias", "running_mean", "running_var")


@dataclass
class ArgumentCheck:
    """Outcome of :func:`check_forward_arguments`.

    Attributes
    ----------
    error : tuple (kind, exception) or None
        The first invalid argument found, with its header error slot.
    fmt : DataFormat or None
        The parsed ``data_format`` (None when it is the invalid argument).
    backend : Backend or None
        The array backend of ``x`` (or of the parameters when ``x`` is not an
        array); None when nothing is an array.
    num_features : int or None
        The channel count the parameters give (None without parameters).
    param : array or None
        The first given parameter vector (fixes the layer's device and dtype).
    """

    error: tuple | None
    fmt: DataFormat | None
    backend: Backend | None
    num_features: int | None
    param: Any


def _backend_of(x: Any, vectors: dict) -> tuple[Backend | None, TypeError | None]:
    try:
        return get_backend(x, "x"), None
    except TypeError as e:
        err = e
    for v in vectors.values():
        try:
            return get_backend(v), err
        except TypeError:
            continue
    return None, err


def check_momentum(momentum: Any) -> float | None:
    """``momentum`` as a float in [0, 1], or None.

    Raises
    ------
    TypeError, ValueError
        Naming ``momentum``.
    """
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a float in [0, 1] or None; got {momentum!r}")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] or None; got {momentum}")
    return float(momentum)


def check_reproducible(reproducible: Any) -> bool:
    """``reproducible`` as a bool; None: ``CUPYSYNCBN_REPRODUCIBLE`` (default False).

    Raises
    ------
    TypeError
        Naming ``reproducible``, for anything but None, a bool or a NumPy bool.
    ValueError
        For a ``CUPYSYNCBN_REPRODUCIBLE`` that is neither true nor false.
    """
    if reproducible is None:
        return env.flag(env.REPRODUCIBLE_ENV)
    if not isinstance(reproducible, (bool, np.bool_)):
        raise TypeError(f"reproducible must be a bool or None; got {reproducible!r}")
    return bool(reproducible)


def check_epsilon(epsilon: Any) -> float:
    """``epsilon`` as a float >= 0.

    Raises
    ------
    TypeError, ValueError
        Naming ``epsilon``.
    """
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
        raise TypeError(f"epsilon must be a float >= 0; got {epsilon!r}")
    if not float(epsilon) >= 0.0:
        raise ValueError(f"epsilon must be >= 0; got {epsilon}")
    return float(epsilon)


def check_act(act: Any) -> str | None:
    """``act`` as given: None or ``"relu"``.

    Raises
    ------
    ValueError
        Naming ``act`` and the accepted values.
    """
    if act is None or (type(act) is str and act == "relu"):
        return act
    raise ValueError(f"act must be None or 'relu' (fused ReLU); got {act!r}")


def check_forward_arguments(
    x: Any,
    data_format: Any,
    momentum: Any,
    epsilon: Any,
    act: Any = None,
    **vectors: Any,
) -> ArgumentCheck:
    """Check everything of a forward call that can differ between ranks.

    ``vectors`` are ``weight``, ``bias``, ``running_mean``, ``running_var``
    (``None`` where absent). ``x``'s dtype, number of dimensions, channel
    count and device are checked later, once its format is known
    (:func:`validate_input`); here only what would
    otherwise raise before the collective: ``x`` not an array, vectors of
    the wrong kind or shape, ``momentum``, ``epsilon`` and ``data_format``.
    """
    given = {k: v for k, v in vectors.items() if v is not None}
    backend, x_error = _backend_of(x, given)
    nf = None
    param = None
    fmt = None

    def done(kind: str | None, exc: BaseException | None) -> ArgumentCheck:
        return ArgumentCheck(None if kind is None else (kind, exc), fmt, backend, nf, param)

    for name in _VECTORS:  # the channel count, from the first usable vector
        shape = getattr(given.get(name), "shape", None)
        if shape is not None and len(shape) == 1:
            nf = int(shape[0])
            break
    try:
        fmt = parse_data_format(data_format)
    except (TypeError, ValueError) as e:
        return done("argument", e)
    if x_error is not None or backend is None:
        return done("type", x_error)
    for name, v in given.items():
        if not backend.owns(v):
            kind = f"{type(v).__module__.split('.')[0]}.{type(v).__name__}"
            return done("argument", TypeError(  # name both libraries: the usual cause
                # is a layer on the other device than the input (set_device('auto')
                # puts layers on GPUs)
                f"{name} must be a {backend.name} array like x; got {kind} (move the"
                " layer with .to('cpu') / .to('cuda'), or pass arrays of its library)"
            ))
        if v.ndim != 1 or (nf is not None and v.shape[0] != nf):
            want = f"({nf},)" if nf is not None else "(C,)"
            return done("argument", ValueError(
                f"{name} must have shape {want}; got {tuple(v.shape)}"
            ))
    param = next((given[k] for k in ("weight", "bias", "running_mean") if k in given), None)
    if ("running_mean" in given) != ("running_var" in given):
        return done("argument", ValueError(
            "running_mean and running_var must be given together"
        ))
    try:
        check_momentum(momentum)
        check_epsilon(epsilon)
        check_act(act)
    except (TypeError, ValueError) as e:
        return done("argument", e)
    return done(None, None)


@dataclass(frozen=True)
class Verdict:
    """What the checks of a forward found: everything the pass needs to know.

    Attributes
    ----------
    fmt : DataFormat
        ``data_format`` resolved for ``x``'s number of dimensions.
    backend : Backend
        The array backend of the pass (resolved once, here).
    nf : int
        Number of channels.
    param_dtype, cdt : numpy.dtype
        The layer's dtype and the compute dtype of the statistics.
    """

    fmt: DataFormat
    backend: Backend
    nf: int
    param_dtype: np.dtype
    cdt: np.dtype


def validate_input(
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


def call_key(
    state: SyncState | None, x: Any, data_format: Any, momentum: Any, epsilon: Any,
    vectors: tuple, param_dtype: Any, act: Any = None,
) -> tuple | None:
    """What the checks of a forward depend on, or None where no memo applies.

    Equal keys mean equal verdicts: the checks look at ``x``'s library, dtype
    and shape, the scalar arguments with their types (``True`` is not a
    momentum), and each vector's library, shape and dtype, never at values;
    for CuPy arrays also at the device of ``x`` and of each vector. Only for
    a layer's state and plain NumPy or CuPy arrays (no subclasses).
    """
    if state is None or type(data_format) not in _FORMATS:
        return None
    tx = type(x)
    cupy = tx is not np.ndarray
    if cupy and not (is_cupy_array(x) and tx is getattr(sys.modules.get("cupy"), "ndarray", 0)):
        return None
    if type(momentum) not in _SCALARS or type(epsilon) not in _SCALARS:
        return None
    if act is not None and type(act) is not str:
        return None
    key = [x.dtype, x.shape, data_format, type(momentum), momentum, type(epsilon), epsilon,
           param_dtype, get_backend(x), act, x.device.id if cupy else None]
    for v in vectors:
        if v is None:
            key += (None, None)
        elif type(v) is tx:
            key += (v.shape, v.dtype, v.device.id) if cupy else (v.shape, v.dtype)
        else:
            return None
    return tuple(key)


_SCALARS = (float, int, type(None))
_FORMATS = (str, DataFormat)


def count_eval(state: SyncState | None, batch_stats: bool) -> None:
    """Count an eval-mode forward (see ``SyncState.evals``)."""
    if not batch_stats and state is not None and eval_is_counted():
        # A rank in eval mode while the others train is caught at the
        # layer's next synchronized pass (protocol "evals").
        state.evals += 1


def check_forward(
    comm: Communicator, state: SyncState | None, x: Any, data_format: Any, momentum: Any,
    epsilon: Any, vectors: tuple, param_dtype: Any, batch_stats: bool, sync: bool,
    act: Any = None,
) -> Verdict:
    """Check a forward's arguments (or reuse the state's memo); the :class:`Verdict`.

    A rank whose arguments fail joins the peers' collective with an error
    slot set, then raises; without a collective it raises at once.
    """
    key = call_key(state, x, data_format, momentum, epsilon, vectors, param_dtype, act)
    if key is not None:
        assert state is not None
        verdict = state.memo(key)
        if verdict is not None:
            count_eval(state, batch_stats)
            return verdict
    verdict = _check_call(comm, state, x, data_format, momentum, epsilon, vectors,
                          param_dtype, batch_stats, sync, act)
    if key is not None:
        assert state is not None
        state.remember(key, verdict)
    return verdict


def _check_call(
    comm: Communicator, state: SyncState | None, x: Any, data_format: Any, momentum: Any,
    epsilon: Any, vectors: tuple, param_dtype: Any, batch_stats: bool, sync: bool,
    act: Any = None,
) -> Verdict:
    weight, bias, running_mean, running_var = vectors
    chk = check_forward_arguments(
        x, data_format, momentum, epsilon, act,
        weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
    )
    if chk.error is not None:
        if not sync:
            raise chk.error[1]
        collective.forward_invalid(
            comm, chk.backend or collective.fallback_backend(comm, state), state,
            chk.num_features, chk.error,
        )
    fmt, backend, nf, param = chk.fmt, chk.backend, chk.num_features, chk.param
    assert fmt is not None and backend is not None  # no error: both resolved
    if param_dtype is None:
        param_dtype = param.dtype if param is not None else np.float32
    param_dtype = np.dtype(param_dtype)
    count_eval(state, batch_stats)
    kind, info = validate_input(x, fmt, nf, backend, param)
    if kind is not None:
        assert isinstance(info, BaseException)
        if not sync:
            raise info
        collective.forward_invalid(comm, backend, state, nf, (kind, info))
    fmt_x: DataFormat = info  # type: ignore[assignment]
    nf = x.shape[fmt_x.channel_axis] if nf is None else nf
    cdt = compute_dtype(np.dtype(x.dtype), param_dtype)
    return Verdict(fmt_x, backend, nf, param_dtype, cdt)


def check_backward(dy: Any, ctx: ForwardContext, nf: int, sync: bool) -> None:
    """Check ``dy`` against the forward; on failure join the peers' backward, then raise.

    Raises
    ------
    TypeError, ValueError
        ``dy`` of another library, shape, dtype or device than the forward input.
    """
    backend = ctx.backend
    err: tuple | None = None
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
    if err is None:
        return
    if sync:
        collective.backward_invalid(ctx.comm, backend, ctx.sync_state, nf, err)
    raise err[1]
