"""Apply known bugs to a copy of the package and report which tests catch each.

Each mutation is an exact text replacement in one package file (issue 27's
list of bugs that once passed the suite). The script copies ``cupysyncbn/``
and ``kernels/`` to a temporary folder, applies one mutation there, and runs
the test files chosen for it with ``PYTHONPATH`` pointing at the copy (the
processes those tests launch, ``mpiexec`` included, inherit it). A mutation
whose text no longer matches the source is reported as stale; one that no
test catches makes the script exit non-zero.

Usage::

    python scripts/mutation_check.py --list
    python scripts/mutation_check.py                      # every mutation
    python scripts/mutation_check.py nccl_null_stream int32_index
    python scripts/mutation_check.py --baseline ...       # also run the tests unmutated

``tests/system/test_mutation_patterns.py`` checks (fast, in the suite) that
every pattern still matches the current source; the full run is not part of
the suite.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("cupysyncbn", "kernels")


@dataclass(frozen=True)
class Mutation:
    """One bug: replace ``old`` by ``new`` in ``path`` (exactly once); ``tests`` should catch it."""

    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = (
    Mutation(
        "mean_term_zeroed", "backward: the mean(dy) term set to zero (every CPU backend)",
        "cupysyncbn/_sync/passes.py",
        "dx = elemt(dyv, ctx.x, cl, ctx.mean, a, mean_dy, b, ctx.dtype)",
        "dx = elemt(dyv, ctx.x, cl, ctx.mean, a, mean_dy * 0, b, ctx.dtype)",
        ("tests/nn/test_input_properties.py", "tests/nn/test_layers.py"),
    ),
    Mutation(
        "unbiased_local_count", "unbiased running variance factor from the local count",
        "cupysyncbn/_sync/passes.py",
        "running_mean, running_var, mean, var, count, momentum, unbiased,",
        "running_mean, running_var, mean, var, max(n_local, 2), momentum, unbiased,",
        ("tests/system/test_oracle_mpi.py::test_mixed_dtypes_and_options",),
    ),
    Mutation(
        "float64_in_float32", "float64 input with a float32 layer computed in float32",
        "cupysyncbn/arrays/dtypes.py",
        "if input_dtype == np.float64 or param_dtype == np.float64:",
        "if param_dtype == np.float64:",
        ("tests/nn/test_layers.py",),
    ),
    Mutation(
        "fsync_removed", "checkpoint: the file is not fsync-ed before the rename",
        "cupysyncbn/checkpoint.py",
        "os.fsync(f.fileno())", "f.flush()",
        ("tests/nn/test_checkpoint.py",),
    ),
    Mutation(
        "fsync_dir_removed", "checkpoint: the folder is not fsync-ed after the rename",
        "cupysyncbn/checkpoint.py",
        "    _fsync_dir(folder)\n", "",
        ("tests/nn/test_checkpoint.py",),
    ),
    Mutation(
        "numpy_merge_broken",
        "NumPy backend only: the cross-rank merge drops the shift correction of the variance",
        "cupysyncbn/backends/channel_math.py",
        "return mean, self.xp.maximum((q - s * s / total) / total, 0.0)",
        "return mean, self.xp.maximum(q / total, 0.0)",
        ("tests/system/test_oracle_mpi.py::test_sync_equals_local_on_whole_batch",),
    ),
    Mutation(
        "staged_copy_back_dropped",
        "MPI with CuPy buffers: the host-staged sum is not copied back to the device",
        "cupysyncbn/comm/mpi.py",
        "        buf.set(host)\n", "",
        ("tests/comm/test_stream_order.py",),
    ),
    Mutation(
        "no_sync_cuda_aware", "CUDA-aware MPI called without synchronizing the current stream",
        "cupysyncbn/comm/mpi.py",
        "cupy.cuda.get_current_stream().synchronize()", "pass",
        ("tests/comm/test_stream_order.py",),
    ),
    Mutation(
        "nccl_null_stream", "NCCL all-reduce enqueued on the null stream, not the current one",
        "cupysyncbn/comm/nccl.py",
        "nccl.NCCL_MAX if maximum else nccl.NCCL_SUM, stream.ptr",
        "nccl.NCCL_MAX if maximum else nccl.NCCL_SUM, 0",
        ("tests/comm/test_stream_order.py",
         "tests/comm/test_nccl_communicator.py::test_nccl_communicator_logic_with_fake_cupy"),
    ),
    Mutation(
        "torch_stream_ignored", "PyTorch adapter: CuPy runs on its own stream, not PyTorch's",
        "cupysyncbn/interop/torch.py",
        "return _CupyStream(cupy, t.device.index, stream.cuda_stream)",
        "return _CupyStream(cupy, t.device.index, 0)",
        ("tests/comm/test_stream_order.py",),
    ),
    Mutation(
        "torch_comm_stream_ignored",
        "comm/torch.py: CuPy buffers all-reduced on PyTorch's default stream, not CuPy's",
        "cupysyncbn/comm/torch.py",
        "torch.cuda.default_stream(dev) if ptr == 0", "torch.cuda.default_stream(dev) if True",
        ("tests/comm/test_stream_order.py",),
    ),
    Mutation(
        "int32_index", "flat kernels: a 32-bit index chosen although the grid-stride loop"
        " passes 2**31",
        "cupysyncbn/backends/cupy/backend.py",
        "if total + blocks * _THREADS < _INT32_LIMIT:", "if total < _INT32_LIMIT:",
        ("tests/backends/test_cupy_launch_config.py",),
    ),
)

BY_NAME = {m.name: m for m in MUTATIONS}


def stale(m: Mutation, root: Path = ROOT) -> str | None:
    """Why ``m`` cannot be applied to the source under ``root`` (None: it can)."""
    path = root / m.path
    if not path.is_file():
        return f"{m.path} does not exist"
    n = path.read_text().count(m.old)
    if n != 1:
        return f"{m.old!r} occurs {n} times in {m.path} (expected once)"
    return None


def _copy_package(dest: Path) -> None:
    for name in COPIED:
        shutil.copytree(ROOT / name, dest / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, list[str], str]:
    """Run ``tests`` against the package in ``copy``; (exit code, failed test ids, tail)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), str(ROOT / "tests")])
    env.pop("PYTEST_ADDOPTS", None)
    # Run from the copy: ``python -m`` puts the working folder first on sys.path.
    probe = subprocess.run(
        [sys.executable, "-c", "import cupysyncbn; print(cupysyncbn.__file__)"],
        env=env, capture_output=True, text=True, cwd=copy,
    )
    if not probe.stdout.startswith(str(copy)):
        raise SystemExit(f"the copy is not the package imported: {probe.stdout}{probe.stderr}")
    args = [str(ROOT / t) if t.startswith("tests/") else t for t in tests]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
           "--no-header", f"--rootdir={ROOT}", "-c", str(ROOT / "pyproject.toml"), *args]
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=copy,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, ["(timed out)"], ""
    # "FAILED node id - message" (ids may hold spaces: parameter values)
    failed = sorted({m.group(2) for m in re.finditer(r"^(FAILED|ERROR) (.+?)(?: - .*)?$",
                                                     res.stdout, re.MULTILINE)})
    return res.returncode, failed, "\n".join(res.stdout.splitlines()[-3:])


def _short(test_id: str) -> str:
    # ids are printed relative to the copy's folder: keep from the layer folder on
    return re.sub(r"^.*?(?=(nn|functional|_sync|backends|comm|runtime|interop|system)/)", "",
                  test_id, count=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="mutations to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--baseline", action="store_true",
                    help="first run each selected test set on the unmutated copy")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per test run")
    ap.add_argument("--show", type=int, default=6, help="catching tests shown per mutation")
    args = ap.parse_args(argv)
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:26s} {m.path}: {m.what}\n{'':26s} tests: {' '.join(m.tests)}")
        return 0
    unknown = [n for n in args.names if n not in BY_NAME]
    if unknown:
        ap.error(f"unknown mutation(s) {unknown}; --list shows them")
    chosen = [BY_NAME[n] for n in args.names] if args.names else list(MUTATIONS)
    bad = 0
    with tempfile.TemporaryDirectory(prefix="mutation_check_") as tmp:
        copy = Path(tmp)
        _copy_package(copy)
        if args.baseline:
            sets = sorted({t for m in chosen for t in m.tests})
            rc, failed, tail = _run_tests(copy, tuple(sets), args.timeout)
            print(f"baseline (unmutated): exit {rc}, {len(failed)} failing: {failed[:5]}")
            if rc != 0:
                print(tail)
                return 2
        for m in chosen:
            why = stale(m)
            if why is not None:
                print(f"{m.name}: STALE: {why}")
                bad += 1
                continue
            target = copy / m.path
            original = target.read_text()
            target.write_text(original.replace(m.old, m.new))
            t0 = time.monotonic()
            try:
                rc, failed, tail = _run_tests(copy, m.tests, args.timeout)
            finally:
                target.write_text(original)
            took = time.monotonic() - t0
            if failed:
                shown = ", ".join(_short(t) for t in failed[: args.show])
                more = f" (+{len(failed) - args.show} more)" if len(failed) > args.show else ""
                print(f"{m.name}: caught by {len(failed)} test(s) in {took:.0f} s: {shown}{more}")
            else:
                print(f"{m.name}: NOT CAUGHT ({took:.0f} s, exit {rc}): {tail}")
                bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
