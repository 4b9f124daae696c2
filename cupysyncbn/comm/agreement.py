"""Backend agreement: every rank of a group decides the same backend together.

Each rank probes what it can do (:func:`probe`: its GPU by the placement
rule, that GPU's identity, whether NCCL loads); one small MPI all-gather
(:func:`gather`) gives every rank every rank's answer, and the decision is a
pure function of that list (:func:`decide`), so it is the same everywhere:

* ``'nccl'`` only when every rank can use NCCL and no two ranks of the group
  share a GPU; otherwise ``init('nccl')`` raises :class:`CommunicatorError`
  on every rank, and ``init('auto')`` uses MPI on every rank with a warning
  that says why;
* ``'auto'`` uses MPI without a warning when no rank wants a GPU (no GPU
  visible, or ``set_device('cpu')``).

A placement error (``CUPYSYNCBN_DEVICE`` naming a GPU the rank does not see)
raises on every rank whatever the backend.
"""

from __future__ import annotations

import warnings
from typing import Any

from ..errors import CommunicatorError
from ..runtime import placement
from ..runtime.watchdog import shared_watchdog

__all__ = [
    "probe", "gather", "decide", "placement_error", "summary", "verbose_line", "nccl_version_text",
]

NCCL_MISSING = (
    'the NCCL library is not loadable (pip install "cupysyncbn[cuda]", or'
    ' nvidia-nccl-cu12 / nvidia-nccl-cu13 for the CuPy you have)'
)


def probe(backend: str, device: int | None = None) -> dict:
    """What this rank can do; picks (and makes current) its GPU when it needs one.

    Parameters
    ----------
    backend : {'auto', 'nccl', 'mpi'}
        The backend asked for: ``'nccl'`` places this rank on a GPU even
        under ``set_device('cpu')``.
    device : int, optional
        Use this GPU instead of the placement rule (sub-group communicators
        reuse their parent's).

    Returns
    -------
    dict
        Picklable, with keys ``gpu`` (int or None), ``identity`` (host/PCI
        bus id or None), ``ndev``, ``wants_gpu``, ``fatal`` (a placement
        error, '' if none), ``problem`` (why NCCL cannot work here, '' if it
        can) and ``nccl`` (NCCL version or None).
    """
    info: dict = {"gpu": None, "identity": None, "ndev": 0, "wants_gpu": False,
                  "fatal": "", "problem": "", "nccl": None}
    try:
        want = placement.requested()
    except ValueError as e:  # a bad CUPYSYNCBN_DEVICE
        info["fatal"] = info["problem"] = str(e)
        return info
    ndev = info["ndev"] = placement.visible_gpu_count()
    explicit = want.startswith("gpu")
    info["wants_gpu"] = explicit or (want == "auto" and ndev > 0)
    if not (info["wants_gpu"] or backend == "nccl"):
        info["problem"] = "set_device('cpu')" if want == "cpu" else "no GPU visible"
        return info
    try:
        if device is not None:
            gpu = placement.choose_gpu(ndev, None, int(device))
            placement.cupy_module().cuda.Device(gpu).use()
        else:
            gpu = placement.this_rank_gpu()
    except ValueError as e:
        info["problem"] = str(e)
        if explicit:
            info["fatal"] = str(e)
        return info
    except Exception as e:  # CUDA errors: report, never leave the peers waiting
        info["problem"] = f"cannot use a GPU ({type(e).__name__}: {e})"
        return info
    info["gpu"] = gpu
    info["identity"] = placement.gpu_identity(gpu)
    try:
        from cupy.cuda import nccl
    except Exception as e:  # pragma: no cover - CuPy built without its nccl module
        info["problem"] = f"{NCCL_MISSING} ({type(e).__name__}: {e})"
        return info
    if not getattr(nccl, "available", False):
        info["problem"] = NCCL_MISSING
        return info
    try:
        info["nccl"] = int(nccl.get_version())
    except Exception:  # the version is for the verbose line only
        info["nccl"] = None
    return info


def gather(
    group: Any, backend: str, device: int | None = None, caller: str | None = None
) -> list[dict]:
    """Every rank's :func:`probe` (one ``allgather`` over ``group``, an mpi4py comm).

    The all-gather is timed by the collective watchdog: a rank that never
    joins (it exited, or chose ``init('none')``) ends the job after
    ``CUPYSYNCBN_TIMEOUT`` seconds, with a message naming ``caller``,
    instead of leaving the others blocked.

    Parameters
    ----------
    group : mpi4py.MPI.Comm
        The ranks that agree.
    backend : {'auto', 'nccl', 'mpi'}
        See :func:`probe`.
    device : int, optional
        See :func:`probe`.
    caller : str, optional
        What runs the agreement, for the watchdog's message (default
        ``"cupysyncbn.init(<backend>)"``).
    """
    info = probe(backend, device)
    if group.Get_size() == 1:  # nobody to wait for (and no watchdog thread to start)
        return group.allgather(info)
    who = caller or f"cupysyncbn.init({backend!r})"
    what = (
        f"the backend agreement of {who}, an allgather over the {group.Get_size()} ranks"
        " of its group: every rank of the group must create its communicator together"
        " (the same init() call, a backend other than 'none'; or the first synchronized"
        " pass of a layer with comm=None)"
    )
    with shared_watchdog().watching(what):
        return group.allgather(info)


def placement_error(infos: list[dict]) -> str:
    """The first rank's placement error as ``'rank r: ...'``, or ''."""
    for r, info in enumerate(infos):
        if info["fatal"]:
            return f"rank {r}: {info['fatal']}"
    return ""


def _nccl_problem(infos: list[dict]) -> str:
    for r, info in enumerate(infos):
        if info["problem"]:
            return f"rank {r}: {info['problem']}"
    seen: dict = {}
    for r, info in enumerate(infos):
        first = seen.setdefault(info["identity"], r)
        if first != r:
            return (
                f"ranks {first} and {r} would share one GPU ({info['identity']}); NCCL"
                " needs one GPU per rank (more GPUs, fewer ranks per node, or"
                " backend='mpi')"
            )
    return ""


def decide(backend: str, infos: list[dict]) -> tuple[str, str]:
    """``(backend, reason)`` from every rank's probe; the same on every rank.

    ``reason`` says why ``'auto'`` did not pick NCCL ('' when no warning is
    due: NCCL picked, or no rank wants a GPU).

    Raises
    ------
    CommunicatorError
        For a placement error on any rank, or ``backend='nccl'`` that cannot
        work on some rank.
    """
    fatal = placement_error(infos)
    if fatal:
        raise CommunicatorError(f"cannot place the ranks on GPUs: {fatal}")
    if backend == "mpi":
        return "mpi", ""
    problem = _nccl_problem(infos)
    if backend == "nccl":
        if problem:
            raise CommunicatorError(f"backend 'nccl' unavailable: {problem}")
        return "nccl", ""
    if not any(info["wants_gpu"] for info in infos):
        return "mpi", ""
    if problem:
        return "mpi", problem
    return "nccl", ""


def warn_fallback(reason: str, rank: int) -> None:
    """The ``init('auto')`` fallback warning (rank 0 of the group only)."""
    if reason and rank == 0:
        warnings.warn(
            f"cupysyncbn.init('auto'): using MPI (CuPy arrays staged through host"
            f" memory), not NCCL, on every rank: {reason}", UserWarning, stacklevel=4,
        )


def nccl_version_text(code: Any) -> str:
    """NCCL's integer version code as ``'2.21.5'`` (``'none'`` for None or 0)."""
    if not code:
        return "none"
    code = int(code)
    if code >= 10000:  # NCCL >= 2.9: major*10000 + minor*100 + patch
        return f"{code // 10000}.{code // 100 % 100}.{code % 100}"
    return f"{code // 1000}.{code // 100 % 10}.{code % 100}"


def summary(backend: str, infos: list[dict]) -> dict:
    """Numbers for the verbose line: GPUs per node, ranks per GPU, NCCL version."""
    gpus = [i["identity"] for i in infos if i["identity"] is not None]
    per_gpu: dict = {}
    for g in gpus:
        per_gpu[g] = per_gpu.get(g, 0) + 1
    return {
        "backend": backend,
        "ranks": len(infos),
        "gpus_per_node": infos[0]["ndev"] if infos else 0,
        "ranks_per_gpu": max(per_gpu.values()) if per_gpu else 0,
        "gpu": infos[0]["gpu"] if infos else None,
        "nccl": nccl_version_text(next((i["nccl"] for i in infos if i["nccl"]), None)),
    }


def verbose_line(backend: str, infos: list[dict], force_collectives: bool = False) -> str:
    """The one line ``CUPYSYNCBN_VERBOSE=1`` prints on rank 0 at ``init``."""
    s = summary(backend, infos)
    dev = "cpu" if s["gpu"] is None else f"gpu:{s['gpu']}"
    return (
        f"cupysyncbn: backend={s['backend']} ranks={s['ranks']}"
        f" gpus_per_node={s['gpus_per_node']} ranks_per_gpu={s['ranks_per_gpu']}"
        f" nccl={s['nccl']} rank0_device={dev}"
        + (" force_collectives=1" if force_collectives else "")
    )
