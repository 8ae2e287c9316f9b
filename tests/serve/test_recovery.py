"""Durability: kill the posterior under load (``ray.kill``, then SIGKILL of its process); no
acknowledged feedback may be lost, and the service must recover by itself.

The module deploys ``serve_configs/gpu.yaml`` with a synthetic arm table (no data needed) in the
space of the packaged MiniLM encoder, so the embedder runs a real model: on a CPU-only machine its
GPU request falls back to CPU, on a GPU machine it runs on CUDA.
"""

from __future__ import annotations

import base64
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from tests.serve.conftest import TOKEN, RouterApp, delete_router, deploy_router, synthetic_arm_args, wait_for
from tests.serve.helpers import QUERIES

pytestmark = pytest.mark.integration

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def app(serve_cluster, tmp_path_factory) -> RouterApp:
    app = deploy_router(
        serve_cluster,
        tmp_path_factory.mktemp("recovery-state"),
        synthetic_arm_args(tmp_path_factory.mktemp("recovery-arms"), encoder="minilm"),
        config="gpu.yaml",
        args={"state": {"snapshot_every_n": 15, "snapshot_every_s": 2}},
    )
    yield app
    delete_router()


@dataclass
class Load:
    acked: dict = field(default_factory=dict)  # nonce -> outcome of every 200 on /v1/feedback
    acked_at: list = field(default_factory=list)
    unacked: int = 0  # feedback whose answer was an error (may or may not be recorded)
    replayed: int = 0  # acks of a request the dead posterior had logged (answered after a retry)
    route_errors: int = 0
    routes_at: list = field(default_factory=list)  # successes of the route-only client
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)


def _client_loop(url: str, load: Load, seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=120) as c:
        while not load.stop.is_set():
            try:
                r = c.post("/v1/route", json={"query": rng.choice(QUERIES)})
                if r.status_code != 200:
                    load.route_errors += 1
                    load.stop.wait(0.05)  # back off (and stop at once when the test is done)
                    continue
                d = r.json()
                outcome = rng.choice(["first", "second", "tie"])
                f = c.post("/v1/feedback", json={"decision_id": d["decision_id"], "outcome": outcome}, headers=AUTH)
            except httpx.HTTPError:
                load.unacked += 1
                load.stop.wait(0.05)
                continue
            if f.status_code == 200:
                nonce = _nonce(d["decision_id"])
                with load.lock:
                    load.acked[nonce] = outcome
                    load.acked_at.append(time.monotonic())
                    load.replayed += bool(f.json().get("replayed"))
            else:
                load.unacked += 1


def _route_loop(url: str, load: Load) -> None:
    """Routes only: they need the embedder and the ingress's samples, not the posterior."""
    with httpx.Client(base_url=url, timeout=120) as c:
        while not load.stop.is_set():
            try:
                ok = c.post("/v1/route", json={"query": QUERIES[len(load.routes_at) % len(QUERIES)]}).status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                load.routes_at.append(time.monotonic())
            else:
                load.route_errors += 1
            load.stop.wait(0.05)  # a steady trickle of routes, not a CPU-bound loop


def _nonce(decision_id: str) -> str:
    """The nonce inside a decision id (bytes 2..14 of its payload, see ray_router.serve.tokens)."""
    payload = decision_id.split(".")[1]
    return base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))[2:14].hex()


def _log_records(app: RouterApp) -> list[dict]:
    """Every record of the feedback log (its segments, read as the posterior reads them). The run
    stays far below one segment (32 MiB), so no snapshot has deleted any: the log starts at seq 1."""
    from ray_router.serve.durable import LOG_DIR, FeedbackJournal

    records = [rec for _, rec in FeedbackJournal(app.state_dir / LOG_DIR).scan()]
    assert records and records[0]["seq"] == 1, "the log no longer starts at seq 1: the check would be partial"
    return records


def _status(app: RouterApp) -> dict:
    r = httpx.get(f"{app.url}/v1/admin/status", headers=app.admin, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _kill_under_load(app: RouterApp, kill) -> dict:
    before = _status(app)["posterior"]
    load = Load()
    threads = [threading.Thread(target=_client_loop, args=(app.url, load, i), daemon=True) for i in range(4)]
    threads.append(threading.Thread(target=_route_loop, args=(app.url, load), daemon=True))
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(load.acked) >= 30, timeout_s=120, what="feedback before the kill")
        n_before_kill = len(load.acked)
        t_kill = time.monotonic()
        kill(before["pid"])
        # the service must come back by itself and keep acknowledging feedback
        wait_for(lambda: len(load.acked) >= n_before_kill + 30, timeout_s=180, what="feedback after the kill")
        t_back = next(t for t in load.acked_at if t > t_kill)
        recovered_s = t_back - t_kill
        routes_while_down = sum(t_kill < t < t_back for t in load.routes_at)
    finally:
        load.stop.set()
        for t in threads:
            t.join(timeout=150)
    after = _status(app)["posterior"]
    assert after["pid"] != before["pid"], "the posterior was not replaced"
    assert load.route_errors == 0  # routes do not need the posterior: none failed while it was down
    # every acknowledged feedback is in the log, with its outcome, exactly once
    wait_for(lambda: (s := _status(app)["posterior"])["last_applied_seq"] == s["last_seq"], what="all applied")
    records = _log_records(app)
    logged = {}
    for rec in records:
        assert rec["nonce"] not in logged, "a decision took two feedbacks"
        logged[rec["nonce"]] = rec["outcome"]
    lost = {n: o for n, o in load.acked.items() if logged.get(n) != o}
    assert not lost, f"{len(lost)} acknowledged feedback(s) missing from the log"
    # ... and learned: the posterior's update count equals the log
    stats = httpx.get(f"{app.url}/v1/stats", timeout=60).json()
    assert stats["posterior"]["n_updates"] == len(records) == stats["durability"]["last_seq"]
    rec = stats["durability"]["recovery"]
    assert rec["restored_snapshot"] or rec["replayed"] > 0
    assert httpx.get(f"{app.url}/healthz", timeout=30).json()["status"] == "ok"
    return {
        "acked": len(load.acked),
        "logged": len(records),
        "unacked": load.unacked,
        "replayed": load.replayed,
        "recovered_s": round(recovered_s, 2),
        "routes_while_down": routes_while_down,
        "recovery": rec,
    }


def test_gpu_config_serves_on_the_device_this_machine_has(app):
    """``gpu: auto``: a GPU replica where the cluster has a GPU, else the CPU fallback; the encoder
    runs where ``resolve_device('auto')`` says for this machine."""
    import ray

    from ray_router.embeddings import resolve_device

    device = _status(app)["embedder"]["device"]
    expected = resolve_device("auto")  # "cuda" when torch sees a GPU here, else "cpu"
    assert expected in ("cpu", "cuda")
    assert device == expected or device.startswith(f"{expected}:"), (device, expected)
    assert (expected == "cuda") == (ray.cluster_resources().get("GPU", 0) > 0)  # the builder's view agrees
    r = httpx.post(f"{app.url}/v1/route", json={"query": "hello"}, timeout=60)
    assert r.status_code == 200, r.text


def test_ray_kill_of_the_posterior_under_load_loses_nothing(app):
    import ray

    def kill(_pid):
        names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "#Posterior#" in a["name"]]
        assert len(names) == 1, names
        ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]))

    out = _kill_under_load(app, kill)
    print(f"ray.kill: {out}")


def test_sigkill_of_the_posterior_process_under_load_loses_nothing(app):
    out = _kill_under_load(app, lambda pid: os.kill(pid, signal.SIGKILL))
    print(f"SIGKILL: {out}")
