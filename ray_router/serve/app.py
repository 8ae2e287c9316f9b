"""The Serve application ``ray_router.serve.app:build_app`` (the ``import_path`` of the Serve configs
and the KubeRay manifests).

One file a part:

- :mod:`ray_router.serve.builder`: ``build_app``, the typed builder (arm table, resources, specs, graph);
- :mod:`ray_router.serve.embedder`: the ``Embedder`` deployment (query encoder, batched);
- :mod:`ray_router.serve.posterior`: the ``Posterior`` deployment (the one writer of FGTS.CDB), whose
  body is :mod:`ray_router.serve.posterior_service`;
- :mod:`ray_router.serve.ingress`: the ``Ingress`` deployment (the HTTP routes), deciding routes with
  :mod:`ray_router.serve.decision` and answering errors through :mod:`ray_router.serve.http_errors`.
"""

from ray_router.serve.builder import build_app

__all__ = ["build_app"]
