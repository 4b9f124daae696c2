"""``scripts/gpu_check.sh`` on a machine without a GPU: a clear, fast failure.

It must stop within a minute, exit non-zero, say that there is no GPU, and
still leave its one report file (markdown ending with a JSON block). On a
machine with a GPU the script runs everything (minutes), so this test is
skipped there: ``gpu_check.sh`` itself is the check then.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import ROOT


def _has_gpu():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.skipif(_has_gpu(), reason="a GPU is present: run scripts/gpu_check.sh itself")
def test_gpu_check_without_gpu_fails_fast_and_says_why(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), WHEELS=str(tmp_path / "none"))
    t0 = time.monotonic()
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=90)
    took = time.monotonic() - t0
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert took < 60
    assert "there is no GPU on this machine" in p.stderr
    report = (tmp_path / "gpu_check.md").read_text()
    assert "FAILED: cupysyncbn GPU check: there is no GPU" in report
    block = re.search(r"```json\n(.*?)\n```", report, re.S).group(1)
    data = json.loads(block)
    assert data["status"] == "no-gpu" and data["detail"].startswith("NO GPU:")


# --- the pieces of scripts/gpu_check.py, without a GPU ----------------------

def _gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = open(f"/proc/{pid}/stat").read()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended


@pytest.mark.skipif(not os.path.isdir("/proc") or shutil.which("setsid") is None,
                    reason="needs /proc and setsid")
@pytest.mark.parametrize("hang", [False, True], ids=["exits", "hangs"])
def test_a_step_leaves_no_process_behind(tmp_path, hang):
    """A process a step started in a session of its own (as mpiexec's ranks run)
    is ended with the step, whether the step exits or runs past its budget."""
    gc = _gpu_check()
    pidfile = tmp_path / "pid"
    # the pause lets setsid leave the step's process group before the step ends
    script = f"setsid sleep 300 & echo $! > {pidfile}; sleep 1; " + (
        "sleep 300" if hang else "true")
    t0 = time.monotonic()
    rc, out = gc.run_step(["bash", "-c", script], 3, dict(os.environ), tmp_path / "log")
    assert time.monotonic() - t0 < 15
    assert rc is None if hang else rc == 0
    pid = int(pidfile.read_text())
    for _ in range(20):
        if not _alive(pid):
            break
        time.sleep(0.1)
    assert not _alive(pid), "a process of the step outlived it"


def test_killed_test_step_keeps_its_results_and_names_what_ran(tmp_path):
    gc = _gpu_check()
    (tmp_path / "test_x.py").write_text(
        "import time, pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert 1 == 2\n"
        "def test_skip(): pytest.skip('no mpiexec')\n"
        "def test_hang(): time.sleep(300)\n")
    (tmp_path / "test_broken.py").write_text("import not_a_module_here\n")
    (tmp_path / "test_skipmod.py").write_text(
        "import pytest\npytest.importorskip('not_a_module_either')\n")
    live = tmp_path / "live.jsonl"
    env = gc._env_for_children()
    env[gc.LIVE_LOG] = str(live)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_check",
           "--continue-on-collection-errors", "-o", "addopts=", str(tmp_path)]
    rc, out = gc.run_step(cmd, 20, env, tmp_path / "log")
    assert rc is None, out  # killed in test_hang: the results so far are kept
    results, collect, started = gc._read_live(live)
    assert {k.rsplit("::", 1)[1]: v[0] for k, v in results.items()} == {
        "test_ok": "passed", "test_bad": "failed", "test_skip": "skipped"}
    assert started[-1].endswith("test_hang")
    assert [v[0] for k, v in sorted(collect.items())] == ["failed", "skipped"]
    assert "not_a_module_here" in collect[next(k for k in collect if "broken" in k)][1]


def test_mpiexec_of_another_mpi_is_named(tmp_path):
    """An mpiexec that does not belong to mpi4py's MPI library fails the check, by name."""
    gc = _gpu_check()
    assert gc._mpi_family("HYDRA build details:\n    Version: 4.2") == "MPICH"
    assert gc._mpi_family("mpiexec (Open MPI) 4.1.5") == "Open MPI"
    assert gc._mpi_family("MPICH Version:      5.0.2") == "MPICH"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "mpiexec"
    fake.write_text("#!/bin/sh\necho 'mpiexec (OpenRTE) 4.1.2'\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    env = {**gc._env_for_children(), "PATH": env["PATH"]}
    rep = gc.Report(tmp_path / "r.md")
    gc.environment(rep, tmp_path, env, dry_run=True)
    pytest.importorskip("mpi4py")
    check = next(c for c in rep.data["checks"] if c["name"].startswith("mpiexec matches"))
    assert check["ok"] is False and "Open MPI" in check["detail"], check


def test_not_run_is_neither_a_pass_nor_a_failure(tmp_path):
    gc = _gpu_check()
    rep = gc.Report(tmp_path / "r.md")
    rep.check("a", True)
    rep.not_run("benchmark", "torch is not installed")
    assert rep.close() == 3
    text = (tmp_path / "r.md").read_text()
    assert "**NOT RUN** benchmark: not run: torch is not installed" in text
    data = json.loads(re.search(r"```json\n(.*?)\n```", text, re.S).group(1))
    assert data["status"] == "incomplete"


def test_budgets_leave_room_within_five_minutes():
    gc = _gpu_check()
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    shell = sum(int(t) for t in re.findall(r"timeout -k \d+ (\d+) ", script))
    assert shell == 35  # the GPU probe and the offline install
    assert sum(gc.BUDGETS.values()) + shell < 300
    assert gc.PER_TEST_TIMEOUT < gc.BUDGETS["tests"]


# --- the dry run in a fresh environment: pip install ".[cuda]" pytest only ---
#
# A new virtual environment per run would download ~500 MB (CuPy, NVRTC,
# NCCL) every time. The environment is built without the system's site
# packages from pip's cache and kept under ~/.cache, keyed by the package's
# metadata (setup.cfg, pyproject.toml): built once (about a minute with the
# wheels downloaded), then the test takes about 20 s. The checkout's code is
# what runs (gpu_check.sh puts it first on PYTHONPATH), so the environment
# only has to hold the dependencies, and it holds nothing else (no torch,
# paddle, numba or hypothesis).

def _fresh_cuda_env():
    import hashlib
    import venv

    key = hashlib.sha256(b"".join((ROOT / f).read_bytes() for f in ("setup.cfg",
                                                                       "pyproject.toml")))
    home = Path(os.path.expanduser("~")) / ".cache" / "cupysyncbn-tests"
    where = home / f"cuda-dryrun-{sys.version_info[0]}{sys.version_info[1]}-" \
                   f"{key.hexdigest()[:12]}"
    py = where / "bin" / "python"
    if (where / "READY").exists():
        return py
    shutil.rmtree(where, ignore_errors=True)
    venv.EnvBuilder(with_pip=True, system_site_packages=False, clear=True).create(where)
    p = subprocess.run([str(py), "-m", "pip", "install", "-q", f"{ROOT}[cuda]", "pytest"],
                       capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    if p.returncode != 0:
        shutil.rmtree(where, ignore_errors=True)
        if "No matching distribution" in p.stderr or "Could not fetch" in p.stderr \
                or "NewConnectionError" in p.stderr:
            pytest.skip(f"no package index here to build the [cuda] environment: "
                        f"{p.stderr.strip()[-300:]}")
        raise AssertionError(p.stderr[-3000:])
    (where / "READY").write_text("pip install .[cuda] pytest\n")
    return py



@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.skipif(_has_gpu(), reason="a GPU is present: run scripts/gpu_check.sh itself")
def test_dry_run_prepares_everything_in_a_fresh_cuda_environment(tmp_path):
    py = _fresh_cuda_env()
    have = subprocess.run([str(py), "-c", "import importlib.util as u; print([m for m in"
                           " ('torch', 'paddle', 'numba', 'hypothesis') if u.find_spec(m)])"],
                          capture_output=True, text=True, timeout=60)
    assert have.stdout.strip() == "[]", have  # the environment is really bare
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CUPY_CACHE_DIR")}
    env.update(OUT=str(tmp_path), WHEELS=str(tmp_path / "none"), PYTHON=str(py))
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    report = (tmp_path / "gpu_check.md").read_text()
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-2000:])
    data = json.loads(re.search(r"```json\n(.*?)\n```", report, re.S).group(1))
    assert data["status"] == "prepared", data
    names = {c["name"]: c for c in data["checks"]}
    assert names["every kernel instantiation compiles with NVRTC"]["ok"] is True
    # CuPy's own kernels include cuda_fp16.h/cuda_bf16.h: the [cuda] extra brings them
    headers = names["CuPy's kernels find the CUDA runtime headers (cuda_fp16.h, cuda_bf16.h)"]
    assert headers["ok"] is True, headers
    assert data["cuda_headers"]["in_environment"] is True, data["cuda_headers"]
    collected = names["GPU tests collected"]
    assert collected["ok"] is True and int(collected["detail"].split()[0]) >= 40
    # what the bare environment lacks is named as not run, never passed over
    assert any("torch" in n and c["ok"] is None for n, c in names.items()), names
    assert "steps and budgets (s): environment" in report
