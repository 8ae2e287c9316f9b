"""RouterBench's AIQ: Average Improvement in Quality, the area under a router's cost–quality curve.

Hu et al., "RouterBench: A Benchmark for Multi-LLM Routing System", arXiv 2403.12031, s.3: a router
evaluated at several cost settings (here the cost weight λ) gives points (cost, quality). Their
*non-decreasing convex hull* R̃ — the upper concave envelope up to the best quality, flat after it —
is what any mix of those settings can reach. AIQ = ∫ R̃(c) dc / (c_max − c_min) over the points'
cost range.
"""

from __future__ import annotations

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


def aiq(costs, qualities) -> float:
    """Area under the non-decreasing convex hull, divided by the cost range (quality if one cost)."""
    hc, hq = nondecreasing_hull(costs, qualities)
    span = hc[-1] - hc[0]
    if span <= 0:
        return float(hq.max())
    return float(np.trapezoid(hq, hc) / span)
