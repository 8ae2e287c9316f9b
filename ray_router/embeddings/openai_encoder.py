"""An encoder served over HTTP: any OpenAI-compatible ``POST {base_url}/embeddings``.

A hosted API (OpenAI, and the many that copy its protocol) or a self-hosted server (Hugging Face
text-embeddings-inference, vLLM, Ollama, LiteLLM) turns texts into vectors; this module is the client.
It speaks the protocol with plain ``httpx`` (already a dependency): the official ``openai`` SDK is a
test dependency only, and its own retry loop neither caps ``Retry-After`` nor says which attempt
failed how, which a long offline encode and a serving replica both need.

Named by the spec ``openai:MODEL@URL``, optionally followed by ``#key=value,key=value`` options of
:class:`~ray_router.embeddings.options.OpenAIEncoderOptions` (a URL fragment is never sent), e.g.
``openai:text-embedding-3-small@https://api.openai.com/v1#api_key_env=OPENAI_API_KEY,max_batch_size=256``.
MODEL may not contain ``@``; the URL is the API's base (the one that ends in ``/v1``), without
credentials, query or fragment. The key comes from an environment variable, never from the spec.

Protocol: ``{"model": MODEL, "input": [texts]}`` (plus ``"dimensions"`` when that option is set) ->
``{"data": [{"embedding": [floats] or base64 float32, "index": i}, ...]}``; rows are put back in
``index`` order. Semantics are the local encoders': float32 rows, L2-normalised here (as
:class:`~ray_router.embeddings.sentence.SentenceTransformerEncoder` normalises), so a server that
returns unnormalised vectors gives the same unit vectors.

Identity (the embedding cache keys on it): ``openai:<model>@<base URL without trailing />`` plus
``:dimensions=<n>`` when set: vectors of different servers or models never mix, and the API key is
never part of it (nor of any message or ``repr``).

Failures: 429, 5xx, timeouts and connection errors are retried (``max_retries`` times) with
exponential backoff and jitter, honouring the server's ``Retry-After`` (seconds or an HTTP date),
each wait capped at ``max_backoff_s``; after the last attempt a :class:`RemoteEncoderError` says what
each kind of failure was. Any other 4xx is not retried: the error carries the server's message. A 200
whose body breaks the protocol (wrong count, bad index, ragged or non-finite vectors) is an error too.
"""

from __future__ import annotations

import base64
import email.utils
import json
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ray_router.config import parse
from ray_router.embeddings.base import l2_normalise
from ray_router.embeddings.options import OpenAIEncoderOptions
from ray_router.errors import ConfigError, RouterError

OPENAI_PREFIX = "openai:"
DEFAULT_API_KEY_ENV = "RAY_ROUTER_EMBEDDINGS_API_KEY"
PROBE_TEXT = "dimension probe"  # encoded once when the vector length is not known yet


class RemoteEncoderError(RouterError, http_status=502, code="embeddings_error"):
    """The embeddings server refused a request, kept failing, or answered outside the protocol."""


def cannot_fine_tune(what: str) -> ConfigError:
    """The error for asking CCFT to fine-tune a remote encoder (its weights are on the server)."""
    return ConfigError(
        f"CCFT (contrastive fine-tuning) trains a local sentence-transformers model; {what} is a remote "
        "embeddings server, whose weights cannot be fine-tuned here: use minilm or a local model folder as "
        "the base encoder, or leave ccft out"
    )


def is_openai_name(name: object) -> bool:
    """Whether an encoder name is an ``openai:MODEL@URL`` spec."""
    return isinstance(name, str) and name.startswith(OPENAI_PREFIX)


def parse_openai_name(name: str) -> tuple[str, str, dict[str, str]]:
    """``openai:MODEL@URL[#k=v,...]`` -> (model, base URL without trailing ``/``, raw options)."""
    example = "e.g. openai:text-embedding-3-small@https://api.openai.com/v1"
    if not is_openai_name(name):
        raise ConfigError(f"encoder {name!r}: an OpenAI-compatible encoder is named openai:MODEL@URL ({example})")
    rest, _, fragment = name[len(OPENAI_PREFIX) :].partition("#")
    model, at, url = rest.partition("@")
    if not at or not model or not url:
        raise ConfigError(f"encoder {name!r}: expected openai:MODEL@URL ({example})")
    if any(c.isspace() for c in model):
        raise ConfigError(f"encoder {name!r}: the model name {model!r} contains white space")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"encoder {name!r}: {url!r} is not an http(s) URL ({example})")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"encoder openai:{model}@...: put no credentials in the URL; the API key comes from an "
            f"environment variable (${DEFAULT_API_KEY_ENV}, or the one the api_key_env option names)"
        )
    if parts.query:
        raise ConfigError(f"encoder {name!r}: the base URL takes no query string")
    options: dict[str, str] = {}
    for item in filter(None, fragment.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"encoder {name!r}: option {item!r} is not key=value")
        options[key.strip()] = value.strip()
    return model, url.rstrip("/"), options


def _retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date), None if absent or bad."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _server_message(response: Any) -> str:
    """The message of an error body: OpenAI's ``{"error": {"message"}}``, ``{"error": "..."}``,
    ``{"message"}`` or FastAPI's ``{"detail"}``; else the start of the raw text."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        for value in (body.get("message"), err, body.get("detail")):
            if value:
                return value if isinstance(value, str) else json.dumps(value)[:500]
    text = response.text.strip()
    return text[:500] if text else "(empty body)"


class OpenAIEncoder:
    """Texts -> L2-normalised float32 rows from an OpenAI-compatible ``/embeddings`` endpoint.

    ``model``: the ``model`` field of each request; ``base_url``: the API's base (``.../v1``); other
    keywords: :class:`~ray_router.embeddings.options.OpenAIEncoderOptions`. ``transport``: an
    ``httpx`` transport (tests). Counters: ``n_requests`` (HTTP attempts), ``n_texts`` (texts sent)."""

    device = "remote"  # what the serving replica reports: no local model, no accelerator
    threads = 1

    def __init__(self, model: str, base_url: str, transport: Any = None, **options: Any):
        self.options = parse(OpenAIEncoderOptions, options, where=f"encoder openai:{model}@{base_url}")
        self.model = str(model)
        self.base_url = str(base_url).rstrip("/")
        self.url = f"{self.base_url}/embeddings"
        self.api_key_env = self.options.api_key_env or DEFAULT_API_KEY_ENV
        if self.options.api_key_env is not None and not os.environ.get(self.api_key_env):
            raise ConfigError(
                f"encoder openai:{self.model}@{self.base_url}: api_key_env names ${self.api_key_env}, which is not set"
            )
        self.identity = f"{OPENAI_PREFIX}{self.model}@{self.base_url}"
        if self.options.dimensions is not None:
            self.identity += f":dimensions={self.options.dimensions}"
        self._dim: int | None = self.options.dim
        self._transport = transport
        self._client: Any = None
        self._lock = threading.Lock()
        self.n_requests = 0
        self.n_texts = 0

    # ------------------------------------------------------------------ shape
    @property
    def known_dim(self) -> int | None:
        """The vector length if known without a request (the ``dim`` option, an earlier answer)."""
        return self._dim

    def adopt_dim(self, dim: int | None) -> None:
        """Take the length the embedding cache recorded for this identity (saves the probe request)."""
        if dim is not None and self._dim is None:
            self._dim = int(dim)

    @property
    def dim(self) -> int:
        if self._dim is None:
            self.encode([PROBE_TEXT])  # the first answer sets it
        return int(self._dim)  # type: ignore[arg-type]

    # ----------------------------------------------------------------- encode
    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """Rows in the order of ``texts``; ``batch_size`` texts per request, at most ``max_batch_size``."""
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        n = min(int(batch_size or self.options.max_batch_size), self.options.max_batch_size)
        parts = [self._request(texts[i : i + n]) for i in range(0, len(texts), max(1, n))]
        return l2_normalise(np.vstack(parts))

    def _http(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    import httpx

                    self._client = httpx.Client(timeout=self.options.timeout_s, transport=self._transport)
        return self._client

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env)  # read per request: the key is never kept on the object
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.options.max_backoff_s)
        base = self.options.backoff_s * 2.0**attempt
        return min(base / 2 + random.uniform(0, base / 2), self.options.max_backoff_s)

    def _request(self, texts: list[str]) -> np.ndarray:
        import httpx

        body: dict[str, Any] = {"model": self.model, "input": texts}
        if self.options.dimensions is not None:
            body["dimensions"] = self.options.dimensions
        attempts = self.options.max_retries + 1
        failures: list[str] = []
        for attempt in range(attempts):
            retry_after = None
            self.n_requests += 1
            try:
                response = self._http().post(self.url, json=body, headers=self._headers())
            except httpx.TimeoutException:
                failures.append(f"timed out after {self.options.timeout_s:g}s")
            except httpx.TransportError as e:
                failures.append(f"connection error ({type(e).__name__}: {e})")
            else:
                status = response.status_code
                if status == 200:
                    self.n_texts += len(texts)
                    return self._vectors(response, len(texts))
                message = _server_message(response)
                if status != 429 and status < 500:
                    raise RemoteEncoderError(
                        f"{self.url}: HTTP {status} for model {self.model!r} (not retried): {message}"
                    )
                failures.append(f"HTTP {status}: {message}")
                retry_after = _retry_after(response.headers.get("retry-after"))
            if attempt + 1 < attempts:
                time.sleep(self._backoff(attempt, retry_after))
        raise RemoteEncoderError(
            f"{self.url}: no embeddings after {attempts} attempt(s) (model {self.model!r}); "
            f"failures: {'; '.join(failures)}"
        )

    def _vectors(self, response: Any, n: int) -> np.ndarray:
        where = f"{self.url} (model {self.model!r})"
        try:
            data = response.json()["data"]
        except (ValueError, KeyError, TypeError):
            raise RemoteEncoderError(f"{where}: the answer has no 'data' list: {response.text[:200]!r}") from None
        if not isinstance(data, list) or len(data) != n:
            got = len(data) if isinstance(data, list) else type(data).__name__
            raise RemoteEncoderError(f"{where}: asked for {n} embeddings, the answer's 'data' holds {got}")
        rows: list[np.ndarray | None] = [None] * n
        for pos, item in enumerate(data):
            index = item.get("index", pos) if isinstance(item, dict) else None
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n or rows[index] is not None:
                raise RemoteEncoderError(f"{where}: data[{pos}] has a missing, repeated or out-of-range index")
            emb = item.get("embedding")
            try:
                if isinstance(emb, str):  # encoding_format=base64: little-endian float32
                    vec = np.frombuffer(base64.b64decode(emb, validate=True), dtype="<f4").astype(np.float64)
                else:
                    vec = np.asarray(emb, dtype=np.float64)
            except (ValueError, TypeError):
                raise RemoteEncoderError(f"{where}: data[{pos}].embedding is not a list of numbers") from None
            if vec.ndim != 1 or len(vec) == 0 or not np.isfinite(vec).all():
                raise RemoteEncoderError(f"{where}: data[{pos}].embedding is not a finite, non-empty vector")
            rows[index] = vec
        lengths = sorted({len(v) for v in rows if v is not None})
        if len(lengths) != 1:
            raise RemoteEncoderError(f"{where}: vectors of different lengths {lengths} in one answer")
        dim = lengths[0]
        if self._dim is None:
            self._dim = dim
        elif dim != self._dim:
            raise RemoteEncoderError(
                f"{where}: the server returned {dim}-d vectors, expected {self._dim}-d "
                "(the dim option, or the server's earlier answers)"
            )
        return np.vstack(rows).astype(np.float32)  # type: ignore[arg-type]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __getstate__(self) -> dict[str, Any]:  # picklable (a Ray task, a Tune trial): no live client
        state = dict(self.__dict__)
        state.update(_client=None, _lock=None, _transport=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OpenAIEncoder({self.identity!r})"


def cached_dim(cache: Any, identity: str) -> int | None:
    """The vector length the embedding cache recorded for ``identity`` (None if it has no entry)."""
    path = Path(cache.directory(identity)) / "identity.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("identity") != identity or not isinstance(meta.get("dim"), int):
        return None
    return int(meta["dim"])


def openai_options(name: str, **options: Any) -> tuple[str, str, dict[str, Any]]:
    """(model, base URL, typed options): the name's ``#k=v`` options, then ``options`` over them."""
    model, base_url, raw = parse_openai_name(name)
    typed = parse(OpenAIEncoderOptions, raw, where=f"encoder {name!r}", strict=False).model_dump()
    return model, base_url, {**{k: typed[k] for k in raw}, **options}


def remote_encoder(name: str, cache_dir: Any = None, **options: Any) -> Any:
    """``get_encoder``'s branch for ``openai:`` names: the encoder, wrapped in the on-disk cache
    unless ``cache_dir`` is False (None/True: the default root). A cache that has vectors of this
    identity also gives their length, so a run answered from the cache sends no request at all."""
    from ray_router.embeddings.cache import CachedEncoder

    backend = options.pop("backend", "torch")
    if backend != "torch":
        raise ConfigError(f"encoder backend {backend!r} runs a local model; {name.partition('#')[0]!r} is remote")
    if options.pop("max_seq_length", None) is not None:
        raise ConfigError("max_seq_length is a local model's option; a remote encoder's server truncates")
    model, base_url, merged = openai_options(name, **options)
    encoder = OpenAIEncoder(model, base_url, **merged)
    if cache_dir is False:
        return encoder
    cached = CachedEncoder(encoder, None if cache_dir is True else cache_dir)
    encoder.adopt_dim(cached_dim(cached.cache, encoder.identity))
    return cached
