"""Communicator over ``paddle.distributed`` collectives (Gloo on CPU, NCCL on GPU).

For jobs started by ``python -m paddle.distributed.launch`` (after
``paddle.distributed.init_parallel_env()``), where there is no ``mpiexec`` and
no MPI communicator: the one all-reduce of each pass goes through
``paddle.distributed.all_reduce`` on a Paddle process group. The buffer is
shared with Paddle through DLPack (no copy): a NumPy buffer becomes a CPU
tensor (Paddle's Gloo backend), a CuPy buffer a GPU tensor (NCCL). A buffer
the group's backend cannot reduce in place (a NumPy buffer on an NCCL group,
a CuPy buffer on a Gloo group) is staged through the other memory.

The packing, the header and the error agreement are the same as for MPI
(:mod:`cupysyncbn.protocol`); this module only moves the sums.

Paddle is imported when a communicator is created, never by
``import cupysyncbn``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from ..errors import CommunicatorError
from ..runtime.watchdog import shared_watchdog
from .base import Communicator

__all__ = ["PaddleCommunicator", "communicator_for", "is_paddle_group", "paddle_initialized"]

# One communicator per Paddle group id: the layer-id sequence of the header
# protocol is counted per communicator object, so every layer on a group must
# share one object (Paddle never reuses a group id within a process).
_BY_GROUP: dict[int, PaddleCommunicator] = {}


def is_paddle_group(obj: Any) -> bool:
    """True for a ``paddle.distributed`` process group (checked without importing Paddle)."""
    mod = type(obj).__module__ or ""
    return mod.startswith("paddle.distributed") and hasattr(obj, "nranks")


def paddle_initialized() -> bool:
    """True when this process already imported Paddle and ran ``init_parallel_env()``.

    Never imports Paddle: a process that did not import it is not a Paddle job.
    """
    dist = sys.modules.get("paddle.distributed")
    if dist is None:
        return False
    try:
        return bool(dist.is_initialized())
    except Exception:  # pragma: no cover - older Paddle without is_initialized
        return False


def _global_group() -> Any:
    from paddle.distributed.communication.group import _get_global_group

    return _get_global_group()


class PaddleCommunicator(Communicator):
    """Sum all-reduce over a ``paddle.distributed`` process group.

    Parameters
    ----------
    group : paddle.distributed.communication.group.Group, optional
        The group to synchronize over (``paddle.distributed.new_group(ranks)``);
        None is the global group of ``init_parallel_env()``.

    Raises
    ------
    CommunicatorError
        When Paddle is not installed or ``init_parallel_env()`` has not run.
    ValueError
        When this process is not a member of ``group``.
    TypeError
        When ``group`` is not a Paddle process group.

    Notes
    -----
    Prefer :func:`communicator_for` (what ``comm=group`` and
    ``cupysyncbn.init('paddle')`` use): it returns one object per group.
    """

    backend = "paddle"

    def __init__(self, group: Any = None) -> None:
        try:
            import paddle.distributed as dist
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise CommunicatorError(
                "backend 'paddle' needs PaddlePaddle: pip install paddlepaddle"
            ) from e
        if not dist.is_initialized():
            raise CommunicatorError(
                "backend 'paddle' needs paddle.distributed.init_parallel_env() to have run"
                " (start the job with python -m paddle.distributed.launch)"
            )
        if group is None:
            group = _global_group()
        if not is_paddle_group(group):
            raise TypeError(
                f"group must be a paddle.distributed process group; got {type(group).__name__}"
            )
        if group.rank < 0:
            raise ValueError(
                f"this process (global rank {dist.get_rank()}) is not a member of the Paddle"
                f" group {group.id} (ranks {list(group.ranks)})"
            )
        self._dist = dist
        self.group = group
        self.rank = int(group.rank)
        self.size = int(group.nranks)
        self.group_backend = str(getattr(group, "backend", "")).upper()

    def group_key(self) -> Any:
        """``('paddle', group id)``: Paddle never reuses a group id in a process."""
        return ("paddle", int(self.group.id))

    def allreduce_sum(self, buf: Any) -> Any:
        """Sum ``buf`` (1-D float64, NumPy or CuPy) over the group, in place.

        A call that does not complete within ``CUPYSYNCBN_TIMEOUT`` seconds
        (default 600) aborts the job (:mod:`cupysyncbn.fault`).
        """
        return self._reduce(buf, self._dist.ReduceOp.SUM)

    def allreduce_max(self, buf: Any) -> Any:
        """Element-wise maximum of ``buf`` over the group, in place (as :meth:`allreduce_sum`)."""
        return self._reduce(buf, self._dist.ReduceOp.MAX)

    def _reduce(self, buf: Any, op: Any) -> Any:
        dog = shared_watchdog()
        started = dog.begin(buf.size)
        try:
            return self._allreduce_sum(buf, op)
        finally:
            dog.end(started)

    def _reduce_tensor(self, t: Any, op: Any = None) -> None:
        op = self._dist.ReduceOp.SUM if op is None else op
        self._dist.all_reduce(t, op=op, group=self.group, sync_op=True)

    def _allreduce_sum(self, buf: Any, op: Any = None) -> Any:
        import paddle

        if self.size == 1:
            return buf
        if isinstance(buf, np.ndarray):
            if self.group_backend == "NCCL":
                # NCCL reduces device memory only: stage through the GPU.
                t = paddle.to_tensor(buf, place=paddle.CUDAPlace(_device_id()))
                self._reduce_tensor(t, op)
                buf[...] = t.numpy()
                return buf
            self._reduce_tensor(paddle.from_dlpack(buf), op)  # shares buf's memory
            return buf
        import cupy

        if self.group_backend != "NCCL":
            host = cupy.asnumpy(buf)
            self._reduce_tensor(paddle.from_dlpack(host), op)
            buf.set(host)
            return buf
        # paddle.from_dlpack orders Paddle's stream after CuPy's current one
        # (DLPack stream protocol); the in-place NCCL sum then lands in buf.
        t = paddle.from_dlpack(buf)
        self._reduce_tensor(t, op)
        _order_cupy_after_paddle(buf)
        return buf

    def abort(self, errorcode: int = 1) -> None:
        """End this process at once; Paddle's launcher then stops the other ranks."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # pragma: no cover - closed streams
                pass
        os._exit(errorcode)


def _device_id() -> int:
    import paddle

    dev = paddle.device.get_device()  # 'gpu:N' under the launcher
    return int(dev.split(":")[1]) if ":" in dev else 0


def _order_cupy_after_paddle(buf: Any) -> None:
    """Make CuPy's current stream wait for Paddle's (where the sum was ordered)."""
    import warnings

    import cupy
    import paddle

    cstream = cupy.cuda.get_current_stream()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated names both libraries still have
        pstream = int(paddle.device.cuda.current_stream(buf.device.id).cuda_stream)
        if pstream == int(cstream.ptr):
            return
        ev = cupy.cuda.Event(disable_timing=True)
        ev.record(cupy.cuda.ExternalStream(pstream, buf.device.id))
    cstream.wait_event(ev)


def communicator_for(group: Any = None) -> PaddleCommunicator:
    """The (cached) :class:`PaddleCommunicator` of ``group`` (None: the global group)."""
    if group is None:
        if not paddle_initialized():
            raise CommunicatorError(
                "backend 'paddle' needs paddle.distributed.init_parallel_env() to have run"
                " (start the job with python -m paddle.distributed.launch)"
            )
        group = _global_group()
    if not is_paddle_group(group):
        raise TypeError(
            f"group must be a paddle.distributed process group; got {type(group).__name__}"
        )
    comm = _BY_GROUP.get(int(group.id))
    if comm is None:
        comm = PaddleCommunicator(group)
        _BY_GROUP[int(group.id)] = comm
    return comm
