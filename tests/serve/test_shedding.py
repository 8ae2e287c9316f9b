"""Load shedding on a real local Ray Serve: a saturated embedder turns routes away with a 503
``overloaded`` and ``Retry-After`` at once (Serve's ``max_queued_requests`` -> ``BackPressureError``,
never retried), and every other request is served.

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

pytestmark = pytest.mark.integration

BURST = 24


@pytest.fixture(scope="module")
def app(serve_cluster, tmp_path_factory) -> RouterApp:
    app = deploy_router(
        serve_cluster,
        tmp_path_factory.mktemp("shed-state"),
        synthetic_arm_args(tmp_path_factory.mktemp("shed-arms")),
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

    wait_for(shed, timeout_s=120, interval_s=0.0, what="a 503 from a burst of concurrent routes")
    statuses = {r.status_code for r in seen}
    assert statuses <= {200, 503}, sorted(statuses)
    assert 200 in statuses  # the queue's requests were served, not dropped
    for r in seen:
        if r.status_code == 503:
            body = r.json()
            assert body["error"] == "overloaded" and body["message"], body
            assert r.headers["retry-after"] == "1"
            assert "BackPressure" not in body["message"]  # no internals
    # once the burst is over, routes and the health check answer as before
    assert httpx.post(f"{app.url}/v1/route", json={"query": "after the burst"}, timeout=60).status_code == 200
    assert httpx.get(f"{app.url}/healthz", timeout=60).json()["status"] == "ok"
