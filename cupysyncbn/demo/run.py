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

The check is what SyncBN promises: at every step, the SyncBN forward and
backward equal one process's on the same global batch *from the same
parameters* (teacher-forced: a probe with local batch norm is loaded with the
SyncBN model's parameters and running statistics before the step and run on
the whole batch): outputs, parameter gradients and running statistics agree
to the dtype's rounding. The trajectories after many steps are reported
separately: training amplifies rounding, so two exact runs drift apart
slowly (float32 far more than float64); local BN differs at once. ``--out DIR``
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

from ..comm.base import LOCAL, Communicator
from ..comm.select import init
from ..nn.grads import allreduce_gradients
from ..nn.norm import BatchNorm1D, BatchNorm2D, SyncBatchNorm
from ..runtime.env import launched_size
from ..runtime.placement import get_device, set_device
from ..runtime.watchdog import install_abort_hook
from . import model as dm
from . import reproducible as rep
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
    p.add_argument("--reproducible", action="store_true",
                   help="batch norm with reproducible=True (CPU): SyncBN must train bit for"
                   " bit like one process (docs/reproducibility.md)")
    args = p.parse_args(argv)
    if args.reproducible and args.device == "gpu":
        p.error("--reproducible runs on the CPU (the GPU kernels of that mode do not exist yet)")
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
                state = layer.state_dict()
                out += [state["_mean"], state["_variance"]]
        return out


def _build_runs(args: argparse.Namespace, comm: Communicator, on_gpu: bool) -> dict:
    dt, repro = args.dtype, args.reproducible

    def local_model(per_sample: bool = False) -> Any:
        model = dm.build_model(
            lambda c: BatchNorm2D(c, data_format="NCHW", dtype=dt, reproducible=repro),
            lambda c: BatchNorm1D(c, data_format="NC", dtype=dt, reproducible=repro),
            args.seed, dt,
        )
        for layer in model.sublayers():
            if hasattr(layer, "per_sample"):
                layer.per_sample = per_sample  # --reproducible: see demo.reproducible
        return model

    runs = {
        "global": _Run("global", local_model(repro), args.lr),
        "local": _Run("local", local_model(), args.lr),
        # The point of the package in one line: convert a local-BN model.
        "sync": _Run("sync", SyncBatchNorm.convert_sync_batchnorm(local_model(repro), comm),
                     args.lr),
    }
    # Teacher-forced check: loaded with a run's state before each step, run on
    # the global batch (see _step_check).
    runs["probe"] = _Run("probe", local_model(), args.lr)
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
    line = (f"training [{'#' * done}{'.' * (width - done)}] {step}/{total}  {msg}"
            f"  eta {eta:4.0f}s ")
    if sys.stderr.isatty():
        sys.stderr.write("\r" + line + ("\n" if step == total else ""))
    elif step == total or step % max(1, total // 4) == 0:  # a log: a few plain lines
        sys.stderr.write(line.rstrip() + "\n")
    sys.stderr.flush()


def _rel_max(pairs: list, xp: Any) -> float:
    """``max|a - b| / max|b|`` over all ``(a, b)`` pairs together, in float64.

    One scale for a whole group (all parameter gradients, say): a gradient that
    is zero in exact arithmetic (a bias right before a batch norm) then
    counts by its rounding against the group, not against itself.
    """
    diff = scale = 0.0
    for a, b in pairs:
        if b.size:
            a, b = a.astype(np.float64), b.astype(np.float64)
            diff = max(diff, float(xp.abs(a - b).max()))
            scale = max(scale, float(xp.abs(b).max()))
    return diff / max(scale, 1e-300)


def _step_check(run: _Run, probe: _Run, before: dict, logits: Any, xg: Any, yg: Any,
                rank: int, b: int, xp: Any) -> float:
    """One step of ``run`` against one process on the global batch from the same state.

    ``before``: ``run``'s parameters and running statistics before the step.
    Compares this rank's outputs, the parameter gradients (each rank's are of
    its mean loss over ``b`` samples; averaged over the ranks they are those
    of the global batch's mean loss) and the running statistics after the
    step, each group against its own scale; returns the largest relative
    difference.
    """
    probe.model.set_state_dict(before)
    probe.model.clear_gradients()
    ref_logits = probe.model(xg)
    _, dref, _ = dm.softmax_cross_entropy(ref_logits, yg)
    probe.model.backward(dref)
    got = dict(run.model.named_parameters())
    grads = [(got[n].grad, p.grad) for n, p in probe.model.named_parameters()
             if p.grad is not None and got[n].grad is not None]
    after, ref_after = run.model.state_dict(), probe.model.state_dict()
    stats = [(after[k], ref_after[k]) for k in ref_after if "_mean" in k or "_variance" in k]
    probe.model.clear_gradients()
    return max(_rel_max([(logits, ref_logits[rank * b:(rank + 1) * b])], xp),
               _rel_max(grads, xp), _rel_max(stats, xp))


def _train(args: argparse.Namespace, xp: Any, comm: Communicator, runs: dict) -> dict:
    """The lock-step training loop; returns the per-step curves (same on every rank)."""
    rank, size, b = comm.rank, comm.size, args.batch_per_rank
    data = dm.DataSource(args.seed, args.dtype)
    gbatch = b * size
    curves: dict[str, Any] = {f"loss_{k}": [] for k in RUNS}
    curves.update(drift_sync=[], drift_local=[], mean_global=[], mean_sync=[], mean_local=[])
    step_diff = {"sync": 0.0, "local": 0.0}
    first_diff = 0  # --reproducible: first step (1-based) whose bits differ here, 0: none
    every = max(1, args.steps // 25)
    t0 = time.perf_counter()
    for step in range(args.steps):
        xg, yg = data.batch(step, gbatch)
        xg, yg = xp.asarray(xg), xp.asarray(yg)
        xr, yr = xg[rank * b:(rank + 1) * b], yg[rank * b:(rank + 1) * b]
        losses = {}
        for kind in RUNS:
            run = runs[kind]
            x, y = (xg, yg) if kind == "global" else (xr, yr)
            before = None
            if kind != "global":
                before = {k: v.copy() for k, v in run.model.state_dict().items()}
            logits = run.model(x)
            exact = args.reproducible and kind != "local"
            losses[kind], dlogits, _ = dm.softmax_cross_entropy(
                logits, y, gbatch if exact else None)
            run.model.backward(dlogits)
            if exact:
                rep.step_grads(run.model, comm if kind == "sync" else LOCAL)
                run.opt.step()
                run.model.clear_gradients()
                if kind == "global":
                    ref_logits = logits[rank * b:(rank + 1) * b]
                elif not first_diff and not (
                        rep.same_bits(logits, ref_logits) and rep.same_bits(
                            run.model.state_dict(), runs["global"].model.state_dict())):
                    first_diff = step + 1
                continue
            if before is not None:
                # Data parallelism: one packed all-reduce averages every gradient.
                allreduce_gradients(run.model, comm)
                step_diff[kind] = max(step_diff[kind], _step_check(
                    run, runs["probe"], before, logits, xg, yg, rank, b, xp))
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
            msg = (f"this step's loss: sync {curves['loss_sync'][-1]:.3f}"
                   f" local {curves['loss_local'][-1]:.3f}")
            _progress(step + 1, args.steps, t0, msg)
    # The largest per-step difference of any rank, known to every rank.
    buf = xp.zeros(3 * size, dtype=np.float64)
    buf[rank], buf[size + rank] = step_diff["sync"], step_diff["local"]
    buf[2 * size + rank] = first_diff
    host = [float(v) for v in comm.allreduce_sum(buf)]
    curves["step_diff_sync"] = max(host[:size])
    curves["step_diff_local"] = max(host[size:2 * size])
    firsts = [int(v) for v in host[2 * size:] if v]
    curves["first_differing_step"] = min(firsts) if firsts else None
    return curves


def _compare(args: argparse.Namespace, xp: Any, comm: Communicator, runs: dict) -> dict:
    """Parameters, running stats and eval outputs of each run against one process."""
    data = dm.DataSource(args.seed, args.dtype)
    xe, ye = data.eval_set(256)
    xe, ye = xp.asarray(xe), xp.asarray(ye)
    res: dict[str, Any] = {}
    outs, acc = {}, {}
    for kind in RUNS:
        run = runs[kind]
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


def step_tolerance(dtype: str) -> float:
    """Largest relative difference one step may show between exact computations.

    Both sides round differently (sums over ranks against sums over one
    batch, the shifted merge against a two-pass variance), and the network's
    backward carries those roundings through three layers: 2048 units in the
    last place of each group's largest value (outputs, parameter gradients,
    running statistics). Measured on 2-8 ranks, 200 steps: up to 650 units
    in float64 and 50 in float32.
    """
    return 2048 * float(np.finfo(dtype).eps)


def _summary(args: argparse.Namespace, comm: Communicator, where: str, curves: dict,
             cmp: dict, elapsed: float) -> dict:
    size = comm.size
    tol = step_tolerance(args.dtype)
    step_sync, step_local = curves.pop("step_diff_sync"), curves.pop("step_diff_local")
    first = curves.pop("first_differing_step")
    loss_diff = max(abs(a - b) for a, b in zip(curves["loss_sync"], curves["loss_global"]))
    loss_diff_local = max(abs(a - b) for a, b in zip(curves["loss_local"], curves["loss_global"]))
    d_sync = max(cmp["sync"]["parameters_and_running_stats"], cmp["sync"]["eval_outputs"])
    d_local = max(cmp["local"]["parameters_and_running_stats"], cmp["local"]["eval_outputs"])
    tail = max(1, args.steps // 10)
    return {
        # The claim: each step, from the same parameters, equals one process
        # (--reproducible: every step of the training, bit for bit).
        "sync_equals_global": first is None if args.reproducible else step_sync <= tol,
        "reproducible": args.reproducible,
        "first_differing_step": first,
        "max_step_rel_diff_sync_vs_global": step_sync,
        "max_step_rel_diff_local_vs_global": step_local,
        "step_tolerance": tol,
        "local_differs_from_global": step_local > 1e3 * max(step_sync, tol) if size > 1
        else False,
        # The trajectories after all steps (rounding amplified by training).
        "max_abs_diff_sync_vs_global": d_sync,
        "max_abs_diff_local_vs_global": d_local,
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
    tail = max(1, s["steps"] // 10)
    lines = [
        "",
        f"cupysyncbn demo: {k} rank(s) x {b} samples = global batch {s['global_batch']},"
        f" {s['steps']} steps, {s['dtype']}, {s['device']}, comm={s['communicator']},"
        f" {s['elapsed_s']:.1f}s",
        "",
        f"  {'run':<28}{'train loss':>11}{'eval acc':>10}{'step diff':>12}"
        f"{'end diff':>11}",
    ]
    step = {"global": None, "sync": s["max_step_rel_diff_sync_vs_global"],
            "local": s["max_step_rel_diff_local_vs_global"]}
    end = {"global": None, "sync": s["max_abs_diff_sync_vs_global"],
           "local": s["max_abs_diff_local_vs_global"]}
    for kind in RUNS:
        d1 = "(reference)" if step[kind] is None else f"{step[kind]:.2e}"
        d2 = "" if end[kind] is None else f"{end[kind]:.2e}"
        lines.append(
            f"  {LABELS[kind]:<28}{s['final_train_loss'][kind]:>11.4f}"
            f"{s['eval_accuracy'][kind]:>10.3f}{d1:>12}{d2:>11}"
        )
    lines += [
        f"  train loss: mean of the last {tail} steps.",
        "  step diff: largest relative difference of one step from the same parameters",
        "    (outputs, parameter gradients, running statistics).",
        "  end diff: max |difference| after all steps (parameters, running statistics,",
        "    eval outputs).",
        "",
    ]
    verdict = "yes" if s["sync_equals_global"] else "NO"
    if s.get("reproducible"):
        lines.append(
            "SyncBN == one process on the global batch: bitwise identical to one process"
            f" (reproducible=True: outputs, parameters and running statistics after each of"
            f" the {s['steps']} steps)" if s["sync_equals_global"] else
            "SyncBN == one process on the global batch: NO (reproducible=True: the bits"
            f" first differ at step {s['first_differing_step']})"
        )
    else:
        lines.append(
            f"SyncBN == one process on the global batch: {verdict} (every step from the same"
            f" parameters: max relative diff {s['max_step_rel_diff_sync_vs_global']:.2e},"
            f" tolerance {s['step_tolerance']:.1e} for {s['dtype']})"
        )
    if not s.get("reproducible"):
        lines.append(
            f"after {s['steps']} steps the trajectories differ by"
            f" {s['max_abs_diff_sync_vs_global']:.2e} (training amplifies rounding; not a"
            " synchronization error)"
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
    xp, comm, where = _setup("cpu" if args.reproducible else args.device)
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
    ok = summary["sync_equals_global"] and math.isfinite(
        summary["max_step_rel_diff_sync_vs_global"]
    )
    return 0 if ok else 1
