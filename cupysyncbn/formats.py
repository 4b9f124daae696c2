"""Data formats: which axis holds the channels, and canonical 3-D views.

Every batch-norm computation in the package runs on one of two canonical
layouts, so the backends need to know nothing about ``data_format``:

* channel-first ``(N, C, S)`` for ``NCL``, ``NCHW``, ``NCDHW``
  (``S`` is the product of the spatial sizes);
* channel-last ``(M, C)`` for ``NC``, ``NLC``, ``NHWC``, ``NDHWC``
  (``M`` is batch × spatial).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["DataFormat", "parse_data_format", "canonical_view", "FORMATS"]


@dataclass(frozen=True)
class DataFormat:
    """A validated data format.

    Attributes
    ----------
    name : str
        Canonical upper-case name, e.g. ``"NCHW"``.
    ndim : int
        Rank of the arrays in this format (2 to 5).
    channel_last : bool
        True when the channel axis is the last one.
    """

    name: str
    ndim: int
    channel_last: bool

    @property
    def channel_axis(self) -> int:
        """Index of the channel axis in an input of this format."""
        return self.ndim - 1 if self.channel_last else 1


FORMATS: dict[str, DataFormat] = {
    # NC counts as channel-last: (N, C) is already the (M, C) layout.
    name: DataFormat(name, len(name), name.endswith("C"))
    for name in ("NC", "NCL", "NCHW", "NCDHW", "NLC", "NHWC", "NDHWC")
}

# Paddle's aliases: 'NCW'/'NWC' are accepted by some of its layers.
_ALIASES = {"NCW": "NCL", "NWC": "NLC"}


def parse_data_format(data_format: Any, argname: str = "data_format") -> DataFormat:
    """Validate ``data_format`` and return its :class:`DataFormat`.

    Parameters
    ----------
    data_format : str
        One of ``NC, NCL, NCHW, NCDHW, NLC, NHWC, NDHWC`` (case-insensitive).
    argname : str
        Name used in the error message.

    Raises
    ------
    ValueError
        If ``data_format`` is not one of the supported formats.
    """
    if isinstance(data_format, DataFormat):
        return data_format
    if not isinstance(data_format, str):
        raise TypeError(f"{argname} must be a str, got {type(data_format).__name__}")
    key = _ALIASES.get(data_format.upper(), data_format.upper())
    try:
        return FORMATS[key]
    except KeyError:
        raise ValueError(
            f"{argname} must be one of {', '.join(FORMATS)}; got {data_format!r}"
        ) from None


def format_for_ndim(fmt: DataFormat, ndim: int) -> DataFormat | None:
    """The format of the same channel placement that matches ``ndim``.

    Paddle's ``BatchNorm1D`` takes both ``(N, C)`` and ``(N, C, L)`` with
    ``data_format='NCL'``; this returns ``NC`` for a 2-D input in that case
    (and ``None`` when nothing of that family has ``ndim`` dimensions).
    """
    if fmt.ndim == ndim:
        return fmt
    one_d = {"NC", "NCL", "NLC"}
    if fmt.name in one_d and ndim in (2, 3):
        if ndim == 2:
            return FORMATS["NC"]
        return FORMATS["NLC"] if fmt.channel_last else FORMATS["NCL"]
    return None


def canonical_view(x: Any, fmt: DataFormat) -> Any:
    """Reshape ``x`` (C-contiguous) to ``(N, C, S)`` or ``(M, C)``.

    The caller guarantees contiguity, so this is always a view.
    """
    shape = x.shape
    if fmt.channel_last:
        c = shape[-1]
        m = 1
        for d in shape[:-1]:
            m *= d
        return x.reshape(m, c)
    n, c = shape[0], shape[1]
    s = 1
    for d in shape[2:]:
        s *= d
    return x.reshape(n, c, s)
