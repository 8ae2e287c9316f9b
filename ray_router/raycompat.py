"""How ray-router starts Ray, and every Ray API it uses beyond Ray's public one: one small adapter.

Ray's private names (``ray.serve._private``, the Serve controller handle, ASHA's per-trial table,
``ray.init``'s underscore arguments) can change in any Ray release without a deprecation. They are
reached only through the functions below, and ``tests/test_raycompat.py`` checks that each still
exists with the shape used here, so a Ray upgrade that moves one fails that test loudly instead of
breaking a sweep or a deployment at run time.

Importing this module does not import Ray (the pure core never needs it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

# Settings every run on these machines needs (RAY_NOTES.md): no usage stats, no token auth, no
# model hub, quiet tokenizers. Set only where unset, so an operator's environment wins.
RAY_ENV_DEFAULTS: dict[str, str] = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

# The private names used below, as (module, attribute path): what tests/test_raycompat.py checks.
PRIVATE_APIS: tuple[tuple[str, str], ...] = (
    ("ray.serve._private.api", "serve_start"),
    ("ray.serve.context", "_get_global_client"),
    ("ray.tune.schedulers", "AsyncHyperBandScheduler"),  # its ``_trial_info`` dict: see asha_forget
    ("ray._private.state", "actors"),
    ("ray.serve._private.controller", "ServeController.get_target_groups"),  # see replica_target_groups
)


def apply_env_defaults(extra: Mapping[str, str] | None = None) -> None:
    """Set :data:`RAY_ENV_DEFAULTS` (and ``extra``) in ``os.environ`` where unset."""
    for k, v in {**RAY_ENV_DEFAULTS, **(extra or {})}.items():
        os.environ.setdefault(k, v)


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    object_store_mb: int | None = 256,
    namespace: str | None = None,
    metrics_export_port: int | None = None,
    temp_dir: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    worker_env: Mapping[str, str] | None = None,
) -> bool:
    """Start (or join) Ray once; True when this call started or joined it, False when it was running.

    ``address`` joins an existing cluster; otherwise a fresh local instance is started, capped at
    ``num_cpus`` (default: every CPU) and a small object store, with no dashboard, so that a test or
    a laptop run never attaches to someone else's ``ray start`` by accident. ``metrics_export_port``
    fixes the port of Ray's Prometheus endpoint (and reports metrics every second). ``worker_env``:
    environment variables the job's workers get when joining a cluster (its raylets were started with
    their own environment, not this process's; a local start's workers inherit this process's)."""
    apply_env_defaults(env)
    import ray

    if ray.is_initialized():
        return False
    common: dict[str, Any] = {"log_to_driver": False}
    if namespace:
        common["namespace"] = namespace
    if address:
        if worker_env:
            common["runtime_env"] = {"env_vars": dict(worker_env)}
        ray.init(address=address, **common)
        return True
    kwargs: dict[str, Any] = dict(
        address="local",
        num_cpus=num_cpus or os.cpu_count() or 1,
        include_dashboard=False,
        object_store_memory=int(object_store_mb or 256) * 2**20,
        **common,
    )
    if metrics_export_port is not None:
        kwargs["_metrics_export_port"] = int(metrics_export_port)
        kwargs["_system_config"] = {"metrics_report_interval_ms": 1000}
    if temp_dir:
        kwargs["_temp_dir"] = str(temp_dir)
    ray.init(**kwargs)
    return True


def serve_start(http_options: dict[str, Any], grpc_options: Any, proxy_location: Any, logging_config: Any) -> Any:
    """Start Serve's controller and proxies (what ``serve run config.yaml`` calls); the controller
    client, whose ``deploy_apps(schema)`` applies a declarative config."""
    from ray.serve._private import api as serve_api

    return serve_api.serve_start(
        http_options=http_options,
        grpc_options=grpc_options,
        proxy_location=proxy_location,
        global_logging_config=logging_config,
    )


def serve_instance_details(timeout_s: float) -> dict[str, Any]:
    """The Serve controller's instance details (the only place that lists each replica's own HTTP
    port under direct ingress)."""
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    if client is None:
        raise RuntimeError("no Serve controller is running")
    controller = client._controller
    return dict(ray.get(controller.get_serve_instance_details.remote(), timeout=timeout_s))


def replica_target_groups(app_name: str, timeout_s: float) -> list[dict[str, Any]]:
    """``app_name``'s target groups as the controller gives them to its proxy manager: with
    Serve's HAProxy on, the Ingress replicas' own servers (which HAProxy forwards to), where the
    instance details list HAProxy itself. Each ``{protocol, app_name, targets: [{ip, port, name}]}``."""
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    if client is None:
        raise RuntimeError("no Serve controller is running")
    groups = ray.get(client._controller.get_target_groups.remote(app_name, True), timeout=timeout_s)
    return [g.model_dump(mode="json") for g in groups]


def asha_knows(scheduler: Any, trial_id: str) -> bool:
    """Whether an :class:`~ray.tune.schedulers.AsyncHyperBandScheduler` has seen ``trial_id``."""
    return trial_id in scheduler._trial_info


def asha_forget(scheduler: Any, trial_id: str) -> None:
    """Drop ``trial_id`` from an ASHA scheduler (Tune has no public call for a removed trial)."""
    scheduler._trial_info.pop(trial_id, None)


def actor_table() -> list[dict[str, Any]]:
    """Every actor the GCS knows, alive or dead: ``{class_name, pid, state, node_id}``. (Ray's public
    state API needs the dashboard, which the local and test clusters here do not run.)"""
    from ray._private import state

    return [
        {"class_name": a["ActorClassName"], "pid": a["Pid"], "state": a["State"], "node_id": a["Address"]["NodeID"]}
        for a in state.actors().values()
    ]
