"""Where new layers live, and which GPU this rank uses.

``set_device`` / ``get_device`` work like ``paddle.set_device``:

* ``'auto'`` (the default): where CuPy sees a GPU, new layers hold CuPy arrays
  on this rank's GPU; elsewhere NumPy arrays.
* ``'cpu'``: new layers hold NumPy arrays, and ``init('auto')`` picks MPI.
* ``'gpu'``: this rank's GPU (by the rule below); an error without a GPU.
* ``'gpu:N'``: GPU ``N`` (of those this process sees).

The environment variable ``CUPYSYNCBN_DEVICE`` takes the same values (``N``
alone means ``'gpu:N'``); ``set_device`` wins over it.

This rank's GPU, one rule for NCCL and for MPI over CuPy arrays:

1. ``set_device('gpu:N')`` or ``CUPYSYNCBN_DEVICE=N``: GPU ``N``;
2. a process that sees exactly one GPU (``CUDA_VISIBLE_DEVICES``, Slurm's
   ``--gpus-per-task=1``) uses it;
3. otherwise the node-local rank of the whole job modulo the GPU count. The
   node-local rank comes from the launcher (``MPI_LOCALRANKID`` of
   MPICH/Intel MPI, ``OMPI_COMM_WORLD_LOCAL_RANK``, ``MV2_COMM_WORLD_LOCAL_RANK``,
   ``PALS_LOCAL_RANKID``, ``SLURM_LOCALID``, ``LOCAL_RANK``); without one it is
   the rank in ``MPI.COMM_WORLD`` split by shared memory, which is collective
   over the whole job.

The choice is made once per process, by the first of ``init()``,
``get_device()`` or the first layer built, and made CuPy's current device
then: call ``cupysyncbn.init()`` before creating CuPy arrays of your own.
CuPy is imported only when the CUDA driver is present (or CuPy already is),
so ``import cupysyncbn`` and CPU-only machines never pay for it.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import warnings
from typing import Any

from ..arrays.devices import parse_device
from .env import DEVICE_ENV, env_local_rank, launched_size, text
from .watchdog import deadline_holding_gil, shared_watchdog

__all__ = [
    "set_device",
    "get_device",
    "layer_device",
    "this_rank_gpu",
    "choose_gpu",
    "node_local_rank",
    "visible_gpu_count",
    "parse_placement",
]

_lock = threading.RLock()
_requested: str | None = None  # set_device()'s value; None: the environment's, else 'auto'
_gpu: int | None = None  # this process's GPU, once chosen
_local_rank: int | None = None  # node-local rank in the whole job, once known
_count: int | None = None  # GPUs CuPy sees, once asked


def parse_placement(device: Any, argname: str = "device") -> str:
    """Normalize a placement to ``'auto'``, ``'cpu'``, ``'gpu'`` or ``'gpu:N'``.

    Accepts those, ``'cuda'``/``'cuda:N'`` and a bare GPU index (int or digits)
    (:func:`cupysyncbn.arrays.devices.parse_device`, spelled the placement way).

    Raises
    ------
    ValueError
        For anything else (the message names ``argname``).
    """
    d = parse_device(device, argname, allow_auto=True)
    return "gpu" + d[4:] if d.startswith("cuda") else d


def requested() -> str:
    """The placement asked for: ``set_device``'s, else ``CUPYSYNCBN_DEVICE``'s, else 'auto'."""
    if _requested is not None:
        return _requested
    raw = text(DEVICE_ENV)
    return parse_placement(raw, DEVICE_ENV) if raw else "auto"


# --------------------------------------------------------------------------- CUDA queries
def _driver_present() -> bool:
    """True when the CUDA driver library loads (cheap; no CuPy import)."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def cupy_module() -> Any:
    """The ``cupy`` module if it can see GPUs here, else None (never raises)."""
    cp = sys.modules.get("cupy")
    if cp is not None:  # already imported (by the user, or a test's stand-in)
        return cp
    if not _driver_present():
        return None
    try:
        import cupy
    except Exception:
        return None
    _warn_if_several_cupy()
    return cupy


def visible_gpu_count() -> int:
    """GPUs CuPy sees in this process (0 without CuPy, driver or GPU); cached."""
    global _count
    if _count is None:
        cp = cupy_module()
        n = 0
        if cp is not None:
            try:
                n = int(cp.cuda.runtime.getDeviceCount())
            except Exception:  # no driver / insufficient driver / no device
                n = 0
        _count = n
    return _count


def gpu_identity(device: int) -> str:
    """``host/PCI-bus-id`` of GPU ``device``: equal for two ranks on the same GPU."""
    import socket

    cp = cupy_module()
    try:
        bus = str(cp.cuda.runtime.deviceGetPCIBusId(device))
    except Exception:  # pragma: no cover - very old CuPy
        bus = f"device{device}"
    return f"{socket.gethostname()}/{bus.lower()}"


def _warn_if_several_cupy() -> None:
    """Warn when two CuPy packages share this environment (they overwrite each other)."""
    try:
        import importlib.metadata as md

        names = sorted({
            (d.metadata["Name"] or "").lower() for d in md.distributions()
            if (d.metadata["Name"] or "").lower().startswith("cupy")
            and (d.metadata["Name"] or "").lower() not in ("cupysyncbn",)
        })
    except Exception:  # pragma: no cover - broken metadata
        return
    if len(names) > 1:
        warnings.warn(
            f"several CuPy packages are installed together ({', '.join(names)}); they"
            " overwrite each other's files: keep one (pip uninstall the others)",
            UserWarning, stacklevel=3,
        )


# --------------------------------------------------------------------------- the rule
def choose_gpu(ndev: int, local_rank: int | None, forced: int | None = None) -> int:
    """The GPU of this rank from what it sees (the rule in the module docstring).

    Parameters
    ----------
    ndev : int
        GPUs visible to this process (> 0).
    local_rank : int or None
        Node-local rank in the whole job (None: not needed, or unknown = 0).
    forced : int, optional
        ``set_device('gpu:N')`` / ``CUPYSYNCBN_DEVICE=N``.

    Raises
    ------
    ValueError
        If ``forced`` is not a visible GPU.
    """
    if ndev <= 0:
        raise ValueError("no GPU visible to this process")
    if forced is not None:
        if not 0 <= forced < ndev:
            raise ValueError(
                f"GPU {forced} was requested (set_device / {DEVICE_ENV}) but this"
                f" process sees {ndev} GPU(s): 0..{ndev - 1}"
            )
        return forced
    if ndev == 1:
        return 0
    return (local_rank or 0) % ndev


def node_local_rank() -> int:
    """The rank of this process among the job's processes on its node; cached.

    From the launcher's variable (see :data:`.env.LOCAL_RANK_VARS`) when set;
    otherwise, in a job of several processes, from ``MPI.COMM_WORLD`` split
    by shared memory (collective over the whole job); 0 for one process.
    """
    global _local_rank
    with _lock:
        if _local_rank is not None:
            return _local_rank
        from_env = env_local_rank()
        if from_env is not None:
            _local_rank = from_env
            return _local_rank
        mpi = sys.modules.get("mpi4py.MPI")
        initialized = mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized()
        if initialized or launched_size() > 1:
            if mpi is None:
                # The first import runs MPI_Init, which waits for every process.
                with deadline_holding_gil():
                    from mpi4py import MPI
            else:
                MPI = mpi

            world = MPI.COMM_WORLD
            if world.Get_size() > 1:
                # Collective over the whole job: a rank that never joins ends
                # the job after the timeout, not a hang.
                with shared_watchdog().watching(
                    "the node-local rank (MPI.COMM_WORLD.Split_type(COMM_TYPE_SHARED) over"
                    f" all {world.Get_size()} ranks of the job, to choose this rank's GPU)"
                ):
                    node = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
                try:
                    _local_rank = node.Get_rank()
                finally:
                    node.Free()
                return _local_rank
        _local_rank = 0
        return _local_rank


def this_rank_gpu() -> int:
    """The GPU of this process by the rule, chosen once and made CuPy's current device.

    Ignores a ``'cpu'``/``'auto'`` preference (``init('nccl')`` needs a GPU
    even when layers stay on the CPU).

    Raises
    ------
    ValueError
        Without a visible GPU, or for a requested GPU index out of range.
    """
    global _gpu
    with _lock:
        want = requested()
        forced = int(want[4:]) if want.startswith("gpu:") else None
        if _gpu is None or (forced is not None and forced != _gpu):
            ndev = visible_gpu_count()
            if ndev == 0:
                raise ValueError(f"no GPU visible to this process ({_no_gpu_reason()})")
            local = None if forced is not None or ndev == 1 else node_local_rank()
            _gpu = choose_gpu(ndev, local, forced)
        cupy_module().cuda.Device(_gpu).use()  # per thread in CUDA: repeat where asked
        return _gpu


def _no_gpu_reason() -> str:
    if sys.modules.get("cupy") is None and not _driver_present():
        return "no CUDA driver (libcuda) on this machine"
    try:
        import cupy
    except Exception as e:
        return f"CuPy is not importable: {e}"
    try:
        return f"CuPy sees {cupy.cuda.runtime.getDeviceCount()} GPUs"
    except Exception as e:
        return f"CuPy sees no GPU: {e}"


# --------------------------------------------------------------------------- public API
def set_device(device: str) -> str:
    """Choose where new layers live (and which GPU this rank uses).

    Parameters
    ----------
    device : {'auto', 'cpu', 'gpu', 'gpu:N'}
        See the module docstring. ``'cuda'``/``'cuda:N'`` are accepted too.

    Returns
    -------
    str
        :func:`get_device` after the change.

    Raises
    ------
    ValueError
        For an unknown value, ``'gpu'`` without a visible GPU, or ``'gpu:N'``
        with ``N`` not a visible GPU (nothing is changed then).
    """
    global _requested
    want = parse_placement(device)
    with _lock:
        old = _requested
        _requested = want
        try:
            return get_device()
        except ValueError:
            _requested = old
            raise


def get_device() -> str:
    """Where new layers live: ``'cpu'`` or ``'gpu:N'`` (as ``paddle.get_device``).

    Under ``'auto'`` (the default) this rank's GPU when CuPy sees one, else
    ``'cpu'``. The first call that finds a GPU chooses it (see the module
    docstring) and makes it CuPy's current device.

    Raises
    ------
    ValueError
        When ``'gpu'``/``'gpu:N'`` was requested and is not available.
    """
    want = requested()
    if want == "cpu":
        return "cpu"
    if want == "auto" and visible_gpu_count() == 0:
        return "cpu"
    return f"gpu:{this_rank_gpu()}"


def layer_device() -> str | None:
    """``'cuda:N'`` when new layers belong on a GPU, else None (stay NumPy)."""
    dev = get_device()
    return None if dev == "cpu" else "cuda:" + dev[4:]


def _reset_for_tests() -> None:
    """Forget every cached choice (tests swap the CUDA stand-in between cases)."""
    global _requested, _gpu, _local_rank, _count
    with _lock:
        _requested = _gpu = _local_rank = _count = None
