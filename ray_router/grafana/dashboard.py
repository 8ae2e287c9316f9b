"""The ray-router Grafana dashboard, defined as code and generated to Grafana's dashboard JSON.

Every panel queries Prometheus: the app's own metrics (``ray_router_*``, defined in
``ray_router/serve/metrics.py`` and exported by Ray with the ``ray_`` prefix; counters get
``_total``, histograms ``_bucket``/``_sum``/``_count``) and Ray Serve's built-in ``ray_serve_*``
series for replica health. Queries use two Grafana built-ins, ``$__rate_interval`` and ``$__range``,
and two dashboard variables: ``$datasource`` (the Prometheus data source) and ``$application``
(the Serve application, a label that only Serve's own series carry).

The rows, panels and PromQL live in ``panels.yaml`` (data, reviewed like code); they are loaded
into strict frozen dataclasses (a wrong panel kind or width fails when the dashboard is built); the output is plain dicts, as Grafana's JSON is the stable interface (the same
file is provisioned by the ConfigMap in ``k8s/base/grafana`` and uploaded by
``ray-router grafana push``). ``tests/grafana`` checks every expression with ``promtool`` and runs
each one against a real Prometheus scraping the real app.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from ray_router.config import config_dataclass, parse

DASHBOARD_UID = "ray-router"
TITLE = "ray-router: routing, feedback, posterior, arms, Serve health"
SCHEMA_VERSION = 39  # Grafana 10.4 / 11.x dashboard JSON; newer Grafana migrates it on load

# Grafana substitutes these before sending a query to Prometheus.
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
RANGE = "$__range"
APP = 'application=~"$application"'

# The app's own series (ray_router/serve/metrics.py, as Ray exports them).
ROUTES = "ray_router_routes_total"
ROUTE_LATENCY = "ray_router_route_latency_seconds"
HTTP_ERRORS = "ray_router_http_errors_total"
FEEDBACK = "ray_router_feedback_total"
REFRESH = "ray_router_posterior_refresh_seconds"
LOG_BYTES = "ray_router_feedback_log_bytes"
POSTERIOR_VERSION = "ray_router_posterior_version"
# per arm, the chat path's upstream calls (tag arm)
ARM_REQUESTS = "ray_router_arm_requests_total"
ARM_ERRORS = "ray_router_arm_errors_total"
ARM_LATENCY = "ray_router_arm_latency_seconds"
ARM_COST = "ray_router_arm_cost_usd_total"
ARM_BREAKER = "ray_router_arm_breaker_state"

# Ray Serve's built-in series (ray/serve/_private: deployment_state.py, replica.py, metrics_utils.py).
SERVE_HEALTHY = "ray_serve_deployment_replica_healthy"
SERVE_STARTS = "ray_serve_deployment_replica_starts_total"
SERVE_REQUESTS = "ray_serve_deployment_request_counter_total"
SERVE_ERRORS = "ray_serve_deployment_error_counter_total"
SERVE_LATENCY = "ray_serve_deployment_processing_latency_ms_bucket"


@config_dataclass
class Query:
    expr: Annotated[str, Field(min_length=1)]
    legend: str = ""
    instant: bool = False  # stat / bar gauge panels read one value per series


@config_dataclass
class Panel:
    title: Annotated[str, Field(min_length=1)]
    description: Annotated[str, Field(min_length=1)]
    queries: Annotated[tuple[Query, ...], Field(min_length=1)]
    kind: Literal["timeseries", "stat", "bargauge"] = "timeseries"
    unit: str = "short"
    width: Annotated[int, Field(ge=1, le=24)] = 12  # of Grafana's 24 columns
    height: Annotated[int, Field(ge=1)] = 8
    max: int | float | None = None  # an int stays an int in the JSON
    stack: bool = False


@config_dataclass
class Row:
    title: Annotated[str, Field(min_length=1)]
    panels: tuple[Panel, ...] = ()


PANELS_FILE = Path(__file__).with_name("panels.yaml")


def panels() -> tuple[Row, ...]:
    """The dashboard's rows and panels, top to bottom: ``panels.yaml``, validated field by field."""
    import yaml

    raw = yaml.safe_load(PANELS_FILE.read_text(encoding="utf-8"))
    return tuple(
        parse(Row, {"title": row["title"], "panels": tuple(_panel_spec(p) for p in row["panels"])}, where="panels.yaml")
        for row in raw["rows"]
    )


def _panel_spec(raw: dict[str, Any]) -> Panel:
    queries = tuple(parse(Query, q, where=f"panels.yaml: {raw.get('title')}") for q in raw.get("queries", ()))
    return parse(Panel, {**raw, "queries": queries}, where=f"panels.yaml: {raw.get('title')}")


# ----------------------------------------------------------------------------- JSON model
def _target(q: Query, ref: str) -> dict[str, Any]:
    t: dict[str, Any] = {"refId": ref, "datasource": DATASOURCE, "expr": q.expr, "legendFormat": q.legend or "__auto"}
    if q.instant:
        t.update(instant=True, range=False, format="time_series")
    else:
        t.update(instant=False, range=True)
    return t


def _panel(p: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": p.unit, "min": 0}
    if p.max is not None:
        defaults["max"] = p.max
    out: dict[str, Any] = {
        "id": pid,
        "type": p.kind,
        "title": p.title,
        "description": p.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y},
        "targets": [_target(q, chr(ord("A") + i)) for i, q in enumerate(p.queries)],
        "fieldConfig": {"defaults": defaults, "overrides": []},
    }
    if p.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10,
            "showPoints": "never",
            "stacking": {"mode": "normal" if p.stack else "none", "group": "A"},
        }
        out["options"] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    else:
        out["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "orientation": "horizontal" if p.kind == "bargauge" else "auto",
        }
        if p.kind == "stat":
            out["options"].update(colorMode="value", graphMode="none", textMode="auto")
    return out


def _templating() -> dict[str, Any]:
    app_query = f"label_values({SERVE_HEALTHY}, application)"
    return {
        "list": [
            {
                "name": "datasource",
                "label": "Prometheus",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
                "hide": 0,
                "refresh": 1,
                "regex": "",
                "options": [],
            },
            {
                "name": "application",
                "label": "Serve application",
                "type": "query",
                "datasource": DATASOURCE,
                "query": {"query": app_query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
                "definition": app_query,
                "refresh": 2,
                "sort": 1,
                "includeAll": False,
                "multi": False,
                "current": {"selected": True, "text": "ray-router", "value": "ray-router"},
                "hide": 0,
                "options": [],
                "regex": "",
            },
        ]
    }


def build_dashboard() -> dict[str, Any]:
    """The dashboard model (what Grafana stores; ``id`` is left out, ``uid`` is fixed)."""
    out: list[dict[str, Any]] = []
    pid, y = 1, 0
    for row in panels():
        out.append(
            {
                "id": pid,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid, y = pid + 1, y + 1
        x, row_h = 0, 0
        for p in row.panels:
            if x + p.width > 24:
                x, y, row_h = 0, y + row_h, 0
            out.append(_panel(p, pid, x, y))
            pid, x, row_h = pid + 1, x + p.width, max(row_h, p.height)
        y += row_h
    return {
        "uid": DASHBOARD_UID,
        "title": TITLE,
        "description": "ray-router on Ray Serve: routes per arm, feedback and win rates, route latency, "
        "posterior refresh, feedback-log growth, per-arm upstream calls (errors, retries, fallbacks, latency, "
        "tokens, spend, circuit breakers), Serve replica health.",
        "tags": ["ray-router", "ray-serve"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,  # shared crosshair
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "annotations": {"list": []},
        "templating": _templating(),
        "panels": out,
    }


def dashboard_json(dashboard: dict[str, Any] | None = None) -> str:
    """Stable JSON text (sorted keys, two-space indent, trailing newline) for files and ConfigMaps."""
    return json.dumps(dashboard if dashboard is not None else build_dashboard(), indent=2, sort_keys=True) + "\n"


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref_id: str
    expr: str

    @property
    def own(self) -> bool:
        """Whether the query reads only the app's own ``ray_router_*`` series."""
        names = set(re.findall(r"\b(ray_[a-z0-9_]+)", self.expr))
        return bool(names) and all(n.startswith("ray_router_") for n in names)


def queries(dashboard: dict[str, Any] | None = None) -> Iterator[PanelQuery]:
    """Every PromQL expression of a dashboard (its panels' targets and its query variables)."""
    dashboard = dashboard if dashboard is not None else build_dashboard()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield PanelQuery(panel["title"], target["refId"], target["expr"])
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            yield PanelQuery(f"variable ${var['name']}", "var", var["definition"])


_BUILTINS = ("$__rate_interval", "$__range", "$__interval")


def substitute(expr: str, interval: str = "1m", application: str = "ray-router") -> str:
    """What Grafana sends to Prometheus: built-ins and dashboard variables replaced by values.

    ``label_values(metric, label)`` (a Grafana variable function, not PromQL) becomes the series
    selector it queries."""
    for name in _BUILTINS:
        expr = expr.replace(name, interval)
    expr = expr.replace("$application", application)
    m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", expr)
    return m.group(1) if m else expr
