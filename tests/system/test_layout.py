"""The package layout that docs/design.md describes: one direction of imports, one
reader of the environment, a small functional module, old paths that still import."""

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "cupysyncbn"


def _modules():
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name, path, modules):
    """Package modules ``name`` imports anywhere in its file (function level included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                cand = f"{mod}.{alias.name}"
                if cand in modules:
                    found.add(cand)
                elif mod in modules:
                    found.add(mod)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
    found.discard(name)
    return found


def _cycles(graph):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_function_level_imports_included():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    assert _cycles(graph) == []
    # The detector finds a circle when there is one.
    graph["cupysyncbn.errors"] = graph["cupysyncbn.errors"] | {"cupysyncbn.functional"}
    assert _cycles(graph)


def test_layers_of_the_design_import_downwards_only():
    modules = _modules()
    order = ["nn", "interop", "functional", "_sync", "backends", "comm", "runtime", "arrays"]
    rank = {layer: i for i, layer in enumerate(order)}

    def layer(m):
        part = m.split(".")[1] if m.count(".") else ""
        return part if part in rank else None

    bad = []
    for m, p in modules.items():
        lm = layer(m)
        for dep in _imports(m, p, modules):
            ld = layer(dep)
            if lm is not None and ld is not None and lm != ld and rank[ld] < rank[lm]:
                if {lm, ld} == {"nn", "interop"}:
                    continue
                bad.append(f"{m} -> {dep}")
    # backends and comm are siblings: neither knows the other.
    bad += [f"{m} -> {d}" for m, p in modules.items() if layer(m) in ("backends", "comm")
            for d in _imports(m, p, modules) if layer(d) in ("backends", "comm")
            and layer(d) != layer(m)]
    assert bad == []


def test_top_level_modules_and_functional_size():
    top = [p for p in PKG.glob("*.py")]
    assert len(top) <= 10, sorted(p.name for p in top)
    assert len((PKG / "functional.py").read_text().splitlines()) <= 400


def test_the_environment_is_read_in_one_module():
    readers = []
    for path in PKG.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if "os.environ" in text or "getenv(" in text:
            readers.append(path.relative_to(PKG).as_posix())
    assert readers == ["runtime/env.py"]


@pytest.mark.parametrize("value, expected", [
    ("1", True), ("true", True), ("YES", True), (" on ", True),
    ("0", False), ("false", False), ("No", False), ("off", False), ("", None),
])
def test_one_rule_for_true_and_false(monkeypatch, value, expected):
    from cupysyncbn.runtime import env

    monkeypatch.setenv("CUPYSYNCBN_CUDA_AWARE_MPI", value)
    assert env.flag("CUPYSYNCBN_CUDA_AWARE_MPI", default=None) is expected
    monkeypatch.setenv("CUPYSYNCBN_CUDA_AWARE_MPI", "maybe")
    with pytest.raises(ValueError, match="CUPYSYNCBN_CUDA_AWARE_MPI"):
        env.flag("CUPYSYNCBN_CUDA_AWARE_MPI")


def test_cuda_aware_false_means_off(monkeypatch):
    """CUPYSYNCBN_CUDA_AWARE_MPI=false used to turn the feature on."""
    pytest.importorskip("mpi4py")
    from mpi4py import MPI

    from cupysyncbn.comm.mpi import MPICommunicator

    for value, expected in (("false", False), ("0", False), ("1", True), ("true", True)):
        monkeypatch.setenv("CUPYSYNCBN_CUDA_AWARE_MPI", value)
        assert MPICommunicator(MPI.COMM_SELF).cuda_aware is expected


OLD_PATHS = {
    "cupysyncbn.fault": ("abort_job", "cupysyncbn.runtime.watchdog"),
    "cupysyncbn.placement": ("set_device", "cupysyncbn.runtime.placement"),
    "cupysyncbn.io": ("save", "cupysyncbn.checkpoint"),
    "cupysyncbn.layer": ("Layer", "cupysyncbn.nn.layer"),
    "cupysyncbn.norm": ("SyncBatchNorm", "cupysyncbn.nn.norm"),
    "cupysyncbn.protocol": ("HEADER", "cupysyncbn._sync.protocol"),
    "cupysyncbn.formats": ("parse_data_format", "cupysyncbn.arrays.formats"),
    "cupysyncbn.interop.dlpack": ("to_native", "cupysyncbn.arrays.dlpack"),
    "cupysyncbn.backends.numpy_backend": ("NumpyBackend", "cupysyncbn.backends.numpy"),
    "cupysyncbn.backends.kernel_source": ("kernel_dir", "cupysyncbn.backends.cupy.kernels"),
    "cupysyncbn.backends.cupy_backend": ("CupyBackend", "cupysyncbn.backends.cupy.backend"),
}


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_old_import_paths_warn_and_give_the_same_objects(old):
    name, new = OLD_PATHS[old]
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        mod = importlib.import_module(old)
    assert getattr(mod, name) is getattr(importlib.import_module(new), name)


def test_old_paths_forward_moved_names_and_patches(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from cupysyncbn import fault, layer
        from cupysyncbn.backends import numba_backend  # noqa: F401 - the import works
        from cupysyncbn.interop import dlpack  # noqa: F401 - the attribute form too
    from cupysyncbn import errors, modes
    from cupysyncbn.runtime import env, watchdog

    assert layer.no_grad is modes.no_grad
    assert layer.NoPendingForwardError is errors.NoPendingForwardError
    assert fault.RANK_VARS is env.RANK_VARS and fault.parse_timeout is env.parse_timeout
    monkeypatch.setattr(fault, "abort_job", "patched")  # lands where the code looks
    assert watchdog.abort_job == "patched"


def test_old_python_dash_m_path_still_runs(tmp_path):
    """``python -m cupysyncbn.backends.numba_backend`` (cited by 0.1's docs)."""
    pytest.importorskip("numba")
    res = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c",
         "import runpy, sys; sys.argv=['x'];"
         " runpy.run_module('cupysyncbn.backends.numba_backend', run_name='__main__')"],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "numba kernel signatures" in res.stderr


def test_kernel_sources_found_by_the_one_loader():
    from cupysyncbn.backends.cupy import kernels

    d = kernels.kernel_dir()
    assert all((d / f).is_file() for f in kernels.KERNEL_FILES)


def test_no_monkeypatch_that_may_patch_nothing():
    """A monkeypatch told not to raise patches nothing, silently, once a name moves."""
    tests = Path(__file__).resolve().parents[1]
    offenders = [
        f"{p.relative_to(tests)}:{i}"
        for p in tests.rglob("*.py")
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if "setattr(" in line and "raising=" + "False" in line
    ]
    assert offenders == []


def test_package_type_checks():
    """``python -m mypy`` with the configuration in pyproject.toml finds no error."""
    pytest.importorskip("mypy")
    root = PKG.parent
    res = subprocess.run([sys.executable, "-m", "mypy"], cwd=root, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-2000:]
    assert "Success: no issues found" in res.stdout
