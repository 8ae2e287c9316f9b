"""A loopback stand-in for OpenAI-compatible upstreams: chat models of known quality, a judge, embeddings.

The router's tests cannot reach a hosted LLM, so this small HTTP server speaks the parts of the real
OpenAI protocol the router uses (``POST /v1/chat/completions`` with and without ``stream``,
``POST /v1/embeddings``, ``GET /v1/models``, errors as ``{"error": {"message", "type", "code"}}``)
with behaviour a test controls:

- **Answer quality.** Each :class:`StubModel` answers a prompt correctly with probability
  ``quality`` (a float, or a ``{category: p}`` dict with ``default`` for unknown categories). A
  prompt's category comes from ``categories`` (prompt text -> category) or, failing that, from a
  ``[category]`` tag anywhere in the prompt (``"[math] What is 2+2?"``). A correct answer is the
  prompt's reference answer (``references``: prompt text -> answer) or ``"correct"``; a wrong one is
  ``"I do not know."``. Whether an answer is correct is a deterministic function of (seed, model,
  prompt, the how-many-th time this model sees this prompt), so a run is reproducible and a
  repeated prompt is a fresh draw. Every answer ends with the marker ``[stub:<model>]``.
- **A judge.** A :class:`StubJudge` model answers a pairwise prompt with ``"A"`` or ``"B"``: it
  finds the ``[stub:<model>]`` markers in the prompt (the first is answer A, the second answer B)
  and names the answer of the stronger model (``strength``: model -> number; ties and unknown
  models: the correct-looking answer) with probability ``accuracy``, the other one otherwise. No
  two markers: ``"tie"``.
- **Latency and failures.** ``latency_s`` before a JSON answer, ``ttft_s`` before a stream's first
  chunk; :meth:`StubModel.fail_next` makes the next ``n`` requests answer an HTTP error (429 with
  ``Retry-After``, 500, ...); ``down`` makes the server drop the connection without an answer; and
  :meth:`StubServer.stop` closes the port (connection refused), as a killed upstream does.
- **Embeddings.** With ``embed`` (a function from a list of texts to a list of vectors), the server
  answers ``/v1/embeddings``.

Every request is recorded in :attr:`StubServer.requests` (path, model, authorization, body).

Usage::

    with StubServer({"good": StubModel("good", 0.9), "bad": StubModel("bad", 0.2)}) as up:
        up.base_url   # "http://127.0.0.1:PORT/v1"
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MARKER = re.compile(r"\[stub:([^\]\s]+)\]")
TAG = re.compile(r"\[([A-Za-z0-9_\-]+)\]")
WRONG = "I do not know."


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from ``parts``."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def _words(text: str) -> int:
    return max(1, len(text.split()))


@dataclass
class StubModel:
    """One chat model of the stub: its answer quality, latency and injected failures."""

    name: str
    quality: float | Mapping[str, float] = 0.5
    latency_s: float = 0.0
    ttft_s: float = 0.0
    down: bool = False
    _failures: list[tuple[int, str, float | None]] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def p_correct(self, category: str | None) -> float:
        if isinstance(self.quality, (int, float)):
            return float(self.quality)
        q = self.quality
        if category is not None and category in q:
            return float(q[category])
        return float(q.get("default", 0.5))

    def fail_next(
        self, n: int = 1, status: int = 500, message: str = "upstream exploded", retry_after: float | None = None
    ) -> None:
        """The next ``n`` requests to this model answer HTTP ``status`` (with ``Retry-After`` when given)."""
        with self._lock:
            self._failures.extend([(status, message, retry_after)] * n)

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def _take_failure(self) -> tuple[int, str, float | None] | None:
        with self._lock:
            return self._failures.pop(0) if self._failures else None


@dataclass
class StubJudge:
    """A pairwise judge model: names the stronger model's answer with probability ``accuracy``."""

    name: str = "judge"
    strength: Mapping[str, float] = field(default_factory=dict)
    accuracy: float = 0.8
    latency_s: float = 0.0

    def verdict(self, prompt: str, draw: float) -> str:
        found = list(MARKER.finditer(prompt))
        if len(found) < 2:
            return "tie"
        a, b = found[0].group(1), found[1].group(1)
        sa, sb = self.strength.get(a), self.strength.get(b)
        if sa is None or sb is None or sa == sb:
            # no strengths to go by: the answer that is not the wrong one
            a_ok, b_ok = (not prompt[: m.start()].rstrip().endswith(WRONG) for m in found[:2])
            if a_ok == b_ok:
                return "tie"
            better = "A" if a_ok else "B"
        else:
            better = "A" if sa > sb else "B"
        worse = "B" if better == "A" else "A"
        return better if draw < self.accuracy else worse


class StubServer:
    """The stub upstream on a free loopback port (``with`` starts and stops it)."""

    def __init__(
        self,
        models: Mapping[str, StubModel] | None = None,
        *,
        judge: StubJudge | None = None,
        categories: Mapping[str, str] | None = None,
        references: Mapping[str, str] | None = None,
        embed: Callable[[list[str]], list[list[float]]] | None = None,
        api_key: str | None = None,
        seed: int = 0,
    ) -> None:
        self.models: dict[str, StubModel] = dict(models or {})
        self.judge = judge
        self.categories = dict(categories or {})
        self.references = dict(references or {})
        self.embed = embed
        self.api_key = api_key
        self.seed = seed
        self.requests: list[dict[str, Any]] = []
        self._seen: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # ---------------------------------------------------------------- lifecycle
    def start(self, port: int = 0) -> StubServer:
        stub = self

        class Handler(_Handler):
            server_stub = stub

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the port: later connections are refused, as with a killed upstream."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> StubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # ---------------------------------------------------------------- behaviour
    def category_of(self, prompt: str) -> str | None:
        if prompt in self.categories:
            return self.categories[prompt]
        m = TAG.search(prompt)
        return m.group(1) if m else None

    def answer(self, model: StubModel, prompt: str) -> tuple[str, bool]:
        """The model's answer to ``prompt`` and whether it is correct."""
        with self._lock:
            k = self._seen.get((model.name, prompt), 0)
            self._seen[(model.name, prompt)] = k + 1
        correct = _unit(self.seed, model.name, prompt, k) < model.p_correct(self.category_of(prompt))
        text = self.references.get(prompt, "correct") if correct else WRONG
        return f"{text} [stub:{model.name}]", correct

    def count(self, model: str | None = None, path: str = "/v1/chat/completions") -> int:
        return sum(1 for r in list(self.requests) if r["path"] == path and (model is None or r["model"] == model))


def prompt_text(body: Mapping[str, Any]) -> str:
    """The text of a chat request's last user message (strings or text parts)."""
    for msg in reversed(body.get("messages") or []):
        if isinstance(msg, dict) and msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _all_text(body: Mapping[str, Any]) -> str:
    parts = []
    for msg in body.get("messages") or []:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p.get("text", "") for p in content if isinstance(p, dict))
    return "\n".join(parts)


class _Handler(BaseHTTPRequestHandler):
    server_stub: StubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        # headers and body go out in two writes: without this, Nagle + delayed ACK add ~40 ms to
        # every keep-alive request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # ------------------------------------------------------------------ I/O
    def _json(self, status: int, obj: Any, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, code: str, headers: Mapping[str, str] | None = None) -> None:
        kind = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(status)
        err = {"message": message, "type": kind or ("server_error" if status >= 500 else "invalid_request_error")}
        self._json(status, {"error": {**err, "code": code, "param": None}}, headers)

    def _authorized(self) -> bool:
        key = self.server_stub.api_key
        if key is None or self.headers.get("authorization") == f"Bearer {key}":
            return True
        self._error(401, "Incorrect API key provided.", "invalid_api_key")
        return False

    def do_GET(self) -> None:
        stub = self.server_stub
        stub.requests.append(
            {"path": self.path, "model": None, "auth": self.headers.get("authorization"), "body": None}
        )
        if not self._authorized():
            return
        if self.path.rstrip("/") != "/v1/models":
            return self._error(404, f"no such path {self.path}", "not_found")
        names = list(stub.models) + ([stub.judge.name] if stub.judge else [])
        self._json(
            200,
            {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "stub"} for n in names]},
        )

    def do_POST(self) -> None:
        stub = self.server_stub
        raw = self.rfile.read(int(self.headers.get("content-length", 0) or 0))
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None
        model_name = body.get("model") if isinstance(body, dict) else None
        stub.requests.append(
            {"path": self.path, "model": model_name, "auth": self.headers.get("authorization"), "body": body}
        )
        if not self._authorized():
            return
        if not isinstance(body, dict):
            return self._error(400, "the body is not a JSON object", "invalid_json")
        if self.path == "/v1/embeddings":
            return self._embeddings(body)
        if self.path != "/v1/chat/completions":
            return self._error(404, f"no such path {self.path}", "not_found")
        if stub.judge is not None and model_name == stub.judge.name:
            return self._judge(body)
        model = stub.models.get(model_name or "")
        if model is None:
            return self._error(404, f"The model `{model_name}` does not exist.", "model_not_found")
        if model.down:
            self.close_connection = True
            self.connection.shutdown(2)  # the socket closes with no answer
            return
        failure = model._take_failure()
        if failure is not None:
            status, message, retry_after = failure
            headers = {} if retry_after is None else {"retry-after": f"{retry_after:g}"}
            return self._error(status, message, "rate_limit_exceeded" if status == 429 else "upstream_failure", headers)
        text, _ = stub.answer(model, prompt_text(body))
        usage = {"prompt_tokens": _words(_all_text(body)), "completion_tokens": _words(text)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if body.get("stream"):
            return self._stream(model, text, usage, bool((body.get("stream_options") or {}).get("include_usage")))
        time.sleep(model.latency_s)
        self._json(
            200,
            {
                "id": f"chatcmpl-{len(stub.requests)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": usage,
            },
        )

    def _stream(self, model: StubModel, text: str, usage: dict[str, int], include_usage: bool) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("connection", "close")
        self.end_headers()
        self.close_connection = True
        time.sleep(model.ttft_s)
        base = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": int(time.time()), "model": model.name}
        pieces = text.split(" ")
        for i, piece in enumerate(pieces):
            delta: dict[str, Any] = {"content": (" " if i else "") + piece}
            if i == 0:
                delta["role"] = "assistant"
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            if i == 0 and model.latency_s > model.ttft_s:
                time.sleep(model.latency_s - model.ttft_s)
        last = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        self.wfile.write(f"data: {json.dumps(last)}\n\n".encode())
        if include_usage:
            self.wfile.write(f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _judge(self, body: dict[str, Any]) -> None:
        stub = self.server_stub
        judge = stub.judge
        assert judge is not None
        prompt = _all_text(body)
        with stub._lock:
            k = stub._seen.get((judge.name, prompt), 0)
            stub._seen[(judge.name, prompt)] = k + 1
        verdict = judge.verdict(prompt, _unit(stub.seed, judge.name, prompt, k))
        time.sleep(judge.latency_s)
        usage = {"prompt_tokens": _words(prompt), "completion_tokens": 1, "total_tokens": _words(prompt) + 1}
        self._json(
            200,
            {
                "id": "chatcmpl-judge",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": judge.name,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": verdict}, "finish_reason": "stop"}
                ],
                "usage": usage,
            },
        )

    def _embeddings(self, body: dict[str, Any]) -> None:
        stub = self.server_stub
        if stub.embed is None:
            return self._error(404, "this stub serves no embeddings", "not_found")
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts) or not texts:
            return self._error(400, "'input' must be a string or a non-empty list of strings", "invalid_input")
        vectors = stub.embed(texts)
        tokens = sum(_words(t) for t in texts)
        self._json(
            200,
            {
                "object": "list",
                "model": body.get("model"),
                "data": [
                    {"object": "embedding", "index": i, "embedding": list(map(float, v))} for i, v in enumerate(vectors)
                ],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )
