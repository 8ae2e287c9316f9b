"""One call to an arm's OpenAI-compatible upstream (httpx, async), classified when it fails.

Each function here makes exactly one attempt; retries, backoff, fallback and the circuit breaker
are :mod:`ray_router.serve.resilience`'s. A failure is a :class:`CallFailed` (an
:class:`~ray_router.serve.errors.UpstreamError`, so a 502 wherever it escapes) with its ``kind``,
the label of ``ray_router_arm_errors_total``: ``timeout``, ``connect``, ``http_429``, ``http_5xx``,
``http_4xx``, ``bad_body``, ``stream_broken`` or ``config``.

What went wrong upstream (its error text, its base URL, a missing key) goes to the replica's log;
the client's 502 says only that the arm's upstream failed, and how (timeout, unreachable, the HTTP
status it answered).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from ray_router.serve.config import UpstreamSpec
from ray_router.serve.errors import UpstreamError, error_body

HOP_HEADERS = ("content-length", "transfer-encoding", "connection", "content-encoding")
# failures worth another call to the same arm (the brief of issue 14: 429, 5xx, timeouts,
# connection errors; a stream that closed before its first event is a connection error)
RETRYABLE = frozenset({"timeout", "connect", "http_429", "http_5xx", "stream_broken"})
# failures that say nothing about the arm's health: it answered, and refused this request
NEUTRAL = frozenset({"http_4xx"})

logger = logging.getLogger("ray.serve")


class CallFailed(UpstreamError):
    """One upstream call failed: ``kind`` (the metric label), the upstream's ``Retry-After`` in
    seconds (when it sent one) and its HTTP status (when it answered)."""

    def __init__(self, message: str, kind: str, retry_after_s: float | None = None, status: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.retry_after_s = retry_after_s
        self.status = status

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE

    @property
    def counts_against_arm(self) -> bool:
        """Whether the circuit breaker counts it: not a plain 4xx (the arm is up and refused this request)."""
        return self.kind not in NEUTRAL


def _fail(client_message: str, kind: str, log_detail: str, **kw: Any) -> CallFailed:
    """The client's message (no internals) and the operator's detail (logged)."""
    logger.warning(f"upstream failure ({kind}): {log_detail}")
    return CallFailed(client_message, kind, **kw)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds or seconds == float("inf"):  # NaN, inf
        return None
    return max(0.0, seconds)


def build_request(upstream: UpstreamSpec, body: dict[str, Any]) -> tuple[str, dict[str, str], dict[str, Any]]:
    """URL, headers and JSON body for ``upstream``."""
    payload = {k: v for k, v in body.items() if k != "router"}
    payload["model"] = upstream.model
    headers = {"content-type": "application/json"}
    key_env = upstream.api_key_env
    if key_env:
        key = os.environ.get(key_env)
        if not key:
            raise _fail("the arm's upstream is not configured", "config", f"${key_env} is not set on the ingress")
        headers["authorization"] = f"Bearer {key}"
    return f"{upstream.base_url}/chat/completions", headers, payload


def _http_failure(resp: httpx.Response, text: str) -> CallFailed:
    try:
        detail = json.loads(text)
        if isinstance(detail, dict):
            err = detail.get("error", detail)
            text = err.get("message", json.dumps(err)) if isinstance(err, dict) else str(err)
    except ValueError:
        pass
    status = resp.status_code
    logger.warning(f"upstream {resp.request.url} answered {status}: {text[:500]}")
    kind = "http_429" if status == 429 else "http_5xx" if status >= 500 else "http_4xx"
    retry_after = parse_retry_after(resp.headers.get("retry-after"))
    return CallFailed(f"the arm's upstream answered HTTP {status}", kind, retry_after_s=retry_after, status=status)


def _transport_failure(upstream: UpstreamSpec, e: BaseException) -> CallFailed:
    if isinstance(e, (httpx.TimeoutException, TimeoutError, asyncio.TimeoutError)):
        return _fail("the arm's upstream timed out", "timeout", f"{upstream.base_url}: {e!r}")
    return _fail("the arm's upstream is unreachable", "connect", f"{upstream.base_url}: {e!r}")


async def complete(
    client: httpx.AsyncClient, upstream: UpstreamSpec, body: dict[str, Any], timeout_s: float | None = None
) -> dict[str, Any]:
    """One non-streaming call, within ``timeout_s`` in all (connect, send, the whole answer)."""
    url, headers, payload = build_request(upstream, body)
    try:
        resp = await asyncio.wait_for(client.post(url, headers=headers, json=payload), timeout_s)
    except (httpx.HTTPError, TimeoutError, asyncio.TimeoutError) as e:
        raise _transport_failure(upstream, e) from None
    if resp.status_code != 200:
        raise _http_failure(resp, resp.text)
    try:
        out = resp.json()
    except ValueError:
        raise _fail("the arm's upstream answered with a body that is not JSON", "bad_body", upstream.base_url) from None
    choices = out.get("choices") if isinstance(out, dict) else None
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise _fail("the arm's upstream answered without a 'choices' list", "bad_body", upstream.base_url)
    return out


@dataclass
class OpenStream:
    """A streaming answer whose status was 200 and whose first event has arrived (``head``: the
    lines up to and including it); ``lines`` goes on from there. ``injected_usage``: the router
    asked for the usage chunk (the client did not), so the relay keeps it to itself."""

    resp: httpx.Response
    lines: AsyncIterator[str]
    head: list[str]
    started: float  # perf_counter when the call began
    first_event_s: float  # from the call's start to the first event (time to first token)
    injected_usage: bool = False
    usage: dict[str, Any] | None = field(default=None)


async def open_stream(
    client: httpx.AsyncClient,
    upstream: UpstreamSpec,
    body: dict[str, Any],
    timeout_s: float | None = None,
    ask_usage: bool = True,
) -> OpenStream:
    """Send a streaming request and wait, within ``timeout_s``, for a 200 and the first event: until
    then nothing has reached the client, so a failure can still fall back to another arm. With
    ``ask_usage`` and no ``stream_options`` from the client, ask for the usage chunk."""
    url, headers, payload = build_request(upstream, body)
    payload["stream"] = True
    injected = ask_usage and "stream_options" not in payload
    if injected:
        payload["stream_options"] = {"include_usage": True}
    req = client.build_request("POST", url, headers=headers, json=payload)
    t0 = time.perf_counter()
    opened: list[httpx.Response] = []

    async def first_event() -> tuple[httpx.Response, AsyncIterator[str], list[str]]:
        resp = await client.send(req, stream=True)
        opened.append(resp)
        if resp.status_code != 200:
            text = (await resp.aread()).decode("utf-8", "replace")
            raise _http_failure(resp, text)
        lines = resp.aiter_lines()
        head: list[str] = []
        async for line in lines:
            head.append(line)
            if line.startswith("data:"):
                return resp, lines, head
        raise _fail("the arm's upstream closed its stream before any event", "stream_broken", upstream.base_url)

    try:
        resp, lines, head = await asyncio.wait_for(first_event(), timeout_s)
    except BaseException as e:
        for r in opened:
            await r.aclose()
        if isinstance(e, (httpx.HTTPError, TimeoutError, asyncio.TimeoutError)):
            raise _transport_failure(upstream, e) from None
        raise
    return OpenStream(resp, lines, head, t0, time.perf_counter() - t0, injected)


async def relay_stream(
    stream: OpenStream,
    arm_id: str,
    router_info: dict[str, Any],
    on_done: Callable[[bool | None, OpenStream], None] | None = None,
) -> AsyncIterator[bytes]:
    """Server-sent events from the upstream with ``model`` set to the arm id; the first chunk also
    carries ``router`` (decision id, arms). Lines that are not JSON data pass through unchanged. A
    usage chunk the router asked for itself is kept back (its usage in ``stream.usage``), and the
    ``usage: null`` of the other chunks removed. ``on_done(ok, stream)`` at the end: True (the
    upstream finished), False (it broke mid-stream: the client gets an error event) or None (the
    client went away)."""
    first = True
    outcome: bool | None = None

    async def lines() -> AsyncIterator[str]:
        for line in stream.head:
            yield line
        async for line in stream.lines:
            yield line

    try:
        async for line in lines():
            if not line:
                continue
            if not line.startswith("data:"):
                yield f"{line}\n".encode()
                continue
            data = line[5:].strip()
            if data != "[DONE]":
                try:
                    obj = json.loads(data)
                except ValueError:
                    obj = None
                if isinstance(obj, dict) and obj.get("error"):  # its text is the log's, not the client's
                    outcome = False
                    logger.warning(f"upstream {stream.resp.request.url} sent an error mid-stream: {data[:500]}")
                    yield _sse_error("the arm's upstream reported an error mid-stream", router_info)
                    return
                if isinstance(obj, dict):
                    if isinstance(obj.get("usage"), dict):
                        stream.usage = obj["usage"]
                    if stream.injected_usage:
                        if obj.get("choices") == [] and "usage" in obj:
                            continue  # the usage chunk the client did not ask for
                        obj.pop("usage", None)
                    obj["model"] = arm_id
                    if first:
                        obj["router"] = router_info
                        first = False
                    data = json.dumps(obj, separators=(",", ":"))
            yield f"data: {data}\n\n".encode()
        outcome = True
    except httpx.HTTPError as e:
        outcome = False
        logger.warning(f"upstream stream of {arm_id} broke: {e!r}")
        yield _sse_error(f"upstream stream broke: {type(e).__name__}", router_info)
    finally:
        await stream.resp.aclose()
        if on_done is not None:
            on_done(outcome, stream)


def _sse_error(message: str, router_info: dict[str, Any]) -> bytes:
    """A broken stream's last event: the error object of a 502 ``upstream_error`` answer."""
    err = error_body(UpstreamError.http_status, UpstreamError.code, message, decision_id=router_info.get("decision_id"))
    return f"data: {json.dumps(err)}\n\n".encode()


def merge_answers(arm_ids: list[str], answers: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat completion the client gets from the answers of the picked arms (in slot order): the
    first answer with ``model`` set to its arm id; for a duel, each answer's first choice as choice
    ``index`` 0 and 1 (with its arm id as ``model``) and the two usages summed."""
    out = answers[0]
    out["model"] = arm_ids[0]
    if len(answers) > 1:
        choices = []
        for slot, (arm, ans) in enumerate(zip(arm_ids, answers)):
            ch = dict(ans["choices"][0]) if ans["choices"] else {}
            ch["index"], ch["model"] = slot, arm
            choices.append(ch)
        out["choices"] = choices
        usage = [u for a in answers if isinstance(u := a.get("usage"), dict)]
        if usage:
            out["usage"] = {
                k: sum(u.get(k, 0) for u in usage if isinstance(u.get(k, 0), (int, float)))
                for k in ("prompt_tokens", "completion_tokens", "total_tokens")
            }
    return out
