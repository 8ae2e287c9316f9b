"""The router on a real two-node Ray cluster: the embedder on one node, the posterior on the other;
losing the posterior's node loses no acknowledged feedback.

Two raylets run on this machine (``tests/multinode.py``: two ``ray start``, each in its own
session), with distinct custom resources and labels:

- ``node_a`` (the head: GCS, Serve controller, HTTP proxy): resource ``{"node_a": 1}``, label
  ``rr-node=node_a``; the Ingress (``ray_actor_options.resources``) and the Embedder (``args.embedder.resources``) ask for ``node_a``;
- ``node_b``: resource ``{"node_b": 1}``, label ``rr-node=node_b``; the Posterior asks for
  ``label_selector: {rr-node: node_b}`` with ``fallback_strategy: [{label_selector: {rr-node: node_a}}]``:
  it runs on ``node_b`` while that node lives, and its replacement may schedule on ``node_a`` once
  ``node_b`` is gone. A custom resource could not say this: a resource only ``node_b`` has pins the
  posterior there for good (its replacement never schedules), and one both nodes have lets the first
  placement land on either.

All of it is Serve config (``deployments[].ray_actor_options``), deployed by ``ray-router serve
--address``, as an operator would on a running cluster; no product code knows about nodes.

Both "nodes" are this machine, so the state directory is one local directory that both see: it
stands in for the shared volume (an NFS or ReadWriteMany PVC) a real second machine would mount.
The test process never joins the cluster (it may hold tests/serve's own Ray instance); it reads
placements from ``/v1/admin/status`` (each replica's pid) and the session each pid belongs to.
"""

from __future__ import annotations

import base64
import itertools
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from tests.multinode import LocalCluster, alive_nodes, kill_session
from tests.serve.conftest import REPO, SECRET_ENV, TOKEN, free_port, synthetic_arm_args, wait_for
from tests.serve.helpers import QUERIES

pytestmark = pytest.mark.integration

AUTH = {"Authorization": f"Bearer {TOKEN}"}
EMBEDDER = {"num_cpus": 0.5, "resources": {"node_a": 0.01}}
PLACEMENT = {  # merged into local.yaml's deployments (launch.with_overrides)
    "Ingress": {"ray_actor_options": {"num_cpus": 0, "resources": {"node_a": 0.01}}},
    "Posterior": {
        "ray_actor_options": {
            "num_cpus": 0,
            "label_selector": {"rr-node": "node_b"},
            "fallback_strategy": [{"label_selector": {"rr-node": "node_a"}}],
        }
    },
}


@dataclass
class TwoNodeApp:
    cluster: LocalCluster
    url: str
    state_dir: Path
    driver: subprocess.Popen
    acked: dict[str, tuple[str, str]] = field(default_factory=dict)  # nonce -> (decision id, outcome), every 200

    def status(self) -> dict:
        admin = (self.state_dir / "secrets" / "admin_token").read_text().strip()  # generated: no env var set
        r = httpx.get(f"{self.url}/v1/admin/status", headers={"Authorization": f"Bearer {admin}"}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()


def _write_config(tmp: Path) -> Path:
    from ray_router.serve import launch

    cfg = launch.load_serve_config(REPO / "serve_configs" / "local.yaml")
    for app in launch.our_apps(cfg):
        app["args"] = {**app["args"], **synthetic_arm_args(tmp)}  # hash encoder: no model, no data
    cfg = launch.with_overrides(
        cfg,
        # the embedder's placement goes in args.embedder (merged with its CPU request by the builder)
        args={"state": {"snapshot_every_n": 20, "snapshot_every_s": 2}, "embedder": EMBEDDER},
        deployments=PLACEMENT,
    )
    launch.validate_config(cfg)
    path = tmp / "two-nodes.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> Iterator[TwoNodeApp]:
    tmp = tmp_path_factory.mktemp("two-nodes")
    cluster = LocalCluster(env=dict(SECRET_ENV))  # replicas inherit their raylet's environment
    driver = log = None
    try:
        cluster.add_node("node_a", num_cpus=1)  # the head
        cluster.add_node("node_b", num_cpus=1)
        state_dir = tmp / "state"  # one directory both nodes see: the shared volume's stand-in
        port = free_port()
        log = open(tmp / "serve.log", "wb")  # noqa: SIM115 - the driver's output, read on failure
        driver = subprocess.Popen(
            [
                *(sys.executable, "-m", "ray_router.cli", "serve", "--config", str(_write_config(tmp))),
                *("--address", cluster.address, "--port", str(port), "--state-dir", str(state_dir)),
            ],
            cwd=REPO,
            env=cluster.node_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert driver.poll() is None, (tmp / "serve.log").read_text()[-4000:]
            return "ray-router is serving on" in (tmp / "serve.log").read_text()

        wait_for(up, timeout_s=300, interval_s=0.5, what="ray-router serve --address")
        yield TwoNodeApp(cluster, url, state_dir, driver)
    finally:
        if driver is not None:  # no graceful stop: the whole cluster goes
            kill_session(driver.pid, what="the serve driver")
            driver.wait(timeout=30)
        if log is not None:
            log.close()
        cluster.shutdown()  # raises if a process of either node survives


def _nonce(decision_id: str) -> str:
    payload = decision_id.split(".")[1]
    return base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))[2:14].hex()


def _route_and_feedback(c: httpx.Client, rng: random.Random) -> tuple[str, str, httpx.Response] | None:
    r = c.post("/v1/route", json={"query": rng.choice(QUERIES)})
    if r.status_code != 200:
        return None
    d = r.json()["decision_id"]
    outcome = rng.choice(["first", "second", "tie"])
    return d, outcome, c.post("/v1/feedback", json={"decision_id": d, "outcome": outcome}, headers=AUTH)


def test_embedder_and_posterior_run_on_different_nodes(two_nodes):
    app, cluster = two_nodes, two_nodes.cluster
    nodes = alive_nodes(cluster)
    assert sorted(n["labels"]["rr-node"] for n in nodes) == ["node_a", "node_b"]
    assert {k for n in nodes for k in n["resources"] if k.startswith("node_")} == {"node_a", "node_b"}
    s = app.status()
    where = {part: cluster.node_of(s[part]["pid"]) for part in ("embedder", "posterior", "ingress")}
    assert where == {"embedder": "node_a", "posterior": "node_b", "ingress": "node_a"}
    assert s["posterior"]["state_dir"] == str(app.state_dir)
    # the real HTTP route and feedback cross the nodes: Ingress (a) -> Embedder (a), Posterior (b)
    rng = random.Random(0)
    with httpx.Client(base_url=app.url, timeout=60) as c:
        for _ in range(10):
            got = _route_and_feedback(c, rng)
            assert got is not None
            d, outcome, f = got
            assert f.status_code == 200, f.text
            assert f.json()["accepted"] is True
            app.acked[_nonce(d)] = (d, outcome)
    wait_for(
        lambda: app.status()["posterior"]["last_applied_seq"] >= len(app.acked), what="the feedback applied on node_b"
    )


@dataclass
class Load:
    acked: dict = field(default_factory=dict)  # nonce -> (decision id, outcome)
    acked_at: list = field(default_factory=list)
    unacked: int = 0
    statuses: dict = field(default_factory=dict)  # HTTP status -> count, every answer
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def count(self, status: int) -> None:
        with self.lock:
            self.statuses[status] = self.statuses.get(status, 0) + 1


def _client_loop(url: str, load: Load, seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=120) as c:
        while not load.stop.is_set():
            try:
                got = _route_and_feedback(c, rng)
            except httpx.HTTPError:
                load.unacked += 1
                load.stop.wait(0.05)
                continue
            if got is None:
                load.count(0)  # a route that failed
                load.stop.wait(0.05)
                continue
            d, outcome, f = got
            load.count(f.status_code)
            if f.status_code == 200:
                with load.lock:
                    load.acked[_nonce(d)] = (d, outcome)
                    load.acked_at.append(time.monotonic())
            else:
                load.unacked += 1


def test_losing_the_posteriors_node_loses_no_acknowledged_feedback(two_nodes):
    """SIGKILL of every process of node_b (raylet, agents, the Posterior replica) while 3 clients
    post route + feedback; Serve restarts the Posterior on node_a, which rebuilds its state from
    the shared state directory."""
    app, cluster = two_nodes, two_nodes.cluster
    before = app.status()["posterior"]
    assert cluster.node_of(before["pid"]) == "node_b"
    load = Load()
    threads = [threading.Thread(target=_client_loop, args=(app.url, load, i), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(load.acked) >= 20, timeout_s=120, what="feedback before the kill")
        n_before = len(load.acked)
        t_kill = time.monotonic()
        cluster.kill_node("node_b")
        wait_for(lambda: len(load.acked) >= n_before + 20, timeout_s=180, what="feedback after the kill")
        acks = sorted(load.acked_at)
        # the posterior's outage as the clients saw it: the longest wait between two acks around the kill
        outage_s = max(b - a for a, b in itertools.pairwise(acks) if b > t_kill)
    finally:
        load.stop.set()
        for t in threads:
            t.join(timeout=150)
    assert [n["labels"]["rr-node"] for n in alive_nodes(cluster)] == ["node_a"]
    after = app.status()["posterior"]
    assert after["pid"] != before["pid"]
    assert cluster.node_of(after["pid"]) == "node_a", "the posterior did not come back on the surviving node"
    assert after["state_dir"] == str(app.state_dir)
    acked = {**app.acked, **load.acked}
    wait_for(lambda: (s := app.status()["posterior"])["last_applied_seq"] == s["last_seq"], what="the log applied")
    after = app.status()["posterior"]
    assert after["last_applied_seq"] >= len(acked), (after, len(acked))
    assert after["n_updates"] == after["last_applied_seq"]
    assert after["recovery"]["restored_snapshot"] or after["recovery"]["replayed"] > 0
    # each acknowledged decision, posted again, is refused as already recorded: the recovered
    # posterior holds every one of them (a lost one would be accepted as new)
    lost = []
    with httpx.Client(base_url=app.url, timeout=60) as c:
        for nonce, (d, outcome) in acked.items():
            r = c.post("/v1/feedback", json={"decision_id": d, "outcome": outcome}, headers=AUTH)
            if r.status_code != 409:
                lost.append((nonce, r.status_code, r.text[:200]))
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged feedback not held after the node loss: {lost[:5]}"
    assert app.status()["posterior"]["last_applied_seq"] == after["last_applied_seq"]  # nothing new was taken
    assert not any(500 <= s < 600 and s != 503 for s in load.statuses), load.statuses
    print(
        f"two nodes, node_b killed: {len(acked)} acknowledged, 0 lost; applied {after['last_applied_seq']}; "
        f"unacknowledged {load.unacked}; statuses {load.statuses}; longest gap between acks after the kill {outage_s:.1f}s; "
        f"recovery {after['recovery']}"
    )
