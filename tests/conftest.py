import os
import sys
from pathlib import Path

import numpy as np
import pytest

# tests/ on sys.path: the shared helpers are imported as ``support.<name>``
# (tests/support/); the processes the tests launch get it on PYTHONPATH from
# support.mpi_runner.mpi_env.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# conformance vectors: the shipped copy (cupysyncbn/conformance/data), see support.bn_ref.DATA
FORCE_ENV = "CUPYSYNCBN_FORCE_COLLECTIVES"

# The NumPy suite builds layers and feeds them NumPy arrays: keep new layers
# on the CPU even on a GPU machine (set_device('auto') would put them on the
# GPU). Tests of placement set their own; GPU tests move layers with .to().
os.environ.setdefault("CUPYSYNCBN_DEVICE", "cpu")

from cupysyncbn.runtime import placement  # noqa: E402 - after the environment is set

#: One reason for every GPU test on a machine without an NVIDIA driver (not
#: "CUDA driver version is insufficient", which reads like a broken install).
NO_GPU = "no NVIDIA GPU on this machine (GPU tests run where one is: scripts/gpu_check.sh)"
_HAS_DRIVER = placement._driver_present()  # loads libcuda, imports no CuPy


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # Raised here, every such skip is reported once, from this line.
    if not _HAS_DRIVER and item.get_closest_marker("gpu") is not None:
        pytest.skip(NO_GPU)


_NON_GPU_SKIPS: list = []


def pytest_runtest_logreport(report):
    if report.skipped and isinstance(report.longrepr, tuple):
        path, line, reason = report.longrepr
        if "GPU" not in reason:
            _NON_GPU_SKIPS.append(f"{path}:{line}: {reason}")


def pytest_terminal_summary(terminalreporter):
    if _NON_GPU_SKIPS:
        terminalreporter.write_line(
            f"{len(_NON_GPU_SKIPS)} test(s) skipped for a reason other than a missing GPU"
            " (a missing test dependency?): " + "; ".join(sorted(set(_NON_GPU_SKIPS))[:10])
        )


def pytest_sessionfinish(session, exitstatus):
    # On CI every dependency of the suite is installed: only GPU tests may skip.
    if _NON_GPU_SKIPS and os.environ.get("CI") and exitstatus == 0:
        session.exitstatus = 1


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, os.environ.get(var, "1"))


@pytest.fixture(scope="session")
def mpi_job(tmp_path_factory):
    """``get(job, k, backend)``: run ``tests/support/mpi_cases.py`` job on ``k`` ranks once.

    Returns the merged check dict (see :func:`support.bn_ref.parse_result`); several test
    modules share one launch per (job, k, backend) so the suite stays fast. ``k == 1``
    runs with ``CUPYSYNCBN_FORCE_COLLECTIVES=1``: one rank then runs the whole
    synchronized path (handshake, header, shift, one all-reduce per pass), as a
    one-GPU machine does over NCCL. ``backend``: the CPU backend
    (``CUPYSYNCBN_CPU_BACKEND``: ``numba`` or ``numpy``; default the package's choice).
    """
    from support import bn_ref
    from support.mpi_runner import run_mpi

    cache = {}

    def get(job, k, backend=None):
        if (job, k, backend) not in cache:
            code = "from support import mpi_cases\nmpi_cases.main()\n"
            tmp = tmp_path_factory.mktemp(f"{job}{k}{backend or ''}")
            env = {FORCE_ENV: "1"} if k == 1 else {}
            if backend is not None:
                env["CUPYSYNCBN_CPU_BACKEND"] = backend
            res = run_mpi(code, k, timeout=180, tmp_path=tmp, args=(job,), env=env or None)
            cache[job, k, backend] = bn_ref.parse_result(res.stdout)
        return cache[job, k, backend]

    return get

