"""The overload benchmark's lean HTTP client against a real HTTP/1.1 server on loopback."""

import asyncio
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from httpload import LeanClient


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    connections: ClassVar[set] = set()

    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):
        Handler.connections.add(self.client_address)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b'{"echo": ', json.dumps(body).encode(), b"}"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        out = json.dumps({"echo": body, "auth": self.headers.get("Authorization")}).encode()
        self.send_response(503 if self.path == "/busy" else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


@pytest.fixture()
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    Handler.connections = set()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_lean_client_statuses_bodies_headers_and_keep_alive(server):
    async def go():
        async with LeanClient(server, max_connections=2) as c:
            a = await c.post("/x", {"query": "é ü 你好"}, headers={"Authorization": "Bearer t"})
            b = await c.post("/busy", {"n": 1})
            ch = await c.post("/chunked", {"k": [1, 2]})
            many = await asyncio.gather(*(c.post("/x", {"i": i}) for i in range(20)))
        return a, b, ch, many

    a, b, ch, many = asyncio.run(go())
    assert a.status == 200 and a.json() == {"echo": {"query": "é ü 你好"}, "auth": "Bearer t"}
    assert b.status == 503 and b.json()["echo"] == {"n": 1}
    assert ch.status == 200 and ch.json() == {"echo": {"k": [1, 2]}}
    assert sorted(r.json()["echo"]["i"] for r in many) == list(range(20))
    assert len(Handler.connections) <= 2  # 23 requests over at most max_connections kept-alive sockets


def test_lean_client_refuses_what_it_cannot_speak():
    with pytest.raises(ValueError, match="http://host:port"):
        LeanClient("https://example.invalid")
