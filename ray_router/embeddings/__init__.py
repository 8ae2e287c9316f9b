"""Encoders (query -> unit vector), the embedding cache, and model embeddings a_k (ALGORITHM.md s.3).

Importing this package is cheap: ``torch`` and ``sentence_transformers`` load only when a real
encoder first encodes a text that is not in the cache.
"""

from __future__ import annotations

import os
from pathlib import Path

from ray_router.embeddings.base import Encoder, l2_normalise
from ray_router.embeddings.cache import CachedEncoder, EmbeddingCache, default_cache_dir, text_key
from ray_router.embeddings.ccft import (
    CCFTConfig,
    CCFTResult,
    category_separation,
    ccft_fingerprint,
    fine_tune,
    read_artifact,
    save_artifact,
)
from ray_router.embeddings.lookup import HashEncoder, LookupEncoder
from ray_router.embeddings.model_embeddings import (
    WEIGHTINGS,
    WeightingConfig,
    arm_embeddings,
    category_centroids,
    category_order,
    category_stats,
    category_weights,
    model_embeddings,
    normalise_costs,
    top_tau_mask,
    weighting_scores,
)
from ray_router.embeddings.openai_encoder import OpenAIEncoder, RemoteEncoderError, is_openai_name, remote_encoder
from ray_router.embeddings.options import ENCODER_BACKENDS, EncoderBackend
from ray_router.embeddings.sentence import SentenceTransformerEncoder, packaged_model_path, resolve_device
from ray_router.errors import ConfigError

ENCODER_NAMES = ("minilm", "hash", "lookup")


def get_encoder(
    name: str = "minilm",
    cache_dir: str | os.PathLike[str] | bool | None = None,
    device: str = "auto",
    **options,
) -> Encoder:
    """Build an encoder by name.

    ``name``: ``minilm`` (the packaged all-MiniLM-L6-v2), ``hash``/``lookup`` (the
    :class:`HashEncoder` stand-in; ``options`` may set ``dim`` and ``seed``), the path of a local
    sentence-transformers directory (e.g. a CCFT artifact), or ``openai:MODEL@URL`` (a remote
    OpenAI-compatible ``/embeddings`` server, :mod:`ray_router.embeddings.openai_encoder`; ``device``
    is ignored). Other ``options`` go to the encoder.

    ``options["backend"]``: ``torch`` (default), ``onnx`` or ``onnx-int8`` for a sentence-transformers
    encoder (:mod:`ray_router.embeddings.onnx_backend`); the stand-in has only ``torch`` (it runs no model).

    ``cache_dir``: None = the default cache root, a path = that root, False = no cache. The stand-in
    is cheaper than the cache, so it is cached only when a path is given explicitly.
    """
    if is_openai_name(name):
        return remote_encoder(name, cache_dir, **options)
    backend = options.pop("backend", "torch")
    if backend not in ENCODER_BACKENDS:
        raise ConfigError(f"encoder backend: {backend!r} is not one of {list(ENCODER_BACKENDS)}")
    if name in ("hash", "lookup"):
        if backend != "torch":
            raise ConfigError(f"encoder backend: {backend!r} needs a sentence-transformers model, not {name!r}")
        encoder: Encoder = HashEncoder(**options)
        if cache_dir is None or cache_dir is False:
            return encoder
    elif name == "minilm":
        encoder = SentenceTransformerEncoder(None, device=device, backend=backend, **options)
    elif os.sep in str(name) or Path(str(name)).expanduser().exists():
        encoder = SentenceTransformerEncoder(name, device=device, backend=backend, **options)
    else:
        raise ConfigError(
            f"unknown encoder {name!r}: use one of {list(ENCODER_NAMES)}, the path of a local "
            "sentence-transformers directory, or openai:MODEL@URL (an OpenAI-compatible embeddings server)"
        )
    if cache_dir is False:
        return encoder
    if cache_dir is True:
        cache_dir = None
    return CachedEncoder(encoder, cache_dir)


__all__ = [
    "ENCODER_BACKENDS",
    "ENCODER_NAMES",
    "WEIGHTINGS",
    "CCFTConfig",
    "CCFTResult",
    "CachedEncoder",
    "EmbeddingCache",
    "Encoder",
    "EncoderBackend",
    "HashEncoder",
    "InBatchContrastiveLoss",
    "LookupEncoder",
    "OpenAIEncoder",
    "RemoteEncoderError",
    "SentenceTransformerEncoder",
    "WeightingConfig",
    "arm_embeddings",
    "category_centroids",
    "category_order",
    "category_separation",
    "category_stats",
    "category_weights",
    "ccft_fingerprint",
    "default_cache_dir",
    "fine_tune",
    "get_encoder",
    "l2_normalise",
    "model_embeddings",
    "normalise_costs",
    "packaged_model_path",
    "read_artifact",
    "resolve_device",
    "save_artifact",
    "text_key",
    "top_tau_mask",
    "weighting_scores",
]


def __getattr__(name: str):
    if name == "InBatchContrastiveLoss":  # defined on first use: importing this package stays torch-free
        from ray_router.embeddings import ccft

        return ccft.InBatchContrastiveLoss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
