"""The communicator contract and the one-process communicator.

A communicator does exactly one thing for the batch-norm math: an in-place sum
all-reduce of a 1-D float64 buffer that lives where the layer's arrays live.
Everything else (what is packed in the buffer, how errors are agreed on) is
:mod:`cupysyncbn.protocol`'s job.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Communicator", "NoCommunicator"]


class Communicator:
    """Base class of cupysyncbn communicators.

    Attributes
    ----------
    rank : int
        Rank of this process in the group.
    size : int
        Number of processes in the group.
    backend : str
        ``"none"``, ``"mpi"`` or ``"nccl"``.
    """

    rank: int = 0
    size: int = 1
    backend: str = "none"

    def allreduce_sum(self, buf: Any) -> Any:
        """Sum ``buf`` (1-D float64) over the group, in place; return it."""
        raise NotImplementedError

    def supports(self, array: Any) -> bool:
        """True if :meth:`allreduce_sum` accepts buffers of ``array``'s kind."""
        return True

    def abort(self, errorcode: int = 1) -> None:
        """Terminate every process of the group (best effort)."""
        raise SystemExit(errorcode)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} backend={self.backend} rank={self.rank} size={self.size}>"


class NoCommunicator(Communicator):
    """A group of one process: the all-reduce is the identity.

    Used by the local ``BatchNorm1D/2D/3D`` layers and by ``init('none')``.
    """

    backend = "none"

    def allreduce_sum(self, buf: Any) -> Any:
        """Return ``buf`` unchanged (the sum over one process)."""
        return buf


#: Shared instance for local (unsynchronized) batch norm.
LOCAL = NoCommunicator()
