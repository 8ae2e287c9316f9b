"""The service with the offline-informed prior, without Ray: an operator's per-category profile
stored beside the arm embeddings, exploit-first duels, the start-up facts in /v1/stats."""

from __future__ import annotations

import numpy as np
import pytest

from ray_router.errors import DataError
from ray_router.policies.offline_prior import OfflinePrior
from ray_router.serve.arms import _prior_from_npz, save_arm_embeddings
from ray_router.serve.ranking import SampleView, choose_best
from ray_router.serve.state import PosteriorState, make_scorer
from tests.serve.helpers import ARMS, PRICES, arm_embeddings, hash_encoder, spec


def _profile(dim=16):
    """An operator's own pool: centroids of a few example queries per category and a score per arm."""
    enc = hash_encoder(dim)
    cats = {"code": ["write a python function", "fix this bug"], "math": ["what is 2+2", "integrate x^2"]}
    centroids = np.stack([enc.encode(q).mean(axis=0) for q in cats.values()])
    utility = np.array([[0.9, 0.2, 0.5, 0.1], [0.1, 0.8, 0.5, 0.2]])  # alpha codes, beta does maths
    return {"centroids": centroids, "utility": utility, "counts": np.array([20.0, 20.0]), "categories": list(cats)}


def test_a_profile_travels_in_the_npz_and_reorders_with_the_arm_table(tmp_path):
    path = save_arm_embeddings(tmp_path / "arms.npz", ARMS, arm_embeddings(), "hash-test", profile=_profile())
    with np.load(path, allow_pickle=False) as z:
        prior = OfflinePrior.from_dict(_prior_from_npz(z, path, list(ARMS), list(ARMS)))
        reordered = OfflinePrior.from_dict(_prior_from_npz(z, path, list(reversed(ARMS)), list(ARMS)))
    assert prior.category_names == ("code", "math") and prior.n_arms == 4
    np.testing.assert_allclose(reordered.utility, prior.utility[:, ::-1])
    bad = _profile()
    bad["utility"] = bad["utility"][:, :3]  # a column short: a clear error, not an IndexError
    path = save_arm_embeddings(tmp_path / "bad.npz", ARMS, arm_embeddings(), "hash-test", profile=bad)
    with np.load(path, allow_pickle=False) as z, pytest.raises(DataError, match="prior_utility"):
        _prior_from_npz(z, path, list(ARMS), list(ARMS))


def test_the_posterior_starts_from_the_profile_and_serves_its_best_arm(tmp_path):
    prior = OfflinePrior.from_profile(
        **{k: v for k, v in _profile().items() if k != "categories"}, category_names=_profile()["categories"]
    ).to_dict()
    st = PosteriorState(spec(tmp_path, policy_config={"n_steps": 5}, offline_prior=prior))
    st.open()
    try:
        post = st.stats()["posterior"]
        assert post["offline_prior"].startswith("offline prior: given") and post["unreachable_arms"] == []
        assert post["arm_selection"] == "exploit_first"
        view = SampleView(make_scorer(st.spec.arm_embeddings, st.spec.policy_config, 0, prior), PRICES)
        v = st.view()
        view.update(v["version"], v["theta"], v["theta_mean"])
        enc = hash_encoder()
        x = enc.encode(["write a python function"])[0]
        served, _, _ = view.choose(x, None, "single")
        assert ARMS[served] == "alpha"  # the profile's best arm for code, before any feedback
        for q in ["write a python function", "what is 2+2", "fix this bug"]:
            x = enc.encode([q])[0]
            first, second, _ = view.choose(x, None, "duel")
            assert first == choose_best(view.scorer.arm_scores(x, view.theta_mean), np.ones(4, bool))  # exploit first
            assert second != first  # distinct_arms (the service's default)
    finally:
        st.close()


def test_stats_name_arms_a_config_can_never_choose(tmp_path):
    A = arm_embeddings()
    A[3] = A[:3].mean(axis=0)  # delta inside the hull of the others
    st = PosteriorState(
        spec(
            tmp_path, arm_embeddings=A, policy_config={"feature_map": "hadamard", "offline_prior": "none", "n_steps": 2}
        )
    )
    st.open()
    try:
        assert st.stats()["posterior"]["unreachable_arms"] == ["delta"]
    finally:
        st.close()
