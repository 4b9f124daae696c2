"""python -m cupysyncbn.conformance: passes for cupysyncbn, flags a wrong SyncBN."""

import configparser
import textwrap
from pathlib import Path

import numpy as np
import pytest
from support.mpi_runner import ROOT, run_mpi

from cupysyncbn import conformance as C
from cupysyncbn.conformance import __main__ as cli

# Paddle's SyncBatchNorm statistics: every rank's mean and E[x^2] weighted
# equally, whatever its batch size (wrong for uneven batches), E[x^2] - mean^2.
WRONG_IMPL = '''
import numpy as np

def paddle_average(case, rank, size):
    comm = case["comm"]
    fmt = case["format"]
    ax = -1 if fmt in ("NLC", "NHWC", "NDHWC") else 1
    w = case["weight"].astype(np.float64)
    b = case["bias"].astype(np.float64)
    eps, m, c = case["epsilon"], case["momentum"], len(w)

    def avg(v):  # sum over ranks / number of ranks
        if comm is None:
            return v
        from mpi4py import MPI
        return comm.allreduce(v, op=MPI.SUM) / size

    rm, rv, out = np.zeros(c), np.ones(c), {}
    for s in range(case["steps"]):
        x = np.moveaxis(case[f"x{s}"].astype(np.float64), ax, -1)
        dy = np.moveaxis(case[f"dy{s}"].astype(np.float64), ax, -1)
        shape = x.shape
        x, dy = x.reshape(-1, c), dy.reshape(-1, c)
        n = x.shape[0]
        mean = avg(x.mean(0) if n else np.zeros(c))
        var = avg((x * x).mean(0) if n else np.zeros(c)) - mean * mean
        inv = 1.0 / np.sqrt(var + eps)
        xhat = (x - mean) * inv
        y = xhat * w + b
        mdy = avg(dy.mean(0) if n else np.zeros(c))
        mdyx = avg((dy * xhat).mean(0) if n else np.zeros(c))
        dx = w * inv * (dy - mdy - xhat * mdyx)
        back = lambda a: np.moveaxis(a.reshape(shape), -1, ax).astype(case["dtype"])
        out[f"y{s}"], out[f"dx{s}"] = back(y), back(dx)
        out[f"dweight{s}"], out[f"dbias{s}"] = (dy * xhat).sum(0), dy.sum(0)
        rm, rv = rm * m + mean * (1 - m), rv * m + var * (1 - m)
        out[f"mean{s}"], out[f"variance{s}"] = rm.copy(), rv.copy()
    return out
'''


@pytest.fixture
def wrong_impl(tmp_path):
    p = tmp_path / "wrong_syncbn.py"
    p.write_text(textwrap.dedent(WRONG_IMPL))
    return f"{p}:paddle_average"


def test_tests_read_the_shipped_vectors():
    # The 17 vectors live once: the tests replay the copy shipped in the wheel.
    from support import bn_ref

    shipped = sorted(C.DATA_DIR.glob("*.npz"))
    assert len(shipped) == 17 and bn_ref.case_paths() == shipped
    assert not (ROOT / "tests" / "data").exists()
    assert (C.DATA_DIR / "README.md").is_file()


def test_packaging_lists_the_new_packages_and_data():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    pkgs = cfg["options"]["packages"].split()
    assert "cupysyncbn.interop" in pkgs and "cupysyncbn.conformance" in pkgs
    assert "data/*.npz" in cfg["options.package_data"]["cupysyncbn.conformance"]
    assert "torch" in cfg["options.extras_require"]


def test_split_counts():
    assert C.split_counts(6, 1) == [6]
    assert C.split_counts(6, 3) == [2, 4, 0]
    assert C.split_counts(3, 3) == [1, 2, 0]
    for n in range(0, 13):
        for size in range(1, 6):
            for mode in ("even", "uneven"):
                c = C.split_counts(n, size, mode)
                assert sum(c) == n and len(c) == size and min(c) >= 0
            if size > 1:
                assert C.split_counts(n, size)[-1] == 0
    with pytest.raises(ValueError, match="split"):
        C.split_counts(4, 2, "random")


def test_cli_passes_for_cupysyncbn_one_process(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    n = len(C.case_files())
    assert n >= 17 and f"{n}/{n} cases pass" in out
    rows = [ln for ln in out.splitlines() if ln.startswith(("paddle_", "torch_"))]
    assert len(rows) == n and all(r.endswith("  PASS") for r in rows)
    assert "conformance: PASS" in out


def test_cli_wrong_impl_one_process_and_errors(wrong_impl, capsys):
    # On one rank equal weighting is right: the Paddle float64 case passes...
    assert cli.main(["--impl", wrong_impl, "--case", "paddle_NCHW_float64"]) == 0
    # E[x^2] - mean^2 loses the variance of data with a large mean, even on one rank.
    assert cli.main(["--impl", wrong_impl, "--case", "paddle_NCHW_float64_offset1e4"]) == 1
    # ...and its biased running variance fails the PyTorch case.
    assert cli.main(["--impl", wrong_impl, "--case", "torch_*"]) == 1
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("torch_NCHW"))
    assert line.endswith("FAIL") and "!" in line
    assert cli.main(["--impl", "no_such_module_xyz:f"]) == 2
    assert cli.main(["--impl", "nocolon"]) == 2
    assert cli.main(["--case", "no_such_case"]) == 2
    assert cli.main(["--list"]) == 0
    assert "paddle_NC_float32" in capsys.readouterr().out


def test_raising_impl_is_reported_not_crashing(tmp_path, capsys):
    p = tmp_path / "bad.py"
    p.write_text("def impl(case, rank, size):\n    raise RuntimeError('not implemented here')\n")
    assert cli.main(["--impl", f"{p}:impl", "--case", "paddle_NC_*"]) == 1
    out = capsys.readouterr().out
    assert "error" in out and "RuntimeError: not implemented here" in out


def test_ranks_option_relaunches_under_mpiexec(monkeypatch):
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    monkeypatch.setattr(cli, "launched_size", lambda: 1)
    assert cli.main(["--ranks", "3", "--case", "paddle_NC_*"]) == 0
    cmd = calls[0]
    assert cmd[1:3] == ["-n", "3"] and cmd[-2:] == ["--case", "paddle_NC_*"]
    assert "--ranks" not in cmd


def test_evaluate_sums_gradients_and_checks_every_rank():
    case = C.load_case(C.DATA_DIR / "paddle_NC_float64.npz")
    counts = C.split_counts(case["x0"].shape[0], 2)
    per_rank = []
    lo = 0
    for c in counts:
        r = {}
        for s in range(case["steps"]):
            r[f"y{s}"] = case[f"y{s}"][lo : lo + c]
            r[f"dweight{s}"] = case[f"dweight{s}"] / 2  # halves sum to the global gradient
            r[f"mean{s}"] = case[f"mean{s}"]
        per_rank.append(r)
        lo += c
    res = C.evaluate(case, per_rank)
    assert res.passed and res.errors["dx"] is None and res.errors["y"] == 0.0
    per_rank[1]["mean0"] = per_rank[1]["mean0"] + 1e-3  # one rank disagrees
    res = C.evaluate(case, per_rank)
    assert not res.passed and res.failed == ["mean"]


@pytest.mark.mpi
def test_cli_three_ranks_cupysyncbn_passes_wrong_impl_fails(wrong_impl, tmp_path):
    code = """
    import sys
    from cupysyncbn.conformance.__main__ import main
    sys.exit(main(sys.argv[1:]))
    """
    args = ("--impl", "cupysyncbn.conformance.impls:cupysyncbn_layer", "--impl", wrong_impl)
    res = run_mpi(code, 3, timeout=240, tmp_path=tmp_path, args=args, check=False)
    out = res.stdout
    print(out)
    assert res.returncode != 0, out + res.stderr
    tables = out.split("implementation: ")[1:]
    assert len(tables) == 2 and "ranks: 3" in tables[0]
    n = len(C.case_files())
    assert f"{n}/{n} cases pass" in tables[0]
    rows = [ln for ln in tables[1].splitlines() if ln.startswith(("paddle_", "torch_"))]
    assert len(rows) == n and all(r.endswith("FAIL") for r in rows)
    assert all("!" in r.split()[1] for r in rows)  # y itself is wrong on an uneven split
    assert "0/" in tables[1] and "conformance: FAIL" in out


def test_tolerances_are_tight_for_float64():
    case = C.load_case(C.DATA_DIR / "torch_NCHW_float64_unbiased.npz")
    assert C.tolerance(case, "y") == (1e-9, 1e-9)
    x = np.asarray(case["y0"])
    err, ok, _ = C._compare(case, "y", x + 1e-8, x)
    assert not ok and err == pytest.approx(1e-8)


def test_readme_documents_the_command():
    assert "docs/conformance.md" in Path(ROOT / "README.md").read_text()
    text = Path(ROOT / "docs" / "conformance.md").read_text()
    assert "python -m cupysyncbn.conformance" in text


def test_table_shows_how_much_of_its_tolerance_each_case_used():
    from cupysyncbn.conformance.impls import cupysyncbn_layer

    case = C.load_case(C.case_files(pattern="paddle_NCHW_float64_offset1e4")[0])
    res = C.run_suite(cupysyncbn_layer, [case])
    assert 0 < res[0].tolerance_used < 1
    table = C.format_table(res, "x", 1, "uneven")
    assert "tol used" in table and "atol + rtol*|ref|" in table
    assert f"{res[0].tolerance_used:.1e}" in table.splitlines()[3]
