"""A small local HTTP server that speaks Grafana's dashboard API contract (``POST /api/dashboards/db``)
for the upload tests: it checks the request as Grafana would (path, method, ``Authorization``,
JSON body shape) and answers with Grafana's own response shapes:

- 200 ``{"id", "uid", "url": "/d/<uid>/<slug>", "status": "success", "version", "slug", "folderUid"}``
- 401 ``{"message": "Invalid API key", "messageId": "api-key.invalid", "statusCode": 401, ...}``
- 412 ``{"message": "The dashboard has been changed by someone else", "status": "version-mismatch"}``
  (an existing dashboard, no overwrite, and a version other than the stored one)
- 400 ``{"message": "...", "status": "bad-request"}`` for a malformed body.

Requests that break the contract are also recorded in ``violations``, so a test can fail on them
even when the client would have accepted the answer.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

BODY_KEYS = {"dashboard", "overwrite", "folderUid", "folderId", "message"}


@dataclass
class FakeGrafana:
    prefix: str = ""
    token: str | None = "glsa_test_token"
    basic: tuple[str, str] | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}{self.prefix}"

    def start(self) -> FakeGrafana:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                fake.violations.append(f"GET {self.path}")
                self._answer(404, {"message": "Not found"})

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                req = {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "raw": raw}
                fake.requests.append(req)
                status, body = fake.handle(req)
                self._answer(status, body)

            def _answer(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # ------------------------------------------------------------------------- contract
    def _authorized(self, headers: dict[str, str]) -> bool:
        auth = headers.get("authorization", "")
        if self.token is not None and auth == f"Bearer {self.token}":
            return True
        if self.basic is not None and auth.startswith("Basic "):
            user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
            return (user, pw) == self.basic
        return False

    def handle(self, req: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if req["path"] != f"{self.prefix}/api/dashboards/db":
            self.violations.append(f"POST to {req['path']}")
            return 404, {"message": "Not found"}
        if not self._authorized(req["headers"]):
            return 401, {
                "extra": None,
                "message": "Invalid API key",
                "messageId": "api-key.invalid",
                "statusCode": 401,
                "traceID": "",
            }
        if not req["headers"].get("content-type", "").startswith("application/json"):
            self.violations.append(f"content-type {req['headers'].get('content-type')!r}")
            return 400, {"message": "bad request data", "status": "bad-request"}
        try:
            body = json.loads(req["raw"])
        except ValueError:
            self.violations.append("body is not JSON")
            return 400, {"message": "bad request data", "status": "bad-request"}
        problems = []
        if not isinstance(body, dict) or not isinstance(body.get("dashboard"), dict):
            problems.append("no dashboard object")
        else:
            if set(body) - BODY_KEYS:
                problems.append(f"unknown keys {sorted(set(body) - BODY_KEYS)}")
            if not isinstance(body.get("overwrite", False), bool):
                problems.append("overwrite is not a boolean")
            d = body["dashboard"]
            if not str(d.get("title") or "").strip():
                problems.append("Dashboard title cannot be empty")
            if d.get("id") is not None:
                problems.append("a new or overwritten dashboard by uid must have id null")
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", str(d.get("uid", ""))):
                problems.append("uid must be 1-40 characters of [A-Za-z0-9_-]")
            if not isinstance(d.get("panels"), list):
                problems.append("panels must be a list")
        if problems:
            self.violations.extend(problems)
            return 400, {"message": "; ".join(problems), "status": "bad-request"}
        d, uid = body["dashboard"], body["dashboard"]["uid"]
        existing = self.stored.get(uid)
        if existing and not body.get("overwrite") and d.get("version") != existing["version"]:
            return 412, {"message": "The dashboard has been changed by someone else", "status": "version-mismatch"}
        version = existing["version"] + 1 if existing else 1
        ident = existing["id"] if existing else len(self.stored) + 1
        slug = re.sub(r"[^a-z0-9]+", "-", d["title"].lower()).strip("-")
        self.stored[uid] = {"id": ident, "version": version, "dashboard": d, "folderUid": body.get("folderUid", "")}
        return 200, {
            "id": ident,
            "uid": uid,
            "url": f"/d/{uid}/{slug}",
            "status": "success",
            "version": version,
            "slug": slug,
            "folderUid": body.get("folderUid", ""),
        }
