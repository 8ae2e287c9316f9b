"""Per-arm resilience without Ray (ray_router/serve/resilience.py): the backoff and Retry-After
rules, the circuit breaker's states on a fake clock, and the retry / fallback driver calling real
loopback HTTP upstreams (tests/openai_stub.py) with the real RouteDecider, its waits recorded
instead of slept."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import socket
import threading
from collections import defaultdict

import httpx
import numpy as np
import pytest

from ray_router.serve import upstream
from ray_router.serve.config import LimitsSpec, ResilienceSpec, TokenPrice, UpstreamSpec
from ray_router.serve.decision import RouteDecider
from ray_router.serve.errors import UpstreamError, headers_of
from ray_router.serve.ranking import SampleView
from ray_router.serve.resilience import STATE_VALUE, CircuitBreaker, Resilience, backoff_s, retry_delay
from ray_router.serve.state import make_scorer
from ray_router.serve.tokens import DecisionSigner
from ray_router.serve.upstream import CallFailed, parse_retry_after
from tests.openai_stub import StubModel, StubServer
from tests.serve.helpers import ARMS, PRICES, arm_embeddings, hash_encoder

KEY = "resilience-test-key-0123456789"
CONFIG = {"feature_map": "hadamard_bias", "n_steps": 5, "distinct_arms": True}
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]


# ------------------------------------------------------------------------ backoff
def test_backoff_doubles_up_to_its_cap_with_equal_jitter():
    for retry, step in ((1, 0.2), (2, 0.4), (3, 0.8), (4, 1.6), (5, 2.0), (9, 2.0)):
        assert backoff_s(retry, 0.2, 2.0, 0.0) == pytest.approx(step / 2)
        assert backoff_s(retry, 0.2, 2.0, 0.999999) == pytest.approx(step, rel=1e-5)
        assert step / 2 <= backoff_s(retry, 0.2, 2.0, 0.37) <= step


@pytest.mark.parametrize(
    "failure, retry, expected",
    [
        (CallFailed("x", "http_5xx"), 1, "backoff"),
        (CallFailed("x", "timeout"), 2, "backoff"),
        (CallFailed("x", "connect"), 1, "backoff"),
        (CallFailed("x", "http_429", retry_after_s=1.5), 1, 1.5),  # Retry-After wins over the backoff
        (CallFailed("x", "http_429", retry_after_s=30.0), 1, None),  # longer than retry_after_max_s: give up
        (CallFailed("x", "http_5xx", retry_after_s=0.0), 1, 0.0),
        (CallFailed("x", "http_4xx", status=400), 1, None),  # other 4xx: never retried
        (CallFailed("x", "bad_body"), 1, None),
        (CallFailed("x", "config"), 1, None),
        (CallFailed("x", "http_5xx"), 3, None),  # attempts spent (3 calls)
    ],
)
def test_retry_delay(failure, retry, expected):
    spec = ResilienceSpec(attempts=3, backoff_base_s=0.2, backoff_max_s=2.0, retry_after_max_s=5.0)
    got = retry_delay(failure, retry, spec, 0.5)
    if expected == "backoff":
        assert got == pytest.approx(backoff_s(retry, 0.2, 2.0, 0.5))
    else:
        assert got == expected


def test_parse_retry_after():
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None and parse_retry_after("nan") is None
    date = email.utils.formatdate(1_000_030.0, usegmt=True)
    assert parse_retry_after(date, now=1_000_000.0) == pytest.approx(30.0)


# ------------------------------------------------------------------------ breaker
class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_breaker_opens_after_the_threshold_and_probes_back_once():
    clock = Clock()
    b = CircuitBreaker(failure_threshold=3, cooldown_s=10.0, clock=clock)
    assert b.state == "closed" and b.available() and b.acquire()
    b.failure()
    b.failure()
    b.success()  # an answer resets the run of failures
    b.failure()
    b.failure()
    assert b.state == "closed" and b.failures == 2
    b.failure()
    assert b.state == "open" and not b.available() and not b.acquire()
    assert b.retry_in_s() == pytest.approx(10.0)
    clock.t += 9.9
    assert b.state == "open" and not b.available()
    clock.t += 0.1
    assert b.state == "half_open" and b.available()
    assert b.acquire()  # the probe
    assert b.state == "half_open" and not b.available() and not b.acquire()  # one probe at a time
    b.failure()  # the probe failed: open for another cooldown
    assert b.state == "open" and b.retry_in_s() == pytest.approx(10.0) and b.times_opened == 2
    clock.t += 10.0
    assert b.acquire()
    b.release()  # no verdict (a 4xx, or the client went away): another request may probe
    assert b.available() and b.acquire()
    b.success()
    assert b.state == "closed" and b.failures == 0 and b.available()
    assert b.to_dict() == {"state": "closed", "consecutive_failures": 0, "retry_in_s": 0.0, "times_opened": 2}


def test_breaker_with_threshold_one_opens_on_the_first_failure():
    b = CircuitBreaker(1, 5.0, clock=Clock())
    b.failure()
    assert b.state == "open"


# ------------------------------------------------------------------- the driver
class Recorder:
    """Stands in for a ray.util.metrics object: records each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, dict]] = []

    def inc(self, value=1.0, tags=None):
        assert value > 0  # Ray's Counter refuses anything else
        self.calls.append((value, dict(tags or {})))

    def observe(self, value, tags=None):
        self.calls.append((value, dict(tags or {})))

    set = observe

    def total(self, **tags) -> float:
        return sum(v for v, t in self.calls if all(t.get(k) == w for k, w in tags.items()))


class FakeMetrics:
    def __init__(self) -> None:
        self._r: dict[str, Recorder] = defaultdict(Recorder)

    def __getattr__(self, name: str) -> Recorder:
        return self._r[name]


@pytest.fixture
def stub():
    models = {a: StubModel(a, 0.9) for a in ARMS}
    with StubServer(models) as up:
        yield up


def make_decider() -> RouteDecider:
    scorer = make_scorer(arm_embeddings(), CONFIG)
    view = SampleView(scorer, PRICES)
    theta = np.random.default_rng(0).normal(size=(2, scorer.theta_mean.shape[-1]))
    view.update(7, theta, theta[0] * 0.5)
    return RouteDecider(ARMS, view, DecisionSigner(KEY, ARMS), 600.0, LimitsSpec())


class Harness:
    """A Resilience over the stub (every arm answers through it), its sleeps recorded."""

    def __init__(self, stub: StubServer, price: TokenPrice | None = None, **spec) -> None:
        self.stub = stub
        self.decider = make_decider()
        ups = [UpstreamSpec(base_url=stub.base_url, model=a, price=price) for a in ARMS]
        self.spec = ResilienceSpec(**{"attempt_timeout_s": 5.0, **spec})
        self.metrics = FakeMetrics()
        self.sleeps: list[float] = []
        self.clock = Clock()
        self.client = httpx.AsyncClient(timeout=10.0)

        async def sleep(s: float) -> None:
            self.sleeps.append(s)

        self.res = Resilience(ARMS, ups, self.spec, self.client, None, self.metrics, sleep=sleep, clock=self.clock)

    def decide(self, mode: str = "single", candidates=None):
        offered, mode = self.res.offer(self.decider, candidates, mode, list(range(len(ARMS))))
        x = hash_encoder(arm_embeddings().shape[1]).encode(["What is 2 + 2?"])[0]
        return self.decider.decide(x, offered, mode, 0.0, sign=False)

    def run(self, coro):
        async def go():
            try:
                return await coro
            finally:
                await self.client.aclose()

        return asyncio.run(go())

    def body(self, **extra):
        return {"model": "router", "messages": MESSAGES, **extra}


def test_a_429_with_retry_after_is_waited_out_then_the_same_arm_answers(stub):
    h = Harness(stub)
    dec = h.decide()
    arm = dec.arms[0]
    stub.models[arm].fail_next(1, 429, retry_after=1.5)
    served = h.run(h.res.complete(h.decider, dec, h.body()))
    assert served.decision.arms == (arm,) and served.failed == [] and h.sleeps == [1.5]
    assert stub.count(arm) == 2 and served.answers[0]["choices"][0]["message"]["content"].endswith(f"[stub:{arm}]")
    assert h.metrics.requests.total(arm=arm) == 2 and h.metrics.retries.total(arm=arm) == 1
    assert h.metrics.errors.total(arm=arm, kind="http_429") == 1 and h.metrics.fallbacks.calls == []
    claims = h.decider.signer.verify(served.decision.decision_id)
    assert claims.mode == "single" and claims.first == ARMS.index(arm)


def test_500_on_every_attempt_falls_back_to_the_next_ranked_arm(stub):
    h = Harness(stub, attempts=3)
    dec = h.decide()
    arm = dec.picked[0]
    stub.models[ARMS[arm]].fail_next(10, 500)
    served = h.run(h.res.complete(h.decider, dec, h.body()))
    expected = next(i for i in h.decider.ranked(dec, 0) if i != arm)
    assert served.decision.picked == (expected,) and served.failed == [arm]
    assert stub.count(ARMS[arm]) == 3 and stub.count(ARMS[expected]) == 1
    assert len(h.sleeps) == 2 and h.sleeps[1] > h.sleeps[0] * 0.9  # backoff between the 3 calls
    assert h.metrics.fallbacks.total(arm=ARMS[arm]) == 1 and h.metrics.errors.total(arm=ARMS[arm]) == 3
    info, headers = h.res.router_info(served)
    assert headers["X-Router-Fallback"] == ARMS[arm] and info["fallback"] == [ARMS[arm]]
    assert headers["X-Router-Model"] == ARMS[expected] and info["arms"] == [ARMS[expected]]


def test_a_4xx_is_not_retried_and_does_not_count_against_the_arm(stub):
    h = Harness(stub, failure_threshold=1)
    dec = h.decide()
    arm = dec.arms[0]
    stub.models[arm].fail_next(1, 400, message="bad parameter")
    served = h.run(h.res.complete(h.decider, dec, h.body()))
    assert stub.count(arm) == 1 and h.sleeps == [] and served.failed == [dec.picked[0]]
    assert h.res.breakers[dec.picked[0]].state == "closed"  # a threshold of 1 would have opened it
    assert h.metrics.errors.total(arm=arm, kind="http_4xx") == 1


def test_duel_with_a_failing_arm_is_served_by_the_survivor_and_a_fallback_signed_as_a_duel(stub):
    h = Harness(stub, attempts=2)
    dec = h.decide("duel")
    first, second = dec.picked
    stub.models[ARMS[second]].fail_next(10, 503)
    served = h.run(h.res.complete(h.decider, dec, h.body()))
    fallback = next(i for i in h.decider.ranked(dec, 1) if i not in (first, second))
    assert served.decision.picked == (first, fallback) and served.decision.mode == "duel"
    claims = h.decider.feedback_claims(served.decision.decision_id)  # takes feedback
    assert (claims.first, claims.second) == (first, fallback)
    assert second not in claims.offered and {first, fallback} <= set(claims.offered)
    np.testing.assert_array_equal(claims.x, dec.x)  # the same query embedding
    assert [a["model"] for a in served.answers] == [ARMS[first], ARMS[fallback]]


def test_duel_without_fallback_is_served_single_and_takes_no_feedback(stub):
    h = Harness(stub, attempts=1, fallback=False)
    dec = h.decide("duel")
    first, second = dec.picked
    stub.models[ARMS[first]].fail_next(1, 500)
    served = h.run(h.res.complete(h.decider, dec, h.body()))
    assert served.decision.picked == (second,) and served.decision.mode == "single"
    from ray_router.serve.errors import NotADuel

    with pytest.raises(NotADuel):
        h.decider.feedback_claims(served.decision.decision_id)


def test_no_arm_answers_a_502_without_a_decision_id(stub):
    h = Harness(stub, attempts=2, max_fallbacks=3)
    dec = h.decide()
    for m in stub.models.values():
        m.down = True  # the connection drops without an answer
    with pytest.raises(UpstreamError) as e:
        h.run(h.res.complete(h.decider, dec, h.body()))
    assert e.value.http_status == 502 and "none of the 4 arms tried" in str(e.value)
    assert set(headers_of(e.value)["X-Router-Fallback"].split(",")) == set(ARMS)
    assert sum(h.metrics.errors.total(arm=a, kind="connect") for a in ARMS) == 8


def test_the_breaker_takes_an_arm_out_of_the_offer_and_a_probe_brings_it_back(stub):
    h = Harness(stub, attempts=1, failure_threshold=2, cooldown_s=30.0)
    candidates = ["alpha", "beta"]
    stub.models["alpha"].fail_next(2, 500)
    stub.models["beta"].fail_next(2, 500)
    for _ in range(2):
        dec = h.decide("single", candidates)
        with contextlib.suppress(UpstreamError):  # the first request falls back to beta, the second finds both failing
            h.run(h.res.complete(h.decider, dec, h.body()))
        h.client = httpx.AsyncClient(timeout=10.0)
        h.res.client = h.client
    assert {a: b["state"] for a, b in h.res.status().items() if a in candidates} == {"alpha": "open", "beta": "open"}
    assert h.metrics.breaker_state.calls[-1][0] == STATE_VALUE["open"]
    with pytest.raises(UpstreamError) as e:
        h.decide("single", candidates)
    assert headers_of(e.value)["Retry-After"] == "30"
    assert h.metrics.errors.total(arm="alpha", kind="breaker_open") == 1
    # a duel offered alpha, beta and gamma is served single by gamma, the one arm left
    offered, mode = h.res.offer(h.decider, ["alpha", "beta", "gamma"], "duel", list(range(4)))
    assert (offered, mode) == ([2], "single")
    h.clock.t += 30.0  # cooldown over: half-open, offered again
    dec = h.decide("single", ["alpha"])
    served = h.run(h.res.complete(h.decider, dec, h.body()))
    assert served.decision.arms == ("alpha",) and h.res.status()["alpha"]["state"] == "closed"


def test_a_timeout_is_retried(stub):
    h = Harness(stub, attempts=2, attempt_timeout_s=0.3, fallback=False)
    dec = h.decide()
    arm = dec.arms[0]
    stub.models[arm].latency_s = 2.0
    with pytest.raises(UpstreamError, match="timed out"):
        h.run(h.res.complete(h.decider, dec, h.body()))
    assert h.metrics.errors.total(arm=arm, kind="timeout") == 2 and h.metrics.retries.total(arm=arm) == 1


def test_tokens_and_cost_come_from_usage_and_the_price_table(stub):
    price = TokenPrice(prompt_usd_per_1m=1.0, completion_usd_per_1m=10.0)
    h = Harness(stub, price=price)
    dec = h.decide()
    served = h.run(h.res.complete(h.decider, dec, h.body()))
    usage = served.answers[0]["usage"]
    arm = dec.arms[0]
    assert h.metrics.prompt_tokens.total(arm=arm) == usage["prompt_tokens"] > 0
    assert h.metrics.completion_tokens.total(arm=arm) == usage["completion_tokens"] > 0
    assert h.metrics.cost.total(arm=arm) == pytest.approx(price.usd(usage))
    assert len(h.metrics.latency.calls) == 1


# ------------------------------------------------------------------------ streams
def _events(chunks: list[str]) -> list:
    text = "".join(c.decode() if isinstance(c, bytes) else c for c in chunks)
    return [json.loads(e[6:]) if e[6:] != "[DONE]" else "[DONE]" for e in text.split("\n\n") if e.startswith("data: ")]


def test_a_stream_that_fails_to_open_falls_back_and_the_usage_it_asked_for_stays_with_the_router(stub):
    h = Harness(stub, attempts=1)
    dec = h.decide()
    arm = dec.picked[0]
    stub.models[ARMS[arm]].fail_next(1, 502)

    async def open_and_relay():
        served = await h.res.open_stream(h.decider, dec, h.body(stream=True))
        info, _ = h.res.router_info(served)
        out = [
            c
            async for c in upstream.relay_stream(
                served.stream, served.decision.arms[0], info, h.res.stream_done(served.decision.picked[0])
            )
        ]
        return served, out

    served, chunks = h.run(open_and_relay())
    assert served.failed == [arm] and served.decision.picked[0] != arm
    events = _events(chunks)
    assert events[-1] == "[DONE]" and events[0]["router"]["fallback"] == [ARMS[arm]]
    assert all("usage" not in e for e in events[:-1]), "the usage chunk the client did not ask for leaked"
    sent = stub.requests[-1]["body"]
    assert sent["stream_options"] == {"include_usage": True}
    served_arm = served.decision.arms[0]
    assert h.metrics.completion_tokens.total(arm=served_arm) > 0 and len(h.metrics.ttft.calls) == 1


def test_a_client_that_asked_for_stream_usage_gets_it(stub):
    h = Harness(stub)
    dec = h.decide()

    async def go():
        served = await h.res.open_stream(h.decider, dec, h.body(stream=True, stream_options={"include_usage": True}))
        info, _ = h.res.router_info(served)
        return [c async for c in upstream.relay_stream(served.stream, served.decision.arms[0], info)]

    events = _events(h.run(go()))
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] > 0


class _BreakingServer:
    """An upstream whose stream sends one event and then drops the connection."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.recv(65536)
            chunk = {
                "id": "c",
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": "Hi"}}],
            }
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                + _chunked(f"data: {json.dumps(chunk)}\n\n".encode())
            )
            conn.close()  # mid-stream: no terminating chunk


def _chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def test_a_stream_that_breaks_mid_way_ends_with_an_error_event_and_counts_against_the_arm():
    server = _BreakingServer()
    ups = [UpstreamSpec(base_url=f"http://127.0.0.1:{server.port}/v1", model=a) for a in ARMS]
    metrics = FakeMetrics()
    client = httpx.AsyncClient(timeout=5.0)
    res = Resilience(ARMS, ups, ResilienceSpec(failure_threshold=1), client, 5.0, metrics)
    decider = make_decider()
    offered, mode = res.offer(decider, None, "single", list(range(4)))
    x = hash_encoder(arm_embeddings().shape[1]).encode(["hello"])[0]
    dec = decider.decide(x, offered, mode, 0.0, sign=False)

    async def go():
        try:
            served = await res.open_stream(decider, dec, {"model": "router", "messages": MESSAGES, "stream": True})
            info, _ = res.router_info(served)
            arm = served.decision.picked[0]
            return arm, [c async for c in upstream.relay_stream(served.stream, ARMS[arm], info, res.stream_done(arm))]
        finally:
            await client.aclose()

    arm, chunks = asyncio.run(go())
    events = _events(chunks)
    assert events[0]["choices"][0]["delta"]["content"] == "Hi"
    assert events[-1]["error"]["code"] == "upstream_error"
    assert metrics.errors.total(arm=ARMS[arm], kind="stream_broken") == 1
    assert res.breakers[arm].state == "open"  # failure_threshold 1
    server.sock.close()


# ---------------------------------------------------------------- ranking, purity
@pytest.mark.parametrize("cost_weight", [0.0, 0.5])
def test_the_fallback_order_starts_with_the_arm_each_slot_chose(cost_weight):
    decider = make_decider()
    enc = hash_encoder(arm_embeddings().shape[1])
    for i, text in enumerate(["sort a list", "integrate x", "a poem", "the capital of France", "prime numbers"]):
        x = enc.encode([text])[0]
        offered = None if i % 2 else [0, 1, 3]
        single = decider.decide(x, offered, "single", cost_weight, sign=False)
        order = decider.ranked(single, 0)
        assert order[0] == single.picked[0] and sorted(order) == sorted(offered or range(len(ARMS)))
        duel = decider.decide(x, offered, "duel", cost_weight, sign=False)
        first, second = duel.picked
        assert decider.ranked(duel, 0)[0] == first  # exploit-first: the posterior mean's best
        assert next(a for a in decider.ranked(duel, 1) if a != first) == second  # θ²'s best other than the first


def test_the_resilience_module_imports_no_ray():
    import subprocess
    import sys

    code = (
        "import sys, ray_router.serve.resilience\nprint(any(m == 'ray' or m.startswith('ray.') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
