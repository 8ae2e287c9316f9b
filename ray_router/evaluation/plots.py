"""Regret curves with 95% bands (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ray_router.evaluation.stats import mean_ci95


def plot_regret(curves, path: str | Path, title: str = "", group: str = "policy") -> Path:
    """Mean cumulative regret per ``group`` value over rounds, with the 95% interval over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, df in curves.groupby(group, sort=False):
        wide = df.pivot(index="round", columns="seed", values="cum_regret").sort_index()
        mean, lo, hi = mean_ci95(wide.to_numpy(), axis=1)
        rounds = wide.index.to_numpy()
        (line,) = ax.plot(rounds, mean, label=f"{name} (n={wide.shape[1]})")
        ax.fill_between(rounds, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative regret")
    ax.set_title(title or "cumulative regret (mean, 95% CI over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
