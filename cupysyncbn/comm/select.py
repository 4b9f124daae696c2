"""Communicators: creation, backend agreement and the process-wide default.

``init(backend='auto')`` picks, on every rank of the group together:

* ``'none'`` for one process not launched by an MPI process manager (no MPI
  library needed);
* ``'torch'`` (collectives of ``torch.distributed``) when no MPI
  communicator is given and ``torch.distributed`` is initialized (jobs started
  by ``torchrun``; see :func:`_auto_torch`);
* ``'paddle'`` (collectives of ``paddle.distributed``) when no MPI
  communicator is given and this process already ran Paddle's
  ``init_parallel_env()`` (jobs started by ``python -m paddle.distributed.launch``);
* ``'nccl'`` when every rank can use NCCL on its own GPU (see
  :mod:`cupysyncbn.comm.agreement`: one small MPI all-gather decides);
* ``'mpi'`` otherwise, with a warning saying why when some rank wanted a GPU.

A process that a framework launcher (``torchrun``, ``paddle.distributed.launch``)
started as one of several, with neither an MPI world nor a framework group,
gets a :class:`CommunicatorError` saying how to start one instead of silently
local statistics (:func:`_refuse_unsynchronized_launch`). ``init('torch')`` (or
``mpi_comm=`` a ``torch.distributed.ProcessGroup``) synchronizes over a PyTorch
process group; ``torch`` is never imported by ``import cupysyncbn``.

Before any of that the ranks are placed on their GPUs (one rule for NCCL and
MPI, :mod:`cupysyncbn.placement`). ``force_collectives=True`` (or
``CUPYSYNCBN_FORCE_COLLECTIVES=1``) makes even a group of one run the whole
synchronized path; ``CUPYSYNCBN_VERBOSE=1`` prints one line on rank 0.
"""

from __future__ import annotations

import sys
from typing import Any

from ..errors import CommunicatorError
from ..runtime import env, placement
from ..runtime.env import launched_size
from ..runtime.watchdog import deadline_holding_gil, shared_watchdog
from . import agreement
from . import paddle as paddle_groups
from . import torch as torch_groups
from .base import Communicator, NoCommunicator
from .mpi import MPICommunicator
from .nccl import NCCLCommunicator

__all__ = [
    "Communicator",
    "NoCommunicator",
    "init",
    "get_default_comm",
    "set_default_comm",
    "as_communicator",
    "launched_size",
]

_BACKENDS = ("auto", "nccl", "mpi", "none", "paddle", "torch")
_default: Communicator | None = None



def init(
    backend: str = "auto", mpi_comm: Any = None, *, force_collectives: bool | None = None,
    strict_sync: bool | None = None,
) -> Communicator:
    """Create a communicator and make it the default for layers with ``comm=None``.

    Collective over the group (every rank calls it): the ranks agree on the
    backend, so it is the same on every rank or the same error is raised on
    every rank. Its collectives (and ``MPI_Init`` when it initializes MPI)
    are timed by the collective watchdog: a rank that never calls it (it
    exited, or called ``init('none')``) ends the job after
    ``CUPYSYNCBN_TIMEOUT`` seconds with a message naming what was waited
    for, never a hang.

    Parameters
    ----------
    backend : {'auto', 'nccl', 'mpi', 'none', 'paddle', 'torch'}
        Which collective library to use (see the module docstring for 'auto').
        ``'paddle'``: ``paddle.distributed`` collectives (after Paddle's
        ``init_parallel_env()``). ``'torch'``: ``torch.distributed``
        collectives (after ``torch.distributed.init_process_group()``).
    mpi_comm : mpi4py.MPI.Comm, optional
        The group to synchronize over (default ``MPI.COMM_WORLD``). Use a
        sub-communicator (``MPI.COMM_WORLD.Split(color)``) to sync a sub-group;
        GPUs are still chosen by the node-local rank of the whole job.
        With ``backend='paddle'``: a Paddle group (default: the global one).
        With ``backend='torch'`` (or 'auto'): a ``torch.distributed.ProcessGroup``
        (default: the default group).
    force_collectives : bool, optional
        Run the whole synchronized path (handshake, header, one all-reduce
        per pass) even in a group of one, so one process exercises every line
        a multi-rank job runs. Default: ``CUPYSYNCBN_FORCE_COLLECTIVES``.
    strict_sync : bool, optional
        GPU passes check the all-reduced header at once (one host
        synchronization per pass) instead of at the layer's next pass;
        default ``CUPYSYNCBN_STRICT_SYNC=1``.

    Returns
    -------
    Communicator
        The new default communicator.

    Raises
    ------
    ValueError
        For an unknown ``backend``.
    CommunicatorError
        On every rank, when the requested backend cannot work on some rank,
        or a GPU requested with ``set_device``/``CUPYSYNCBN_DEVICE`` does not
        exist on some rank.
    """
    global _default
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}; got {backend!r}")
    if force_collectives is not None and not isinstance(force_collectives, bool):
        raise TypeError(f"force_collectives must be a bool or None; got {force_collectives!r}")
    comm = _create(backend, mpi_comm, f"cupysyncbn.init({backend!r})")
    _set_forced(comm, force_collectives)
    if strict_sync is not None:
        comm.strict_sync = bool(strict_sync)
    _report(comm)
    _default = comm
    return comm


def _set_forced(comm: Communicator, force: bool | None) -> None:
    """Apply ``force_collectives`` (argument, else the environment variable)."""
    if force is None:
        force = env.flag(env.FORCE_ENV)
    if force:
        comm.force_collectives = True


def _create(backend: str, mpi_comm: Any, caller: str | None = None) -> Communicator:
    """The communicator ``init(backend, mpi_comm)`` makes; ``caller`` names it in timeouts."""
    caller = caller or f"cupysyncbn.init({backend!r})"
    torch_comm = _create_torch(backend, mpi_comm)
    if torch_comm is not None:
        return torch_comm
    if backend == "none":
        if mpi_comm is not None and mpi_comm.Get_size() != 1:
            raise ValueError("backend='none' cannot synchronize an mpi_comm of size > 1")
        return NoCommunicator()
    if backend == "paddle":
        return _create_paddle(mpi_comm)
    if backend == "auto":
        paddle_comm = _auto_paddle(mpi_comm)
        if paddle_comm is not None:
            return paddle_comm
        if mpi_comm is None and launched_size() == 1:
            _refuse_unsynchronized_launch()
            return _one_process()
    try:
        MPI = _import_mpi()
    except ImportError as e:
        raise CommunicatorError(
            f"backend {backend!r} needs mpi4py: pip install mpi4py (and mpich if the"
            " machine has no MPI library)"
        ) from e
    group = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
    return _agreed(backend, group, caller)


def _import_mpi() -> Any:
    """``mpi4py.MPI``, initializing MPI if needed, never blocked past the timeout."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None:
        return mpi
    # MPI_Init (run by the import, holding the GIL) waits for every process
    # of the job: a rank that exited before it would leave this one blocked.
    with deadline_holding_gil():
        return _mpi_init_waits_for_every_process_of_the_job()


def _mpi_init_waits_for_every_process_of_the_job() -> Any:
    # The name is the message: on a timeout, faulthandler's traceback shows it.
    from mpi4py import MPI

    return MPI


def _one_process() -> Communicator:
    """``init('auto')`` outside an MPI job: place this process, no communication."""
    try:
        placement.get_device()  # choose the GPU now, before any allocation
    except ValueError as e:  # a GPU index this process does not see
        raise CommunicatorError(f"cannot place the ranks on GPUs: rank 0: {e}") from e
    return NoCommunicator()


def _agreed(backend: str, group: Any, caller: str) -> Communicator:
    """The backend every rank of ``group`` agrees on (one all-gather decides).

    Every collective here is timed by the watchdog (a peer that never joins
    ends the job after ``CUPYSYNCBN_TIMEOUT``), the NCCL bootstrap included.
    """
    infos = agreement.gather(group, backend, caller=caller)
    chosen, reason = agreement.decide(backend, infos)  # raises on every rank alike
    if chosen == "nccl":
        try:
            # The bootstrap's own collectives (Dup, the unique id's broadcast,
            # the agreement on failures) are timed here as one.
            with shared_watchdog().watching(
                f"the NCCL bootstrap of {caller} (unique id broadcast and"
                f" initialization over the {group.Get_size()} ranks of the group)"
            ):
                comm: Communicator = NCCLCommunicator(group, _agreed_infos=infos)
        except CommunicatorError as e:
            if backend == "nccl":
                raise
            # NCCL initialization failed on some rank: every rank got this
            # error (its construction agrees on failures), so all fall back.
            chosen, reason = "mpi", str(e)
    if chosen == "mpi":
        agreement.warn_fallback(reason, group.Get_rank())
        comm = MPICommunicator(group)
        comm.fallback_reason = reason  # why not NCCL ('' when no GPU was wanted)
    comm._init_infos = infos  # for the verbose line
    return comm


def _report(comm: Communicator) -> None:
    """``CUPYSYNCBN_VERBOSE=1``: one line on rank 0 (backend, GPUs, NCCL)."""
    if comm.rank != 0 or not env.flag(env.VERBOSE_ENV):
        return
    infos = getattr(comm, "_init_infos", None)
    if infos is None:  # one process: describe it without communication
        infos = [agreement.probe("auto")]
    line = agreement.verbose_line(comm.backend, infos, comm.force_collectives)
    print(line, file=sys.stderr, flush=True)


def _auto_paddle(mpi_comm: Any) -> Communicator | None:
    """Paddle's global group when Paddle's distributed environment is up, else None."""
    # sys.modules only: `import cupysyncbn` and init('auto') never import Paddle.
    if mpi_comm is not None or "paddle.distributed" not in sys.modules:
        return None
    return paddle_groups.communicator_for(None) if paddle_groups.paddle_initialized() else None


def _create_paddle(group: Any) -> Communicator:
    """``init('paddle', group)``: a Paddle process group (None: the global one)."""
    return paddle_groups.communicator_for(group)


def get_default_comm() -> Communicator:
    """The default communicator, created with ``init('auto')`` on first use."""
    global _default
    if _default is None:
        comm = _create(
            "auto", None,
            "the default communicator (init('auto') at the first synchronized pass of a"
            " layer with comm=None)",
        )
        _set_forced(comm, None)
        _report(comm)
        _default = comm
    return _default


def set_default_comm(comm: Communicator | None) -> None:
    """Replace the default communicator (``None`` resets to lazy auto)."""
    global _default
    _default = None if comm is None else as_communicator(comm)


def as_communicator(comm: Any) -> Communicator:
    """Accept a :class:`Communicator`, an mpi4py, Paddle or torch.distributed group, or ``None``.

    ``None`` is the default communicator; a framework group gets its one
    communicator (:mod:`cupysyncbn.comm.paddle`, :mod:`cupysyncbn.comm.torch`).

    Raises
    ------
    TypeError
        For anything else.
    """
    if comm is None:
        return get_default_comm()
    if isinstance(comm, Communicator):
        return comm
    paddle_comm = _as_paddle_communicator(comm)
    if paddle_comm is not None:
        return paddle_comm
    torch_comm = _torch_group_communicator(comm)
    if torch_comm is not None:
        return torch_comm
    mod = type(comm).__module__ or ""
    if mod.startswith("mpi4py"):
        return MPICommunicator(comm)
    raise TypeError(
        "comm must be a cupysyncbn Communicator, an mpi4py.MPI.Comm, a Paddle group, a"
        " torch.distributed.ProcessGroup or None;"
        f" got {type(comm).__name__}"
    )


def _as_paddle_communicator(comm: Any) -> Communicator | None:
    """The communicator of a ``paddle.distributed`` group, or None for anything else."""
    if not (type(comm).__module__ or "").startswith("paddle."):
        return None
    return paddle_groups.communicator_for(comm) if paddle_groups.is_paddle_group(comm) else None


# -- torch.distributed ------------------------------------------------------


def _torch_group_communicator(comm: Any) -> Communicator | None:
    """The communicator of a ``torch.distributed.ProcessGroup``; None for anything else."""
    return torch_groups.communicator_for(comm) if torch_groups.is_process_group(comm) else None


def _create_torch(backend: str, group: Any) -> Communicator | None:
    """``init('torch'[, group])``, a ProcessGroup given to ``init``, or 'auto' under torchrun."""
    communicator_for = torch_groups.communicator_for
    is_process_group = torch_groups.is_process_group
    if backend == "torch" or is_process_group(group):
        if backend not in ("torch", "auto"):
            raise ValueError(
                f"backend={backend!r} cannot synchronize a torch.distributed.ProcessGroup;"
                " use backend='torch' (or 'auto')"
            )
        if group is not None and not is_process_group(group):
            raise TypeError(
                "backend='torch' takes a torch.distributed.ProcessGroup (or None for the"
                f" default group); got {type(group).__module__}.{type(group).__name__}"
            )
        try:
            return communicator_for(group)
        except ImportError as e:
            raise CommunicatorError("backend 'torch' needs PyTorch: pip install torch") from e
    if backend == "auto" and group is None and _auto_torch():
        return communicator_for(None)
    return None


def _auto_torch() -> bool:
    """Whether 'auto' takes the initialized default ``torch.distributed`` group.

    Only when torch is already imported (``sys.modules``); a one-process torch
    group does not hide an ``mpiexec`` job of several ranks.
    """
    n = torch_groups.torch_world_size()
    return n > 1 or (n == 1 and launched_size() == 1)


def _framework_group_active() -> bool:
    """A framework's process group exists (PyTorch or Paddle), looked up without imports."""
    if torch_groups.torch_world_size() > 0:
        return True
    if "paddle.distributed" not in sys.modules:
        return False
    try:
        return bool(paddle_groups.paddle_initialized())
    except Exception:  # pragma: no cover - best effort
        return False


def _refuse_unsynchronized_launch() -> None:
    """Raise when 'auto' would compute local statistics in a multi-process launch.

    Raises
    ------
    CommunicatorError
        When ``torchrun``/``paddle.distributed.launch`` started this process
        as one of several but there is neither an MPI world nor a framework
        process group to synchronize over.
    """
    launcher = env.launcher_env()
    if not launcher or _framework_group_active():
        return
    raise CommunicatorError(
        f"cupysyncbn: this process is one of several started by a launcher ({launcher}) but"
        " there is no MPI world and no torch.distributed or Paddle process group, so"
        " batch statistics would silently be local. Under torchrun call"
        " torch.distributed.init_process_group() before the first training pass"
        " (cupysyncbn then synchronizes over it), or pass comm=<ProcessGroup> /"
        " cupysyncbn.init('torch'); under python -m paddle.distributed.launch call"
        " paddle.distributed.init_parallel_env(); or launch with mpiexec -n K. For"
        " deliberately local statistics call cupysyncbn.init('none')."
    )
