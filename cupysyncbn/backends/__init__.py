"""Array backends: pick the implementation of the primitives for an array.

NumPy arrays go to the fused numba kernels of :mod:`.numba` when numba
is importable (the ``fast`` extra), else to :mod:`.numpy`; CuPy arrays
go to :mod:`.cupy` (RawKernels from the top-level ``kernels/``
folder). CuPy and numba are imported only when an array of theirs is first
seen, so ``import cupysyncbn`` stays light and the CPU path needs no CUDA.

``CUPYSYNCBN_CPU_BACKEND`` chooses the CPU backend: ``auto`` (default: numba
when importable, silently NumPy otherwise), ``numba`` (warns once if numba is
missing, then uses NumPy) or ``numpy`` (the reference implementation; opts
out of numba). Both give results within the same accuracy contract; the
NumPy backend stays the fallback and the reference the tests compare with.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from .. import _deprecated
from ..runtime.env import CPU_BACKEND_ENV, text
from .base import Backend
from .numpy import BACKEND as NUMPY_BACKEND

__all__ = [
    "Backend", "get_backend", "is_cupy_array", "cpu_backend", "NUMPY_BACKEND",
    "CPU_BACKEND_ENV", "CPU_CHOICES",
]

#: Accepted values of :data:`CPU_BACKEND_ENV`.
CPU_CHOICES = ("auto", "numba", "numpy")
_CPU: dict = {}  # choice -> backend, resolved (and warned about) once per choice
#: Top-level modules whose absence means "numba is simply not installed".
_NOT_INSTALLED = {"numba", "llvmlite"}


def _load_numba(choice: str) -> Backend:
    """The numba backend, or the NumPy backend (with a warning where one is due)."""
    try:
        from .numba.backend import BACKEND as backend
    except ImportError as e:
        missing = isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] in (
            _NOT_INSTALLED
        )
        if choice == "auto" and missing:
            return NUMPY_BACKEND  # the documented fallback: nothing to warn about
        why = "is not importable" if missing else "failed to import"
        warnings.warn(
            f"{CPU_BACKEND_ENV}={choice}: numba {why} ({type(e).__name__}: {e});"
            " using the NumPy backend (pip install 'cupysyncbn[fast]', or set"
            f" {CPU_BACKEND_ENV}=numpy to silence this)",
            RuntimeWarning, stacklevel=4,
        )
        return NUMPY_BACKEND
    except Exception as e:  # noqa: BLE001 - a broken numba (cache dir, LLVM) must not stop training
        warnings.warn(
            f"{CPU_BACKEND_ENV}={choice}: the numba backend could not start"
            f" ({type(e).__name__}: {e}); using the NumPy backend"
            f" (set {CPU_BACKEND_ENV}=numpy to silence this)",
            RuntimeWarning, stacklevel=4,
        )
        return NUMPY_BACKEND
    return backend


def cpu_backend() -> Backend:
    """The backend NumPy arrays use, chosen by :data:`CPU_BACKEND_ENV` (see the module docstring).

    Resolved once per value of the variable (a warning, if any, is given once).
    """
    choice = text(CPU_BACKEND_ENV, "auto").lower()
    backend = _CPU.get(choice)
    if backend is None:
        if choice == "numpy":
            backend = NUMPY_BACKEND
        elif choice in ("auto", "numba"):
            backend = _load_numba(choice)
        else:
            warnings.warn(
                f"{CPU_BACKEND_ENV}={choice!r} is not one of {', '.join(CPU_CHOICES)};"
                " using 'auto'", RuntimeWarning, stacklevel=3,
            )
            backend = _CPU.get("auto") or _load_numba("auto")
        _CPU[choice] = backend
    return backend


def is_cupy_array(a: Any) -> bool:
    """True if ``a`` is a ``cupy.ndarray`` (without importing CuPy)."""
    cp = sys.modules.get("cupy")
    return cp is not None and isinstance(a, cp.ndarray)


def get_backend(a: Any, argname: str = "x") -> Backend:
    """The backend that owns array ``a``.

    Raises
    ------
    TypeError
        If ``a`` is neither a NumPy nor a CuPy array.
    """
    if NUMPY_BACKEND.owns(a):
        return cpu_backend()
    if is_cupy_array(a):
        from .cupy.backend import get_cupy_backend  # imports CuPy: only once a CuPy array exists

        return get_cupy_backend()
    raise TypeError(
        f"{argname} must be a numpy.ndarray or cupy.ndarray; got {type(a).__module__}."
        f"{type(a).__name__} (use cupysyncbn.arrays.dlpack to convert other arrays)"
    )


__getattr__ = _deprecated.submodule_getattr(__name__)  # old module paths, one release
