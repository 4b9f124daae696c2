"""scripts/bench.py in its CI-sized mode: it runs, and its bookkeeping is right.

Speed itself is never asserted here (timings on a shared CI machine are noise);
the benchmark prints ratios and BENCHMARKS.md records them.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from mpi_runner import MPIEXEC, ROOT, mpi_env

from cupysyncbn import protocol

pytestmark = pytest.mark.mpi


def test_bench_smoke_rows_bytes_and_collectives(tmp_path):
    if MPIEXEC is None:
        pytest.skip("no mpiexec on PATH (pip install mpich)")
    out = tmp_path / "bench"
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--smoke", "--device", "cpu",
         "--out", str(out)],
        cwd=tmp_path, env=mpi_env(), capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads((out / "bench.json").read_text())
    rows = data["rows"]
    # one tiny shape x {NCHW, NHWC} x float32 x {1, 2} ranks
    assert sorted((r["format"], r["ranks"]) for r in rows) == [
        ("NCHW", 1), ("NCHW", 2), ("NHWC", 1), ("NHWC", 2)
    ]
    have_torch = importlib.util.find_spec("torch") is not None
    for r in rows:
        n, c, h, w = r["shape"]
        k = r["ranks"]
        assert r["local_shape"][0] == n // k
        xbytes = n * c * h * w * 4
        assert r["fwd_bytes"] == 3 * xbytes and r["bwd_bytes"] == 5 * xbytes
        for key in ("fwd_s", "bwd_s", "fwdbwd_s", "copy_bw"):
            assert r[key] > 0
        assert r["fwdbwd_bw"] == pytest.approx(8 * xbytes / r["fwdbwd_s"])
        assert r["fwdbwd_x_bound"] == pytest.approx(r["copy_bw"] / r["fwdbwd_bw"])
        if k == 1:
            assert r["collectives_per_step"] == 0 and r["comm_bytes_per_step"] == 0
        else:
            # one all-reduce per pass, O(C) float64 payload: header + 2 vectors each
            assert r["collectives_per_step"] == 2
            assert r["comm_bytes_per_step"] == 2 * 8 * (protocol.HEADER + 2 * c)
        if have_torch:
            assert r["fwdbwd_vs_torch"] == pytest.approx(r["fwdbwd_s"] / r["torch_fwdbwd_s"])
    md = (out / "bench.md").read_text()
    assert md.startswith("| shape (global) | fmt | dtype | K |")
    assert md.count("\n| 4x8x6x6 |") == 4
    assert "copy bandwidth" in md and md in res.stdout
