"""Regenerate the Serve configs the RayService embeds from serve_configs/ (run after editing those):

    python k8s/sync_serve_configs.py

Copies serve_configs/gpu.yaml -> k8s/base/serve-config.yaml and serve_configs/local.yaml ->
k8s/overlays/cpu/serve-config.yaml, changing only the lines a cluster needs (marked `k8s:`; see
k8s/README.md). tests/k8s/test_manifests.py checks the result independently of this script.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADER = """\
# The Serve config that the RayService embeds (spec.serveConfigV2, by kustomize's replacement).
# A copy of serve_configs/{name} with the changes a cluster needs, each marked "k8s:" below;
# tests/k8s/test_manifests.py checks that nothing else differs and that Serve's schema accepts it.
# Regenerate with `python k8s/sync_serve_configs.py`. Paths: state.dir and data_dir stay null, so
# the pods' RAY_ROUTER_STATE_DIR (the shared volume) and the image's RAY_ROUTER_DATA_DIR apply.
"""
HOST = (r"(?m)^(  host:) 127\.0\.0\.1\b.*$",
        r"\1 0.0.0.0                     # k8s: the Serve Service reaches the proxy on the pod IP")
GPU = (r"(?m)^(        gpu:) auto\b.*$",
       r"\1 require                  # k8s: GPU pods may join after the app is built; never fall back to CPU")
# The Posterior asks for the custom resource that only the worker groups offer (rayservice.yaml:
# workerGroupSpecs[cpu].resources), so Ray never places it on the head. Its ray_actor_options are the
# last line of its block (the lookahead stops at the next deployment).
POSTERIOR = (r"(?m)^(      - name: Posterior\n(?:        (?!ray_actor_options:).*\n)*        ray_actor_options: "
             r"\{num_cpus: 0)\}.*$",
             r"\1, resources: {posterior_host: 1}}  # k8s: only worker pods offer it: never on the head")
TARGETS = {"gpu.yaml": ("k8s/base/serve-config.yaml", (HOST, GPU, POSTERIOR)),
           "local.yaml": ("k8s/overlays/cpu/serve-config.yaml", (HOST, POSTERIOR))}


def render(name: str) -> str:
    text = (REPO / "serve_configs" / name).read_text(encoding="utf-8")
    for pattern, repl in TARGETS[name][1]:
        text, n = re.subn(pattern, repl, text)
        if n != 1:
            raise SystemExit(f"serve_configs/{name}: expected one line matching {pattern!r}, found {n}")
    return HEADER.format(name=name) + text


def main() -> int:
    for name, (target, _) in TARGETS.items():
        path = REPO / target
        new = render(name)
        if path.read_text(encoding="utf-8") != new:
            path.write_text(new, encoding="utf-8")
            print(f"updated {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
