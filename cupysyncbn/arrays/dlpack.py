"""DLPack at the edge of the functional API: any array in, the caller's arrays out.

:func:`cupysyncbn.functional.batch_norm_forward` and ``batch_norm_backward``
compute on NumPy (CPU) or CuPy (CUDA) arrays. Arrays of any other library that
implements the DLPack protocol (``__dlpack__`` / ``__dlpack_device__``: PyTorch,
JAX, TensorFlow tensors, ...) are imported here with ``numpy.from_dlpack`` or
``cupy.from_dlpack``, which share the memory (no copy), and the outputs are
exported back with the caller library's ``from_dlpack`` (again no copy where the
library allows it). NumPy and CuPy inputs never enter this module's conversion
path: :func:`accepts_dlpack` checks their type and calls straight through.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "is_native",
    "to_native",
    "from_native",
    "library_of",
    "accepts_dlpack",
]

# DLPack device types (dlpack.h, DLDeviceType).
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13


def _is_cupy(a: Any) -> bool:
    cp = sys.modules.get("cupy")
    return cp is not None and isinstance(a, cp.ndarray)


def is_native(a: Any) -> bool:
    """True for ``None``, NumPy and CuPy arrays: the types the math uses directly."""
    return a is None or isinstance(a, np.ndarray) or _is_cupy(a)


#: Exact types :func:`is_native` accepts without further tests.
_PLAIN = (np.ndarray, type(None))


def library_of(a: Any) -> str:
    """Top-level module name of ``a``'s type (``'torch'``, ``'jax'``, ``'numpy'``...)."""
    return (type(a).__module__ or "").split(".")[0]


def to_native(a: Any, argname: str = "x") -> Any:
    """View ``a`` as a NumPy (CPU) or CuPy (CUDA) array without copying.

    Parameters
    ----------
    a : array
        NumPy/CuPy arrays and ``None`` are returned as they are; anything with
        ``__dlpack__`` is imported zero-copy (a PyTorch tensor that requires
        grad is detached first: the math here is not traced by autograd).
    argname : str
        Name used in error messages.

    Returns
    -------
    numpy.ndarray or cupy.ndarray or None

    Raises
    ------
    TypeError
        If ``a`` is not an array, or its device or dtype cannot be imported
        (e.g. a CPU ``bfloat16`` tensor: NumPy has no bfloat16).
    """
    if is_native(a):
        return a
    if not hasattr(a, "__dlpack__"):
        raise TypeError(
            f"{argname} must be a numpy.ndarray, a cupy.ndarray or an array implementing"
            f" __dlpack__ (PyTorch, JAX, ...); got {type(a).__module__}.{type(a).__name__}"
        )
    if getattr(a, "requires_grad", False) and hasattr(a, "detach"):
        a = a.detach()  # torch refuses to export tensors that require grad
    dev_type = _dlpack_device_type(a, argname)
    try:
        if dev_type in (_DL_CPU, _DL_CUDA_HOST):
            return np.from_dlpack(a)
        if dev_type in (_DL_CUDA, _DL_CUDA_MANAGED):
            import cupy

            return cupy.from_dlpack(a)
    except (BufferError, TypeError, ValueError, RuntimeError) as e:
        dt = getattr(a, "dtype", "?")
        raise TypeError(
            f"{argname} ({type(a).__module__}.{type(a).__name__}, dtype {dt}) cannot be"
            f" imported through DLPack: {e}. Cast it to float16/float32/float64 first."
        ) from e
    raise TypeError(
        f"{argname} lives on DLPack device type {dev_type}; only CPU (NumPy) and CUDA"
        " (CuPy) arrays are supported"
    )


def _dlpack_device_type(a: Any, argname: str) -> int:
    dev = getattr(a, "__dlpack_device__", None)
    if dev is None:
        return _DL_CPU  # old exporters without __dlpack_device__ are CPU libraries
    try:
        return int(dev()[0])
    except Exception as e:  # pragma: no cover - exporter bug
        raise TypeError(f"{argname}.__dlpack_device__() failed: {e}") from e


def _importer(like: Any) -> Callable[[Any], Any] | None:
    """The ``from_dlpack`` of ``like``'s library, or None if it has none."""
    lib = library_of(like)
    mod = sys.modules.get(lib)
    if mod is None:
        return None
    if lib == "jax":
        import jax.numpy as jnp

        return jnp.from_dlpack
    if lib == "tensorflow":
        tf_from = mod.experimental.dlpack.from_dlpack
        return lambda arr: tf_from(arr.__dlpack__())  # TensorFlow takes a capsule
    fn = getattr(mod, "from_dlpack", None)
    return fn if callable(fn) else None


def from_native(a: Any, like: Any) -> Any:
    """Return native array ``a`` as an array of ``like``'s library (zero-copy when possible).

    Parameters
    ----------
    a : numpy.ndarray, cupy.ndarray or None
        A result of the math.
    like : array
        An input of the caller; its library decides the output type. Native
        ``like`` (NumPy/CuPy) returns ``a`` unchanged.

    Returns
    -------
    array or None
    """
    if a is None or is_native(like) or not (isinstance(a, np.ndarray) or _is_cupy(a)):
        return a
    fn = _importer(like)
    if fn is None:
        return a
    return fn(a)


def _convert_result(res: Any, like: Any) -> Any:
    """Convert the array fields of a result (tuple or dataclass) to ``like``'s library."""
    if isinstance(res, tuple):
        return tuple(from_native(v, like) for v in res)
    if dataclasses.is_dataclass(res):
        changes = {
            f.name: from_native(getattr(res, f.name), like)
            for f in dataclasses.fields(res)
            if isinstance(getattr(res, f.name), np.ndarray) or _is_cupy(getattr(res, f.name))
        }
        return dataclasses.replace(res, **changes)  # type: ignore[type-var]
    return from_native(res, like)


def _import_arg(a: Any, argname: str) -> Any:
    # Not an array at all: pass it through so the wrapped function rejects it
    # itself, after taking part in the collectives (raising here, before them,
    # would leave the other ranks waiting in the all-reduce).
    return a if not hasattr(a, "__dlpack__") else to_native(a, argname)


def accepts_dlpack(*array_args: str) -> Callable[[Callable], Callable]:
    """Decorator: let a function of NumPy/CuPy arrays take any DLPack array.

    Parameters
    ----------
    *array_args : str
        Names of the array parameters, in positional order; the first one
        decides the library of the outputs.

    Notes
    -----
    When every named argument is NumPy, CuPy or None the function is called
    unchanged (one ``isinstance`` per argument). Otherwise the foreign arrays
    are imported with :func:`to_native` and every array in the result (a
    tuple, a dataclass such as ``ForwardResult``, or one array) is exported
    back with :func:`from_native`, like the first named argument.
    """

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            npos = min(len(args), len(array_args))
            names_pos = array_args[:npos]
            # fast path, nothing to convert: a plain loop with an exact type
            # test first (a generator per call was a tenth of a small pass)
            for a in args[:npos]:
                if type(a) not in _PLAIN and not is_native(a):
                    break
            else:
                for n in array_args[npos:]:
                    a = kwargs.get(n)
                    if type(a) not in _PLAIN and not is_native(a):
                        break
                else:
                    return fn(*args, **kwargs)
            like = args[0] if npos else kwargs.get(array_args[0])
            args = tuple(
                _import_arg(a, names_pos[i]) if i < npos else a for i, a in enumerate(args)
            )
            for n in array_args[npos:]:
                if n in kwargs:
                    kwargs[n] = _import_arg(kwargs[n], n)
            return _convert_result(fn(*args, **kwargs), like)

        return inner

    return wrap
