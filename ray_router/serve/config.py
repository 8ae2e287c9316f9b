"""The application's arguments (``args:`` of an app in a Serve config YAML), as pydantic models.

Serve validates the ``args`` mapping into :class:`AppArgs` before it calls the typed builder
``ray_router.serve.app:build_app(args: AppArgs)``; every model forbids unknown fields, so a typo in
the YAML fails the deploy with the field's name instead of being ignored.

Sizes that Serve itself owns (``num_replicas``, ``max_ongoing_requests``, ``user_config``) stay in
the YAML's ``deployments:`` section. The embedder's CPU/GPU request is in ``args.embedder`` instead
of ``deployments[].ray_actor_options``, because the builder applies it with a fallback: with
``gpu: auto`` a cluster without GPUs gets a CPU embedder rather than a replica that never schedules.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ray_router.config import StrictModel, parse
from ray_router.embeddings.spec import EncoderSpec

STATE_DIR_ENV = "RAY_ROUTER_STATE_DIR"


def default_state_dir() -> Path:
    """``$RAY_ROUTER_STATE_DIR``, else ``~/.local/state/ray-router/serve``."""
    return Path(os.environ.get(STATE_DIR_ENV) or "~/.local/state/ray-router/serve").expanduser()


class TokenPrice(StrictModel):
    """What an upstream charges per million tokens (USD): the price table of the per-arm cost metrics,
    of ``ray-router calibrate``'s measured cost per query and of the judge's spend."""

    prompt_usd_per_1m: float = Field(0.0, ge=0, allow_inf_nan=False, description="USD per 1M prompt tokens")
    completion_usd_per_1m: float = Field(0.0, ge=0, allow_inf_nan=False, description="USD per 1M completion tokens")

    def usd(self, usage: Any) -> float:
        """The USD cost of one answer from its OpenAI ``usage`` object (anything else: 0)."""
        if not isinstance(usage, dict):
            return 0.0
        tokens = []
        for key in ("prompt_tokens", "completion_tokens"):
            v = usage.get(key, 0)
            tokens.append(
                float(v)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                else 0.0
            )
        return (tokens[0] * self.prompt_usd_per_1m + tokens[1] * self.completion_usd_per_1m) / 1e6


class UpstreamSpec(StrictModel):
    """An OpenAI-compatible endpoint that answers for one arm (``POST {base_url}/chat/completions``)."""

    base_url: str = Field(min_length=1, description="e.g. https://api.openai.com/v1")
    model: str = Field(min_length=1, description="model name sent upstream")
    api_key_env: str | None = Field(None, description="env var holding the upstream API key (sent as Bearer)")
    price: TokenPrice | None = Field(None, description="USD per million prompt/completion tokens (cost metrics)")

    @field_validator("base_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return v.rstrip("/")


def profile_scores(v: dict[str, float] | None) -> dict[str, float] | None:
    """A new arm's ``profile``: at least one category, every score in [0, 1]."""
    if v is not None:
        if not v:
            raise ValueError("profile: at least one category")
        bad = [k for k, x in v.items() if not (math.isfinite(x) and 0.0 <= x <= 1.0)]
        if bad:
            raise ValueError(f"profile: scores must be in [0, 1] (categories {bad[:10]})")
    return v


def finite_price(v: float) -> float:
    if not math.isfinite(v):
        raise ValueError("price_usd must be finite")
    return v


class ArmSpec(StrictModel):
    id: str = Field(min_length=1, max_length=200, description="the arm id users send and see")
    price_usd: float = Field(ge=0, description="expected price of one query (USD), for cost_weight")
    upstream: UpstreamSpec | None = None
    dataset_arm: str | None = Field(None, description="column of this arm in the dataset (default: id)")
    retired: bool = Field(
        False,
        description="out of the offered set of every request (its learned terms and logged duels stay); "
        "remove an arm this way: the arm table may only grow (arms appended at its end)",
    )
    profile: dict[str, float] | None = Field(
        None,
        description="a new arm's expected score per category of the offline prior, in [0, 1] ('default': any "
        "other category): its prior where the offline data (file or dataset) has no rows of it",
    )

    _scores = field_validator("profile")(staticmethod(profile_scores))
    _finite = field_validator("price_usd")(staticmethod(finite_price))


class WeightingSpec(StrictModel):
    """:class:`ray_router.embeddings.WeightingConfig` fields (ALGORITHM.md s.3)."""

    name: Literal["perf", "perf_cost", "excel_perf_cost", "excel_mask"] = "perf"
    cost_weight: float = Field(0.0, ge=0)
    top_tau: int = Field(3, ge=1)
    beta: float = Field(10.0, ge=0)


class DatasetEmbeddingsSpec(StrictModel):
    """Compute the arm embeddings at startup from a dataset's offline split."""

    name: str = Field("routerbench", description="routerbench, routerdc, mixinstruct, or a file path")
    data_dir: str | None = Field(None, description="default: $RAY_ROUTER_DATA_DIR, else ./data")
    options: dict[str, Any] = Field(default_factory=dict, description="loader options (load_dataset)")
    split: Literal["stratified", "k_per_category"] = "stratified"
    offline_fraction: float = Field(0.2, gt=0, lt=1)
    k_per_category: int = Field(5, ge=1)
    seed: int = 0
    weighting: WeightingSpec = WeightingSpec()
    cache_dir: str | None = Field(None, description="embedding cache (default: the core's default cache)")


class ArmEmbeddingsSpec(StrictModel):
    """Exactly one of ``file`` (``.npy`` (K, d) in arm-table order, or ``.npz`` with ``embeddings``
    and optionally ``arm_ids`` / ``encoder_identity`` / a per-category profile: what ``ray-router
    calibrate`` writes), ``from_dataset``, and ``cold_start: true``.

    ``cold_start: true``: no offline data at all. Every arm starts equal (no preference before
    feedback) and the router learns online only (:func:`ray_router.serve.arms.cold_start_embeddings`
    says how the arms still get distinct, learnable features). Leaving ``arm_embeddings`` out is an
    error rather than a silent cold start: an operator who forgot the calibration file should hear so."""

    file: str | None = None
    from_dataset: DatasetEmbeddingsSpec | None = None
    cold_start: bool = Field(False, description="no offline data: all arms equal, learn online only")

    @model_validator(mode="after")
    def _exactly_one(self) -> ArmEmbeddingsSpec:
        given = [self.file is not None, self.from_dataset is not None, self.cold_start]
        if sum(given) != 1:
            raise ValueError(
                "set exactly one of arm_embeddings.file, arm_embeddings.from_dataset and arm_embeddings.cold_start: true"
            )
        if self.file is not None and not self.file.endswith((".npy", ".npz")):
            raise ValueError("arm_embeddings.file must be a .npy or .npz file")
        return self


EmbedderMode = Literal["deployment", "inline"]


class EmbedderSpec(StrictModel):
    """Where queries are encoded and with what resources (the builder applies them; see the module
    docstring). ``mode: deployment``: ``Embedder`` replicas, called by the Ingress through a handle;
    ``mode: inline``: each Ingress replica encodes in-process (:mod:`ray_router.serve.inline`), with
    these resources, batch size and wait, and the Serve config lists no ``Embedder`` deployment."""

    mode: EmbedderMode = Field(
        "deployment",
        description="deployment: Embedder replicas behind a handle; inline: the Ingress encodes in-process (no hop) "
        "and takes num_cpus/num_gpus/resources below",
    )
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    gpu: Literal["auto", "require", "never"] = Field(
        "auto", description="auto: request num_gpus only if the cluster has GPUs; require: always; never: CPU"
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each replica asks for (placement, e.g. {node_a: 0.01}); put placement "
        "here, not in the deployment's ray_actor_options, which would replace the CPU/GPU request above",
    )
    max_batch_size: int = Field(32, ge=1, description="default of @serve.batch; user_config may change it live")
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, description="0: no waiting; requests that queue while a batch encodes form the next one"
    )
    single_on_loop: bool = Field(
        True,
        description="mode inline, local encoders: a window of one query encodes on the Ingress's event-loop "
        "thread (no hand-over to the encoder thread and back); false: every window on the encoder thread",
    )


class PolicySpec(StrictModel):
    name: Literal["fgts_cdb"] = "fgts_cdb"
    seed: int = 0
    config: dict[str, Any] = Field(default_factory=dict, description="FGTSConfig fields")

    @field_validator("config")
    @classmethod
    def _fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        from ray_router.policies import FGTSConfig

        parse(FGTSConfig, v, where="policy.config")  # a ConfigError (a ValueError) names the field
        return v


class StateSpec(StrictModel):
    """Where the posterior keeps its durable state, and how often it snapshots."""

    dir: str | None = Field(None, description=f"default: ${STATE_DIR_ENV}, else ~/.local/state/ray-router/serve")
    snapshot_every_n: int = Field(500, ge=1, description="snapshot after this many new feedbacks")
    snapshot_every_s: float = Field(60.0, gt=0, description="... or this long after the first unsnapshotted one")
    fsync: bool = Field(True, description="fsync the feedback log before acknowledging (leave on)")
    refresh_min_interval_s: float = Field(0.02, ge=0, description="pause between two background SGLD refreshes")
    sample_pool: int = Field(
        16,
        ge=1,
        le=256,
        description="the posterior publishes its last N refreshes' samples; a duel route draws one uniformly, "
        "so each decision's propensity is a count out of N (1: the last sample only, propensity 1)",
    )
    lock_timeout_s: float = Field(
        60.0,
        gt=0,
        description="offline tools that open the state (PosteriorState.open) wait this long for its lock; the "
        "service never waits: a Posterior that finds the lock held starts as a standby",
    )
    keep_queries: bool = Field(
        False,
        description="keep the query text of every decision that can take feedback (<state dir>/queries/), so that "
        "an encoder change rebuilds the posterior by re-embedding them; off: an encoder change is refused",
    )


class ClientSpec(StrictModel):
    """One client key of the routing API, with its own token-bucket rate limit (per ingress replica)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="names the key in logs and its generated file")
    key_env: str = Field(min_length=1, description="env var with the key; unset: <state dir>/secrets/client_<name>")
    rate_per_s: float = Field(20.0, gt=0, description="sustained requests per second (token-bucket refill rate)")
    burst: int = Field(40, ge=1, description="bucket size: requests allowed at once after a quiet spell")


class AuthSpec(StrictModel):
    """Separate powers: a feedback token, an admin token and client keys, each opening only its own
    endpoints (``serve_configs/README.md``, *Security*)."""

    token_env: str = Field("RAY_ROUTER_TOKEN", description="env var with the feedback token (POST /v1/feedback)")
    admin_token_env: str = Field("RAY_ROUTER_ADMIN_TOKEN", description="env var with the admin token (/v1/admin/*)")
    hmac_key_env: str = Field("RAY_ROUTER_HMAC_KEY", description="env var with the decision-id signing key")
    decision_ttl_s: float = Field(3600.0, gt=0, le=30 * 86400, description="feedback accepted this long after a route")
    clients: list[ClientSpec] = Field(
        default_factory=lambda: [ClientSpec(name="default", key_env="RAY_ROUTER_CLIENT_KEY")],
        max_length=1000,
        description="client keys of /v1/chat/completions (and of the reads when protect_reads)",
    )
    chat_requires_key: bool = Field(
        True, description="/v1/chat/completions needs a client key (it spends upstream keys)"
    )
    protect_reads: bool = Field(
        False, description="also require a client key for /v1/route, /v1/arms, /v1/models and /v1/stats"
    )

    @field_validator("clients")
    @classmethod
    def _distinct(cls, clients: list[ClientSpec]) -> list[ClientSpec]:
        for what in ("name", "key_env"):
            values = [getattr(c, what) for c in clients]
            dup = sorted({v for v in values if values.count(v) > 1})
            if dup:
                raise ValueError(f"auth.clients: duplicate {what}: {dup}")
        return clients

    @model_validator(mode="after")
    def _separate(self) -> AuthSpec:
        envs = [self.token_env, self.admin_token_env, self.hmac_key_env, *(c.key_env for c in self.clients)]
        dup = sorted({e for e in envs if envs.count(e) > 1})
        if dup:
            raise ValueError(f"auth: each credential needs its own env var; shared: {dup}")
        return self


class LimitsSpec(StrictModel):
    max_query_chars: int = Field(8192, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=256)
    max_cost_weight: float = Field(1000.0, gt=0)
    max_candidates: int = Field(64, ge=2, description="longest candidates list of a route or chat request")
    max_tokens: int = Field(4096, ge=1, description="cap on a chat request's max_tokens / max_completion_tokens")
    max_n: int = Field(1, ge=1, description="cap on a chat request's n (choices per upstream call)")
    max_inflight_routes: int = Field(
        64,
        ge=1,
        description="route/chat requests one ingress replica embeds at once; one more is a 503 overloaded at "
        "once (shed before any queue forms). Keep ingress replicas x this <= the Embedder's replicas x "
        "max_ongoing_requests: a request past those waits in Serve's handle queue, whose retry backoff leaves "
        "the embedder idle under overload (launch.admission_warnings)",
    )


class ServiceSpec(StrictModel):
    """Ingress behaviour."""

    posterior_retry_s: float = Field(
        60.0, ge=0, description="feedback and admin calls keep retrying this long while the posterior restarts"
    )
    chat_default_mode: Literal["single", "duel"] = "single"
    upstream_timeout_s: float = Field(120.0, gt=0)
    fast_route: bool = Field(
        True,
        description="POST /v1/route as a plain ASGI handler ahead of FastAPI's middleware and routing "
        "(same answers and errors; about 0.5 ms less per route): false serves it through FastAPI",
    )


class ResilienceSpec(StrictModel):
    """How the ingress calls the arms' upstreams for ``/v1/chat/completions``: per-attempt timeouts,
    retries with backoff, fallback to the next best arm, and a circuit breaker per arm
    (``ray_router/serve/resilience.py``; ``serve_configs/README.md``, *Resilience*)."""

    attempts: int = Field(3, ge=1, le=10, description="calls to one arm per request (1 = no retry)")
    backoff_base_s: float = Field(
        0.2, ge=0, allow_inf_nan=False, description="first retry's backoff (doubles each retry)"
    )
    backoff_max_s: float = Field(2.0, ge=0, allow_inf_nan=False, description="cap on one backoff (before jitter)")
    retry_after_max_s: float = Field(
        5.0,
        ge=0,
        allow_inf_nan=False,
        description="an upstream's Retry-After up to this long is waited out before the retry; a longer one "
        "gives up on the arm for this request (fallback)",
    )
    attempt_timeout_s: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="limit of one call (null: service.upstream_timeout_s)"
    )
    connect_timeout_s: float = Field(5.0, gt=0, allow_inf_nan=False, description="limit of one TCP/TLS connect")
    failure_threshold: int = Field(5, ge=1, description="consecutive failed calls that open an arm's breaker")
    cooldown_s: float = Field(
        30.0, gt=0, allow_inf_nan=False, description="an open breaker lets one probe request through after this long"
    )
    fallback: bool = Field(True, description="answer from the next best offered arm when an arm fails")
    max_fallbacks: int = Field(2, ge=0, description="at most this many other arms per failed slot")
    stream_usage: bool = Field(
        True,
        description="ask upstreams for a stream's token usage (stream_options.include_usage) when the client "
        "did not set stream_options (the usage chunk is then not relayed); false for upstreams that reject it",
    )


JudgeMode = Literal["single", "duel"]


def _single_only() -> list[JudgeMode]:
    return ["single"]


class JudgeBudgetSpec(StrictModel):
    """What the shadow duels may spend per clock hour (each ingress replica on its own); once either
    is spent, no new duel starts until the hour rolls. None: no limit of that kind."""

    usd_per_hour: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="USD per hour: the judge's calls plus the second arms' answers"
    )
    calls_per_hour: int | None = Field(None, ge=0, description="judge calls per hour (a duel makes two)")


class JudgeSpec(StrictModel):
    """Shadow duels (:mod:`ray_router.serve.judge`): for a sampled share of chat requests, once the
    user has the answer, the router asks the duel's second arm in the background, asks this judge
    which answer is better (both orders), and records the verdict as feedback of source ``judge``."""

    upstream: UpstreamSpec = Field(description="the judge: an OpenAI-compatible chat model (price: its token prices)")
    prompt_template: str | None = Field(
        None,
        min_length=1,
        max_length=20000,
        description="pairwise prompt with {question}, {answer_a} and {answer_b}; null: the shipped default",
    )
    sample_rate: float = Field(0.1, ge=0, le=1, description="share of the chat requests that get a shadow duel")
    modes: list[JudgeMode] = Field(
        default_factory=_single_only,
        min_length=1,
        description="which chat requests are judged: single (a second arm is asked in the background) and/or "
        "duel (the two answers the user got: the judge's verdict sits beside a human's, for agreement)",
    )
    budget: JudgeBudgetSpec = JudgeBudgetSpec()
    weight: float = Field(
        1.0, ge=0, allow_inf_nan=False, description="a judge verdict's weight in the posterior; 1.0 = a human one's"
    )
    timeout_s: float = Field(60.0, gt=0, description="each judge call's timeout")
    params: dict[str, Any] = Field(
        default_factory=lambda: {"temperature": 0, "max_tokens": 16},
        description="extra fields of the judge's chat request (e.g. temperature, max_tokens)",
    )
    max_inflight: int = Field(64, ge=1, description="shadow duels in flight per ingress replica; more are skipped")

    @field_validator("prompt_template")
    @classmethod
    def _placeholders(cls, v: str | None) -> str | None:
        if v is not None:
            missing = [p for p in ("{question}", "{answer_a}", "{answer_b}") if p not in v]
            if missing:
                raise ValueError(f"prompt_template lacks {', '.join(missing)}")
        return v

    @field_validator("modes")
    @classmethod
    def _distinct_modes(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("modes: each mode once")
        return v

    @field_validator("params")
    @classmethod
    def _own_fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        taken = sorted({"model", "messages", "stream"} & set(v))
        if taken:
            raise ValueError(f"params may not set {taken} (the router sets them)")
        return v


class AppArgs(StrictModel):
    """Everything ``build_app`` needs; see ``serve_configs/README.md`` for a field-by-field guide."""

    arms: list[ArmSpec] = Field(min_length=2)
    arm_embeddings: ArmEmbeddingsSpec
    encoder: EncoderSpec = EncoderSpec()
    embedder: EmbedderSpec = EmbedderSpec()
    policy: PolicySpec = PolicySpec()
    state: StateSpec = StateSpec()
    auth: AuthSpec = AuthSpec()
    limits: LimitsSpec = LimitsSpec()
    service: ServiceSpec = ServiceSpec()
    resilience: ResilienceSpec = ResilienceSpec()
    judge: JudgeSpec | None = Field(None, description="shadow duels judged by an LLM; null: off")

    @field_validator("arms")
    @classmethod
    def _unique(cls, arms: list[ArmSpec]) -> list[ArmSpec]:
        ids = [a.id for a in arms]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"duplicate arm ids: {dup}")
        if "router" in ids:
            raise ValueError("'router' is reserved (it is the model name that asks for routing)")
        if arms and all(a.retired for a in arms):
            raise ValueError("every arm is retired: at least one must stay in service")
        return arms

    @model_validator(mode="after")
    def _inline_computes(self) -> AppArgs:
        if self.embedder.mode == "inline" and not self.encoder.remote and self.embedder.num_cpus <= 0:
            raise ValueError(
                "embedder.mode: inline runs the encoder in the Ingress: give it CPUs (embedder.num_cpus > 0; "
                "0 only with a remote openai:MODEL@URL encoder, which only waits on HTTP)"
            )
        return self

    @property
    def arm_ids(self) -> tuple[str, ...]:
        return tuple(a.id for a in self.arms)

    @property
    def retired(self) -> tuple[int, ...]:
        """Indices of the retired arms (never offered)."""
        return tuple(i for i, a in enumerate(self.arms) if a.retired)

    def state_dir(self) -> Path:
        return Path(self.state.dir).expanduser() if self.state.dir else default_state_dir()
