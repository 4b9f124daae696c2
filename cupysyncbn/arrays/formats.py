"""Data formats: which axis holds the channels, and canonical views.

The rule (Paddle's ``SyncBatchNorm``): a channel-first name (``NC``, ``NCL``,
``NCHW``, ``NCDHW``, alias ``NCW``) puts the channels on axis 1, a
channel-last name (``NLC``, ``NHWC``, ``NDHWC``, alias ``NWC``) on the last
axis, for an input of any rank from 2 to 5. The name says where the channels
are, not how many dimensions the input has; :func:`format_for_ndim` turns a
name and an input rank into the concrete format of that input.

Every batch-norm computation then runs on one of two canonical layouts, so
the backends need to know nothing about ``data_format``:

* channel-first ``(N, C, S)`` for 3-5-D inputs with channels on axis 1
  (``S`` is the product of the spatial sizes);
* channel-last ``(M, C)`` for channels on the last axis, and for every 2-D
  input (``(N, C)`` is already that layout; ``M`` is batch × spatial).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "DataFormat",
    "parse_data_format",
    "format_for_ndim",
    "canonical_view",
    "FORMATS",
    "CHANNEL_FIRST",
    "CHANNEL_LAST",
]


@dataclass(frozen=True)
class DataFormat:
    """A validated data format.

    Attributes
    ----------
    name : str
        Canonical upper-case name, e.g. ``"NCHW"``.
    ndim : int
        Rank of the arrays the name spells (2 to 5); inputs of other ranks
        from 2 to 5 are accepted too (:func:`format_for_ndim`).
    channel_last : bool
        True when the canonical view is ``(M, C)`` (channels on the last
        axis; also ``NC``, whose channel axis 1 is the last one).
    """

    name: str
    ndim: int
    channel_last: bool

    @property
    def channel_axis(self) -> int:
        """Index of the channel axis in an input of exactly :attr:`ndim` dimensions."""
        return self.ndim - 1 if self.channel_last else 1

    @property
    def channels_first_name(self) -> bool:
        """True for ``NC, NCL, NCHW, NCDHW``: channels on axis 1 for any rank."""
        return self.name in CHANNEL_FIRST

    def axis_for(self, ndim: int) -> int:
        """Channel axis of an input of ``ndim`` dimensions in this format."""
        return 1 if self.channels_first_name else ndim - 1


CHANNEL_FIRST = ("NC", "NCL", "NCHW", "NCDHW")
CHANNEL_LAST = ("NLC", "NHWC", "NDHWC")

FORMATS: dict[str, DataFormat] = {
    # NC's view is (M, C): its channel axis 1 is also its last axis.
    name: DataFormat(name, len(name), name == "NC" or name in CHANNEL_LAST)
    for name in CHANNEL_FIRST + CHANNEL_LAST
}

# Paddle's aliases: 'NCW'/'NWC' are accepted by some of its layers.
ALIASES = {"NCW": "NCL", "NWC": "NLC"}

_FIRST_BY_NDIM = {2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"}
_LAST_BY_NDIM = {2: "NC", 3: "NLC", 4: "NHWC", 5: "NDHWC"}


def parse_data_format(data_format: Any, argname: str = "data_format") -> DataFormat:
    """Validate ``data_format`` and return its :class:`DataFormat`.

    Parameters
    ----------
    data_format : str
        One of ``NC, NCL, NCHW, NCDHW, NLC, NHWC, NDHWC`` or the aliases
        ``NCW`` (= ``NCL``) and ``NWC`` (= ``NLC``); case-insensitive.
    argname : str
        Name used in the error message.

    Raises
    ------
    TypeError
        If ``data_format`` is not a str.
    ValueError
        If ``data_format`` is not one of the supported formats.
    """
    if isinstance(data_format, DataFormat):
        return data_format
    if not isinstance(data_format, str):
        raise TypeError(f"{argname} must be a str, got {type(data_format).__name__}")
    key = ALIASES.get(data_format.upper(), data_format.upper())
    try:
        return FORMATS[key]
    except KeyError:
        raise ValueError(
            f"{argname} must be one of {', '.join(FORMATS)} (or NCW, NWC); got {data_format!r}"
        ) from None


def format_for_ndim(fmt: DataFormat, ndim: int) -> DataFormat | None:
    """The concrete format of an ``ndim``-dimensional input named ``fmt``.

    Channel-first names give the channel-first format of that rank
    (``NCHW`` with a 3-D input is ``NCL``), channel-last names the
    channel-last one (``NHWC`` with a 5-D input is ``NDHWC``); every 2-D
    input is ``NC``. Returns None when ``ndim`` is not 2 to 5.
    """
    table = _FIRST_BY_NDIM if fmt.channels_first_name else _LAST_BY_NDIM
    name = table.get(ndim)
    return None if name is None else FORMATS[name]


def canonical_view(x: Any, fmt: DataFormat) -> Any:
    """Reshape ``x`` (C-contiguous, ``fmt.ndim`` dimensions) to ``(N, C, S)`` or ``(M, C)``.

    ``fmt`` is the concrete format of ``x`` (from :func:`format_for_ndim`).
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
