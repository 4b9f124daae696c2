"""Dtype rules: which input dtypes are accepted and what precision the math uses.

* inputs: float16, float32, float64, and bfloat16 where the array library has
  it (NumPy through ``ml_dtypes``);
* statistics are computed in float64 when the input or the layer is float64,
  otherwise in float32 (float16/bfloat16 inputs use float32 statistics);
* outputs and input gradients keep the input dtype;
* non-native byte orders (big-endian ``>f4`` on a little-endian machine) are
  accepted wherever a dtype is checked and converted to the native order
  (:func:`native_byteorder`), so ``>f4`` behaves exactly like ``float32``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "PARAM_DTYPES",
    "check_input_dtype",
    "compute_dtype",
    "parse_param_dtype",
    "native_dtype",
    "native_byteorder",
]

PARAM_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_HALF_NAMES = ("float16", "bfloat16")


def native_dtype(dt: Any) -> np.dtype:
    """``dt`` in the machine's byte order (``>f4`` -> ``float32`` on x86)."""
    dt = np.dtype(dt)
    return dt if dt.isnative else dt.newbyteorder("=")


def native_byteorder(a: Any) -> Any:
    """``a`` itself, or a native-byte-order copy of a NumPy array that is not native."""
    if isinstance(a, np.ndarray) and not a.dtype.isnative:
        return a.astype(native_dtype(a.dtype))
    return a


def _dtype(a: Any) -> np.dtype:
    return native_dtype(a.dtype if hasattr(a, "dtype") else a)


def check_input_dtype(x: Any, argname: str = "x") -> np.dtype:
    """Return the dtype of ``x`` if it is a supported floating dtype.

    Raises
    ------
    TypeError
        For integer, boolean, complex or object dtypes, naming ``argname``.
    """
    dt = _dtype(x)
    if dt.name in _HALF_NAMES or dt in PARAM_DTYPES:
        return dt
    raise TypeError(
        f"{argname} must have a floating dtype (float16, float32, float64"
        f" or bfloat16); got {dt.name}"
    )


def parse_param_dtype(dtype: Any, argname: str = "dtype") -> np.dtype:
    """Validate the dtype of parameters and running statistics.

    Raises
    ------
    ValueError
        Unless ``dtype`` is float32 or float64.
    """
    try:
        dt = native_dtype(dtype)
    except TypeError:
        raise TypeError(f"{argname} must be a dtype; got {dtype!r}") from None
    if dt not in PARAM_DTYPES:
        raise ValueError(f"{argname} must be 'float32' or 'float64'; got {dt.name}")
    return dt


def compute_dtype(input_dtype: np.dtype, param_dtype: np.dtype) -> np.dtype:
    """Precision of the statistics for this input and layer dtype."""
    if input_dtype == np.float64 or param_dtype == np.float64:
        return np.dtype(np.float64)
    return np.dtype(np.float32)
