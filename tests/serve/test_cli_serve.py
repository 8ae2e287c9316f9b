"""``ray-router serve``: validates configs, fails early with a clear message, and serves end to end
(its own local Ray, real HTTP), then stops cleanly on SIGTERM: with a synthetic arm table and the
hash encoder (no data needed), and as shipped (RouterBench's offline split, MiniLM) when the real
rows are there."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ray_router.serve.durable import FeedbackJournal
from tests.data_fixtures import shared_data_dir, write_routerbench_subset
from tests.serve.conftest import REPO, free_port, real_arm_args, synthetic_arm_args, wait_for

CLI = [sys.executable, "-m", "ray_router.cli"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ROUTER_TOKEN", "RAY_ROUTER_HMAC_KEY")}
    env.update(extra)
    return env


@pytest.mark.parametrize("config", ["local.yaml", "gpu.yaml"])
def test_check_validates_each_config(config, tmp_path):
    # the shipped configs build their arm table from RouterBench's offline split: the real rows where
    # they are, else a synthetic file in the real subset's format
    data_dir = shared_data_dir() or write_routerbench_subset(tmp_path)
    res = subprocess.run(
        [*CLI, "serve", "--config", f"serve_configs/{config}", "--check", "--data-dir", str(data_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "valid" in res.stdout
    assert "WARNING" not in res.stderr, res.stderr  # the shipped sizes: the embedders take what the ingress admits


def test_check_warns_when_the_ingress_admits_more_than_the_embedders_take(tmp_path):
    import yaml

    cfg = yaml.safe_load((REPO / "serve_configs" / "local.yaml").read_text())
    app = next(a for a in cfg["applications"] if a["name"] == "ray-router")
    next(d for d in app["deployments"] if d["name"] == "Embedder")["max_ongoing_requests"] = 40
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    data_dir = shared_data_dir() or write_routerbench_subset(tmp_path)
    res = subprocess.run(
        [*CLI, "serve", "--config", str(tmp_path / "c.yaml"), "--check", "--data-dir", str(data_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert res.returncode == 0, res.stderr  # a warning, not a refusal: the config still runs
    assert "WARNING" in res.stderr and "takes 1 x 40" in res.stderr and "at least 64" in res.stderr, res.stderr


def test_missing_data_dir_fails_before_starting_ray(tmp_path):
    res = subprocess.run(
        [*CLI, "serve", "--data-dir", str(tmp_path / "nope"), "--state-dir", str(tmp_path / "s")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert res.returncode == 2
    assert re.search(r"error: arm_embeddings.from_dataset: data directory .*nope.* does not exist", res.stderr)
    assert "Traceback" not in res.stderr


def _command(table: str, tmp_path: Path) -> list[str]:
    """The serve command line's config arguments for the arm table."""
    if table == "synthetic":
        import yaml

        from ray_router.serve import launch

        cfg = launch.load_serve_config(REPO / "serve_configs" / "local.yaml")
        app = launch.our_apps(cfg)[0]
        app["args"] = {**app["args"], **synthetic_arm_args(tmp_path)}
        path = tmp_path / "serve.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return ["--config", str(path)]
    data = real_arm_args()["arm_embeddings"]["from_dataset"]["data_dir"]  # skips without the real rows
    return ["--config", "serve_configs/local.yaml", "--data-dir", data]


@pytest.mark.integration
@pytest.mark.parametrize("table", ["synthetic", "routerbench"])
def test_serve_end_to_end_then_sigterm(tmp_path, table):
    config = _command(table, tmp_path)
    port, state = free_port(), tmp_path / "state"
    proc = subprocess.Popen(
        [*CLI, "serve", *config, "--port", str(port), "--state-dir", str(state), "--num-cpus", "2"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 400
        url = None
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            lines.append(line)
            m = re.search(r"ray-router is serving on (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        assert url == f"http://127.0.0.1:{port}", "".join(lines[-30:])
        token_file = state / "secrets" / "token"
        banner = [proc.stdout.readline() for _ in range(6)]
        assert any(str(token_file) in ln for ln in banner), banner
        # the posterior's start-up facts: both tables carry a 3-category prior (RouterBench's subset:
        # arc, mbpp, winogrande; the synthetic profile: three made-up categories)
        assert any("policy: offline prior: given (3 categories)" in ln for ln in banner), banner
        # one address to give clients: no second URL that would change when a replica restarts
        assert set(re.findall(r"http://[\w.]+:\d+", "".join([lines[-1], *banner]))) == {url}, banner
        assert httpx.get(f"{url}/healthz", timeout=60).json()["status"] == "ok"
        d = httpx.post(f"{url}/v1/route", json={"query": "Is 91 a prime number?"}, timeout=60).json()
        assert len(d["arms"]) == 2
        token = token_file.read_text().strip()
        assert (os.stat(token_file).st_mode & 0o777) == 0o600
        fb = httpx.post(
            f"{url}/v1/feedback",
            json={"decision_id": d["decision_id"], "outcome": "tie"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        assert fb.status_code == 200, fb.text
        assert [r["seq"] for _, r in FeedbackJournal(state / "feedback").scan()] == [1]
        # the URL outlives its Ingress replica: SIGKILL it, Serve starts another (on another port of
        # its own), and the same URL answers again from the new process
        admin = {"Authorization": f"Bearer {(state / 'secrets' / 'admin_token').read_text().strip()}"}
        pid = httpx.get(f"{url}/v1/admin/status", headers=admin, timeout=60).json()["ingress"]["pid"]
        os.kill(pid, signal.SIGKILL)

        def new_ingress() -> bool:
            try:
                r = httpx.get(f"{url}/v1/admin/status", headers=admin, timeout=5)
            except httpx.HTTPError:
                return False
            return r.status_code == 200 and r.json()["ingress"]["pid"] != pid

        wait_for(new_ingress, timeout_s=180, what="a new Ingress replica behind the same URL")
        # Seen once on a loaded machine: right after the new replica answered, Serve's proxy said 404
        # "Path '/v1/route' not found" (its route table was empty for a moment, as a proxy's is until
        # the controller's route table reaches it). So wait for a routed answer, then three in a row.
        seen: list[str] = []

        def routes() -> bool:
            try:
                r = httpx.post(f"{url}/v1/route", json={"query": "Is 97 a prime number?"}, timeout=30)
            except httpx.HTTPError as e:
                seen.append(type(e).__name__)
                return False
            seen.append(str(r.status_code))
            return r.status_code == 200

        try:
            wait_for(routes, timeout_s=120, what="/v1/route served through the same URL")
        except AssertionError as e:
            raise AssertionError(f"{e}; statuses seen: {seen[-10:]}") from None
        for q in ("Is 101 a prime number?", "Is 103 a prime number?", "Is 107 a prime number?"):
            r = httpx.post(f"{url}/v1/route", json={"query": q}, timeout=60)
            assert r.status_code == 200, r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    assert rc == 0, "".join(lines[-30:])
    # a clean stop leaves a final snapshot behind
    assert Path(state / "posterior.snapshot.npz").is_file()
