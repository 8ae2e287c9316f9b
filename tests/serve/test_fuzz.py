"""Property: no request, however generated from the service's own OpenAPI schema, gets a 5xx; every
error is OpenAI's JSON ``{"error": {"message", "type", "code", "param"}}``. Real Ray Serve, real HTTP (``serve_configs/local.yaml``
with the synthetic arm table and the hash encoder, a fake upstream for three chat arms).

schemathesis generates the cases (positive: bodies that fit the schema and reach the decision,
signing, posterior and upstream code; negative: every way of breaking it); the reasons for it over
plain Hypothesis are in ``bench/fuzz.py``, which runs the same property for 20,000 cases. Here the
budget is small (``CASES``) to keep ``make test`` short; a failure is shrunk to a minimal request
by Hypothesis and shown.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from tests.serve.conftest import REPO, RouterApp, config_args, delete_router, deploy_router, synthetic_arm_args

pytestmark = pytest.mark.integration

CASES = 500


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_fuzz", REPO / "bench" / "fuzz.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def app(serve_cluster, fake_upstream, tmp_path_factory) -> RouterApp:
    base_url, _ = fake_upstream
    ups = {"gpt-4-1106-preview": "fake-gpt-4", "claude-v2": "fake-claude", "mistralai/mistral-7b-chat": "broken-model"}
    arms = [
        {**a, **({"upstream": {"base_url": base_url, "model": ups[a["id"]]}} if a["id"] in ups else {})}
        for a in config_args()["arms"]
    ]
    clients = [{"name": "default", "key_env": "RAY_ROUTER_CLIENT_KEY", "rate_per_s": 1e6, "burst": 10**6}]
    app = deploy_router(
        serve_cluster,
        tmp_path_factory.mktemp("fuzz-state"),
        synthetic_arm_args(tmp_path_factory.mktemp("fuzz-arms")),
        args={"arms": arms, "auth": {"clients": clients}, "limits": {"max_body_bytes": 65536}},
    )
    yield app
    delete_router()


def test_the_schema_describes_every_request_body(app):
    doc = _bench().load_schema(app.url).raw_schema
    bodies = {
        path: op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        for path, ops in doc["paths"].items()
        for op in ops.values()
        if "requestBody" in op
    }
    assert bodies == {
        "/v1/route": "#/components/schemas/RouteRequest",
        "/v1/feedback": "#/components/schemas/FeedbackRequest",
        "/v1/chat/completions": "#/components/schemas/ChatRequest",
        "/v1/admin/refresh": "#/components/schemas/AdminRefreshRequest",
        "/v1/admin/arms": "#/components/schemas/AddArmRequest",
    }


def test_no_generated_request_gets_a_5xx(app):
    from hypothesis import HealthCheck, Phase, given, seed, settings

    bench = _bench()
    secrets = bench.read_secrets(app.state_dir / "secrets")
    assert set(secrets) == {"token", "admin_token", "client_default"}
    statuses: dict[int, int] = {}

    @seed(12)
    @settings(
        max_examples=CASES,
        deadline=None,
        database=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=bench.case_strategy(bench.load_schema(app.url)))
    def no_5xx(case: Any) -> None:
        r = case.call(base_url=app.url, headers=bench.headers_for(case, secrets), timeout=60)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        bad = bench.problem(r.status_code, {k: ",".join(v) for k, v in r.headers.items()}, r.content)
        assert bad is None, f"{bad}  <- {bench.describe(case)}"

    no_5xx()
    # the property must have been exercised on both sides of validation, not only on refusals
    assert statuses.get(200, 0) > 0 and sum(n for s, n in statuses.items() if 400 <= s < 500) > 0, statuses
