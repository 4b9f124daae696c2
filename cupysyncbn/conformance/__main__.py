"""``python -m cupysyncbn.conformance``: run the reference vectors, print a table.

Examples
--------
::

    python -m cupysyncbn.conformance                      # cupysyncbn, one process
    python -m cupysyncbn.conformance --ranks 3            # relaunch under mpiexec -n 3
    mpiexec -n 3 python -m cupysyncbn.conformance --impl mymod:my_syncbn
    python -m cupysyncbn.conformance --impl path/to/impl.py:fn --case 'paddle_NCHW*'

Exit status 0 when every case of every implementation passes, 1 otherwise,
2 for usage errors; the same on every rank.

An implementation that raises on some ranks only leaves the others inside its
collectives, where nothing this CLI does can reach them: the raising rank
waits :data:`RAISE_GRACE_S` seconds for the others to finish the case too
(they report normally when they do, e.g. when every rank raised), then prints
its error and aborts the job (exit status 1 on every rank), instead of
leaving the peers waiting for the collective timeout.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from typing import Any, Callable

from ..runtime.env import collective_timeout, find_mpiexec, launched_size
from ..runtime.watchdog import abort_job
from . import case_files, format_table, load_case, load_impl, run_suite

DEFAULT_IMPL = "cupysyncbn.conformance.impls:cupysyncbn_layer"

#: Seconds a rank whose implementation raised waits for the others.
RAISE_GRACE_S = 10.0


def _no_hang(impl: Callable, comm: Any, spec: str) -> Callable:
    """``impl``, followed on every rank by a barrier that cannot block forever.

    The barrier runs on a duplicate of ``comm`` (never mixed with the
    implementation's own messages). A rank whose call raised waits
    :data:`RAISE_GRACE_S` for it; a rank whose call returned waits the
    collective timeout (``CUPYSYNCBN_TIMEOUT``). Past that, the other ranks
    are stuck inside the implementation, and the job is aborted.
    """
    sync = comm.Dup()

    def wrapped(case: dict, rank: int, size: int) -> Any:
        err: BaseException | None = None
        try:
            return impl(case, rank, size)
        except BaseException as e:
            err = e
            raise
        finally:
            req = sync.Ibarrier()
            limit = RAISE_GRACE_S if err is not None else (collective_timeout() or float("inf"))
            t0 = time.monotonic()
            while not req.Test():
                if time.monotonic() - t0 > limit:
                    if err is not None:
                        why = (
                            f"--impl {spec} raised on this rank ({type(err).__name__}: {err})"
                            f" in case {case.get('name', '?')!r} while other ranks are still"
                            " inside it (in its collectives)"
                        )
                    else:
                        why = (
                            f"other ranks have not finished --impl {spec} on case"
                            f" {case.get('name', '?')!r} after {limit:g} s"
                        )
                    abort_job(None, 1, f"conformance: {why}; aborting the job")
                time.sleep(0.002)

    return wrapped


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cupysyncbn.conformance",
        description="Check a synchronized batch norm against reference vectors"
        " (PaddlePaddle and PyTorch on the global batch).",
    )
    p.add_argument(
        "--impl", action="append", metavar="MODULE:CALLABLE",
        help="implementation to check, impl(case, rank, size) -> dict (see"
        f" cupysyncbn.conformance); repeatable; default {DEFAULT_IMPL}",
    )
    p.add_argument("--case", default="*",
                   help="glob of case names, e.g. 'paddle_NCHW*' (default all)")
    p.add_argument("--data", default=None, help="folder of .npz vectors (default: shipped ones)")
    p.add_argument("--split", choices=("uneven", "even"), default="uneven",
                   help="how the global batch is cut across ranks (uneven: last rank empty)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="passed to the implementation (cupysyncbn: NumPy or CuPy arrays)")
    p.add_argument("--ranks", type=int, default=None,
                   help="relaunch under 'mpiexec -n RANKS' (when not already under mpiexec)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    return p


def _relaunch(argv: list[str], ranks: int) -> int:
    mpiexec = find_mpiexec()
    if mpiexec is None:
        print("--ranks needs mpiexec on PATH (pip install mpich)", file=sys.stderr)
        return 2
    rest, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--ranks":
            skip = i + 1 < len(argv)
            continue
        if a.startswith("--ranks="):
            continue
        rest.append(a)
    cmd = [mpiexec, "-n", str(ranks), sys.executable, "-m", "cupysyncbn.conformance", *rest]
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    """Run the suite; return the exit status (0: all pass)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    launched = launched_size()
    if args.ranks is not None and args.ranks < 1:
        print("--ranks must be >= 1", file=sys.stderr)
        return 2
    if args.ranks is not None and launched == 1 and args.ranks > 1:
        return _relaunch(argv, args.ranks)
    comm = None
    if launched > 1:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    rank = 0 if comm is None else comm.Get_rank()
    size = 1 if comm is None else comm.Get_size()
    files = case_files(args.data, args.case)
    if args.list:
        if rank == 0:
            print("\n".join(f.stem for f in files))
        return 0
    if not files:
        if rank == 0:
            print(f"no vectors match {args.case!r} in {args.data or 'the shipped data'}",
                  file=sys.stderr)
        return 2
    cases = [load_case(f) for f in files]
    ok = True
    for spec in args.impl or [DEFAULT_IMPL]:
        try:
            impl = load_impl(spec)
        except Exception as e:
            if rank == 0:
                print(f"cannot load --impl {spec}: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        if comm is not None:
            impl = _no_hang(impl, comm, spec)
        results = run_suite(impl, cases, comm, args.split, args.device)
        if rank == 0:
            print(format_table(results, spec, size, args.split))
            print()
            ok = ok and all(r.passed for r in results)
    if comm is not None:
        ok = comm.bcast(ok, root=0)
    if rank == 0:
        print("conformance: PASS" if ok else "conformance: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
