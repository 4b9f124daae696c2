"""Communicators: the contract, the implementations, and how one is chosen.

* :mod:`.base`: the :class:`Communicator` contract (one ``allreduce_sum`` of a
  float64 buffer) and the one-process communicator;
* :mod:`.select`: ``init()``, backend auto-selection, the process-wide default;
* :mod:`.agreement`: every rank's probe in one all-gather, the backend decided
  the same on every rank;
* :mod:`.mpi`, :mod:`.nccl`, :mod:`.torch`, :mod:`.paddle`: the implementations.

This module only re-exports.
"""

from __future__ import annotations

import warnings

from ..runtime import env
from .base import Communicator, NoCommunicator
from .select import as_communicator, get_default_comm, init, set_default_comm

__all__ = [
    "Communicator",
    "NoCommunicator",
    "init",
    "get_default_comm",
    "set_default_comm",
    "as_communicator",
]


def __getattr__(name: str) -> object:
    # Names that moved to cupysyncbn.runtime.env; kept for one release.
    if name in ("launched_size", "FORCE_ENV", "VERBOSE_ENV"):
        warnings.warn(
            f"cupysyncbn.comm.{name} is deprecated; use cupysyncbn.runtime.env.{name}",
            DeprecationWarning, stacklevel=2,
        )
        return getattr(env, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
