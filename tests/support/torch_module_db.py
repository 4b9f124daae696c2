"""PyTorch's own BatchNorm samples (``module_db``) through the adapter, against torch itself.

``torch.testing._internal.common_modules.module_db`` holds the inputs PyTorch's
developers test every module with. For each ``nn.BatchNorm1d/2d/3d`` sample
(22 in PyTorch 2.13; any the installed PyTorch adds are walked too) the walk
builds ``cupysyncbn.interop.torch.SyncBatchNorm`` and the torch module from the
sample's constructor arguments, in float64, and compares: three training steps
(contiguous, channels-last and non-contiguous inputs: outputs, input
gradients, rank-summed parameter gradients, running statistics,
``num_batches_tracked``), eval, ``state_dict`` keys and values, and a pickle
round trip, all to 1e-9.

:func:`walk` is shared by the one-process tests
(``tests/interop/test_torch_module_db.py``), the ``mpiexec -n 3`` job of
``tests/interop/test_torch_adapter.py`` and the ``torchrun`` job of
``tests/comm/test_torch_distributed.py``: every rank gets its part of each
sample's batch (uneven, the last rank empty) and the reference is the torch
module on the whole batch.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import os
import pickle
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

TOL = 1e-9
CLASSES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d")
F64 = torch.float64


# -- the samples ---------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def module_db_samples() -> tuple:
    """Every ``module_db`` sample of ``nn.BatchNorm1d/2d/3d`` as plain data (float64, CPU)."""
    pytest.importorskip("expecttest")  # torch.testing._internal needs it
    saved_env = dict(os.environ)
    with warnings.catch_warnings():  # the import adds warning filters and env vars
        from torch.testing._internal.common_modules import module_db
    for k in set(os.environ) - set(saved_env):
        del os.environ[k]
    out = []
    for info in module_db:
        cls = info.module_cls
        if cls.__name__ not in CLASSES or cls.__module__ != "torch.nn.modules.batchnorm":
            continue
        for s in info.module_inputs_func(
            info, device="cpu", dtype=F64, requires_grad=False, training=True
        ):
            (x,) = s.forward_input.args
            out.append({
                "name": f"{cls.__name__}:{s.desc or 'default'}",
                "cls": cls.__name__,
                "args": tuple(s.constructor_input.args),
                "kwargs": dict(s.constructor_input.kwargs),
                "x": x.detach().to(F64).clone(),
            })
    return tuple(out)


def save_samples(path: Path) -> Path:
    """Write the samples for the multi-rank jobs (which then skip the slow import)."""
    torch.save(list(module_db_samples()), path)
    return path


def load_samples(path: str) -> list:
    return torch.load(path, weights_only=False)


# -- the walk ------------------------------------------------------------------
def split_counts(n: int, size: int) -> list:
    """Uneven split of ``n`` samples over ``size`` ranks, the last rank empty."""
    if size == 1:
        return [n]
    counts = [0] * size
    left = n
    for r in range(1, size - 1):
        c = min(max(n // size, 1), max(left - 1, 0))
        counts[r] = c
        left -= c
    counts[0] = left
    return counts


def _diff(a, b) -> float:
    """Max abs difference; None counts as zeros (an unset gradient)."""
    a = torch.zeros(()) if a is None else a.detach().to(F64)
    b = torch.zeros(()) if b is None else b.detach().to(F64)
    if a.dim() and b.dim() and a.shape != b.shape:
        return float("inf")
    d = (a - b).abs()
    return d.max().item() if d.numel() else 0.0


def _layouts(x):
    """(name, global input of that layout) for the three training steps' layouts."""
    def contiguous(d):
        return d.contiguous()

    def channels_last(d):
        if d.dim() in (4, 5):
            fmt = torch.channels_last if d.dim() == 4 else torch.channels_last_3d
            return d.contiguous(memory_format=fmt)
        # (N, C) / (N, C, L): channel-last strides, as NLC memory would have
        perm = (1, 0) if d.dim() == 2 else (0, 2, 1)
        return d.permute(*perm).contiguous().permute(*perm)

    def non_contiguous(d):
        wide = torch.zeros(*d.shape[:-1], 2 * d.shape[-1], dtype=d.dtype)
        wide[..., ::2] = d
        return wide[..., ::2]

    return (("contiguous", contiguous), ("channels_last", channels_last),
            ("non_contiguous", non_contiguous))


def _run_sample(s, comm, rank, size, allsum, rec, seed):
    from cupysyncbn.interop import torch as ti

    cls = getattr(torch.nn, s["cls"])
    # Bind to torch's own signature, so every argument reaches ours by name.
    kwargs = dict(inspect.signature(cls).bind(*s["args"], **s["kwargs"]).arguments)
    ref = cls(*s["args"], **s["kwargs"]).to(F64)
    ours = ti.SyncBatchNorm(**kwargs, comm=comm).to(F64)
    rec("state_dict_keys", 0.0 if list(ours.state_dict()) == list(ref.state_dict()) else 1.0)
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        rec(f"has_{name}", float((getattr(ours, name) is None) != (getattr(ref, name) is None)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if ref.weight is not None:
            ref.weight.uniform_(0.5, 1.5, generator=g)
        if ref.bias is not None:
            ref.bias.uniform_(-0.5, 0.5, generator=g)
    ours.load_state_dict(ref.state_dict())

    x0 = s["x"]
    n = x0.shape[0]
    counts = split_counts(n, size)
    lo = sum(counts[:rank])
    sl = slice(lo, lo + counts[rank])
    for step, (lname, make) in enumerate(_layouts(x0)):
        data = x0.clone() if step == 0 else (
            torch.randn(x0.shape, generator=g, dtype=F64) * (1 + step) + 2 * step
        )
        dy = torch.randn(x0.shape, generator=g, dtype=F64)
        xr = make(data.clone()).requires_grad_()
        xl = make(data.clone())[sl]
        if lname != "contiguous" and xl.numel() > xl.shape[1] and xl.is_contiguous():
            rec("layout_kept", 1.0)  # the step would not test what it claims
        xl.requires_grad_()
        yr = ref(xr)
        yr.backward(dy)
        yl = ours(xl)
        yl.backward(dy[sl])
        rec(f"y_{lname}", _diff(yl, yr[sl]))
        rec(f"dx_{lname}", _diff(xl.grad, xr.grad[sl]))
        for name in ("weight", "bias"):
            po, pr = getattr(ours, name), getattr(ref, name)
            if po is not None and pr is not None:
                rec(f"d{name}_sum", _diff(allsum(po.grad), pr.grad))
        for name in ("running_mean", "running_var"):
            if ref.running_mean is not None and ours.running_mean is not None:
                rec(name, _diff(getattr(ours, name), getattr(ref, name)))
        if ref.num_batches_tracked is not None and ours.num_batches_tracked is not None:
            rec("num_batches_tracked",
                abs(int(ours.num_batches_tracked) - int(ref.num_batches_tracked)))
        ours.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)

    ours.eval()
    ref.eval()
    data = torch.randn(x0.shape, generator=g, dtype=F64) * 0.5 + 0.25
    with torch.no_grad():
        rec("y_eval", _diff(ours(data[sl]), ref(data)[sl]))

    sd_o, sd_r = ours.state_dict(), ref.state_dict()
    rec("state_dict_keys", 0.0 if list(sd_o) == list(sd_r) else 1.0)
    for k, v in sd_r.items():
        rec("state_dict_values", _diff(sd_o.get(k), v))

    twin = pickle.loads(pickle.dumps(ours))
    rec("pickle_drops_comm", 0.0 if twin.comm is None else 1.0)
    twin.comm = comm
    for k, v in twin.state_dict().items():
        rec("pickle_state", 0.0 if torch.equal(v, sd_o[k]) else 1.0)
    with torch.no_grad():
        rec("pickle_y_eval", _diff(twin(data[sl]), ref(data)[sl]))
        twin.train()
        ref2 = copy.deepcopy(ref).train()
        data = torch.randn(x0.shape, generator=g, dtype=F64) - 0.5
        rec("pickle_y_train", _diff(twin(data[sl]), ref2(data)[sl]))
        if ref2.running_var is not None and twin.running_var is not None:
            rec("pickle_running_var", _diff(twin.running_var, ref2.running_var))
            rec("pickle_num_batches_tracked",
                abs(int(twin.num_batches_tracked) - int(ref2.num_batches_tracked)))


def walk(samples, comm=None, rank=0, size=1, allsum=lambda t: t) -> dict:
    """Run every sample; return ``{'errors': {sample: msg}, 'max': {sample: {check: err}}}``.

    ``comm`` is given to the adapter; ``allsum`` sums a tensor over the ranks
    (for the rank-local parameter gradients). Every rank runs the same code
    on the same data, so an exception is raised on every rank alike and the
    walk goes on with the next sample.
    """
    result: dict = {"errors": {}, "max": {}}
    for i, s in enumerate(samples):
        worst: dict = {}

        def rec(name, v, worst=worst):
            worst[name] = max(worst.get(name, 0.0), float(v))

        try:
            _run_sample(s, comm, rank, size, allsum, rec, seed=1000 + i)
        except Exception as e:  # noqa: BLE001 - reported by the test, per sample
            result["errors"][s["name"]] = f"{type(e).__name__}: {e}"
        result["max"][s["name"]] = worst
    return result


def merge(results: list) -> dict:
    """Worst value of every check over the ranks' results."""
    out: dict = {"errors": {}, "max": {}}
    for r in results:
        out["errors"].update(r["errors"])
        for name, checks in r["max"].items():
            dst = out["max"].setdefault(name, {})
            for k, v in checks.items():
                dst[k] = max(dst.get(k, 0.0), v)
    return out


def emit(result: dict) -> None:
    print("WALK " + json.dumps(result), flush=True)


def parse(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("WALK ")]
    assert len(lines) == 1, stdout[-3000:]
    return json.loads(lines[0][5:])


def check_walk(result: dict, samples) -> dict:
    """Assert the walk covered every sample and every check passed; return worst per check."""
    assert sorted(result["max"]) == sorted(s["name"] for s in samples)
    worst: dict = {}
    problems = dict(result["errors"])
    for name, checks in result["max"].items():
        for k, v in checks.items():
            worst[k] = max(worst.get(k, 0.0), v)
        bad = {k: v for k, v in checks.items() if not v <= TOL}
        if bad:
            problems[name] = bad
        elif name not in problems and not {
            "y_contiguous", "y_channels_last", "y_non_contiguous", "dx_contiguous",
            "y_eval", "state_dict_keys", "pickle_y_train",
        } <= set(checks):
            problems[name] = f"checks missing: {sorted(checks)}"
    assert not problems, f"{len(problems)} of {len(samples)} samples fail: {problems}"
    return worst

