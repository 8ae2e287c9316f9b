"""Ray / Serve fixtures for the integration tests.

One capped local Ray cluster (2 CPUs, small object store, no dashboard, metrics exported on a free
port) and one Serve instance for this test package (shut down when the package's last test is
done, so later test modules find no Ray in the process); each test module deploys its own application from a
real ``serve_configs/*.yaml`` (with a temporary state directory) and deletes it at the end. A small
OpenAI-compatible HTTP server stands in for the arms' upstreams.

Arm tables: :func:`synthetic_arm_args` (the config's arms with seeded random embeddings and a
per-category profile, saved as ``arm_embeddings.file``: needs no data) or :func:`real_arm_args`
(RouterBench's offline split, as the shipped configs do: needs the real rows).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from ray_router.serve.launch import RAY_ENV_DEFAULTS  # no Ray import
from ray_router.yamlio import deep_merge
from tests.serve.helpers import write_synthetic_arm_table

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
    requests: ClassVar[list[dict]] = []  # every request seen, shared by the handler instances

    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):
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
                chunk = {
                    "id": "c1",
                    "object": "chat.completion.chunk",
                    "model": model,
                    "choices": [{"index": 0, "delta": {"content": (" " if i else "") + piece}}],
                }
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            return
        self._json(
            200,
            {
                "id": "c1",
                "object": "chat.completion",
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
            },
        )

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
    import warnings

    import ray

    from ray_router.serve import launch

    if ray.is_initialized():  # left over by an earlier test module: ours needs its own capped cluster
        warnings.warn("tests/serve: a Ray instance was left running in this process; shutting it down", stacklevel=2)
        ray.shutdown()

    with pytest.MonkeyPatch.context() as env:  # restores the environment afterwards
        for k, v in SECRET_ENV.items():
            env.setenv(k, v)  # Ray workers inherit the driver's environment
        cluster = Cluster(free_port(), free_port())
        launch.init_ray(num_cpus=2, object_store_mb=256, metrics_export_port=cluster.metrics_port)
        cfg = launch.with_overrides(
            launch.load_serve_config(REPO / "serve_configs" / "local.yaml"), port=cluster.http_port
        )
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

    @property
    def admin(self) -> dict[str, str]:
        """The admin token's header (generated into the state dir: the tests set only the feedback token)."""
        return {"Authorization": f"Bearer {(self.state_dir / 'secrets' / 'admin_token').read_text().strip()}"}


def config_args(config: str = "local.yaml") -> dict[str, Any]:
    """The ray-router app's ``args`` of a shipped Serve config."""
    from ray_router.serve import launch

    return launch.our_apps(launch.load_serve_config(REPO / "serve_configs" / config))[0]["args"]


def synthetic_arm_args(directory: Path, encoder: str = "hash", seed: int = 0) -> dict[str, Any]:
    """Arm-table ``args`` that need no data: the 11 arms of the shipped configs with seeded random
    unit embeddings in ``encoder``'s space and a 3-category profile (the offline prior), saved as an
    ``arm_embeddings.file`` with its arm ids and encoder identity."""
    ids = [a["id"] for a in config_args()["arms"]]
    path = write_synthetic_arm_table(Path(directory), ids, encoder, seed)
    return {"arm_embeddings": {"file": str(path)}, "encoder": {"name": encoder, "device": "auto"}}


def real_arm_args() -> dict[str, Any]:
    """The shipped configs' arm table (RouterBench's offline split, the packaged MiniLM), from the
    real data directory; skips when the real rows are absent."""
    from tests.data_fixtures import shared_data_dir

    data = shared_data_dir()
    if data is None:
        pytest.skip("needs the real RouterBench rows (RAY_ROUTER_DATA_DIR)")
    base = config_args()
    return {
        "arm_embeddings": {"from_dataset": {**base["arm_embeddings"]["from_dataset"], "data_dir": str(data)}},
        "encoder": base["encoder"],
    }


def deploy_router(
    cluster: Cluster,
    state_dir: Path,
    arm_table: dict[str, Any],
    config: str = "local.yaml",
    args: dict | None = None,
    deployments: dict | None = None,
) -> RouterApp:
    """Deploy ``config`` with ``arm_table`` (its ``arm_embeddings`` and ``encoder`` replace the
    config's), the state in ``state_dir``, and ``args`` merged over the rest."""
    from ray_router.serve import launch

    base = launch.load_serve_config(REPO / "serve_configs" / config)
    for app in launch.our_apps(base):
        app["args"] = {**app["args"], **arm_table}
    merged = deep_merge({"state": {"dir": str(state_dir)}}, args or {})
    cfg = launch.with_overrides(base, port=cluster.http_port, args=merged, deployments=deployments)
    url = launch.deploy(cfg, timeout_s=600)
    return RouterApp(url=url, state_dir=state_dir, cluster=cluster, config=cfg)


def delete_router() -> None:
    from ray import serve

    with contextlib.suppress(Exception):  # best effort between modules
        serve.delete("ray-router", _blocking=True)


def wait_for(predicate, timeout_s: float = 60.0, interval_s: float = 0.2, what: str = "condition"):
    """Poll ``predicate`` (an observable state: an endpoint, a file) until it is truthy; fail after
    ``timeout_s``. Returns its last value."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")
