"""Header verdicts checked on the device, read by the host without a stall.

On the fused (GPU) path the reduced header of each synchronized pass is
checked by the kernel that consumes it (``kernels/fused.cu``). A bad verdict
is latched into a small device ``status`` vector: ``[flag, phase, header]``
with flag 1 for a header that :func:`cupysyncbn._sync.protocol.check_header`
rejects, flag 2 for an unbiased running variance over a global count of 1
and flag 3 for batch statistics over a global count of 1. The latch keeps the first
bad verdict until the host consumes it.

The host reads it on a fixed cadence counted in synchronized passes of the
layer, the same on every rank: after pass ``q`` the status is copied into
pinned host memory and an event recorded, both asynchronously; no other
copy is queued while that one is unread (the pinned buffer is never
overwritten under the host, and the device latch holds later verdicts); the
copy is read at the start of pass ``q + CHECK_EVERY``. Only there, and only
when the GPU is still ``CHECK_EVERY`` passes behind the host, does the host
wait for the event; at every other pass a poll neither waits nor queries.
So a verdict of pass ``k`` surfaces on every rank at the same pass, at the
latest at pass ``k + 2 * CHECK_EVERY - 1``, or at once in
:func:`check_errors`. Reading a copy as soon as its event is done would
surface errors earlier on some ranks than on others, and a rank leaving a
pass without its collective while its peers enter it is a hang.

With ``strict_sync`` the status is read at the end of every pass instead
(one host synchronization).

A rank whose own input was invalid raises at once (it knows); it counts that
pass as its peers do and raises again at the pass where they read the
latched verdict, so every rank leaves the same pass and none waits alone in
a collective.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from ..backends.channel_math import count_one_message
from ..errors import CollectiveMismatchError
from ..runtime import env
from . import protocol

__all__ = [
    "CHECK_EVERY", "DeviceStatus", "capturing_stream", "check_errors", "strict_sync",
    "strict_sync_default",
]

STATUS_SIZE = 2 + protocol.HEADER
#: Synchronized passes between the queuing of a status copy and its reading.
#: The host may run this many passes of a layer ahead of the GPU before a
#: poll waits; an error surfaces within ``2 * CHECK_EVERY - 1`` passes.
CHECK_EVERY = 8
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


def capturing_stream(stream: Any) -> bool:
    """Whether ``stream`` is capturing a CUDA graph (a host query, no sync)."""
    return bool(getattr(stream, "is_capturing", lambda: False)())


def _capturing(xp: Any) -> bool:
    return capturing_stream(xp.cuda.get_current_stream())


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
        self.passes = 0  # synchronized passes counted so far (equal on every rank)
        self.copied_at: int | None = None  # the pass whose verdict is in flight
        self.size = 1  # group size of the passes whose verdict is in flight
        # consumptions of the device latch: a copy queued before one is stale
        self._epoch = 0
        self._copy_epoch = 0
        self._own: BaseException | None = None  # this rank's own input error
        self._own_at = 0
        _LIVE.add(self)

    @property
    def pending(self) -> bool:
        """Whether a status copy is in flight (queued, not read yet)."""
        return self.copied_at is not None

    @property
    def reraise(self) -> BaseException | None:
        """The rank's own input error, raised again where the peers raise theirs."""
        return self._own

    @reraise.setter
    def reraise(self, exc: BaseException | None) -> None:
        self._own = exc
        if exc is not None:
            # The failed pass is a pass for the peers (their kernels ran it):
            # count it so that this rank reads at the same pass as they do.
            self.after_pass(self.size)
            self._own_at = self.passes

    def after_pass(self, size: int) -> None:
        """Count a synchronized pass; queue the verdict's copy if none is in flight."""
        self.passes += 1
        self.size = size
        if self.copied_at is not None:
            return  # unread: the latch keeps this pass's verdict for the next copy
        if _capturing(self.xp):
            # Inside a CUDA graph the verdict stays latched on the device;
            # the next eager pass (or check_errors() after a replay) reads it.
            return
        stream = self.xp.cuda.get_current_stream()
        if self.host is None:
            self._mem = self.xp.cuda.alloc_pinned_memory(STATUS_SIZE * 8)
            self.host = np.frombuffer(self._mem, np.float64, STATUS_SIZE)
            self.host[:] = 0
            self.event = self.xp.cuda.Event(block=False, disable_timing=True)
        rt = self.xp.cuda.runtime
        rt.memcpyAsync(self.host.ctypes.data, self.device.data.ptr, STATUS_SIZE * 8,
                       rt.memcpyDeviceToHost, stream.ptr)
        self.event.record(stream)
        self.copied_at = self.passes
        self._copy_epoch = self._epoch

    def poll(self) -> None:
        """Raise the verdict of the copy in flight if it is due and bad (start of a pass).

        A copy is due ``CHECK_EVERY`` passes after it was queued; before
        that the poll does nothing (no event query, no wait). When due, it
        waits only if the GPU has not reached that copy yet.
        """
        if self.copied_at is None or self.passes - self.copied_at < CHECK_EVERY - 1:
            return
        if _capturing(self.xp):
            # No event query inside a graph capture: CUDA's global capture
            # mode (torch.cuda.graph's default) refuses it. The verdict stays
            # pending for the next pass outside the capture (or check_errors).
            return
        if not self.event.done:
            self.event.synchronize()  # the bound: the GPU is CHECK_EVERY passes behind
        at, stale = self.copied_at, self._copy_epoch != self._epoch
        self.copied_at = None
        assert self.host is not None
        verdict = None if stale else np.array(self.host, copy=True)
        own = self._own if self._own is not None and self._own_at <= at else None
        self._settle(verdict, own)

    def check_now(self, size: int) -> None:
        """Read the verdict synchronously (strict mode, ``check_errors``)."""
        self.size = size
        own, verdict = self._own, self.xp.asnumpy(self.device)
        self._settle(verdict, own)

    def _settle(self, verdict: np.ndarray | None, own: BaseException | None) -> None:
        """Consume a read verdict (and this rank's own error); raise if either is bad."""
        bad = verdict is not None and verdict[0] != 0
        if bad:
            self.device.fill(0)  # consumed: the next verdict latches afresh
            self._epoch += 1  # a copy already in flight shows the consumed one
        if own is not None:
            self._own = None
            raise type(own)(*own.args)
        if bad:
            assert verdict is not None
            _raise_verdict(verdict, self.size)


def check_errors() -> None:
    """Raise any error the device found in a past synchronized pass.

    On the GPU path, header checks (invalid inputs on another rank, ranks out
    of step) and the unbiased-variance count check run on the device and are
    raised by a later pass of the layer, every ``CHECK_EVERY`` passes (see
    :mod:`cupysyncbn._sync.device_status`). Call this to surface them now,
    e.g. after the last step or after replaying a CUDA graph. Host
    synchronization: one per layer on the GPU path.

    Raises
    ------
    RemoteInputError, CollectiveMismatchError, ValueError
        The same exceptions the immediate check raises.
    """
    for st in list(_LIVE):
        st.check_now(st.size)
