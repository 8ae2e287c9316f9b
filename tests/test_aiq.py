import numpy as np
import pytest

from ray_router.errors import ConfigError
from ray_router.evaluation.aiq import aiq, nondecreasing_hull


def test_hull_drops_dominated_points_and_flattens_after_the_best_quality():
    costs = [0.0, 1.0, 2.0, 3.0, 4.0]
    quals = [0.2, 0.3, 0.8, 0.6, 0.7]
    hc, hq = nondecreasing_hull(costs, quals)
    # (1, 0.3) lies under the chord from (0, 0.2) to (2, 0.8); after cost 2 the curve is flat at 0.8
    np.testing.assert_allclose(hc, [0.0, 2.0, 4.0])
    np.testing.assert_allclose(hq, [0.2, 0.8, 0.8])


def test_aiq_by_hand():
    # area: trapezoid 0..2 of (0.2 + 0.8)/2 * 2 = 1.0, plus 0.8 * 2 = 1.6 -> 2.6 / 4 = 0.65
    assert aiq([0.0, 1.0, 2.0, 3.0, 4.0], [0.2, 0.3, 0.8, 0.6, 0.7]) == pytest.approx(0.65)


def test_aiq_of_a_concave_curve_keeps_every_point_and_of_one_point_is_its_quality():
    c = [0.0, 1.0, 2.0]
    q = [0.0, 0.6, 0.8]  # concave: all on the hull
    assert aiq(c, q) == pytest.approx(((0 + 0.6) / 2 + (0.6 + 0.8) / 2) / 2)
    assert aiq([0.5, 0.5], [0.3, 0.4]) == pytest.approx(0.4)


def test_aiq_rejects_bad_input():
    with pytest.raises(ConfigError):
        aiq([], [])
    with pytest.raises(ConfigError):
        aiq([0.0, np.nan], [0.1, 0.2])
