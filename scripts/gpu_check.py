"""The GPU proof in one run (called by ``scripts/gpu_check.sh``; see docs/gpu.md).

Steps, each recorded in ONE report file (markdown, ending with a JSON block):

1. environment: GPU, CUDA, CuPy, NCCL, PyTorch, mpi4py, ``mpiexec``;
2. kernel cache: a first process compiles every kernel into a fresh CuPy
   cache, a second one loads them (must take <= 1 s);
3. every test marked ``gpu`` (CuPy vs NumPy for every format x dtype, a
   tensor over 2^31 elements, forced collectives over NCCL, MPI over CuPy
   arrays on 2-3 ranks sharing the GPU, the PyTorch adapter on CUDA tensors
   on the default and a side stream); any skip or failure fails the check,
   by name;
4. benchmark: a synchronized pass (forced collectives, NCCL when it can be
   initialized here) against ``torch.nn.BatchNorm2d`` (cuDNN), outputs checked.

Exit status 0 only when every step passed. ``--bench-only`` runs step 4 in
this process (the script runs it in a subprocess, so MPI/NCCL stay out of
the main one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import sysconfig
import textwrap
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL_LOAD = r"""
import json, time
t0 = time.perf_counter()
import cupy
from cupysyncbn.backends.cupy import kernels as ks
from cupysyncbn.backends.cupy.backend import get_cupy_backend
cupy.cuda.Device(0).use()
b = get_cupy_backend()
t1 = time.perf_counter()
n = 0
for f in ks.KERNEL_FILES:
    for name in ks.name_expressions(f):
        b._kernel(f, name)
        n += 1
cupy.cuda.Device().synchronize()
t2 = time.perf_counter()
print(json.dumps({"kernels": n, "load_s": t2 - t1, "import_s": t1 - t0}))
"""


class Report:
    """Markdown written as it goes (flushed after every section) + a final JSON block."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.data: dict = {"checks": [], "status": "running"}

    def write(self, text: str = "") -> None:
        print(text, flush=True)
        self.f.write(text + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.data["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
        self.write(f"- **{'PASS' if ok else 'FAIL'}** {name}" + (f": {detail}" if detail else ""))

    def close(self) -> int:
        failed = [c["name"] for c in self.data["checks"] if not c["ok"]]
        self.data["status"] = "fail" if failed or not self.data["checks"] else "pass"
        self.data["failed"] = failed
        self.write("\n## Result\n")
        if failed:
            self.write("FAILED: " + "; ".join(failed))
        else:
            self.write(f"PASSED: all {len(self.data['checks'])} checks")
        self.write("\n```json\n" + json.dumps(self.data, indent=1, default=str) + "\n```")
        self.f.close()
        return 0 if self.data["status"] == "pass" else 1


def _env_for_children() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # mpiexec from a pip-installed mpich lives next to the interpreter's scripts
    extra = [sysconfig.get_path("scripts"), os.path.join(sysconfig.get_config_var("userbase")
                                                         or "", "bin")]
    env["PATH"] = os.pathsep.join([*extra, env.get("PATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def environment(rep: Report) -> None:
    rep.write("## Environment\n")
    info: dict = {"python": sys.version.split()[0], "platform": platform.platform()}
    for mod in ("numpy", "cupy", "torch", "mpi4py", "pytest"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "?")
        except Exception as e:
            info[mod] = f"MISSING ({type(e).__name__}: {e})"
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    info["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    info["gpus"] = cupy.cuda.runtime.getDeviceCount()
    info["gpu_memory_gib"] = round(props["totalGlobalMem"] / 2**30, 1)
    info["cc"] = f"{props['major']}.{props['minor']}"
    info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
    info["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
    from cupysyncbn.comm.nccl import nccl_version

    info["nccl"] = nccl_version()
    env = _env_for_children()
    mpiexec = None
    for d in env["PATH"].split(os.pathsep):
        for name in ("mpiexec", "mpirun"):
            if d and os.access(os.path.join(d, name), os.X_OK):
                mpiexec = mpiexec or os.path.join(d, name)
    info["mpiexec"] = mpiexec or "MISSING"
    import importlib.metadata as md

    info["cupy_packages"] = sorted({
        d.metadata["Name"] for d in md.distributions()
        if (d.metadata["Name"] or "").lower().startswith("cupy")
        and (d.metadata["Name"] or "").lower() != "cupysyncbn"})
    rep.data["environment"] = info
    for k, v in info.items():
        rep.write(f"- {k}: {v}")
    rep.check("one CuPy package in the environment", len(info["cupy_packages"]) == 1,
              ", ".join(info["cupy_packages"]))
    rep.check("NCCL loadable", info["nccl"] != "none", info["nccl"])
    rep.check("mpiexec available (from the mpich wheel or the system)", mpiexec is not None,
              str(mpiexec))


def kernel_cache(rep: Report, tmp: Path) -> None:
    rep.write("\n## Kernel cache (CuPy disk cache, name expressions)\n")
    env = _env_for_children()
    env["CUPY_CACHE_DIR"] = str(tmp / "cupy_cache")
    runs = []
    for label in ("first process (compiles)", "second process (loads)"):
        p = subprocess.run([sys.executable, "-c", KERNEL_LOAD], env=env, capture_output=True,
                           text=True, timeout=120)
        if p.returncode != 0:
            rep.check(f"kernel loading, {label}", False, p.stderr.strip()[-800:])
            return
        r = json.loads(p.stdout.strip().splitlines()[-1])
        runs.append(r)
        rep.write(f"- {label}: {r['kernels']} kernels in {r['load_s']:.2f} s"
                  f" (import {r['import_s']:.2f} s)")
    rep.data["kernel_cache"] = {"first_s": runs[0]["load_s"], "second_s": runs[1]["load_s"],
                                "kernels": runs[0]["kernels"]}
    rep.check("a second process loads every kernel from the cache in <= 1 s",
              runs[1]["load_s"] <= 1.0, f"{runs[1]['load_s']:.2f} s (first:"
              f" {runs[0]['load_s']:.2f} s)")


def gpu_tests(rep: Report, tmp: Path, extra: list[str]) -> None:
    rep.write("\n## GPU tests (pytest -m gpu)\n")
    xml = tmp / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider",
           f"--junitxml={xml}", "tests", *extra]
    try:
        import pytest_timeout  # noqa: F401

        cmd.append("--timeout=240")
    except ImportError:
        pass
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=_env_for_children(), capture_output=True,
                           text=True, timeout=float(os.environ.get("GPU_TESTS_TIMEOUT", 330)))
        out = p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or "") if isinstance(e.stdout, str) else ""
        rep.check("GPU tests finished in time", False, "pytest killed after the timeout")
    rep.write("```text\n" + "\n".join(out.strip().splitlines()[-60:]) + "\n```")
    if not xml.exists():
        rep.check("GPU tests ran", False, "no junit report (collection failed?)")
        return
    passed, failed, skipped = [], [], []
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kids = {c.tag: c for c in case}
        if "failure" in kids or "error" in kids:
            node = kids.get("failure", kids.get("error"))
            failed.append(f"{name} ({(node.get('message') or '').splitlines()[0][:200]})")
        elif "skipped" in kids:
            skipped.append(f"{name} ({(kids['skipped'].get('message') or '')[:200]})")
        else:
            passed.append(name)
    rep.data["tests"] = {"passed": len(passed), "failed": failed, "skipped": skipped,
                         "seconds": round(time.monotonic() - t0, 1)}
    rep.check("GPU tests: at least 40 ran", len(passed) + len(failed) >= 40,
              f"{len(passed)} passed")
    rep.check("GPU tests: none failed", not failed, _some(failed))
    rep.check("GPU tests: none skipped", not skipped, _some(skipped))


def _some(names: list[str], n: int = 12) -> str:
    """The first ``n`` names (all of them are in the JSON block)."""
    if not names:
        return ""
    more = f"; ... and {len(names) - n} more (all in the JSON block)" if len(names) > n else ""
    return f"{len(names)}: " + "; ".join(names[:n]) + more


def bench(rep: Report, tmp: Path) -> None:
    rep.write("\n## Benchmark: one synchronized pass vs torch.nn.BatchNorm2d (cuDNN)\n")
    out = tmp / "bench.json"
    env = _env_for_children()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--bench-only", str(out)]
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired:
        rep.check("benchmark finished", False, "killed after 150 s")
        return
    if p.returncode != 0 or not out.exists():
        rep.check("benchmark ran", False, (p.stdout + p.stderr).strip()[-1500:])
        return
    res = json.loads(out.read_text())
    rep.data["bench"] = res
    rep.write(f"communicator: {res['comm']}; {res['iters']} timed iterations, median;"
              " fwd+bwd in training mode; ratio = ours / cuDNN (lower is better)\n")
    rep.write("| shape | format | dtype | ours ms | cuDNN ms | ratio | ours GB/s |"
              " max err y | max err dx |")
    rep.write("|---|---|---|---:|---:|---:|---:|---:|---:|")
    ok = True
    for r in res["rows"]:
        rep.write(f"| {r['shape']} | {r['format']} | {r['dtype']} | {r['ours_ms']:.3f} |"
                  f" {r['torch_ms']:.3f} | {r['ratio']:.2f} | {r['gbs']:.0f} |"
                  f" {r['err_y']:.1e} | {r['err_dx']:.1e} |")
        ok = ok and r["outputs_ok"]
    rep.check("benchmark outputs equal cuDNN's within tolerance", ok,
              "tolerance: 2e-3 (float32), 2e-2 (float16), relative to max |y|, |dx|")
    rep.check("benchmark ran the synchronized path (one all-reduce per pass)",
              all(r["allreduce_per_pass"] == 1 for r in res["rows"]),
              str([r["allreduce_per_pass"] for r in res["rows"]]))


def run_bench(path: str) -> None:
    """One process: our synchronized pass vs torch (cuDNN) on the same arrays."""
    import cupy as cp
    import numpy as np
    import torch

    import cupysyncbn as sbn

    comm_kind = "none (forced collectives)"
    try:
        comm = sbn.init("nccl", force_collectives=True)
        from cupysyncbn.comm.nccl import nccl_version

        comm_kind = f"NCCL (forced collectives, NCCL {nccl_version()})"
    except Exception as e:  # no MPI singleton here: still the synchronized path
        comm = sbn.init("none", force_collectives=True)
        comm_kind += f"; NCCL not initialized: {type(e).__name__}: {e}"
    calls = [0]
    inner = comm.allreduce_sum

    def counting(buf):
        calls[0] += 1
        return inner(buf)

    comm.allreduce_sum = counting
    iters = int(os.environ.get("BENCH_ITERS", "30"))

    def timeit(fn):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        times = []
        for _ in range(iters):
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, stop))
        return float(np.median(times))

    cases = [((32, 64, 56, 56), "NCHW"), ((32, 256, 28, 28), "NCHW"),
             ((32, 2048, 7, 7), "NCHW"), ((2, 256, 100, 152), "NCHW"),
             ((32, 64, 56, 56), "NHWC")]
    rows = []
    for shape, fmt in cases:
        for dt in ("float32", "float16"):
            rows.append(_bench_case(sbn, comm, calls, timeit, shape, fmt, dt))
            torch.cuda.empty_cache()
            cp.get_default_memory_pool().free_all_blocks()
    Path(path).write_text(json.dumps({"comm": comm_kind, "iters": iters, "rows": rows}))


def _bench_case(sbn, comm, calls, timeit, shape, fmt, dt) -> dict:
    """One row: our synchronized fwd+bwd and cuDNN's on the same device memory."""
    import cupy as cp
    import torch

    c = shape[1]
    xt = torch.randn(shape, device="cuda", dtype=getattr(torch, dt)) * 2 + 1
    dyt = torch.randn(shape, device="cuda", dtype=getattr(torch, dt))
    mf = torch.channels_last if fmt == "NHWC" else torch.contiguous_format
    xt = xt.contiguous(memory_format=mf).requires_grad_(True)
    dyt = dyt.contiguous(memory_format=mf)
    perm = (0, 2, 3, 1) if fmt == "NHWC" else None  # channels_last memory == NHWC view
    x = cp.from_dlpack(xt.detach() if perm is None else xt.detach().permute(*perm))
    dy = cp.from_dlpack(dyt if perm is None else dyt.permute(*perm))
    layer = sbn.SyncBatchNorm(c, data_format=fmt, comm=comm).to("cuda")
    tbn = torch.nn.BatchNorm2d(c).cuda().to(memory_format=mf)

    def ours():
        layer(x)
        return layer.backward(dy)

    def theirs():
        xt.grad = None
        yt = tbn(xt)
        yt.backward(dyt)
        return yt

    y = layer(x)
    dx = layer.backward(dy)
    yt = theirs()
    ref_y, ref_dx = yt.detach().float(), xt.grad.float()
    if perm is not None:
        ref_y, ref_dx = ref_y.permute(*perm), ref_dx.permute(*perm)
    err_y = float((torch.from_dlpack(y).float() - ref_y).abs().max() / ref_y.abs().max())
    err_dx = float((torch.from_dlpack(dx).float() - ref_dx).abs().max() / ref_dx.abs().max())
    tol = 2e-3 if dt == "float32" else 2e-2
    calls[0] = 0
    layer(x)
    per_pass = calls[0]
    layer.backward(dy)
    t_ours, t_torch = timeit(ours), timeit(theirs)
    return {
        "shape": "x".join(map(str, shape)), "format": fmt, "dtype": dt,
        "ours_ms": t_ours, "torch_ms": t_torch, "ratio": t_ours / t_torch,
        # ideal traffic: fwd reads x twice and writes y; bwd reads x, dy twice, writes dx
        "gbs": 8 * x.nbytes / (t_ours * 1e-3) / 1e9,
        "err_y": err_y, "err_dx": err_dx, "outputs_ok": err_y <= tol and err_dx <= tol,
        "allreduce_per_pass": per_pass,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", default=None, help="report file (markdown + JSON)")
    ap.add_argument("--bench-only", metavar="JSON", default=None, help=argparse.SUPPRESS)
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments")
    args = ap.parse_args(argv)
    if args.bench_only:
        run_bench(args.bench_only)
        return 0
    out = Path(os.environ.get("OUT") or ROOT / "gpu_check_out")
    report = Path(args.report) if args.report else out / "gpu_check.md"
    tmp = report.parent / "gpu_check_work"
    tmp.mkdir(parents=True, exist_ok=True)
    rep = Report(report)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    rep.write(f"# cupysyncbn GPU check  {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
              f"  commit {head or '?'}\n")
    t0 = time.monotonic()
    try:
        for step in (environment, lambda r: kernel_cache(r, tmp),
                     lambda r: gpu_tests(r, tmp, args.pytest_args), lambda r: bench(r, tmp)):
            try:
                step(rep)
            except Exception as e:  # record and go on: one report says everything
                rep.check(f"step crashed: {getattr(step, '__name__', 'step')}", False,
                          f"{type(e).__name__}: {e}\n" + textwrap.indent(
                              traceback.format_exc()[-1500:], "    "))
    finally:
        rep.data["seconds"] = round(time.monotonic() - t0, 1)
        rep.write(f"\n(total {rep.data['seconds']} s; report: {report})")
        code = rep.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
