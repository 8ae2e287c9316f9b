"""Per-arm resilience of ``/v1/chat/completions``: retries, fallback, a circuit breaker per arm.

For each slot of a chat decision (one for ``single``, two for ``duel``) the ingress asks
:class:`Resilience` for an answer, and it

- **calls** the arm's upstream (:mod:`ray_router.serve.upstream`), each attempt within
  ``resilience.attempt_timeout_s``;
- **retries** the same arm (up to ``attempts`` calls) after a timeout, a connection error, a 429 or
  a 5xx, waiting an exponential backoff with jitter (:func:`backoff_s`), or the upstream's
  ``Retry-After`` when it sends one; a ``Retry-After`` longer than ``retry_after_max_s`` gives up on
  the arm for this request. Any other 4xx is never retried (and says nothing about the arm's health);
- **falls back**, when the arm failed after its retries, to the next arm in the order that slot
  ranks the offered chat arms under the *current* posterior samples (:meth:`RouteDecider.ranked`),
  skipping arms that already serve this request, failed in it, or have an open breaker; at most
  ``max_fallbacks`` other arms per slot. A stream falls back only while nothing has reached the
  client: until the upstream's status and first event are in. A stream that breaks later ends
  with an error event, and the arm counts as failed;
- keeps a **circuit breaker** per arm (:class:`CircuitBreaker`): ``failure_threshold`` failed calls
  in a row open it; an open arm leaves the offered set of chat requests (``RouteDecider.offered``'s
  ``exclude``) until ``cooldown_s`` has passed, then one request may probe it (half-open): an
  answer closes the breaker, a failure opens it again for another cooldown. The breakers live in
  each Ingress replica: every replica learns of a failing upstream by itself (within
  ``failure_threshold`` calls) and probes it back by itself.

A failed call is never turned into a preference: the decision id is signed only once the arms have
answered (:meth:`RouteDecider.served`), for the arms that did; a duel whose one slot found no
answering arm is served as a ``single`` decision (which takes no feedback), and a request no arm
could answer gets a 502 ``upstream_error`` and no decision id.

Pure asyncio and httpx (no Ray): the metrics object is passed in (``ArmMetrics`` in the service,
None in the unit tests), and the clock, the sleep and the jitter's random source can be injected.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from ray_router.serve import upstream
from ray_router.serve.config import ResilienceSpec, UpstreamSpec
from ray_router.serve.decision import Decision, RouteDecider
from ray_router.serve.errors import UpstreamError
from ray_router.serve.upstream import CallFailed, OpenStream

T = TypeVar("T")
# ray_router_arm_breaker_state's values
STATE_VALUE = {"closed": 0, "half_open": 1, "open": 2}


# ------------------------------------------------------------------------------ pure parts
def backoff_s(retry: int, base_s: float, max_s: float, u: float) -> float:
    """The wait before retry number ``retry`` (1, 2, ...): ``d = min(max_s, base_s * 2**(retry-1))``
    with "equal jitter", ``d/2 + u*d/2`` for ``u`` in [0, 1): never less than half the exponential
    step, and spread so that clients that failed together do not retry together."""
    d = min(max_s, base_s * 2.0 ** (retry - 1))
    return d * (0.5 + 0.5 * u)


def retry_delay(failure: CallFailed, retry: int, spec: ResilienceSpec, u: float) -> float | None:
    """Seconds to wait before retry number ``retry`` after ``failure``, or None: do not retry this
    arm (the failure is not retryable, the attempts are spent, or its ``Retry-After`` is longer
    than ``retry_after_max_s``)."""
    if not failure.retryable or retry >= spec.attempts:
        return None
    if failure.retry_after_s is not None:
        return failure.retry_after_s if failure.retry_after_s <= spec.retry_after_max_s else None
    return backoff_s(retry, spec.backoff_base_s, spec.backoff_max_s, u)


class CircuitBreaker:
    """One arm's breaker: closed -> open after ``failure_threshold`` failed calls in a row ->
    half-open once ``cooldown_s`` has passed (one probe call at a time) -> closed on the probe's
    success, open again (a new cooldown) on its failure.

    ``available()`` says whether the arm may be offered now; ``acquire()`` is asked right before a
    call (in half-open it hands out the one probe); the call then reports ``success()``,
    ``failure()`` or ``release()`` (no verdict: a 4xx, or the request went away)."""

    def __init__(self, failure_threshold: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic):
        self.failure_threshold = int(failure_threshold)
        self.cooldown_s = float(cooldown_s)
        self.clock = clock
        self.failures = 0  # consecutive failed calls
        self.opened_at: float | None = None
        self.probing = False
        self.times_opened = 0

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half_open" if self.clock() - self.opened_at >= self.cooldown_s else "open"

    def retry_in_s(self) -> float:
        """Seconds until the breaker lets a probe through (0 when closed or half-open)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.cooldown_s - self.clock())

    def available(self) -> bool:
        state = self.state
        return state == "closed" or (state == "half_open" and not self.probing)

    def acquire(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self.probing:
            self.probing = True
            return True
        return False

    def success(self) -> None:
        self.failures, self.opened_at, self.probing = 0, None, False

    def failure(self) -> None:
        self.failures += 1
        if self.probing or self.failures >= self.failure_threshold:
            if self.opened_at is None or self.probing:
                self.times_opened += 1
            self.opened_at, self.probing = self.clock(), False

    def release(self) -> None:
        self.probing = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "consecutive_failures": self.failures,
            "retry_in_s": round(self.retry_in_s(), 3),
            "times_opened": self.times_opened,
        }


# --------------------------------------------------------------------------- the driver
@dataclass
class Served:
    """What a chat request got: the decision signed for the arms that answered (slot order), their
    answers (non-streaming) or the open stream, and the arms that failed on the way."""

    decision: Decision
    answers: list[dict[str, Any]] = field(default_factory=list)
    stream: OpenStream | None = None
    failed: list[int] = field(default_factory=list)


@dataclass
class _SlotResult:
    arm: int | None = None
    value: Any = None
    failure: CallFailed | None = None


class Resilience:
    """Retries, fallback and breakers for the chat arms of one Ingress replica."""

    def __init__(
        self,
        arm_ids: Sequence[str],
        upstreams: Sequence[UpstreamSpec | None],
        spec: ResilienceSpec,
        client: httpx.AsyncClient,
        attempt_timeout_s: float | None = None,
        metrics: Any = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.arm_ids = tuple(arm_ids)
        self.upstreams = tuple(upstreams)
        self.spec = spec
        self.client = client
        self.timeout_s = spec.attempt_timeout_s if spec.attempt_timeout_s is not None else attempt_timeout_s
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.sleep = sleep
        self.clock = clock
        self.breakers = {
            i: CircuitBreaker(spec.failure_threshold, spec.cooldown_s, clock)
            for i, u in enumerate(self.upstreams)
            if u is not None
        }
        self.publish()

    def set_arms(self, arm_ids: Sequence[str], upstreams: Sequence[UpstreamSpec | None]) -> None:
        """The arm table grew or changed its upstreams (arms are only appended: an index keeps its
        arm): breakers of arms that still answer chat are kept, new chat arms get closed ones."""
        self.arm_ids, self.upstreams = tuple(arm_ids), tuple(upstreams)
        self.breakers = {
            i: self.breakers.get(i) or CircuitBreaker(self.spec.failure_threshold, self.spec.cooldown_s, self.clock)
            for i, u in enumerate(self.upstreams)
            if u is not None
        }
        self.publish()

    # ---------------------------------------------------------------- metrics
    def _inc(self, name: str, arm: int, value: float = 1.0, **tags: str) -> None:
        if self.metrics is not None and value > 0:
            getattr(self.metrics, name).inc(value, tags={"arm": self.arm_ids[arm], **tags})

    def _observe(self, name: str, arm: int, value: float) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name).observe(value, tags={"arm": self.arm_ids[arm]})

    def publish(self, arms: Sequence[int] | None = None) -> None:
        """Set the breaker-state gauge of ``arms`` (default: every chat arm)."""
        if self.metrics is None:
            return
        for i in self.breakers if arms is None else arms:
            self.metrics.breaker_state.set(STATE_VALUE[self.breakers[i].state], tags={"arm": self.arm_ids[i]})

    def _account(self, arm: int, usage: Any) -> None:
        """Tokens and USD of one answered call, from its ``usage``."""
        if not isinstance(usage, dict):
            return
        for key, name in (("prompt_tokens", "prompt_tokens"), ("completion_tokens", "completion_tokens")):
            v = usage.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self._inc(name, arm, float(v))
        price = getattr(self.upstreams[arm], "price", None)
        if price is not None:
            self._inc("cost", arm, price.usd(usage))

    def status(self) -> dict[str, dict[str, Any]]:
        """Each chat arm's breaker (``/v1/admin/status``)."""
        return {self.arm_ids[i]: b.to_dict() for i, b in self.breakers.items()}

    # ----------------------------------------------------------------- offer
    def offer(
        self, decider: RouteDecider, candidates: Sequence[str] | None, mode: str, chat_arms: Sequence[int]
    ) -> tuple[list[int], str]:
        """The chat arms a request offers (the request's checks, then open breakers out) and the
        mode it can be served in: a duel left with one available arm is served ``single``. No
        available arm: a 502 ``upstream_error`` with ``Retry-After`` (when the next probe is due)."""
        shut = {i for i, b in self.breakers.items() if not b.available()}
        offered = decider.offered(candidates, mode, restrict=chat_arms, exclude=shut)
        self.publish()
        if shut:
            asked = chat_arms if candidates is None else [decider.arm_index[c] for c in candidates]
            for i in asked:
                if i in shut:
                    self._inc("errors", i, kind="breaker_open")
        assert offered is not None  # restricted to the chat arms
        if not offered:
            wait = min(self.breakers[i].retry_in_s() for i in shut) if shut else 1.0
            err = UpstreamError("every offered arm's upstream is failing (circuit breaker open); retry later")
            raise err.attach({"Retry-After": str(max(1, math.ceil(wait)))})
        if mode == "duel" and len(offered) < 2:
            mode = "single"
        return offered, mode

    # ------------------------------------------------------------- one arm
    async def _attempts(self, arm: int, call: Callable[[UpstreamSpec, float | None], Awaitable[T]]) -> T:
        """Call ``arm`` until it answers, retrying as configured; raise the last CallFailed."""
        up = self.upstreams[arm]
        assert up is not None
        breaker = self.breakers[arm]
        retry = 0
        while True:
            if not breaker.acquire():
                self._inc("errors", arm, kind="breaker_open")
                raise CallFailed("the arm's circuit breaker is open", "breaker_open")
            self._inc("requests", arm)
            t0 = time.perf_counter()
            try:
                result = await call(up, self.timeout_s)
            except CallFailed as f:
                self._inc("errors", arm, kind=f.kind)
                breaker.failure() if f.counts_against_arm else breaker.release()
                self.publish([arm])
                retry += 1
                delay = retry_delay(f, retry, self.spec, self.rng.random())
                if delay is None or not breaker.available():
                    raise
                self._inc("retries", arm)
                await self.sleep(delay)
                continue
            except BaseException:  # cancelled (the client went away): no verdict on the arm
                breaker.release()
                raise
            breaker.success()
            self.publish([arm])
            if not isinstance(result, OpenStream):
                self._observe("latency", arm, time.perf_counter() - t0)
            return result

    async def _slot(
        self,
        decider: RouteDecider,
        dec: Decision,
        slot: int,
        claimed: set[int],
        failed: list[int],
        call: Callable[[UpstreamSpec, float | None], Awaitable[Any]],
    ) -> _SlotResult:
        """An answer for one slot: its arm, else the next best available arms of its ranking."""
        arm = dec.picked[slot]
        last: CallFailed | None = None
        for n_fallback in range(self.spec.max_fallbacks + 1):
            if n_fallback:
                nxt = next(
                    (i for i in decider.ranked(dec, slot) if i not in claimed and self.breakers[i].available()), None
                )
                if nxt is None:
                    break
                self._inc("fallbacks", arm)
                claimed.add(nxt)
                arm = nxt
            try:
                return _SlotResult(arm, await self._attempts(arm, call))
            except CallFailed as f:
                failed.append(arm)
                last = f
            if not self.spec.fallback:
                break
        return _SlotResult(failure=last)

    def _no_answer(self, results: Sequence[_SlotResult], failed: Sequence[int]) -> UpstreamError:
        last = next((r.failure for r in results if r.failure is not None), None)
        message = str(last) if last is not None else "the arm's upstream failed"
        if len(failed) > 1:
            message = f"none of the {len(failed)} arms tried could answer; the last: {message}"
        return UpstreamError(message).attach({"X-Router-Fallback": ",".join(self.arm_ids[i] for i in failed)})

    # ------------------------------------------------------------ requests
    async def complete(self, decider: RouteDecider, dec: Decision, body: dict[str, Any]) -> Served:
        """Answers for every slot of ``dec`` (concurrently), each with its retries and fallbacks."""
        claimed: set[int] = set(dec.picked)
        failed: list[int] = []

        async def call(up: UpstreamSpec, timeout_s: float | None) -> dict[str, Any]:
            return await upstream.complete(self.client, up, body, timeout_s)

        results = await asyncio.gather(
            *(self._slot(decider, dec, s, claimed, failed, call) for s in range(len(dec.picked)))
        )
        ok = [r for r in results if r.arm is not None]
        if not ok:
            raise self._no_answer(results, failed)
        for r in ok:
            self._account(r.arm, r.value.get("usage") if isinstance(r.value, dict) else None)  # type: ignore[arg-type]
        served = decider.served(dec, [r.arm for r in ok], failed)  # type: ignore[misc]
        return Served(served, [r.value for r in ok], None, failed)

    async def open_stream(self, decider: RouteDecider, dec: Decision, body: dict[str, Any]) -> Served:
        """An open stream from the decision's arm, or from its fallbacks while nothing was relayed."""
        failed: list[int] = []

        async def call(up: UpstreamSpec, timeout_s: float | None) -> OpenStream:
            return await upstream.open_stream(self.client, up, body, timeout_s, self.spec.stream_usage)

        result = await self._slot(decider, dec, 0, set(dec.picked), failed, call)
        if result.arm is None:
            raise self._no_answer([result], failed)
        self._observe("ttft", result.arm, result.value.first_event_s)
        return Served(decider.served(dec, [result.arm], failed), [], result.value, failed)

    def stream_done(self, arm: int) -> Callable[[bool | None, OpenStream], None]:
        """The relay's end-of-stream callback for ``arm``: latency and usage of a finished stream; a
        stream that broke mid-way counts as a failed call (``stream_broken``) for its breaker."""

        def done(ok: bool | None, stream: OpenStream) -> None:
            if ok:
                self._observe("latency", arm, time.perf_counter() - stream.started)
                self._account(arm, stream.usage)
            elif ok is False:
                self._inc("errors", arm, kind="stream_broken")
                self.breakers[arm].failure()
                self.publish([arm])

        return done

    # ------------------------------------------------------------- answers
    def router_info(self, served: Served) -> tuple[dict[str, Any], dict[str, str]]:
        """The body's ``router`` object and the ``X-Router-*`` headers of a served request."""
        dec = served.decision
        ids = list(dec.arms)
        info: dict[str, Any] = {
            "decision_id": dec.decision_id,
            "mode": dec.mode,
            "arms": ids,
            "posterior_version": dec.posterior_version,
        }
        headers = {"X-Router-Decision-Id": dec.decision_id, "X-Router-Model": ids[0], "X-Router-Arms": ",".join(ids)}
        if served.failed:
            failed = [self.arm_ids[i] for i in served.failed]
            info["fallback"] = failed
            headers["X-Router-Fallback"] = ",".join(failed)
        return info, headers
