"""Shadow duels: the router learns from an LLM judge when no one posts ``/v1/feedback``.

For a sampled share (``judge.sample_rate``) of the chat requests of the judged modes
(``judge.modes``, default ``single``), once the user has the answer (a detached task started after
the answer is produced; a stream: once the relayed stream has ended), the ingress

1. picks the duel's second arm as the policy picks a duel's second arm for this query: θ²'s best
   offered arm other than the served one (:func:`ray_router.serve.ranking.choose_duel` on the
   published samples, the request's cost weight included), and asks its upstream the same request
   (not streamed); a ``duel``-mode request already has both answers;
2. asks the judge which answer is better in both orders (A = served, B = second; then swapped), to
   cancel position bias: a verdict needs both orders to name the same answer, anything else
   (a disagreement, a tie) is a tie (:func:`combine`);
3. records the verdict through the posterior's durable feedback path (``Posterior.feedback`` with
   ``source="judge"``), on a duel decision id signed with the served decision's nonce, arms,
   offered set and query embedding: the log links it to the ``X-Router-Decision-Id`` the user got,
   and the posterior weighs it ``judge.weight`` times a human verdict.

A failed second arm, a failed or unreadable judge call, a broken stream or a refused write gives no
verdict (counted as an error). An hourly budget (USD of the judge's calls and the second arms'
answers, and/or judge calls; per ingress replica, per clock hour) stops new duels once spent:
they are counted as ``budget_skipped``. No part of this runs before the user's answer is out.

The pure parts (prompt rendering, verdict parsing, the both-orders rule, the budget, sampling) have
no Ray; :class:`JudgeMetrics` and :class:`AgreementMetrics` import ``ray.util.metrics`` when built.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ray_router.serve.config import JudgeSpec, UpstreamSpec

logger = logging.getLogger("ray.serve")

DEFAULT_PROMPT_TEMPLATE = """\
You are an impartial judge. Compare two answers to the user's request below and decide which one is \
better: more correct, more helpful and more complete. The order of the answers and their length \
must not influence you.

[The user's request]
{question}

[Answer A]
{answer_a}

[Answer B]
{answer_b}

Reply with one word: A if answer A is better, B if answer B is better, or tie if they are equally good."""

PLACEHOLDERS = ("{question}", "{answer_a}", "{answer_b}")
VERDICTS = ("A", "B", "tie")
RESULTS = ("first", "second", "tie")  # a duel's outcome (the feedback's outcome labels)
CALL_OUTCOMES = ("ok", "error", "budget_skipped")
DUEL_OUTCOMES = ("verdict", "error", "budget_skipped", "busy", "skipped")


# ---------------------------------------------------------------------------------- prompt
def render_prompt(template: str | None, question: str, answer_a: str, answer_b: str) -> str:
    """The judge's prompt: ``template`` (None: :data:`DEFAULT_PROMPT_TEMPLATE`) with its three
    placeholders replaced once each, in one pass (an answer that contains ``{answer_b}`` or braces
    stays as it is: no ``str.format``)."""
    template = DEFAULT_PROMPT_TEMPLATE if template is None else template
    values = {"{question}": question, "{answer_a}": answer_a, "{answer_b}": answer_b}
    return re.sub(r"\{question\}|\{answer_a\}|\{answer_b\}", lambda m: values[m.group(0)], template)


def message_text(content: Any) -> str:
    """The text of a chat message's ``content`` (a string, or a list of parts with ``text``)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def question_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """What the judge is shown as the user's request: the one user message of a one-turn chat, else
    the conversation as ``[role]`` blocks (system prompts included: they shape the answers)."""
    turns = [(str(m.get("role", "")), message_text(m.get("content"))) for m in messages if isinstance(m, dict)]
    turns = [(r, t) for r, t in turns if t]
    if len(turns) == 1:
        return turns[0][1]
    return "\n\n".join(f"[{role}]\n{text}" for role, text in turns)


def answer_text(choice: Any) -> str | None:
    """The text of a chat completion choice (None: no text, e.g. only tool calls)."""
    msg = choice.get("message") if isinstance(choice, dict) else None
    text = message_text(msg.get("content")) if isinstance(msg, dict) else ""
    return text or None


def stream_text(chunks: Sequence[bytes]) -> str | None:
    """The answer of a relayed stream (its ``data:`` events' choice-0 deltas; None: no text).
    Raises ValueError when the stream carries an error event (it broke: no answer to judge)."""
    parts: list[str] = []
    for line in b"".join(chunks).decode("utf-8", "replace").splitlines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            continue
        try:
            obj = json.loads(data)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        if "error" in obj:
            raise ValueError("the stream ended with an error event")
        for ch in obj.get("choices") or ():
            if isinstance(ch, dict) and ch.get("index", 0) == 0 and isinstance(ch.get("delta"), dict):
                content = ch["delta"].get("content")
                if isinstance(content, str):
                    parts.append(content)
    text = "".join(parts)
    return text or None


# ---------------------------------------------------------------------------------- verdicts
_WORD = {"a": "A", "b": "B", "tie": "tie", "draw": "tie", "equal": "tie", "both": "tie", "neither": "tie"}
_ONE = (
    r"(?:(?:the\s+)?(?:final\s+)?(?:verdict|answer|winner|choice|output|decision)\s*(?:is)?\s*[:\-]?\s*)?"
    r"(?:(?:answer|response|assistant|option)\s+)?"
    r"(a|b|tie|draw|equal|both|neither)"
    r"(?:\s+(?:is\s+)?(?:better|wins|good|equally\s+good|are\s+equally\s+good|are\s+equal))?"
)
_SHORT = re.compile(rf"^{_ONE}$")
_BRACKETS = re.compile(r"\[\[\s*(a|b|c|tie)\s*\]\]", re.I)
_LABELLED = re.compile(r"(?:final\s+verdict|verdict|final\s+answer|winner)\s*(?:is)?\s*[:\-]\s*\W*(a|b|tie)\b", re.I)


def _normalise(text: str) -> str:
    t = text.strip().lower()
    t = re.sub(r"[*_`\"'“”‘’«»()\[\]{}<>]", " ", t)  # markdown and quotes around the word
    t = re.sub(r"[.!,;:]+\s*$", "", t.strip())  # final punctuation
    return re.sub(r"\s+", " ", t).strip()


def parse_verdict(text: Any) -> str | None:
    """``"A"``, ``"B"`` or ``"tie"`` from a judge's reply, or None when it says none of them
    clearly. Accepted: the word alone (any case, in quotes, bold or brackets, with final
    punctuation), ``Answer A``, ``A is better``, ``Verdict: B``, ``[[A]]`` (MT-bench's style; ``[[C]]``
    is a tie) anywhere, or a last line of that kind after some reasoning. A reply that names both,
    e.g. ``[[A]] ... [[B]]``, is None."""
    if not isinstance(text, str) or not text.strip():
        return None
    brackets = {m.lower() for m in _BRACKETS.findall(text)}
    if brackets:
        if len(brackets) != 1:
            return None
        (b,) = brackets
        return {"a": "A", "b": "B"}.get(b, "tie")
    lines = [ln for ln in (_normalise(x) for x in text.strip().splitlines()) if ln]
    for candidate in (_normalise(text), lines[-1] if lines else "", lines[0] if lines else ""):
        m = _SHORT.match(candidate)
        if m:
            return _WORD[m.group(1)]
    labelled = {m.lower() for m in _LABELLED.findall(text)}
    if len(labelled) == 1:
        return _WORD[labelled.pop()]
    return None


def combine(served_first: str, served_second: str) -> str:
    """The duel's outcome (``first``: the served arm's answer is better, ``second``, ``tie``) from
    the judge's verdicts in both orders: ``served_first`` with the served answer as A,
    ``served_second`` with it as B. Only two verdicts that name the same answer make a winner; a
    disagreement or a tie in either order is a tie."""
    if served_first == "A" and served_second == "B":
        return "first"
    if served_first == "B" and served_second == "A":
        return "second"
    return "tie"


# ---------------------------------------------------------------------------------- budget
class HourlyBudget:
    """What may be spent per clock hour (``floor(t / 3600)``): USD and/or judge calls (None: no
    limit). A duel reserves its judge calls before it starts (so concurrent duels cannot overshoot
    the call limit) and gives back those it did not make; USD is added once known, so duels already
    running when the USD limit is reached may pass it by their own cost."""

    def __init__(
        self, usd_per_hour: float | None, calls_per_hour: int | None, clock: Callable[[], float] = time.time
    ) -> None:
        self.usd_limit, self.calls_limit, self.clock = usd_per_hour, calls_per_hour, clock
        self.hour = -1
        self.usd = 0.0
        self.calls = 0

    def _roll(self) -> None:
        hour = int(self.clock() // 3600)
        if hour != self.hour:
            self.hour, self.usd, self.calls = hour, 0.0, 0

    def reserve(self, calls: int) -> bool:
        """Take ``calls`` judge calls of this hour's budget: False (and nothing taken) when the
        hour's USD or calls are spent."""
        self._roll()
        if self.usd_limit is not None and self.usd >= self.usd_limit:
            return False
        if self.calls_limit is not None and self.calls + calls > self.calls_limit:
            return False
        self.calls += calls
        return True

    def refund(self, calls: int) -> None:
        """Give back reserved calls that were not made (this hour's only)."""
        self._roll()
        self.calls = max(0, self.calls - calls)

    def spend(self, usd: float) -> None:
        self._roll()
        self.usd += max(0.0, float(usd))


# ---------------------------------------------------------------------------------- metrics
# name -> (kind, tag keys, description); Ray prefixes ``ray_`` and Prometheus adds ``_total``
METRICS = {
    "router_judge_calls": ("counter", ("outcome",), "judge calls by outcome: ok, error, budget_skipped"),
    "router_judge_cost_usd": ("counter", ("what",), "USD spent by shadow duels: what is judge or second_arm"),
    "router_judge_verdicts": ("counter", ("result",), "judge verdicts recorded, by result first/second/tie"),
    "router_judge_second_arm_calls": ("counter", ("arm", "outcome"), "second-arm answers asked for shadow duels"),
    "router_judge_duels": (
        "counter",
        ("outcome",),
        "shadow duels by outcome: verdict, error, budget_skipped, busy (max_inflight), skipped (nothing to judge)",
    ),
    "router_judge_agreement": (
        "counter",
        ("result",),
        "decisions with both a human and a judge verdict: agree or disagree",
    ),
}


def _counter(name: str):
    from ray.util import metrics

    _, tags, desc = METRICS[name]
    return metrics.Counter(name, description=desc, tag_keys=tags)


class JudgeMetrics:
    """The ingress's judge counters (``ray.util.metrics``)."""

    def __init__(self) -> None:
        self.calls = _counter("router_judge_calls")
        self.cost = _counter("router_judge_cost_usd")
        self.verdicts = _counter("router_judge_verdicts")
        self.second_arm = _counter("router_judge_second_arm_calls")
        self.duels = _counter("router_judge_duels")


class AgreementMetrics:
    """The posterior's agreement counter (it sees both verdicts of a decision)."""

    def __init__(self) -> None:
        self.agreement = _counter("router_judge_agreement")


class _Nothing:
    def inc(self, *args: Any, **kwargs: Any) -> None:
        pass


class _NoMetrics:
    calls = cost = verdicts = second_arm = duels = agreement = _Nothing()


# ---------------------------------------------------------------------------------- the duel
class JudgeCallFailed(Exception):
    """A judge call gave no verdict (the call failed, or its reply names none)."""


class NoJudge:
    """The ingress's judge when ``judge:`` is not configured: every hook does nothing."""

    enabled = False

    def after_answer(self, req: Any, dec: Any, body: dict, out: dict) -> None:
        return None

    def stream(self, gen: AsyncIterator[bytes], req: Any, dec: Any, body: dict) -> AsyncIterator[bytes]:
        return gen

    def stats(self) -> dict[str, Any] | None:
        return None

    def set_arms(self, arm_ids: Any, upstreams: Any, view: Any, signer: Any) -> None:
        return None


class ShadowJudge:
    """One ingress replica's shadow duels (see the module docstring).

    ``feedback(decision_id, outcome, request_id, source)``: the posterior's durable feedback call;
    ``signer``: the decision signer (a judged single-mode decision gets a duel id with its nonce);
    ``view``: the ingress's :class:`~ray_router.serve.ranking.SampleView`; ``upstreams``: one per
    arm (None: no chat); ``http``: the ingress's client for the arms (the judge gets its own, with
    ``spec.timeout_s``)."""

    enabled = True

    def __init__(
        self,
        spec: JudgeSpec,
        arm_ids: Sequence[str],
        upstreams: Sequence[UpstreamSpec | None],
        view: Any,
        signer: Any,
        http: Any,
        feedback: Callable[..., Awaitable[dict]],
        metrics: Any = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        import httpx

        self.spec = spec
        self.arm_ids = tuple(arm_ids)
        self.upstreams = tuple(upstreams)
        self.view, self.signer, self.http, self.feedback = view, signer, http, feedback
        self.judge_http = httpx.AsyncClient(timeout=httpx.Timeout(spec.timeout_s, connect=min(10.0, spec.timeout_s)))
        self.metrics = metrics if metrics is not None else _NoMetrics()
        self.rng = rng or random.Random()
        self.clock = clock
        self.budget = HourlyBudget(spec.budget.usd_per_hour, spec.budget.calls_per_hour, clock)
        self.modes = frozenset(spec.modes)
        self._tasks: set[asyncio.Task] = set()
        self.counts: dict[str, dict[str, float]] = {
            "duels": {k: 0 for k in DUEL_OUTCOMES},
            "calls": {k: 0 for k in CALL_OUTCOMES},
            "verdicts": {k: 0 for k in RESULTS},
            "second_arm": {"ok": 0, "error": 0},
            "cost_usd": {"judge": 0.0, "second_arm": 0.0},
        }

    def set_arms(self, arm_ids: Sequence[str], upstreams: Sequence[Any], view: Any, signer: Any) -> None:
        """The ingress serves another arm table (arms added or retired at runtime): duel in it."""
        self.arm_ids, self.upstreams, self.view, self.signer = tuple(arm_ids), tuple(upstreams), view, signer

    @classmethod
    def for_ingress(cls, ingress: Any) -> ShadowJudge | NoJudge:
        """The judge of an :class:`~ray_router.serve.ingress.Ingress` (its spec's ``judge``; None: a
        :class:`NoJudge`), built from the ingress's own parts."""
        spec = ingress.spec
        if spec.judge is None:
            return NoJudge()
        return cls(
            spec.judge,
            spec.arm_ids,
            spec.upstreams,
            ingress.view,
            ingress.decider.signer,
            ingress.http,
            lambda *args: ingress._posterior("feedback", *args),
            JudgeMetrics(),
        )

    # ------------------------------------------------------------------ hooks
    def _sampled(self, mode: str) -> bool:
        rate = self.spec.sample_rate
        return mode in self.modes and rate > 0 and (rate >= 1 or self.rng.random() < rate)

    def after_answer(self, req: Any, dec: Any, body: dict, out: dict) -> asyncio.Task | None:
        """Chat, not streamed: called with the answer the user is about to get (``out``); starts the
        shadow duel as a detached task for a sampled request. Never raises."""
        try:
            if not self._sampled(dec.mode):
                return None
            choices = out.get("choices") or []
            answers = [answer_text(c) for c in choices[: len(dec.picked)]]
            return self._start(req, dec, body, answers)
        except Exception as e:  # noqa: BLE001 - the user's answer must never suffer from the judge
            logger.warning(f"judge: could not start a shadow duel: {e!r}")
            return None

    def stream(self, gen: AsyncIterator[bytes], req: Any, dec: Any, body: dict) -> AsyncIterator[bytes]:
        """Chat, streamed: the relayed stream, unchanged; for a sampled request the shadow duel starts
        once it has ended (a stream the client dropped, or one that broke, starts none)."""
        if not self._sampled(dec.mode):
            return gen
        return self._tee(gen, req, dec, body)

    async def _tee(self, gen: AsyncIterator[bytes], req: Any, dec: Any, body: dict) -> AsyncIterator[bytes]:
        chunks: list[bytes] = []
        async for chunk in gen:
            chunks.append(chunk)
            yield chunk
        try:
            try:
                text = stream_text(chunks)
            except ValueError:  # the upstream's stream broke: no answer, no verdict
                self._count_duel("error")
                return
            self._start(req, dec, body, [text])
        except Exception as e:  # noqa: BLE001 - the stream is done; never fail it
            logger.warning(f"judge: could not start a shadow duel: {e!r}")

    def stats(self) -> dict[str, Any]:
        """This replica's counters (``/v1/stats`` → ``judge``)."""
        return {
            **{k: dict(v) for k, v in self.counts.items()},
            "inflight": len(self._tasks),
            "budget": {"hour": self.budget.hour, "usd": self.budget.usd, "calls": self.budget.calls},
            "sample_rate": self.spec.sample_rate,
            "modes": sorted(self.modes),
        }

    async def drain(self) -> None:
        """Wait for the shadow duels in flight (tests, benchmarks)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # ------------------------------------------------------------------ the task
    def _count_duel(self, outcome: str) -> None:
        self.counts["duels"][outcome] += 1
        self.metrics.duels.inc(1, tags={"outcome": outcome})

    def _count_call(self, outcome: str, n: int = 1) -> None:
        self.counts["calls"][outcome] += n
        self.metrics.calls.inc(n, tags={"outcome": outcome})

    def _cost(self, what: str, usd: float) -> None:
        if usd > 0:
            self.counts["cost_usd"][what] += usd
            self.metrics.cost.inc(usd, tags={"what": what})
            self.budget.spend(usd)

    def _start(self, req: Any, dec: Any, body: dict, answers: list[str | None]) -> asyncio.Task | None:
        if len(self._tasks) >= self.spec.max_inflight:
            self._count_duel("busy")
            return None
        if len(answers) < len(dec.picked) or any(a is None for a in answers):
            self._count_duel("skipped")  # an answer without text (e.g. tool calls only): nothing to judge
            return None
        if not self.budget.reserve(2):
            self._count_duel("budget_skipped")
            self._count_call("budget_skipped", 2)
            return None
        task = asyncio.get_running_loop().create_task(self._duel(req, dec, body, answers))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _duel(self, req: Any, dec: Any, body: dict, answers: list[str | None]) -> str | None:
        """One shadow duel (its judge calls are reserved): the outcome recorded, or None."""
        await asyncio.sleep(0)  # one turn of the loop first: the user's response goes out before any of this
        try:
            if dec.mode == "duel":
                decision_id, first_answer, second_answer = dec.decision_id, answers[0], answers[1]
            else:
                made = await self._second_answer(req, dec, body)
                if made is None:
                    self.budget.refund(2)
                    return None
                decision_id, second_answer = made
                first_answer = answers[0]
            assert first_answer is not None and second_answer is not None
            question = question_text(body.get("messages") or [])
            served_a, served_b = await asyncio.gather(
                self._ask(question, first_answer, second_answer),
                self._ask(question, second_answer, first_answer),
                return_exceptions=True,
            )
            if isinstance(served_a, BaseException) or isinstance(served_b, BaseException):
                self._count_duel("error")
                return None
            outcome = combine(served_a, served_b)
            nonce = self.signer.verify(decision_id, self.clock()).nonce
            await self.feedback(decision_id, outcome, f"judge-{nonce}", "judge")
            self.counts["verdicts"][outcome] += 1
            self.metrics.verdicts.inc(1, tags={"result": outcome})
            self._count_duel("verdict")
            return outcome
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - no verdict; counted and logged
            logger.warning(f"judge: shadow duel of {dec.arms[0]!r} failed: {e!r}")
            self._count_duel("error")
            return None

    def _second_arm(self, req: Any, dec: Any) -> tuple[int, Any] | None:
        """The duel's second arm for a single-mode decision, and the decision's claims (None: no
        other arm is offered)."""
        claims = self.signer.verify(dec.decision_id, self.clock())  # the nonce and expiry to sign with
        first = int(dec.picked[0])
        view = self.view
        # the decision's own offered set and checked cost weight, as the route ranked them
        mask, penalty = view.mask_penalty(dec.offered, dec.cost_weight)
        mask &= np.array([u is not None for u in self.upstreams])
        if mask.sum() < 2:
            return None
        return view.second_for(dec.x, first, mask, penalty), claims

    async def _second_answer(self, req: Any, dec: Any, body: dict) -> tuple[str, str] | None:
        """Ask the second arm; ``(duel decision id, its answer)``, or None (counted)."""
        from ray_router.serve import upstream

        picked = self._second_arm(req, dec)
        if picked is None:
            self._count_duel("skipped")
            return None
        second, claims = picked
        up = self.upstreams[second]
        assert up is not None  # the mask holds chat arms only
        arm = self.arm_ids[second]
        payload = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        try:
            answer = await upstream.complete(self.http, up, payload)
            text = answer_text((answer.get("choices") or [None])[0])
            if text is None:
                raise ValueError("the answer has no text")
        except Exception as e:  # noqa: BLE001 - a failed call is never a preference
            logger.warning(f"judge: second arm {arm!r} failed: {e!r}")
            self.counts["second_arm"]["error"] += 1
            self.metrics.second_arm.inc(1, tags={"arm": arm, "outcome": "error"})
            self._count_duel("error")
            return None
        self.counts["second_arm"]["ok"] += 1
        self.metrics.second_arm.inc(1, tags={"arm": arm, "outcome": "ok"})
        if up.price is not None:
            self._cost("second_arm", up.price.usd(answer.get("usage")))
        decision_id = self.signer.issue(
            claims.nonce, claims.expires_at, "duel", int(dec.picked[0]), second, claims.offered, dec.x
        )
        return decision_id, text

    async def _ask(self, question: str, answer_a: str, answer_b: str) -> str:
        """One judge call: ``A``, ``B`` or ``tie``; raises :class:`JudgeCallFailed` (counted)."""
        from ray_router.serve import upstream

        prompt = render_prompt(self.spec.prompt_template, question, answer_a, answer_b)
        body = {**self.spec.params, "messages": [{"role": "user", "content": prompt}]}
        try:
            out = await upstream.complete(self.judge_http, self.spec.upstream, body)
        except Exception as e:  # noqa: BLE001 - UpstreamError and anything else: no verdict
            self._count_call("error")
            raise JudgeCallFailed(f"judge call failed: {e!r}") from None
        price = self.spec.upstream.price
        if price is not None:
            self._cost("judge", price.usd(out.get("usage")))
        reply = answer_text((out.get("choices") or [None])[0])
        verdict = parse_verdict(reply)
        if verdict is None:
            self._count_call("error")
            logger.warning(f"judge: reply names no verdict: {str(reply)[:200]!r}")
            raise JudgeCallFailed("the judge's reply names no verdict")
        self._count_call("ok")
        return verdict
