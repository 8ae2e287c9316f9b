"""The ``Embedder`` deployment: replicas of the query encoder, requests batched by ``@serve.batch``.

Each batch window is encoded length-aware (:mod:`ray_router.serve.batching`): sorted by token count
and split into the sub-batches a cost model fitted on the replica's own threads at start-up says are
cheapest, so a window of mixed queries never pays for padding every query to the longest.

A remote encoder (``encoder.name: openai:MODEL@URL``) loads no model here: each window is one
request to its server (split at its ``max_batch_size``), retried by the encoder; when it still
fails, the callers get a 502 ``embeddings_error`` that names no internals (the log has the cause)."""

import asyncio
import dataclasses
import logging
import os
import sys
import time
from typing import Any

import numpy as np
from ray import serve

from ray_router.embeddings.openai_encoder import RemoteEncoderError
from ray_router.embeddings.spec import EncoderSpec
from ray_router.errors import ConfigError
from ray_router.serve.batching import LengthAwareEncoder

# a replica with nothing to finish stops at once (the posterior's differ: it writes a last snapshot)
QUICK_SHUTDOWN: dict[str, Any] = {"graceful_shutdown_timeout_s": 2, "graceful_shutdown_wait_loop_s": 0.1}
USER_CONFIG_KEYS = ("max_batch_size", "batch_wait_timeout_s")
logger = logging.getLogger("ray.serve")
# requests one replica takes at once (its @serve.batch queues them): at least what the Ingress admits
# (limits.max_inflight_routes, 64) and the batch size; launch.admission_warnings checks a config's
MAX_ONGOING_REQUESTS = 128


@serve.deployment(
    name="Embedder", max_ongoing_requests=MAX_ONGOING_REQUESTS, ray_actor_options={"num_cpus": 1}, **QUICK_SHUTDOWN
)
class Embedder:
    """One replica of the query encoder.

    ``user_config`` (live): ``{"max_batch_size": int, "batch_wait_timeout_s": float}``."""

    def __init__(
        self, encoder: EncoderSpec, expected_identity: str, max_batch_size: int = 32, batch_wait_timeout_s: float = 0.0
    ):
        from ray_router.embeddings import get_encoder

        self.encoder = get_encoder(encoder.name, cache_dir=False, device=encoder.device, **encoder.encoder_options())
        if self.encoder.identity != expected_identity:
            raise ConfigError(
                f"embedder encoder is {self.encoder.identity!r}, the arm table was built with {expected_identity!r}"
            )
        self.encoder.encode(["warm-up"])  # load the model now, not on the first request
        self.batcher = LengthAwareEncoder(self.encoder)
        self.batcher.calibrate()  # the cost model of this replica's threads, before the first request
        self._configure(max_batch_size, batch_wait_timeout_s)

    def _configure(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        # serve.batch's stubs type the wrapper as the plain coroutine function, without its setters
        self.embed.set_max_batch_size(int(max_batch_size))  # type: ignore[attr-defined]
        self.embed.set_batch_wait_timeout_s(float(batch_wait_timeout_s))  # type: ignore[attr-defined]
        self.max_batch_size, self.batch_wait_timeout_s = int(max_batch_size), float(batch_wait_timeout_s)

    def reconfigure(self, user_config: dict) -> None:
        unknown = set(user_config) - set(USER_CONFIG_KEYS)
        if unknown:
            raise ConfigError(f"Embedder user_config: unknown key(s) {sorted(unknown)}")
        self._configure(
            user_config.get("max_batch_size", self.max_batch_size),
            user_config.get("batch_wait_timeout_s", self.batch_wait_timeout_s),
        )

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def embed(self, texts: list[str]) -> list[tuple[np.ndarray, float, int]]:
        """Each text's (embedding, seconds the batch's encode took, batch size), in the callers' order."""
        t0 = time.perf_counter()
        try:
            X = await asyncio.to_thread(self.batcher.encode, texts)
        except RemoteEncoderError as e:  # its message names the server: log it, tell the client less
            logger.error(f"embedder: a window of {len(texts)} queries failed: {e}")
            raise RemoteEncoderError(
                "the query could not be embedded: the embeddings server failed or refused the request; retry later"
            ) from None
        seconds = time.perf_counter() - t0
        return [(x, seconds, len(texts)) for x in X]

    async def info(self) -> dict:
        return {
            "identity": self.encoder.identity,
            "device": str(getattr(self.encoder, "device", "cpu")),
            # intra-op threads of the encoder in use: torch's, or the onnxruntime session's (onnx backends)
            "torch_threads": int(getattr(self.encoder, "threads", 1)),
            "max_batch_size": self.max_batch_size,
            "batch_wait_timeout_s": self.batch_wait_timeout_s,
            "length_aware": self.batcher.length_aware,
            "cost_model": None if self.batcher.cost is None else dataclasses.asdict(self.batcher.cost),
            "pid": os.getpid(),
            # model libraries this replica has imported (none for a remote encoder)
            "model_libraries": [m for m in ("torch", "sentence_transformers", "onnxruntime") if m in sys.modules],
        }
