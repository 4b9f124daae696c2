"""The environment, read in one place: every launcher variable and ``CUPYSYNCBN_*`` name.

Nothing else in the package calls ``os.environ``: a variable's name, its
default and how its value is parsed are written once, here, so the same
spelling means the same thing everywhere. True/false variables follow one
rule (:func:`flag`): ``1/true/yes/on`` and ``0/false/no/off`` (any case),
unset or empty gives the default, anything else raises a ``ValueError``
naming the variable.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "TIMEOUT_ENV", "NCCL_TIMEOUT_ENV", "DEFAULT_TIMEOUT", "DEVICE_ENV", "CPU_BACKEND_ENV",
    "STRICT_SYNC_ENV", "FORCE_ENV", "VERBOSE_ENV", "CUDA_AWARE_ENV", "NCCL_ABORT_ENV",
    "REPRODUCIBLE_ENV",
    "RANK_VARS", "SIZE_VARS", "LOCAL_RANK_VARS", "LAUNCHER_SIZE_VARS", "LAUNCHER_RANK_VARS",
    "flag", "text", "parse_timeout", "collective_timeout", "launched_size", "launcher_env",
    "env_rank", "env_local_rank", "find_mpiexec",
]

#: Seconds a collective may take before the job aborts (``0`` disables).
TIMEOUT_ENV = "CUPYSYNCBN_TIMEOUT"
#: The NCCL communicator's own timeout (falls back to :data:`TIMEOUT_ENV`).
NCCL_TIMEOUT_ENV = "CUPYSYNCBN_NCCL_TIMEOUT"
#: Default collective timeout in seconds (PyTorch's NCCL default is 10 minutes too).
DEFAULT_TIMEOUT = 600.0
#: Where new layers live: ``auto``, ``cpu``, ``gpu``, ``gpu:N`` (see runtime.placement).
DEVICE_ENV = "CUPYSYNCBN_DEVICE"
#: The CPU backend: ``auto`` (numba when it imports), ``numba``, ``numpy``.
CPU_BACKEND_ENV = "CUPYSYNCBN_CPU_BACKEND"
#: Read every GPU pass's verdict at once (a host sync per pass).
STRICT_SYNC_ENV = "CUPYSYNCBN_STRICT_SYNC"
#: Run the synchronized path (collectives) even on one process.
FORCE_ENV = "CUPYSYNCBN_FORCE_COLLECTIVES"
#: Rank 0 prints the agreed backend at ``init()``.
VERBOSE_ENV = "CUPYSYNCBN_VERBOSE"
#: MPI may be handed device buffers (CUDA-aware MPI) instead of host-staged copies.
CUDA_AWARE_ENV = "CUPYSYNCBN_CUDA_AWARE_MPI"
#: An NCCL error or timeout aborts the whole job (default on).
NCCL_ABORT_ENV = "CUPYSYNCBN_NCCL_ABORT"
#: ``reproducible`` of layers and functional calls that do not set it
#: (docs/reproducibility.md); a true/false :func:`flag`, default false.
REPRODUCIBLE_ENV = "CUPYSYNCBN_REPRODUCIBLE"

#: Variables that process managers set, in the order they are trusted:
#: MPICH/Hydra, Open MPI, PMIx, Slurm (the one list the package reads).
RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS")
#: Node-local rank of the whole job, most specific first (an MPI launcher
#: inside a Slurm allocation sets its own variable; ``SLURM_LOCALID`` is right
#: only under ``srun``).
LOCAL_RANK_VARS = (
    "MPI_LOCALRANKID",  # MPICH / Intel MPI (Hydra)
    "OMPI_COMM_WORLD_LOCAL_RANK",  # Open MPI
    "MV2_COMM_WORLD_LOCAL_RANK",  # MVAPICH2
    "PALS_LOCAL_RANKID",  # Cray PALS
    "SLURM_LOCALID",  # srun
    "LOCAL_RANK",  # torchrun, paddle.distributed.launch
)
#: Variables that framework launchers set without an MPI world: torchrun /
#: torch.distributed.launch, paddle.distributed.launch.
LAUNCHER_SIZE_VARS = ("WORLD_SIZE", "PADDLE_TRAINERS_NUM")
LAUNCHER_RANK_VARS = ("RANK", "PADDLE_TRAINER_ID")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def text(name: str, default: str = "") -> str:
    """The variable's value, stripped; ``default`` when unset or blank."""
    return os.environ.get(name, "").strip() or default


def flag(name: str, default: bool = False) -> bool:
    """A true/false variable, by the package's one rule.

    Raises
    ------
    ValueError
        For a value that is neither true nor false, naming the variable.
    """
    raw = text(name).lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(
        f"{name} must be one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}; got"
        f" {os.environ.get(name)!r}"
    )


def parse_timeout(raw: Any, name: str = TIMEOUT_ENV) -> float:
    """Seconds from a timeout setting: a number >= 0 (``0`` disables).

    The one parser of every cupysyncbn timeout (``CUPYSYNCBN_TIMEOUT``,
    ``CUPYSYNCBN_NCCL_TIMEOUT``, a ``timeout=`` argument), so they all accept
    and refuse the same values.

    Raises
    ------
    ValueError
        For anything that is not a finite or infinite number >= 0, naming ``name``.
    """
    if isinstance(raw, bool):
        raise ValueError(f"{name} must be a number of seconds; got {raw!r}")
    try:
        value = float(raw.strip() if isinstance(raw, str) else raw)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of seconds; got {raw!r}") from None
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0 (0 disables); got {raw!r}")
    return value


def collective_timeout(env: str = TIMEOUT_ENV) -> float:
    """The collective timeout in seconds from the environment (0: none).

    Parameters
    ----------
    env : str
        Variable to read; when it is unset or empty the package-wide
        ``CUPYSYNCBN_TIMEOUT`` is used, and when that is unset too
        :data:`DEFAULT_TIMEOUT`.

    Raises
    ------
    ValueError
        When the variable is set to something that is not a number >= 0.
    """
    for var in dict.fromkeys((env, TIMEOUT_ENV)):
        raw = text(var)
        if raw:
            return parse_timeout(raw, var)
    return DEFAULT_TIMEOUT


def launched_size() -> int:
    """World size announced by the process manager (1 when not launched by one)."""
    for var in SIZE_VARS:
        val = text(var)
        if val.isdigit():
            return int(val)
    if any(text(v) for v in RANK_VARS):
        return 2  # launched by an MPI process manager of unknown size
    return 1


def launcher_env() -> str:
    """``'VAR=value, ...'`` when a framework launcher started several processes, else ''."""
    found = []
    for var in LAUNCHER_SIZE_VARS:
        val = text(var)
        if val.isdigit() and int(val) > 1:
            found.append(f"{var}={val}")
    for var in LAUNCHER_RANK_VARS:
        val = text(var)
        if val.isdigit() and (found or int(val) > 0):  # a rank > 0 is never a lone process
            found.append(f"{var}={val}")
    return ", ".join(found)


def env_rank() -> str | None:
    """The rank of this process as the process manager wrote it, or None."""
    for var in RANK_VARS:
        val = text(var)
        if val:
            return val
    return None


def env_local_rank() -> int | None:
    """The node-local rank from the launcher's variables (:data:`LOCAL_RANK_VARS`), or None."""
    for var in LOCAL_RANK_VARS:
        raw = text(var)
        if raw.isdigit():
            return int(raw)
    return None


def find_mpiexec() -> str | None:
    """The MPI launcher: beside this Python first, then on ``PATH``; None if neither.

    A virtual environment's ``bin/`` (where ``pip install mpich`` puts
    ``mpiexec``) is often not on ``PATH`` when its Python is run by full path.
    """
    here = Path(sys.executable).parent
    for name in ("mpiexec", "mpirun"):
        cand = here / name
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return shutil.which("mpiexec") or shutil.which("mpirun")
