"""Ray / Serve fixtures for the integration tests.

One capped local Ray cluster (2 CPUs, small object store, no dashboard, metrics exported on a free
port) and one Serve instance for this test package (shut down when the package's last test is
done, so later test modules find no Ray in the process); each test module deploys its own application from a
real ``serve_configs/*.yaml`` (with a temporary state directory) and deletes it at the end. A small
OpenAI-compatible HTTP server stands in for the arms' upstreams.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ray_router.serve.launch import RAY_ENV_DEFAULTS  # no Ray import

# Before anything imports Ray: loopback only, no token auth, no usage stats (RAY_NOTES.md).
for _k, _v in RAY_ENV_DEFAULTS.items():
    os.environ.setdefault(_k, _v)

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-token-0123456789abcdef"
HMAC_KEY = "test-hmac-key-0123456789abcdef"
UPSTREAM_KEY = "upstream-secret-key"
SECRET_ENV = {"RAY_ROUTER_TOKEN": TOKEN, "RAY_ROUTER_HMAC_KEY": HMAC_KEY, "RR_TEST_UPSTREAM_KEY": UPSTREAM_KEY}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------- fake upstream
class _Upstream(BaseHTTPRequestHandler):
    requests: list[dict] = []

    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        type(self).requests.append({"path": self.path, "auth": self.headers.get("authorization"), "body": body})
        model = body.get("model", "")
        if self.path != "/v1/chat/completions":
            return self._json(404, {"error": {"message": "no such path"}})
        if model == "broken-model":
            return self._json(500, {"error": {"message": "upstream exploded"}})
        text = f"answer from {model}"
        if body.get("stream"):
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            for i, piece in enumerate(text.split(" ")):
                chunk = {"id": "c1", "object": "chat.completion.chunk", "model": model,
                         "choices": [{"index": 0, "delta": {"content": (" " if i else "") + piece}}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            return
        self._json(200, {
            "id": "c1", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
        })

    def _json(self, status: int, obj: dict):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="package")
def fake_upstream():
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", _Upstream.requests
    server.shutdown()


# --------------------------------------------------------------------------- cluster
@dataclass
class Cluster:
    http_port: int
    metrics_port: int


@pytest.fixture(scope="package")
def serve_cluster():
    from tests.data_fixtures import shared_data_dir

    if shared_data_dir() is None:
        pytest.skip("the RouterBench data (RAY_ROUTER_DATA_DIR) is needed for the Serve tests")
    import warnings

    import ray

    from ray_router.serve import launch

    if ray.is_initialized():  # left over by an earlier test module: ours needs its own capped cluster
        warnings.warn("tests/serve: a Ray instance was left running in this process; shutting it down")
        ray.shutdown()

    with pytest.MonkeyPatch.context() as env:  # restores the environment afterwards
        for k, v in SECRET_ENV.items():
            env.setenv(k, v)  # Ray workers inherit the driver's environment
        cluster = Cluster(free_port(), free_port())
        launch.init_ray(num_cpus=2, object_store_mb=256, metrics_export_port=cluster.metrics_port)
        cfg = launch.with_overrides(launch.load_serve_config(REPO / "serve_configs" / "local.yaml"),
                                    port=cluster.http_port)
        launch.start_serve(cfg)
        try:
            yield cluster
        finally:
            launch.shutdown()


@dataclass
class RouterApp:
    url: str
    state_dir: Path
    cluster: Cluster
    config: dict[str, Any]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}


def deploy_router(cluster: Cluster, state_dir: Path, config: str = "local.yaml", args: dict | None = None,
                  deployments: dict | None = None) -> RouterApp:
    from ray_router.serve import launch
    from tests.data_fixtures import shared_data_dir

    base = launch.load_serve_config(REPO / "serve_configs" / config)
    data = {"arm_embeddings": {"from_dataset": {"data_dir": str(shared_data_dir())}}}
    merged = launch._merge(launch._merge(data, {"state": {"dir": str(state_dir)}}), args or {})
    cfg = launch.with_overrides(base, port=cluster.http_port, args=merged, deployments=deployments)
    url = launch.deploy(cfg, timeout_s=600)
    return RouterApp(url=url, state_dir=state_dir, cluster=cluster, config=cfg)


def delete_router() -> None:
    from ray import serve

    try:
        serve.delete("ray-router", _blocking=True)
    except Exception:  # noqa: BLE001 - best effort between modules
        pass


def wait_for(predicate, timeout_s: float = 60.0, interval_s: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")
