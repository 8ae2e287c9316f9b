"""The dashboard as code: required panels, metric names the app and Ray really export, PromQL that
Prometheus' own parser accepts (``promtool check rules``), a well-formed Grafana model, and a leaf
package that the core never imports. The live check against Prometheus is test_promql_live.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ray_router.grafana import dashboard as dash
from ray_router.grafana.dashboard import build_dashboard, dashboard_json, queries, substitute

REPO = Path(__file__).resolve().parents[2]


def titles() -> list[str]:
    return [p["title"] for p in build_dashboard()["panels"] if p["type"] != "row"]


def exprs_of(title: str) -> list[str]:
    return [q.expr for q in queries() if q.panel == title]


def test_the_required_panels_exist_and_query_the_right_series():
    t = titles()
    assert "ray_router_routes_total" in exprs_of("Routes per arm")[0] and "by (arm)" in exprs_of("Routes per arm")[0]
    assert "by (outcome)" in exprs_of("Feedback per outcome")[0]
    assert "ray_router_feedback_total" in exprs_of("Win rates")[0]
    lat = exprs_of("Route latency p50 / p99")
    assert [e.split(",")[0] for e in lat] == ["histogram_quantile(0.5", "histogram_quantile(0.99"]
    assert all("ray_router_route_latency_seconds_bucket" in e for e in lat)
    refresh = exprs_of("Posterior refresh time p50 / p99")
    assert len(refresh) == 2 and all("ray_router_posterior_refresh_seconds_bucket" in e for e in refresh)
    lag = exprs_of("Feedback apply lag p50 / p99")
    assert [e.split(",")[0] for e in lag] == ["histogram_quantile(0.5", "histogram_quantile(0.99"]
    assert all("ray_router_feedback_apply_lag_seconds_bucket" in e for e in lag)
    assert "by (ray_io_cluster, role)" in exprs_of("Posterior role")[0]
    assert "deriv(ray_router_feedback_log_bytes" in exprs_of("Feedback-log growth")[0]
    assert "ray_serve_deployment_replica_healthy" in exprs_of("Healthy replicas per deployment")[0]
    assert len(t) == len(set(t)), "panel titles must be unique"


def _exported_series() -> set[str]:
    from ray_router.serve.metrics import METRICS

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {f"ray_{name}{s}" for name, (kind, _, _) in METRICS.items() for s in suffixes[kind]}


def test_every_app_series_in_the_dashboard_is_one_the_app_exports_and_every_metric_is_shown():
    from ray_router.serve.metrics import METRICS

    used = {n for q in queries() for n in re.findall(r"\b(ray_router_[a-z0-9_]+)", q.expr)}
    assert used, "no app metric in the dashboard"
    assert used <= _exported_series(), used - _exported_series()
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", n)[len("ray_") :] for n in used}
    assert shown == set(METRICS), f"app metrics without a panel: {set(METRICS) - shown}"


def test_rays_serve_series_exist_in_the_installed_ray():
    """Ray's names, found in the installed Ray's source (catches a rename on a Ray upgrade)."""
    import importlib.util

    root = Path(importlib.util.find_spec("ray").origin).parent / "serve" / "_private"
    source = "\n".join(p.read_text(errors="replace") for p in root.rglob("*.py"))
    used = {n for q in queries() for n in re.findall(r"\b(ray_serve_[a-z0-9_]+)", q.expr)}
    assert used
    for series in used:
        base = re.sub(r"_(total|bucket|sum|count)$", "", series)[len("ray_") :]
        assert f'"{base}"' in source, f"{series}: Ray {base!r} not found in ray/serve/_private"


def test_every_expression_parses_with_promtool(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: `make test-tools` installs Debian's prometheus package"
    rules = [{"record": f"ray_router_dashboard:q{i}", "expr": substitute(q.expr)} for i, q in enumerate(queries())]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(rules)} rules found" in res.stdout


def test_substitute_replaces_every_grafana_variable():
    for q in queries():
        out = substitute(q.expr)
        assert "$" not in out, out
    assert substitute("label_values(up, job)") == "up"


def test_dashboard_model_is_well_formed():
    d = build_dashboard()
    assert d["uid"] == dash.DASHBOARD_UID and len(d["uid"]) <= 40 and "id" not in d
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    names = [v["name"] for v in d["templating"]["list"]]
    assert names == ["datasource", "application"]
    occupied: set[tuple[int, int]] = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] >= 1
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & occupied, f"panel {p['title']!r} overlaps another"
        occupied |= cells
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"])
        assert p["description"]
    assert json.loads(dashboard_json()) == d  # nothing JSON cannot carry (a tuple would come back a list)


def _provisioned_dashboard_file() -> Path:
    """The file that k8s/base's ConfigMap generator provisions to Grafana's dashboard sidecar."""
    kustomization = yaml.safe_load((REPO / "k8s" / "base" / "kustomization.yaml").read_text())
    (gen,) = [g for g in kustomization["configMapGenerator"] if g["name"] == "ray-router-grafana-dashboard"]
    assert gen["options"]["labels"] == {"grafana_dashboard": "1"}, "the sidecar loads ConfigMaps with this label"
    (entry,) = gen["files"]
    key, _, rel = entry.partition("=")
    assert key.endswith(".json")
    return REPO / "k8s" / "base" / rel


def test_the_provisioned_dashboard_is_the_generated_one():
    committed = _provisioned_dashboard_file().read_text()
    assert json.loads(committed) == build_dashboard(), (
        "run `ray-router grafana export --out k8s/base/grafana/ray-router-dashboard.json`"
    )
    assert committed == dashboard_json(), "same content, other formatting: re-export it"


def test_the_json_does_not_depend_on_the_process():
    """Another interpreter (another hash seed) writes the same bytes: no set or dict order leaks in."""
    code = "import sys; from ray_router.grafana import dashboard_json; sys.stdout.write(dashboard_json())"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    }
    assert outs == {dashboard_json()}


def test_grafana_is_a_leaf_package():
    code = (
        "import sys, ray_router, ray_router.data, ray_router.embeddings, ray_router.policies, "
        "ray_router.evaluation, ray_router.cli\n"
        "assert 'ray_router.grafana' not in sys.modules, 'the core imports ray_router.grafana'\n"
        "import ray_router.grafana\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.') or m.startswith('ray_router.serve'))\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize(
    "expr, own",
    [
        ("sum(rate(ray_router_routes_total[1m]))", True),
        ("sum(ray_serve_deployment_replica_healthy)", False),
        ("sum(rate(ray_router_feedback_total[1m])) / sum(ray_serve_deployment_replica_healthy)", False),
    ],
)
def test_own_means_only_the_apps_series(expr, own):
    assert dash.PanelQuery("p", "A", expr).own is own
