"""The CUDA kernels compile with NVRTC on a CPU-only machine.

Every kernel file and every template instantiation (storage dtype x
accumulation x layout x index type) is compiled to SASS with the low-level
``cupy.cuda.nvrtc`` API for each architecture NVRTC offers from sm_70 (or its
lowest) to sm_90. The text compiled is exactly what the loader
(``cupysyncbn.backends.cupy.kernels``) hands to ``cupy.RawModule``. No GPU is
needed: the test dependencies bring the NVRTC library
(``nvidia-cuda-nvrtc-cu12``), so these tests run in CI.
"""

import configparser
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
from cupy.cuda import nvrtc
from support import ROOT

from cupysyncbn.backends.cupy import kernels as ks

pytestmark = pytest.mark.nvrtc

SUPPORTED = tuple(nvrtc.getSupportedArchs())
LOWEST = 70 if 70 in SUPPORTED else min(a for a in SUPPORTED if a <= 90)
ARCHS = tuple(a for a in SUPPORTED if LOWEST <= a <= 90)
# The options CuPy's RawModule adds on its own (without the architecture).
CUPY_OPTIONS = ("--device-as-default-execution-space",)

STORAGE = {"float16": "sbn::half_t", "bfloat16": "sbn::bfloat16_t",
           "float32": "float", "float64": "double"}


def _expected_names(file):
    """Instantiations written out independently of the loader's list."""
    pairs = []
    for dt, t in STORAGE.items():
        for acc in ("float", "double"):
            if dt == "float64" and acc == "float":
                continue  # float64 inputs always compute in float64
            pairs.append((t, acc))
    if file == "stats.cu":
        names = [f"bn_stats_partial_{lay}<{t}, {a}>" for t, a in pairs for lay in ("cf", "cl")]
        return set(names + ["bn_stats_finalize<float>", "bn_stats_finalize<double>"])
    if file == "backward.cu":
        names = [f"bn_bwd_partial_{lay}<{t}, {a}>" for t, a in pairs for lay in ("cf", "cl")]
        return set(names + ["bn_bwd_finalize<float>", "bn_bwd_finalize<double>"])
    if file == "fused.cu":
        # compute type: float64 when the input or the layer (P) is float64
        trip = [(t, "double" if "double" in (t, p) else "float", p)
                for t in STORAGE.values() for p in ("float", "double")]
        names = {"bn_fwd_pack<float>", "bn_fwd_pack<double>", "bn_bwd_pack<float, float>",
                 "bn_bwd_pack<double, float>", "bn_bwd_pack<double, double>"}
        return names | {f"bn_{k}_{lay}<{t}, {a}, {p}>" for k in ("fwd_norm", "bwd_elemt")
                        for lay in ("cf", "cl") for t, a, p in trip}
    if file == "exact.cu":
        names = {f"bn_exact_{k}_{lay}<{t}>"
                 for k in ("absmax", "folds", "bwd_absmax", "bwd_folds", "sample")
                 for lay in ("cf", "cl") for t in STORAGE.values()}
        # the per-sample backward: x - mean in the compute type
        return names | {f"bn_exact_sample_bwd_{lay}<{t}, {a}>" for t, a in pairs
                        for lay in ("cf", "cl")}
    return {f"{k}<{t}, {a}, {i}>" for k in ("bn_normalize", "bn_backward_elemt")
            for t, a in pairs for i in ("int", "long long")}


def _compile(src, name, names, arch):
    """Compile to a cubin; return (cubin, lowered names, log)."""
    prog = nvrtc.createProgram(src, name, [], [])
    try:
        for n in names:
            nvrtc.addNameExpression(prog, n)
        opts = [*ks.COMPILE_OPTIONS, *CUPY_OPTIONS, f"--gpu-architecture=sm_{arch}"]
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError as e:
            raise AssertionError(f"{name} sm_{arch}: {e}\n{nvrtc.getProgramLog(prog)}") from e
        lowered = {n: nvrtc.getLoweredName(prog, n) for n in names}
        return nvrtc.getCUBIN(prog), lowered, nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


def test_nvrtc_architecture_range():
    assert nvrtc.getVersion() >= (11, 2)
    assert ARCHS[0] == LOWEST and ARCHS[-1] <= 90
    if 90 in SUPPORTED:
        assert 90 in ARCHS and (70 not in SUPPORTED or 70 in ARCHS)


def test_nvrtc_instantiation_list_is_complete():
    for f in ks.KERNEL_FILES:
        assert set(ks.name_expressions(f)) == _expected_names(f), f
        assert len(set(ks.name_expressions(f))) == len(ks.name_expressions(f))
    assert {p.name for p in (ROOT / "kernels").glob("*.cu")} == set(ks.KERNEL_FILES)


# fused.cu is the largest module, exact.cu the newest: their lowest and highest
# architecture (the suite's time)
CASES = [(f, a) for f in ks.KERNEL_FILES for a in ARCHS
         if f not in ("fused.cu", "exact.cu") or a in (ARCHS[0], ARCHS[-1])]


@pytest.fixture(scope="module")
def compiled():
    """Every case compiling at once, one per core; ``{case: future}``.

    NVRTC releases the GIL, so threads use every core (the compiles are most
    of this module's time). The largest module is submitted first; each test
    waits for its own case only and re-raises what the compile raised.
    """
    cases = sorted(CASES, key=lambda fa: fa[0] != "fused.cu")
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        yield {(f, a): pool.submit(lambda f=f, a=a: _compile(
            ks.read_source(f), f, ks.name_expressions(f), a)) for f, a in cases}


@pytest.mark.parametrize("file,arch", CASES)
def test_nvrtc_compiles_every_instantiation(file, arch, compiled):
    names = ks.name_expressions(file)
    cubin, lowered, log = compiled[file, arch].result()
    assert len(cubin) > 1000
    assert len(set(lowered.values())) == len(names)
    for n, low in lowered.items():
        assert low.startswith("_Z"), (n, low)
        # the mangled name is in the cubin: the instantiation was really emitted
        assert low.encode() in cubin, n
    other = [ln for ln in log.splitlines() if "warning" in ln and "deprecated" not in ln]
    assert not other, log


def test_nvrtc_loader_source_is_self_contained():
    common = (ROOT / "kernels" / "common.cuh").read_text()
    for f in ks.KERNEL_FILES:
        src = ks.read_source(f)
        assert not re.search(r'^\s*#\s*include\s*"', src, re.MULTILINE), f
        assert "struct Welford" in src and common.strip().splitlines()[-1] in src
        assert (ROOT / "kernels" / f).read_text().splitlines()[-1] in src
    with pytest.raises(ValueError, match="name"):
        ks.read_source("nope.cu")


def test_nvrtc_rejects_broken_source():
    # The harness can fail: a type error in a template instantiation is caught.
    src = ks.read_source("elementwise.cu") + "\ntemplate <typename T> __global__ void k(T* p)" \
        " { p[0] = T::missing; }\n"
    with pytest.raises(AssertionError, match="missing"):
        _compile(src, "broken.cu", ["k<float>"], ARCHS[0])


def test_nvrtc_kernel_dir_prefers_installed_copy(tmp_path, monkeypatch):
    installed = tmp_path / "site" / "cupysyncbn" / "kernels"
    installed.mkdir(parents=True)
    for p in (ROOT / "kernels").iterdir():
        if p.suffix in (".cu", ".cuh"):
            shutil.copy(p, installed / p.name)
    (installed / "stats.cu").write_text(
        (installed / "stats.cu").read_text() + "\n// installed copy marker\n"
    )
    monkeypatch.setattr(ks, "_candidates", lambda: [installed, ROOT / "kernels"])
    ks.kernel_dir.cache_clear()
    ks.read_source.cache_clear()
    try:
        assert ks.kernel_dir() == installed
        src = ks.read_source("stats.cu")
        assert "installed copy marker" in src
        _compile(src, "stats.cu", ks.name_expressions("stats.cu")[:2], ARCHS[-1])
        monkeypatch.setattr(ks, "_candidates", lambda: [tmp_path / "missing"])
        ks.kernel_dir.cache_clear()
        with pytest.raises(FileNotFoundError, match="reinstall"):
            ks.kernel_dir()
    finally:
        ks.kernel_dir.cache_clear()
        ks.read_source.cache_clear()


def test_nvrtc_kernels_are_package_data():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert "cupysyncbn.kernels" in cfg["options"]["packages"].split()
    mapping = dict(
        (k.strip(), v.strip())
        for k, v in (ln.split("=") for ln in cfg["options"]["package_dir"].strip().splitlines())
    )
    assert mapping["cupysyncbn.kernels"] == "kernels"
    globs = {g.strip() for g in cfg["options.package_data"]["cupysyncbn.kernels"].split(",")}
    assert {"*.cu", "*.cuh"} <= globs
