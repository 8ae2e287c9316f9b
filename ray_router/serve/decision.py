"""The route decision, free of HTTP and Ray: which arms a request may get, which it gets, and the
signed decision id that carries the choice (context included) to the feedback.

The ingress checks a request's query, candidates, mode and cost weight here, embeds the query
(the one call to another deployment), and asks :meth:`RouteDecider.decide` for the arms: the
choice is made on the float16-rounded embedding the decision id carries, from the ingress's
:class:`~ray_router.serve.ranking.SampleView` of the posterior's current samples. A feedback's
decision id comes back through :meth:`RouteDecider.feedback_claims`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ray_router.errors import UnknownArmError
from ray_router.serve.config import LimitsSpec
from ray_router.serve.errors import InvalidRequest, PayloadTooLarge
from ray_router.serve.ranking import SampleView
from ray_router.serve.tokens import DecisionClaims, DecisionSigner, new_nonce, quantise

MODES = ("duel", "single")


@dataclass(frozen=True)
class Decision:
    """One route decision: ``picked`` arm indices (one for ``single``, two for ``duel``)."""

    decision_id: str
    mode: str
    picked: tuple[int, ...]
    arms: tuple[str, ...]  # the ids of ``picked``
    posterior_version: int  # of the samples the choice was made on
    expires_at: int
    x: np.ndarray | None = field(default=None, compare=False, repr=False)  # the (float16) query embedding chosen on

    @property
    def slots(self) -> tuple[tuple[str, str], ...]:
        """``(slot, arm id)`` per served arm: ``single``, or ``first`` and ``second``."""
        names = ("single",) if self.mode == "single" else ("first", "second")
        return tuple(zip(names, self.arms))


class RouteDecider:
    """Checks a route request and decides it, for one arm table, one signing key and the samples in
    ``view`` (which the ingress keeps current)."""

    def __init__(
        self,
        arm_ids: Sequence[str],
        view: SampleView,
        signer: DecisionSigner,
        ttl_s: float,
        limits: LimitsSpec,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.arm_ids = tuple(arm_ids)
        self.arm_index = {a: i for i, a in enumerate(self.arm_ids)}
        self.view = view
        self.signer = signer
        self.ttl_s = float(ttl_s)
        self.limits = limits
        self.clock = clock

    # ------------------------------------------------------------------ checks
    def check_query(self, text: str) -> str:
        if not text.strip():
            raise InvalidRequest("query is empty")
        if len(text) > self.limits.max_query_chars:
            raise PayloadTooLarge(f"query has {len(text)} characters; the limit is {self.limits.max_query_chars}")
        return text

    def offered(
        self, candidates: Sequence[str] | None, mode: str, restrict: Sequence[int] | None = None
    ) -> list[int] | None:
        """Indices of the arms the request offers (None: every arm), within ``restrict`` when given
        (e.g. the arms that answer chat completions)."""
        if mode not in MODES:
            raise InvalidRequest(f"mode must be one of {list(MODES)}, got {mode!r}")
        if candidates is None:
            idx = None if restrict is None else list(restrict)
        else:
            if len(candidates) > self.limits.max_candidates:
                raise InvalidRequest(f"candidates: {len(candidates)} ids; the limit is {self.limits.max_candidates}")
            if len(set(candidates)) != len(candidates):
                raise InvalidRequest("candidates: duplicate arm ids")
            idx = []
            for c in candidates:
                if c not in self.arm_index:
                    raise UnknownArmError(f"unknown arm {c[:200]!r}; GET /v1/arms lists the known arms")
                idx.append(self.arm_index[c])
            if restrict is not None:
                idx = [i for i in idx if i in restrict]
                if not idx:
                    raise InvalidRequest("none of the candidates has an upstream to answer chat completions")
        n = len(self.arm_ids) if idx is None else len(idx)
        if mode == "duel" and n < 2:
            raise InvalidRequest("duel mode needs at least two candidate arms")
        return idx

    def cost_weight(self, value: float) -> float:
        v = float(value)
        if not math.isfinite(v) or v < 0 or v > self.limits.max_cost_weight:
            raise InvalidRequest(f"cost_weight must be a finite number in [0, {self.limits.max_cost_weight}]")
        return v

    # ---------------------------------------------------------------- decision
    def decide(self, x: np.ndarray, offered: Sequence[int] | None, mode: str, cost_weight: float) -> Decision:
        """Choose for the query embedding ``x`` (checked ``offered``, ``mode`` and ``cost_weight``)
        and sign the decision; a duel's id carries the embedding its choice was made on."""
        x = quantise(x)  # the decision id carries float16; rank on exactly that
        first, second, version = self.view.choose(x, offered, mode, cost_weight)
        expires = int(self.clock() + self.ttl_s)
        decision_id = self.signer.issue(
            new_nonce(), expires, mode, first, second, offered, x if mode == "duel" else None
        )
        picked = (first,) if mode == "single" else (first, int(second))  # type: ignore[arg-type]
        return Decision(
            decision_id=decision_id,
            mode=mode,
            picked=picked,
            arms=tuple(self.arm_ids[i] for i in picked),
            posterior_version=version,
            expires_at=expires,
            x=x,
        )

    def feedback_claims(self, decision_id: str) -> DecisionClaims:
        """The claims of a genuine, live duel decision of this arm table (the 4xx errors otherwise)."""
        return self.signer.verify_duel(decision_id, self.clock())
