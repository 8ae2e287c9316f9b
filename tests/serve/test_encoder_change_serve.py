"""An encoder change on a served router keeps what was learned (issue 15): real Serve, real HTTP,
the real MiniLM encoder after the change.

The router serves with the stand-in encoder and ``state.keep_queries: true``; 40 duels get
feedback. The Serve config is redeployed with MiniLM (another identity and dimension): the new
Posterior re-embeds the kept texts and rebuilds from them before it takes traffic, routes work on
the new encoder, and a decision issued under the old one is refused as stale."""

from __future__ import annotations

import httpx
import pytest

from tests.serve.conftest import delete_router, deploy_router, wait_for
from tests.serve.helpers import QUERIES, error_code, write_synthetic_arm_table
from tests.serve.test_add_arm import OLD

pytestmark = pytest.mark.integration


def deploy(cluster, state_dir, table, encoder: str):
    return deploy_router(
        cluster,
        state_dir,
        {"arm_embeddings": {"file": str(table)}, "encoder": {"name": encoder, "device": "cpu"}},
        args={"arms": [{"id": a, "price_usd": 0.001} for a in OLD], "state": {"keep_queries": True}},
    )


def test_an_encoder_change_rebuilds_the_posterior_from_the_kept_queries(serve_cluster, tmp_path_factory):
    arms_dir, state_dir = tmp_path_factory.mktemp("arms"), tmp_path_factory.mktemp("state")
    app = deploy(serve_cluster, state_dir, write_synthetic_arm_table(arms_dir, OLD, "hash"), "hash")
    try:
        with httpx.Client(base_url=app.url, timeout=120) as client:
            for i in range(40):
                d = client.post("/v1/route", json={"query": f"{QUERIES[i % len(QUERIES)]} #{i}"}).json()
                fb = {"decision_id": d["decision_id"], "outcome": ("first", "second", "tie")[i % 3]}
                r = client.post("/v1/feedback", json=fb, headers=app.auth)
                assert r.status_code == 200, r.text
            old = client.post("/v1/route", json={"query": "issued under the old encoder"}).json()["decision_id"]
            wait_for(lambda: client.get("/v1/stats").json()["posterior"]["n_updates"] == 40, what="40 duels applied")
            # the texts are flushed within a second of their routes
            wait_for(
                lambda: sum(len(p.read_text().splitlines()) for p in (state_dir / "queries").glob("*.jsonl")) >= 41,
                what="the kept query texts",
            )
            app = deploy(serve_cluster, state_dir, write_synthetic_arm_table(arms_dir, OLD, "minilm"), "minilm")

            def rebuilt():
                r = client.get("/v1/stats")
                return r.status_code == 200 and r.json()["durability"]["recovery"].get("reembedded")

            rep = wait_for(rebuilt, timeout_s=300, what="the posterior rebuilt on the new encoder")
            print(f"\nencoder change: {rep}")
            assert rep["texts"] == 40 and rep["missing"] == 0 and rep["from"].startswith("hash")
            stats = client.get("/v1/stats").json()
            assert stats["posterior"]["n_updates"] == 40
            d = client.post("/v1/route", json={"query": "Is 91 a prime number?"})
            assert d.status_code == 200, d.text
            fb = {"decision_id": d.json()["decision_id"], "outcome": "first"}
            assert client.post("/v1/feedback", json=fb, headers=app.auth).status_code == 200
            r = client.post("/v1/feedback", json={"decision_id": old, "outcome": "first"}, headers=app.auth)
            assert r.status_code == 410 and error_code(r.json()) == "stale_decision", r.text
    finally:
        delete_router()
