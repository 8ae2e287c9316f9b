"""k8s/: what makes the KubeRay deployment operate, checked on the kustomize output without a cluster.

- worker readiness with ``proxy_location: HeadOnly`` (KubeRay issue 4994) and a Serve Service whose
  endpoints are only pods with an HTTP proxy;
- upgrades: ``NewCluster``, with what the single-writer hand-off needs (k8s/README.md "Upgrades");
- required, separate Secrets; none in the sweep;
- the Posterior placed only where its custom resource is offered (never the head);
- the NetworkPolicies, evaluated on a model of the namespace's pods (who may reach which port);
- Ray's token authentication; the GCS fault-tolerance overlay; KubeRay's own spec validation rules.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import yaml

from tests.k8s import kube

SERVICE_BUILDS = kube.SERVICE_BUILDS
NAMESPACE = "ray-router"
# The app's credentials: env var -> (Secret, key). The names must match the app's (auth.*_env).
CREDENTIALS = {
    "RAY_ROUTER_TOKEN": ("ray-router-feedback-token", "token"),
    "RAY_ROUTER_ADMIN_TOKEN": ("ray-router-admin-token", "token"),
    "RAY_ROUTER_CLIENT_KEY": ("ray-router-client-key", "key"),
    "RAY_ROUTER_HMAC_KEY": ("ray-router-hmac-key", "key"),
}
RAY_AUTH_SECRET = "ray-router-ray-auth"


def one(build: str, kind: str) -> dict:
    found = [d for d in kube.kustomize(build) if d["kind"] == kind]
    assert len(found) == 1, f"{build}: {len(found)} {kind}"
    return found[0]


def serve_config(build: str) -> dict:
    return yaml.safe_load(one(build, "RayService")["spec"]["serveConfigV2"])


def app_of(cfg: dict) -> dict:
    (app,) = [a for a in cfg["applications"] if a["name"] == "ray-router"]
    return app


def ray_container(template: dict) -> dict:
    return template["spec"]["containers"][0]  # KubeRay's Ray container is the first


# ------------------------------------------------------------------------- readiness
def worker_readiness_errors(service: dict) -> list[str]:
    """Why the worker pods of this RayService would not become Ready, or would get HTTP traffic."""
    errors = []
    cfg = yaml.safe_load(service["spec"]["serveConfigV2"])
    head_only = cfg.get("proxy_location", "EveryNode") == "HeadOnly"
    cluster = kube.cluster_of(service)
    for group in cluster["workerGroupSpecs"]:
        c = ray_container(group["template"])
        probe = c.get("readinessProbe")
        ports = {p.get("name") for p in c.get("ports", [])}
        if head_only and probe is None:
            errors.append(f"{group['groupName']}: no readinessProbe, KubeRay's default asks the (absent) Serve proxy")
        if probe is not None:
            get = probe.get("httpGet") or {}
            agent = int(group.get("rayStartParams", {}).get("dashboard-agent-listen-port", 52365))
            if (get.get("path"), get.get("port")) != ("/api/healthz", agent):
                errors.append(f"{group['groupName']}: readinessProbe {probe} is not the raylet health check")
        if head_only and "serve" in ports:
            errors.append(f"{group['groupName']}: declares a `serve` port but runs no proxy (HeadOnly)")
    return errors


@pytest.mark.parametrize("build", SERVICE_BUILDS)
def test_workers_become_ready_without_a_serve_proxy(build):
    """HeadOnly: no proxy on the workers, so their readiness is the raylet's health (what KubeRay
    checks for liveness), not KubeRay's RayService default, which also asks the local proxy."""
    service = one(build, "RayService")
    assert serve_config(build)["proxy_location"] == "HeadOnly"
    assert worker_readiness_errors(service) == []
    head = ray_container(kube.cluster_of(service)["headGroupSpec"]["template"])
    assert "readinessProbe" not in head, "the head keeps KubeRay's probe (raylet + GCS)"


def test_the_readiness_check_catches_the_kuberay_default():
    service = copy.deepcopy(one("base", "RayService"))
    for group in kube.cluster_of(service)["workerGroupSpecs"]:
        del ray_container(group["template"])["readinessProbe"]
    assert len(worker_readiness_errors(service)) == 2
    ray_container(kube.cluster_of(service)["workerGroupSpecs"][0]["template"])["readinessProbe"] = {
        "httpGet": {"path": "/-/healthz", "port": 8000}
    }
    assert any("not the raylet health check" in e for e in worker_readiness_errors(service))


def test_the_probed_endpoint_is_rays_public_health_check():
    """The probe's path is served by Ray's dashboard agent on its default port, without the token."""
    from ray._private import ray_constants
    from ray.dashboard import http_server_agent
    from ray.dashboard.modules.reporter import healthz_agent

    assert ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT == 52365
    assert "/api/healthz" in http_server_agent.PUBLIC_EXACT_PATHS  # no auth under RAY_AUTH_MODE=token
    assert '@routes.get("/api/healthz")' in inspect.getsource(healthz_agent)


def serve_endpoints(service: dict) -> list[str]:
    """The node groups whose Ready pods the Serve Service would send traffic to (ray.io/serve=true is
    on every worker and on a head with a healthy proxy): a named targetPort keeps only pods that
    declare a container port of that name, as Kubernetes' EndpointSlice controller does."""
    spec = service["spec"]
    ports = spec.get("serveService", {}).get("spec", {}).get("ports") or [{"name": "serve", "port": 8000}]
    out = []
    for where, template in kube.pod_templates(service):
        if where == "head" and spec.get("excludeHeadPodFromServeSvc"):
            continue
        declared = {p.get("name"): p["containerPort"] for p in ray_container(template).get("ports", [])}
        for port in ports:
            target = port.get("targetPort", port["port"])
            if (target in declared) if isinstance(target, str) else True:
                out.append(where)
    return out


@pytest.mark.parametrize("build", SERVICE_BUILDS)
def test_only_the_head_with_its_proxy_is_a_serve_endpoint(build):
    service = one(build, "RayService")
    assert serve_endpoints(service) == ["head"]
    assert service["spec"]["serveService"]["metadata"]["name"] == "ray-router-serve-svc"
    # the mutation the named targetPort guards against: a numeric target lets Ready workers in
    bad = copy.deepcopy(service)
    bad["spec"]["serveService"]["spec"]["ports"][0]["targetPort"] = 8000
    assert len(serve_endpoints(bad)) == len(list(kube.pod_templates(service))) > 1


# --------------------------------------------------------------------------- upgrades
@pytest.mark.parametrize("build", SERVICE_BUILDS)
def test_upgrades_start_a_new_cluster_that_shares_state_and_keys(build):
    """An image bump rolls out as a new cluster (k8s/README.md "Upgrades"). The hand-off works
    because both clusters mount the same volume (the Posterior's lock and log), verify each other's
    decision ids (the HMAC key comes from a Secret, not generated per cluster) and share the Ray
    token Secret; one Posterior replica keeps one writer."""
    service = one(build, "RayService")
    spec = service["spec"]
    assert spec["upgradeStrategy"]["type"] == "NewCluster"
    assert 0 < spec["rayClusterDeletionDelaySeconds"] <= 600
    cluster = kube.cluster_of(service)
    assert cluster["authOptions"]["secretName"] == RAY_AUTH_SECRET
    for where, template in kube.pod_templates(service):
        env = {e["name"]: e for e in ray_container(template)["env"]}
        assert env["RAY_ROUTER_HMAC_KEY"]["valueFrom"]["secretKeyRef"]["name"] == CREDENTIALS["RAY_ROUTER_HMAC_KEY"][0]
        claims = {
            v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["volumes"] if "persistentVolumeClaim" in v
        }
        assert claims == {"ray-router-state"}, where
    posterior = [d for d in app_of(serve_config(build))["deployments"] if d["name"] == "Posterior"]
    assert posterior[0]["num_replicas"] == 1


# ---------------------------------------------------------------------------- Secrets
def secret_errors(template: dict) -> list[str]:
    """Secret references of a pod template that a missing Secret would not stop."""
    errors = []
    for c in template["spec"]["containers"] + template["spec"].get("initContainers", []):
        for e in c.get("env", []):
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref is not None and ref.get("optional", False):
                errors.append(f"{c['name']}: {e['name']} from an optional Secret")
        for src in c.get("envFrom", []):
            if (src.get("secretRef") or {}).get("optional", False):
                errors.append(f"{c['name']}: envFrom an optional Secret")
    for v in template["spec"].get("volumes", []):
        if (v.get("secret") or {}).get("optional", False):
            errors.append(f"volume {v['name']}: optional Secret")
    return errors


@pytest.mark.parametrize("build", SERVICE_BUILDS)
def test_every_credential_comes_from_its_own_required_secret(build):
    service = one(build, "RayService")
    auth = app_of(serve_config(build))["args"]["auth"]
    read_by_app = {v for k, v in auth.items() if k.endswith("_env")}  # the env vars the app reads
    read_by_app |= {c["key_env"] for c in auth.get("clients", [])}  # each client's key
    for where, template in kube.pod_templates(service):
        assert secret_errors(template) == [], where
        env = {e["name"]: e for e in ray_container(template)["env"]}
        for name, (secret, key) in CREDENTIALS.items():
            assert env[name]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": key}, (where, name)
        for name in read_by_app:
            assert "secretKeyRef" in env[name]["valueFrom"], f"{where}: the app reads {name}: from a Secret"
    assert len({s for s, _ in CREDENTIALS.values()}) == len(CREDENTIALS), "one Secret per power"
    bad = copy.deepcopy(kube.cluster_of(service)["headGroupSpec"]["template"])
    ray_container(bad)["env"][2]["valueFrom"]["secretKeyRef"]["optional"] = True
    assert secret_errors(bad), "an optional Secret must be caught"


def test_sweep_pods_hold_no_serving_credential():
    job = one("sweep", "RayJob")
    serving = {s for s, _ in CREDENTIALS.values()} | {RAY_AUTH_SECRET}
    assert "secretName" not in kube.cluster_of(job)["authOptions"], "the sweep gets its own generated Ray token"
    for where, template in kube.pod_templates(job):
        for c in template["spec"]["containers"]:
            for e in c.get("env", []):
                assert "valueFrom" not in e, f"{where}: {e['name']} comes from a Secret or field"
                assert e["name"] not in CREDENTIALS, where
            assert "envFrom" not in c
        for v in template["spec"]["volumes"]:
            assert "secret" not in v and "projected" not in v, where
            assert (v.get("persistentVolumeClaim") or {}).get("claimName") != "ray-router-state", where
    assert not serving & set(yaml.safe_dump(job).split()), "a serving Secret's name appears in the RayJob"


# --------------------------------------------------------------------- Posterior pinning
def offered(group: dict) -> dict[str, float]:
    """Custom Ray resources a node group offers (``resources`` map or rayStartParams)."""
    if group.get("resources"):
        return {k: float(v) for k, v in group["resources"].items() if k not in ("cpu", "memory")}
    raw = group.get("rayStartParams", {}).get("resources")
    return yaml.safe_load(raw.strip("'\"")) if raw else {}


@pytest.mark.parametrize("build", SERVICE_BUILDS)
def test_the_posterior_can_only_be_placed_on_a_cpu_worker(build):
    service = one(build, "RayService")
    cluster = kube.cluster_of(service)
    (posterior,) = [d for d in app_of(serve_config(build))["deployments"] if d["name"] == "Posterior"]
    wants = posterior["ray_actor_options"]["resources"]
    assert wants, "the Posterior must ask for a custom resource"
    nodes = {"head": offered(cluster["headGroupSpec"])} | {
        g["groupName"]: offered(g) for g in cluster["workerGroupSpecs"]
    }
    fits = [name for name, res in nodes.items() if all(res.get(k, 0) >= v for k, v in wants.items())]
    assert fits == ["cpu"], fits
    assert posterior["ray_actor_options"]["num_cpus"] == 0
    # The local configs must not ask for it: a laptop's Ray offers no such resource.
    from ray_router.serve import launch

    for name in ("gpu.yaml", "local.yaml"):
        local = launch.load_serve_config(kube.REPO / "serve_configs" / name)
        (p,) = [d for d in app_of(local)["deployments"] if d["name"] == "Posterior"]
        assert "resources" not in p.get("ray_actor_options", {}), name


# ---------------------------------------------------------------------- network policy
# A model of the namespace's pods: labels as KubeRay sets them (ray.io/*) plus the pod templates'.
def _pods() -> list[dict]:
    pods = []
    for build, kind in (("base", "RayService"), ("sweep", "RayJob")):
        doc = one(build, kind)
        for where, template in kube.pod_templates(doc):
            labels = dict(template["metadata"]["labels"])
            labels |= {"ray.io/is-ray-node": "yes", "ray.io/node-type": "head" if where == "head" else "worker"}
            ports = {p["name"]: p["containerPort"] for p in ray_container(template).get("ports", [])}
            pods.append({"name": f"{kind}:{where}", "namespace": NAMESPACE, "labels": labels, "ports": ports})
    pods += [
        {"name": "submitter", "namespace": NAMESPACE, "labels": {"batch.kubernetes.io/job-name": "ray-router-sweep"}},
        {"name": "other-pod", "namespace": NAMESPACE, "labels": {"app": "something"}},
        {"name": "operator", "namespace": "kuberay", "labels": {"app.kubernetes.io/name": "kuberay-operator"}},
        {"name": "prometheus", "namespace": "monitoring", "labels": {"app.kubernetes.io/name": "prometheus"}},
        {"name": "outsider", "namespace": "elsewhere", "labels": {"app": "web"}},
    ]
    return pods


def _matches(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"the model knows matchLabels only: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def allowed(policies: list[dict], src: dict, dst: dict, port: int) -> bool:
    """Kubernetes NetworkPolicy ingress semantics for a TCP connection src -> dst:port."""
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == dst["namespace"]
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and _matches(p["spec"]["podSelector"], dst["labels"])
    ]
    if not selecting:
        return True
    for p in selecting:
        for rule in p["spec"].get("ingress", []):
            peers = rule.get("from")
            peer_ok = peers is None or any(_peer(peer, p["metadata"]["namespace"], src) for peer in peers)
            ports = rule.get("ports")
            port_ok = ports is None or any(_port(q, dst, port) for q in ports)
            if peer_ok and port_ok:
                return True
    return False


def _peer(peer: dict, policy_ns: str, src: dict) -> bool:
    assert "ipBlock" not in peer
    ns_ok = policy_ns == src["namespace"] if "namespaceSelector" not in peer else True  # {} = every namespace
    if "namespaceSelector" in peer:
        assert peer["namespaceSelector"] == {}, "the model knows namespaceSelector: {} only"
    pod_ok = _matches(peer["podSelector"], src["labels"]) if "podSelector" in peer else True
    return ns_ok and pod_ok


def _port(q: dict, dst: dict, port: int) -> bool:
    assert q.get("protocol", "TCP") == "TCP" and "endPort" not in q
    want = q.get("port")
    if want is None:
        return True
    if isinstance(want, str):
        return dst.get("ports", {}).get(want) == port
    return want == port


def network_policies() -> list[dict]:
    return [d for b in ("base", "sweep") for d in kube.kustomize(b) if d["kind"] == "NetworkPolicy"]


# (source, destination, port) -> allowed. Ray's ports: GCS 6379, dashboard 8265, client 10001,
# dashboard agent 52365, a raylet/worker port 10002; Serve 8000; metrics 8080.
EXPECTED = [
    ("outsider", "RayService:head", 8000, True),  # the one door
    ("other-pod", "RayService:head", 8000, True),
    *[("outsider", "RayService:head", p, False) for p in (6379, 8265, 10001, 52365, 10002, 8080)],
    *[("outsider", "RayService:worker:cpu", p, False) for p in (8000, 10002, 52365, 30000)],
    *[("other-pod", "RayService:worker:cpu", p, False) for p in (10002, 6379)],
    *[("RayService:worker:cpu", "RayService:head", p, True) for p in (6379, 8265, 10002)],
    *[("RayService:head", "RayService:worker:gpu", p, True) for p in (10002, 30000, 52365)],
    ("RayService:worker:gpu", "RayService:worker:cpu", 30000, True),  # Serve's direct ingress / gRPC
    *[("RayJob:worker:cpu", "RayService:head", p, False) for p in (6379, 8265, 10002)],  # sweep -/-> service
    *[("RayService:worker:cpu", "RayJob:head", p, False) for p in (6379, 8265)],
    ("RayJob:worker:cpu", "RayJob:head", 6379, True),
    ("operator", "RayService:head", 8265, True),
    ("operator", "RayService:head", 6379, False),
    ("operator", "RayService:worker:cpu", 8265, False),
    ("operator", "RayJob:head", 8265, True),
    ("submitter", "RayJob:head", 8265, True),
    ("submitter", "RayService:head", 8265, False),
    ("submitter", "RayJob:head", 6379, False),
    *[("prometheus", dst, 8080, True) for dst in ("RayService:head", "RayService:worker:gpu", "RayJob:worker:cpu")],
    ("prometheus", "RayService:head", 8265, False),
    ("outsider", "RayJob:head", 8080, False),
    ("outsider", "other-pod", 80, False),  # default deny for the whole namespace
]


def test_network_policies_open_only_the_serve_port_to_the_outside():
    policies, pods = network_policies(), {p["name"]: p for p in _pods()}
    wrong = [
        f"{src} -> {dst}:{port}: {'allowed' if not want else 'denied'}"
        for src, dst, port, want in EXPECTED
        if allowed(policies, pods[src], pods[dst], port) != want
    ]
    assert not wrong, "\n".join(wrong)


def test_the_network_model_sees_a_missing_default_deny():
    policies = [p for p in network_policies() if p["metadata"]["name"] != "ray-router-default-deny"]
    pods = {p["name"]: p for p in _pods()}
    assert allowed(policies, pods["outsider"], pods["other-pod"], 80)
    wide = copy.deepcopy(network_policies())
    for p in wide:
        if p["metadata"]["name"] == "ray-router-serve-http":
            del p["spec"]["ingress"][0]["ports"]
    assert allowed(wide, pods["outsider"], pods["RayService:head"], 6379)


# --------------------------------------------------------------------------- Ray auth
@pytest.mark.parametrize("build", (*SERVICE_BUILDS, "sweep"))
def test_ray_token_authentication_is_on(build):
    from packaging.version import Version

    doc = one(build, "RayJob" if build == "sweep" else "RayService")
    cluster = kube.cluster_of(doc)
    assert cluster["authOptions"]["mode"] == "token"
    assert not cluster["authOptions"].get("enableK8sTokenAuth"), "KubeRay: not supported for RayService/RayJob"
    assert Version(cluster["rayVersion"]) >= Version("2.52.0"), "KubeRay: token auth needs Ray >= 2.52"
    for where, template in kube.pod_templates(doc):
        env = {e["name"]: e.get("value") for e in ray_container(template)["env"]}
        assert env["RAY_AUTH_MODE"] == "token", where  # never ray-router's local default, disabled


# ------------------------------------------------------------------- GCS fault tolerance
def test_gcs_fault_tolerance_overlay_adds_only_the_redis_store():
    ft, gpu = one("gcs-ft", "RayService"), one("gpu", "RayService")
    options = kube.cluster_of(ft)["gcsFaultToleranceOptions"]
    assert set(options) == {"redisAddress", "redisPassword"}, "no externalStorageNamespace: per-cluster keys"
    host, _, port = options["redisAddress"].rpartition(":")
    assert host and port.isdigit(), options["redisAddress"]
    ref = options["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "ray-router-redis", "key": "password"}, "required Secret, no `optional`"
    rest = copy.deepcopy(ft)
    del kube.cluster_of(rest)["gcsFaultToleranceOptions"]
    assert rest == gpu, "the overlay changes nothing else"


# ------------------------------------------------------------ KubeRay's validation rules
def kuberay_spec_errors(doc: dict) -> list[str]:
    """The rules of KubeRay's ValidateRayClusterSpec / ValidateRayServiceSpec (ray-operator/
    controllers/ray/utils/validation.go, the vendored CRDs' commit) that these manifests touch;
    the operator refuses a spec that breaks one."""
    errors = []
    cluster = kube.cluster_of(doc)
    head = cluster["headGroupSpec"]
    head_env = {e["name"] for e in ray_container(head["template"]).get("env", [])}
    groups = [("head", head)] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    for name, g in groups:
        params = g.get("rayStartParams", {})
        if g.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            errors.append(f"{name}: resources in both rayStartParams and resources")
        if "labels" in params:
            errors.append(f"{name}: rayStartParams['labels'] is not supported")
    for g in cluster.get("workerGroupSpecs", []):
        if not cluster.get("enableInTreeAutoscaling") and ("minReplicas" not in g or "maxReplicas" not in g):
            errors.append(f"{g['groupName']}: minReplicas and maxReplicas are required without autoscaling")
        if g.get("minReplicas", 0) > g.get("maxReplicas", 2**31 - 1):
            errors.append(f"{g['groupName']}: minReplicas > maxReplicas")
    ft = cluster.get("gcsFaultToleranceOptions")
    if ft is None and "RAY_REDIS_ADDRESS" in head_env:
        errors.append("RAY_REDIS_ADDRESS without gcsFaultToleranceOptions")
    if ft is not None:
        if head.get("rayStartParams", {}).get("redis-password") or head_env & {"REDIS_PASSWORD", "RAY_REDIS_ADDRESS"}:
            errors.append("redis settings outside gcsFaultToleranceOptions")
        if doc["metadata"].get("annotations", {}).get("ray.io/ft-enabled"):
            errors.append("ray.io/ft-enabled annotation and gcsFaultToleranceOptions")
        if ft.get("backend", "redis") == "redis" and "storage" in ft:
            errors.append("storage is for the rocksdb backend")
    if cluster.get("upgradeStrategy") is not None:
        errors.append(f"rayClusterConfig.upgradeStrategy (the RayCluster's own) set in a {doc['kind']}")
    if cluster.get("networkPolicy") is not None:
        errors.append("spec.networkPolicy needs the RayClusterNetworkPolicy feature gate (use NetworkPolicy objects)")
    if doc["kind"] == "RayService":
        kind = doc["spec"].get("upgradeStrategy", {}).get("type")
        if kind not in (None, "None", "NewCluster", "NewClusterWithIncrementalUpgrade"):
            errors.append(f"upgradeStrategy.type {kind}")
        if (head.get("headService") or {}).get("metadata", {}).get("name"):
            errors.append("headService.metadata.name must not be set")
    return errors


@pytest.mark.parametrize("build", (*SERVICE_BUILDS, "sweep"))
def test_kuberay_accepts_the_spec(build):
    doc = one(build, "RayJob" if build == "sweep" else "RayService")
    assert kuberay_spec_errors(doc) == []


def test_the_kuberay_rules_catch_mistakes():
    doc = copy.deepcopy(one("gcs-ft", "RayService"))
    cluster = kube.cluster_of(doc)
    cluster["workerGroupSpecs"][0]["rayStartParams"]["num-cpus"] = "4"  # and `resources` is set
    cluster["headGroupSpec"]["rayStartParams"]["redis-password"] = "x"
    doc["spec"]["upgradeStrategy"]["type"] = "Blue-Green"
    assert len(kuberay_spec_errors(doc)) == 3
