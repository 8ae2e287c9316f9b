"""Adding an arm to a live router (issue 15): real Serve, real HTTP, a load run across the change.

Three arms serve routes and chat while two client threads keep sending requests. The Serve config
is redeployed with a fourth arm appended, which the offline data (the arm table file) does not
cover: it enters with its operator's per-category profile, best by far at ``code``. No request of
the load run fails; the new arm is offered as soon as the new posterior publishes its samples; and
the router chooses it, before any feedback, for the queries its prior says it is best at.
"""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest

from ray_router.embeddings import get_encoder
from ray_router.policies.offline_prior import OfflinePrior
from ray_router.serve import launch
from ray_router.serve.arms import resolve_arm_table
from ray_router.serve.config import AppArgs
from ray_router.serve.tokens import quantise
from tests.openai_stub import StubModel, StubServer
from tests.serve.conftest import RouterApp, delete_router, deploy_router, wait_for
from tests.serve.helpers import QUERIES, write_synthetic_arm_table

pytestmark = pytest.mark.integration

OLD = ["a0", "a1", "a2"]
NEW = {"id": "coder", "profile": {"code": 0.99, "default": 0.05}}


@pytest.fixture(scope="module")
def stub():
    with StubServer({a: StubModel(a, quality=0.6) for a in [*OLD, "coder"]}, seed=4) as up:
        yield up


def arm(a: str, stub: StubServer) -> dict:
    return {"id": a, "price_usd": 0.001, "upstream": {"base_url": stub.base_url, "model": a}}


def deploy(cluster, state_dir, table, arms: list[dict], ingress_replicas: int = 1) -> RouterApp:
    return deploy_router(
        cluster,
        state_dir,
        {"arm_embeddings": {"file": str(table)}, "encoder": {"name": "hash", "device": "auto"}},
        args={
            "arms": arms,
            "auth": {
                "clients": [{"name": "default", "key_env": "RAY_ROUTER_CLIENT_KEY", "rate_per_s": 1e4, "burst": 10**4}]
            },
        },
        deployments={"Ingress": {"num_replicas": ingress_replicas}},
    )


class Load:
    """Client threads sending routes and chat requests until stopped; every answer's status kept."""

    def __init__(self, url: str, key: str, n_threads: int = 2):
        self.url, self.key, self.stop = url, key, threading.Event()
        self.statuses: list[int] = []
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n_threads)]

    def _run(self, k: int) -> None:
        with httpx.Client(base_url=self.url, timeout=120, headers={"Authorization": f"Bearer {self.key}"}) as c:
            i = 0
            while not self.stop.is_set():
                text = f"{QUERIES[i % len(QUERIES)]} (load {k}.{i})"
                try:
                    if i % 3 == 2:
                        body = {"model": "router", "messages": [{"role": "user", "content": text}]}
                        r = c.post("/v1/chat/completions", json={**body, "router": {"mode": "single"}})
                    else:
                        r = c.post("/v1/route", json={"query": text, "mode": ("duel", "single")[i % 2]})
                    self.statuses.append(r.status_code)
                    if r.status_code != 200:
                        self.failures.append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as e:
                    self.failures.append(repr(e))
                i += 1

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def test_an_arm_added_during_a_load_run(serve_cluster, stub, tmp_path_factory):
    table = write_synthetic_arm_table(tmp_path_factory.mktemp("arms"), OLD, "hash", seed=0)
    state_dir = tmp_path_factory.mktemp("state")
    # two Ingress replicas: Serve replaces them one at a time, so one always serves (with one, the
    # redeploy leaves a moment with no running Ingress, when the proxy answers 404: RAY_NOTES)
    app = deploy(serve_cluster, state_dir, table, [arm(a, stub) for a in OLD], ingress_replicas=2)
    try:
        key = (app.state_dir / "secrets" / "client_default").read_text().strip()
        with httpx.Client(base_url=app.url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as client:
            with Load(app.url, key) as load:
                time.sleep(3)
                old_pid = client.get("/v1/admin/status", headers=app.admin).json()["posterior"]["pid"]
                before = len(load.statuses)
                t0 = time.monotonic()
                app = deploy(
                    serve_cluster,
                    state_dir,
                    table,
                    [*(arm(a, stub) for a in OLD), {**arm("coder", stub), **NEW}],
                    ingress_replicas=2,
                )
                deploy_s = time.monotonic() - t0

                def new_service() -> bool:  # the new posterior writes, and every answer is the new ingress's
                    st = client.get("/v1/admin/status", headers=app.admin)
                    if st.status_code != 200 or st.json()["posterior"]["pid"] == old_pid:
                        return False
                    return all(len(client.get("/v1/arms").json()["arms"]) == 4 for _ in range(10))

                wait_for(new_service, timeout_s=300, what="the new posterior and ingress")
                version = client.get("/v1/stats").json()["posterior"]["version"]
                time.sleep(3)  # the load goes on after the change
            during = len(load.statuses) - before
            print(
                f"\nadd an arm: redeploy {deploy_s:.1f}s, {len(load.statuses)} requests ({during} after the change began)"
            )
            assert not load.failures, load.failures[:5]
            assert during > 0 and set(load.statuses) == {200}

            # the new arm, offered within one refresh, is chosen where its prior says it is best
            deployed = AppArgs.model_validate(launch.our_apps(app.config)[0]["args"])
            prior = OfflinePrior.from_dict(resolve_arm_table(deployed).offline_prior)
            enc = get_encoder("hash", cache_dir=False)
            texts = [f"probe {i}: {QUERIES[i % len(QUERIES)]}" for i in range(300)]
            est = prior.estimate(np.stack([quantise(x) for x in enc.encode(texts)]).astype(np.float64))
            best_by_prior = est.argmax(axis=1) == 3
            assert 10 <= best_by_prior.sum() <= 290, best_by_prior.sum()  # both kinds of query are there
            chosen = []
            for text in texts:
                r = client.post("/v1/route", json={"query": text, "mode": "single"})
                assert r.status_code == 200, r.text
                assert r.json()["posterior_version"] >= version
                chosen.append(r.json()["model"] == "coder")
            chosen = np.array(chosen)
            hit = chosen[best_by_prior].mean()
            false = chosen[~best_by_prior].mean()
            print(
                f"new arm chosen for {hit:.0%} of the {best_by_prior.sum()} queries its prior favours, {false:.0%} of the rest"
            )
            assert hit >= 0.9 and false <= 0.1
    finally:
        delete_router()
