"""A lean HTTP/1.1 load client for the overload benchmark: asyncio streams, keep-alive, nothing else.

httpx costs about a millisecond of CPU per request in this process; at 4x the service's capacity
that is a large share of a 2-core machine that the service under test also runs on. This client
speaks plain HTTP/1.1 over real TCP (``Content-Length`` bodies, keep-alive, one request per
connection at a time, no pipelining) and parses only the status line, the headers and the body, so
the load generator takes as little as it can from the cores it shares with the service.

It is a measurement tool, not a general client: no TLS, no chunked request bodies (it sends
``Content-Length``), chunked *responses* are read, redirects are not followed.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlsplit


class HTTPResponse:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


class LeanClient:
    """``await client.post(path, payload)`` over a pool of at most ``max_connections`` keep-alive
    connections to one ``http://host:port`` base URL."""

    def __init__(self, base_url: str, max_connections: int = 2000, timeout_s: float = 60.0):
        u = urlsplit(base_url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"LeanClient needs an http://host:port URL, got {base_url!r}")
        self.host, self.port = u.hostname, u.port or 80
        self.timeout_s = timeout_s
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots = asyncio.Semaphore(max_connections)

    async def __aenter__(self) -> LeanClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        while self._idle:
            _, w = self._idle.pop()
            w.close()

    async def post(self, path: str, payload: Any, headers: dict[str, str] | None = None) -> HTTPResponse:
        body = json.dumps(payload).encode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n"
        ).encode()
        async with self._slots:
            return await asyncio.wait_for(self._exchange(head + body), self.timeout_s)

    async def _exchange(self, request: bytes) -> HTTPResponse:
        conn = self._idle.pop() if self._idle else await asyncio.open_connection(self.host, self.port)
        reader, writer = conn
        try:
            writer.write(request)
            await writer.drain()
            resp, keep = await self._read(reader)
        except BaseException:
            writer.close()
            raise
        if keep:
            self._idle.append(conn)
        else:
            writer.close()
        return resp

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> tuple[HTTPResponse, bool]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                data = await reader.readexactly(size + 2)
                if size == 0:
                    break
                chunks.append(data[:-2])
            body = b"".join(chunks)
        else:
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        keep = headers.get("connection", "").lower() != "close"
        return HTTPResponse(status, headers, body), keep
