"""The Serve application: ``Embedder`` replicas, one ``Posterior``, a FastAPI ``Ingress``.

``build_app(args: AppArgs) -> Application`` is the typed builder that ``serve_configs/*.yaml``
reference (``import_path: ray_router.serve.app:build_app``). It resolves the arm table (file or
dataset offline split), sizes the embedder (GPU with a CPU fallback) and binds the graph::

    HTTP -> Ingress --embed--> Embedder (N replicas, @serve.batch)
               |  \\--feedback--> Posterior (1 replica: the only writer of FGTS.CDB)
               \\---- long-poll: new posterior samples after each background refresh

A route costs one embedding call; the ingress then chooses arms from its copy of the current
posterior samples and signs the decision (context included) into the decision id.

Endpoint contract: ``serve_configs/README.md``.

No ``from __future__ import annotations`` here: FastAPI must see real annotations (``Request``)
on the ingress methods, which Serve rewrites.
"""

import asyncio
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from ray_router.errors import ConfigError, RouterError, UnknownArmError
from ray_router.serve.config import AppArgs
from ray_router.serve.errors import (
    InvalidRequest,
    MalformedRequest,
    NotADuel,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthorized,
    error_code,
)
from ray_router.serve.ranking import SampleView
from ray_router.serve.schemas import AdminRefreshRequest, ChatRequest, FeedbackRequest, RouteRequest, routing_text
from ray_router.serve.tokens import DecisionClaims, DecisionSigner, check_bearer, new_nonce, quantise, resolve_secret

logger = logging.getLogger("ray.serve")

_RETRYABLE = (RayActorError, DeploymentUnavailableError, BackPressureError)


# =============================================================================== Embedder
@serve.deployment(
    name="Embedder",
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 1},
    graceful_shutdown_timeout_s=2,
    graceful_shutdown_wait_loop_s=0.1,
)
class Embedder:
    """One replica of the query encoder; requests are batched by ``@serve.batch``.

    ``user_config`` (live): ``{"max_batch_size": int, "batch_wait_timeout_s": float}``."""

    def __init__(self, encoder: dict, expected_identity: str, max_batch_size: int = 32, batch_wait_timeout_s: float = 0.0):
        from ray_router.embeddings import get_encoder

        opts = {} if encoder.get("max_seq_length") is None else {"max_seq_length": encoder["max_seq_length"]}
        self.encoder = get_encoder(encoder["name"], cache_dir=False, device=encoder.get("device", "auto"), **opts)
        if self.encoder.identity != expected_identity:
            raise ConfigError(f"embedder encoder is {self.encoder.identity!r}, the arm table was built with {expected_identity!r}")
        self.encoder.encode(["warm-up"])  # load the model now, not on the first request
        self._configure(max_batch_size, batch_wait_timeout_s)

    def _configure(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self.embed.set_max_batch_size(int(max_batch_size))
        self.embed.set_batch_wait_timeout_s(float(batch_wait_timeout_s))
        self.max_batch_size, self.batch_wait_timeout_s = int(max_batch_size), float(batch_wait_timeout_s)

    def reconfigure(self, user_config: dict) -> None:
        unknown = set(user_config) - {"max_batch_size", "batch_wait_timeout_s"}
        if unknown:
            raise ConfigError(f"Embedder user_config: unknown key(s) {sorted(unknown)}")
        self._configure(
            user_config.get("max_batch_size", self.max_batch_size),
            user_config.get("batch_wait_timeout_s", self.batch_wait_timeout_s),
        )

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def embed(self, texts: list[str]) -> list[tuple[np.ndarray, float, int]]:
        """Each text's (embedding, seconds the batch's encode took, batch size)."""
        t0 = time.perf_counter()
        X = await asyncio.to_thread(self.encoder.encode, texts, len(texts))
        seconds = time.perf_counter() - t0
        return [(x, seconds, len(texts)) for x in X]

    async def info(self) -> dict:
        import torch

        return {
            "identity": self.encoder.identity,
            "device": str(getattr(self.encoder, "device", "cpu")),
            "torch_threads": torch.get_num_threads(),
            "max_batch_size": self.max_batch_size,
            "batch_wait_timeout_s": self.batch_wait_timeout_s,
            "pid": os.getpid(),
        }


# ============================================================================== Posterior
@serve.deployment(
    name="Posterior",
    num_replicas=1,
    max_ongoing_requests=1024,
    ray_actor_options={"num_cpus": 0},
    health_check_period_s=2,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=10,
    graceful_shutdown_wait_loop_s=0.1,
)
class Posterior:
    """The one owner and writer of the FGTS.CDB state (see :mod:`ray_router.serve.state`)."""

    async def __init__(self, spec: dict, refresh_min_interval_s: float = 0.02):
        from ray_router.serve.durable import GroupCommitter
        from ray_router.serve.metrics import PosteriorMetrics
        from ray_router.serve.state import PosteriorSpec, PosteriorState

        spec = dict(spec)
        spec["arm_embeddings"] = np.asarray(spec["arm_embeddings"], dtype=np.float64)
        self.state = PosteriorState(PosteriorSpec(**spec))
        self.refresh_min_interval_s = refresh_min_interval_s
        self._mut = ThreadPoolExecutor(1, thread_name_prefix="posterior-mutation")
        self._io = ThreadPoolExecutor(1, thread_name_prefix="feedback-log")
        self._failure: BaseException | None = None
        self._closed = False
        loop = asyncio.get_running_loop()
        report = await loop.run_in_executor(self._mut, self.state.open)
        logger.info(f"posterior opened {self.state.dir}: {report}")
        self.metrics = PosteriorMetrics()
        self._dirty = asyncio.Event()
        self._published = asyncio.Event()  # set (and replaced) whenever new samples are out
        self.epoch = uuid.uuid4().hex  # this posterior instance: a restart is a new epoch
        self._committer = GroupCommitter(self.state.journal, self._io, self._on_durable)
        self._committer.start()
        self._tasks = [loop.create_task(self._refresh_loop()), loop.create_task(self._maintenance_loop())]
        self._publish_gauges()

    # ------------------------------------------------------------------ internals
    def _on_durable(self, records: list[dict]) -> None:
        """Called in log order once a batch is fsynced: queue the updates, wake the refresher."""
        fut = self._mut.submit(self.state.apply, records)
        fut.add_done_callback(self._watch)
        for rec in records:
            self.metrics.feedback.inc(1, tags={"outcome": rec["outcome"]})
        self._dirty.set()

    def _watch(self, fut) -> None:
        exc = fut.exception()
        if exc is not None and self._failure is None:
            self._failure = exc
            logger.error(f"posterior mutation failed: {exc!r}")

    def _refresh_if_needed(self) -> float | None:
        if self.state.pending_updates <= 0:
            return None
        return self.state.refresh()

    async def _refresh_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                seconds = await loop.run_in_executor(self._mut, self._refresh_if_needed)
            except Exception as e:  # noqa: BLE001 - surfaces through check_health
                self._failure = e
                logger.error(f"posterior refresh failed: {e!r}")
                continue
            if seconds is not None:
                self.metrics.refresh.observe(seconds)
                self._publish()
            await asyncio.sleep(self.refresh_min_interval_s)

    def _publish(self) -> None:
        self.metrics.version.set(self.state.version)
        event, self._published = self._published, asyncio.Event()
        event.set()

    async def _maintenance_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            try:
                self.state.prune()
                if self.state.snapshot_due(time.time()):
                    await loop.run_in_executor(self._mut, self.state.take_snapshot)
                self._publish_gauges()
            except Exception as e:  # noqa: BLE001 - retried next second; logged
                logger.error(f"posterior maintenance failed: {e!r}")

    def _publish_gauges(self) -> None:
        self.metrics.log_bytes.set(self.state.journal.size_bytes)
        self.metrics.version.set(self.state.version)

    # -------------------------------------------------------------------- API
    async def samples(self, epoch: str = "", version: int = -1, wait_s: float = 0.0) -> dict:
        """The current samples; if the caller already has them (same epoch and version), wait up to
        ``wait_s`` for the next refresh first (a long poll)."""
        event = self._published  # taken before the version is read: a publish in between still wakes us
        if epoch == self.epoch and version == self.state.version and wait_s > 0:
            try:
                await asyncio.wait_for(event.wait(), wait_s)
            except asyncio.TimeoutError:
                pass
        return {**self.state.view(), "epoch": self.epoch}

    async def feedback(self, claims: DecisionClaims, outcome: str, request_id: str) -> dict:
        nonce = claims.nonce
        res = self.state.begin_feedback(claims, outcome, request_id)
        if isinstance(res, tuple):  # this request was recorded before (a retry after a crash)
            return {**res[1], "posterior_version": self.state.version}
        try:
            fut = self._committer.submit(res)
        except BaseException:
            self.state.end_feedback(nonce, None)
            raise
        acks: dict[str, Any] = {}

        def finish(f: asyncio.Future) -> None:
            # runs exactly once, even if the caller is cancelled while the record is written
            ok = not f.cancelled() and f.exception() is None
            acks["ack"] = self.state.end_feedback(nonce, f.result() if ok else None)

        fut.add_done_callback(finish)
        await asyncio.shield(fut)
        if "ack" not in acks:  # callbacks run before awaiters resume; be safe anyway
            await asyncio.sleep(0)
        return {**acks["ack"], "posterior_version": self.state.version}

    async def stats(self) -> dict:
        return self.state.stats()

    async def status(self) -> dict:
        return {
            "pid": os.getpid(),
            "state_dir": str(self.state.dir),
            "recovery": self.state.recovery,
            "last_seq": self.state.journal.last_seq,
            "last_applied_seq": self.state.last_applied_seq,
            "n_updates": int(self.state.policy.n_updates),
            "version": self.state.version,
            "epoch": self.epoch,
            "group_commits": self._committer.n_batches,
        }

    async def version(self) -> int:
        return self.state.version

    async def snapshot_now(self) -> dict:
        path = await asyncio.get_running_loop().run_in_executor(self._mut, self.state.take_snapshot)
        return {"path": str(path), "seq": self.state.snapshot_seq}

    async def refresh_now(self, steps: int | None = None, times: int = 1) -> dict:
        loop = asyncio.get_running_loop()
        for _ in range(times):
            seconds = await loop.run_in_executor(self._mut, self.state.refresh, steps)
            self.metrics.refresh.observe(seconds)
        self._publish()
        return {"version": self.state.version}

    async def check_health(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"posterior failed: {self._failure!r}")
        if not self._committer.alive:
            raise RuntimeError("the feedback log writer stopped")

    def __del__(self) -> None:
        """Serve calls this on a graceful shutdown: a last snapshot, then release the lock."""
        if getattr(self, "_closed", True) or getattr(self, "state", None) is None:
            return
        self._closed = True
        try:
            if self._failure is None and self.state.last_applied_seq > self.state.snapshot_seq:
                self._mut.submit(self.state.take_snapshot).result(timeout=30)
            self.state.close()
        except Exception as e:  # noqa: BLE001 - best effort; the log makes it redundant
            logger.warning(f"posterior shutdown snapshot failed: {e!r}")


# ================================================================================ Ingress
api = FastAPI(title="ray-router", docs_url=None, redoc_url=None, openapi_url="/openapi.json")


def _error_response(status: int, code: str, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": code, "message": message, **extra}, status_code=status, headers=headers)


@api.exception_handler(RouterError)
async def _router_error(request: Request, exc: RouterError) -> JSONResponse:
    status = int(getattr(exc, "http_status", 400))
    code = error_code(exc)
    _count_error(request, status, code)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if status == 503:
        headers = {"Retry-After": "1"}
    extra = getattr(exc, "details", None)
    return _error_response(status, code, str(exc), headers, **({"details": extra} if extra else {}))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    _count_error(request, exc.status_code, code)
    return _error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))


def _count_error(request: Request, status: int, code: str) -> None:
    m = getattr(request.app.state, "metrics", None)
    if m is not None:
        m.http_errors.inc(1, tags={"status": str(status), "error": code})


def _validation_message(e: ValidationError) -> tuple[str, list[dict]]:
    details = [{"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")} for err in e.errors()]
    text = "; ".join(f"{'.'.join(map(str, d['loc'])) or 'body'}: {d['msg']}" for d in details)
    return text, details


@serve.deployment(
    name="Ingress",
    max_ongoing_requests=256,
    ray_actor_options={"num_cpus": 0},
    graceful_shutdown_timeout_s=2,
    graceful_shutdown_wait_loop_s=0.1,
)
@serve.ingress(api)
class Ingress:
    """HTTP front: validation, auth, signed decision ids, retries while the posterior restarts."""

    async def __init__(self, embedder: DeploymentHandle, posterior: DeploymentHandle, spec: dict):
        import httpx

        from ray_router.serve.metrics import IngressMetrics

        self.embedder = embedder
        self.posterior = posterior
        self.arm_ids: tuple[str, ...] = tuple(spec["arm_ids"])
        self.arm_index = {a: i for i, a in enumerate(self.arm_ids)}
        self.prices = list(spec["prices"])
        self.upstreams: list[dict | None] = list(spec["upstreams"])
        self.limits = spec["limits"]
        self.auth = spec["auth"]
        self.service = spec["service"]
        secrets_dir = Path(spec["state_dir"]) / "secrets"
        self.token, self.token_source = resolve_secret(self.auth["token_env"], secrets_dir / "token")
        key, self.key_source = resolve_secret(self.auth["hmac_key_env"], secrets_dir / "hmac_key")
        self.signer = DecisionSigner(key, self.arm_ids)
        self.ttl_s = float(self.auth["decision_ttl_s"])
        self.metrics = IngressMetrics()
        api.state.metrics = self.metrics
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(self.service["upstream_timeout_s"], connect=10.0))
        from ray_router.serve.state import make_scorer

        self.view = SampleView(make_scorer(spec["arm_embeddings"], spec["policy_config"], 0, spec.get("offline_prior")),
                               self.prices)
        self.epoch = ""
        self.routes = {"duel": 0, "single": 0}
        await self._pull_samples(wait_s=0.0, retry_s=600.0)
        self._follower = asyncio.get_running_loop().create_task(self._follow_posterior())

    async def _pull_samples(self, wait_s: float, retry_s: float) -> None:
        s = await self._call(self.posterior, "samples", self.epoch, self.view.version, wait_s, retry_s=retry_s)
        self.view.update(s["version"], s["theta"], s["theta_mean"])
        self.epoch = s["epoch"]

    async def _follow_posterior(self) -> None:
        """Keep the sample view current: long-poll the posterior for each new refresh."""
        while True:
            try:
                # short polls: an in-flight poll holds up the posterior's graceful shutdown (and its
                # last snapshot) for at most this long once the ingress is gone
                await self._pull_samples(wait_s=2.0, retry_s=3600.0)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - keep following; routes use the last samples meanwhile
                logger.warning(f"ingress: could not fetch posterior samples: {e!r}")
                await asyncio.sleep(0.5)

    # ---------------------------------------------------------------- helpers
    async def _read(self, request: Request, model: type[BaseModel]) -> Any:
        limit = int(self.limits["max_body_bytes"])
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        if not body.strip():
            raise MalformedRequest("empty body: send a JSON object")
        try:
            return model.model_validate_json(bytes(body))
        except ValidationError as e:
            if any(err.get("type") == "json_invalid" for err in e.errors()):
                raise MalformedRequest(f"body is not valid JSON: {e.errors()[0].get('msg', '')}") from None
            text, details = _validation_message(e)
            err = InvalidRequest(text)
            err.details = details
            raise err from None

    def _require_token(self, request: Request) -> None:
        if not check_bearer(request.headers.get("authorization"), self.token):
            raise Unauthorized("this call needs 'Authorization: Bearer <token>' with the service's token")

    def _reads_allowed(self, request: Request) -> None:
        if self.auth["protect_reads"]:
            self._require_token(request)

    def _check_query(self, text: str) -> str:
        if not text.strip():
            raise InvalidRequest("query is empty")
        if len(text) > int(self.limits["max_query_chars"]):
            raise PayloadTooLarge(f"query has {len(text)} characters; the limit is {self.limits['max_query_chars']}")
        return text

    def _offered(self, candidates: list[str] | None, mode: str, restrict: list[int] | None = None) -> list[int] | None:
        if candidates is None:
            idx = restrict
        else:
            if len(set(candidates)) != len(candidates):
                raise InvalidRequest("candidates: duplicate arm ids")
            idx = []
            for c in candidates:
                if c not in self.arm_index:
                    raise UnknownArmError(f"unknown arm {c!r}; known arms: {list(self.arm_ids)}")
                idx.append(self.arm_index[c])
            if restrict is not None:
                idx = [i for i in idx if i in restrict]
                if not idx:
                    raise InvalidRequest("none of the candidates has an upstream to answer chat completions")
        n = self.n_offered(idx)
        if mode == "duel" and n < 2:
            raise InvalidRequest("duel mode needs at least two candidate arms")
        return idx

    def n_offered(self, idx: list[int] | None) -> int:
        return len(self.arm_ids) if idx is None else len(idx)

    def _cost_weight(self, value: float) -> float:
        v = float(value)
        if not np.isfinite(v) or v < 0 or v > float(self.limits["max_cost_weight"]):
            raise InvalidRequest(f"cost_weight must be a finite number in [0, {self.limits['max_cost_weight']}]")
        return v

    async def _call(self, handle: DeploymentHandle, method: str, *args, retry_s: float | None = None) -> Any:
        """Call a deployment; keep retrying while its replica is dead or restarting."""
        deadline = time.monotonic() + (self.service["posterior_retry_s"] if retry_s is None else retry_s)
        delay = 0.05
        while True:
            try:
                return await getattr(handle, method).remote(*args)
            except RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, RouterError):
                    raise cause from None
                if not isinstance(cause, _RETRYABLE) or time.monotonic() >= deadline:
                    # e.g. the feedback log could not be written: nothing was acknowledged, retry later
                    logger.error(f"{method} failed: {e!r}")
                    raise ServiceUnavailable(f"{method} failed: {type(cause).__name__}: {cause}") from None
            except RouterError:
                raise
            except _RETRYABLE as e:
                if time.monotonic() >= deadline:
                    raise ServiceUnavailable(f"{method}: the service is restarting ({type(e).__name__}); retry") from None
            except RequestCancelledError:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _embed(self, text: str) -> tuple[np.ndarray, float, int]:
        return await self._call(self.embedder, "embed", text)

    async def _decide(self, text: str, offered: list[int] | None, mode: str, cost_weight: float) -> dict:
        t0 = time.perf_counter()
        x, encode_s, batch = await self._embed(text)
        x = quantise(x)  # the decision id carries float16; rank on exactly that
        t1 = time.perf_counter()
        first, second, version = self.view.choose(x, offered, mode, cost_weight)
        expires = int(time.time() + self.ttl_s)
        decision_id = self.signer.issue(new_nonce(), expires, mode, first, second, offered, x if mode == "duel" else None)
        picked = [first] if mode == "single" else [first, second]
        slots = ["single"] if mode == "single" else ["first", "second"]
        for a, slot in zip(picked, slots):
            self.metrics.routes.inc(1, tags={"arm": self.arm_ids[a], "slot": slot})
        self.routes[mode] += 1
        # Server-Timing: the embedder call as the ingress saw it, the encode inside it (its batch's),
        # and the choice; the route handler adds its total ("app")
        timing = (f"embed;dur={(t1 - t0) * 1000:.2f}, encode;dur={encode_s * 1000:.2f};desc=\"batch of {batch}\", "
                  f"choose;dur={(time.perf_counter() - t1) * 1000:.2f}")
        return {"decision_id": decision_id, "picked": picked, "version": version, "expires_at": expires, "timing": timing}

    # ----------------------------------------------------------------- routes
    @api.post("/v1/route")
    async def route(self, request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        self._reads_allowed(request)
        req: RouteRequest = await self._read(request, RouteRequest)
        text = self._check_query(req.query)
        offered = self._offered(req.candidates, req.mode)
        cost_weight = self._cost_weight(req.cost_weight)
        dec = await self._decide(text, offered, req.mode, cost_weight)
        arms = [self.arm_ids[i] for i in dec["picked"]]
        seconds = time.perf_counter() - t0
        self.metrics.route_latency.observe(seconds, tags={"mode": req.mode})
        return JSONResponse(
            headers={"Server-Timing": f"{dec['timing']}, app;dur={seconds * 1000:.2f}"},
            content={
                "decision_id": dec["decision_id"],
                "mode": req.mode,
                "arms": arms,
                "model": arms[0],
                "cost_weight": cost_weight,
                "posterior_version": dec["version"],
                "expires_at": dec["expires_at"],
            },
        )

    @api.post("/v1/feedback")
    async def feedback(self, request: Request) -> JSONResponse:
        self._require_token(request)
        req: FeedbackRequest = await self._read(request, FeedbackRequest)
        claims = self.signer.verify(req.decision_id, time.time())
        if claims.mode != "duel":
            raise NotADuel("a single-mode decision served one arm; pairwise feedback needs a duel")
        request_id = uuid.uuid4().hex  # idempotency key of this HTTP request across internal retries
        ack = await self._call(self.posterior, "feedback", claims, req.outcome, request_id)
        return JSONResponse({**ack, "decision_id": req.decision_id})

    @api.get("/v1/arms")
    async def arms(self, request: Request) -> JSONResponse:
        self._reads_allowed(request)
        top = max(self.prices) if self.prices and max(self.prices) > 0 else 0.0
        return JSONResponse(
            {
                "arms": [
                    {
                        "id": a,
                        "index": i,
                        "price_usd": self.prices[i],
                        "price_norm": (self.prices[i] / top) if top else 0.0,
                        "upstream_model": None if self.upstreams[i] is None else self.upstreams[i]["model"],
                        "chat": self.upstreams[i] is not None,
                    }
                    for i, a in enumerate(self.arm_ids)
                ]
            }
        )

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        try:
            version = await asyncio.wait_for(self._call(self.posterior, "version", retry_s=0), timeout=2.0)
        except (Exception, asyncio.TimeoutError) as e:  # noqa: BLE001 - any failure means "not ready"
            # routes still work from the last samples; feedback waits for the posterior to come back
            return _error_response(
                503, "unavailable", f"posterior not reachable: {type(e).__name__}", {"Retry-After": "1"},
                status="degraded", routes="ok", feedback="unavailable", samples_version=self.view.version,
            )
        return JSONResponse({"status": "ok", "posterior_version": version, "samples_version": self.view.version})

    @api.get("/v1/stats")
    async def stats(self, request: Request) -> JSONResponse:
        self._reads_allowed(request)
        stats = await self._call(self.posterior, "stats", retry_s=5)
        stats["ingress"] = {"routes": dict(self.routes), "samples_version": self.view.version}
        return JSONResponse(stats)

    # ----------------------------------------------------------------- admin
    @api.post("/v1/admin/snapshot")
    async def admin_snapshot(self, request: Request) -> JSONResponse:
        self._require_token(request)
        return JSONResponse(await self._call(self.posterior, "snapshot_now"))

    @api.post("/v1/admin/refresh")
    async def admin_refresh(self, request: Request) -> JSONResponse:
        self._require_token(request)
        raw = await request.body()
        req = AdminRefreshRequest() if not raw.strip() else await self._read(request, AdminRefreshRequest)
        return JSONResponse(await self._call(self.posterior, "refresh_now", req.steps, req.times))

    @api.get("/v1/admin/status")
    async def admin_status(self, request: Request) -> JSONResponse:
        self._require_token(request)
        status = await self._call(self.posterior, "status", retry_s=5)
        embedder = await self._call(self.embedder, "info", retry_s=5)
        return JSONResponse(
            {"posterior": status, "embedder": embedder, "ingress": {
                "pid": os.getpid(), "token": self.token_source, "hmac_key": self.key_source,
                "samples_version": self.view.version, "samples_epoch": self.epoch}}
        )

    # -------------------------------------------------------- chat completions
    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        self._reads_allowed(request)
        req: ChatRequest = await self._read(request, ChatRequest)
        if req.model != "router":
            raise InvalidRequest(f"model must be 'router' (the router picks the arm), got {req.model!r}")
        opts = req.router
        mode = (opts.mode if opts and opts.mode else None) or self.service["chat_default_mode"]
        if req.stream and mode == "duel":
            raise InvalidRequest("streaming answers one arm: use router.mode 'single' or stream: false")
        text = self._check_query(routing_text(req))
        chat_arms = [i for i, u in enumerate(self.upstreams) if u is not None]
        if not chat_arms:
            raise InvalidRequest("no arm of this router has an upstream configured")
        offered = self._offered(opts.candidates if opts else None, mode, restrict=chat_arms)
        cost_weight = self._cost_weight(opts.cost_weight if opts else 0.0)
        dec = await self._decide(text, offered, mode, cost_weight)
        decision_id = dec["decision_id"]
        body = req.model_dump(exclude_unset=True)  # forward what the client sent, nothing more
        body.pop("router", None)
        picked = dec["picked"]
        ids = [self.arm_ids[i] for i in picked]
        info = {"decision_id": decision_id, "mode": mode, "arms": ids, "posterior_version": dec["version"]}
        headers = {"X-Router-Decision-Id": decision_id, "X-Router-Model": ids[0], "X-Router-Arms": ",".join(ids)}
        from ray_router.serve import upstream as up

        if req.stream:
            resp = await up.open_stream(self.http, self.upstreams[picked[0]], body)
            return StreamingResponse(up.relay_stream(resp, ids[0], info), media_type="text/event-stream", headers=headers)
        answers = await asyncio.gather(*(up.complete(self.http, self.upstreams[i], body) for i in picked))
        out = answers[0]
        out["model"] = ids[0]
        if mode == "duel":
            choices = []
            for slot, (arm, ans) in enumerate(zip(ids, answers)):
                ch = dict(ans["choices"][0]) if ans["choices"] else {}
                ch["index"], ch["model"] = slot, arm
                choices.append(ch)
            out["choices"] = choices
            usage = [a.get("usage") for a in answers if isinstance(a.get("usage"), dict)]
            if usage:
                out["usage"] = {k: sum(u.get(k, 0) for u in usage if isinstance(u.get(k, 0), (int, float)))
                                for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        out["router"] = info
        return JSONResponse(out, headers=headers)


# ================================================================================ builder
def _embedder_resources(args: AppArgs) -> dict:
    spec = args.embedder
    opts: dict[str, Any] = {"num_cpus": spec.num_cpus}
    if spec.gpu == "never" or spec.num_gpus <= 0:
        return opts
    if spec.gpu == "require":
        return {**opts, "num_gpus": spec.num_gpus}
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0
    if gpus > 0:
        return {**opts, "num_gpus": spec.num_gpus}
    logger.warning("embedder: the cluster has no GPU; serving the encoder on CPU (embedder.gpu: auto)")
    return opts


def build_app(args: AppArgs) -> serve.Application:
    """Typed builder referenced by ``import_path: ray_router.serve.app:build_app``."""
    from ray_router.serve.arms import resolve_arm_table

    if isinstance(args, dict):  # called directly rather than by Serve
        args = AppArgs.model_validate(args)
    table = resolve_arm_table(args)
    state_dir = str(args.state_dir().resolve())
    st = args.state
    posterior_spec = {
        "arm_ids": table.ids,
        "prices": tuple(float(p) for p in table.prices),
        "arm_embeddings": table.embeddings,
        "encoder_identity": table.encoder_identity,
        "state_dir": state_dir,
        "policy_config": dict(args.policy.config),
        "policy_seed": args.policy.seed,
        "decision_ttl_s": args.auth.decision_ttl_s,
        "snapshot_every_n": st.snapshot_every_n,
        "snapshot_every_s": st.snapshot_every_s,
        "fsync": st.fsync,
        "lock_timeout_s": st.lock_timeout_s,
        "offline_prior": table.offline_prior,
    }
    embedder = Embedder.options(ray_actor_options=_embedder_resources(args)).bind(
        args.encoder.model_dump(), table.encoder_identity, args.embedder.max_batch_size, args.embedder.batch_wait_timeout_s
    )
    posterior = Posterior.bind(posterior_spec, st.refresh_min_interval_s)
    ingress_spec = {
        "arm_ids": table.ids,
        "arm_embeddings": table.embeddings,
        "policy_config": dict(args.policy.config),
        "offline_prior": table.offline_prior,
        "prices": [float(p) for p in table.prices],
        "upstreams": list(table.upstreams),
        "state_dir": state_dir,
        "limits": args.limits.model_dump(),
        "auth": args.auth.model_dump(),
        "service": args.service.model_dump(),
    }
    logger.info(f"ray-router: {table.n_arms} arms, embeddings from {table.source}; state in {state_dir}")
    return Ingress.bind(embedder, posterior, ingress_spec)
