"""Run a Python snippet under a real ``mpiexec`` with a hard timeout.

Multi-rank tests call :func:`run_mpi`; a hang becomes a test failure after
``timeout`` seconds (the whole process group is killed), never a stalled CI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import cupysyncbn
from cupysyncbn.runtime.env import find_mpiexec
from support import ROOT, TESTS  # noqa: F401 - ROOT is re-exported to the tests

MPIEXEC = find_mpiexec()
#: The folder holding the ``cupysyncbn`` this process runs: launched
#: processes import the same one (the checkout, unless PYTHONPATH names a copy).
PACKAGE_ROOT = Path(cupysyncbn.__file__).resolve().parents[1]


def require_mpiexec() -> str:
    """The launcher; fails the test when mpi4py imports but no launcher is found.

    mpi4py without a launcher would turn every multi-rank test into a quiet
    skip: that is a broken setup, not a reason to skip. Without mpi4py too,
    the test is skipped (a machine without MPI at all).
    """
    if MPIEXEC is not None:
        return MPIEXEC
    if _mpi4py_imports():
        pytest.fail("mpi4py imports but no mpiexec/mpirun was found beside"
                    f" {sys.executable} or on PATH (pip install mpich)")
    pytest.skip("no mpiexec and no mpi4py (pip install mpich mpi4py)")


def _mpi4py_imports() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


def mpi_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    # One thread per rank: ranks share 2 cores in CI.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    # the package this process imported (a copy under test, e.g. by
    # scripts/mutation_check.py, not necessarily the checkout), and tests/ for
    # the helpers (support.bn_ref, support.rank_outcomes, ...)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), str(TESTS),
                                         env.get("PYTHONPATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def run_job(
    cmd: list, timeout: float, what: str, env: dict, cwd: Path, merge_stderr: bool = False,
) -> subprocess.CompletedProcess:
    """Run a launcher command (``mpiexec``, ``torchrun``, ...) in its own process group.

    A run that exceeds ``timeout`` seconds has its whole process group killed
    and fails the test as a hang (``what`` names it). ``merge_stderr`` sends
    stderr into stdout.
    """
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, text=True,
        env=env, start_new_session=True, cwd=str(cwd),
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{what} hung for more than {timeout}s\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_mpi(
    code: str,
    n: int,
    timeout: float = 60,
    tmp_path: Path | None = None,
    env: dict | None = None,
    check: bool = True,
    args: tuple = (),
) -> subprocess.CompletedProcess:
    """Run ``code`` (a Python source string) on ``n`` ranks; return the result.

    With ``check`` a non-zero exit fails the test and shows every rank's output.
    A run that exceeds ``timeout`` is killed and fails the test as a hang.
    """
    mpiexec = require_mpiexec()
    folder = Path(tmp_path) if tmp_path is not None else Path(os.environ.get("TMPDIR", "/tmp"))
    script = folder / f"mpi_case_{os.getpid()}_{abs(hash(code)) % 10**8}.py"
    script.write_text(textwrap.dedent(code))
    cmd = [mpiexec, "-n", str(n), sys.executable, str(script), *map(str, args)]
    res = run_job(cmd, timeout, f"mpiexec -n {n}", mpi_env(env), folder)
    out, err = res.stdout, res.stderr
    if check and res.returncode != 0:
        pytest.fail(f"mpiexec -n {n} exited {res.returncode}\nstdout:\n{out}\nstderr:\n{err}")
    return res
