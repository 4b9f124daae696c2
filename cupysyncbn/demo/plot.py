"""The demo's figure: loss curves and running-statistics drift of the three runs.

Part of :mod:`cupysyncbn.demo`. Uses matplotlib's non-interactive Agg
backend, so it works on machines without a display.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .model import LABELS

COLORS = {"global": "black", "sync": "tab:blue", "local": "tab:red"}


def _smooth(v: list, k: int) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    if k <= 1 or a.size < k:
        return a
    c = np.cumsum(np.insert(a, 0, 0.0))
    out = np.empty_like(a)
    out[k - 1:] = (c[k:] - c[:-k]) / k
    out[: k - 1] = c[1:k] / np.arange(1, k)
    return out


def plot(summary: dict, path: Path) -> bool:
    """Write the figure to ``path``; False (with a note on stderr) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.stderr.write(
            "matplotlib is not installed: no demo.png (pip install 'cupysyncbn[plot]',"
            " or pip install matplotlib)\n"
        )
        return False
    c = summary["curves"]
    steps = np.arange(1, len(c["loss_global"]) + 1)
    k = max(1, len(steps) // 20)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))

    ax = axes[0]
    for kind, style in (("global", "-"), ("sync", "--"), ("local", "-")):
        ax.plot(steps, _smooth(c[f"loss_{kind}"], k), style, color=COLORS[kind],
                label=LABELS[kind], lw=2.2 if kind == "global" else 1.6)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (global batch mean, moving avg {k})")
    ax.set_title("Loss")
    ax.legend()

    ax = axes[1]
    floor = 1e-17
    for kind in ("sync", "local"):
        ax.semilogy(steps, np.maximum(c[f"drift_{kind}"], floor), color=COLORS[kind],
                    label=LABELS[kind])
    ax.set_xlabel("step")
    ax.set_ylabel("||running stats - one process's|| / ||one process's||")
    ax.set_title("Running mean/variance drift vs global batch")
    ax.set_ylim(floor / 2, None)
    ax.legend()

    ax = axes[2]
    for kind, style in (("global", "-"), ("sync", "--"), ("local", "-")):
        who = " (rank 0)" if kind == "local" else ""
        ax.plot(steps, c[f"mean_{kind}"], style, color=COLORS[kind], label=LABELS[kind] + who,
                lw=2.2 if kind == "global" else 1.6)
    ax.set_xlabel("step")
    ax.set_ylabel("running mean, conv BN channel 0")
    ax.set_title("One running statistic")
    ax.legend()

    fig.suptitle(
        f"cupysyncbn demo: {summary['world_size']} ranks x {summary['batch_per_rank']} samples"
        f" ({summary['dtype']}, {summary['device']}); SyncBN vs one process: max |diff|"
        f" {summary['max_abs_diff_sync_vs_global']:.1e}, local BN:"
        f" {summary['max_abs_diff_local_vs_global']:.2f}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
