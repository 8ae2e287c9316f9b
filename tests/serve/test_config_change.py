"""A config change keeps what was learned (issue 15): real Serve, real HTTP, stub upstreams.

1,000+ duel-mode chat requests to four stub arms, each answered by a client's ``/v1/feedback``
(the better answer wins), fill the feedback log (and a snapshot: ``snapshot_every_n`` is smaller
than the run). Then the Serve config changes the policy's hyperparameters and is redeployed on
the same state directory: the new Posterior cannot restore the snapshot under the new config, so
it rebuilds the posterior from the logged duels before it takes over. ``ray-router log export``
writes the log as a duel table; the same policy (the new config, the same arm table and seed)
trained offline on the exported duels, refreshed as often as the service's, makes the same arm
choices as the service for every probe query. The new config also duels the rival (``second_arm:
rival``, issue 10): every duel route's pair is the offline policy's ``select`` (the first arm its
exploit arm, the second the arm most likely to beat it under its mean and variance).
"""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import numpy as np
import pytest

from ray_router.cli import main as cli_main
from ray_router.embeddings import get_encoder
from ray_router.evaluation.duels import read_duels
from ray_router.policies import Duel
from ray_router.serve import launch
from ray_router.serve.arms import resolve_arm_table
from ray_router.serve.config import AppArgs
from ray_router.serve.ranking import choose_duel
from ray_router.serve.state import make_scorer
from ray_router.serve.tokens import quantise
from tests.openai_stub import WRONG, StubModel, StubServer
from tests.serve.conftest import RouterApp, delete_router, deploy_router, wait_for
from tests.serve.helpers import QUERIES, write_synthetic_arm_table

pytestmark = pytest.mark.integration

QUALITY = {"a0": {"math": 0.9, "default": 0.3}, "a1": {"code": 0.9, "default": 0.3}, "a2": 0.5, "a3": 0.2}
CATEGORIES = ("math", "code", "general")
N_DUELS = 1000
BEFORE = {"offline_prior": "none", "feature_map": "hadamard_bias", "eta": 1.0}
AFTER = {**BEFORE, "eta": 2.0, "prior_sigma": 0.5, "second_arm": "rival"}  # the config change


@pytest.fixture(scope="module")
def stub():
    with StubServer({a: StubModel(a, quality=q) for a, q in QUALITY.items()}, seed=3) as up:
        yield up


def deploy(cluster, state_dir, table, stub, config) -> RouterApp:
    return deploy_router(
        cluster,
        state_dir,
        {"arm_embeddings": {"file": str(table)}, "encoder": {"name": "hash", "device": "auto"}},
        args={
            "arms": [
                {"id": a, "price_usd": 0.001, "upstream": {"base_url": stub.base_url, "model": a}} for a in QUALITY
            ],
            "policy": {"seed": 7, "config": config},
            "state": {"snapshot_every_n": 400},
            "auth": {
                "clients": [{"name": "default", "key_env": "RAY_ROUTER_CLIENT_KEY", "rate_per_s": 1e4, "burst": 10**4}]
            },
        },
    )


def one_duel(client: httpx.Client, auth: dict, i: int) -> None:
    text = f"[{CATEGORIES[i % 3]}] {QUERIES[i % len(QUERIES)]} (duel {i})"
    body = {"model": "router", "messages": [{"role": "user", "content": text}], "router": {"mode": "duel"}}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    a, b = (c["message"]["content"] for c in r.json()["choices"])
    wrong_a, wrong_b = a.startswith(WRONG), b.startswith(WRONG)
    outcome = "tie" if wrong_a == wrong_b else ("second" if wrong_a else "first")
    f = client.post(
        "/v1/feedback", json={"decision_id": r.headers["x-router-decision-id"], "outcome": outcome}, headers=auth
    )
    assert f.status_code == 200, f.text


def test_a_config_change_rebuilds_the_posterior_from_the_log(serve_cluster, stub, tmp_path_factory, tmp_path):
    table = write_synthetic_arm_table(tmp_path_factory.mktemp("arms"), list(QUALITY), "hash", seed=0)
    state_dir = tmp_path_factory.mktemp("state")
    app = deploy(serve_cluster, state_dir, table, stub, BEFORE)
    try:
        key = (app.state_dir / "secrets" / "client_default").read_text().strip()
        with httpx.Client(base_url=app.url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as client:
            with cf.ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda i: one_duel(client, app.auth, i), range(N_DUELS)))
            before = client.get("/v1/stats").json()
            assert before["durability"]["last_seq"] == N_DUELS

            # the config change, on the same state directory
            app = deploy(serve_cluster, state_dir, table, stub, AFTER)

            def rebuilt() -> dict | None:
                r = client.get("/v1/admin/status", headers=app.admin)
                st = r.json().get("posterior", {}) if r.status_code == 200 else {}
                why = (st.get("recovery") or {}).get("rebuilt_from_log") or ""
                return st if st.get("role") == "writer" and "policy config changed" in why else None

            recovery = wait_for(rebuilt, timeout_s=300, what="the new Posterior to rebuild and take over")["recovery"]
            version = wait_for(lambda: client.get("/v1/stats").json()["posterior"]["version"], what="a version")

            # the same policy trained offline on the exported duels
            out = tmp_path / "duels.parquet"
            assert cli_main(["log", "export", str(state_dir), "--out", str(out)]) == 0
            log = read_duels(out)
            assert len(log) == N_DUELS and set(log.source) == {"human"}
            deployed = AppArgs.model_validate(launch.our_apps(app.config)[0]["args"])  # the config as deployed
            assert deployed.policy.config["eta"] == 2.0 and deployed.policy.seed == 7
            assert deployed.policy.config["second_arm"] == "rival"
            arms = resolve_arm_table(deployed)
            offline = make_scorer(arms.embeddings, deployed.policy.config, deployed.policy.seed, arms.offline_prior)
            for t in range(len(log)):
                offline.update(
                    log.X[t].astype(np.float64),
                    Duel(int(log.first[t]), int(log.second[t])),
                    float(log.y[t]),
                    log.offered[t],
                )
            for _ in range(version):
                offline.refresh()

            enc = get_encoder("hash", cache_dir=False)  # the deployment's encoder
            probes = [f"[{c}] {q}" for c in CATEGORIES for q in QUERIES[:10]]
            agree = rivals = not_thompson = 0
            ids = list(QUALITY)
            for text in probes:
                r = client.post("/v1/route", json={"query": text, "mode": "single"})
                assert r.status_code == 200 and r.json()["posterior_version"] == version, r.text
                x = quantise(enc.encode([text])[0]).astype(np.float64)
                agree += r.json()["model"] == ids[offline.best(x)]
                # a duel: the rival of the exploit arm, from the published mean and variance (no draw:
                # rival_min_prob is 0, so no sample's θ² arm enters)
                for offered in (None, [1, 2, 3]):  # all arms, and all but a0
                    body = {
                        "query": text,
                        "mode": "duel",
                        **({"candidates": [ids[k] for k in offered]} if offered else {}),
                    }
                    d = client.post("/v1/route", json=body)
                    assert d.status_code == 200 and d.json()["posterior_version"] == version, d.text
                    duel = offline.select(x, offered, resample=False)
                    rivals += d.json()["arms"] == [ids[duel.first], ids[duel.second]]
                    mask = np.isin(np.arange(len(ids)), offered if offered else np.arange(len(ids)))
                    thompson = choose_duel(offline.arm_scores(x), mask, None, True, duel.first)[1]
                    not_thompson += duel.second != thompson  # where θ²'s arm would differ
            print(
                f"\nconfig change: rebuilt from {recovery}, version {version}; {agree}/{len(probes)} same choices, "
                f"{rivals}/{2 * len(probes)} same rival duels ({not_thompson} of them not θ²'s arm)"
            )
            assert agree == len(probes) and rivals == 2 * len(probes)
    finally:
        delete_router()
