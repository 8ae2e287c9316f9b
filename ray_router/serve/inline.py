"""The query encoder's two paths from the Ingress: a call to the ``Embedder`` deployment, or inline.

``embedder.mode: deployment`` (the default): the Ingress calls the ``Embedder`` deployment through its
handle (:class:`HandleEmbedder`; ``@serve.batch`` windows there, a restarting or saturated embedder a
503 at once). ``embedder.mode: inline``: the Ingress replica holds its own encoder
(:class:`InlineEmbedder`, built from the same ``encoder`` spec, checked against the same arm-table
identity, no embedding cache, length-aware windows, as an Embedder replica) and encodes in-process:
no handle hop (gRPC, the callee's queue, ``@serve.batch``'s task), which cost about 3.5 ms of a
14 ms onnx-int8 route (``serve_configs/README.md``, *Benchmark*).

Batching inline (:class:`MicroBatcher`) keeps ``@serve.batch``'s semantics: the requests that arrive
while a window encodes form the next window (at most ``max_batch_size``; ``batch_wait_timeout_s`` > 0
holds a window open that long for company). The encode runs in one dedicated thread, so the event
loop keeps accepting and parsing requests meanwhile and one window encodes at a time (as one replica).
A window of one query (``embedder.single_on_loop``, default on, local encoders only) encodes on the
event loop's own thread instead: a lone query has no one to overlap with, and the hand-over to the
encoder thread and back costs two thread wake-ups, each slow where idle CPUs halt (a VM's vCPUs).

A remote encoder (``openai:MODEL@URL``) works inline too: the Ingress makes the embeddings call
itself (one request per window); the Embedder deployment's failure mapping applies (502
``embeddings_error`` naming no server, the log has the cause).

Because the Ingress now computes, the builder gives it the embedder's resources (``embedder.num_cpus``
/ GPUs / custom resources) and the Serve config must neither list an ``Embedder`` deployment nor
override the Ingress's CPU request downwards (:func:`check_app_config`; :func:`as_inline` converts a
deployment-mode config).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ray_router.embeddings.openai_encoder import RemoteEncoderError
from ray_router.embeddings.spec import EncoderSpec
from ray_router.errors import ConfigError, RouterError
from ray_router.serve.errors import ServiceUnavailable

logger = logging.getLogger("ray.serve")

EMBEDDER_DEPLOYMENT = "Embedder"
INGRESS_DEPLOYMENT = "Ingress"

# one window's result per caller: (embedding, seconds the window's encode took, window size)
Embedded = tuple[np.ndarray, float, int]


@dataclass(frozen=True)
class InlineEncoderSpec:
    """What an Ingress replica needs to encode in-process (the builder makes it for ``mode: inline``)."""

    encoder: EncoderSpec
    expected_identity: str
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.0
    single_on_loop: bool = True


class MicroBatcher:
    """``@serve.batch`` for one process: callers of :meth:`submit` that arrive while a window encodes
    form the next window (up to ``max_batch_size``); ``encode(texts) -> (n, d)`` runs in one
    dedicated thread, one window at a time, so the event loop stays free. ``wait_s`` > 0 holds a
    window that is not full open that long for more callers (``batch_wait_timeout_s``).

    An exception of ``encode`` goes to every caller of its window; a caller cancelled while it waits
    is dropped from its window. Not thread-safe: one event loop.

    ``single_on_loop``: a window of one encodes on the event loop's thread (no hop to the encoder
    thread and back); the loop is busy for that encode, so requests that arrive meanwhile are read
    once it ends and form the next window, as they would have. Only for an ``encode`` that computes
    (a remote encoder's network call must not block the loop)."""

    def __init__(
        self,
        encode: Callable[[list[str]], np.ndarray],
        max_batch_size: int = 32,
        wait_s: float = 0.0,
        single_on_loop: bool = False,
    ):
        if max_batch_size < 1 or wait_s < 0:
            raise ValueError("max_batch_size >= 1 and wait_s >= 0")
        self._encode = encode
        self.max_batch_size, self.wait_s = int(max_batch_size), float(wait_s)
        self.single_on_loop = bool(single_on_loop)
        self._pending: list[tuple[str, asyncio.Future[Embedded]]] = []
        self._full = asyncio.Event()
        self._running = False
        self._task: asyncio.Task[None] | None = None  # the draining task (held: the loop keeps weak refs)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="inline-encoder")
        self.windows = 0  # windows encoded so far (for tests and stats)
        self.on_loop = 0  # ... of which on the event loop's thread (single_on_loop)
        self.queries = 0  # queries encoded so far
        self.busy_s = 0.0  # seconds spent encoding windows (busy_s / wall time: the encoder's utilisation)

    async def submit(self, text: str) -> Embedded:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Embedded] = loop.create_future()
        self._pending.append((text, fut))
        if len(self._pending) >= self.max_batch_size:
            self._full.set()
        if not self._running:
            self._running = True
            self._task = loop.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                if self.wait_s > 0 and len(self._pending) < self.max_batch_size:
                    self._full.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._full.wait(), self.wait_s)
                window = self._pending[: self.max_batch_size]
                del self._pending[: self.max_batch_size]
                window = [(t, f) for t, f in window if not f.done()]  # a cancelled caller is gone
                if not window:
                    continue
                texts = [t for t, _ in window]
                t0 = time.perf_counter()
                try:
                    if self.single_on_loop and len(texts) == 1:
                        X = self._encode(texts)
                        self.on_loop += 1
                    else:
                        X = await loop.run_in_executor(self._pool, self._encode, texts)
                except Exception as e:  # noqa: BLE001 - every caller of the window gets it
                    for _, f in window:
                        if not f.done():
                            f.set_exception(e)
                    continue
                seconds = time.perf_counter() - t0
                self.windows += 1
                self.queries += len(texts)
                self.busy_s += seconds
                for (_, f), x in zip(window, X):
                    if not f.done():
                        f.set_result((x, seconds, len(window)))
        finally:
            self._running = False

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class InlineEmbedder:
    """The Ingress's own query encoder (``embedder.mode: inline``): built, identity-checked, warmed up
    and calibrated as an ``Embedder`` replica is; :meth:`embed` and :meth:`info` answer as its
    methods do."""

    def __init__(self, spec: InlineEncoderSpec):
        from ray_router.embeddings import get_encoder
        from ray_router.serve.batching import LengthAwareEncoder

        enc = spec.encoder
        self.spec = spec
        self.encoder = get_encoder(enc.name, cache_dir=False, device=enc.device, **enc.encoder_options())
        if self.encoder.identity != spec.expected_identity:
            raise ConfigError(
                f"inline encoder is {self.encoder.identity!r}, the arm table was built with {spec.expected_identity!r}"
            )
        self.encoder.encode(["warm-up"])  # load the model now, not on the first request
        self.batcher = LengthAwareEncoder(self.encoder)
        self.batcher.calibrate()  # the cost model of this replica's threads, before the first request
        self.windows = MicroBatcher(
            self.batcher.encode,
            spec.max_batch_size,
            spec.batch_wait_timeout_s,
            single_on_loop=spec.single_on_loop and not enc.remote,
        )

    async def embed(self, text: str) -> Embedded:
        try:
            return await self.windows.submit(text)
        except RemoteEncoderError as e:  # its message names the server: log it, tell the client less
            logger.error(f"inline encoder: a window failed: {e}")
            raise RemoteEncoderError(
                "the query could not be embedded: the embeddings server failed or refused the request; retry later"
            ) from None
        except RouterError:
            raise
        except Exception as e:  # noqa: BLE001 - as a failed Embedder call: a 503, the log has the cause
            logger.error(f"inline encoder: embed failed: {e!r}")
            raise ServiceUnavailable("embed failed; retry later") from None

    async def info(self) -> dict:
        import dataclasses

        return {
            "mode": "inline",
            "identity": self.encoder.identity,
            "device": str(getattr(self.encoder, "device", "cpu")),
            "torch_threads": int(getattr(self.encoder, "threads", 1)),
            "max_batch_size": self.windows.max_batch_size,
            "batch_wait_timeout_s": self.windows.wait_s,
            "length_aware": self.batcher.length_aware,
            "cost_model": None if self.batcher.cost is None else dataclasses.asdict(self.batcher.cost),
            "windows": self.windows.windows,
            "single_on_loop": self.windows.single_on_loop,
            "windows_on_loop": self.windows.on_loop,
            "queries": self.windows.queries,
            "busy_s": round(self.windows.busy_s, 6),
            "pid": os.getpid(),
            "resources": _assigned_resources(),  # what Ray reserved for this (Ingress) replica
            "model_libraries": [m for m in ("torch", "sentence_transformers", "onnxruntime") if m in sys.modules],
        }

    def close(self) -> None:
        self.windows.close()


def _assigned_resources() -> dict[str, float]:
    """What Ray reserved for this process: an actor's resources (the Ingress replica); {} outside a
    worker (a driver that called ``ray.init``, or no Ray at all), where Ray reserves nothing."""
    import ray

    if not ray.is_initialized():
        return {}
    try:
        return {k: float(v) for k, v in ray.get_runtime_context().get_assigned_resources().items()}
    except AssertionError:  # Ray asserts worker mode: this is a driver
        return {}


class HandleEmbedder:
    """The ``Embedder`` deployment behind its handle (``embedder.mode: deployment``): a route never
    waits on retries (a saturated or restarting embedder is a 503 at once); ``info`` rides out a
    restart for 5 s."""

    def __init__(self, handle: Any):
        self.handle = handle

    async def embed(self, text: str) -> Embedded:
        from ray_router.serve.calls import call

        return await call(self.handle, "embed", text, retry_s=0.0)

    async def info(self) -> dict:
        from ray_router.serve.calls import call

        return {"mode": "deployment", **await call(self.handle, "info", retry_s=5)}

    def close(self) -> None:
        pass


async def embedder_path(embedder: Any) -> InlineEmbedder | HandleEmbedder:
    """The Ingress's encoder path from its constructor argument: an :class:`InlineEncoderSpec`
    (built here, off the event loop: loading and calibrating take seconds) or the Embedder's handle."""
    if isinstance(embedder, InlineEncoderSpec):
        return await asyncio.to_thread(InlineEmbedder, embedder)
    return HandleEmbedder(embedder)


# --------------------------------------------------------------------- the Serve config
def _entries(app: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {str(d.get("name")): d for d in app.get("deployments") or []}


def _inline(app: Mapping[str, Any]) -> bool:
    return ((app.get("args") or {}).get("embedder") or {}).get("mode") == "inline"


def check_app_config(app: Mapping[str, Any]) -> None:
    """A ray-router app of a Serve config with ``embedder.mode: inline`` must not configure an
    ``Embedder`` deployment (there is none: Serve would fail the deploy with "does not exist") nor
    give the Ingress fewer CPUs than ``embedder.num_cpus`` (its ``ray_actor_options`` replace the
    builder's request). Raises :class:`ConfigError` saying what to change."""
    if not _inline(app):
        return
    name = app.get("name")
    entries = _entries(app)
    if EMBEDDER_DEPLOYMENT in entries:
        raise ConfigError(
            f"application {name!r}: embedder.mode: inline encodes in the Ingress, there is no Embedder deployment: "
            "remove its entry from deployments (its batch settings are args.embedder.max_batch_size and "
            "batch_wait_timeout_s)"
        )
    opts = (entries.get(INGRESS_DEPLOYMENT) or {}).get("ray_actor_options")
    if opts is None:
        return
    emb = (app.get("args") or {}).get("embedder") or {}
    fix = (
        "remove that ray_actor_options (the builder then requests args.embedder's CPUs, GPUs and resources) or raise it"
    )
    want = float(emb.get("num_cpus", 1.0))
    have = float(opts.get("num_cpus", 1.0))  # Serve's default for a replica whose options name no num_cpus
    if have < want:
        raise ConfigError(
            f"application {name!r}: embedder.mode: inline encodes in the Ingress, but deployments[Ingress]."
            f"ray_actor_options gives it {have:g} CPUs (embedder.num_cpus: {want:g}); {fix}"
        )
    gpus = float(emb.get("num_gpus", 0.0)) if emb.get("gpu", "auto") != "never" else 0.0
    if gpus > 0 and float(opts.get("num_gpus", 0.0)) <= 0:
        raise ConfigError(
            f"application {name!r}: embedder.mode: inline encodes in the Ingress, but deployments[Ingress]."
            f"ray_actor_options asks no GPU (embedder.num_gpus: {gpus:g}); {fix}"
        )


def as_inline(cfg: Mapping[str, Any], apps: Sequence[str] | None = None) -> dict[str, Any]:
    """A copy of a Serve config with its ray-router apps (or those named in ``apps``) switched to
    ``embedder.mode: inline``: the ``Embedder`` deployment's entry is removed (its ``user_config``
    batch settings move into ``args.embedder``) and so is the Ingress's ``ray_actor_options`` (the
    builder then sizes the Ingress from ``args.embedder``). For the benchmark and tests; a config
    written for inline needs no conversion."""
    from ray_router.serve.launch import our_apps

    out: dict[str, Any] = copy.deepcopy(dict(cfg))
    for app in our_apps(out):
        if apps is not None and app.get("name") not in apps:
            continue
        args = app.setdefault("args", {})
        embedder = dict(args.get("embedder") or {})
        entries = app.get("deployments") or []
        for d in entries:
            if d.get("name") == EMBEDDER_DEPLOYMENT:
                live = d.get("user_config") or {}
                embedder.update({k: live[k] for k in ("max_batch_size", "batch_wait_timeout_s") if k in live})
            if d.get("name") == INGRESS_DEPLOYMENT:
                d.pop("ray_actor_options", None)
        app["deployments"] = [d for d in entries if d.get("name") != EMBEDDER_DEPLOYMENT]
        args["embedder"] = {**embedder, "mode": "inline"}
    return out
