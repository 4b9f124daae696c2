"""Communicators: creation, auto-selection and the process-wide default.

``init(backend='auto')`` picks:

* ``'nccl'`` when CuPy sees a GPU and NCCL is available and the job has more
  than one rank or an MPI communicator was given;
* ``'mpi'`` when the process runs under ``mpiexec``/``srun`` (or ``mpi_comm``
  is given) and mpi4py imports;
* ``'none'`` otherwise (one process; no MPI library needed).
"""

from __future__ import annotations

import os
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

_BACKENDS = ("auto", "nccl", "mpi", "none")
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


def init(
    backend: str = "auto", mpi_comm: Any = None, *, strict_sync: bool | None = None
) -> Communicator:
    """Create a communicator and make it the default for layers with ``comm=None``.

    Parameters
    ----------
    backend : {'auto', 'nccl', 'mpi', 'none'}
        Which collective library to use (see the module docstring for 'auto').
    mpi_comm : mpi4py.MPI.Comm, optional
        The group to synchronize over (default ``MPI.COMM_WORLD``). Use a
        sub-communicator (``MPI.COMM_WORLD.Split(color)``) to sync a sub-group.
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
        When the requested backend cannot be created here.
    """
    global _default
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}; got {backend!r}")
    comm = _create(backend, mpi_comm)
    if strict_sync is not None:
        comm.strict_sync = bool(strict_sync)
    _default = comm
    return comm


def _create(backend: str, mpi_comm: Any) -> Communicator:
    if backend == "none":
        if mpi_comm is not None and mpi_comm.Get_size() != 1:
            raise ValueError("backend='none' cannot synchronize an mpi_comm of size > 1")
        return NoCommunicator()
    if backend == "auto":
        if mpi_comm is None and launched_size() == 1:
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
    """Accept a :class:`Communicator`, an ``mpi4py.MPI.Comm`` or ``None`` (default).

    Raises
    ------
    TypeError
        For anything else.
    """
    if comm is None:
        return get_default_comm()
    if isinstance(comm, Communicator):
        return comm
    mod = type(comm).__module__ or ""
    if mod.startswith("mpi4py"):
        from .mpi import MPICommunicator

        return MPICommunicator(comm)
    raise TypeError(
        "comm must be a cupysyncbn Communicator, an mpi4py.MPI.Comm or None;"
        f" got {type(comm).__name__}"
    )


LOCAL_COMM = LOCAL
