"""The demo (README's first command) in a quick mode under real mpiexec."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from support.mpi_runner import ROOT, mpi_env, run_mpi

pytestmark = pytest.mark.mpi

DEMO = """
import sys
from cupysyncbn.demo import main
sys.exit(main(sys.argv[1:]))
"""


def test_demo_two_ranks_writes_summary_and_plot(tmp_path):
    out = tmp_path / "demo_out"
    res = run_mpi(
        DEMO, 2, timeout=120, tmp_path=tmp_path,
        args=("--out", out, "--steps", "40", "--device", "cpu"),
    )
    assert "SyncBN == one process on the global batch: yes" in res.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["global_batch"] == 4 and s["steps"] == 40
    assert s["dtype"] == "float64" and s["communicator"] == "mpi"
    # Every step from the same parameters: one process on the global batch up to
    # rounding; local BN differs by orders of magnitude.
    assert 0 < s["max_step_rel_diff_sync_vs_global"] <= s["step_tolerance"] < 1e-12
    assert s["max_step_rel_diff_local_vs_global"] > 1.0
    d = s["max_abs_diff_sync_vs_global"]
    assert isinstance(d, float)
    # float64: after 40 steps the trajectories still agree closely.
    assert d < 1e-10
    assert s["sync_vs_global"]["train_loss_curve"] < 1e-10
    # Local BN on 2-sample batches must clearly differ (it is the point of the demo).
    assert s["max_abs_diff_local_vs_global"] > 1e-2
    assert s["local_vs_global"]["train_loss_curve"] > 1e-3
    assert s["sync_equals_global"] is True and s["local_differs_from_global"] is True
    assert len(s["curves"]["loss_sync"]) == 40
    # every rank of the SyncBN run ends with the same parameters
    assert max(s["sync_vs_global"]["per_rank_parameters"]) < 1e-10
    png = out / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_demo_one_process_without_out(tmp_path):
    # No mpiexec, no --out: prints the summary and writes nothing.
    res = subprocess.run(
        [sys.executable, "-m", "cupysyncbn.demo", "--steps", "5", "--device", "cpu"],
        cwd=tmp_path, env=mpi_env(), capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "1 rank: the three runs coincide" in res.stdout
    assert "max relative diff 0.00e+00" in res.stdout
    assert "\r" not in res.stderr  # stderr is not a terminal: plain progress lines
    assert list(tmp_path.iterdir()) == []


def test_demo_rejects_bad_arguments(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "cupysyncbn.demo", "--steps", "0"],
        cwd=tmp_path, env=mpi_env(), capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 2 and "--steps must be >= 1" in res.stderr
    assert str(ROOT)  # the package is imported from the checkout (mpi_env sets PYTHONPATH)


def test_demo_without_matplotlib_says_how_to_get_the_plot(monkeypatch, tmp_path, capsys):
    from cupysyncbn.demo import plot as demo_plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert demo_plot.plot({"curves": {}}, tmp_path / "demo.png") is False
    assert not (tmp_path / "demo.png").exists()
    assert "cupysyncbn[plot]" in capsys.readouterr().err


@pytest.mark.parametrize("k, dtype, backend", [
    (1, "float32", "numba"), (3, "float64", "numpy"), (3, "float32", "numba"),
    (4, "float32", "numpy"), (8, "float64", "numba"),
])
def test_demo_check_passes_for_every_documented_option(tmp_path, k, dtype, backend):
    """The headline check holds on 1-8 ranks, both dtypes, both CPU backends."""
    res = run_mpi(
        DEMO, k, timeout=240, tmp_path=tmp_path,
        args=("--steps", "6", "--device", "cpu", "--dtype", dtype, "--no-plot"),
        env={"CUPYSYNCBN_CPU_BACKEND": backend},
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SyncBN == one process on the global batch: yes" in res.stdout


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_demo_reproducible_is_bitwise_one_process_for_every_dtype(tmp_path, ranks):
    for dtype in ("float64", "float32"):
        out = tmp_path / f"out_{dtype}"
        res = run_mpi(
            DEMO, ranks, timeout=180, tmp_path=tmp_path,
            args=("--out", out, "--steps", "6", "--reproducible", "--dtype", dtype,
                  "--no-plot"),
        )
        assert ("SyncBN == one process on the global batch: bitwise identical to one"
                " process") in res.stdout, res.stdout
        s = json.loads((out / "summary.json").read_text())
        assert s["reproducible"] is True and s["first_differing_step"] is None
        assert s["world_size"] == ranks and s["dtype"] == dtype
        assert s["max_abs_diff_sync_vs_global"] == 0.0
        assert s["sync_vs_global"]["train_loss_curve"] < 1e-6  # summed losses: not bitwise
        if ranks > 1:  # local BN still differs: the comparison can see a difference
            assert s["max_abs_diff_local_vs_global"] > 1e-3


def test_demo_reproducible_reports_the_first_differing_step():
    from cupysyncbn.demo import reproducible as rep
    from cupysyncbn.demo import run

    s = {"world_size": 2, "batch_per_rank": 2, "steps": 5, "global_batch": 4,
         "dtype": "float32", "device": "CPU", "communicator": "mpi", "elapsed_s": 1.0,
         "final_train_loss": dict.fromkeys(run.RUNS, 1.0),
         "eval_accuracy": dict.fromkeys(run.RUNS, 0.5),
         "max_step_rel_diff_sync_vs_global": 0.0, "max_step_rel_diff_local_vs_global": 1.0,
         "max_abs_diff_sync_vs_global": 1e-7, "max_abs_diff_local_vs_global": 1.0,
         "sync_equals_global": False, "reproducible": True, "first_differing_step": 3,
         "curves": {"drift_local": [0.5]}, "local_vs_global": {"eval_outputs": 0.1}}
    text = run._report(s, [])
    assert "NO (reproducible=True: the bits first differ at step 3)" in text
    a = np.arange(4.0)
    assert rep.same_bits({"w": a}, {"w": a.copy()})
    assert not rep.same_bits({"w": a}, {"w": a + np.array([5e-324, 0, 0, 0])})
    assert not rep.same_bits(a, a.astype(np.float32))
