"""The demo's job: the same training run three ways (``python -m cupysyncbn.demo``).

Run it under MPI (the README's first command)::

    mpiexec -n 4 python -m cupysyncbn.demo --out demo_out

Every rank trains a small network (:mod:`cupysyncbn.demo.model`) on a tiny
slice (default 2 samples) of a global batch, three ways, in lock step:

* **local BN**: each rank normalizes with its own 2-sample statistics
  (what plain data parallelism does); gradients are averaged;
* **SyncBN**: the same model converted with
  :meth:`SyncBatchNorm.convert_sync_batchnorm`, statistics of the global
  batch; gradients averaged with :func:`cupysyncbn.allreduce_gradients`;
* **one process**: a single model trained on the whole global batch with local
  batch norm (every rank computes it redundantly from the regenerated data, so
  nothing is gathered and the check is local).

It reports the maximum absolute difference between the SyncBN run and the
one-process run (parameters, running statistics and outputs after training),
which is at rounding level, while local BN clearly differs. ``--out DIR``
writes ``DIR/summary.json`` and ``DIR/demo.png``. NumPy + MPI on the CPU by
default; CuPy + NCCL when CuPy sees a GPU (``--device`` overrides).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..comm.base import Communicator
from ..comm.select import init
from ..nn.grads import allreduce_gradients
from ..nn.norm import BatchNorm1D, BatchNorm2D, SyncBatchNorm
from ..runtime.env import launched_size
from ..runtime.placement import get_device, set_device
from ..runtime.watchdog import install_abort_hook
from . import model as dm
from .model import LABELS
from .plot import plot

__all__ = ["main"]

RUNS = ("global", "sync", "local")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m cupysyncbn.demo",
        description="Train a small net with local BN, SyncBN and one process on the global"
        " batch; compare. Launch with mpiexec -n K.",
    )
    p.add_argument("--out", type=Path, default=None,
                   help="folder for summary.json and demo.png (default: print only)")
    p.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    p.add_argument("--batch-per-rank", type=int, default=2,
                   help="samples per rank per step (default 2)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of data and initial weights")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="float64 (default): SyncBN matches to ~1e-12; float32: ~1e-5")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="auto: GPU (CuPy + NCCL) when CuPy sees one, else CPU (NumPy + MPI)")
    p.add_argument("--no-plot", action="store_true", help="skip demo.png")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.batch_per_rank < 1:
        p.error("--batch-per-rank must be >= 1")
    return args


def _setup(device: str) -> tuple[Any, Communicator, str]:
    """Array module, communicator and a description of where we run."""
    use_gpu = False
    if device != "cpu":
        try:
            import cupy

            use_gpu = cupy.cuda.runtime.getDeviceCount() > 0
        except Exception:
            use_gpu = False
        if device == "gpu" and not use_gpu:
            raise SystemExit("--device gpu: CuPy sees no GPU here")
    if not use_gpu:
        set_device("cpu")  # new layers hold NumPy arrays even where a GPU exists
        return np, init("auto" if device == "auto" else "mpi" if _launched() else "none"), "CPU"
    import cupy

    # One placement rule for NCCL and MPI (cupysyncbn.placement).
    set_device("gpu")
    comm = init("auto")
    dev = int(get_device()[4:])
    cupy.cuda.Device(dev).use()
    name = cupy.cuda.runtime.getDeviceProperties(dev)["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    return cupy, comm, f"GPU {dev} ({name})"


def _launched() -> bool:
    return launched_size() > 1


class _Run:
    """One of the three trainings: model, optimizer, and what it is compared on."""

    def __init__(self, kind: str, model: Any, lr: float) -> None:
        self.kind = kind
        self.model = model
        self.opt = dm.SGD(model, lr)
        self.loss: list[float] = []

    def bn_buffers(self) -> list[Any]:
        out = []
        for layer in self.model.sublayers():
            if isinstance(layer, (BatchNorm1D, BatchNorm2D, SyncBatchNorm)):
                out += [layer._mean, layer._variance]
        return out


def _build_runs(args: argparse.Namespace, comm: Communicator, on_gpu: bool) -> dict:
    dt = args.dtype

    def local_model() -> Any:
        return dm.build_model(
            lambda c: BatchNorm2D(c, data_format="NCHW", dtype=dt),
            lambda c: BatchNorm1D(c, data_format="NC", dtype=dt),
            args.seed, dt,
        )

    runs = {
        "global": _Run("global", local_model(), args.lr),
        "local": _Run("local", local_model(), args.lr),
        # The point of the package in one line: convert a local-BN model.
        "sync": _Run("sync", SyncBatchNorm.convert_sync_batchnorm(local_model(), comm), args.lr),
    }
    if on_gpu:
        for r in runs.values():
            r.model.to("cuda")
            r.opt = dm.SGD(r.model, args.lr)
    return runs


def _max_abs_diff(a: list, b: list, xp: Any) -> float:
    m = 0.0
    for u, v in zip(a, b):
        m = max(m, float(xp.abs(u.astype(np.float64) - v.astype(np.float64)).max()))
    return m


def _rel_diff(a: list, b: list, xp: Any) -> float:
    """``||a - b|| / ||b||`` over all the arrays together."""
    num = sum(float(((u.astype(np.float64) - v) ** 2).sum()) for u, v in zip(a, b))
    den = sum(float((v.astype(np.float64) ** 2).sum()) for v in b)
    return math.sqrt(num / max(den, 1e-300))


def _progress(step: int, total: int, t0: float, msg: str) -> None:
    width = 28
    done = int(width * step / total)
    rate = step / max(time.perf_counter() - t0, 1e-9)
    eta = (total - step) / rate if rate > 0 else 0.0
    sys.stderr.write(
        f"\rtraining [{'#' * done}{'.' * (width - done)}] {step}/{total}"
        f"  {msg}  eta {eta:4.0f}s "
    )
    if step == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _train(args: argparse.Namespace, xp: Any, comm: Communicator, runs: dict) -> dict:
    """The lock-step training loop; returns the per-step curves (same on every rank)."""
    rank, size, b = comm.rank, comm.size, args.batch_per_rank
    data = dm.DataSource(args.seed, args.dtype)
    gbatch = b * size
    curves: dict[str, list] = {f"loss_{k}": [] for k in RUNS}
    curves.update(drift_sync=[], drift_local=[], mean_global=[], mean_sync=[], mean_local=[])
    every = max(1, args.steps // 25)
    t0 = time.perf_counter()
    for step in range(args.steps):
        xg, yg = data.batch(step, gbatch)
        xg, yg = xp.asarray(xg), xp.asarray(yg)
        xr, yr = xg[rank * b:(rank + 1) * b], yg[rank * b:(rank + 1) * b]
        losses = {}
        for kind, run in runs.items():
            x, y = (xg, yg) if kind == "global" else (xr, yr)
            logits = run.model(x)
            losses[kind], dlogits, _ = dm.softmax_cross_entropy(logits, y)
            run.model.backward(dlogits)
            if kind != "global":
                # Data parallelism: one packed all-reduce averages every gradient.
                allreduce_gradients(run.model, comm)
            run.opt.step()
            run.model.clear_gradients()
        ref = runs["global"].bn_buffers()
        d_sync = _rel_diff(runs["sync"].bn_buffers(), ref, xp)
        d_local = _rel_diff(runs["local"].bn_buffers(), ref, xp)
        # One small all-reduce for the curves: global mean losses, mean drifts.
        m = xp.asarray([losses["sync"], losses["local"], d_sync, d_local], dtype=np.float64)
        m = comm.allreduce_sum(m)
        m = [float(v) for v in m]
        curves["loss_global"].append(losses["global"] / gbatch)
        curves["loss_sync"].append(m[0] / gbatch)
        curves["loss_local"].append(m[1] / gbatch)
        curves["drift_sync"].append(m[2] / size)
        curves["drift_local"].append(m[3] / size)
        for kind in RUNS:
            # One running mean (conv BN, channel 0) to plot; rank 0's for local BN.
            curves[f"mean_{kind}"].append(float(runs[kind].model["bn1"]._mean[0]))
        if rank == 0 and ((step + 1) % every == 0 or step + 1 == args.steps):
            msg = f"loss sync {curves['loss_sync'][-1]:.3f} local {curves['loss_local'][-1]:.3f}"
            _progress(step + 1, args.steps, t0, msg)
    return curves


def _compare(args: argparse.Namespace, xp: Any, comm: Communicator, runs: dict) -> dict:
    """Parameters, running stats and eval outputs of each run against one process."""
    data = dm.DataSource(args.seed, args.dtype)
    xe, ye = data.eval_set(256)
    xe, ye = xp.asarray(xe), xp.asarray(ye)
    res: dict[str, Any] = {}
    outs, acc = {}, {}
    for kind, run in runs.items():
        run.model.eval()
        outs[kind] = run.model(xe)
        _, _, correct = dm.softmax_cross_entropy(outs[kind], ye)
        acc[kind] = correct / xe.shape[0]
    ref = runs["global"].model.state_dict()
    size, rank = comm.size, comm.rank
    # Per-rank values in their own slots, summed: every rank learns all of them.
    buf = xp.zeros(4 * size + 2, dtype=np.float64)
    for i, kind in enumerate(("sync", "local")):
        sd = runs[kind].model.state_dict()
        keys = list(ref)
        buf[(2 * i) * size + rank] = _max_abs_diff(
            [sd[k] for k in keys], [ref[k] for k in keys], xp
        )
        buf[(2 * i + 1) * size + rank] = _max_abs_diff([outs[kind]], [outs["global"]], xp)
    buf[4 * size:] = xp.asarray([acc["sync"], acc["local"]]) * (1 if rank == 0 else 0)
    buf = comm.allreduce_sum(buf)
    host = [float(v) for v in buf]
    for i, kind in enumerate(("sync", "local")):
        res[kind] = {
            "parameters_and_running_stats": max(host[(2 * i) * size:(2 * i + 1) * size]),
            "eval_outputs": max(host[(2 * i + 1) * size:(2 * i + 2) * size]),
            "per_rank_parameters": host[(2 * i) * size:(2 * i + 1) * size],
        }
    res["accuracy"] = {"global": acc["global"], "sync": acc["sync"], "local": acc["local"]}
    return res


def _summary(args: argparse.Namespace, comm: Communicator, where: str, curves: dict,
             cmp: dict, elapsed: float) -> dict:
    size = comm.size
    tol = 1e-9 if args.dtype == "float64" else 1e-3
    loss_diff = max(abs(a - b) for a, b in zip(curves["loss_sync"], curves["loss_global"]))
    loss_diff_local = max(abs(a - b) for a, b in zip(curves["loss_local"], curves["loss_global"]))
    d_sync = max(cmp["sync"]["parameters_and_running_stats"], cmp["sync"]["eval_outputs"])
    d_local = max(cmp["local"]["parameters_and_running_stats"], cmp["local"]["eval_outputs"])
    tail = max(1, args.steps // 10)
    return {
        "max_abs_diff_sync_vs_global": d_sync,
        "max_abs_diff_local_vs_global": d_local,
        "sync_equals_global": d_sync <= tol,
        "local_differs_from_global": d_local > 1e3 * max(d_sync, tol) if size > 1 else False,
        "tolerance": tol,
        "sync_vs_global": {**cmp["sync"], "train_loss_curve": loss_diff},
        "local_vs_global": {**cmp["local"], "train_loss_curve": loss_diff_local},
        "eval_accuracy": cmp["accuracy"],
        "final_train_loss": {k: float(np.mean(curves[f"loss_{k}"][-tail:])) for k in RUNS},
        "world_size": size,
        "batch_per_rank": args.batch_per_rank,
        "global_batch": args.batch_per_rank * size,
        "steps": args.steps,
        "lr": args.lr,
        "seed": args.seed,
        "dtype": args.dtype,
        "device": where,
        "communicator": comm.backend,
        "elapsed_s": elapsed,
        "curves": curves,
    }


def _report(s: dict, files: list[str]) -> str:
    k, b = s["world_size"], s["batch_per_rank"]
    lines = [
        "",
        f"cupysyncbn demo: {k} rank(s) x {b} samples = global batch {s['global_batch']},"
        f" {s['steps']} steps, {s['dtype']}, {s['device']}, comm={s['communicator']},"
        f" {s['elapsed_s']:.1f}s",
        "",
        f"  {'run':<28}{'train loss':>11}{'eval acc':>10}{'max |diff| vs one process':>28}",
    ]
    diffs = {"global": None, "sync": s["max_abs_diff_sync_vs_global"],
             "local": s["max_abs_diff_local_vs_global"]}
    for kind in RUNS:
        d = "(reference)" if diffs[kind] is None else f"{diffs[kind]:.3e}"
        lines.append(
            f"  {LABELS[kind]:<28}{s['final_train_loss'][kind]:>11.4f}"
            f"{s['eval_accuracy'][kind]:>10.3f}{d:>28}"
        )
    lines.append("")
    verdict = "yes" if s["sync_equals_global"] else "NO"
    lines.append(
        f"SyncBN == one process on the global batch: {verdict}"
        f" (max abs diff {s['max_abs_diff_sync_vs_global']:.2e}, tolerance {s['tolerance']:.0e};"
        " parameters, running stats and eval outputs)"
    )
    if k > 1:
        lines.append(
            f"local BN drifts: running stats off by {100 * s['curves']['drift_local'][-1]:.0f}%"
            f" (relative L2) at the end, eval outputs by up to"
            f" {s['local_vs_global']['eval_outputs']:.3f}"
        )
    else:
        lines.append("1 rank: the three runs coincide; launch with mpiexec -n 4 to compare.")
    for f in files:
        lines.append(f"wrote {f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the demo (see the module docstring); returns the exit status."""
    args = _parse_args(argv)
    xp, comm, where = _setup(args.device)
    install_abort_hook(comm)  # uncaught errors in any thread end the whole job
    try:
        t0 = time.perf_counter()
        runs = _build_runs(args, comm, xp is not np)
        curves = _train(args, xp, comm, runs)
        cmp = _compare(args, xp, comm, runs)
        summary = _summary(args, comm, where, curves, cmp, time.perf_counter() - t0)
    except BaseException:
        if comm.size > 1:
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
            comm.abort(1)  # never leave the other ranks waiting in a collective
        raise
    if comm.rank != 0:
        return 0
    files = []
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "summary.json"
        if not args.no_plot:
            png = args.out / "demo.png"
            if plot(summary, png):
                summary["plot"] = png.name
                files.append(str(png))
        path.write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
        files.insert(0, str(path))
    print(_report(summary, files), flush=True)
    ok = summary["sync_equals_global"] and math.isfinite(summary["max_abs_diff_sync_vs_global"])
    return 0 if ok else 1
