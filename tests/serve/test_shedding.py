"""Load shedding on a real local Ray Serve: past the ingress's admission limit
(``limits.max_inflight_routes``) and when the embedder's queue is full (Serve's
``max_queued_requests`` -> ``BackPressureError``, never retried) a route is turned away with a 503
``overloaded`` and ``Retry-After`` at once, and every other request is served.

The embedder is made slow and narrow on purpose: one request at a time
(``max_ongoing_requests: 1``), one queued, and each batch waits 0.5 s for company
(``batch_wait_timeout_s``), so a burst of concurrent routes must overflow the queue. The speed of
shedding is a figure, not an assertion: ``bench/overload.py`` measures it at 4x capacity.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.serve.conftest import RouterApp, delete_router, deploy_router, synthetic_arm_args, wait_for
from tests.serve.helpers import error_code, error_message

pytestmark = pytest.mark.integration

BURST = 24


ADMIT = 4  # limits.max_inflight_routes: more than the embedder's 1 + 1, so both sheds happen


@pytest.fixture(scope="module")
def app(serve_cluster, tmp_path_factory) -> RouterApp:
    args = synthetic_arm_args(tmp_path_factory.mktemp("shed-arms"))
    args["limits"] = {**(args.get("limits") or {}), "max_inflight_routes": ADMIT}
    app = deploy_router(
        serve_cluster,
        tmp_path_factory.mktemp("shed-state"),
        args,
        deployments={
            "Embedder": {
                "max_ongoing_requests": 1,
                "max_queued_requests": 1,
                "user_config": {"max_batch_size": 32, "batch_wait_timeout_s": 0.5},
            }
        },
    )
    yield app
    delete_router()


async def _burst(url: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=n)) as c:
        return list(await asyncio.gather(*(c.post("/v1/route", json={"query": f"burst {i}"}) for i in range(n))))


def test_a_saturated_embedder_sheds_routes_with_503_and_retry_after(app):
    seen: list[httpx.Response] = []

    def shed() -> bool:
        seen.extend(asyncio.run(_burst(app.url, BURST)))
        return any(r.status_code == 503 for r in seen)

    def both() -> bool:  # the ingress's admission limit and the embedder's full queue
        shed()
        messages = [error_message(r.json()) for r in seen if r.status_code == 503]
        return any("max_inflight_routes" in m for m in messages) and any(
            "max_inflight_routes" not in m for m in messages
        )

    wait_for(both, timeout_s=120, interval_s=0.0, what="503s from both sheds in bursts of concurrent routes")
    statuses = {r.status_code for r in seen}
    assert statuses <= {200, 503}, sorted(statuses)
    assert 200 in statuses  # the queue's requests were served, not dropped
    for r in seen:
        if r.status_code == 503:
            body = r.json()
            assert error_code(body) == "overloaded" and error_message(body), body
            assert body["error"]["type"] == "server_error"
            assert r.headers["retry-after"] == "1"
            assert "BackPressure" not in error_message(body)  # no internals
    # once the burst is over, routes and the health check answer as before
    assert httpx.post(f"{app.url}/v1/route", json={"query": "after the burst"}, timeout=60).status_code == 200
    assert httpx.get(f"{app.url}/healthz", timeout=60).json()["status"] == "ok"
