"""Communicators: creation, auto-selection and the process-wide default.

``init(backend='auto')`` picks:

* ``'nccl'`` when CuPy sees a GPU and NCCL is available and the job has more
  than one rank or an MPI communicator was given;
* ``'mpi'`` when the process runs under ``mpiexec``/``srun`` (or ``mpi_comm``
  is given) and mpi4py imports;
* ``'torch'`` before those when ``torch.distributed`` is initialized (a
  ``torchrun`` job; see :func:`_auto_torch`);
* ``'none'`` otherwise (one process; no MPI library needed), except under a
  launcher that started several processes without any group to synchronize
  over: then :func:`_refuse_unsynchronized_launch` raises instead of silently
  computing local statistics.

``init('torch')`` (or ``mpi_comm=`` a ``torch.distributed.ProcessGroup``)
synchronizes over a PyTorch process group; ``torch`` is never imported by
``import cupysyncbn``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ..errors import CommunicatorError
from .base import LOCAL, Communicator, NoCommunicator

__all__ = [
    "Communicator",
    "NoCommunicator",
    "init",
    "get_default_comm",
    "set_default_comm",
    "as_communicator",
    "launched_size",
]

_BACKENDS = ("auto", "nccl", "mpi", "none", "torch")
_default: Communicator | None = None

# Variables that process managers set: MPICH/Hydra, Open MPI, PMIx, Slurm.
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS")
_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def launched_size() -> int:
    """World size announced by the process manager (1 when not launched by one)."""
    for var in _SIZE_VARS:
        val = os.environ.get(var)
        if val and val.isdigit():
            return int(val)
    if any(os.environ.get(v) for v in _RANK_VARS):
        return 2  # launched by an MPI process manager of unknown size
    return 1


def _cupy_gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def init(backend: str = "auto", mpi_comm: Any = None) -> Communicator:
    """Create a communicator and make it the default for layers with ``comm=None``.

    Parameters
    ----------
    backend : {'auto', 'nccl', 'mpi', 'none', 'torch'}
        Which collective library to use (see the module docstring for 'auto').
        ``'torch'``: ``torch.distributed`` (after ``init_process_group``).
    mpi_comm : mpi4py.MPI.Comm or torch.distributed.ProcessGroup, optional
        The group to synchronize over (default ``MPI.COMM_WORLD``, or the
        default torch group for ``'torch'``). Use a sub-communicator
        (``MPI.COMM_WORLD.Split(color)``, ``torch.distributed.new_group``) to
        sync a sub-group.

    Returns
    -------
    Communicator
        The new default communicator.

    Raises
    ------
    ValueError
        For an unknown ``backend``.
    CommunicatorError
        When the requested backend cannot be created here.
    """
    global _default
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}; got {backend!r}")
    comm = _create(backend, mpi_comm)
    _default = comm
    return comm


def _create(backend: str, mpi_comm: Any) -> Communicator:
    torch_comm = _create_torch(backend, mpi_comm)
    if torch_comm is not None:
        return torch_comm
    if backend == "none":
        if mpi_comm is not None and mpi_comm.Get_size() != 1:
            raise ValueError("backend='none' cannot synchronize an mpi_comm of size > 1")
        return NoCommunicator()
    if backend == "auto":
        if mpi_comm is None and launched_size() == 1:
            _refuse_unsynchronized_launch()
            return NoCommunicator()
        if _cupy_gpu_available():
            try:
                return _create("nccl", mpi_comm)
            except CommunicatorError:
                pass
        return _create("mpi", mpi_comm)
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise CommunicatorError(
            f"backend {backend!r} needs mpi4py: pip install mpi4py (and mpich if the"
            " machine has no MPI library)"
        ) from e
    world = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
    if backend == "mpi":
        from .mpi import MPICommunicator

        return MPICommunicator(world)
    from .nccl import NCCLCommunicator

    return NCCLCommunicator(world)


def get_default_comm() -> Communicator:
    """The default communicator, created with ``init('auto')`` on first use."""
    global _default
    if _default is None:
        _default = _create("auto", None)
    return _default


def set_default_comm(comm: Communicator | None) -> None:
    """Replace the default communicator (``None`` resets to lazy auto)."""
    global _default
    _default = None if comm is None else as_communicator(comm)


def as_communicator(comm: Any) -> Communicator:
    """Accept a :class:`Communicator`, an mpi4py or torch.distributed group, or ``None``.

    ``None`` is the default communicator; a ``torch.distributed.ProcessGroup``
    gets its one :class:`~cupysyncbn.comm.torch.TorchCommunicator`.

    Raises
    ------
    TypeError
        For anything else.
    """
    if comm is None:
        return get_default_comm()
    if isinstance(comm, Communicator):
        return comm
    torch_comm = _torch_group_communicator(comm)
    if torch_comm is not None:
        return torch_comm
    mod = type(comm).__module__ or ""
    if mod.startswith("mpi4py"):
        from .mpi import MPICommunicator

        return MPICommunicator(comm)
    raise TypeError(
        "comm must be a cupysyncbn Communicator, an mpi4py.MPI.Comm, a"
        " torch.distributed.ProcessGroup or None;"
        f" got {type(comm).__name__}"
    )


# -- torch.distributed (issue 13): small functions, kept apart for merging ----

# Variables that framework launchers set: torchrun / torch.distributed.launch
# and paddle.distributed.launch.
_LAUNCHER_SIZE_VARS = ("WORLD_SIZE", "PADDLE_TRAINERS_NUM")
_LAUNCHER_RANK_VARS = ("RANK", "PADDLE_TRAINER_ID")


def _torch_group_communicator(comm: Any) -> Communicator | None:
    """The communicator of a ``torch.distributed.ProcessGroup``; None for anything else."""
    from .torch import communicator_for, is_process_group

    return communicator_for(comm) if is_process_group(comm) else None


def _create_torch(backend: str, group: Any) -> Communicator | None:
    """``init('torch'[, group])``, a ProcessGroup given to ``init``, or 'auto' under torchrun."""
    from .torch import communicator_for, is_process_group

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
    from .torch import torch_world_size

    n = torch_world_size()
    return n > 1 or (n == 1 and launched_size() == 1)


def _framework_group_active() -> bool:
    """A framework's process group exists (PyTorch or Paddle), looked up without imports."""
    from .torch import torch_world_size

    if torch_world_size() > 0:
        return True
    pdist = sys.modules.get("paddle.distributed")
    is_init = getattr(pdist, "is_initialized", None)
    try:
        return bool(is_init()) if callable(is_init) else False
    except Exception:  # pragma: no cover - best effort
        return False


def _launcher_env() -> str:
    """``'VAR=value, ...'`` when a framework launcher started several processes, else ''."""
    found = []
    for var in _LAUNCHER_SIZE_VARS:
        val = os.environ.get(var, "")
        if val.isdigit() and int(val) > 1:
            found.append(f"{var}={val}")
    for var in _LAUNCHER_RANK_VARS:
        val = os.environ.get(var, "")
        if val.isdigit() and (found or int(val) > 0):  # a rank > 0 is never a lone process
            found.append(f"{var}={val}")
    return ", ".join(found)


def _refuse_unsynchronized_launch() -> None:
    """Raise when 'auto' would compute local statistics in a multi-process launch.

    Raises
    ------
    CommunicatorError
        When ``torchrun``/``paddle.distributed.launch`` started this process
        as one of several but there is neither an MPI world nor a framework
        process group to synchronize over.
    """
    env = _launcher_env()
    if not env or _framework_group_active():
        return
    raise CommunicatorError(
        f"cupysyncbn: this process is one of several started by a launcher ({env}) but"
        " there is no MPI world and no torch.distributed or Paddle process group, so"
        " batch statistics would silently be local. Under torchrun call"
        " torch.distributed.init_process_group() before the first training pass"
        " (cupysyncbn then synchronizes over it), or pass comm=<ProcessGroup> /"
        " cupysyncbn.init('torch'); under python -m paddle.distributed.launch call"
        " paddle.distributed.init_parallel_env(); or launch with mpiexec -n K. For"
        " deliberately local statistics call cupysyncbn.init('none')."
    )


LOCAL_COMM = LOCAL
