"""Model embeddings a_k (ALGORITHM.md s.3) against a small hand-computed table.

K = 3 arms (a, b, c), M = 2 categories (math, code), 2-d embeddings. Offline rows 0-3, row 4 ("law")
is online only.

    row cat   scores (a, b, c)   costs (a, b, c)   x
    0   math  1.0  0.4  0.3      3  1  0           (1,  1)
    1   code  0.2  0.6  0.5      2  2  0           (0,  2)
    2   math  0.8  0.6  0.3      5  1  0           (1, -1)
    3   code  0.2  0.6  0.3      2  2  0           (1,  2)
    4   law   0    0    0        100 0 0           (unused)

    P = [[0.9, 0.2], [0.5, 0.6], [0.3, 0.4]]      C = [[4, 2], [1, 2], [0, 0]]  -> / 4
    Cn = [[1, .5], [.25, .5], [0, 0]]             xi_math = (1, 0), xi_code = (0.5, 2)

With beta = 10 and two categories, w_math = sigmoid(10 * (s_math - s_code)) and
a_k = w_math * (1, 0) + (1 - w_math) * (0.5, 2) = (w + 0.5 (1 - w), 2 (1 - w)).

lambda = 0.5: U = P - 0.5 Cn = [[0.4, -0.05], [0.375, 0.35], [0.3, 0.4]]; top-1 per category by U:
math -> a, code -> c; b is top nowhere.
"""

from __future__ import annotations

import numpy as np
import pytest

from ray_router.config import parse
from ray_router.data.table import make_table
from ray_router.embeddings import (
    WeightingConfig,
    arm_embeddings,
    category_centroids,
    category_stats,
    category_weights,
    model_embeddings,
    normalise_costs,
    top_tau_mask,
    weighting_scores,
)
from ray_router.errors import ConfigError

SCORES = [[1.0, 0.4, 0.3], [0.2, 0.6, 0.5], [0.8, 0.6, 0.3], [0.2, 0.6, 0.3], [0.0, 0.0, 0.0]]
COSTS = [[3, 1, 0], [2, 2, 0], [5, 1, 0], [2, 2, 0], [100, 0, 0]]
CATS = ["math", "code", "math", "code", "law"]
X = np.array([[1, 1], [0, 2], [1, -1], [1, 2]], dtype=np.float32)
OFFLINE = [0, 1, 2, 3]
NAMES = ("math", "code")

P_EXPECTED = np.array([[0.9, 0.2], [0.5, 0.6], [0.3, 0.4]])
C_EXPECTED = np.array([[4.0, 2.0], [1.0, 2.0], [0.0, 0.0]])
CN_EXPECTED = np.array([[1.0, 0.5], [0.25, 0.5], [0.0, 0.0]])
XI_EXPECTED = np.array([[1.0, 0.0], [0.5, 2.0]])

# a_k written out: sigmoid(7) = 0.99908895, sigmoid(-1) = 0.26894142, sigmoid(4.5) = 0.98901306,
# sigmoid(0.25) = 0.56217650, sigmoid(4) = 0.98201379, sigmoid(0) = 0.5, sigmoid(-4) = 0.01798621.
EXPECTED = {
    # perf: s = P; deltas 0.7, -0.1, -0.1
    "perf": [[0.99954447, 0.00182210], [0.63447071, 1.46211716], [0.63447071, 1.46211716]],
    # perf_cost: s = U; deltas 0.45, 0.025, -0.1
    "perf_cost": [[0.99450653, 0.02197389], [0.78108825, 0.87564700], [0.63447071, 1.46211716]],
    # excel_perf_cost: s = [[0.4, 0], [0, 0], [0, 0.4]] (non-excelling entries zeroed); deltas 0.4, 0, -0.4
    "excel_perf_cost": [[0.99100690, 0.03597242], [0.75, 1.0], [0.50899310, 1.96402758]],
    # excel_mask: a only math -> xi_math; c only code -> xi_code; b excels nowhere -> perf_cost row
    "excel_mask": [[1.0, 0.0], [0.78108825, 0.87564700], [0.5, 2.0]],
}


@pytest.fixture
def table():
    return make_table(
        "toy",
        [f"q{i}" for i in range(5)],
        [f"text {i}" for i in range(5)],
        CATS,
        ["a", "b", "c"],
        np.array(SCORES),
        np.array(COSTS, dtype=float),
    )


def test_category_stats_and_normalisation(table):
    P, C = category_stats(table, OFFLINE, NAMES)
    np.testing.assert_allclose(P, P_EXPECTED)
    np.testing.assert_allclose(C, C_EXPECTED)
    np.testing.assert_allclose(normalise_costs(C), CN_EXPECTED)
    np.testing.assert_allclose(normalise_costs(normalise_costs(C)), CN_EXPECTED)
    # default category order is first-seen in the offline rows: math, code
    P2, C2 = category_stats((np.array(SCORES), np.array(COSTS, dtype=float), CATS), OFFLINE)
    np.testing.assert_allclose(P2, P_EXPECTED)
    np.testing.assert_allclose(C2, C_EXPECTED)


def test_category_stats_without_costs_and_with_prices(table):
    no_cost = make_table("toy", table.query_ids, table.texts, CATS, table.arms, table.scores)
    P, C = category_stats(no_cost, OFFLINE, NAMES)
    np.testing.assert_allclose(P, P_EXPECTED)
    np.testing.assert_array_equal(C, np.zeros((3, 2)))
    np.testing.assert_array_equal(normalise_costs(C), np.zeros((3, 2)))
    _, C = category_stats(no_cost, OFFLINE, NAMES, prices={"a": 2.0, "b": 1.0, "c": 0.0})
    np.testing.assert_allclose(C, [[2, 2], [1, 1], [0, 0]])
    _, C = category_stats(table, OFFLINE, NAMES, prices=[2.0, 1.0, 0.0])  # prices override logged costs
    np.testing.assert_allclose(C, [[2, 2], [1, 1], [0, 0]])
    # without costs every weighting still works, and perf_cost = perf
    cfg = WeightingConfig("perf_cost", cost_weight=0.5)
    np.testing.assert_allclose(model_embeddings(X, [0, 1, 0, 1], P, np.zeros((3, 2)), cfg), EXPECTED["perf"], atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rows": OFFLINE, "category_names": ("math",)}, "missing from category_names"),
        ({"rows": OFFLINE, "category_names": ("math", "code", "law")}, "without offline rows"),
        ({"rows": OFFLINE, "prices": {"a": 1.0}}, "lacks arms"),
        ({"rows": OFFLINE, "prices": [1.0, -1.0, 0.0]}, "non-negative"),
    ],
)
def test_category_stats_errors(table, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        category_stats(table, **kwargs)


def test_centroids():
    np.testing.assert_allclose(category_centroids(X, [0, 1, 0, 1], 2), XI_EXPECTED)
    with pytest.raises(ConfigError, match="without offline rows"):
        category_centroids(X, [0, 0, 0, 0], 2)
    with pytest.raises(ConfigError):
        category_centroids(X, [0, 1, 2, 1], 2)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_weightings_hand_computed(name):
    cfg = WeightingConfig(name, cost_weight=0.5, top_tau=1, beta=10.0)
    A = model_embeddings(X, [0, 1, 0, 1], P_EXPECTED, CN_EXPECTED, cfg)
    np.testing.assert_allclose(A, EXPECTED[name], atol=1e-7)
    # string categories with an explicit column order give the same result
    A2 = model_embeddings(X, ["math", "code", "math", "code"], P_EXPECTED, CN_EXPECTED, cfg, category_names=NAMES)
    np.testing.assert_allclose(A2, A)


def test_full_pipeline_from_table(table):
    P, C = category_stats(table, OFFLINE, NAMES)
    idx = table.subset(OFFLINE).category_index()  # math=0, code=1 in first-seen order
    cfg = WeightingConfig("excel_mask", cost_weight=0.5, top_tau=1)
    np.testing.assert_allclose(model_embeddings(X, idx, P, normalise_costs(C), cfg), EXPECTED["excel_mask"], atol=1e-7)


def test_excel_scores_zeroing_and_masking():
    cfg = dict(cost_weight=0.5, top_tau=1)
    S = weighting_scores(P_EXPECTED, CN_EXPECTED, WeightingConfig("excel_perf_cost", **cfg))
    np.testing.assert_allclose(S, [[0.4, 0.0], [0.0, 0.0], [0.0, 0.4]])
    S = weighting_scores(P_EXPECTED, CN_EXPECTED, WeightingConfig("excel_mask", **cfg))
    np.testing.assert_allclose(S, [[0.4, -np.inf], [0.375, 0.35], [-np.inf, 0.4]])
    # perf ignores lambda
    S = weighting_scores(P_EXPECTED, CN_EXPECTED, WeightingConfig("perf", cost_weight=5.0))
    np.testing.assert_allclose(S, P_EXPECTED)


def test_top_tau_ties_are_inclusive():
    U = np.array([[1.0, 0.5], [1.0, 0.2], [0.5, 0.2]])
    np.testing.assert_array_equal(top_tau_mask(U, 1), [[True, True], [True, False], [False, False]])
    np.testing.assert_array_equal(top_tau_mask(U, 2), [[True, True], [True, True], [False, True]])
    np.testing.assert_array_equal(top_tau_mask(U, 3), np.ones((3, 2), dtype=bool))
    # floating-point ties: 0.1 + 0.2 and 0.3 count as equal
    np.testing.assert_array_equal(top_tau_mask(np.array([[0.1 + 0.2], [0.3], [0.0]]), 1), [[True], [True], [False]])


def test_large_beta_picks_the_best_category_and_zero_beta_averages():
    A = model_embeddings(X, [0, 1, 0, 1], P_EXPECTED, CN_EXPECTED, WeightingConfig("perf", beta=1e4))
    np.testing.assert_allclose(A, [XI_EXPECTED[0], XI_EXPECTED[1], XI_EXPECTED[1]], atol=1e-12)
    A = model_embeddings(X, [0, 1, 0, 1], P_EXPECTED, CN_EXPECTED, WeightingConfig("perf", beta=0.0))
    np.testing.assert_allclose(A, np.tile(XI_EXPECTED.mean(axis=0), (3, 1)))
    cfg = WeightingConfig("excel_mask", cost_weight=0.5, top_tau=1, beta=0.0)  # uniform over allowed only
    A = model_embeddings(X, [0, 1, 0, 1], P_EXPECTED, CN_EXPECTED, cfg)
    np.testing.assert_allclose(A, [[1.0, 0.0], [0.75, 1.0], [0.5, 2.0]])


def test_softmax_is_stable_and_rejects_all_masked_rows():
    W = category_weights(np.array([[1000.0, -1000.0], [-np.inf, 3.0]]), beta=10.0)
    np.testing.assert_array_equal(W, [[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(arm_embeddings(XI_EXPECTED, np.array([[1e6, 0.0]]), 1e3), [[1.0, 0.0]])
    with pytest.raises(ConfigError):
        category_weights(np.array([[-np.inf, -np.inf]]), beta=1.0)
    with pytest.raises(ConfigError):
        category_weights(np.array([[np.nan, 0.0]]), beta=1.0)
    with pytest.raises(ConfigError):
        arm_embeddings(XI_EXPECTED, np.zeros((3, 3)), 1.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "bogus"},
        {"cost_weight": -0.1},
        {"cost_weight": float("nan")},
        {"beta": float("inf")},
        {"beta": -1.0},
        {"beta": "10"},
        {"top_tau": 0},
        {"top_tau": 1.5},
        {"top_tau": True},
    ],
)
def test_weighting_config_rejects(kwargs):
    (field,) = kwargs
    with pytest.raises(ConfigError, match=rf"^WeightingConfig: {field}: "):
        parse(WeightingConfig, kwargs)


def test_weighting_config_is_frozen_and_hashable():
    cfg = WeightingConfig("excel_mask", cost_weight=0.2, top_tau=2, beta=5.0)
    assert hash(cfg) == hash(WeightingConfig("excel_mask", 0.2, 2, 5.0))
    with pytest.raises(AttributeError):
        cfg.beta = 1.0  # type: ignore[misc]
