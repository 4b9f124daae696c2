"""CUDA kernel sources: where they are, their full text, and their instantiations.

The ``.cu``/``.cuh`` files live in the repository's top-level ``kernels/``
folder and ship inside the wheel as ``cupysyncbn/kernels`` (package data).
:func:`kernel_dir` is the one place that finds them. :func:`read_source`
returns a file with its local ``#include "..."`` lines inlined, so the text
is self-contained: the same string is compiled by ``cupy.RawModule`` and by
the NVRTC tests, and CuPy's compile cache is keyed on everything the kernels depend on.

Nothing here imports CuPy.
"""

from __future__ import annotations

import importlib.util
import re
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "COMPILE_OPTIONS",
    "NO_FMAD",
    "EXACT_KERNELS",
    "exact",
    "exact_sample",
    "KERNEL_FILES",
    "STORAGE_TYPES",
    "kernel_dir",
    "read_source",
    "storage_type",
    "accum_type",
    "name_expressions",
    "stats_partial",
    "stats_finalize",
    "bwd_partial",
    "bwd_finalize",
    "normalize",
    "backward_elemt",
    "fused_types",
    "fwd_pack",
    "fwd_norm",
    "bwd_pack",
    "bwd_elemt",
]

#: Extra NVRTC options (CuPy adds the architecture and its own defaults).
COMPILE_OPTIONS: tuple = ("--std=c++14",)

#: Added for the reproducible mode's elementwise kernels: no multiply-add
#: contraction, so ``(x - mean) * scale + bias`` rounds twice as in NumPy.
NO_FMAD: tuple = ("--fmad=false",)

#: The kernel files, each compiled as one module.
KERNEL_FILES = ("stats.cu", "backward.cu", "elementwise.cu", "fused.cu", "exact.cu")

#: C++ storage type of each supported input dtype name.
STORAGE_TYPES = {
    "float16": "sbn::half_t",
    "bfloat16": "sbn::bfloat16_t",
    "float32": "float",
    "float64": "double",
}
_ACCUM = {"float32": "float", "float64": "double"}
# (storage, accumulation) pairs the package can launch: 16/32-bit inputs with
# float or double statistics (a float64 layer), float64 inputs with double.
_PAIRS = tuple(
    (STORAGE_TYPES[s], _ACCUM[a])
    for s in ("float16", "bfloat16", "float32", "float64")
    for a in ("float32", "float64")
    if not (s == "float64" and a == "float32")
)
_INDEX = ("int", "long long")
_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.MULTILINE)


def _candidates() -> list[Path]:
    """Where the sources may be, in the order :func:`kernel_dir` tries them."""
    # Resolved by the import system: the wheel's package data, or an editable
    # install's mapping of ``cupysyncbn.kernels`` to ``kernels/`` (a namespace
    # package either way: the folder has no __init__.py).
    spec = importlib.util.find_spec("cupysyncbn.kernels")
    found = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    # A source tree on sys.path without an install: the top-level kernels/.
    found.append(Path(__file__).resolve().parents[3] / "kernels")
    return found


@cache
def kernel_dir() -> Path:
    """The folder holding the kernel sources: the one loader of the ``.cu`` files.

    ``cupysyncbn.kernels`` as the import system finds it (the wheel ships the
    top-level ``kernels/`` folder as that package; an editable install maps
    it to the checkout's folder); in a source tree that is not installed,
    the checkout's ``kernels/``.

    Raises
    ------
    FileNotFoundError
        If no location has the kernel files (a broken install).
    """
    for d in _candidates():
        if all((d / f).is_file() for f in KERNEL_FILES):
            return d
    raise FileNotFoundError(
        "cupysyncbn CUDA kernel sources not found (looked in "
        + ", ".join(str(d) for d in _candidates())
        + "); reinstall the package: its wheel ships them as cupysyncbn/kernels"
    )


def _inline(path: Path, seen: set) -> str:
    text = path.read_text(encoding="utf-8")

    def repl(m: re.Match) -> str:
        inc = (path.parent / m.group(1)).resolve()
        if inc in seen:
            return f"// (already included: {m.group(1)})"
        seen.add(inc)
        return f"// begin {m.group(1)}\n{_inline(inc, seen)}\n// end {m.group(1)}"

    return _INCLUDE.sub(repl, text)


@cache
def read_source(name: str) -> str:
    """Full text of kernel file ``name`` with its local includes inlined.

    Parameters
    ----------
    name : str
        One of :data:`KERNEL_FILES`.

    Raises
    ------
    ValueError
        For an unknown file name.
    """
    if name not in KERNEL_FILES:
        raise ValueError(f"name must be one of {KERNEL_FILES}; got {name!r}")
    path = kernel_dir() / name
    return _inline(path, {path.resolve()})


def storage_type(dtype: Any) -> str:
    """C++ storage type for an input dtype (float16, bfloat16, float32, float64).

    Raises
    ------
    TypeError
        For any other dtype.
    """
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    try:
        return STORAGE_TYPES[name]
    except KeyError:
        raise TypeError(f"no CUDA kernels for dtype {name}") from None


def accum_type(dtype: Any) -> str:
    """C++ compute/accumulation type for a compute dtype (float32 or float64)."""
    return _ACCUM[np.dtype(dtype).name]


def stats_partial(t: str, a: str, channel_last: bool) -> str:
    """Name expression of the statistics partial kernel."""
    return f"bn_stats_partial_{'cl' if channel_last else 'cf'}<{t}, {a}>"


def stats_finalize(a: str) -> str:
    """Name expression of the statistics merge kernel."""
    return f"bn_stats_finalize<{a}>"


def bwd_partial(t: str, a: str, channel_last: bool) -> str:
    """Name expression of the backward-reduce partial kernel."""
    return f"bn_bwd_partial_{'cl' if channel_last else 'cf'}<{t}, {a}>"


def bwd_finalize(a: str) -> str:
    """Name expression of the backward-reduce merge kernel."""
    return f"bn_bwd_finalize<{a}>"


def normalize(t: str, a: str, index: str) -> str:
    """Name expression of the forward elementwise kernel."""
    return f"bn_normalize<{t}, {a}, {index}>"


def backward_elemt(t: str, a: str, index: str) -> str:
    """Name expression of the backward elementwise kernel."""
    return f"bn_backward_elemt<{t}, {a}, {index}>"


def fused_types() -> tuple:
    """``(T, A, P)`` triples of the fused kernels: storage, compute, parameter type.

    The compute type is float64 when the input or the layer is float64
    (:func:`cupysyncbn.dtypes.compute_dtype`), else float32.
    """
    out = []
    for t in STORAGE_TYPES.values():
        for p in ("float", "double"):
            a = "double" if "double" in (t, p) else "float"
            out.append((t, a, p))
    return tuple(out)


def fwd_pack(a: str) -> str:
    """Name expression of the forward pack kernel (merge partials, header, shifted sums)."""
    return f"bn_fwd_pack<{a}>"


def fwd_norm(t: str, a: str, p: str, channel_last: bool) -> str:
    """Name expression of the fused forward finalize + normalize kernel."""
    return f"bn_fwd_norm_{'cl' if channel_last else 'cf'}<{t}, {a}, {p}>"


def bwd_pack(a: str, p: str) -> str:
    """Name expression of the backward pack kernel (merge partials, header, grads)."""
    return f"bn_bwd_pack<{a}, {p}>"


def bwd_elemt(t: str, a: str, p: str, channel_last: bool) -> str:
    """Name expression of the fused backward coefficients + elementwise kernel."""
    return f"bn_bwd_elemt_{'cl' if channel_last else 'cf'}<{t}, {a}, {p}>"


#: The reproducible mode's kernels (``kernels/exact.cu``), one per input storage type.
EXACT_KERNELS = ("bn_exact_absmax", "bn_exact_folds", "bn_exact_bwd_absmax",
                 "bn_exact_bwd_folds")


def exact(kind: str, t: str, channel_last: bool) -> str:
    """Name expression of a reproducible-mode kernel (one of :data:`EXACT_KERNELS`)."""
    return f"{kind}_{'cl' if channel_last else 'cf'}<{t}>"


def exact_sample(t: str, channel_last: bool, compute: str | None = None) -> str:
    """Name expression of a per-sample kernel: forward, or backward with ``compute`` (CT)."""
    lay = "cl" if channel_last else "cf"
    if compute is None:
        return f"bn_exact_sample_{lay}<{t}>"
    return f"bn_exact_sample_bwd_{lay}<{t}, {compute}>"


def name_expressions(name: str) -> tuple[str, ...]:
    """Every template instantiation of kernel file ``name`` (dtype x layout x index).

    Raises
    ------
    ValueError
        For an unknown file name.
    """
    accs = ("float", "double")
    if name == "stats.cu":
        out = [stats_partial(t, a, cl) for t, a in _PAIRS for cl in (False, True)]
        return tuple(out + [stats_finalize(a) for a in accs])
    if name == "backward.cu":
        out = [bwd_partial(t, a, cl) for t, a in _PAIRS for cl in (False, True)]
        return tuple(out + [bwd_finalize(a) for a in accs])
    if name == "elementwise.cu":
        return tuple(
            f(t, a, i) for f in (normalize, backward_elemt) for t, a in _PAIRS for i in _INDEX
        )
    if name == "fused.cu":
        types = fused_types()
        out = [fwd_pack(a) for a in accs]
        out += [bwd_pack(a, p) for a, p in sorted({(a, p) for _, a, p in types})]
        out += [f(t, a, p, cl) for f in (fwd_norm, bwd_elemt) for t, a, p in types
                for cl in (False, True)]
        return tuple(out)
    if name == "exact.cu":
        out = [exact(k, t, cl) for k in EXACT_KERNELS for t in STORAGE_TYPES.values()
               for cl in (False, True)]
        out += [exact_sample(t, cl) for t in STORAGE_TYPES.values() for cl in (False, True)]
        out += [exact_sample(t, cl, a) for t, a in _PAIRS for cl in (False, True)]
        return tuple(out)
    raise ValueError(f"name must be one of {KERNEL_FILES}; got {name!r}")
