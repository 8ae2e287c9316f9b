"""Forwarding a chat completion to an arm's OpenAI-compatible upstream (httpx, async).

What went wrong upstream (its error text, its base URL, a missing key) goes to the replica's log;
the client's 502 says only that the arm's upstream failed, and how (timeout, unreachable, the HTTP
status it answered).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx

from ray_router.serve.config import UpstreamSpec
from ray_router.serve.errors import UpstreamError, error_body

HOP_HEADERS = ("content-length", "transfer-encoding", "connection", "content-encoding")

logger = logging.getLogger("ray.serve")


def _fail(client_message: str, log_detail: str) -> UpstreamError:
    """The client's message (no internals) and the operator's detail (logged)."""
    logger.warning(f"upstream failure: {log_detail}")
    return UpstreamError(client_message)


def build_request(upstream: UpstreamSpec, body: dict[str, Any]) -> tuple[str, dict[str, str], dict[str, Any]]:
    """URL, headers and JSON body for ``upstream``."""
    payload = {k: v for k, v in body.items() if k != "router"}
    payload["model"] = upstream.model
    headers = {"content-type": "application/json"}
    key_env = upstream.api_key_env
    if key_env:
        key = os.environ.get(key_env)
        if not key:
            raise _fail("the arm's upstream is not configured", f"${key_env} is not set on the ingress")
        headers["authorization"] = f"Bearer {key}"
    return f"{upstream.base_url}/chat/completions", headers, payload


def _error_message(resp: httpx.Response, text: str) -> str:
    try:
        detail = json.loads(text)
        if isinstance(detail, dict):
            err = detail.get("error", detail)
            text = err.get("message", json.dumps(err)) if isinstance(err, dict) else str(err)
    except ValueError:
        pass
    logger.warning(f"upstream {resp.request.url} answered {resp.status_code}: {text[:500]}")
    return f"the arm's upstream answered HTTP {resp.status_code}"


async def complete(client: httpx.AsyncClient, upstream: UpstreamSpec, body: dict[str, Any]) -> dict[str, Any]:
    url, headers, payload = build_request(upstream, body)
    try:
        resp = await client.post(url, headers=headers, json=payload)
    except httpx.TimeoutException as e:
        raise _fail("the arm's upstream timed out", f"{upstream.base_url}: {e!r}") from None
    except httpx.HTTPError as e:
        raise _fail("the arm's upstream is unreachable", f"{upstream.base_url}: {e!r}") from None
    if resp.status_code != 200:
        raise UpstreamError(_error_message(resp, resp.text))
    try:
        out = resp.json()
    except ValueError:
        raise _fail("the arm's upstream answered with a body that is not JSON", f"{upstream.base_url}") from None
    choices = out.get("choices") if isinstance(out, dict) else None
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise _fail("the arm's upstream answered without a 'choices' list", f"{upstream.base_url}")
    return out


async def open_stream(client: httpx.AsyncClient, upstream: UpstreamSpec, body: dict[str, Any]) -> httpx.Response:
    """Send a streaming request; return the open response once its status is 200."""
    url, headers, payload = build_request(upstream, body)
    payload["stream"] = True
    req = client.build_request("POST", url, headers=headers, json=payload)
    try:
        resp = await client.send(req, stream=True)
    except httpx.HTTPError as e:
        raise _fail("the arm's upstream is unreachable", f"{upstream.base_url}: {e!r}") from None
    if resp.status_code != 200:
        text = (await resp.aread()).decode("utf-8", "replace")
        await resp.aclose()
        raise UpstreamError(_error_message(resp, text))
    return resp


async def relay_stream(resp: httpx.Response, arm_id: str, router_info: dict[str, Any]) -> AsyncIterator[bytes]:
    """Server-sent events from the upstream with ``model`` set to the arm id; the first chunk also
    carries ``router`` (decision id, arms). Lines that are not JSON data pass through unchanged."""
    first = True
    try:
        async for line in resp.aiter_lines():
            if not line:
                continue
            if line.startswith("data:"):
                data = line[5:].strip()
                if data != "[DONE]":
                    try:
                        obj = json.loads(data)
                    except ValueError:
                        obj = None
                    if isinstance(obj, dict) and obj.get("error"):  # its text is the log's, not the client's
                        logger.warning(f"upstream {resp.request.url} sent an error mid-stream: {data[:500]}")
                        yield _sse_error("the arm's upstream reported an error mid-stream", router_info)
                        return
                    if isinstance(obj, dict):
                        obj["model"] = arm_id
                        if first:
                            obj["router"] = router_info
                            first = False
                        data = json.dumps(obj, separators=(",", ":"))
                yield f"data: {data}\n\n".encode()
            else:
                yield f"{line}\n".encode()
    except httpx.HTTPError as e:
        yield _sse_error(f"upstream stream broke: {type(e).__name__}", router_info)
    finally:
        await resp.aclose()


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
