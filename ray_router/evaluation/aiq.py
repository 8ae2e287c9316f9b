"""RouterBench's AIQ: Average Improvement in Quality, the area under a router's cost–quality curve.

Hu et al., "RouterBench: A Benchmark for Multi-LLM Routing System", arXiv 2403.12031, s.3: a router
evaluated at several cost settings (here the cost weight λ) gives points (cost, quality). Their
*non-decreasing convex hull* R̃ — the upper concave envelope up to the best quality, flat after it —
is what any mix of those settings can reach. AIQ = ∫ R̃(c) dc / (c_max − c_min).

Like for like. ``aiq(costs, qualities)`` alone integrates over the curve's *own* cost range, so two
curves (a router and the hull of the single arms, say) are averaged over different intervals and
their AIQs are not comparable. RouterBench's reference code (``evaluation/AIQ.py``, ``calc_AIQ``)
instead extends every hull flat to the largest cost over all curves and divides each area by that
common cost (it integrates from each hull's cheapest point, i.e. counts nothing to the left of it).
``aiq(..., cost_range=(lo, hi))`` and :func:`aiq_pair` do the same over a common ``[lo, hi]``:

* the hull is clipped to ``[lo, hi]`` (points cheaper than ``lo`` or dearer than ``hi`` still shape it);
* right of its dearest point it stays flat at its best quality up to ``hi``;
* left of its cheapest point it counts quality 0 — a router that cannot serve that cheaply gets no
  credit there;
* the area is divided by ``hi − lo``.

:func:`aiq_pair` takes ``lo``/``hi`` as the cheapest/dearest point over both sets. Since no curve has a
point cheaper than that ``lo``, each value equals RouterBench's (area over ``[0, hi]`` / ``hi``) times
the same factor ``hi / (hi − lo)``, so the two AIQs rank exactly as RouterBench's would.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ray_router.errors import ConfigError


def nondecreasing_hull(costs, qualities) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (cost, quality) of the non-decreasing upper convex hull, sorted by cost."""
    c = np.asarray(costs, dtype=np.float64)
    q = np.asarray(qualities, dtype=np.float64)
    if c.shape != q.shape or c.ndim != 1 or len(c) == 0:
        raise ConfigError("costs and qualities must be 1-d arrays of the same, non-zero length")
    if not (np.isfinite(c).all() and np.isfinite(q).all()):
        raise ConfigError("costs and qualities must be finite")
    order = np.lexsort((-q, c))  # by cost, best quality first among equal costs
    pts = [(c[i], q[i]) for i in order]
    dedup = [pts[0]]
    for p in pts[1:]:
        if p[0] != dedup[-1][0]:
            dedup.append(p)
    hull: list[tuple[float, float]] = []
    for p in dedup:  # upper hull (monotone chain): drop points below the chord
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    hc = np.array([h[0] for h in hull])
    hq = np.array([h[1] for h in hull])
    top = int(hq.argmax())  # after the best quality the curve stays flat
    hc, hq = hc[: top + 1], hq[: top + 1]
    if hc[-1] < c.max():
        hc, hq = np.append(hc, c.max()), np.append(hq, hq[-1])
    return hc, hq


def _check_range(cost_range) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in cost_range)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cost_range must be a pair (lo, hi) of numbers, got {cost_range!r}") from e
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi < lo:
        raise ConfigError(f"cost_range must be finite with lo <= hi, got {cost_range!r}")
    return lo, hi


def aiq(costs, qualities, cost_range: tuple[float, float] | None = None) -> float:
    """Area under the non-decreasing convex hull divided by a cost range.

    Without ``cost_range``: over the points' own cost range (their quality if they share one cost).
    With ``cost_range=(lo, hi)``: over the common ``[lo, hi]`` — the hull clipped to it, flat at its
    best quality right of its dearest point, quality 0 left of its cheapest point, area / (hi − lo);
    if ``lo == hi`` the hull's value at that cost (0 if it starts dearer). See the module docstring.
    """
    hc, hq = nondecreasing_hull(costs, qualities)
    if cost_range is None:
        span = hc[-1] - hc[0]
        if span <= 0:
            return float(hq.max())
        return float(np.trapezoid(hq, hc) / span)
    lo, hi = _check_range(cost_range)
    if hi == lo:
        return float(np.interp(lo, hc, hq)) if lo >= hc[0] else 0.0
    a = max(lo, float(hc[0]))  # quality 0 on [lo, a)
    if a >= hi:
        return 0.0
    inner = hc[(hc > a) & (hc < hi)]
    xs = np.concatenate(([a], inner, [hi]))
    ys = np.interp(xs, hc, hq)  # np.interp holds hq[-1] right of hc[-1]: the flat extension
    return float(np.trapezoid(ys, xs) / (hi - lo))


def _cost_quality(points: Sequence[Sequence]) -> tuple[list[float], list[float]]:
    pts = list(points)
    if not pts:
        raise ConfigError("aiq_pair needs at least one point in each set")
    try:
        return [float(p[-2]) for p in pts], [float(p[-1]) for p in pts]
    except (TypeError, ValueError, IndexError) as e:
        raise ConfigError("each point must end with (cost, quality)") from e


def aiq_pair(router_points, arm_points) -> tuple[float, float, tuple[float, float]]:
    """AIQ of a router and of the single-arm hull over one common cost range.

    Each point is a tuple whose last two entries are ``(cost, quality)``: ``(cost, quality)``,
    ``(λ, cost, quality)`` and ``(arm_name, cost, quality)`` all work. The range is
    ``lo = min``/``hi = max`` of the costs over both sets. Returns ``(router_aiq, arm_aiq, (lo, hi))``.
    """
    rc, rq = _cost_quality(router_points)
    ac, aq = _cost_quality(arm_points)
    lo, hi = float(min(min(rc), min(ac))), float(max(max(rc), max(ac)))
    return aiq(rc, rq, cost_range=(lo, hi)), aiq(ac, aq, cost_range=(lo, hi)), (lo, hi)
