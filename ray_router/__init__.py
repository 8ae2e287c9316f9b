"""ray-router: an LLM router that learns from dueling feedback (FGTS.CDB + CCFT).

The core (``ray_router.data``, ``ray_router.embeddings``, ``ray_router.policies``,
``ray_router.evaluation``) is pure Python/numpy/torch and never imports Ray; Ray Serve and
Ray Tune live in ``ray_router.serve`` and ``ray_router.tune``.
"""

__version__ = "0.1.0"

from ray_router.errors import ConfigError, DataError, RouterError

__all__ = ["ConfigError", "DataError", "RouterError", "__version__"]
