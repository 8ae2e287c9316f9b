"""k8s/monitoring: the Prometheus Operator's PodMonitor and PrometheusRule, checked without a cluster.

The operator's CRDs are not vendored: the manifests are checked against a closed schema of the
fields they use (field names and types as in monitoring.coreos.com/v1), and the rule groups with
Prometheus' own tools: ``promtool check rules`` and ``promtool test rules`` (the unit tests in
k8s/monitoring/tests: input series and the alerts they must and must not raise).
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.k8s import kube

MONITORING = kube.K8S / "monitoring"
UNIT_TESTS = MONITORING / "tests" / "ray-router-alerts.test.yaml"
RULES_FILE = "ray-router.rules.yaml"  # the name the unit-test file loads (rule_files)
# The alerts issue 12 asks for, by what they watch.
REQUIRED_ALERTS = {
    "RayRouterHighErrorRate": "error rate",
    "RayRouterRouteLatencyHigh": "route p99 latency",
    "RayRouterPosteriorVersionStuck": "posterior version stuck while feedback arrives",
    "RayRouterFeedbackApplyLag": "feedback apply lag",
    "RayRouterPosteriorStandbyStuck": "a Posterior left a standby (its upgrade never finished)",
}

_STR = {"type": "string"}
_LABELS = {"type": "object", "additionalProperties": _STR}
_META = {
    "type": "object",
    "properties": {"name": _STR, "namespace": _STR, "labels": _LABELS, "annotations": _LABELS},
    "required": ["name", "namespace"],
    "additionalProperties": False,
}
_RELABEL = {
    "type": "object",
    "properties": {
        "sourceLabels": {"type": "array", "items": _STR},
        "separator": _STR,
        "targetLabel": _STR,
        "regex": _STR,
        "modulus": {"type": "integer"},
        "replacement": _STR,
        "action": {"enum": ["replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep"]},
    },
    "additionalProperties": False,
}
_SELECTOR = {
    "type": "object",
    "properties": {"matchLabels": _LABELS},
    "required": ["matchLabels"],
    "additionalProperties": False,
}
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?)$",
}
POD_MONITOR = {
    "type": "object",
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": _META,
        "spec": {
            "type": "object",
            "properties": {
                "selector": _SELECTOR,
                "namespaceSelector": {"type": "object", "properties": {"matchNames": {"type": "array"}}},
                "podTargetLabels": {"type": "array", "items": _STR},
                "jobLabel": _STR,
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "properties": {
                            "port": _STR,
                            "path": _STR,
                            "scheme": {"enum": ["http", "https"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "relabelings": {"type": "array", "items": _RELABEL},
                            "metricRelabelings": {"type": "array", "items": _RELABEL},
                        },
                        "required": ["port"],
                        "additionalProperties": False,
                    },
                },
            },
            "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
        },
    },
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
}
_RULE = {
    "type": "object",
    "properties": {
        "record": _STR,
        "alert": _STR,
        "expr": _STR,
        "for": _DURATION,
        "keep_firing_for": _DURATION,
        "labels": _LABELS,
        "annotations": _LABELS,
    },
    "required": ["expr"],
    "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
    "additionalProperties": False,
}
PROMETHEUS_RULE = {
    "type": "object",
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": _META,
        "spec": {
            "type": "object",
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": _STR,
                            "interval": _DURATION,
                            "rules": {"type": "array", "minItems": 1, "items": _RULE},
                        },
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                    },
                }
            },
            "required": ["groups"],
            "additionalProperties": False,
        },
    },
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
}
SCHEMAS = {"PodMonitor": POD_MONITOR, "PrometheusRule": PROMETHEUS_RULE}


def one(kind: str) -> dict:
    (doc,) = [d for d in kube.kustomize("monitoring") if d["kind"] == kind]
    return doc


def schema_errors(doc: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(SCHEMAS[doc["kind"]])
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


def rules(doc: dict | None = None) -> list[dict]:
    return [r for g in (doc or one("PrometheusRule"))["spec"]["groups"] for r in g["rules"]]


def promtool() -> str:
    exe = shutil.which("promtool")
    assert exe, "promtool missing: `make test-tools` installs Debian's prometheus package"
    return exe


def run_promtool(doc: dict, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """promtool on the PrometheusRule's groups, written as the plain rule file the unit tests load."""
    (tmp_path / RULES_FILE).write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]}, sort_keys=False))
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)


# ------------------------------------------------------------------------ structure
@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_monitoring_manifests_have_the_operators_shape(kind):
    doc = one(kind)
    assert schema_errors(doc) == []
    assert doc["metadata"]["namespace"] == "ray-router"
    bad = copy.deepcopy(doc)
    bad["spec"]["podMetricsEndpoint" if kind == "PodMonitor" else "group"] = []  # a typo
    assert schema_errors(bad), "a misspelt field must be caught"


def test_podmonitor_scrapes_every_ray_pod_like_the_scrape_config():
    """The same pods, port and labels as k8s/base/prometheus/prometheus.yml (for a Prometheus
    without the operator): every Ray container of the service and of the sweep declares `metrics`."""
    pm = one("PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    for build, kind in (("base", "RayService"), ("cpu", "RayService"), ("sweep", "RayJob")):
        (doc,) = [d for d in kube.kustomize(build) if d["kind"] == kind]
        for where, template in kube.pod_templates(doc):
            names = {p.get("name") for p in template["spec"]["containers"][0]["ports"]}
            assert endpoint["port"] in names, (build, where)
    scrape = yaml.safe_load((kube.K8S / "base" / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    targets = {r["target_label"] for r in scrape["relabel_configs"] if "target_label" in r}
    # the operator names a pod label's target label as Prometheus sanitises it: ray.io/cluster -> ray_io_cluster
    from_pods = {re.sub(r"[^a-zA-Z0-9_]", "_", label) for label in pm["spec"]["podTargetLabels"]}
    assert from_pods == {"ray_io_cluster", "ray_io_node_type"} <= targets
    job = [r for r in endpoint["relabelings"] if r.get("targetLabel") == "job"]
    assert job[0]["replacement"] == scrape["job_name"] == "ray"


def test_the_alerts_of_the_issue_exist_with_severity_and_text():
    alerts = {r["alert"]: r for r in rules() if "alert" in r}
    assert set(REQUIRED_ALERTS) <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_rules_read_only_metrics_the_app_and_serve_export():
    """Every series a rule reads is one ray_router/serve/metrics.py exports (or a recording rule of
    this file, or one of Serve's that the Grafana dashboard also reads)."""
    from ray_router.grafana import dashboard_json
    from ray_router.serve import metrics

    app = set()
    for name, (kind, _, _) in metrics.METRICS.items():
        base = f"ray_{name}"
        app |= (
            {base}
            if kind == "gauge"
            else {f"{base}_total"}
            if kind == "counter"
            else {f"{base}_{s}" for s in ("bucket", "sum", "count")}
        )
    serve = set(re.findall(r"ray_serve_[a-z_]+", dashboard_json()))
    recorded = {r["record"] for r in rules() if "record" in r}
    used = set()
    for r in rules():
        used |= set(re.findall(r"\b(ray_[a-z_]+(?::[a-z0-9_]+)*)\b", r["expr"])) - {"ray_io_cluster"}
    unknown = {m for m in used if m not in app | serve | recorded}
    assert not unknown, unknown
    assert {"ray_router_http_errors_total", "ray_router_feedback_total", "ray_router_posterior_version"} <= used


def test_every_alert_is_unit_tested_both_ways():
    """Each alert appears in the promtool unit tests once firing and once silent."""
    tests = yaml.safe_load(UNIT_TESTS.read_text())
    assert tests["rule_files"] == [RULES_FILE]
    fires, silent = set(), set()
    for t in tests["tests"]:
        for case in t.get("alert_rule_test", []):
            (fires if case["exp_alerts"] else silent).add(case["alertname"])
    alerts = {r["alert"] for r in rules() if "alert" in r}
    assert alerts <= fires, alerts - fires
    assert set(REQUIRED_ALERTS) <= silent, set(REQUIRED_ALERTS) - silent


# ----------------------------------------------------------------------------- promtool
def test_rule_groups_pass_promtool_check_rules(tmp_path):
    res = run_promtool(one("PrometheusRule"), tmp_path, "check", "rules", RULES_FILE)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(rules())} rules found" in res.stdout


def test_alert_rules_pass_promtool_test_rules(tmp_path):
    res = run_promtool(one("PrometheusRule"), tmp_path, "test", "rules", UNIT_TESTS.name)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


@pytest.mark.parametrize(
    "alert, threshold",
    [
        ("RayRouterHighErrorRate", "> 0.01"),
        ("RayRouterPosteriorVersionStuck", "== 0"),
        ("RayRouterFeedbackApplyLag", "> 2"),
        ("RayRouterPosteriorStandbyStuck", "== 1"),
    ],
)
def test_promtool_unit_tests_fail_on_a_changed_rule(alert, threshold, tmp_path):
    """The unit tests bite: loosen one alert and `promtool test rules` fails."""
    doc = copy.deepcopy(one("PrometheusRule"))
    (rule,) = [r for r in rules(doc) if r.get("alert") == alert]
    assert threshold in rule["expr"]
    rule["expr"] = rule["expr"].replace(threshold, "> 1e9")
    res = run_promtool(doc, tmp_path, "test", "rules", UNIT_TESTS.name)
    assert res.returncode != 0 and alert in res.stdout + res.stderr, res.stdout + res.stderr


def test_the_apply_lag_alert_reads_the_posteriors_per_feedback_histogram():
    """Not the refresh time as a proxy: the alert's quantile comes from the apply-lag histogram the
    Posterior exports (ray_router/serve/metrics.py), and its threshold is one of its bucket bounds
    (a quantile interpolated inside a wider bucket would blur the threshold)."""
    from ray_router.serve import metrics

    recorded = {r["record"]: r["expr"] for r in rules() if "record" in r}
    (alert,) = [r for r in rules() if r.get("alert") == "RayRouterFeedbackApplyLag"]
    (used,) = re.findall(r"ray_router:[a-z0-9_:]+", alert["expr"])
    assert "ray_router_feedback_apply_lag_seconds_bucket" in recorded[used]
    assert "refresh" not in recorded[used]
    assert "router_feedback_apply_lag_seconds" in metrics.METRICS
    threshold = float(alert["expr"].rsplit(">", 1)[1])
    assert threshold in metrics.APPLY_LAG_BOUNDARIES_S


def test_the_standby_alert_reads_the_role_gauge_the_posterior_exports():
    from ray_router.serve import metrics
    from ray_router.serve.posterior_service import ROLES

    (alert,) = [r for r in rules() if r.get("alert") == "RayRouterPosteriorStandbyStuck"]
    assert 'ray_router_posterior_role{role="standby"}' in alert["expr"]
    assert metrics.METRICS["router_posterior_role"][1] == ("role",) and "standby" in ROLES
