"""Property-based fuzzing of the HTTP API from its own OpenAPI schema: no input may yield a 5xx.

    python bench/fuzz.py                        # deploys serve_configs/local.yaml (synthetic arms, hash
                                                # encoder, a fake upstream for three chat arms)
    python bench/fuzz.py --cases 20000          # the issue's long run (the default)
    python bench/fuzz.py --url http://127.0.0.1:8000 --secrets-dir <state dir>/secrets

**Why schemathesis.** It reads the OpenAPI document the service publishes (``/openapi.json``,
which carries every request body's JSON schema, ``schemas.openapi_with_bodies``) and generates,
with Hypothesis underneath, both *positive* cases (bodies that fit the schema, so the requests get
past validation into the decision, signing, posterior and upstream code) and *negative* ones
(every way of breaking the schema: wrong types, missing and extra fields, out-of-range numbers,
odd strings). Plain Hypothesis (with hypothesis-jsonschema) would need both generators written and
kept in sync with the models by hand; schemathesis keeps the fuzzer tied to the published schema,
so a new endpoint or field is fuzzed without touching the fuzzer. The generated request goes over
real HTTP to the real service.

Each case is sent with the credential its endpoint needs (feedback token, client key, admin token;
``/v1/admin/refresh`` gets none: a valid refresh pins the posterior's CPU and proves nothing about
input handling, so its cases stop at the 401), and every answer is checked by
:func:`problem`: a status below 500 and, for an error, OpenAI's JSON error shape
``{"error": {"message", "type", "code", "param"}}``. The
run prints the count of each status and every problem it found (at most 20 shown).

``tests/serve/test_fuzz.py`` runs the same property with a small budget in ``make test``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# which credential each operation gets (the others' calls stop at the 401 and are fuzzed as such)
CREDENTIAL = {
    ("POST", "/v1/feedback"): "token",
    ("POST", "/v1/chat/completions"): "client_default",
    ("POST", "/v1/route"): "client_default",
    ("GET", "/v1/arms"): "client_default",
    ("GET", "/v1/stats"): "client_default",
    ("POST", "/v1/admin/snapshot"): "admin_token",
    ("GET", "/v1/admin/status"): "admin_token",
}


def load_schema(url: str) -> Any:
    import httpx
    import schemathesis

    doc = httpx.get(f"{url}/openapi.json", timeout=60).json()
    return schemathesis.openapi.from_dict(doc)


def case_strategy(schema: Any) -> Any:
    """Positive and negative cases of every operation of ``schema``."""
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    return st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))


SECRET_ENVS = {
    "token": "RAY_ROUTER_TOKEN",
    "admin_token": "RAY_ROUTER_ADMIN_TOKEN",
    "client_default": "RAY_ROUTER_CLIENT_KEY",
}


def read_secrets(secrets_dir: Path | None) -> dict[str, str]:
    """The service's credentials: each from its env var when set (as the service reads them), else
    its generated file in ``secrets_dir`` (``token``, ``admin_token``, ``client_default``)."""
    out = {}
    for name, env in SECRET_ENVS.items():
        if os.environ.get(env):
            out[name] = os.environ[env]
        elif secrets_dir is not None and (Path(secrets_dir) / name).is_file():
            out[name] = (Path(secrets_dir) / name).read_text().strip()
    return out


def headers_for(case: Any, secrets: dict[str, str]) -> dict[str, str]:
    name = CREDENTIAL.get((case.method.upper(), case.path))
    return {"Authorization": f"Bearer {secrets[name]}"} if name and name in secrets else {}


def problem(status: int, headers: dict[str, Any], content: bytes) -> str | None:
    """What is wrong with an answer, or None: no 5xx (a 503 only as ``overloaded``/``unavailable``
    with ``Retry-After``), and every error in OpenAI's JSON shape ``{"error": {"message", "type",
    "code", "param"}}``."""
    if status < 400:
        return None
    try:
        body = json.loads(content)
    except ValueError:
        return f"{status} with a body that is not JSON: {content[:200]!r}"
    err = body.get("error") if isinstance(body, dict) else None
    if not (
        isinstance(err, dict)
        and all(isinstance(err.get(k), str) for k in ("message", "type", "code"))
        and isinstance(err.get("param", 0), (str, type(None)))
    ):
        return f"{status} without error.message/type/code/param: {content[:200]!r}"
    lower = {k.lower(): v for k, v in headers.items()}
    if status == 503 and err["code"] in ("overloaded", "unavailable") and "retry-after" in lower:
        return None
    if status >= 500 and status != 502:  # 502: an upstream failed (the fake upstream's broken arm)
        return f"{status} {err['code']}: {err['message'][:200]}"
    return None


def describe(case: Any) -> str:
    body = getattr(case, "body", None)
    text = json.dumps(body, default=repr)[:300] if body is not None else ""
    return f"{case.method} {case.path} {text}"


def run(url: str, secrets: dict[str, str], cases: int, seed: int = 0) -> dict[str, Any]:
    """``cases`` generated requests against ``url``; the status counts and the problems found."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    schema = load_schema(url)
    statuses: collections.Counter[int] = collections.Counter()
    problems: list[str] = []
    t0 = time.perf_counter()

    @hseed(seed)
    @settings(
        max_examples=cases,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=case_strategy(schema))
    def one(case: Any) -> None:
        r = case.call(base_url=url, headers=headers_for(case, secrets), timeout=60)
        statuses[r.status_code] += 1
        bad = problem(r.status_code, {k: ",".join(v) for k, v in r.headers.items()}, r.content)
        if bad:
            problems.append(f"{bad}  <- {describe(case)}")

    one()
    return {
        "cases": sum(statuses.values()),
        "seconds": time.perf_counter() - t0,
        "statuses": dict(sorted(statuses.items())),
        "n_5xx": sum(n for s, n in statuses.items() if s >= 500 and s != 502),
        "problems": problems,
    }


def _deploy(state_dir: Path, arms_dir: Path, upstream_url: str) -> str:
    """``serve_configs/local.yaml`` on a local Ray, with the synthetic arm table and the hash encoder
    (no data or model needed), three arms answering chat through ``upstream_url`` (one of them
    broken: its upstream answers 500) and a generous client rate limit (the fuzzer is one client)."""
    from ray_router.serve import launch
    from tests.serve.conftest import config_args, free_port, synthetic_arm_args

    ups = {"gpt-4-1106-preview": "fake-gpt-4", "claude-v2": "fake-claude", "mistralai/mistral-7b-chat": "broken-model"}
    arms = [
        {**a, **({"upstream": {"base_url": upstream_url, "model": ups[a["id"]]}} if a["id"] in ups else {})}
        for a in config_args()["arms"]
    ]
    cfg = launch.load_serve_config(REPO / "serve_configs" / "local.yaml")
    for app in launch.our_apps(cfg):
        app["args"] = {**app["args"], **synthetic_arm_args(arms_dir), "arms": arms}
    clients = [{"name": "default", "key_env": "RAY_ROUTER_CLIENT_KEY", "rate_per_s": 1e6, "burst": 10**6}]
    args = {"state": {"dir": str(state_dir)}, "auth": {"clients": clients}}
    cfg = launch.with_overrides(cfg, host="127.0.0.1", port=free_port(), args=args)
    launch.init_ray(num_cpus=2)
    return launch.deploy(cfg, timeout_s=600)


def _fake_upstream() -> tuple[str, Any]:
    """The tests' OpenAI-compatible stand-in (``tests/serve/conftest.py``), in a thread."""
    import threading
    from http.server import ThreadingHTTPServer

    from tests.serve.conftest import _Upstream, free_port

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/v1", server


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running service (else one is deployed here)")
    p.add_argument("--secrets-dir", default=None, help="with --url: its <state dir>/secrets")
    p.add_argument("--cases", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the report here")
    args = p.parse_args(argv)

    from ray_router.serve import launch

    tmp = None
    if args.url:
        url, secrets_dir = args.url, Path(args.secrets_dir) if args.secrets_dir else None
    else:
        tmp = tempfile.TemporaryDirectory(prefix="rr-fuzz-")
        state = Path(tmp.name) / "state"
        upstream_url, _server = _fake_upstream()
        url = _deploy(state, Path(tmp.name), upstream_url)
        secrets_dir = state / "secrets"
    try:
        report = run(url, read_secrets(secrets_dir), args.cases, args.seed)
    finally:
        if tmp is not None:
            launch.shutdown()
            tmp.cleanup()
    print(f"fuzz: {report['cases']} cases in {report['seconds']:.0f} s against {url}")
    print("status counts: " + ", ".join(f"{s}: {n}" for s, n in report["statuses"].items()))
    print(f"5xx (other than 502 from the upstream): {report['n_5xx']}; problems: {len(report['problems'])}")
    for line in report["problems"][:20]:
        print(f"  {line}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    sys.exit(1 if main()["problems"] else 0)
