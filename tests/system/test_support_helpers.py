"""The test helpers themselves: a missing launcher must fail, not skip."""

import sys
from pathlib import Path

import pytest
from support import mpi_runner


def test_missing_launcher_fails_when_mpi4py_imports(monkeypatch):
    pytest.importorskip("mpi4py")
    monkeypatch.setattr(mpi_runner, "MPIEXEC", None)
    with pytest.raises(pytest.fail.Exception, match="no mpiexec"):
        mpi_runner.run_mpi("print(1)", 2)


def test_launcher_found_beside_the_interpreter(monkeypatch, tmp_path):
    exe = tmp_path / "python"
    exe.write_text("")
    launcher = tmp_path / "mpiexec"
    launcher.write_text("#!/bin/sh\n")
    launcher.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(exe))
    monkeypatch.setenv("PATH", "/nonexistent")
    assert mpi_runner.find_mpiexec() == str(launcher)
    launcher.unlink()
    assert mpi_runner.find_mpiexec() is None
    assert Path(mpi_runner.ROOT, "cupysyncbn").is_dir()
