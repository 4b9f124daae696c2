"""Header verdicts checked on the device, read by the host without a stall.

On the fused (GPU) path the reduced header of each synchronized pass is
checked by the kernel that consumes it (``kernels/fused.cu``). A bad verdict
is latched into a small device ``status`` vector: ``[flag, phase, header]``
with flag 1 for a header that :func:`cupysyncbn._sync.protocol.check_header` rejects
flag 2 for an unbiased running variance over a global count of 1 and flag
3 for batch statistics over a global count of 1. After
the pass the status is copied into pinned host memory and an event is
recorded, both asynchronously; the host looks at the copy at the start of the
layer's next pass (:meth:`DeviceStatus.poll`) or in :func:`check_errors`, and
raises exactly what the synchronous check raises. With ``strict_sync`` the
status is read at the end of every pass instead (one host synchronization).

A rank whose own input was invalid raises at once (it knows); it also
remembers to raise again at its next pass of that layer, where its peers see
the latched verdict, so every rank leaves the same pass and none waits alone
in a collective.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from ..backends.channel_math import count_one_message
from ..errors import CollectiveMismatchError
from ..runtime import env
from . import protocol

__all__ = ["DeviceStatus", "check_errors", "strict_sync", "strict_sync_default"]

STATUS_SIZE = 2 + protocol.HEADER
_LIVE: weakref.WeakSet = weakref.WeakSet()


def strict_sync_default() -> bool:
    """``strict_sync`` when neither ``init`` nor the communicator sets it (the environment)."""
    return env.flag(env.STRICT_SYNC_ENV)


def strict_sync(comm: Any) -> bool:
    """Whether passes over ``comm`` read the device verdict at once."""
    strict = getattr(comm, "strict_sync", None)
    return strict_sync_default() if strict is None else bool(strict)


def _raise_verdict(host: np.ndarray, size: int) -> None:
    flag = host[0]
    if flag == 1:
        protocol.check_header(np.array(host[2:], dtype=np.float64), int(host[1]), size, None)
        raise CollectiveMismatchError(  # pragma: no cover - check_header raised
            "SyncBatchNorm: the device rejected a header the host accepts"
        )
    if flag in (2, 3):  # a global count of 1 with batch statistics
        raise ValueError(count_one_message(None, unbiased=flag == 2))


class DeviceStatus:
    """One layer's latched device verdict and its asynchronous host copy.

    Parameters
    ----------
    xp : module
        The array module (``cupy``) of the device the layer runs on.
    """

    def __init__(self, xp: Any) -> None:
        self.xp = xp
        self.device = xp.zeros(STATUS_SIZE, dtype=np.float64)
        self.host: np.ndarray | None = None  # pinned, made at the first async copy
        self._mem: Any = None
        self.event: Any = None
        self.pending = False  # a copy is in flight
        self.size = 1  # group size of the pass whose verdict is in flight
        self.reraise: BaseException | None = None
        _LIVE.add(self)

    def after_pass(self, size: int) -> None:
        """Queue the asynchronous copy of the verdict (no host wait)."""
        stream = self.xp.cuda.get_current_stream()
        self.size = size
        capturing = getattr(stream, "is_capturing", lambda: False)()
        if capturing:
            # Inside a CUDA graph the verdict stays latched on the device;
            # check_errors() after a replay reads it.
            return
        if self.host is None:
            self._mem = self.xp.cuda.alloc_pinned_memory(STATUS_SIZE * 8)
            self.host = np.frombuffer(self._mem, np.float64, STATUS_SIZE)
            self.host[:] = 0
            self.event = self.xp.cuda.Event(block=False, disable_timing=True)
        rt = self.xp.cuda.runtime
        rt.memcpyAsync(self.host.ctypes.data, self.device.data.ptr, STATUS_SIZE * 8,
                       rt.memcpyDeviceToHost, stream.ptr)
        self.event.record(stream)
        self.pending = True

    def poll(self) -> None:
        """Raise the verdict of the previous pass, if it was bad.

        Waits only when that pass's copy has not landed yet (it normally has:
        a whole step of other work ran since).
        """
        if self.reraise is not None:
            exc, self.reraise = self.reraise, None
            raise type(exc)(*exc.args)
        if not self.pending:
            return
        if getattr(self.xp.cuda.get_current_stream(), "is_capturing", lambda: False)():
            # No event query inside a graph capture: CUDA's global capture
            # mode (torch.cuda.graph's default) refuses it. The verdict stays
            # pending for the next pass outside the capture (or check_errors).
            return
        if not self.event.done:
            self.event.synchronize()
        self.pending = False
        self._check(self.host)

    def check_now(self, size: int) -> None:
        """Read the verdict synchronously (strict mode, ``check_errors``)."""
        self.size = size
        self.pending = False
        self._check(self.xp.asnumpy(self.device))

    def _check(self, host: np.ndarray) -> None:
        if host[0] == 0:
            return
        host = np.array(host, copy=True)
        self.device.fill(0)  # consumed: the next verdict latches afresh
        if self.host is not None:
            self.host[:] = 0
        _raise_verdict(host, self.size)


def check_errors() -> None:
    """Raise any error the device found in a past synchronized pass.

    On the GPU path, header checks (invalid inputs on another rank, ranks out
    of step) and the unbiased-variance count check run on the device and are
    raised at the start of the layer's next pass. Call this to surface them
    now, e.g. after the last step or after replaying a CUDA graph. Host
    synchronization: one per layer with a deferred verdict.

    Raises
    ------
    RemoteInputError, CollectiveMismatchError, ValueError
        The same exceptions the immediate check raises.
    """
    for st in list(_LIVE):
        if st.reraise is not None:
            st.poll()
        st.check_now(st.size)
