"""Every PromQL expression of the dashboard against a real Prometheus scraping a real Ray cluster.

One module-scoped stack: a capped local Ray node (2 CPUs, small object store, no dashboard, metrics
exported on a free port), the real Serve app from ``serve_configs/local.yaml`` (temporary state
directory; with the RouterBench data, the real encoder and arm table, else a synthetic arm table
and the hash encoder: the metrics are the same), and Debian's ``prometheus`` scraping the node
every second. A little real HTTP traffic (duels with feedback of each outcome, single routes, two
rejected requests) runs in two waves, and the second wave waits until Prometheus holds a sample of
every app series taken after the first, so that rates and quantiles have two samples to work on.
Chat completions go to three arms answered by a loopback OpenAI stub (``tests/openai_stub.py``),
with a 429 that is retried and a 500 run that falls back to another arm in each wave, so that the
per-arm panels (errors, retries, fallbacks, latency, time to first token, tokens, spend, breakers)
have data too.
Then each expression, with Grafana's variables substituted, goes to ``/api/v1/query``: none may
error, and each one on the app's own ``ray_router_*`` series must return a finite value.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import httpx
import numpy as np
import pytest

from ray_router.grafana.dashboard import SERVE_HEALTHY, build_dashboard, queries, substitute
from tests.grafana.promstack import (
    KUBERAY_POD_META,
    free_port,
    k8s_config_with_static_targets,
    prometheus_binary,
    start_prometheus,
)
from tests.openai_stub import StubModel, StubServer
from tests.serve.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
TOKEN = "grafana-test-token-0123456789abcdef"
ENV = {"RAY_ROUTER_TOKEN": TOKEN, "RAY_ROUTER_HMAC_KEY": "grafana-test-hmac-0123456789abcdef"}
PAIR = ["claude-v2", "meta/llama-2-70b-chat"]
CHAT = {"claude-v2": "stub-claude", "meta/llama-2-70b-chat": "stub-llama", "gpt-4-1106-preview": "stub-gpt"}
PRICE = {"prompt_usd_per_1m": 3.0, "completion_usd_per_1m": 15.0}
ATTEMPTS = 2


def _wait(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    return wait_for(predicate, timeout_s=timeout_s, interval_s=interval_s, what=what)


def _chat(client: httpx.Client, query: str, **body) -> httpx.Response:
    body = {"model": "router", "messages": [{"role": "user", "content": query}], **body}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r


def _chat_traffic(client: httpx.Client, stub: StubServer, wave: int) -> None:
    """Chat completions with each per-arm event: answers, a stream, a retried 429, a fallback."""
    for i in range(3):
        _chat(client, f"wave {wave}: tell me about rivers {i}")
    for arm in CHAT:
        _chat(client, f"wave {wave}: hello {arm}", router={"candidates": [arm]})
    body = {"model": "router", "stream": True, "messages": [{"role": "user", "content": f"wave {wave}: a joke"}]}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert "data: [DONE]" in list(r.iter_lines())
    stub.models[CHAT["claude-v2"]].fail_next(1, 429, retry_after=0.1)
    _chat(client, f"wave {wave}: retried", router={"candidates": ["claude-v2"]})
    query, pair = f"wave {wave}: falls back", ["claude-v2", "gpt-4-1106-preview"]
    picked = _chat(client, query, router={"candidates": pair}).headers["x-router-model"]
    stub.models[CHAT[picked]].fail_next(ATTEMPTS, 500)
    r = _chat(client, query, router={"candidates": pair})
    assert r.headers["x-router-fallback"] == picked, dict(r.headers)


def _traffic(client: httpx.Client, stub: StubServer, wave: int, n_duels: int = 9) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    outcomes = ("first", "second", "tie")
    for i in range(n_duels):
        r = client.post(
            "/v1/route",
            json={"query": f"wave {wave}: explain binary search, variant {i}", "candidates": PAIR if i % 2 else None},
        )
        assert r.status_code == 200, r.text
        fb = {"decision_id": r.json()["decision_id"], "outcome": outcomes[i % 3]}
        r = client.post("/v1/feedback", json=fb, headers=auth)
        assert r.status_code == 200, r.text
    for i in range(3):
        r = client.post("/v1/route", json={"query": f"wave {wave}: a haiku about the sea {i}", "mode": "single"})
        assert r.status_code == 200, r.text
    _chat_traffic(client, stub, wave)
    # two rejected requests feed ray_router_http_errors_total
    assert client.post("/v1/route", json={"query": "x", "unknown_field": 1}).status_code in (400, 422)
    assert client.post("/v1/feedback", json={"decision_id": "x", "outcome": "first"}).status_code == 401


def _has(prom, expr: str) -> bool:
    res = prom.query(expr)
    return res.get("status") == "success" and bool(res["data"]["result"])


# The app's series that both waves move (counters, histogram counts, the log size).
GROWING = (
    "ray_router_routes_total",
    "ray_router_feedback_total",
    "ray_router_route_latency_seconds_count",
    "ray_router_http_errors_total",
    "ray_router_posterior_refresh_seconds_count",
    "ray_router_feedback_apply_lag_seconds_count",
    "ray_router_feedback_log_bytes",
    "ray_router_arm_requests_total",
    "ray_router_arm_latency_seconds_count",
    "ray_router_arm_ttft_seconds_count",
    "ray_router_arm_fallbacks_total",
    "ray_router_arm_retries_total",
    "ray_router_arm_cost_usd_total",
)


def _sums(prom) -> dict[str, float]:
    """Each growing series summed over its labels, as Prometheus holds it now (NaN when absent)."""
    out = {}
    for series in GROWING:
        res = prom.query(f"sum({series})")
        result = res.get("data", {}).get("result") if res.get("status") == "success" else None
        out[series] = float(result[0]["value"][1]) if result else math.nan
    return out


def _chat_args(app_args: dict, base_url: str) -> dict:
    """Upstreams (the stub, priced) for the chat arms; chat without a client key; quick retries."""
    arms = [
        {
            **a,
            **({"upstream": {"base_url": base_url, "model": CHAT[a["id"]], "price": PRICE}} if a["id"] in CHAT else {}),
        }
        for a in app_args["arms"]
    ]
    resilience = {"attempts": ATTEMPTS, "backoff_base_s": 0.05, "backoff_max_s": 0.1, "attempt_timeout_s": 10}
    return {"arms": arms, "auth": {"chat_requires_key": False}, "resilience": resilience}


def _arm_table_args(tmp: Path, app_args: dict) -> dict:
    """The app arguments for the arm table: the real RouterBench offline split when the data is
    here, else a synthetic table (one random unit vector per arm) read by the hash encoder."""
    from tests.data_fixtures import shared_data_dir

    data_dir = shared_data_dir()
    if data_dir is not None:
        return {"arm_embeddings": {"from_dataset": {"data_dir": str(data_dir)}}}
    from ray_router.embeddings import HashEncoder

    arm_ids = [arm["id"] for arm in app_args["arms"]]
    dim = HashEncoder().dim
    vectors = np.random.default_rng(0).standard_normal((len(arm_ids), dim))
    path = tmp / "arm_embeddings.npz"
    np.savez(path, embeddings=vectors / np.linalg.norm(vectors, axis=1, keepdims=True), arm_ids=np.array(arm_ids))
    return {"arm_embeddings": {"file": str(path), "from_dataset": None}, "encoder": {"name": "hash"}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if prometheus_binary() is None:
        pytest.fail("prometheus is not installed; `make test` installs it (target test-tools)")
    import ray

    from ray_router.serve import launch

    if ray.is_initialized():
        pytest.skip("Ray is already running in this test process; run tests/grafana on its own")
    tmp = tmp_path_factory.mktemp("promql")
    env = pytest.MonkeyPatch()  # restores the environment afterwards
    for k, v in ENV.items():
        env.setenv(k, v)  # Ray workers inherit the driver's environment
    http_port, metrics_port = free_port(), free_port()
    prom = None
    stub = StubServer({m: StubModel(m, 0.8, ttft_s=0.01) for m in CHAT.values()}).start()
    launch.init_ray(num_cpus=2, object_store_mb=256, metrics_export_port=metrics_port)
    try:
        base = launch.load_serve_config(REPO / "serve_configs" / "local.yaml")
        (app,) = launch.our_apps(base)
        args = {**_arm_table_args(tmp, app["args"]), **_chat_args(app["args"], stub.base_url)}
        cfg = launch.with_overrides(base, port=http_port, args={**args, "state": {"dir": str(tmp / "state")}})
        # the scrape config shipped in k8s/, its pod discovery swapped for this node (promstack.py)
        k8s_cfg = (REPO / "k8s" / "base" / "prometheus" / "prometheus.yml").read_text()
        prom = start_prometheus(
            tmp / "prometheus",
            config=k8s_config_with_static_targets(k8s_cfg, [f"127.0.0.1:{metrics_port}"], interval_s=1),
        )
        url = launch.deploy(cfg, timeout_s=240)
        with httpx.Client(base_url=url, timeout=60) as client:
            _traffic(client, stub, wave=1)
            # wave 2 once Prometheus holds a first sample of every own series, so rates see an increase
            _wait(
                lambda: all(
                    _has(prom, s)
                    for s in (
                        "ray_router_routes_total",
                        "ray_router_feedback_total",
                        "ray_router_route_latency_seconds_bucket",
                        "ray_router_posterior_refresh_seconds_bucket",
                        "ray_router_feedback_apply_lag_seconds_bucket",
                        'ray_router_posterior_role{role="writer"} == 1',
                        "ray_router_feedback_log_bytes",
                        "ray_router_http_errors_total",
                        "ray_router_arm_requests_total",
                        "ray_router_arm_errors_total",
                        "ray_router_arm_latency_seconds_bucket",
                        "ray_router_arm_ttft_seconds_bucket",
                        "ray_router_arm_fallbacks_total",
                        "ray_router_arm_cost_usd_total",
                        "ray_router_arm_breaker_state",
                        SERVE_HEALTHY,
                    )
                ),
                90,
                "the app's series in Prometheus",
            )
            first = _sums(prom)
            _traffic(client, stub, wave=2)
            n_fb = client.get("/v1/stats").json()["posterior"]["n_updates"]
            _wait(
                lambda: client.get("/v1/stats").json()["posterior"]["refreshed_at_update"] >= n_fb,
                60,
                "a posterior refresh after the last feedback",
            )
            _wait(
                lambda: _has(prom, f"sum(ray_router_feedback_total) >= {n_fb}"), 30, "the last feedback in Prometheus"
            )
            # every growing series has a sample above its first one: each rate and increase has two points
            _wait(
                lambda: all(v > first[k] for k, v in _sums(prom).items()),
                60,
                f"a second sample of {list(GROWING)} in Prometheus, above {first}",
            )
        yield prom, metrics_port
    finally:
        if prom is not None:
            prom.stop()
        launch.shutdown()
        stub.stop()
        env.undo()


def _finite(result: list[dict]) -> int:
    n = 0
    for series in result:
        value = series.get("value") or [0, "NaN"]
        with contextlib.suppress(TypeError, ValueError):
            n += math.isfinite(float(value[1]))
    return n


def test_the_k8s_scrape_config_keeps_ray_metrics_ports_only(stack):
    prom, metrics_port = stack
    targets = prom.targets()
    active = [t for t in targets["activeTargets"] if t["scrapePool"] == "ray"]
    assert [t["labels"]["instance"] for t in active] == [f"127.0.0.1:{metrics_port}"]
    labels = active[0]["labels"]
    assert active[0]["health"] == "up", active[0]
    assert labels["job"] == "ray" and labels["namespace"] == KUBERAY_POD_META["__meta_kubernetes_namespace"]
    assert labels["ray_io_cluster"] == KUBERAY_POD_META["__meta_kubernetes_pod_label_ray_io_cluster"]
    assert labels["ray_io_node_type"] == "head" and labels["pod"] == KUBERAY_POD_META["__meta_kubernetes_pod_name"]
    dropped = {t["discoveredLabels"]["__address__"] for t in targets["droppedTargets"]}
    assert dropped == {"127.0.0.1:9", "127.0.0.1:7"}, dropped
    res = prom.query('count(ray_router_routes_total{job="ray", ray_io_cluster="ray-router-raycluster"})')
    assert res["status"] == "success" and res["data"]["result"], res


def test_every_dashboard_query_runs_and_the_apps_own_return_data(stack):
    prom, _ = stack
    rows, errors, empty_own = [], [], []
    for q in queries(build_dashboard()):
        # Grafana's $__rate_interval / $__range as for a 5-minute view: the whole test lies in the window
        expr = substitute(q.expr, interval="5m")
        res = prom.query(expr)
        if res.get("status") != "success":
            errors.append(f"{q.panel}/{q.ref_id}: {res.get('errorType')}: {res.get('error')}\n    {expr}")
            continue
        result = res["data"]["result"]
        n_series, n_finite = len(result), _finite(result)
        rows.append((q.panel, q.ref_id, q.own, n_series, n_finite))
        if q.own and n_finite == 0:
            empty_own.append(f"{q.panel}/{q.ref_id}: {n_series} series, none finite\n    {expr}")
    total = len(rows) + len(errors)
    with_data = sum(1 for r in rows if r[4] > 0)
    own = [r for r in rows if r[2]]
    print(
        f"\nPromQL check: {total} expressions in {len({r[0] for r in rows})} panels/variables; "
        f"{len(errors)} errors; {with_data} returned finite data "
        f"(own ray_router_* expressions: {sum(1 for r in own if r[4] > 0)}/{len(own)})"
    )
    for panel, ref, is_own, n, fin in rows:
        print(f"  {'own ' if is_own else 'ray '} {fin:>2}/{n:<2} finite/series  {panel} [{ref}]")
    assert not errors, "PromQL errors:\n" + "\n".join(errors)
    assert not empty_own, "own-metric queries without data:\n" + "\n".join(empty_own)
    assert own, "the dashboard has no query on the app's own metrics"


def test_serve_health_series_carry_the_application_label(stack):
    prom, _ = stack
    res = prom.query(f'sum by (application, deployment) ({SERVE_HEALTHY}{{application="ray-router"}})')
    assert res["status"] == "success", res
    deployments = {s["metric"].get("deployment") for s in res["data"]["result"]}
    assert {"Ingress", "Embedder", "Posterior"} <= deployments, deployments
    assert all(float(s["value"][1]) >= 1 for s in res["data"]["result"])
