"""Ray Serve edge of ray-router: embedder replicas, one posterior actor, a FastAPI ingress.

The only package that imports ``ray.serve``. The pure parts (config models, signed decision ids,
the durable journals, the posterior state machine and its service, the route decision, cost-aware
ranking) import neither Ray nor torch and are unit-tested on their own; the Ray parts are the
deployments (:mod:`~ray_router.serve.embedder`, :mod:`~ray_router.serve.posterior`,
:mod:`~ray_router.serve.ingress`), the typed builder ``build_app`` (:mod:`~ray_router.serve.builder`,
re-exported by :mod:`ray_router.serve.app`) and :mod:`ray_router.serve.launch` (start a local
cluster and deploy a Serve config file, as ``ray-router serve`` does).

Serve configs reference the builder by ``import_path: ray_router.serve.app:build_app``.
"""

from ray_router.serve.config import AppArgs

__all__ = ["AppArgs"]
