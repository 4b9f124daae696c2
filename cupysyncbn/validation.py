"""Argument checks that may fail on one rank alone, without leaving the others waiting.

A check that raises *before* its rank joins the collective leaves the other
ranks blocked in it until the watchdog ends the job. So the functional API
does not raise from these checks directly: :func:`check_forward_arguments`
returns the error as ``(kind, exception)`` (``kind`` names a header error
slot, see :mod:`cupysyncbn.protocol`), and the caller joins the collective
with that slot set, then raises. Every rank raises: the faulty one its own
``ValueError``/``TypeError``, the others
:class:`~cupysyncbn.errors.RemoteInputError`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

from .backends import Backend, get_backend
from .formats import DataFormat, parse_data_format

__all__ = [
    "ArgumentCheck", "check_epsilon", "check_forward_arguments", "check_momentum",
    "fallback_backend",
]

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


def check_forward_arguments(
    x: Any,
    data_format: Any,
    momentum: Any,
    epsilon: Any,
    **vectors: Any,
) -> ArgumentCheck:
    """Check everything of a forward call that can differ between ranks.

    ``vectors`` are ``weight``, ``bias``, ``running_mean``, ``running_var``
    (``None`` where absent). ``x``'s dtype, number of dimensions, channel
    count and device are checked later, once its format is known
    (:func:`cupysyncbn.functional._validate_input`); here only what would
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
    if x_error is not None:
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
    except (TypeError, ValueError) as e:
        return done("argument", e)
    return done(None, None)


def fallback_backend(comm: Any, state: Any) -> Backend:
    """Backend to join a collective with when no argument is an array.

    The layer's previous buffers tell where its collectives run; otherwise
    an NCCL communicator reduces CuPy buffers and every other one NumPy's.
    """
    from .backends import NUMPY_BACKEND

    names = {key[0] for key in getattr(state, "_buffers", {})}
    if "cupy" in names or (not names and getattr(comm, "backend", "") == "nccl"):
        from .backends.cupy_backend import get_cupy_backend

        return get_cupy_backend()
    return NUMPY_BACKEND
