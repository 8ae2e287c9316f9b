"""Grafana for ray-router: the dashboard as code (:mod:`.dashboard`) and its upload (:mod:`.push`).

A leaf package: nothing in the core imports it, and it imports neither Ray nor the Serve app. The
metric names it queries are the ones ``ray_router.serve.metrics`` exports (a test keeps them in
sync) plus Ray Serve's own ``ray_serve_*`` series.

    ray-router grafana export --out k8s/base/grafana/ray-router-dashboard.json
    GRAFANA_TOKEN=... ray-router grafana push --url https://grafana.example.com
"""

from ray_router.grafana.dashboard import DASHBOARD_UID, build_dashboard, dashboard_json, queries
from ray_router.grafana.push import GrafanaError, push_dashboard

__all__ = ["DASHBOARD_UID", "GrafanaError", "build_dashboard", "dashboard_json", "push_dashboard", "queries"]
