"""What each rank of an ``mpiexec`` test script asserts about its own outcome.

Imported by the scripts that :func:`mpi_runner.run_mpi` launches (``tests/``
is on their ``PYTHONPATH``): every rank runs a case, checks the exception it
got (or that it got none) and prints ``OK <case> <rank>`` in one write, so
lines of different ranks never interleave.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any


def say(msg: str) -> None:
    """Print one line with a single ``write`` (no interleaving between ranks)."""
    os.write(1, (msg + "\n").encode())


def outcome(fn: Callable[[], Any]) -> BaseException | None:
    """The exception ``fn()`` raises, or None."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e
    return None


def expecter(rank: int, bad_rank: int) -> Callable[..., None]:
    """``expect(case, fn, bad=None, other=None, everyone=None, bad_rank=None)``.

    ``bad`` / ``other`` / ``everyone``: ``(exception type, regex)`` expected
    on the bad rank (``bad_rank``, or the call's own), on the other ranks, or
    on every rank; None: no exception.
    """
    default_bad = bad_rank

    def expect(case: str, fn: Callable[[], Any], bad: tuple | None = None,
               other: tuple | None = None, everyone: tuple | None = None,
               bad_rank: int | None = None) -> None:
        got = outcome(fn)
        faulty = default_bad if bad_rank is None else bad_rank
        want = everyone or (bad if rank == faulty else other)
        if want is None:
            assert got is None, (case, rank, repr(got))
        else:
            etype, pattern = want
            assert isinstance(got, etype), (case, rank, repr(got))
            assert re.search(pattern, str(got)), (case, rank, str(got))
        say(f"OK {case} {rank}")

    return expect
