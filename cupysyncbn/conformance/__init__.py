"""Conformance suite: check a SyncBatchNorm against reference vectors.

``python -m cupysyncbn.conformance`` runs the vectors shipped in
``cupysyncbn/conformance/data`` (PaddlePaddle and PyTorch batch norm on the
global batch; format in ``data/README.md``) against cupysyncbn or against any
implementation given as ``--impl module:callable`` (or ``path/to/file.py:callable``),
on one process or under ``mpiexec`` (``--ranks K`` launches it), and prints a
pass/fail table per case.

The implementation interface
----------------------------
An implementation is a callable ``impl(case, rank, size) -> dict``, called once
per case on every rank. ``case`` is a dict with

``name`` (str), ``format`` (``NC, NCL, NCHW, NCDHW, NLC, NHWC, NDHWC``),
``dtype`` (``'float32'``/``'float64'``: inputs, parameters and running stats),
``momentum`` (Paddle convention: ``running = running*m + batch*(1-m)``),
``torch_momentum`` (``1 - m``), ``unbiased_running_var`` (bool: the running
variance uses ``var*n/(n-1)``), ``epsilon``, ``affine`` (False: weight fixed at
1 and bias at 0, no gradients), ``weight``, ``bias`` (initial values),
``steps``; this rank's part of the global batch ``x{s}``, ``dy{s}`` for
``s < steps`` and ``x_eval`` (when the case has an eval step; may be empty
along axis 0); ``counts`` (batch size of every rank), ``comm`` (the
``mpi4py.MPI.Comm`` to synchronize over, or None on one process) and
``device`` (``'cpu'`` or ``'cuda'``, from ``--device``).

The implementation builds a layer, runs ``steps`` training steps (forward of
``x{s}``, backward of ``dy{s}``, no parameter update) and, if ``x_eval`` is
given, one eval-mode forward, and returns any array type (NumPy, CuPy, torch,
anything with ``__dlpack__``) under these keys:

``y{s}``, ``dx{s}`` (this rank's output and input gradient), ``dweight{s}``,
``dbias{s}`` (gradients of step ``s`` over this rank's batch, as PyTorch and
Paddle compute them; the runner sums them over ranks), ``mean{s}``,
``variance{s}`` (running statistics after step ``s``) and ``y_eval``.

A key the implementation does not return is shown as ``-`` and not checked;
a case passes when every checked quantity is within tolerance on every rank.
An exception is reported in the table (the case fails); one raised on some
ranks only can leave the others waiting in the implementation's collective,
so run third-party implementations under a timeout.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..arrays.dlpack import to_native

__all__ = [
    "DATA_DIR",
    "QUANTITIES",
    "CaseResult",
    "case_files",
    "load_case",
    "split_counts",
    "local_case",
    "tolerance",
    "load_impl",
    "run_suite",
    "format_table",
]

#: Folder of the shipped vectors.
DATA_DIR = Path(__file__).resolve().parent / "data"
#: Table columns, in order.
QUANTITIES = ("y", "dx", "dweight", "dbias", "mean", "variance", "y_eval")


def case_files(data_dir: str | os.PathLike | None = None, pattern: str = "*") -> list[Path]:
    """The ``.npz`` vectors in ``data_dir`` (default: shipped) with names matching ``pattern``."""
    folder = Path(data_dir) if data_dir is not None else DATA_DIR
    return [f for f in sorted(folder.glob("*.npz")) if fnmatch.fnmatch(f.stem, pattern)]


def load_case(path: str | os.PathLike) -> dict:
    """Read one vector file into a dict with normalized metadata.

    Adds ``name``, ``momentum`` (Paddle convention, also for ``torch_*``
    files that store ``momentum_paddle``), ``torch_momentum``,
    ``unbiased_running_var`` and ``affine`` (defaults False / True).
    """
    path = Path(path)
    with np.load(path, allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    case: dict[str, Any] = {"name": path.stem}
    for k, v in d.items():
        case[k] = v.item() if v.ndim == 0 else v
    if "momentum" not in case:
        case["momentum"] = float(case["momentum_paddle"])
    case["momentum"] = float(case["momentum"])
    case["torch_momentum"] = 1.0 - case["momentum"]
    case["unbiased_running_var"] = bool(case.get("unbiased_running_var", False))
    case["affine"] = bool(case.get("affine", True))
    case["steps"] = int(case["steps"])
    case["epsilon"] = float(case["epsilon"])
    case["format"] = str(case["format"])
    case["dtype"] = str(case["dtype"])
    return case


def split_counts(n: int, size: int, mode: str = "uneven") -> list[int]:
    """Batch sizes of ``size`` ranks for a global batch of ``n``.

    ``'even'``: as equal as possible. ``'uneven'`` (default): the last rank
    gets nothing and the others get shares growing with the rank (1 : 2 : 3
    ...), the case where averaging per-rank statistics is wrong.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1; got {size}")
    if mode == "even":
        return [n // size + (1 if r < n % size else 0) for r in range(size)]
    if mode != "uneven":
        raise ValueError(f"split mode must be 'even' or 'uneven'; got {mode!r}")
    if size == 1:
        return [n]
    weights = np.arange(1, size, dtype=np.float64)
    bounds = np.floor(np.cumsum(weights) / weights.sum() * n + 1e-9).astype(int)
    counts = np.diff(np.concatenate([[0], bounds])).tolist()
    return [int(c) for c in counts] + [0]


def _batch_keys(case: dict) -> list[str]:
    keys = [f"{p}{s}" for s in range(case["steps"]) for p in ("x", "dy")]
    return keys + (["x_eval"] if "x_eval" in case else [])


_REFERENCE = re.compile(r"^(y|dx|dweight|dbias|mean|variance)\d+$|^y_eval$")


def local_case(
    case: dict, rank: int, size: int, comm: Any = None, split: str = "uneven", device: str = "cpu"
) -> dict:
    """What an implementation receives for ``rank``.

    ``case`` without the reference outputs, with ``x{s}``/``dy{s}``/``x_eval``
    cut to ``rank``'s part of the batch (:func:`split_counts`).
    """
    batch = _batch_keys(case)
    out = {k: v for k, v in case.items() if k not in batch and not _REFERENCE.match(k)}
    for k in batch:
        full = case[k]
        counts = split_counts(full.shape[0], size, split)
        start = sum(counts[:rank])
        out[k] = np.ascontiguousarray(full[start : start + counts[rank]])
    out.update(
        counts=split_counts(case["x0"].shape[0], size, split), comm=comm, rank=rank,
        size=size, device=device,
    )
    return out


def tolerance(case: dict, quantity: str) -> tuple[float, float]:
    """``(rtol, atol)`` for ``quantity`` of ``case``: ``|a - ref| <= atol + rtol*|ref|``.

    float64: 1e-9. float32: 1e-4 relative, 1e-5 absolute (2e-4 for parameter
    gradients, sums over the whole batch). ``paddle_*`` vectors carry about
    1e-7 relative rounding in their running statistics (Paddle keeps momentum
    in float32), so their running statistics get 1e-6 relative, and their
    eval output, which divides ``x - running_mean`` by the running std, 1e-6
    of ``max|running_mean| * max|weight| / min(std)`` absolute.
    """
    if case["dtype"] == "float64":
        rtol, atol = 1e-9, 1e-9
    else:
        rtol, atol = 1e-4, 1e-5
        if quantity in ("dweight", "dbias"):
            atol = 2e-4
    if quantity in ("mean", "variance", "y_eval") and case["name"].startswith("paddle"):
        rtol = max(rtol, 1e-6)
    if quantity == "y_eval" and case["name"].startswith("paddle"):
        last = case["steps"] - 1
        scale = (
            float(np.max(np.abs(case[f"mean{last}"])))
            * max(float(np.max(np.abs(case["weight"]))), 1.0)
            / float(np.sqrt(np.min(case[f"variance{last}"]) + case["epsilon"]))
        )
        atol = max(atol, 1e-6 * max(scale, 1.0))
    return rtol, atol


def load_impl(spec: str) -> Callable:
    """Import ``module:callable`` or ``path/to/file.py:callable``.

    Raises
    ------
    ValueError
        For a malformed ``spec``; ImportError/AttributeError when it does not resolve.
    """
    if ":" not in spec:
        raise ValueError(f"--impl must be 'module:callable' or 'file.py:callable'; got {spec!r}")
    mod_name, _, attr = spec.rpartition(":")
    if mod_name.endswith(".py") or os.sep in mod_name:
        path = Path(mod_name).resolve()
        spec_ = importlib.util.spec_from_file_location(path.stem, path)
        if spec_ is None or spec_.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec_)
        spec_.loader.exec_module(module)
    else:
        module = importlib.import_module(mod_name)
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{spec} is not callable")
    return obj


def _host(v: Any) -> np.ndarray:
    """Any array (NumPy, CuPy, torch, DLPack) as a float64 NumPy array."""
    if not isinstance(v, np.ndarray) and hasattr(v, "__dlpack__"):
        v = to_native(v)
    if hasattr(v, "get") and type(v).__module__.startswith("cupy"):
        v = v.get()
    return np.asarray(v, dtype=np.float64)


@dataclass
class CaseResult:
    """Outcome of one case: per-quantity max abs error (None: not checked)."""

    name: str
    errors: dict = field(default_factory=dict)  # quantity -> max abs error or None
    failed: list = field(default_factory=list)  # quantities out of tolerance
    error: str | None = None  # exception text, if the impl raised
    #: Largest fraction of the element-wise bound ``atol + rtol*|ref|`` any
    #: element used (over every quantity): 1 is the edge of the tolerance.
    tolerance_used: float = 0.0

    @property
    def passed(self) -> bool:
        """True when the impl ran, something was checked and nothing failed."""
        checked = any(v is not None for v in self.errors.values())
        return self.error is None and checked and not self.failed


def _compare(
    case: dict, quantity: str, got: np.ndarray, ref: np.ndarray
) -> tuple[float, bool, float]:
    """``(max abs error, within tolerance, largest fraction of the bound used)``."""
    rtol, atol = tolerance(case, quantity)
    if got.shape != ref.shape:
        return float("inf"), False, float("inf")
    if got.size == 0:
        return 0.0, True, 0.0
    ref = ref.astype(np.float64)
    diff = np.abs(got - ref)
    bound = atol + rtol * np.abs(ref)
    ok = bool(np.all(diff <= bound)) and bool(np.all(np.isfinite(got)))
    err = float(np.max(diff)) if np.all(np.isfinite(diff)) else float("nan")
    used = float(np.max(diff / bound)) if np.all(np.isfinite(diff)) else float("inf")
    return err, ok, used


def evaluate(case: dict, per_rank: list[dict]) -> CaseResult:
    """Compare the gathered per-rank results of one case with the reference."""
    res = CaseResult(case["name"])
    groups: dict[str, list[tuple[float, bool, float]]] = {q: [] for q in QUANTITIES}
    for q in QUANTITIES:
        keys = ["y_eval"] if q == "y_eval" else [f"{q}{s}" for s in range(case["steps"])]
        for key in keys:
            if key not in case:
                continue
            pieces = [r.get(key) for r in per_rank]
            if all(p is None for p in pieces):
                continue
            if any(p is None for p in pieces):
                groups[q].append((float("nan"), False, float("inf")))
                continue
            ref = case[key]
            arrays: list[np.ndarray] = [p for p in pieces if p is not None]
            if q in ("y", "dx", "y_eval"):
                groups[q].append(_compare(case, q, np.concatenate(arrays, axis=0), ref))
            elif q in ("dweight", "dbias"):
                groups[q].append(_compare(case, q, np.sum(arrays, axis=0), ref))
            else:  # running statistics: every rank must hold them
                for a in arrays:
                    groups[q].append(_compare(case, q, a, ref))
    for q, vals in groups.items():
        if not vals:
            res.errors[q] = None
            continue
        res.errors[q] = max(v[0] for v in vals)
        res.tolerance_used = max(res.tolerance_used, max(v[2] for v in vals))
        if not all(v[1] for v in vals):
            res.failed.append(q)
    return res


def _run_local(impl: Callable, case: dict, rank: int, size: int, comm: Any, split: str,
               device: str) -> tuple[dict, str | None]:
    try:
        out = impl(local_case(case, rank, size, comm, split, device), rank, size)
        if not isinstance(out, dict):
            raise TypeError(f"the implementation returned {type(out).__name__}, not a dict")
        return {k: _host(v) for k, v in out.items() if v is not None}, None
    except Exception as e:  # report, do not crash the table
        return {}, f"{type(e).__name__}: {e}"


def run_suite(
    impl: Callable,
    cases: list[dict],
    comm: Any = None,
    split: str = "uneven",
    device: str = "cpu",
) -> list[CaseResult]:
    """Run ``impl`` on every case on all ranks of ``comm``; results on rank 0.

    Parameters
    ----------
    impl : callable
        ``impl(case, rank, size) -> dict`` (see the module docs).
    cases : list of dict
        From :func:`load_case`.
    comm : mpi4py.MPI.Comm or None
        None: one process.
    split : {'uneven', 'even'}
        How the global batch is cut across ranks (:func:`split_counts`).
    device : {'cpu', 'cuda'}
        Passed to the implementation.

    Returns
    -------
    list of CaseResult
        On rank 0 (other ranks get an empty list).
    """
    rank = 0 if comm is None else comm.Get_rank()
    size = 1 if comm is None else comm.Get_size()
    results = []
    for case in cases:
        local, err = _run_local(impl, case, rank, size, comm, split, device)
        gathered = [(local, err)] if comm is None else comm.gather((local, err), root=0)
        if rank != 0:
            continue
        errs = [e for _, e in gathered if e is not None]
        if errs:
            results.append(CaseResult(case["name"], error=errs[0]))
            continue
        results.append(evaluate(case, [g for g, _ in gathered]))
    return results


def format_table(results: list[CaseResult], impl_name: str, size: int, split: str) -> str:
    """A readable pass/fail table: max abs error per quantity, ``!`` marks a failure."""
    head = f"{'case':<34}" + "".join(f"{q:>11}" for q in QUANTITIES) + "  tol used  result"
    lines = [f"implementation: {impl_name}   ranks: {size}   split: {split}", head, "-" * len(head)]
    notes = []
    for r in results:
        cells = []
        for q in QUANTITIES:
            e = r.errors.get(q)
            txt = "-" if e is None else f"{e:.1e}" + ("!" if q in r.failed else " ")
            cells.append(f"{txt:>11}")
        if r.error is not None:
            cells = [f"{'error':>11}"] + [f"{'':>11}"] * (len(QUANTITIES) - 1)
            notes.append(f"  {r.name}: {r.error}")
        used = "" if r.error is not None else f"{r.tolerance_used:.1e}"
        lines.append(f"{r.name:<34}" + "".join(cells) + f"{used:>10}"
                     + ("  PASS" if r.passed else "  FAIL"))
    npass = sum(r.passed for r in results)
    lines.append("-" * len(head))
    lines.append(
        f"{npass}/{len(results)} cases pass   (max abs error per quantity over steps and ranks;"
        " '!' = out of tolerance, '-' = not returned)"
    )
    lines += [
        "  an element passes when |a - ref| <= atol + rtol*|ref| (conformance.tolerance: the"
        " bound grows with the reference,",
        "  e.g. a running mean near 1e4); 'tol used' is the largest fraction of that bound"
        " any element of the case used (1 = the edge)",
    ]
    lines.extend(notes)
    return "\n".join(lines)
