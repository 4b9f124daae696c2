"""Make a failing rank end the whole job instead of leaving the others blocked.

Two mechanisms, both about one fact: a rank blocked in a collective waits for
every other rank, forever, unless something ends the job.

* :func:`install_abort_hook` (opt-in; the demo and the scripts install it): an
  uncaught exception on any rank, in the main thread or in any other thread,
  prints its traceback and then calls ``MPI_Abort``, which makes ``mpiexec``
  kill every rank of the job. Without it, the failing rank exits and the
  others wait forever in their next all-reduce.
* :class:`CollectiveWatchdog` (on by default on the MPI path): a collective
  that has not completed after ``CUPYSYNCBN_TIMEOUT`` seconds (default 600;
  ``0`` disables) prints which rank waited for what and aborts the job. This
  covers the cases no exception announces: a rank that left the training loop
  early (fewer batches than the others) or skipped a collective (eval mode on
  one rank only), a rank stuck in a dead-lock of its own.

A rank killed by a signal (``SIGKILL``, OOM killer) needs neither: Hydra
(MPICH's ``mpiexec``) notices the abnormal exit and kills the other ranks
within about a second; Open MPI's ``mpirun`` does the same.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

__all__ = [
    "install_abort_hook",
    "uninstall_abort_hook",
    "abort_job",
    "collective_timeout",
    "CollectiveWatchdog",
    "shared_watchdog",
    "TIMEOUT_ENV",
    "DEFAULT_TIMEOUT",
]

#: Environment variable: seconds a collective may take before the job aborts.
TIMEOUT_ENV = "CUPYSYNCBN_TIMEOUT"
#: Default collective timeout in seconds (PyTorch's NCCL default is 10 minutes too).
DEFAULT_TIMEOUT = 600.0

_saved: dict[str, Any] = {}


def _rank_text() -> str:
    mpi = sys.modules.get("mpi4py.MPI")
    try:
        if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
            return f"rank {mpi.COMM_WORLD.Get_rank()}"
    except Exception:  # pragma: no cover - best effort only
        pass
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(var):
            return f"rank {os.environ[var]}"
    return "this process"


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
    from .comm import launched_size

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


def collective_timeout() -> float:
    """The collective timeout in seconds from ``CUPYSYNCBN_TIMEOUT`` (0: none).

    Raises
    ------
    ValueError
        When the variable is set to something that is not a number >= 0.
    """
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds; got {raw!r}") from None
    if not value >= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be >= 0 (0 disables); got {raw!r}")
    return value


class CollectiveWatchdog:
    """Aborts the job when a guarded collective runs longer than ``timeout``.

    One daemon thread per watchdog, started at the first guarded call, wakes
    up a few times per timeout; the guarded call itself only stores a
    timestamp (about a microsecond), so the hot path stays cheap.

    Parameters
    ----------
    timeout : float, optional
        Seconds; default :func:`collective_timeout`. ``0`` disables.
    comm : Communicator, optional
        Passed to :func:`abort_job`.
    """

    def __init__(self, timeout: float | None = None, comm: Any = None) -> None:
        self.timeout = collective_timeout() if timeout is None else float(timeout)
        self.comm = comm
        self._since: float | None = None
        self._what = ""
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def guard(self, what: str) -> _Guard:
        """Context manager around one blocking collective described by ``what``."""
        return _Guard(self, what)

    def begin(self, what: Any) -> bool:
        """Start timing a collective (``what``: text or a float64 count); cheapest form.

        Returns whether this call started the timing; pass it to :meth:`end`.
        """
        if self.timeout <= 0 or self._since is not None:
            return False
        if self._thread is None:
            self._start()
        self._what = what
        self._since = time.monotonic()
        return True

    def end(self, started: bool) -> None:
        """Stop timing the collective that :meth:`begin` started."""
        if started:
            self._since = None

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="cupysyncbn-watchdog", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        tick = min(max(self.timeout / 8.0, 0.05), 5.0)
        while True:
            time.sleep(tick)
            since = self._since
            if since is not None and time.monotonic() - since > self.timeout:
                what = self._what
                if not isinstance(what, str):
                    what = f"all-reduce of {what} float64"
                abort_job(
                    self.comm, 1,
                    f"a collective ({what}) has not completed after"
                    f" {self.timeout:g} s: another rank is not taking part (it exited,"
                    " crashed, hangs, skipped a pass or called a layer fewer times)."
                    f" Aborting the MPI job. Set {TIMEOUT_ENV}=seconds to change the"
                    " timeout (0 disables).",
                )


class _Guard:
    __slots__ = ("_dog", "_what", "_outer")

    def __init__(self, dog: CollectiveWatchdog, what: str) -> None:
        self._dog = dog
        self._what = what

    def __enter__(self) -> None:
        dog = self._dog
        if dog.timeout <= 0:
            return
        if dog._thread is None:
            dog._start()
        self._outer = dog._since  # nested guards (e.g. a user barrier) keep the outer start
        if self._outer is None:
            dog._what = self._what
            dog._since = time.monotonic()

    def __exit__(self, *exc: Any) -> None:
        dog = self._dog
        if dog.timeout > 0 and self._outer is None:
            dog._since = None


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
