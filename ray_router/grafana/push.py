"""Upload a dashboard through Grafana's HTTP API: ``POST /api/dashboards/db``.

Client choice: plain ``httpx`` (already a dependency). The API surface is one documented request;
``grafana-api`` has been unmaintained since 2020, and ``grafana-client`` (its maintained fork)
pulls in ``urllib3-future``, which replaces ``urllib3`` for the whole environment (Ray and
huggingface-hub use it) unless installed with special flags. ``POST /api/dashboards/db`` is the
legacy dashboard API that every Grafana from 5 to 12 serves (Grafana 12 adds
``/apis/dashboard.grafana.app/...``, and keeps this one).

Auth: a service-account token (or a legacy API key) as ``Authorization: Bearer <token>``, or basic
auth. Secrets come from the environment, never from the command line.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from ray_router.errors import RouterError

API_PATH = "/api/dashboards/db"


class GrafanaError(RouterError):
    """Grafana refused the upload or could not be reached; the message says which and why."""


@dataclass(frozen=True)
class PushResult:
    uid: str
    url: str
    version: int
    status: str
    raw: dict[str, Any]


def _payload(dashboard: Mapping[str, Any], folder_uid: str | None, overwrite: bool, message: str | None) -> dict:
    model = copy.deepcopy(dict(dashboard))
    model["id"] = None  # Grafana matches on uid; a numeric id from another instance would be wrong here
    body: dict[str, Any] = {"dashboard": model, "overwrite": bool(overwrite)}
    if folder_uid:
        body["folderUid"] = folder_uid
    if message:
        body["message"] = message
    return body


def _error_text(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return resp.text.strip()[:300] or resp.reason_phrase
    if isinstance(data, dict):
        msg = str(data.get("message") or data)
        status = data.get("status")
        return f"{msg} ({status})" if status else msg
    return str(data)[:300]


def push_dashboard(
    url: str,
    dashboard: Mapping[str, Any],
    *,
    token: str | None = None,
    basic_auth: tuple[str, str] | None = None,
    folder_uid: str | None = None,
    overwrite: bool = True,
    message: str | None = None,
    timeout_s: float = 15.0,
    verify: bool = True,
    transport: httpx.BaseTransport | None = None,
) -> PushResult:
    """Create or update ``dashboard`` on the Grafana at ``url`` (which may carry a sub-path, e.g.
    ``https://host/grafana``). Raises :class:`GrafanaError` with Grafana's message on failure."""
    if not url.startswith(("http://", "https://")):
        raise GrafanaError(f"--url must start with http:// or https://, got {url!r}")
    if token and basic_auth:
        raise GrafanaError("give a token or basic auth, not both")
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    endpoint = url.rstrip("/") + API_PATH
    try:
        with httpx.Client(timeout=timeout_s, verify=verify, transport=transport, auth=basic_auth) as client:
            resp = client.post(endpoint, json=_payload(dashboard, folder_uid, overwrite, message), headers=headers)
    except httpx.HTTPError as e:
        raise GrafanaError(f"cannot reach Grafana at {endpoint}: {e}") from None
    if resp.status_code in (401, 403):
        raise GrafanaError(
            f"Grafana refused the credentials ({resp.status_code}): {_error_text(resp)}; "
            "the token needs the dashboards:write permission (Editor role)"
        )
    if resp.status_code == 412:
        raise GrafanaError(f"Grafana kept its copy (412): {_error_text(resp)}; push with overwrite to replace it")
    if resp.status_code != 200:
        raise GrafanaError(f"Grafana answered {resp.status_code}: {_error_text(resp)}")
    try:
        data = resp.json()
    except ValueError:
        raise GrafanaError(f"Grafana answered 200 but not JSON: {resp.text[:200]!r}") from None
    if not isinstance(data, dict) or data.get("status") != "success":
        raise GrafanaError(f"unexpected answer from Grafana: {str(data)[:300]}")
    return PushResult(
        uid=str(data.get("uid", "")),
        url=str(data.get("url", "")),
        version=int(data.get("version", 0)),
        status=str(data["status"]),
        raw=data,
    )
