"""Devices: ``'cpu'`` (NumPy) and ``'cuda[:N]'`` (CuPy), and moving arrays between them."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["parse_device", "move_array", "device_of"]


def parse_device(device: Any) -> str:
    """Normalize ``device`` to ``'cpu'``, ``'cuda'`` or ``'cuda:N'``.

    Raises
    ------
    ValueError
        For anything else.
    """
    if isinstance(device, int):
        return f"cuda:{device}"
    if isinstance(device, str):
        d = device.strip().lower()
        if d in ("cpu", "cuda"):
            return d
        if d.startswith("gpu"):
            d = "cuda" + d[3:]
        if d.startswith("cuda:") and d[5:].isdigit():
            return d
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N'; got {device!r}")


def device_of(a: Any) -> str:
    """``'cpu'`` for NumPy arrays, ``'cuda:N'`` for CuPy arrays."""
    if isinstance(a, np.ndarray):
        return "cpu"
    dev = getattr(a, "device", None)
    if dev is not None and hasattr(dev, "id"):
        return f"cuda:{dev.id}"
    return "cpu"


def move_array(a: Any, device: str | None, dtype: Any = None, copy: bool = False) -> Any:
    """Return ``a`` on ``device`` (None: where it is) with ``dtype`` (None: unchanged)."""
    src = device_of(a)
    dst = src if device is None else device
    if dst == "cpu":
        host = a if isinstance(a, np.ndarray) else (a.get() if hasattr(a, "get") else np.asarray(a))
        return np.array(host, dtype=dtype, copy=True) if copy else np.asarray(host, dtype=dtype)
    import cupy

    dev_id = cupy.cuda.Device().id if dst == "cuda" else int(dst.split(":")[1])
    with cupy.cuda.Device(dev_id):
        if src == f"cuda:{dev_id}" and not copy:
            return a if dtype is None else a.astype(dtype, copy=False)
        return cupy.array(a, dtype=dtype, copy=True)
