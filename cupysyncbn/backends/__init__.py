"""Array backends: pick the implementation of the primitives for an array.

NumPy arrays go to :mod:`.numpy_backend`; CuPy arrays to :mod:`.cupy_backend`
(RawKernels from the top-level ``kernels/`` folder). CuPy is imported only when
a CuPy array is seen, so the CPU path needs no CUDA at all.
"""

from __future__ import annotations

import sys
from typing import Any

from .base import Backend
from .numpy_backend import BACKEND as NUMPY_BACKEND

__all__ = ["Backend", "get_backend", "is_cupy_array", "NUMPY_BACKEND"]


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
        return NUMPY_BACKEND
    if is_cupy_array(a):
        from .cupy_backend import get_cupy_backend

        return get_cupy_backend()
    raise TypeError(
        f"{argname} must be a numpy.ndarray or cupy.ndarray; got {type(a).__module__}."
        f"{type(a).__name__} (use cupysyncbn.interop.dlpack to convert other arrays)"
    )
