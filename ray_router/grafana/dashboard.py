"""The ray-router Grafana dashboard, defined as code and generated to Grafana's dashboard JSON.

Every panel queries Prometheus: the app's own metrics (``ray_router_*``, defined in
``ray_router/serve/metrics.py`` and exported by Ray with the ``ray_`` prefix; counters get
``_total``, histograms ``_bucket``/``_sum``/``_count``) and Ray Serve's built-in ``ray_serve_*``
series for replica health. Queries use two Grafana built-ins, ``$__rate_interval`` and ``$__range``,
and two dashboard variables: ``$datasource`` (the Prometheus data source) and ``$application``
(the Serve application, a label that only Serve's own series carry).

Rows, panels and queries are strict frozen dataclasses (a wrong panel kind or width fails when the
dashboard is built); the output is plain dicts, as Grafana's JSON is the stable interface (the same
file is provisioned by the ConfigMap in ``k8s/base/grafana`` and uploaded by
``ray-router grafana push``). ``tests/grafana`` checks every expression with ``promtool`` and runs
each one against a real Prometheus scraping the real app.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field

from ray_router.config import config_dataclass

DASHBOARD_UID = "ray-router"
TITLE = "ray-router: routing, feedback, posterior, Serve health"
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


def _q(expr: str, legend: str = "", instant: bool = False) -> Query:
    return Query(" ".join(expr.split()), legend, instant)


def _quantiles(series: str, by: str = "", legend_suffix: str = "", qs=(0.5, 0.99)) -> tuple[Query, ...]:
    by_clause = f"le, {by}" if by else "le"
    return tuple(
        _q(
            f"histogram_quantile({q}, sum by ({by_clause}) (rate({series}[{RATE}])))",
            f"p{round(q * 100)}{legend_suffix}",
        )
        for q in qs
    )


def _stat(title: str, description: str, expr: str, **options: Any) -> Panel:
    """A small single-value panel of the overview row."""
    return Panel(title, description, (_q(expr, instant=True),), kind="stat", width=4, height=4, **options)


def panels() -> tuple[Row, ...]:
    """The dashboard's rows and panels, top to bottom."""
    return (
        Row(
            "Overview",
            (
                _stat(
                    "Routes (range)",
                    "Arms served by /v1/route and chat completions in the dashboard's time range.",
                    f"sum(increase({ROUTES}[{RANGE}]))",
                ),
                _stat(
                    "Feedback (range)",
                    "Feedback durably recorded in the dashboard's time range.",
                    f"sum(increase({FEEDBACK}[{RANGE}]))",
                ),
                _stat(
                    "First-slot win rate (range)",
                    "Share of duels whose first arm (the one served as `model`) won; ties count half.",
                    f'(sum(increase({FEEDBACK}{{outcome="first"}}[{RANGE}])) '
                    f'+ 0.5 * sum(increase({FEEDBACK}{{outcome="tie"}}[{RANGE}]))) '
                    f"/ sum(increase({FEEDBACK}[{RANGE}]))",
                    unit="percentunit",
                    max=1,
                ),
                _stat(
                    "Posterior version",
                    "Number of posterior refreshes since the state was created.",
                    f"max({POSTERIOR_VERSION})",
                ),
                _stat(
                    "Feedback log",
                    "Size of the append-only feedback log (the source of truth of the posterior).",
                    f"max({LOG_BYTES})",
                    unit="bytes",
                ),
                _stat(
                    "Healthy replicas",
                    "Serve replicas passing their health check, all deployments of the app.",
                    f"sum({SERVE_HEALTHY}{{{APP}}})",
                ),
            ),
        ),
        Row(
            "Routing",
            (
                Panel(
                    "Routes per arm",
                    "Rate at which each arm is served (both slots of a duel, and single routes).",
                    (_q(f"sum by (arm) (rate({ROUTES}[{RATE}]))", "{{arm}}"),),
                    unit="reqps",
                    stack=True,
                ),
                Panel(
                    "Route share per arm (range)",
                    "Each arm's share of the routes in the dashboard's time range.",
                    (
                        _q(
                            f"sum by (arm) (increase({ROUTES}[{RANGE}])) "
                            f"/ ignoring(arm) group_left sum(increase({ROUTES}[{RANGE}]))",
                            "{{arm}}",
                            instant=True,
                        ),
                    ),
                    kind="bargauge",
                    unit="percentunit",
                    max=1,
                ),
                Panel(
                    "Route latency p50 / p99",
                    "Ingress time of a /v1/route request (embed + choose), by mode.",
                    _quantiles(f"{ROUTE_LATENCY}_bucket", by="mode", legend_suffix=" {{mode}}"),
                    unit="s",
                ),
                Panel(
                    "Route requests by mode",
                    "/v1/route requests per second: duels (learning) and single routes.",
                    (_q(f"sum by (mode) (rate({ROUTE_LATENCY}_count[{RATE}]))", "{{mode}}"),),
                    unit="reqps",
                ),
                Panel(
                    "Errors per second",
                    "4xx/5xx answers of the app, by status and error code.",
                    (_q(f"sum by (status, error) (rate({HTTP_ERRORS}[{RATE}]))", "{{status}} {{error}}"),),
                    unit="reqps",
                    width=24,
                ),
            ),
        ),
        Row(
            "Feedback and learning",
            (
                Panel(
                    "Feedback per outcome",
                    "Feedback recorded per second, by outcome of the duel.",
                    (_q(f"sum by (outcome) (rate({FEEDBACK}[{RATE}]))", "{{outcome}}"),),
                    unit="reqps",
                    stack=True,
                ),
                Panel(
                    "Win rates",
                    "Share of each duel outcome over the rate window: `first` is the win rate of the "
                    "served (exploit) arm; `second` that of the exploring arm.",
                    (
                        _q(
                            f"sum by (outcome) (rate({FEEDBACK}[{RATE}])) "
                            f"/ ignoring(outcome) group_left sum(rate({FEEDBACK}[{RATE}]))",
                            "{{outcome}}",
                        ),
                    ),
                    unit="percentunit",
                    max=1,
                ),
                Panel(
                    "Feedback per duel",
                    "Feedback received per duel served (duels are counted by their first slot).",
                    (
                        _q(
                            f'sum(rate({FEEDBACK}[{RATE}])) / sum(rate({ROUTES}{{slot="first"}}[{RATE}]))',
                            "feedback / duel",
                        ),
                    ),
                    unit="percentunit",
                ),
                Panel(
                    "Posterior refresh time p50 / p99",
                    "Time of one background SGLD refresh of the posterior.",
                    _quantiles(f"{REFRESH}_bucket"),
                    unit="s",
                ),
                Panel(
                    "Posterior refreshes per second",
                    "Background refreshes completed per second.",
                    (_q(f"sum(rate({REFRESH}_count[{RATE}]))", "refreshes"),),
                    unit="ops",
                ),
                Panel(
                    "Posterior version over time",
                    "Refreshes since the state was created: flat while feedback arrives means the refresher is stuck.",
                    (_q(f"max({POSTERIOR_VERSION})", "version"),),
                ),
            ),
        ),
        Row(
            "Durability",
            (
                Panel(
                    "Feedback-log size",
                    "Size of the append-only feedback log on the state volume.",
                    (_q(f"max({LOG_BYTES})", "bytes"),),
                    unit="bytes",
                ),
                Panel(
                    "Feedback-log growth",
                    "Growth rate of the feedback log: plan the state volume with it.",
                    (_q(f"max(deriv({LOG_BYTES}[{RATE}]))", "bytes/s"),),
                    unit="Bps",
                ),
            ),
        ),
        Row(
            "Serve replica health",
            (
                Panel(
                    "Healthy replicas per deployment",
                    "Replicas passing Serve's health check.",
                    (_q(f"sum by (deployment) ({SERVE_HEALTHY}{{{APP}}})", "{{deployment}}"),),
                ),
                Panel(
                    "Replica starts (range)",
                    "Replica (re)starts in the range: more than one each means crashes.",
                    (
                        _q(
                            f"sum by (deployment) (increase({SERVE_STARTS}{{{APP}}}[{RANGE}]))",
                            "{{deployment}}",
                            instant=True,
                        ),
                    ),
                    kind="bargauge",
                ),
                Panel(
                    "Requests per deployment",
                    "Requests handled by each deployment's replicas.",
                    (_q(f"sum by (deployment) (rate({SERVE_REQUESTS}{{{APP}}}[{RATE}]))", "{{deployment}}"),),
                    unit="reqps",
                ),
                Panel(
                    "Replica errors per deployment",
                    "Requests that raised inside a replica.",
                    (_q(f"sum by (deployment) (rate({SERVE_ERRORS}{{{APP}}}[{RATE}]))", "{{deployment}}"),),
                    unit="reqps",
                ),
                Panel(
                    "Replica processing latency p99",
                    "Time a replica spends on one request, by deployment.",
                    _quantiles(
                        f"{SERVE_LATENCY}{{{APP}}}", by="deployment", legend_suffix=" {{deployment}}", qs=(0.99,)
                    ),
                    unit="ms",
                    width=24,
                ),
            ),
        ),
    )


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
        "posterior refresh, feedback-log growth, Serve replica health.",
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
