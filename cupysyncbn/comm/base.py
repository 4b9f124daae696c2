"""The communicator contract and the one-process communicator.

A communicator does exactly one thing for the batch-norm math: an in-place sum
all-reduce of a 1-D float64 buffer that lives where the layer's arrays live.
Everything else (what is packed in the buffer, how errors are agreed on) is
:mod:`cupysyncbn.protocol`'s job.
"""

from __future__ import annotations

from typing import Any

import numpy as np

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
    #: Run the whole synchronized path (handshake, header, one all-reduce per
    #: pass) even in a group of one, so one device exercises every line a
    #: multi-rank job runs (``init(..., force_collectives=True)``).
    force_collectives: bool = False
    #: Why ``init('auto')`` chose MPI rather than NCCL ('' when no GPU was wanted).
    fallback_reason: str = ""
    #: Every rank's probe from the backend agreement (for the verbose line), or None.
    _init_infos: Any = None
    #: GPU passes read the device's header verdict at once (a host sync per
    #: pass) instead of at the layer's next pass; None: ``CUPYSYNCBN_STRICT_SYNC``.
    strict_sync: bool | None = None

    @property
    def synchronizes(self) -> bool:
        """True when training passes go through the collective (size > 1 or forced)."""
        return self.size > 1 or self.force_collectives

    def allreduce_sum(self, buf: Any) -> Any:
        """Sum ``buf`` (1-D float64) over the group, in place; return it."""
        raise NotImplementedError

    def allreduce_max(self, buf: Any) -> Any:
        """Element-wise maximum of ``buf`` (1-D float64) over the group, in place; return it.

        Used by the reproducible mode's bound pass (``docs/reproducibility.md``).
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no allreduce_max: it cannot run layers built with"
            " reproducible=True"
        )

    def allreduce_host(self, host: Any) -> np.ndarray:
        """Sum a small host vector over the group; return a new float64 NumPy array.

        For agreement and consistency checks outside the batch-norm passes
        (never on the hot path). The default stages through :meth:`allreduce_sum`.
        """
        buf = np.array(host, dtype=np.float64, copy=True).reshape(-1)
        if self.size == 1:
            return buf
        if self.supports(buf):
            return np.asarray(self.allreduce_sum(buf))
        import cupy

        return cupy.asnumpy(self.allreduce_sum(cupy.asarray(buf)))

    def group_key(self) -> Any:
        """A hashable identity of this process group, local to this process.

        Two communicator objects over the same group return equal keys; a
        group created after another was freed never reuses its key (unlike
        MPI handles). Used to key per-group counters.
        """
        key = getattr(self, "_cupysyncbn_group_key", None)
        if key is None:
            key = object()
            self._cupysyncbn_group_key = key
        return key

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

    def allreduce_max(self, buf: Any) -> Any:
        """Return ``buf`` unchanged (the maximum over one process)."""
        return buf


#: Shared instance for local (unsynchronized) batch norm.
LOCAL = NoCommunicator()
