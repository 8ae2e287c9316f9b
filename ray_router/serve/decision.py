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
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace

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
    # what the choice was made on: a chat decision is signed only once its arms have answered
    # (:meth:`RouteDecider.served`), so it keeps them
    offered: tuple[int, ...] | None = None
    cost_weight: float = 0.0
    x: np.ndarray | None = field(default=None, repr=False, compare=False)
    # (count, pool size): the served arms were the choice of count of the pool's samples, one drawn
    # uniformly (SampleView.choose_with_propensity); None: unknown (a fallback replaced an arm)
    propensity: tuple[int, int] | None = None

    @property
    def propensity_value(self) -> float | None:
        return None if self.propensity is None else self.propensity[0] / self.propensity[1]

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
        retired: Collection[int] = (),
    ) -> None:
        self.arm_ids = tuple(arm_ids)
        self.retired = frozenset(int(i) for i in retired)  # never offered
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
        self,
        candidates: Sequence[str] | None,
        mode: str,
        restrict: Sequence[int] | None = None,
        exclude: Collection[int] = (),
    ) -> list[int] | None:
        """Indices of the arms the request offers (None: every arm), within ``restrict`` when given
        (e.g. the arms that answer chat completions). ``exclude`` (arms whose circuit breaker is
        open) leaves the list after the request's own checks: the result may then be shorter than
        a duel needs, or empty, which the caller handles (a single arm, or no arm to answer)."""
        if mode not in MODES:
            raise InvalidRequest(f"mode must be one of {list(MODES)}, got {mode!r}")
        retired = self.retired
        if candidates is None:
            idx = None if restrict is None else list(restrict)
            if retired:
                idx = [i for i in (range(len(self.arm_ids)) if idx is None else idx) if i not in retired]
        else:
            if len(candidates) > self.limits.max_candidates:
                raise InvalidRequest(f"candidates: {len(candidates)} ids; the limit is {self.limits.max_candidates}")
            if len(set(candidates)) != len(candidates):
                raise InvalidRequest("candidates: duplicate arm ids")
            idx = []
            for c in candidates:
                if c not in self.arm_index:
                    raise UnknownArmError(f"unknown arm {c[:200]!r}; GET /v1/arms lists the known arms")
                if self.arm_index[c] in retired:
                    raise InvalidRequest(f"candidates: arm {c[:200]!r} is retired (GET /v1/arms)")
                idx.append(self.arm_index[c])
            if restrict is not None:
                idx = [i for i in idx if i in restrict]
                if not idx:
                    raise InvalidRequest("none of the candidates has an upstream to answer chat completions")
        n = len(self.arm_ids) if idx is None else len(idx)
        if mode == "duel" and n < 2:
            raise InvalidRequest("duel mode needs at least two candidate arms")
        if exclude:
            idx = [i for i in (range(len(self.arm_ids)) if idx is None else idx) if i not in exclude]
        return idx

    def cost_weight(self, value: float) -> float:
        v = float(value)
        if not math.isfinite(v) or v < 0 or v > self.limits.max_cost_weight:
            raise InvalidRequest(f"cost_weight must be a finite number in [0, {self.limits.max_cost_weight}]")
        return v

    # ---------------------------------------------------------------- decision
    def decide(
        self, x: np.ndarray, offered: Sequence[int] | None, mode: str, cost_weight: float, sign: bool = True
    ) -> Decision:
        """Choose for the query embedding ``x`` (checked ``offered``, ``mode`` and ``cost_weight``)
        and sign the decision; a duel's id carries the embedding its choice was made on. ``sign=False``
        leaves ``decision_id`` empty: a chat request's decision is signed by :meth:`served` for the
        arms that actually answered, so no id ever names an arm whose call failed."""
        x = quantise(x)  # the decision id carries float16; rank on exactly that
        first, second, version, propensity = self.view.choose_with_propensity(x, offered, mode, cost_weight)
        expires = int(self.clock() + self.ttl_s)
        picked = (first,) if mode == "single" else (first, int(second))  # type: ignore[arg-type]
        dec = Decision(
            decision_id="",
            mode=mode,
            picked=picked,
            arms=tuple(self.arm_ids[i] for i in picked),
            posterior_version=version,
            expires_at=expires,
            offered=None if offered is None else tuple(int(i) for i in offered),
            cost_weight=float(cost_weight),
            x=x,
            propensity=propensity,
        )
        return self._sign(dec) if sign else dec

    def _sign(self, dec: Decision) -> Decision:
        second = dec.picked[1] if dec.mode == "duel" else None
        x = dec.x if dec.mode == "duel" else None
        propensity = dec.propensity if dec.mode == "duel" else None  # a single id takes no feedback: keep it short
        token = self.signer.issue(
            new_nonce(), dec.expires_at, dec.mode, dec.picked[0], second, dec.offered, x, propensity
        )
        return replace(dec, decision_id=token)

    def served(self, dec: Decision, picked: Sequence[int], failed: Sequence[int] = ()) -> Decision:
        """The signed decision for the arms that actually answered (``picked``, in slot order: two
        make a duel, one a ``single`` decision that takes no feedback) on ``dec``'s query embedding;
        the arms in ``failed`` leave the offered set (they were not available this round). A failed
        call thus never reaches the posterior as a preference."""
        if not 1 <= len(picked) <= 2 or len(set(picked)) != len(picked):
            raise ValueError(f"a decision serves one arm or two different arms, got {list(picked)}")
        offered = dec.offered
        if failed and offered is not None:
            offered = tuple(i for i in offered if i not in failed or i in picked)
        elif failed:
            offered = tuple(i for i in range(len(self.arm_ids)) if i not in failed or i in picked)
        mode = "duel" if len(picked) == 2 else "single"
        picked = tuple(int(i) for i in picked)
        # the sampling probability is that of the pair the route chose; a fallback's pair has none
        propensity = dec.propensity if picked == dec.picked and mode == dec.mode else None
        out = replace(
            dec,
            mode=mode,
            picked=picked,
            arms=tuple(self.arm_ids[i] for i in picked),
            offered=offered,
            propensity=propensity,
        )
        return self._sign(out)

    def ranked(self, dec: Decision, slot: int = 0) -> list[int]:
        """The arms ``dec`` offered, best first, as its slot ``slot`` ranks them under the current
        samples: where a failed arm's fallback comes from."""
        if dec.x is None:
            raise ValueError("the decision carries no query embedding")
        return self.view.ranked(dec.x, dec.offered, dec.mode, dec.cost_weight, slot)

    def feedback_claims(self, decision_id: str) -> DecisionClaims:
        """The claims of a genuine, live duel decision of this arm table (the 4xx errors otherwise)."""
        return self.signer.verify_duel(decision_id, self.clock())
