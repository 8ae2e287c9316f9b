"""What each deployment is built with: typed, frozen specs the builder makes from :class:`AppArgs`
and the resolved arm table (pure values: they pickle through Ray to the replicas)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ray_router.serve.config import AuthSpec, JudgeSpec, LimitsSpec, ResilienceSpec, ServiceSpec, UpstreamSpec

COLD_START_NOTE = "cold start: no offline data; all arms equal, learning online only"


@dataclass(frozen=True)
class PosteriorSpec:
    """What the posterior needs (see :class:`ray_router.serve.state.PosteriorState`)."""

    arm_ids: tuple[str, ...]
    prices: tuple[float, ...]
    arm_embeddings: np.ndarray  # (K, d) float64
    encoder_identity: str
    state_dir: str
    policy_config: dict[str, Any] = field(default_factory=dict)  # FGTSConfig fields (validated by AppArgs)
    policy_seed: int = 0
    decision_ttl_s: float = 3600.0
    snapshot_every_n: int = 500
    snapshot_every_s: float = 60.0
    fsync: bool = True
    lock_timeout_s: float = 60.0
    offline_prior: dict[str, Any] | None = None  # OfflinePrior.to_dict() of the arm table, or None
    # the decision-id key's env var (else <state_dir>/secrets/hmac_key): the posterior can check each
    # feedback's signature itself (tokens.decision_signer(...).verify_duel), trusting no caller
    hmac_key_env: str = "RAY_ROUTER_HMAC_KEY"
    cold_start: bool = False  # arm_embeddings.cold_start: said in /v1/stats (posterior.cold_start)
    sample_pool: int = 16  # state.sample_pool: samples published for duel routes to draw from
    # how much a judge's verdict weighs in the likelihood relative to a human's (judge.weight)
    judge_weight: float = 1.0
    keep_queries: bool = False  # state.keep_queries: an encoder change re-embeds the kept texts
    encoder: Any = None  # the EncoderSpec (re-embedding on an encoder change); None: not available


@dataclass(frozen=True)
class IngressSpec:
    """What the HTTP ingress needs: the arm table, the scorer's inputs (the posterior's config and
    arm embeddings, to rank on the published samples), and the app's auth, limits and service
    settings."""

    arm_ids: tuple[str, ...]
    prices: tuple[float, ...]
    arm_embeddings: np.ndarray
    policy_config: dict[str, Any]
    offline_prior: dict[str, Any] | None
    upstreams: tuple[UpstreamSpec | None, ...]  # one per arm; None: the arm does not answer chat
    state_dir: str
    auth: AuthSpec = field(default_factory=AuthSpec)
    limits: LimitsSpec = field(default_factory=LimitsSpec)
    service: ServiceSpec = field(default_factory=ServiceSpec)
    resilience: ResilienceSpec = field(default_factory=ResilienceSpec)
    judge: JudgeSpec | None = None  # shadow duels (ray_router.serve.judge); None: off
    retired: tuple[int, ...] = ()  # arms never offered (retired: their terms and duels stay)
    keep_queries: bool = False  # state.keep_queries: write each decision's query text (query_store)


@dataclass(frozen=True)
class LiveArms:
    """The arm table an Ingress replica serves now: its config's at start, then the posterior's
    whenever that changes (arms added or retired at runtime, :mod:`ray_router.serve.arm_changes`)."""

    ids: tuple[str, ...]
    prices: tuple[float, ...]
    upstreams: tuple[UpstreamSpec | None, ...]
    retired: tuple[int, ...] = ()
