"""Adding and retiring arms through the admin API (issue 15): real Serve, real HTTP, under load.

Three arms serve routes and chat while two client threads keep sending requests. ``POST
/v1/admin/arms`` adds a fourth arm that no offline data covers, with its operator's per-category
profile (best by far at ``code``): no request of the load run fails, the Ingress serves the grown
table before the call answers, and the router chooses the new arm, before any feedback, for the
queries its prior says it is best at. Then it is retired and restored, the Posterior process is
killed (the change is in the state directory, so the new process has it), and every bad request
gets its 4xx.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.parse

import httpx
import numpy as np
import pytest

from ray_router.embeddings import get_encoder
from ray_router.policies.offline_prior import OfflinePrior, extend_with_profiles
from ray_router.serve import launch
from ray_router.serve.arms import resolve_arm_table
from ray_router.serve.config import AppArgs
from ray_router.serve.tokens import quantise
from tests.openai_stub import StubModel, StubServer
from tests.serve.conftest import delete_router, wait_for
from tests.serve.helpers import QUERIES, error_code, write_synthetic_arm_table
from tests.serve.test_add_arm import NEW, OLD, Load, arm, deploy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stub():
    with StubServer({a: StubModel(a, quality=0.6) for a in [*OLD, "coder"]}, seed=5) as up:
        yield up


def path(arm_id: str) -> str:
    return urllib.parse.quote(arm_id, safe="")


def test_arms_added_retired_and_restored_through_the_admin_api(serve_cluster, stub, tmp_path_factory):
    table = write_synthetic_arm_table(tmp_path_factory.mktemp("arms"), OLD, "hash", seed=0)
    state_dir = tmp_path_factory.mktemp("state")
    app = deploy(serve_cluster, state_dir, table, [arm(a, stub) for a in OLD])
    new_arm = {**arm("coder", stub), **NEW}
    try:
        key = (app.state_dir / "secrets" / "client_default").read_text().strip()
        with httpx.Client(base_url=app.url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as client:
            # some learning first: what the other arms learned must survive the change
            for i in range(30):
                d = client.post("/v1/route", json={"query": f"{QUERIES[i % len(QUERIES)]} (learn {i})"}).json()
                fb = {"decision_id": d["decision_id"], "outcome": "first"}
                assert client.post("/v1/feedback", json=fb, headers=app.auth).status_code == 200
            wait_for(
                lambda: client.get("/v1/stats").json()["posterior"]["n_updates"] == 30,
                what="the 30 duels applied",
            )
            # ------------------------------------------------------------ add, under load
            with Load(app.url, key) as load:
                time.sleep(2)
                before = len(load.statuses)
                t0 = time.monotonic()
                r = client.post("/v1/admin/arms", json=new_arm, headers=app.admin)
                add_s = time.monotonic() - t0
                assert r.status_code == 201, r.text
                report = r.json()
                assert report["index"] == 3 and report["arms"] == [*OLD, "coder"]
                assert report["rebuilt_from_history"] == 30  # the grown posterior learned every duel again
                # the answering replica serves the grown table already
                arms = client.get("/v1/arms").json()["arms"]
                assert [a["id"] for a in arms] == [*OLD, "coder"] and arms[3]["chat"] and not arms[3]["retired"]
                time.sleep(3)  # the load goes on after the change
            during = len(load.statuses) - before
            print(f"\nadmin add: {add_s:.2f}s, {len(load.statuses)} requests ({during} after the call began)")
            assert not load.failures, load.failures[:5]
            assert during > 0 and set(load.statuses) == {200}

            # ------------------------------------------- chosen where its prior says it is best
            deployed = AppArgs.model_validate(launch.our_apps(app.config)[0]["args"])
            base = resolve_arm_table(deployed)
            prior4, _ = extend_with_profiles(base.offline_prior, base.embeddings, [NEW["profile"]])
            enc = get_encoder("hash", cache_dir=False)
            texts = [f"admin probe {i}: {QUERIES[i % len(QUERIES)]}" for i in range(200)]
            X = np.stack([quantise(x) for x in enc.encode(texts)]).astype(np.float64)
            best_by_prior = OfflinePrior.from_dict(prior4).estimate(X).argmax(axis=1) == 3
            assert 10 <= best_by_prior.sum() <= 190, best_by_prior.sum()
            chosen = []
            for text in texts:
                r = client.post("/v1/route", json={"query": text, "mode": "single"})
                assert r.status_code == 200, r.text
                chosen.append(r.json()["model"] == "coder")
            chosen_arr = np.array(chosen)
            hit, false = chosen_arr[best_by_prior].mean(), chosen_arr[~best_by_prior].mean()
            print(f"added arm chosen for {hit:.0%} of the queries its prior favours, {false:.0%} of the rest")
            assert hit >= 0.9 and false <= 0.1
            # it answers chat through its own upstream
            chat = {"model": "router", "messages": [{"role": "user", "content": "write code"}]}
            r = client.post(
                "/v1/chat/completions", json={**chat, "router": {"mode": "single", "candidates": ["coder"]}}
            )
            assert r.status_code == 200 and r.json()["router"]["arms"] == ["coder"], r.text

            # ------------------------------------------------------------ retire, restore
            r = client.post(f"/v1/admin/arms/{path('coder')}/retire", headers=app.admin)
            assert r.status_code == 200 and r.json()["retired"] is True, r.text
            listed = {a["id"]: a for a in client.get("/v1/admin/arms", headers=app.admin).json()["arms"]}
            assert listed["coder"]["retired_by"] == "admin" and listed["coder"]["source"] == "admin"
            assert not any(client.post("/v1/route", json={"query": t}).json()["model"] == "coder" for t in texts[:40])
            r = client.post("/v1/route", json={"query": "q", "candidates": ["coder", OLD[0]]})
            assert r.status_code == 422 and "retired" in r.text, r.text
            r = client.post(f"/v1/admin/arms/{path('coder')}/restore", headers=app.admin)
            assert r.status_code == 200 and r.json()["retired"] is False, r.text
            assert client.post("/v1/route", json={"query": "q", "candidates": ["coder", OLD[0]]}).status_code == 200

            # -------------------------------------------------- ids with a slash, non-ASCII ids
            for odd in ("org/model-7b", "modèle-日本"):
                r = client.post("/v1/admin/arms", json={**NEW, "id": odd, "price_usd": 0.0}, headers=app.admin)
                assert r.status_code == 201, r.text
                r = client.post(f"/v1/admin/arms/{path(odd)}/retire", headers=app.admin)
                assert r.status_code == 200 and r.json()["arm"] == odd, r.text

            # ------------------------------------------------------------------ bad requests
            def code(r: httpx.Response) -> tuple[int, str]:
                return r.status_code, error_code(r.json())

            assert client.post("/v1/admin/arms", json=new_arm).status_code == 401  # a client key is not admin
            again = client.post("/v1/admin/arms", json=new_arm, headers=app.admin)  # a retry: its answer again
            assert again.status_code == 200 and again.json()["replayed"] is True
            other = {**new_arm, "price_usd": 9.0}
            assert code(client.post("/v1/admin/arms", json=other, headers=app.admin)) == (409, "arm_exists")
            bad_profile = {**NEW, "id": "chef", "price_usd": 0.0, "profile": {"cooking": 0.9}}
            assert code(client.post("/v1/admin/arms", json=bad_profile, headers=app.admin))[0] == 400
            too_high = {**NEW, "id": "chef", "price_usd": 0.0, "profile": {"code": 1.5}}
            assert client.post("/v1/admin/arms", json=too_high, headers=app.admin).status_code == 422
            no_prior = {"id": "chef", "price_usd": 0.0}
            assert code(client.post("/v1/admin/arms", json=no_prior, headers=app.admin))[0] == 400
            r = client.post(
                "/v1/admin/arms", content=b"\xff\xfe{", headers={**app.admin, "content-type": "application/json"}
            )
            assert 400 <= r.status_code < 500
            assert code(client.post("/v1/admin/arms/no-such-arm/retire", headers=app.admin)) == (404, "unknown_arm")
            for a in OLD[:2]:
                assert client.post(f"/v1/admin/arms/{a}/retire", headers=app.admin).status_code == 200
            client.post(f"/v1/admin/arms/{path('coder')}/retire", headers=app.admin)
            r = client.post(f"/v1/admin/arms/{OLD[2]}/retire", headers=app.admin)
            assert code(r) == (409, "arm_change_refused"), r.text  # the last arm in service stays
            for a in [*OLD[:2], "coder"]:
                assert client.post(f"/v1/admin/arms/{path(a)}/restore", headers=app.admin).status_code == 200

            # ---------------------------------------- the Posterior process dies: nothing lost
            listed = client.get("/v1/admin/arms", headers=app.admin).json()
            pid = client.get("/v1/admin/status", headers=app.admin).json()["posterior"]["pid"]
            os.kill(pid, signal.SIGKILL)

            def new_posterior() -> bool:
                st = client.get("/v1/admin/status", headers=app.admin)
                return st.status_code == 200 and st.json()["posterior"]["pid"] != pid

            wait_for(new_posterior, timeout_s=180, what="a new Posterior process")
            after = client.get("/v1/admin/arms", headers=app.admin).json()
            assert after["fingerprint"] == listed["fingerprint"] and after["arms"] == listed["arms"]
            assert [a["id"] for a in after["arms"]] == [*OLD, "coder", "org/model-7b", "modèle-日本"]
            wait_for(
                lambda: client.get("/v1/admin/arms", headers=app.admin).json()["serving"] == after["fingerprint"],
                timeout_s=60,
                what="the Ingress serving the table after the restart",
            )
            r = client.post("/v1/route", json={"query": "def f(x): return x", "candidates": ["coder", OLD[0]]})
            assert r.status_code == 200, r.text
    finally:
        delete_router()
