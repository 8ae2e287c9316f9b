"""Ray custom metrics of the service (``ray.util.metrics``), exported on Ray's Prometheus endpoint.

Ray prefixes every custom metric with ``ray_``, and Prometheus adds ``_total`` to counters and
``_bucket``/``_sum``/``_count`` to histograms. The exported names are listed (and kept in sync by
a test) in ``serve_configs/README.md``.
"""

from __future__ import annotations

from ray.util import metrics

LATENCY_BOUNDARIES_S = [0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]
REFRESH_BOUNDARIES_S = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0]
# apply lag: one refresh plus the wait for the one running when the record was acknowledged, and more
# under load; finite buckets up to 30 s so that the alert's 2 s and a stuck refresher both read
APPLY_LAG_BOUNDARIES_S = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]

# name -> (kind, tag keys, description); the single source of the README table's test.
METRICS = {
    "router_routes": ("counter", ("arm", "slot"), "arms served by /v1/route and chat: slot is first, second or single"),
    "router_route_latency_seconds": ("histogram", ("mode",), "ingress time of a /v1/route request (embed + choose)"),
    "router_http_errors": ("counter", ("status", "error"), "4xx/5xx answers by status code and error code"),
    "router_feedback": ("counter", ("outcome",), "feedback durably recorded, by outcome first/second/tie"),
    "router_posterior_refresh_seconds": ("histogram", (), "time of one background SGLD refresh of the posterior"),
    "router_feedback_apply_lag_seconds": (
        "histogram",
        (),
        "per feedback: from its durable acknowledgement (log fsync) to the publication of samples that include it",
    ),
    "router_feedback_log_bytes": ("gauge", (), "bytes of the live feedback-log segments (drops at compaction)"),
    "router_posterior_version": ("gauge", (), "posterior version (number of refreshes)"),
    "router_posterior_role": ("gauge", ("role",), "1 for the posterior's role (writer or standby), 0 for the other"),
}


def exported_names() -> dict[str, str]:
    """Prometheus series name of each metric as Ray exports it."""
    suffix = {"counter": "_total", "histogram": "_bucket", "gauge": ""}
    return {name: f"ray_{name}{suffix[kind]}" for name, (kind, _, _) in METRICS.items()}


def _make(name: str):
    kind, tags, desc = METRICS[name]
    if kind == "counter":
        return metrics.Counter(name, description=desc, tag_keys=tags)
    if kind == "gauge":
        return metrics.Gauge(name, description=desc, tag_keys=tags)
    bounds = {
        "router_route_latency_seconds": LATENCY_BOUNDARIES_S,
        "router_feedback_apply_lag_seconds": APPLY_LAG_BOUNDARIES_S,
    }.get(name, REFRESH_BOUNDARIES_S)
    return metrics.Histogram(name, description=desc, boundaries=bounds, tag_keys=tags)


class IngressMetrics:
    def __init__(self) -> None:
        self.routes = _make("router_routes")
        self.route_latency = _make("router_route_latency_seconds")
        self.http_errors = _make("router_http_errors")


class PosteriorMetrics:
    def __init__(self) -> None:
        self.feedback = _make("router_feedback")
        self.refresh = _make("router_posterior_refresh_seconds")
        self.apply_lag = _make("router_feedback_apply_lag_seconds")
        self.role = _make("router_posterior_role")
        self.log_bytes = _make("router_feedback_log_bytes")
        self.version = _make("router_posterior_version")
