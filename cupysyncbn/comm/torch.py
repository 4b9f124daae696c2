"""Communicator over ``torch.distributed``: torchrun jobs and existing process groups.

PyTorch users launch with ``torchrun`` and already hold a process group; this
communicator synchronizes over it, so no MPI is needed:

* NumPy buffers are viewed as CPU tensors (``torch.from_numpy``, no copy) and
  summed by the group's CPU backend (gloo);
* CuPy buffers are viewed as CUDA tensors (``torch.from_dlpack``, no copy) and
  summed by the group's CUDA backend (NCCL) on CuPy's current stream, which
  the PyTorch adapter sets to PyTorch's current stream: the result is ordered
  on that stream, without a host synchronization.

A group that has no backend for a buffer's device (an NCCL-only group and a
NumPy buffer, a gloo-only group and a CuPy buffer) is served through a staging
copy on the other device, as :class:`~cupysyncbn.comm.mpi.MPICommunicator`
stages CuPy buffers through the host.

``torch`` is imported only when one of these communicators is created, never
by ``import cupysyncbn``.
"""

from __future__ import annotations

import os
import sys
import weakref
from typing import Any

import numpy as np

from ..errors import CommunicatorError
from .base import Communicator

__all__ = ["TorchCommunicator", "communicator_for", "is_process_group", "torch_world_size"]

# One key and one communicator per ProcessGroup object: every wrapper of a
# group counts layers in one sequence (protocol.next_layer_id), and a group
# created after another was destroyed never inherits its key.
_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COMMS: dict = {}


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def is_process_group(obj: Any) -> bool:
    """True for a ``torch.distributed.ProcessGroup`` (checked without importing torch)."""
    if obj is None or not (type(obj).__module__ or "").startswith("torch"):
        return False
    dist = sys.modules.get("torch.distributed")
    pg = getattr(dist, "ProcessGroup", None)
    return pg is not None and isinstance(obj, pg)


def torch_world_size() -> int:
    """Size of the initialized default ``torch.distributed`` group, 0 when there is none.

    Looks only at modules already imported, so it never imports torch.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None:
        return 0
    try:
        if not (dist.is_available() and dist.is_initialized()):
            return 0
        return int(dist.get_world_size())
    except Exception:  # pragma: no cover - a half torn-down group
        return 0


class TorchCommunicator(Communicator):
    """Sum all-reduce over a ``torch.distributed`` process group.

    Parameters
    ----------
    group : torch.distributed.ProcessGroup, optional
        The group to synchronize over (default: the default group,
        ``torch.distributed.group.WORLD``). It is used as given, so the
        collectives stay ordered with the caller's own on that group.

    Raises
    ------
    CommunicatorError
        When ``torch.distributed`` is not initialized, or this process is not
        a member of ``group``.
    TypeError
        When ``group`` is not a ``ProcessGroup``.

    Notes
    -----
    Prefer :func:`communicator_for` (or ``comm=group`` anywhere a
    communicator is accepted): it returns one communicator per group.
    """

    backend = "torch"

    def __init__(self, group: Any = None) -> None:
        try:
            dist = _dist()
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise CommunicatorError("backend 'torch' needs PyTorch: pip install torch") from e
        if not dist.is_available():
            raise CommunicatorError("this PyTorch build has no torch.distributed")
        if not dist.is_initialized():
            raise CommunicatorError(
                "backend 'torch' needs an initialized torch.distributed: call"
                " torch.distributed.init_process_group() first (torchrun sets the"
                " environment it reads)"
            )
        pg = dist.group.WORLD if group is None else group
        if not isinstance(pg, dist.ProcessGroup):
            raise TypeError(
                "group must be a torch.distributed.ProcessGroup or None; got"
                f" {type(group).__module__}.{type(group).__name__}"
            )
        rank = dist.get_rank(pg)
        if rank < 0:
            raise CommunicatorError("this process is not a member of the given process group")
        self.group = pg
        self.rank = int(rank)
        self.size = int(dist.get_world_size(pg))
        self._dist = dist
        self._torch = sys.modules["torch"]
        devices = {str(d) for d in getattr(pg, "_device_types", ())}
        if not devices:  # pragma: no cover - older PyTorch: ask for the backend name
            name = str(dist.get_backend(pg)).lower()
            devices = {"cpu"} if name == "gloo" else {"cuda"} if name == "nccl" else set()
            devices = devices or {"cpu", "cuda"}
        self.cpu_direct = "cpu" in devices
        # gloo lists "cuda" even in a CPU-only build of torch, which has no CUDA tensors.
        self.cuda_direct = "cuda" in devices and bool(self._torch.backends.cuda.is_built())

    # -- the collective --------------------------------------------------------
    def supports(self, array: Any) -> bool:
        """NumPy and CuPy buffers (a backend of the group, or a staging copy)."""
        if isinstance(array, np.ndarray):
            return True
        cp = sys.modules.get("cupy")
        return cp is not None and isinstance(array, cp.ndarray)

    def allreduce_sum(self, buf: Any) -> Any:
        """Sum ``buf`` (1-D float64, NumPy or CuPy) over the group, in place; return it.

        Raises
        ------
        TypeError
            For a buffer that is neither a NumPy nor a CuPy array.
        """
        return self._reduce(buf, self._dist.ReduceOp.SUM)

    def allreduce_max(self, buf: Any) -> Any:
        """Element-wise maximum of ``buf`` over the group, in place (as :meth:`allreduce_sum`)."""
        return self._reduce(buf, self._dist.ReduceOp.MAX)

    def _reduce(self, buf: Any, op: Any) -> Any:
        torch = self._torch
        if isinstance(buf, np.ndarray):
            t = torch.from_numpy(buf)  # shares buf's memory
            if self.cpu_direct:
                self._dist.all_reduce(t, op=op, group=self.group)
            else:
                # NCCL-only group: through this process's current GPU.
                dev = torch.device("cuda", torch.cuda.current_device())
                staged = t.to(dev)
                self._dist.all_reduce(staged, op=op, group=self.group)
                t.copy_(staged.cpu())
            return buf
        cp = sys.modules.get("cupy")
        if cp is None or not isinstance(buf, cp.ndarray):
            raise TypeError(f"buf must be a numpy or cupy array; got {type(buf).__name__}")
        # Run on CuPy's current stream: the work that filled buf is ordered
        # before the all-reduce, and later kernels on that stream after it.
        dev = torch.device("cuda", buf.device.id)
        ptr = cp.cuda.get_current_stream().ptr
        # ptr 0 is the legacy default stream, PyTorch's default stream too.
        stream = (torch.cuda.default_stream(dev) if ptr == 0
                  else torch.cuda.ExternalStream(ptr, device=dev))
        with torch.cuda.device(buf.device.id), torch.cuda.stream(stream):
            t = torch.from_dlpack(buf)  # shares buf's memory
            if self.cuda_direct:
                self._dist.all_reduce(t, op=op, group=self.group)
            else:
                staged = t.cpu()  # waits for the stream: the host needs the values
                self._dist.all_reduce(staged, op=op, group=self.group)
                t.copy_(staged)
        return buf

    def group_key(self) -> Any:
        """Identity of the process group (shared by every wrapper of that group)."""
        key = _KEYS.get(self.group)
        if key is None:
            key = ("torch", object())
            _KEYS[self.group] = key
        return key

    def abort(self, errorcode: int = 1) -> None:
        """Abort the group's backends (unblocks pending NCCL work), then end this process.

        ``torchrun`` (and ``torch.multiprocessing``) then stop every other
        process of the job; a peer blocked in gloo sees its connection close.
        """
        try:
            self.group.abort()
        except Exception:  # noqa: BLE001 - best effort: not every backend can abort
            pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(errorcode)

    def __repr__(self) -> str:
        kinds = "+".join(k for k, ok in (("cpu", self.cpu_direct), ("cuda", self.cuda_direct))
                         if ok)
        return (
            f"<TorchCommunicator rank={self.rank} size={self.size} devices={kinds or '?'}>"
        )


def communicator_for(group: Any = None) -> TorchCommunicator:
    """The communicator of a ``torch.distributed`` process group (one per group).

    Parameters
    ----------
    group : torch.distributed.ProcessGroup, optional
        Default: the default group (``torch.distributed.group.WORLD``).

    Raises
    ------
    CommunicatorError, TypeError
        As :class:`TorchCommunicator`.
    """
    dist = _dist()
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    comm = _COMMS.get(group) if group is not None else None
    if comm is None:
        comm = TorchCommunicator(group)
        _COMMS[comm.group] = comm
    return comm
