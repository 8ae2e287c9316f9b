"""Regret curves with 95% bands and quality–cost views (matplotlib, headless)."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from ray_router.evaluation.stats import mean_ci95

_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(plt, n: int) -> list:
    """``n`` distinct colours: tab10 up to 10, tab20 beyond (then cycling)."""
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(max(n, 1))]


def _line(k: int, colors: list, n: int) -> dict[str, Any]:
    """Colour, line style and width of the k-th of n lines (distinct colours, cycling styles)."""
    return {"color": colors[k % len(colors)], "linestyle": _style(k, n), "linewidth": 1.5}


def _style(k: int, n_colors: int) -> str:
    """Line style for the ``k``-th of ``n_colors`` lines. Up to 10 lines: cycles through the four styles.
    Beyond (tab20): neighbouring, similar tab20 shades alternate solid/dashed, and once the 20 colours
    wrap the pair switches to dash-dot/dotted, so no (colour, style) repeats within 40 lines."""
    if n_colors > 10:
        return _LINESTYLES[(k % 2 + 2 * (k // 20)) % len(_LINESTYLES)]
    return _LINESTYLES[k % len(_LINESTYLES)]


def _legend_right(ax, n: int) -> None:
    ax.legend(
        bbox_to_anchor=(1.02, 1),
        loc="upper left",
        borderaxespad=0.0,
        fontsize=8 if n <= 12 else 7,
        ncol=1 if n <= 24 else 2,
        frameon=False,
    )


def plot_regret(
    curves,
    path: str | Path,
    title: str = "",
    group: str = "policy",
    *,
    column: str = "cum_regret",
    ylabel: str | None = None,
) -> Path:
    """Mean of ``column`` (default cumulative regret) per ``group`` value over rounds, with the 95%
    interval over seeds. Distinct colours and cycling line styles keep 15+ lines apart; the legend
    sits outside, right of the axes."""
    plt = _pyplot()
    groups = list(curves.groupby(group, sort=False))
    colors = _colors(plt, len(groups))
    fig, ax = plt.subplots(figsize=(7 + (2.5 if len(groups) <= 24 else 5), 4.5))
    for k, (name, df) in enumerate(groups):
        wide = df.pivot(index="round", columns="seed", values=column).sort_index()
        mean, lo, hi = mean_ci95(wide.to_numpy(), axis=1)
        rounds = wide.index.to_numpy()
        style = _line(k, colors, len(groups))
        ax.plot(rounds, mean, label=f"{name} (n={wide.shape[1]})", **style)
        ax.fill_between(rounds, lo, hi, color=style["color"], alpha=0.15 if len(groups) <= 10 else 0.07, linewidth=0)
    nice = column.replace("_", " ").replace("cum ", "cumulative ")
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel or nice)
    ax.set_title(title or f"{nice} (mean, 95% CI over seeds)")
    ax.grid(alpha=0.3)
    if groups:
        _legend_right(ax, len(groups))
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_perf_cost(
    path: str | Path, arm_points, router_curves, title: str = "", aiq_values: dict[str, float] | None = None
) -> Path:
    """Quality vs cost: single arms, their non-decreasing hull, and each router over λ.

    ``arm_points``: ``[(arm_name, cost, score), ...]`` — one labelled marker each, plus their
    non-decreasing convex hull as a dashed line (extended flat to the dearest point on the plot).
    ``router_curves``: ``{label: [(λ, cost, score), ...]}`` — one line with markers per router, each
    point annotated ``λ=..``. ``aiq_values``: ``{label: AIQ}`` shown in the legend; the hull's key is
    ``"single-arm hull"``. The x axis is logarithmic when all costs are > 0 and span more than 20×.
    """
    from ray_router.evaluation.aiq import nondecreasing_hull

    plt = _pyplot()
    aiq_values = aiq_values or {}
    arm_points = list(arm_points)
    router_curves = {k: sorted(v, key=lambda p: p[1]) for k, v in (router_curves or {}).items()}
    all_costs = [float(p[1]) for p in arm_points] + [float(p[1]) for pts in router_curves.values() for p in pts]

    positive = [c for c in all_costs if c > 0]
    log_x = bool(all_costs) and len(positive) == len(all_costs) and max(positive) / min(positive) > 20
    n_lines = len(router_curves) + (1 if arm_points else 0)
    fig, ax = plt.subplots(figsize=(10, 5.5))
    if arm_points:
        ac = [float(p[1]) for p in arm_points]
        aq = [float(p[2]) for p in arm_points]
        ax.scatter(ac, aq, marker="x", color="dimgrey", s=30, zorder=3, label="single arms")
        for name, c, s in arm_points:
            ax.annotate(
                str(name).split("/")[-1][:22],
                (c, s),
                fontsize=6,
                alpha=0.75,
                xytext=(3, -8),
                textcoords="offset points",
            )
        hc, hq = nondecreasing_hull(ac, aq)
        if all_costs and max(all_costs) > hc[-1]:
            hc, hq = np.append(hc, max(all_costs)), np.append(hq, hq[-1])
        if log_x and len(hc) > 1:  # the hull is linear in cost: sample it densely so it bends on a log axis
            dense = np.unique(np.concatenate([np.geomspace(a, b, 32) for a, b in pairwise(hc)]))
            hc, hq = dense, np.interp(dense, hc, hq)
        key = "single-arm hull"
        label = key + (f", AIQ {aiq_values[key]:.3f}" if key in aiq_values else "")
        ax.plot(hc, hq, linestyle="--", color="black", linewidth=1.2, alpha=0.8, zorder=2, label=label)

    colors = _colors(plt, len(router_curves))
    for k, (name, pts) in enumerate(router_curves.items()):
        xs = [float(p[1]) for p in pts]
        ys = [float(p[2]) for p in pts]
        label = str(name) + (f", AIQ {aiq_values[name]:.3f}" if name in aiq_values else "")
        style = _line(k, colors, len(router_curves))
        ax.plot(xs, ys, marker=_MARKERS[k % len(_MARKERS)], markersize=5, zorder=4, label=label, **style)
        for lam, c, s in pts:
            ax.annotate(
                f"λ={lam:g}", (c, s), fontsize=6, color=style["color"], xytext=(3, 3), textcoords="offset points"
            )

    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("mean cost of the served arm (USD)")
    ax.set_ylabel("mean score of the served arm")
    ax.set_title(title or "quality vs cost")
    ax.grid(alpha=0.3, which="both")
    if n_lines:
        _legend_right(ax, n_lines)
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
