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
# an LLM's answer: tens of milliseconds (a cache, a stub) to minutes (a long generation)
ARM_LATENCY_BOUNDARIES_S = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0]
TTFT_BOUNDARIES_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]

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
    # per arm, /v1/chat/completions' calls to the arms' upstreams (ray_router/serve/resilience.py)
    "router_arm_requests": ("counter", ("arm",), "calls to the arm's upstream (each attempt, retries included)"),
    "router_arm_errors": (
        "counter",
        ("arm", "kind"),
        "failed calls by kind (timeout, connect, http_429, http_5xx, http_4xx, bad_body, stream_broken, config), "
        "and breaker_open: requests that offered the arm while its circuit breaker kept it out",
    ),
    "router_arm_retries": ("counter", ("arm",), "calls repeated on the same arm after a retryable failure"),
    "router_arm_fallbacks": ("counter", ("arm",), "requests this arm failed that went on to another arm (fallback)"),
    "router_arm_latency_seconds": ("histogram", ("arm",), "time of an answered call (a stream: until its end)"),
    "router_arm_ttft_seconds": ("histogram", ("arm",), "streams: from the call to the upstream's first event"),
    "router_arm_prompt_tokens": ("counter", ("arm",), "prompt tokens of answered calls (the upstream's usage)"),
    "router_arm_completion_tokens": ("counter", ("arm",), "completion tokens of answered calls (the upstream's usage)"),
    "router_arm_cost_usd": ("counter", ("arm",), "USD of answered calls: usage times the arm's upstream.price"),
    "router_arm_breaker_state": ("gauge", ("arm",), "the arm's circuit breaker: 0 closed, 1 half-open, 2 open"),
}
# the per-arm series that appear only once chat traffic of their kind happened (a fallback, a priced
# arm, a stream): a Ray metric without a recorded value is not exported
TRAFFIC_DEPENDENT = frozenset({"router_arm_fallbacks", "router_arm_cost_usd", "router_arm_ttft_seconds"})


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
        "router_arm_latency_seconds": ARM_LATENCY_BOUNDARIES_S,
        "router_arm_ttft_seconds": TTFT_BOUNDARIES_S,
    }.get(name, REFRESH_BOUNDARIES_S)
    return metrics.Histogram(name, description=desc, boundaries=bounds, tag_keys=tags)


class IngressMetrics:
    def __init__(self) -> None:
        self.routes = _make("router_routes")
        self.route_latency = _make("router_route_latency_seconds")
        self.http_errors = _make("router_http_errors")
        self.arm = ArmMetrics()


class ArmMetrics:
    """Per-arm metrics of the chat path's upstream calls (tag ``arm``; ``kind`` on errors)."""

    def __init__(self) -> None:
        self.requests = _make("router_arm_requests")
        self.errors = _make("router_arm_errors")
        self.retries = _make("router_arm_retries")
        self.fallbacks = _make("router_arm_fallbacks")
        self.latency = _make("router_arm_latency_seconds")
        self.ttft = _make("router_arm_ttft_seconds")
        self.prompt_tokens = _make("router_arm_prompt_tokens")
        self.completion_tokens = _make("router_arm_completion_tokens")
        self.cost = _make("router_arm_cost_usd")
        self.breaker_state = _make("router_arm_breaker_state")


class PosteriorMetrics:
    def __init__(self) -> None:
        self.feedback = _make("router_feedback")
        self.refresh = _make("router_posterior_refresh_seconds")
        self.apply_lag = _make("router_feedback_apply_lag_seconds")
        self.role = _make("router_posterior_role")
        self.log_bytes = _make("router_feedback_log_bytes")
        self.version = _make("router_posterior_version")
