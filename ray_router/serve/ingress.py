"""The ``Ingress`` deployment: the HTTP API (FastAPI) of the router.

Each route checks the caller's credential (:mod:`ray_router.serve.access`: feedback token, admin
token, client keys with rate limits), reads and checks its body, asks the other deployments
(``calls.call``: the route path never waits, a saturated embedder is a 503 ``overloaded`` at once;
feedback and admin calls ride out a posterior restart) and the pure
:class:`~ray_router.serve.decision.RouteDecider` (the arms and the signed decision id), and
answers. Errors are mapped in :mod:`ray_router.serve.http_errors` (one catch-all included).
Endpoint contract: ``serve_configs/README.md``; the request bodies are in ``/openapi.json``.

No ``from __future__ import annotations`` here: FastAPI must see real annotations (``Request``)
on the ingress methods, which Serve rewrites.
"""

import asyncio
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle

from ray_router.errors import RouterError
from ray_router.serve import http_errors, judge, upstream
from ray_router.serve.access import load_access
from ray_router.serve.arm_changes import AddArmRequest, ArmChangeRefused, fingerprint
from ray_router.serve.calls import call
from ray_router.serve.decision import Decision, RouteDecider
from ray_router.serve.embedder import QUICK_SHUTDOWN
from ray_router.serve.errors import (
    NO_RETRY,
    InvalidRequest,
    Overloaded,
    ServiceUnavailable,
    UnknownModel,
    blame,
)
from ray_router.serve.fast_route import BodyReader, FastRouteApp
from ray_router.serve.inline import InlineEncoderSpec, embedder_path
from ray_router.serve.query_store import QueryWriter
from ray_router.serve.ranking import SampleMismatch, SampleView
from ray_router.serve.request_body import check_declared, parse_body, read_body, stream_bytes
from ray_router.serve.resilience import Resilience
from ray_router.serve.schemas import (
    AdminRefreshRequest,
    ChatRequest,
    FeedbackRequest,
    RouteRequest,
    openapi_with_bodies,
    routing_text,
)
from ray_router.serve.specs import IngressSpec, LiveArms
from ray_router.serve.tokens import decision_signer

logger = logging.getLogger("ray.serve")

api = FastAPI(title="ray-router", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
http_errors.install(api)
# the request bodies of /openapi.json (the routes read their bodies themselves, so FastAPI cannot see
# them); set before @serve.ingress, which serves a pickled copy of ``api``
openapi_with_bodies(
    api,
    {
        ("/v1/route", "post"): RouteRequest,
        ("/v1/feedback", "post"): FeedbackRequest,
        ("/v1/chat/completions", "post"): ChatRequest,
        ("/v1/admin/refresh", "post"): AdminRefreshRequest,
        ("/v1/admin/arms", "post"): AddArmRequest,
    },
)


@serve.deployment(name="Ingress", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0}, **QUICK_SHUTDOWN)
@serve.ingress(api)
class Ingress:
    """HTTP front: validation, auth, signed decision ids, retries while the posterior restarts."""

    # Serve awaits an async constructor of a deployment class; mypy only knows plain classes
    async def __init__(  # type: ignore[misc]
        self, embedder: DeploymentHandle | InlineEncoderSpec, posterior: DeploymentHandle, spec: IngressSpec
    ):
        import httpx

        from ray_router.serve.metrics import IngressMetrics

        self.posterior, self.spec = posterior, spec
        # the Embedder deployment's handle, or this replica's own encoder (embedder.mode: inline)
        self.embedder = await embedder_path(embedder)
        self.access, self.sources = load_access(spec.auth, spec.state_dir)
        signer, self.sources["hmac_key"] = decision_signer(spec.auth.hmac_key_env, Path(spec.state_dir), spec.arm_ids)
        self._config_upstreams = dict(zip(spec.arm_ids, spec.upstreams))
        self._config_retired = frozenset(spec.arm_ids[i] for i in spec.retired)
        # the arm table this replica serves: the config's, until the posterior publishes another
        # (arms added or retired through /v1/admin/arms, or a config change rolling out): see _adopt
        table = {
            "ids": spec.arm_ids,
            "prices": spec.prices,
            "embeddings": spec.arm_embeddings,
            "policy_config": spec.policy_config,
            "offline_prior": spec.offline_prior,
        }
        self.view, self.decider, self.live = self._components(table, signer)
        self.arms_fp = fingerprint(spec.arm_ids, spec.prices, spec.arm_embeddings, ())
        # state.keep_queries: the texts an encoder change re-embeds (query_store), flushed every second
        self.queries = QueryWriter(spec.state_dir) if spec.keep_queries else None
        self.metrics = IngressMetrics()
        http_errors.use_metrics(self.metrics)
        res = spec.resilience
        timeout_s = res.attempt_timeout_s or spec.service.upstream_timeout_s
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=res.connect_timeout_s))
        self.resilience = Resilience(spec.arm_ids, spec.upstreams, res, self.http, timeout_s, self.metrics.arm)
        self.epoch = ""
        self._fast_route: FastRouteApp | None = None  # set by __serve_build_asgi_app__
        self.started = int(time.time())  # /v1/models' ``created``
        self.routes = {"duel": 0, "single": 0}
        self._embedding = 0  # route/chat requests waiting on the embedder now (admission control)
        self.judge = judge.ShadowJudge.for_ingress(self)  # shadow duels (judge: in the config), else a no-op
        deadline = time.monotonic() + 600.0
        while True:  # the first samples of this arm table's posterior (an arm table change may be rolling out)
            try:
                if await self._pull_samples(wait_s=0.0, retry_s=600.0):
                    break
            except SampleMismatch as e:
                if time.monotonic() > deadline:
                    raise
                logger.warning(f"ingress: waiting for samples of this arm table: {e}")
                await asyncio.sleep(1.0)
        self._follower = asyncio.get_running_loop().create_task(self._follow_posterior())
        if self.queries is not None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_queries())

    async def _flush_queries(self) -> None:
        assert self.queries is not None
        while True:
            await asyncio.sleep(1.0)
            self.queries.flush()

    # ------------------------------------------------------------- the samples
    async def _pull_samples(self, wait_s: float, retry_s: float) -> bool:
        """The posterior's current samples (a long poll of up to ``wait_s``); when they belong to
        another arm table (``arms``: its fingerprint), that table first. False when the table
        changed again meanwhile (the next pull gets the newest)."""
        s = await call(self.posterior, "samples", self.epoch, self.view.version, wait_s, retry_s=retry_s)
        fp = s.get("arms")
        if fp is not None and fp != self.arms_fp:
            table = await call(self.posterior, "arm_table", retry_s=retry_s)
            if table["fingerprint"] != fp:
                return False
            self._adopt(table, s)
        else:
            self.view.update(s["version"], s["theta"], s["theta_mean"], s.get("pool"), s.get("variance"))
        self.epoch = s["epoch"]
        return True

    def _adopt(self, table: dict[str, Any], samples: dict[str, Any]) -> None:
        """Serve the posterior's arm table from now on (arms added or retired at runtime, or a
        config change rolling out): a scorer, view, signer and decider for it, made first and then
        swapped in together (no await in between: a request sees the old table or the new one).
        The upstreams and retirements of the config's arms are this replica's config's; the added
        arms' upstreams and the admin's retirements are the posterior's."""
        view, decider, arms = self._components(table, self.decider.signer)
        view.update(
            samples["version"], samples["theta"], samples["theta_mean"], samples.get("pool"), samples.get("variance")
        )
        # the swap: nothing below awaits
        self.resilience.set_arms(arms.ids, arms.upstreams)
        self.judge.set_arms(arms.ids, arms.upstreams, view, decider.signer)
        self.view, self.decider, self.live, self.arms_fp = view, decider, arms, str(table["fingerprint"])
        logger.warning(
            f"ingress: serving the posterior's arm table {self.arms_fp}: {len(arms.ids)} arms, retired {arms.retired}"
        )

    def _components(self, table: dict[str, Any], signer: Any) -> tuple[SampleView, RouteDecider, LiveArms]:
        """The view (no samples yet), decider and arms of an arm table (the posterior's
        ``arm_table()``, or the config's at start): retirements by the config or the admin, upstreams
        of the config's arms from this replica's config, of the added arms from the table."""
        from ray_router.serve.config import UpstreamSpec
        from ray_router.serve.state import make_scorer

        ids = tuple(str(a) for a in table["ids"])
        prices = tuple(float(p) for p in table["prices"])
        scorer = make_scorer(table["embeddings"], table["policy_config"], 0, table["offline_prior"])
        view = SampleView(scorer, prices)
        added = table.get("added") or {}
        upstreams = []
        for a in ids:
            if a in self._config_upstreams:
                upstreams.append(self._config_upstreams[a])
            else:
                up = (added.get(a) or {}).get("upstream")
                upstreams.append(None if up is None else UpstreamSpec.model_validate(up))
        gone = self._config_retired | set(table.get("retired") or ())
        retired = tuple(i for i, a in enumerate(ids) if a in gone)
        signer = signer.for_arms(ids)
        decider = RouteDecider(ids, view, signer, self.spec.auth.decision_ttl_s, self.spec.limits, retired=retired)
        return view, decider, LiveArms(ids, prices, tuple(upstreams), retired)

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
    async def _posterior(self, method: str, *args: Any, retry_s: float | None = None) -> Any:
        retry = self.spec.service.posterior_retry_s if retry_s is None else retry_s
        return await call(self.posterior, method, *args, retry_s=retry)

    async def _read(self, request: Request, model: type[BaseModel]) -> Any:
        return await read_body(request, model, self.spec.limits.max_body_bytes)

    def _require(self, request: Request, kind: str) -> None:
        self.access.require(request.headers.get("authorization"), kind)

    def _client(self, request: Request, required: bool) -> None:
        self.access.client(request.headers.get("authorization"), required)

    def _reads_allowed(self, request: Request) -> None:
        self._client(request, self.spec.auth.protect_reads)

    async def _decide(
        self, text: str, offered: list[int] | None, mode: str, cost_weight: float, sign: bool = True
    ) -> tuple[Decision, str]:
        """Embed, decide, count; the decision and its Server-Timing parts (the embedder call as
        the ingress saw it, or the inline window's wait and encode; the encode inside it (its
        batch's); the choice). ``sign=False`` (chat): the decision is signed, and its arms counted,
        once they have answered."""
        t0 = time.perf_counter()
        # admission: past the limit a request is shed at once, before it can queue anywhere
        if self._embedding >= self.spec.limits.max_inflight_routes:
            raise Overloaded(f"{self._embedding} route requests in flight (limits.max_inflight_routes); retry shortly")
        self._embedding += 1
        try:
            # never waits on retries: a saturated or restarting embedder is a 503 at once
            x, encode_s, batch = await self.embedder.embed(text)
        finally:
            self._embedding -= 1
        t1 = time.perf_counter()
        dec = self.decider.decide(x, offered, mode, cost_weight, sign=sign)
        if sign:
            self._count_routes(dec)
        self.routes[mode] += 1
        timing = (
            f'embed;dur={(t1 - t0) * 1000:.2f}, encode;dur={encode_s * 1000:.2f};desc="batch of {batch}", '
            f"choose;dur={(time.perf_counter() - t1) * 1000:.2f}"
        )
        return dec, timing

    def _count_routes(self, dec: Decision) -> None:
        for slot, arm in dec.slots:
            self.metrics.routes.inc(1, tags={"arm": arm, "slot": slot})

    # ----------------------------------------------------------------- routes
    @api.post("/v1/route")
    async def route(self, request: Request) -> JSONResponse:
        """The FastAPI route (``service.fast_route: false``; with it on, :mod:`.fast_route` answers
        POST /v1/route before FastAPI sees it, through the same :meth:`route_answer`)."""
        h = request.headers
        content, headers = await self.route_answer(
            h.get("authorization"),
            h.get("content-type"),
            h.get("content-length"),
            lambda: stream_bytes(request, self.spec.limits.max_body_bytes),
        )
        return JSONResponse(content, headers=headers)

    async def route_answer(
        self, authorization: str | None, content_type: str | None, content_length: str | None, read: BodyReader
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """A route request's answer (JSON content and headers), or the RouterError to answer with:
        the credentials first, then the body (declared type and size, then read under the limit)."""
        t0 = time.perf_counter()
        self.access.client(authorization, self.spec.auth.protect_reads)
        check_declared(content_type, content_length, self.spec.limits.max_body_bytes)
        req = parse_body(await read(), RouteRequest)
        with blame("query"):
            text = self.decider.check_query(req.query)
        with blame("candidates"):
            offered = self.decider.offered(req.candidates, req.mode)
        with blame("cost_weight"):
            cost_weight = self.decider.cost_weight(req.cost_weight)
        dec, timing = await self._decide(text, offered, req.mode, cost_weight)
        if self.queries is not None and dec.mode == "duel":  # a decision that can take feedback
            self.queries.add(dec.x, text)
        seconds = time.perf_counter() - t0
        self.metrics.route_latency.observe(seconds, tags={"mode": req.mode})
        content = {
            "decision_id": dec.decision_id,
            "mode": req.mode,
            "arms": list(dec.arms),
            "model": dec.arms[0],
            "cost_weight": cost_weight,
            "posterior_version": dec.posterior_version,
            "expires_at": dec.expires_at,
            "propensity": dec.propensity_value,
        }
        return content, {"Server-Timing": f"{timing}, app;dur={seconds * 1000:.2f}"}

    def __serve_build_asgi_app__(self) -> Any:
        """The ASGI app Serve runs for this replica: the FastAPI app, behind the fast
        ``POST /v1/route`` handler unless ``service.fast_route`` is false."""
        app = self._asgi_app  # type: ignore[attr-defined]  # the FastAPI app @serve.ingress bound to this class
        if not self.spec.service.fast_route:
            return app
        self._fast_route = FastRouteApp(app, self.route_answer, self.spec.limits.max_body_bytes)
        return self._fast_route

    @api.post("/v1/feedback")
    async def feedback(self, request: Request) -> JSONResponse:
        self._require(request, "feedback")
        req: FeedbackRequest = await self._read(request, FeedbackRequest)
        with blame("decision_id"):
            self.decider.feedback_claims(req.decision_id)  # refuse a bad id here, before any call
        request_id = uuid.uuid4().hex  # idempotency key of this HTTP request across internal retries
        ack = await self._posterior("feedback", req.decision_id, req.outcome, request_id)
        return JSONResponse({**ack, "decision_id": req.decision_id})

    @api.get("/v1/arms")
    async def arms(self, request: Request) -> JSONResponse:
        self._reads_allowed(request)
        arms = self.live
        prices = arms.prices
        top = max(prices) if prices and max(prices) > 0 else 0.0
        return JSONResponse(
            {
                "arms": [
                    {
                        "id": a,
                        "index": i,
                        "price_usd": prices[i],
                        "price_norm": (prices[i] / top) if top else 0.0,
                        "upstream_model": None if up is None else up.model,
                        "chat": up is not None,
                        "retired": i in arms.retired,
                    }
                    for i, (a, up) in enumerate(zip(arms.ids, arms.upstreams))
                ]
            }
        )

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        """OpenAI's model list: ``router`` (the model a chat request names) and each arm (for
        discovery: a request picks among arms with ``router.candidates``, not ``model``)."""
        self._reads_allowed(request)
        return JSONResponse({"object": "list", "data": [self._model(m) for m in ("router", *self._active_arms())]})

    def _active_arms(self) -> list[str]:
        """The arms in service (a retired arm is not a model one can ask for)."""
        return [a for i, a in enumerate(self.live.ids) if i not in self.live.retired]

    @api.get("/v1/models/{model_id:path}")
    async def model(self, request: Request, model_id: str) -> JSONResponse:
        self._reads_allowed(request)
        if model_id != "router" and model_id not in self._active_arms():
            raise UnknownModel(f"no model {model_id[:200]!r}: GET /v1/models lists them", param="model")
        return JSONResponse(self._model(model_id))

    def _model(self, model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": self.started, "owned_by": "ray-router"}

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 ``ok`` (writer), 200 ``standby``, or 503 ``degraded`` (posterior unreachable).

        A standby answers 200, not 503: it serves routes on the state it follows, and in a KubeRay
        ``NewCluster`` upgrade it *is* the new cluster waiting for the old one to go. Anything that
        gates traffic on this endpoint (a load balancer, a readiness probe) would keep traffic off
        the new cluster on a 503, the old one would never be deleted, its lock never freed, and the
        standby never promoted: the very deadlock the standby exists to break. Feedback is refused
        per request instead (503 ``standby``, ``Retry-After``), so no write is lost either way."""
        try:
            health = await asyncio.wait_for(self._posterior("health", retry_s=0), timeout=2.0)
        except (Exception, asyncio.TimeoutError) as e:  # noqa: BLE001 - any failure means "not ready"
            # routes still work from the last samples; feedback waits for the posterior to come back
            return http_errors.error_response(
                ServiceUnavailable.http_status,
                ServiceUnavailable.code,
                f"posterior not reachable: {type(e).__name__}",
                ServiceUnavailable.headers,
                top={
                    "status": "degraded",
                    "routes": "ok",
                    "feedback": "unavailable",
                    "samples_version": self.view.version,
                },
            )
        body = {"posterior_version": health["version"], "samples_version": self.view.version, "role": health["role"]}
        if health["role"] == "standby":
            standby = {"standby_since": health.get("standby_since"), "lock_holder": health.get("lock_holder")}
            return JSONResponse({"status": "standby", "routes": "ok", "feedback": "standby", **body, **standby})
        return JSONResponse({"status": "ok", **body})

    @api.get("/v1/stats")
    async def stats(self, request: Request) -> JSONResponse:
        self._reads_allowed(request)
        stats = await self._posterior("stats", retry_s=5)
        stats["ingress"] = {"routes": dict(self.routes), "samples_version": self.view.version}
        stats["judge"] = self.judge.stats()
        return JSONResponse(stats)

    # ----------------------------------------------------------------- admin
    @api.post("/v1/admin/snapshot")
    async def admin_snapshot(self, request: Request) -> JSONResponse:
        self._require(request, "admin")
        return JSONResponse(await self._posterior("snapshot_now"))

    @api.post("/v1/admin/refresh")
    async def admin_refresh(self, request: Request) -> JSONResponse:
        self._require(request, "admin")
        req = await read_body(request, AdminRefreshRequest, self.spec.limits.max_body_bytes, empty_ok=True)
        return JSONResponse(await self._posterior("refresh_now", req.steps, req.times))

    @api.get("/v1/admin/status")
    async def admin_status(self, request: Request) -> JSONResponse:
        self._require(request, "admin")
        status = await self._posterior("status", retry_s=5)
        embedder = await self.embedder.info()
        return JSONResponse(
            {
                "posterior": status,
                "embedder": embedder,
                "ingress": {
                    "pid": os.getpid(),
                    "credentials": dict(self.sources),  # where each came from, never the secret
                    "samples_version": self.view.version,
                    "samples_epoch": self.epoch,
                    "breakers": self.resilience.status(),  # this replica's, per chat arm
                    # routes answered by the plain ASGI handler (null: service.fast_route is off)
                    "fast_routes": None if self._fast_route is None else self._fast_route.served,
                },
            }
        )

    # ------------------------------------------------------- admin: the arms
    @api.get("/v1/admin/arms")
    async def admin_arms(self, request: Request) -> JSONResponse:
        """The posterior's arm table: each arm's source (the Serve config, or added through this
        API), price, upstream and retirement (by the config or by this API)."""
        self._require(request, "admin")
        table = await self._posterior("arm_table", retry_s=5)
        added = table.get("added") or {}
        admin_retired = set(table.get("retired") or ())
        out = []
        for i, a in enumerate(table["ids"]):
            from_config = a in self._config_upstreams
            if from_config:
                spec_up = self._config_upstreams.get(a)
                chat, model = spec_up is not None, None if spec_up is None else spec_up.model
            else:
                up = (added.get(a) or {}).get("upstream")
                chat, model = up is not None, (up or {}).get("model")
            retired_by = "config" if a in self._config_retired else "admin" if a in admin_retired else None
            out.append(
                {
                    "id": a,
                    "index": i,
                    "price_usd": table["prices"][i],
                    "source": "config" if from_config else "admin",
                    "added_at": None if from_config else (added.get(a) or {}).get("added_at"),
                    "upstream_model": model,
                    "chat": chat,
                    "retired": retired_by is not None,
                    "retired_by": retired_by,
                }
            )
        return JSONResponse({"fingerprint": table["fingerprint"], "serving": self.arms_fp, "arms": out})

    @api.post("/v1/admin/arms")
    async def admin_add_arm(self, request: Request) -> JSONResponse:
        """Append an arm with its prior (``profile`` or ``rows``): durable before the answer; this
        replica serves the grown table before it answers, the others within one long poll."""
        self._require(request, "admin")
        req: AddArmRequest = await self._read(request, AddArmRequest)
        report = await self._posterior("add_arm", req.model_dump(mode="json"))
        await self._pull_samples(wait_s=0.0, retry_s=30.0)
        return JSONResponse(report, status_code=200 if report.get("replayed") else 201)

    @api.post("/v1/admin/arms/{arm_id:path}/retire")
    async def admin_retire_arm(self, request: Request, arm_id: str) -> JSONResponse:
        return await self._retire(request, arm_id, True)

    @api.post("/v1/admin/arms/{arm_id:path}/restore")
    async def admin_restore_arm(self, request: Request, arm_id: str) -> JSONResponse:
        return await self._retire(request, arm_id, False)

    async def _retire(self, request: Request, arm_id: str, retired: bool) -> JSONResponse:
        self._require(request, "admin")
        if not retired and arm_id in self._config_retired:
            raise ArmChangeRefused(f"arm {arm_id!r} is retired in the Serve config: restore it there")
        arms = self.live
        if retired and arm_id in arms.ids:
            left = [a for i, a in enumerate(arms.ids) if i not in arms.retired and a != arm_id]
            if not left:
                raise ArmChangeRefused(f"retiring {arm_id!r} would leave no arm in service")
        report = await self._posterior("retire_arm", arm_id, retired)
        await self._pull_samples(wait_s=0.0, retry_s=30.0)
        return JSONResponse(report)

    # -------------------------------------------------------- chat completions
    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        self._client(request, self.spec.auth.chat_requires_key)
        req: ChatRequest = await self._read(request, ChatRequest)
        if req.model != "router":
            raise InvalidRequest(
                f"model must be 'router' (the router picks the arm), got {req.model[:100]!r}", param="model"
            )
        lim = self.spec.limits
        for name, cap in (("max_tokens", lim.max_tokens), ("max_completion_tokens", lim.max_tokens), ("n", lim.max_n)):
            value = getattr(req, name)
            if value is not None and value > cap:
                raise InvalidRequest(f"{name} is {value}; this router's limit is {cap}", param=name)
        opts = req.router
        mode = (opts.mode if opts and opts.mode else None) or self.spec.service.chat_default_mode
        if req.stream and mode == "duel":
            raise InvalidRequest("streaming answers one arm: use router.mode 'single' or stream: false", param="stream")
        text = self.decider.check_query(routing_text(req))
        chat_arms = [i for i, u in enumerate(self.live.upstreams) if u is not None]
        if not chat_arms:
            raise InvalidRequest("no arm of this router has an upstream configured")
        # the request's checks, then arms with an open circuit breaker out (a duel left with one: single)
        offered, served_mode = self.resilience.offer(self.decider, opts.candidates if opts else None, mode, chat_arms)
        cost_weight = self.decider.cost_weight(opts.cost_weight if opts else 0.0)
        dec, _ = await self._decide(text, offered, served_mode, cost_weight, sign=False)
        if self.queries is not None:  # a duel, or a single answer the judge may duel
            self.queries.add(dec.x, text)
        body = req.model_dump(exclude_unset=True)  # forward what the client sent, nothing more
        body.pop("router", None)
        # retries, fallbacks, breakers (resilience.py); the decision comes back signed for the arms that answered
        try:
            if req.stream:
                served = await self.resilience.open_stream(self.decider, dec, body)
            else:
                served = await self.resilience.complete(self.decider, dec, body)
        except RouterError as e:
            # no arm answered: the arms it tried go with the error, but no decision id (there is no
            # answer to give feedback on), and the SDK must not re-send (the router retried already)
            ids = list(dec.arms)
            raise e.attach({"X-Router-Model": ids[0], "X-Router-Arms": ",".join(ids), **NO_RETRY}) from None
        self._count_routes(served.decision)
        info, headers = self.resilience.router_info(served)
        if served.stream is not None:
            arm = served.decision.picked[0]
            relay = upstream.relay_stream(served.stream, self.live.ids[arm], info, self.resilience.stream_done(arm))
            relay = self.judge.stream(relay, req, served.decision, body)  # a sampled shadow duel starts after it
            return StreamingResponse(relay, media_type="text/event-stream", headers=headers)
        out = upstream.merge_answers(list(served.decision.arms), served.answers)
        out["router"] = info
        self.judge.after_answer(req, served.decision, body, out)  # a sampled shadow duel starts once the answer is out
        return http_errors.SafeJSONResponse(out, headers=headers)  # the upstream's text may hold anything
