"""Array backends: pick the implementation of the primitives for an array.

NumPy arrays go to :mod:`.numpy_backend`; CuPy arrays to :mod:`.cupy_backend`
(RawKernels from the top-level ``kernels/`` folder). CuPy is imported only when
a CuPy array is seen, so the CPU path needs no CUDA at all.

``CUPYSYNCBN_CPU_BACKEND=numba`` opts NumPy arrays into the fused numba
kernels of :mod:`.numba_backend` (the ``fast`` extra); without numba it warns
once and keeps the NumPy backend.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

from .base import Backend
from .numpy_backend import BACKEND as NUMPY_BACKEND

__all__ = ["Backend", "get_backend", "is_cupy_array", "NUMPY_BACKEND", "CPU_BACKEND_ENV"]

#: Environment variable choosing the CPU backend: ``numpy`` (default) or ``numba``.
CPU_BACKEND_ENV = "CUPYSYNCBN_CPU_BACKEND"
_CPU: dict = {}  # choice -> backend, resolved (and warned about) once per choice


def _cpu_backend() -> Backend:
    choice = os.environ.get(CPU_BACKEND_ENV, "numpy").strip().lower() or "numpy"
    backend = _CPU.get(choice)
    if backend is None:
        backend = NUMPY_BACKEND
        if choice == "numba":
            try:
                from .numba_backend import BACKEND as backend
            except ImportError as e:
                warnings.warn(
                    f"{CPU_BACKEND_ENV}=numba but numba is not importable ({e});"
                    " using the NumPy backend (pip install cupysyncbn[fast])",
                    RuntimeWarning, stacklevel=3,
                )
        elif choice != "numpy":
            warnings.warn(
                f"{CPU_BACKEND_ENV}={choice!r} is not 'numpy' or 'numba';"
                " using the NumPy backend", RuntimeWarning, stacklevel=3,
            )
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
        return _cpu_backend()
    if is_cupy_array(a):
        from .cupy_backend import get_cupy_backend

        return get_cupy_backend()
    raise TypeError(
        f"{argname} must be a numpy.ndarray or cupy.ndarray; got {type(a).__module__}."
        f"{type(a).__name__} (use cupysyncbn.interop.dlpack to convert other arrays)"
    )
