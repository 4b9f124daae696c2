"""The GPU proof in one run (called by ``scripts/gpu_check.sh``; see docs/gpu.md).

Steps, each in its own process under its own time budget, each recorded in
ONE report file as it finishes (markdown, ending with a JSON block):

1. environment: GPU, CUDA, CuPy, NCCL, PyTorch, mpi4py, ``mpiexec`` (and
   whether it matches mpi4py's MPI library);
2. kernels: a first process compiles every kernel into the kernel cache that
   every later step shares, a second one loads them (must take <= 1 s);
3. the GPU tests: only the test modules that hold ``gpu`` tests, ``-m gpu``,
   with a per-test timeout; each result is logged as it comes (a killed step
   keeps what ran); a collection error is named and the rest still runs;
4. benchmark: a synchronized pass over NCCL (an NCCL that fails to
   initialize fails the step) against ``torch.nn.BatchNorm2d`` (cuDNN).

Budgets add up to less than 5 minutes with ``gpu_check.sh``'s probe and
install. After each step every process it started is ended, those of
multi-rank jobs in their own sessions included (found by a token in their
environment). Whatever the image lacks is reported as ``NOT RUN: <reason>``,
never as a pass. Exit status: 0 all passed, 1 something failed, 3 nothing
failed but something could not run.

``--dry-run`` (no GPU needed): the environment, every kernel compiled with
NVRTC, the GPU tests collected, the steps listed with their budgets; exit 0
when all of that worked.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: (step, budget in seconds); with gpu_check.sh's probe (15 s) and install
#: (20 s) they add up to 290 s.
BUDGETS = {"environment": 15, "kernels": 55, "tests": 145, "bench": 40}
PER_TEST_TIMEOUT = 60
STEP_TOKEN = "CUPYSYNCBN_GPU_CHECK_STEP"
LIVE_LOG = "CUPYSYNCBN_GPU_CHECK_LIVE"

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

# No GPU needed: what RawModule hands to NVRTC, for the H100/H200 architecture.
KERNEL_COMPILE = r"""
import json, sys, time
from cupy.cuda import nvrtc
from cupysyncbn.backends.cupy import kernels as ks
archs = nvrtc.getSupportedArchs()
arch = 90 if 90 in archs else max(a for a in archs if a <= 90)
t0 = time.perf_counter()
n = 0
for f in ks.KERNEL_FILES:
    names = ks.name_expressions(f)
    prog = nvrtc.createProgram(ks.read_source(f), f, [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(prog, name)
        opts = [*ks.COMPILE_OPTIONS, "--device-as-default-execution-space",
                f"--gpu-architecture=sm_{arch}"]
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError as e:
            raise SystemExit(f"{f}: {e}\n{nvrtc.getProgramLog(prog)}")
        n += len(names)
    finally:
        nvrtc.destroyProgram(prog)
# CuPy's own kernels (astype, fill, the unfused path's arithmetic) include
# cuda_fp16.h / cuda_bf16.h from the CUDA runtime headers, which NVRTC does not
# ship: CuPy finds them with cuda.pathfinder, as here.
import os, cupy
try:
    from cuda.pathfinder import find_nvidia_header_directory
    cudart = find_nvidia_header_directory("cudart")
except Exception as e:  # an older CuPy without cuda.pathfinder
    cudart = None
    print(f"cuda.pathfinder: {type(e).__name__}: {e}")
headers = {"cudart": cudart, "in_environment": bool(cudart) and os.path.realpath(
    cudart).startswith(os.path.realpath(sys.prefix))}
if cudart:
    src = ("#include <cupy/carray.cuh>\n#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n"
           'extern "C" __global__ void k(__half* a, __nv_bfloat16* b) {'
           " a[0] = __float2half(1.0f); b[0] = __float2bfloat16(1.0f); }\n")
    prog = nvrtc.createProgram(src, "cupy_headers.cu", [], [])
    try:
        nvrtc.compileProgram(prog, [
            "-I" + os.path.join(os.path.dirname(cupy.__file__), "_core", "include"),
            "-I" + cudart, "--std=c++17", "--device-as-default-execution-space",
            f"--gpu-architecture=sm_{arch}"])
        headers["compiles"] = True
    except nvrtc.NVRTCError:
        headers["compiles"] = False
        headers["log"] = nvrtc.getProgramLog(prog)[-600:]
    finally:
        nvrtc.destroyProgram(prog)
print(json.dumps({"kernels": n, "arch": arch, "nvrtc": list(nvrtc.getVersion()),
                  "compile_s": time.perf_counter() - t0, "headers": headers}))
"""

ENV_PROBE = r"""
import json, platform, sys
info = {"python": sys.version.split()[0], "platform": platform.platform()}
for mod in ("numpy", "cupy", "torch", "mpi4py", "pytest", "pytest_timeout", "hypothesis"):
    try:
        m = __import__(mod)
        info[mod] = getattr(m, "__version__", "present")
    except Exception as e:
        info[mod] = f"MISSING ({type(e).__name__}: {e})"
try:
    import mpi4py
    mpi4py.rc.initialize = False  # the library's name needs no MPI_Init
    from mpi4py import MPI
    info["mpi4py_library"] = MPI.Get_library_version().strip().splitlines()[0]
except Exception as e:
    info["mpi4py_library"] = f"MISSING ({type(e).__name__}: {e})"
try:
    import cupy
    n = cupy.cuda.runtime.getDeviceCount()
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"]
    info["gpu"] = name.decode() if isinstance(name, bytes) else name
    info["gpus"] = n
    info["gpu_memory_gib"] = round(props["totalGlobalMem"] / 2**30, 1)
    info["cc"] = f"{props['major']}.{props['minor']}"
    info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
    info["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
except Exception as e:
    info["gpu"] = f"NONE ({type(e).__name__}: {e})"
try:
    from cupysyncbn.comm.nccl import nccl_version
    info["nccl"] = nccl_version()
except Exception as e:
    info["nccl"] = f"none ({type(e).__name__}: {e})"
import importlib.metadata as md
info["cupy_packages"] = sorted({
    d.metadata["Name"] for d in md.distributions()
    if (d.metadata["Name"] or "").lower().startswith("cupy")
    and (d.metadata["Name"] or "").lower() != "cupysyncbn"})
print(json.dumps(info))
"""


class Report:
    """Markdown written as it goes (flushed after every line) + a final JSON block.

    A check is passed (True), failed (False) or not run (None, with the reason).
    """

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

    def check(self, name: str, ok: bool | None, detail: str = "") -> None:
        self.data["checks"].append({"name": name, "ok": ok, "detail": detail})
        word = {True: "PASS", False: "FAIL", None: "NOT RUN"}[ok]
        self.write(f"- **{word}** {name}" + (f": {detail}" if detail else ""))

    def not_run(self, name: str, reason: str) -> None:
        self.check(name, None, f"not run: {reason}")

    def close(self, dry_run: bool = False) -> int:
        checks = self.data["checks"]
        failed = [c["name"] for c in checks if c["ok"] is False]
        not_run = [f"{c['name']} ({c['detail']})" for c in checks if c["ok"] is None]
        if failed or not checks:
            status, code = "fail", 1
        elif not_run and not dry_run:
            status, code = "incomplete", 3
        else:
            status, code = ("prepared" if dry_run else "pass"), 0
        self.data.update(status=status, failed=failed, not_run=not_run)
        self.write("\n## Result\n")
        if failed:
            self.write("FAILED: " + "; ".join(failed))
        if not_run:
            self.write("NOT RUN: " + "; ".join(not_run))
        if status in ("pass", "prepared"):
            self.write(f"{status.upper()}: all {len(checks)} checks"
                       + (" (dry run: nothing ran on a GPU)" if dry_run else ""))
        self.write("\n```json\n" + json.dumps(self.data, indent=1, default=str) + "\n```")
        self.f.close()
        return code


def _env_for_children(cache: Path | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "scripts"), *filter(None, [env.get("PYTHONPATH")])])
    # mpiexec from a pip-installed mpich lives next to the interpreter's scripts
    extra = [sysconfig.get_path("scripts"), os.path.join(sysconfig.get_config_var("userbase")
                                                         or "", "bin")]
    env["PATH"] = os.pathsep.join([*extra, env.get("PATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    if cache is not None:
        env["CUPY_CACHE_DIR"] = str(cache)  # one warm kernel cache for every step
    return env


def _ours(token: str) -> list[int]:
    """Processes whose environment carries ``token``: those a step started."""
    needle = f"{STEP_TOKEN}={token}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                pids.append(int(d.name))
        except OSError:
            continue  # gone, or not ours to read
    return pids


def _end_all(proc: subprocess.Popen, token: str) -> int:
    """End the step's process group and every process started under its token."""
    killed = 0
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for _ in range(3):  # mpiexec's ranks run in sessions of their own
        pids = _ours(token)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.2)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass
    return killed


def run_step(cmd: list[str], budget: float, env: dict, log: Path) -> tuple[int | None, str]:
    """Run ``cmd`` in a session of its own for at most ``budget`` s; ``(rc or None, output)``.

    The output goes to ``log`` as it comes; afterwards nothing it started is left.
    """
    token = uuid.uuid4().hex
    env = dict(env, **{STEP_TOKEN: token})
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            rc = None
        left = _end_all(proc, token)
    text = log.read_text(encoding="utf-8", errors="replace")
    if left:
        text += f"\n[gpu_check: ended {left} leftover process(es) of this step]\n"
    return rc, text


def _tail(text: str, n: int = 1500) -> str:
    return text.strip()[-n:]


def _mpi_family(text: str) -> str:
    t = text.lower()
    if "open mpi" in t or "openrte" in t:
        return "Open MPI"
    if "intel(r) mpi" in t or "intel mpi" in t:
        return "Intel MPI"
    if "hydra" in t or "mpich" in t:
        return "MPICH"
    return "unknown"


def _find_mpiexec(env: dict) -> str | None:
    for d in env["PATH"].split(os.pathsep):
        for name in ("mpiexec", "mpirun"):
            path = os.path.join(d, name)
            if d and os.access(path, os.X_OK):
                return path
    return None


def environment(rep: Report, tmp: Path, env: dict, dry_run: bool) -> None:
    rep.write("## Environment\n")
    rc, out = run_step([sys.executable, "-c", ENV_PROBE], BUDGETS["environment"], env,
                       tmp / "environment.log")
    if rc != 0:
        rep.check("environment probed", False,
                  "timed out" if rc is None else _tail(out))
        return
    info = json.loads(out.strip().splitlines()[-1])
    mpiexec = _find_mpiexec(env)
    info["mpiexec"] = mpiexec or "MISSING"
    if mpiexec:
        try:
            v = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                               timeout=10, env=env, stdin=subprocess.DEVNULL)
            info["mpiexec_family"] = _mpi_family(v.stdout + v.stderr)
        except (OSError, subprocess.TimeoutExpired) as e:
            info["mpiexec_family"] = f"unknown ({type(e).__name__})"
    rep.data["environment"] = info
    for k, v in info.items():
        rep.write(f"- {k}: {v}")
    if not dry_run:
        rep.check("one CuPy package in the environment", len(info["cupy_packages"]) == 1,
                  ", ".join(info["cupy_packages"]))
        nccl = str(info["nccl"])
        rep.check("NCCL loadable", not nccl.startswith("none"), nccl)
    for mod, why in (("pytest", "the GPU tests"), ("torch", "the benchmark and the PyTorch"
                                                   " adapter's GPU tests")):
        if str(info.get(mod, "")).startswith("MISSING"):
            rep.not_run(f"{mod} installed", f"{mod} is missing ({why}): put its wheel in the"
                        " wheel folder")
    lib = str(info.get("mpi4py_library", ""))
    if lib.startswith("MISSING"):
        rep.not_run("mpi4py", "mpi4py is missing: multi-rank GPU tests cannot run")
    elif mpiexec is None:
        rep.not_run("mpiexec", "no mpiexec on PATH: multi-rank GPU tests cannot run (carry"
                    " the mpich wheel when mpi4py is built on MPICH)")
    else:
        want, have = _mpi_family(lib), info.get("mpiexec_family")
        rep.check("mpiexec matches mpi4py's MPI library", want == have or want == "unknown",
                  f"{mpiexec} is {have}, mpi4py is built on {want} ({lib}): "
                  + ("OK" if want == have else "ranks would each be a singleton; put the"
                     f" {want} launcher first on PATH"))


def _plain_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def kernels(rep: Report, tmp: Path, env: dict, dry_run: bool) -> None:
    rep.write("\n## Kernels\n")
    if dry_run:
        rc, out = run_step([sys.executable, "-c", KERNEL_COMPILE], BUDGETS["kernels"], env,
                           tmp / "kernels.log")
        r = _plain_json(out) if rc == 0 else None
        rep.check("every kernel instantiation compiles with NVRTC", r is not None,
                  (f"{r['kernels']} kernels for sm_{r['arch']} in {r['compile_s']:.1f} s"
                   f" (NVRTC {r['nvrtc']})") if r else ("timed out" if rc is None
                                                        else _tail(out)))
        h = r["headers"] if r else None
        if h is not None:
            rep.check("CuPy's kernels find the CUDA runtime headers (cuda_fp16.h, cuda_bf16.h)",
                      bool(h["cudart"]) and h.get("compiles") is True,
                      f"{h['cudart']} ({'in' if h['in_environment'] else 'outside'} this"
                      " environment)" if h.get("compiles") else
                      (h.get("log") or "not found: install nvidia-cuda-runtime-cu12 (CUDA 12)"
                       " or nvidia-cuda-runtime 13.x (CUDA 13), as the [cuda]/[cuda13]"
                       " extras do"))
            rep.data["cuda_headers"] = h
        return
    runs = []
    t_end = time.monotonic() + BUDGETS["kernels"]
    for i, label in enumerate(("first process (compiles)", "second process (loads)")):
        left = max(5.0, t_end - time.monotonic())
        rc, out = run_step([sys.executable, "-c", KERNEL_LOAD], left, env,
                           tmp / f"kernels{i}.log")
        r = _plain_json(out) if rc == 0 else None
        if r is None:
            rep.check(f"kernel loading, {label}", False,
                      f"timed out ({left:.0f} s)" if rc is None else _tail(out, 800))
            return
        runs.append(r)
        rep.write(f"- {label}: {r['kernels']} kernels in {r['load_s']:.2f} s"
                  f" (import {r['import_s']:.2f} s)")
    rep.data["kernel_cache"] = {"first_s": runs[0]["load_s"], "second_s": runs[1]["load_s"],
                                "kernels": runs[0]["kernels"]}
    rep.check("a second process loads every kernel from the cache in <= 1 s",
              runs[1]["load_s"] <= 1.0, f"{runs[1]['load_s']:.2f} s (first:"
              f" {runs[0]['load_s']:.2f} s)")


def gpu_test_files() -> list[str]:
    """The test modules that hold ``gpu`` tests (the only ones the check collects)."""
    pat = re.compile(r"\bmark\.gpu\b|\bpytest\.mark\.gpu\b")
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if pat.search(p.read_text(encoding="utf-8", errors="replace")))


# --- pytest plugin (``-p gpu_check``): every result appended as it comes -----
def _live(record: dict) -> None:
    path = os.environ.get(LIVE_LOG)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def _message(report) -> str:
    longrepr = getattr(report, "longrepr", None)
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # a skip: (file, line, reason)
        return str(longrepr[2])
    text = str(getattr(report, "longreprtext", "") or longrepr or "")
    lines = [ln for ln in text.splitlines() if ln.startswith("E ")] or text.splitlines()
    return " | ".join(ln.strip() for ln in lines[-3:])[:300]


def pytest_runtest_logstart(nodeid, location) -> None:  # noqa: D103 - pytest hook
    _live({"nodeid": nodeid, "event": "start"})


def pytest_runtest_logreport(report) -> None:  # noqa: D103 - pytest hook
    if report.when == "call" or report.outcome != "passed":
        _live({"nodeid": report.nodeid, "event": report.when, "outcome": report.outcome,
               "message": _message(report) if report.outcome != "passed" else ""})


def pytest_collectreport(report) -> None:  # noqa: D103 - pytest hook
    if report.outcome != "passed":
        _live({"nodeid": report.nodeid, "event": "collect", "outcome": report.outcome,
               "message": _message(report)})


def _read_live(path: Path) -> tuple[dict, dict, list[str]]:
    """``(final outcome by test, collection problems by module, tests started)``."""
    results: dict = {}
    collect: dict = {}
    started: list[str] = []
    if not path.exists():
        return results, collect, started
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if r["event"] == "start":
            started.append(r["nodeid"])
        elif r["event"] == "collect":
            collect[r["nodeid"]] = (r["outcome"], r["message"])
        elif r["nodeid"] not in results or results[r["nodeid"]][0] == "passed":
            results[r["nodeid"]] = (r["outcome"], r["message"])  # a failed teardown wins
    return results, collect, started


def gpu_tests(rep: Report, tmp: Path, env: dict, extra: list[str], dry_run: bool) -> None:
    rep.write("\n## GPU tests (the modules with gpu tests, -m gpu)\n")
    files = gpu_test_files()
    rep.write("modules: " + ", ".join(files))
    try:
        import pytest  # noqa: F401
    except ImportError:
        rep.not_run("GPU tests", "pytest is not installed (put its wheel in the wheel folder)")
        return
    live = tmp / "tests_live.jsonl"
    live.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider",
           "-p", "gpu_check", "--continue-on-collection-errors"]
    if dry_run:
        cmd.append("--collect-only")
    else:
        try:
            import pytest_timeout  # noqa: F401

            cmd.append(f"--timeout={PER_TEST_TIMEOUT}")
        except ImportError:
            rep.write(f"(pytest-timeout missing: no per-test timeout, only the step's"
                      f" {BUDGETS['tests']} s)")
    t0 = time.monotonic()
    rc, out = run_step([*cmd, *files, *extra], BUDGETS["tests"], dict(env, **{LIVE_LOG:
                       str(live)}), tmp / "tests.log")
    rep.write("```text\n" + "\n".join(out.strip().splitlines()[-40:]) + "\n```")
    results, collect, started = _read_live(live)
    for mod, (outcome, msg) in sorted(collect.items()):
        if outcome == "failed":
            rep.check(f"collect {mod}", False, f"collection error: {msg}")
        else:  # a module that skips at import: its GPU tests do not run
            rep.not_run(f"collect {mod}", msg)
    if dry_run:
        n = re.search(r"(\d+)(?:/\d+)? tests? collected", out)
        got = int(n.group(1)) if n else 0
        rep.check("GPU tests collected", rc in (0, 5) and got > 0,
                  f"{got} tests" if got else ("timed out" if rc is None else _tail(out, 600)))
        return
    if rc is None:
        unfinished = [t for t in started if t not in results]
        rep.check("GPU tests finished within the step's budget", False,
                  f"pytest killed after {BUDGETS['tests']} s; running then: "
                  + ", ".join(unfinished[-3:]))
    passed = [t for t, (o, _) in results.items() if o == "passed"]
    failed = [f"{t} ({m})" for t, (o, m) in results.items() if o == "failed"]
    skipped = [f"{t} ({m})" for t, (o, m) in results.items() if o == "skipped"]
    rep.data["tests"] = {"passed": len(passed), "failed": failed, "not_run": skipped,
                         "seconds": round(time.monotonic() - t0, 1)}
    rep.check("GPU tests: at least 40 ran", len(passed) + len(failed) >= 40,
              f"{len(passed)} passed")
    rep.check("GPU tests: none failed", not failed, _some(failed))
    for s in skipped:
        rep.not_run(f"GPU test {s.split(' (')[0]}", s.split(" (", 1)[1].rstrip(")"))


def _some(names: list[str], n: int = 12) -> str:
    """The first ``n`` names (all of them are in the JSON block)."""
    if not names:
        return ""
    more = f"; ... and {len(names) - n} more (all in the JSON block)" if len(names) > n else ""
    return f"{len(names)}: " + "; ".join(names[:n]) + more


def bench(rep: Report, tmp: Path, env: dict, dry_run: bool) -> None:
    rep.write("\n## Benchmark: one synchronized pass over NCCL vs torch.nn.BatchNorm2d (cuDNN)\n")
    if dry_run:
        return
    env_info = rep.data.get("environment", {})
    if str(env_info.get("torch", "MISSING")).startswith("MISSING"):
        rep.not_run("benchmark", "torch is not installed")
        return
    out = tmp / "bench.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--bench-only", str(out)]
    rc, text = run_step(cmd, BUDGETS["bench"], env, tmp / "bench.log")
    if rc is None:
        rep.check("benchmark finished", False, f"killed after {BUDGETS['bench']} s")
        return
    if rc != 0 or not out.exists():
        rep.check("benchmark ran (over NCCL)", False, _tail(text))
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

    # NCCL or nothing: a failed init raises (and fails the step, loudly);
    # a no-op communicator would time a pass without its all-reduce.
    comm = sbn.init("nccl", force_collectives=True)
    from cupysyncbn.comm.nccl import nccl_version

    comm_kind = f"NCCL (forced collectives, NCCL {nccl_version()})"
    if getattr(comm, "backend", None) != "nccl":
        raise RuntimeError(f"init('nccl') returned a {type(comm).__name__}, not NCCL")
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
    ap.add_argument("--dry-run", action="store_true",
                    help="prepare and list the steps; no GPU needed")
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
    env = _env_for_children(tmp / "cupy_cache")
    rep = Report(report)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    rep.write(f"# cupysyncbn GPU check{' (dry run)' if args.dry_run else ''}"
              f"  {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}  commit {head or '?'}\n")
    rep.write("steps and budgets (s): " + ", ".join(f"{k} {v}" for k, v in BUDGETS.items())
              + f"; per test {PER_TEST_TIMEOUT}; total {sum(BUDGETS.values())}")
    rep.data["budgets_s"] = dict(BUDGETS, per_test=PER_TEST_TIMEOUT)
    t0 = time.monotonic()
    steps = (("environment", lambda: environment(rep, tmp, env, args.dry_run)),
             ("kernels", lambda: kernels(rep, tmp, env, args.dry_run)),
             ("tests", lambda: gpu_tests(rep, tmp, env, args.pytest_args, args.dry_run)),
             ("bench", lambda: bench(rep, tmp, env, args.dry_run)))
    try:
        for name, step in steps:
            try:
                step()
            except Exception as e:  # record and go on: one report says everything
                rep.check(f"step crashed: {name}", False, f"{type(e).__name__}: {e}")
    finally:
        rep.data["seconds"] = round(time.monotonic() - t0, 1)
        rep.write(f"\n(total {rep.data['seconds']} s; report: {report})")
        code = rep.close(dry_run=args.dry_run)
    return code


if __name__ == "__main__":
    sys.exit(main())
