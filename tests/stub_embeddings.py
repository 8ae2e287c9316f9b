"""A stand-in OpenAI-compatible embeddings server on loopback, computing REAL embeddings.

``POST /v1/embeddings`` (``{"model", "input": str | [str], "encoding_format"?: "float" | "base64",
"dimensions"?}`` -> ``{"object": "list", "data": [{"object": "embedding", "embedding", "index"}],
"model", "usage"}``) and ``GET /v1/models`` speak OpenAI's protocol, errors in its shape
(``{"error": {"message", "type", "param", "code"}}``). The vectors come from the packaged
all-MiniLM-L6-v2 loaded the way ray-router loads it (``SentenceTransformerEncoder(None,
device="cpu").model``: ``SentenceTransformer(<package folder>, device="cpu")``), so a client must get what the local encoder gives.

Controls (thread-safe, for the tests): ``requests`` (every request seen: path, auth header, body),
``n_embedding_requests``, ``fail_next(status, times, retry_after, message)`` (scripted failures, in
order, before any real answer), ``delay_next(seconds, times)`` (answer late: a client's timeout),
``scale`` (multiply every vector: a server that does not normalise), ``reverse`` (list ``data`` in
reverse ``index`` order), ``max_inputs`` (a 400 above it, as OpenAI's own input limit).

    with EmbeddingsStub() as stub:
        encoder = get_encoder(f"openai:{stub.model}@{stub.base_url}", cache_dir=False)
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

MODEL = "all-MiniLM-L6-v2"


def load_minilm() -> Any:
    """The packaged model's ``SentenceTransformer``, loaded by ray-router's own encoder class."""
    from ray_router.embeddings import SentenceTransformerEncoder

    return SentenceTransformerEncoder(None, device="cpu").model


class EmbeddingsStub:
    """The server (started by ``start`` or ``with``); see the module docstring."""

    def __init__(self, model: Any = None, model_name: str = MODEL, api_key: str | None = None):
        self.model = model_name
        self._st = model if model is not None else load_minilm()
        self.api_key = api_key  # when set, requests without ``Authorization: Bearer <it>`` get a 401
        self.scale = 1.0
        self.reverse = False
        self.max_inputs = 2048
        self.requests: list[dict] = []
        self._script: deque[tuple[str, Any]] = deque()
        self._lock = threading.Lock()
        self._encode_lock = threading.Lock()  # one forward pass at a time
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ controls
    def fail_next(self, status: int, times: int = 1, retry_after: str | None = None, message: str = "") -> None:
        with self._lock:
            for _ in range(times):
                self._script.append(("fail", (status, retry_after, message or f"stub failure {status}")))

    def delay_next(self, seconds: float, times: int = 1) -> None:
        with self._lock:
            for _ in range(times):
                self._script.append(("delay", seconds))

    def reset(self) -> None:
        with self._lock:
            self._script.clear()
            self.requests.clear()
        self.scale, self.reverse, self.max_inputs = 1.0, False, 2048

    @property
    def n_embedding_requests(self) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r["path"] == "/v1/embeddings")

    def embed(self, texts: list[str]) -> np.ndarray:
        """What the server answers for ``texts`` (before ``scale``)."""
        with self._encode_lock:
            out = self._st.encode(list(texts), batch_size=64, convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)

    # ------------------------------------------------------------------ lifecycle
    @property
    def base_url(self) -> str:
        assert self._server is not None, "start the stub first"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> EmbeddingsStub:
        stub = self

        class Handler(_Handler):
            owner = stub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> EmbeddingsStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _next_action(self) -> tuple[str, Any] | None:
        with self._lock:
            return self._script.popleft() if self._script else None


def _error(message: str, kind: str = "invalid_request_error", code: str | None = None, param: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Handler(BaseHTTPRequestHandler):
    owner: EmbeddingsStub
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _send(self, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a client that timed out left
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

    def _record(self, body: Any) -> None:
        with self.owner._lock:
            self.owner.requests.append({"path": self.path, "auth": self.headers.get("authorization"), "body": body})

    def _authorised(self) -> bool:
        key = self.owner.api_key
        if key is None or self.headers.get("authorization") == f"Bearer {key}":
            return True
        self._send(401, _error("Incorrect API key provided.", code="invalid_api_key"))
        return False

    def do_GET(self) -> None:
        self._record(None)
        if self.path.rstrip("/") != "/v1/models":
            return self._send(404, _error(f"Unknown path {self.path}", code="not_found"))
        if self._authorised():
            model = {"id": self.owner.model, "object": "model", "created": 0, "owned_by": "stub"}
            self._send(200, {"object": "list", "data": [model]})

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None
        self._record(body)
        if self.path != "/v1/embeddings":
            return self._send(404, _error(f"Unknown path {self.path}", code="not_found"))
        action = self.owner._next_action()
        if action is not None and action[0] == "delay":
            time.sleep(action[1])
        elif action is not None:
            status, retry_after, message = action[1]
            kind = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
            return self._send(status, _error(message, kind), {"retry-after": retry_after} if retry_after else None)
        if not self._authorised():
            return None
        if not isinstance(body, dict):
            return self._send(400, _error("We could not parse the JSON body of your request."))
        if body.get("model") != self.owner.model:
            return self._send(
                404, _error(f"The model `{body.get('model')}` does not exist", code="model_not_found", param="model")
            )
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            return self._send(400, _error("'input' must be a string or a non-empty array of strings", param="input"))
        if len(texts) > self.owner.max_inputs:
            return self._send(
                400, _error(f"'input' holds {len(texts)} items; at most {self.owner.max_inputs}", param="input")
            )
        if body.get("dimensions") is not None:
            return self._send(400, _error("This model does not support specifying dimensions.", param="dimensions"))
        X = self.owner.embed(texts) * np.float32(self.owner.scale)
        b64 = body.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(x.astype("<f4").tobytes()).decode() if b64 else x.tolist(),
            }
            for i, x in enumerate(X)
        ]
        if self.owner.reverse:
            data.reverse()
        n_tokens = sum(len(t.split()) for t in texts)
        self._send(
            200,
            {
                "object": "list",
                "data": data,
                "model": self.owner.model,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
            },
        )
