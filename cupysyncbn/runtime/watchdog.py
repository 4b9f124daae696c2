"""Make a failing rank end the whole job instead of leaving the others blocked.

Two mechanisms, both about one fact: a rank blocked in a collective waits for
every other rank, forever, unless something ends the job.

* :func:`install_abort_hook` (opt-in; the demo and the scripts install it): an
  uncaught exception on any rank, in the main thread or in any other thread,
  prints its traceback and then calls ``MPI_Abort``, which makes ``mpiexec``
  kill every rank of the job. Without it, the failing rank exits and the
  others wait forever in their next all-reduce.
* :class:`CollectiveWatchdog` (on by default on the MPI path): every
  collective in flight, from any thread and any communicator, is timed
  against its own deadline; one that has not completed after
  ``CUPYSYNCBN_TIMEOUT`` seconds (default 600; ``0`` disables) prints which
  rank waited for what and aborts the job through that collective's
  communicator (:func:`abort_job` calls ``comm.abort``). This
  covers the cases no exception announces: a rank that left the training loop
  early (fewer batches than the others) or skipped a collective (eval mode on
  one rank only), a rank stuck in a dead-lock of its own.

A rank killed by a signal (``SIGKILL``, OOM killer) needs neither: Hydra
(MPICH's ``mpiexec``) notices the abnormal exit and kills the other ranks
within about a second; Open MPI's ``mpirun`` does the same.
"""

from __future__ import annotations

import faulthandler
import itertools
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .env import (
    DEFAULT_TIMEOUT,
    TIMEOUT_ENV,
    collective_timeout,
    env_rank,
    launched_size,
    parse_timeout,
)

__all__ = [
    "install_abort_hook",
    "uninstall_abort_hook",
    "abort_job",
    "collective_timeout",
    "parse_timeout",
    "CollectiveWatchdog",
    "shared_watchdog",
    "deadline_holding_gil",
    "TIMEOUT_ENV",
    "DEFAULT_TIMEOUT",
]

_saved: dict[str, Any] = {}


def _rank_text() -> str:
    mpi = sys.modules.get("mpi4py.MPI")
    try:
        if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
            return f"rank {mpi.COMM_WORLD.Get_rank()}"
    except Exception:  # pragma: no cover - best effort only
        pass
    rank = env_rank()
    return "this process" if rank is None else f"rank {rank}"


def abort_job(comm: Any = None, errorcode: int = 1, message: str | None = None) -> None:
    """End every process of the job now (``MPI_Abort``); never returns.

    Parameters
    ----------
    comm : Communicator, optional
        Its ``abort`` is called first (an NCCL communicator aborts its NCCL
        communicator there before ``MPI_Abort``).
    errorcode : int
        Exit status reported by ``mpiexec``.
    message : str, optional
        Printed to stderr (with the rank) before aborting.

    Notes
    -----
    Falls back to ``MPI.COMM_WORLD.Abort`` and finally to ``os._exit`` (the
    process manager then kills the other ranks, as for any abnormal exit).
    """
    if message:
        sys.stderr.write(f"cupysyncbn: {_rank_text()}: {message}\n")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # pragma: no cover - closed streams
            pass
    # Give the process manager a moment to forward what was just written:
    # Hydra drops output still in flight when MPI_Abort tears the job down.
    time.sleep(0.25)
    if comm is not None:
        try:
            comm.abort(errorcode)
        except BaseException:  # noqa: BLE001 - fall through to MPI_Abort
            pass
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None:
        try:
            if mpi.Is_initialized() and not mpi.Is_finalized():
                mpi.COMM_WORLD.Abort(errorcode)
        except Exception:  # pragma: no cover - best effort
            pass
    os._exit(errorcode)


def _in_job(comm: Any) -> bool:
    if comm is not None:
        return getattr(comm, "size", 1) > 1
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None:
        try:
            return mpi.Is_initialized() and mpi.COMM_WORLD.Get_size() > 1
        except Exception:  # pragma: no cover
            return False
    return launched_size() > 1


def install_abort_hook(comm: Any = None, errorcode: int = 1) -> None:
    """Abort the whole job when any rank has an uncaught exception.

    Replaces ``sys.excepthook`` and ``threading.excepthook``: the exception's
    traceback is printed as usual (by the previous hook), then the job is
    aborted with ``MPI_Abort`` so no other rank stays blocked in a
    collective. In a single-process run (no ``mpiexec``) the hook only
    prints, as Python does. Calling it again replaces the previous
    installation.

    Parameters
    ----------
    comm : Communicator, optional
        Communicator whose ``abort`` to call (default: the world, via
        ``MPI_Abort``).
    errorcode : int
        Exit status of the aborted job.

    Notes
    -----
    Opt-in for library users (a library must not change process-wide hooks
    on import); ``python -m cupysyncbn.demo`` and the ``scripts/`` install
    it. ``sys.exit(n)`` is not an exception for this hook: a rank that exits
    while others wait is ended by the collective timeout
    (:data:`TIMEOUT_ENV`).
    """
    uninstall_abort_hook()
    prev_sys, prev_thread = sys.excepthook, threading.excepthook

    def sys_hook(etype: type, value: BaseException, tb: Any) -> None:
        prev_sys(etype, value, tb)
        if _in_job(comm):
            abort_job(comm, errorcode, f"uncaught {etype.__name__}; aborting the MPI job")

    def thread_hook(args: Any) -> None:
        if args.exc_type is SystemExit:
            return  # threading ignores SystemExit too
        prev_thread(args)
        if _in_job(comm):
            name = getattr(args.thread, "name", "?")
            abort_job(
                comm, errorcode,
                f"uncaught {args.exc_type.__name__} in thread {name!r}; aborting the MPI job",
            )

    _saved["sys"] = prev_sys
    _saved["thread"] = prev_thread
    sys.excepthook = sys_hook
    threading.excepthook = thread_hook


def uninstall_abort_hook() -> None:
    """Restore the hooks that :func:`install_abort_hook` replaced (if any)."""
    if "sys" in _saved:
        sys.excepthook = _saved.pop("sys")
    if "thread" in _saved:
        threading.excepthook = _saved.pop("thread")


class CollectiveWatchdog:
    """Aborts the job when any collective in flight runs past its deadline.

    Every collective registers itself with :meth:`begin` (from any thread, any
    communicator) and gets its own deadline, ``timeout`` seconds later; several
    may be in flight at once (two layers on two communicators driven from two
    threads, a user's own collective around ours) and each is timed on its own.
    One daemon thread, started at the first registration, wakes up a few times
    per timeout and aborts the job (:func:`abort_job`, with the collective's
    own communicator) when a deadline has passed. Registering costs a dict
    insert (well under a microsecond), so the hot path stays cheap.

    Parameters
    ----------
    timeout : float, optional
        Seconds; default :func:`collective_timeout`. ``0`` disables.
    comm : Communicator, optional
        Passed to :func:`abort_job` for collectives registered without one.
    """

    def __init__(self, timeout: float | None = None, comm: Any = None) -> None:
        if timeout is None:
            self.timeout = collective_timeout()
        else:
            self.timeout = parse_timeout(timeout, "timeout")
        self.comm = comm
        # token -> (deadline, what, comm, done); plain dict operations are
        # atomic under the GIL, so begin/end need no lock.
        self._inflight: dict[int, tuple] = {}
        self._tokens = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def stop(self) -> None:
        """End the watchdog thread (collectives registered later restart it)."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        self._stop = threading.Event()

    def begin(
        self, what: Any, comm: Any = None, done: Any = None, timeout: float | None = None
    ) -> int | None:
        """Start timing one collective; return a token for :meth:`end` (None: not timed).

        Parameters
        ----------
        what : str or int
            Description for the abort message (an int is read as the number
            of float64 values all-reduced).
        comm : Communicator, optional
            Aborted first when this collective times out (its ``abort``).
        done : callable, optional
            For asynchronous collectives (NCCL): returns True once the
            collective completed; the watchdog then forgets it by itself.
        timeout : float, optional
            This collective's timeout (default :attr:`timeout`).
        """
        limit = self.timeout if timeout is None else timeout
        if limit <= 0:
            return None
        if self._thread is None:
            self._start()
        token = next(self._tokens)
        self._inflight[token] = (time.monotonic() + limit, limit, what, comm, done)
        return token

    def end(self, token: int | None) -> None:
        """Stop timing the collective that :meth:`begin` returned ``token`` for."""
        if token is not None:
            self._inflight.pop(token, None)

    @contextmanager
    def watching(self, what: str, comm: Any = None) -> Iterator[None]:
        """Time the blocking collective run inside the ``with`` block.

        For the collectives outside the batch-norm passes (``init()``'s
        backend agreement, communicator splits): a peer that never joins
        ends the job after the timeout instead of leaving this rank blocked.

        Parameters
        ----------
        what : str
            Names what is waited for, in the abort message.
        comm : Communicator, optional
            Aborted first on a timeout (default: ``MPI_Abort`` on the world).
        """
        token = self.begin(what, comm)
        try:
            yield
        finally:
            self.end(token)

    @property
    def in_flight(self) -> int:
        """Number of collectives being timed now."""
        return len(self._inflight)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, args=(self._stop,), name="cupysyncbn-watchdog",
                    daemon=True,
                )
                self._thread.start()

    def _expired(self) -> tuple | None:
        now = time.monotonic()
        for token, entry in self._inflight.copy().items():
            deadline, limit, what, comm, done = entry
            if done is not None:
                try:
                    finished = bool(done())
                except Exception:  # noqa: BLE001 - a broken probe counts as not done
                    finished = False
                if finished:
                    self._inflight.pop(token, None)
                    continue
            if now > deadline:
                return entry
        return None

    def _run(self, stop: threading.Event) -> None:
        while True:
            limits = [e[1] for e in self._inflight.copy().values()] or [self.timeout or 8.0]
            if stop.wait(min(max(min(limits) / 8.0, 0.05), 5.0)):
                return
            entry = self._expired()
            if entry is None:
                continue
            _, limit, what, comm, _ = entry
            if not isinstance(what, str):
                what = f"all-reduce of {what} float64"
            abort_job(
                comm if comm is not None else self.comm, 1,
                f"a collective ({what}) has not completed after"
                f" {limit:g} s: another rank is not taking part (it exited,"
                " crashed, hangs, skipped a pass or called a layer fewer times)."
                f" Aborting the job. Set {TIMEOUT_ENV}=seconds to change the"
                " timeout (0 disables).",
            )


_shared: CollectiveWatchdog | None = None


def shared_watchdog() -> CollectiveWatchdog:
    """The process-wide watchdog the MPI communicators use (one thread in all).

    Its timeout is read from ``CUPYSYNCBN_TIMEOUT`` when first used; change it
    later with ``shared_watchdog().timeout = seconds``.
    """
    global _shared
    if _shared is None:
        _shared = CollectiveWatchdog()
    return _shared


@contextmanager
def deadline_holding_gil(timeout: float | None = None) -> Iterator[None]:
    """End this process (exit status 1) if the block runs past ``timeout`` seconds.

    For blocking calls that hold the GIL, where the watchdog's Python thread
    cannot run: ``MPI_Init``, which ``import mpi4py.MPI`` runs under the
    import lock, waits for every process of the job, so a rank that exited
    before initializing MPI leaves it blocked. Uses :mod:`faulthandler`'s
    C-level timer, which prints every thread's traceback (naming where the
    process waited) and exits; the process manager then ends the other ranks.
    The timer is process-wide: one set with ``faulthandler.dump_traceback_later``
    by the program is cancelled when the block ends.

    Parameters
    ----------
    timeout : float, optional
        Seconds; default :func:`collective_timeout` (``0`` disables).
    """
    limit = collective_timeout() if timeout is None else parse_timeout(timeout, "timeout")
    if limit <= 0:
        yield
        return
    try:
        # File descriptor 2, not sys.stderr: the program may have redirected
        # sys.stderr to an object without a file descriptor.
        faulthandler.dump_traceback_later(limit, exit=True, file=2)
    except (OSError, ValueError):  # no usable stderr: run untimed rather than fail
        yield
        return
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
