"""``ray-router grafana push`` and :func:`push_dashboard` against a local server that checks Grafana's
dashboard API contract (tests/grafana/fake_grafana.py); ``grafana export``."""

from __future__ import annotations

import base64
import json
import socket

import pytest

from ray_router.cli import main
from ray_router.grafana import GrafanaError, build_dashboard, dashboard_json, push_dashboard
from tests.grafana.fake_grafana import FakeGrafana

TOKEN = "glsa_test_token"


@pytest.fixture
def grafana():
    fake = FakeGrafana(token=TOKEN).start()
    yield fake
    fake.stop()
    assert not fake.violations, fake.violations


def test_push_creates_the_dashboard_with_the_api_contract(grafana):
    out = push_dashboard(grafana.url, build_dashboard(), token=TOKEN)
    assert (out.status, out.uid, out.version) == ("success", "ray-router", 1)
    assert out.url.startswith("/d/ray-router/")
    (req,) = grafana.requests
    assert req["path"] == "/api/dashboards/db"
    assert req["headers"]["authorization"] == f"Bearer {TOKEN}"
    assert req["headers"]["content-type"] == "application/json"
    assert req["headers"]["accept"] == "application/json"
    body = json.loads(req["raw"])
    assert set(body) == {"dashboard", "overwrite"} and body["overwrite"] is True
    sent = body["dashboard"]
    assert sent["id"] is None
    assert {k: v for k, v in sent.items() if k != "id"} == build_dashboard()


def test_push_again_overwrites_and_bumps_the_version(grafana):
    push_dashboard(grafana.url, build_dashboard(), token=TOKEN)
    out = push_dashboard(grafana.url, build_dashboard(), token=TOKEN, folder_uid="ops", message="ray-router 0.1.0")
    assert out.version == 2 and out.raw["folderUid"] == "ops"
    body = json.loads(grafana.requests[-1]["raw"])
    assert body["folderUid"] == "ops" and body["message"] == "ray-router 0.1.0"


def test_no_overwrite_reports_grafanas_412(grafana):
    push_dashboard(grafana.url, build_dashboard(), token=TOKEN)
    push_dashboard(grafana.url, build_dashboard(), token=TOKEN)  # version 2 stored, we send 1
    with pytest.raises(GrafanaError, match=r"412.*changed by someone else.*version-mismatch"):
        push_dashboard(grafana.url, build_dashboard(), token=TOKEN, overwrite=False)


def test_a_wrong_token_is_reported_with_grafanas_message(grafana):
    with pytest.raises(GrafanaError, match=r"refused the credentials \(401\): Invalid API key"):
        push_dashboard(grafana.url, build_dashboard(), token="wrong")


def test_basic_auth_and_a_sub_path(grafana):
    grafana.prefix, grafana.token, grafana.basic = "/grafana", None, ("admin", "s3cret:x")
    out = push_dashboard(grafana.url + "/", build_dashboard(), basic_auth=("admin", "s3cret:x"))
    assert out.status == "success"
    req = grafana.requests[-1]
    assert req["path"] == "/grafana/api/dashboards/db"
    assert base64.b64decode(req["headers"]["authorization"][6:]) == b"admin:s3cret:x"


def test_unreachable_grafana_and_bad_urls_are_grafana_errors():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(GrafanaError, match="cannot reach Grafana"):
        push_dashboard(f"http://127.0.0.1:{port}", build_dashboard(), token=TOKEN, timeout_s=2)
    with pytest.raises(GrafanaError, match="http:// or https://"):
        push_dashboard("grafana.local:3000", build_dashboard(), token=TOKEN)


# ------------------------------------------------------------------------------- CLI
def test_cli_push_reads_the_token_from_the_environment(grafana, monkeypatch, capsys):
    monkeypatch.setenv("GRAFANA_TOKEN", TOKEN)
    assert main(["grafana", "push", "--url", grafana.url, "--folder-uid", "ops"]) == 0
    out = capsys.readouterr().out
    assert "success: dashboard ray-router version 1" in out and f"{grafana.url}/d/ray-router/" in out
    assert json.loads(grafana.requests[-1]["raw"])["folderUid"] == "ops"


def test_cli_push_falls_back_to_grafana_api_key_and_honours_token_env(grafana, monkeypatch):
    monkeypatch.delenv("GRAFANA_TOKEN", raising=False)
    monkeypatch.setenv("GRAFANA_API_KEY", TOKEN)
    assert main(["grafana", "push", "--url", grafana.url]) == 0
    monkeypatch.delenv("GRAFANA_API_KEY")
    monkeypatch.setenv("MY_GRAFANA", TOKEN)
    assert main(["grafana", "push", "--url", grafana.url, "--token-env", "MY_GRAFANA"]) == 0
    assert [r["headers"]["authorization"] for r in grafana.requests] == [f"Bearer {TOKEN}"] * 2


def test_cli_push_errors_are_one_line_and_exit_2(grafana, monkeypatch, capsys):
    monkeypatch.delenv("GRAFANA_TOKEN", raising=False)
    monkeypatch.delenv("GRAFANA_API_KEY", raising=False)
    assert main(["grafana", "push", "--url", grafana.url]) == 2
    assert "error: no Grafana token: set $GRAFANA_TOKEN" in capsys.readouterr().err
    monkeypatch.setenv("GRAFANA_TOKEN", "wrong")
    assert main(["grafana", "push", "--url", grafana.url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Grafana refused the credentials (401)") and "Traceback" not in err
    assert grafana.requests and all(r["headers"]["authorization"] == "Bearer wrong" for r in grafana.requests)


def test_cli_export_writes_the_dashboard_json(tmp_path, capsys):
    path = tmp_path / "sub" / "dash.json"
    assert main(["grafana", "export", "--out", str(path)]) == 0
    assert path.read_text() == dashboard_json()
    assert main(["grafana", "export"]) == 0
    assert capsys.readouterr().out == dashboard_json()
