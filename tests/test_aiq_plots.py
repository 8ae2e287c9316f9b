import numpy as np
import pandas as pd
import pytest

from ray_router.errors import ConfigError
from ray_router.evaluation.aiq import aiq, aiq_pair
from ray_router.evaluation.plots import _colors, _style, plot_perf_cost, plot_regret

PNG = b"\x89PNG\r\n\x1a\n"


def test_aiq_without_range_is_unchanged():
    # trapezoid 0..2 = 1.0, flat 0.8 on 2..4 = 1.6 -> 2.6 / 4
    assert aiq([0.0, 1.0, 2.0, 3.0, 4.0], [0.2, 0.3, 0.8, 0.6, 0.7]) == pytest.approx(0.65)
    assert aiq([0.0, 1.0, 2.0], [0.0, 0.6, 0.8]) == pytest.approx(0.5)
    assert aiq([0.5, 0.5], [0.3, 0.4]) == pytest.approx(0.4)


def test_aiq_range_extends_a_short_hull_flat_to_hi():
    # own range [0, 2]: (0.3 + 0.7) / 2 = 0.5; over [0, 4]: (1.0 + 0.8 * 2) / 4 = 0.65
    c, q = [0.0, 1.0, 2.0], [0.0, 0.6, 0.8]
    assert aiq(c, q, cost_range=(0.0, 4.0)) == pytest.approx(0.65)
    assert aiq(c, q, cost_range=(0.0, 2.0)) == pytest.approx(aiq(c, q))


def test_aiq_range_counts_zero_left_of_the_cheapest_point():
    # nothing on [0, 2), trapezoid (0.5 + 0.9) / 2 * 2 = 1.4 on [2, 4] -> 1.4 / 4
    assert aiq([2.0, 4.0], [0.5, 0.9], cost_range=(0.0, 4.0)) == pytest.approx(0.35)
    # starts after hi: no credit at all; a single cost inside the range
    assert aiq([5.0, 6.0], [0.5, 0.9], cost_range=(0.0, 4.0)) == 0.0
    assert aiq([1.0], [0.7], cost_range=(0.0, 2.0)) == pytest.approx(0.35)


def test_aiq_range_clips_a_hull_that_reaches_beyond_it():
    # line q = 0.2 + 0.2 c; on [1, 3] from 0.4 to 0.8 -> mean 0.6
    assert aiq([0.0, 4.0], [0.2, 1.0], cost_range=(1.0, 3.0)) == pytest.approx(0.6)
    # a degenerate range is the hull's value there (0 left of the cheapest point)
    assert aiq([1.0, 3.0], [0.2, 0.6], cost_range=(2.0, 2.0)) == pytest.approx(0.4)
    assert aiq([1.0, 3.0], [0.2, 0.6], cost_range=(0.5, 0.5)) == 0.0


def test_aiq_range_rejects_bad_ranges():
    with pytest.raises(ConfigError):
        aiq([0.0, 1.0], [0.1, 0.2], cost_range=(3.0, 1.0))
    with pytest.raises(ConfigError):
        aiq([0.0, 1.0], [0.1, 0.2], cost_range=(0.0, np.inf))


def test_aiq_pair_uses_one_range_for_both():
    router = [(0.1, 2.0, 0.5), (0.5, 4.0, 0.9)]  # (λ, cost, score)
    arms = [("a", 0.0, 0.2), ("b", 1.0, 0.6), ("c", 2.0, 0.8)]  # (name, cost, score)
    r, a, (lo, hi) = aiq_pair(router, arms)
    assert (lo, hi) == (0.0, 4.0)
    assert r == pytest.approx(0.35)
    # arm hull (0,0.2)-(1,0.6)-(2,0.8) flat to 4: (0.4 + 0.7 + 1.6) / 4
    assert a == pytest.approx(2.7 / 4)
    assert r == pytest.approx(aiq([2.0, 4.0], [0.5, 0.9], cost_range=(lo, hi)))
    assert a == pytest.approx(aiq([0.0, 1.0, 2.0], [0.2, 0.6, 0.8], cost_range=(lo, hi)))
    # plain (cost, quality) pairs work too
    assert aiq_pair([(2.0, 0.5), (4.0, 0.9)], [(0.0, 0.2), (1.0, 0.6), (2.0, 0.8)]) == (r, a, (lo, hi))
    with pytest.raises(ConfigError):
        aiq_pair([], arms)


def _curves(n_groups: int, n_seeds: int = 3, n_rounds: int = 20) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for g in range(n_groups):
        for s in range(n_seeds):
            inst = rng.random(n_rounds) * (1 + g / 10)
            served = rng.random(n_rounds)
            for t in range(n_rounds):
                rows.append(
                    {
                        "config": f"config-{g:02d}",
                        "seed": s,
                        "round": t + 1,
                        "cum_regret": inst[: t + 1].sum(),
                        "cum_served_regret": served[: t + 1].sum(),
                    }
                )
    return pd.DataFrame(rows)


def test_sixteen_lines_get_distinct_colour_and_style():
    import matplotlib.pyplot as plt

    for n in (4, 16, 40):
        colors = _colors(plt, n)
        pairs = {(colors[k % len(colors)], _style(k, n)) for k in range(n)}
        assert len(pairs) == n


def test_plot_regret_sixteen_groups_and_other_column(tmp_path):
    curves = _curves(16)
    p = plot_regret(curves, tmp_path / "regret.png", title="16 configs", group="config")
    assert p.read_bytes()[:8] == PNG and p.stat().st_size > 1000
    q = plot_regret(
        curves, tmp_path / "served.png", group="config", column="cum_served_regret", ylabel="cumulative served regret"
    )
    assert q.read_bytes()[:8] == PNG and q.stat().st_size > 1000
    with pytest.raises(KeyError):
        plot_regret(curves, tmp_path / "x.png", group="config", column="no_such_column")
    # the old positional call still works
    r = plot_regret(_curves(2).rename(columns={"config": "policy"}), tmp_path / "old.png", "t")
    assert r.read_bytes()[:8] == PNG


@pytest.mark.parametrize("costs", [(0.001, 0.004, 0.03, 0.1), (0.0, 1.0, 2.0, 3.0)])  # log and linear x
def test_plot_perf_cost_three_routers(tmp_path, costs):
    arms = [(f"org/model-{i}", c, 0.4 + 0.1 * i) for i, c in enumerate(costs)]
    lams = (0.0, 0.5, 1.0, 2.0)
    routers = {
        f"router {k}": [(lam, costs[-1] / (1 + lam + k), 0.75 - 0.05 * lam - 0.02 * k) for lam in lams]
        for k in range(3)
    }
    aiqs = {"single-arm hull": 0.61, "router 0": 0.70, "router 2": 0.64}
    p = plot_perf_cost(tmp_path / "pc.png", arms, routers, title="perf-cost", aiq_values=aiqs)
    assert p.read_bytes()[:8] == PNG and p.stat().st_size > 1000
    # no AIQ values, no routers
    q = plot_perf_cost(tmp_path / "arms.png", arms, {})
    assert q.read_bytes()[:8] == PNG
