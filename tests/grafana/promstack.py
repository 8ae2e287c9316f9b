"""A real Prometheus (Debian's ``prometheus`` binary) for the tests: start, wait, query, stop.

No Ray here. The test scrapes a local Ray node's metrics export port with a static target: Ray
writes its own file-SD config only when the dashboard runs, and the tests keep the dashboard off.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def scrape_config(targets: list[str], interval_s: int = 1) -> str:
    """A Prometheus config scraping Ray's metrics endpoints (``job="ray"``, as Ray's own config)."""
    quoted = ", ".join(f"'{t}'" for t in targets)
    return (
        "global:\n"
        f"  scrape_interval: {interval_s}s\n"
        f"  evaluation_interval: {interval_s}s\n"
        "scrape_configs:\n"
        "  - job_name: ray\n"
        f"    static_configs:\n      - targets: [{quoted}]\n"
    )


# What Prometheus' Kubernetes pod discovery reports for a KubeRay pod's metrics port (the labels
# KubeRay sets on Ray pods, and the container port name of rayservice.yaml / rayjob.yaml).
KUBERAY_POD_META = {
    "__meta_kubernetes_namespace": "ray-router",
    "__meta_kubernetes_pod_name": "ray-router-raycluster-head-x7k2p",
    "__meta_kubernetes_pod_label_ray_io_is_ray_node": "yes",
    "__meta_kubernetes_pod_label_ray_io_cluster": "ray-router-raycluster",
    "__meta_kubernetes_pod_label_ray_io_node_type": "head",
    "__meta_kubernetes_pod_container_port_name": "metrics",
}


def k8s_config_with_static_targets(k8s_config: str, ray_targets: list[str], interval_s: int | None = None) -> str:
    """The k8s scrape config with its pod discovery replaced by static targets that carry the same
    ``__meta_kubernetes_*`` labels, so that Prometheus runs its real relabelling on them. Two decoys
    (another port of a Ray pod, a pod that is no Ray node) must be dropped by it."""
    import yaml

    cfg = yaml.safe_load(k8s_config)
    if interval_s is not None:
        cfg["global"]["scrape_interval"] = cfg["global"]["evaluation_interval"] = f"{interval_s}s"
    not_metrics = {**KUBERAY_POD_META, "__meta_kubernetes_pod_container_port_name": "dashboard"}
    not_ray = {k: v for k, v in KUBERAY_POD_META.items() if "ray_io" not in k}
    for job in cfg["scrape_configs"]:
        assert [sd["role"] for sd in job.pop("kubernetes_sd_configs")] == ["pod"]
        job["static_configs"] = [
            {"targets": ray_targets, "labels": KUBERAY_POD_META},
            {"targets": ["127.0.0.1:9"], "labels": not_metrics},
            {"targets": ["127.0.0.1:7"], "labels": not_ray},
        ]
    return yaml.safe_dump(cfg, sort_keys=False)


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def query(self, expr: str, timeout_s: float = 10.0) -> dict[str, Any]:
        """``/api/v1/query`` at the current time; the JSON answer (``status``, ``data``/``error``)."""
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=timeout_s)
        try:
            return r.json()
        except ValueError:
            return {"status": "error", "errorType": f"http {r.status_code}", "error": r.text[:300]}

    def targets(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/api/v1/targets", timeout=10).json()["data"]

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def start_prometheus(
    workdir: Path,
    targets: list[str] | None = None,
    interval_s: int = 1,
    timeout_s: float = 30.0,
    config: str | None = None,
) -> Prometheus:
    """Start Prometheus with ``config`` (text), or a plain static scrape of ``targets``."""
    binary = prometheus_binary()
    if binary is None:
        raise RuntimeError("prometheus is not installed: run `make test-tools` (Debian package `prometheus`)")
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "prometheus.yml"
    cfg.write_text(config if config is not None else scrape_config(targets or [], interval_s))
    port = free_port()
    log_path = workdir / "prometheus.log"
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "GOMAXPROCS": "1"},
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.monotonic() + timeout_s
    while not _ready(prom):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            prom.stop()
            raise RuntimeError(f"prometheus not ready within {timeout_s}s:\n{prom.log_tail()}")
        try:  # between two readiness probes, wait on the process itself: an exit is seen at once
            code = proc.wait(timeout=min(0.2, remaining))
        except subprocess.TimeoutExpired:
            continue
        raise RuntimeError(f"prometheus exited with {code}:\n{prom.log_tail()}")
    return prom


def _ready(prom: Prometheus) -> bool:
    """Prometheus answers 200 on ``/-/ready`` once it serves queries."""
    try:
        return httpx.get(f"{prom.url}/-/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
