"""Devices: ``'cpu'`` (NumPy) and ``'cuda[:N]'`` (CuPy), and moving arrays between them."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["parse_device", "move_array", "device_of", "to_host"]


def parse_device(device: Any, argname: str = "device", *, allow_auto: bool = False) -> str:
    """Normalize a device to ``'cpu'``, ``'cuda'`` or ``'cuda:N'`` (and ``'auto'`` if allowed).

    The package's one device parser: ``'gpu'`` and ``'cuda'`` are the same
    word, a bare index (int or digits) is that GPU. :mod:`cupysyncbn.runtime.placement`
    spells its answers ``'gpu[:N]'`` (``get_device()``), layers ``'cuda[:N]'``
    (``Layer.to``); both parse here.

    Raises
    ------
    ValueError
        For anything else (the message names ``argname``).
    """
    if isinstance(device, bool):
        pass
    elif isinstance(device, int) and device >= 0:
        return f"cuda:{device}"
    elif isinstance(device, str):
        d = device.strip().lower()
        if d.startswith("gpu"):
            d = "cuda" + d[3:]
        if d in ("cpu", "cuda") or (allow_auto and d == "auto"):
            return d
        if d.isdigit():
            return f"cuda:{int(d)}"
        if d.startswith("cuda:") and d[5:].isdigit():
            return f"cuda:{int(d[5:])}"
    if allow_auto:
        raise ValueError(
            f"{argname} must be 'auto', 'cpu', 'gpu' or 'gpu:N' (N a GPU index); got {device!r}"
        )
    raise ValueError(f"{argname} must be 'cpu', 'cuda' or 'cuda:N'; got {device!r}")


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


def to_host(a: Any) -> np.ndarray:
    """``a`` as a NumPy array: itself, a CuPy array's host copy, or ``np.asarray(a)``."""
    if isinstance(a, np.ndarray):
        return a
    get = getattr(a, "get", None)
    if callable(get) and type(a).__module__.startswith("cupy"):
        return get()
    return np.asarray(a)
