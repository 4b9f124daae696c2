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
from support.mpi_runner import ROOT, mpi_env, require_mpiexec

from cupysyncbn._sync import protocol

pytestmark = pytest.mark.mpi


RECORDER = """
class Rec:
    def clear(self):
        self.n = 0
    def summary(self):
        return {"kernels": 3, "ops": 1, "syncs": 0, "d2h": 0}
REC = Rec()
"""


def _bench(tmp_path, *args, env=None):
    require_mpiexec()
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--smoke", "--device", "cpu",
         *args], cwd=tmp_path, env=mpi_env(env), capture_output=True, text=True, timeout=300,
    )


def test_bench_smoke_rows_bytes_and_collectives(tmp_path):
    out = tmp_path / "bench"
    (tmp_path / "fakerec.py").write_text(RECORDER)
    # 1x8x6x6 on 2 ranks: rank 1 holds no sample (the uneven split SyncBN exists for)
    res = _bench(tmp_path, "--shapes", "1x8x6x6", "--recorder", "fakerec:REC",
                 "--out", str(out), env={"PYTHONPATH": str(tmp_path)})
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
        want = [n // k + (i < n % k) for i in range(k)]  # ceil for the first n % k ranks
        assert r["rank_batches"] == want and sum(want) == n
        assert r["local_shape"][0] == want[0]
        assert r["launches_fwd"] == r["launches_bwd"] == 4  # the recorder's kernels + ops
        assert r["syncs_fwd"] == r["syncs_bwd"] == 0
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
        assert r["paired_x_bound"] > 0
        if have_torch:
            assert r["fwdbwd_vs_torch"] == pytest.approx(r["fwdbwd_s"] / r["torch_fwdbwd_s"])
            assert r["paired_fwdbwd_vs_torch"] > 0
    md = (out / "bench.md").read_text()
    assert md.startswith("| shape (global) | fmt | dtype | K |")
    assert md.count("\n| 1x8x6x6 |") == 4
    assert "| 4/0;4/0 |" in md and "launch/sync f;b" in md
    assert "uneven splits" in md and "1x8x6x6 on 2: 1/0" in md
    assert "copy bandwidth" in md and md in res.stdout


def test_bench_errors_print_once(tmp_path):
    # argument errors: from the driver, before any rank starts
    res = _bench(tmp_path, "--shapes", "2x256", "--ranks", "4")
    assert res.returncode != 0
    assert res.stderr.count("--shapes: expected NxCxHxW") == 1, res.stderr
    # an error inside the ranks: its message once, naming the ranks
    res = _bench(tmp_path, "--ranks", "2", "--no-torch", "--recorder", "no_such_module:REC")
    assert res.returncode != 0
    assert res.stderr.count("No module named 'no_such_module'") == 1, res.stderr
    assert "[every rank]" in res.stderr and "failed" in res.stderr


def test_bench_counts_cupy_path_launches_on_the_recording_standin(tmp_path):
    """--recorder support.recording_cupy:REC: the CuPy path's per-pass budget, with no GPU."""
    import shutil

    if shutil.which("g++") is None:
        pytest.skip("the kernel emulation needs g++")
    out = tmp_path / "bench"
    res = _bench(tmp_path, "--shapes", "2x4x3x3", "--ranks", "1", "--no-torch",
                 "--recorder", "support.recording_cupy:REC", "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert {r["format"] for r in rows} == {"NCHW", "NHWC"}
    for r in rows:  # issue 10's budget: <= 3 kernels + 1 all-reduce, no host sync
        assert 1 <= r["launches_fwd"] <= 3 and 1 <= r["launches_bwd"] <= 3, r
        assert r["syncs_fwd"] == r["syncs_bwd"] == 0, r
    assert "launch/sync f;b" in res.stdout


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_resnet50_suite_arguments():
    """--suite resnet50: the 53 BatchNorm layers of ResNet-50, at N images per rank on 2 ranks."""
    bench = _bench_module()
    assert sum(n for _, _, n in bench.RESNET50_BN) == 53
    assert {c for c, _, _ in bench.RESNET50_BN} == {64, 128, 256, 512, 1024, 2048}
    a = bench.parse_args(["--suite", "resnet50", "--per-rank", "2,4"])
    shapes = bench.parse_shapes(a.shapes)
    assert len(shapes) == 2 * len(bench.RESNET50_BN)
    assert (4, 2048, 7, 7) in shapes and (8, 64, 112, 112) in shapes
    assert a.ranks == "2" and a.dtypes == "float32" and a.fixed_cost
    with pytest.raises(SystemExit, match="--per-rank"):
        bench.parse_args(["--suite", "resnet50", "--per-rank", "0"])
    # the columns add up: f+b is each repetition's forward + backward
    assert bench.quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
    s = bench.summarize([[1.0, 2.0, 3.0]] * 5, ("fwd_s", "bwd_s", "fwdbwd_s"))
    assert s["fwd_s"] + s["bwd_s"] == s["fwdbwd_s"] and s["fwdbwd_s_q1"] == 3.0


def test_bench_fixed_cost_rows_and_progress(tmp_path):
    import shutil

    out = tmp_path / "bench"
    res = _bench(tmp_path, "--no-torch", "--fixed-cost", "--gpu-host", "--formats", "NCHW",
                 "--reps", "2", "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads((out / "bench.json").read_text())
    host = [r for r in data["fixed_cost"] if r["kind"] == "gpu_host"]
    assert len(host) == 1, host
    if shutil.which("g++") is not None:  # the stand-in's emulation builds with g++
        assert host[0]["launches"] <= 3 and host[0]["host_us"] > 0, host
    fixed = [r for r in data["fixed_cost"] if r["kind"] == "fixed_cost"]
    assert sorted(r["ranks"] for r in fixed) == [1, 2]
    for r in fixed:
        assert r["shape"] == [4, 16, 4, 4]
        assert 0 < r["fixed_us_q1"] <= r["fixed_us"] <= r["fixed_us_q3"]
    for r in data["rows"]:
        assert r["fwdbwd_s_q1"] <= r["fwdbwd_s"] <= r["fwdbwd_s_q3"]
    # progress on stderr, one line per row, and where the files went
    assert res.stderr.count("row 1/1: 4x8x6x6 NCHW float32") == 2, res.stderr
    assert "fixed cost:" in res.stderr and f"wrote {out / 'bench.json'}" in res.stderr
    assert "| f+b of 4x16x4x4 NCHW float32 per rank | 2 |" in (out / "bench.md").read_text()


def test_gpu_host_path_python_calls_per_pass():
    """The CuPy path's host work per pass, counted on the null stand-in (issue 26 item 3).

    A count, not a time: Python function calls made from the package's
    modules per synchronized pass (forward and backward averaged), with
    launches recorded but not executed. Measured 125.5 calls and 68.5 us of
    thread CPU time per pass before the layers' steady-state plan and the
    cached launch shapes (2026-12-08), 40.5 calls and about 27 us after
    (stand-in's NumPy work included); the bound (1.5x) catches a regression
    such as a check, a kernel lookup or a launch shape that stopped being
    cached.
    """
    import shutil

    if shutil.which("g++") is None:
        pytest.skip("the recording stand-in needs g++")
    got = _bench_module().gpu_host_cost(reps=1, inner=5)
    assert got["launches"] <= 3  # issue 10's budget, per pass
    assert 20 < got["py_calls"] <= 60, got
    assert got["host_us_q1"] <= got["host_us"] <= got["host_us_q3"]
