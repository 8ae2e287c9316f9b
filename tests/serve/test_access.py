"""Separate powers without HTTP: the feedback token, the admin token and the client keys each open
only their own calls; a client key is rate-limited by its token bucket."""

from __future__ import annotations

import pytest

from ray_router.errors import ConfigError
from ray_router.serve.access import Access, TokenBucket, load_access
from ray_router.serve.config import AuthSpec, ClientSpec
from ray_router.serve.errors import RateLimited, Unauthorized

FEEDBACK, ADMIN, ALICE, BOB = "f" * 20, "a" * 20, "alice-key-0123456789", "bob-key-0123456789"


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def bearer(v: str) -> str:
    return f"Bearer {v}"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def access(clock) -> Access:
    clients = {
        "alice": (ALICE, ClientSpec(name="alice", key_env="A", rate_per_s=2.0, burst=3)),
        "bob": (BOB, ClientSpec(name="bob", key_env="B", rate_per_s=100.0, burst=100)),
    }
    return Access(FEEDBACK, ADMIN, clients, clock=clock)


def test_each_credential_opens_only_its_own_calls(access):
    assert access.require(bearer(FEEDBACK), "feedback").kind == "feedback"
    assert access.require(bearer(ADMIN), "admin").kind == "admin"
    assert access.require(bearer(BOB), "client").name == "bob"
    for secret, kind in [(FEEDBACK, "admin"), (ADMIN, "feedback"), (BOB, "admin"), (BOB, "feedback")]:
        with pytest.raises(Unauthorized):
            access.require(bearer(secret), kind)
    for header in (None, "", "Bearer", f"Basic {ADMIN}", bearer(ADMIN + "x"), bearer("\u00e9" * 20)):
        for kind in ("feedback", "admin", "client"):
            with pytest.raises(Unauthorized):
                access.require(header, kind)


def test_a_client_key_is_rate_limited_by_its_bucket(access, clock):
    for _ in range(3):  # the burst
        access.client(bearer(ALICE), required=True)
    with pytest.raises(RateLimited) as e:
        access.client(bearer(ALICE), required=True)
    assert e.value.headers == {"Retry-After": "1"}
    access.client(bearer(BOB), required=True)  # another key has its own bucket
    clock.t += 0.5  # 2 per second: one token back
    access.client(bearer(ALICE), required=True)
    with pytest.raises(RateLimited):
        access.client(bearer(ALICE), required=False)  # charged on open endpoints too
    assert access.client(None, required=False) is None  # anonymous on an open endpoint: no bucket


def test_token_bucket_refill_and_wait():
    clock = Clock()
    b = TokenBucket(4.0, 2, clock)
    assert b.take() == 0 and b.take() == 0
    assert b.take() == pytest.approx(0.25)
    clock.t = 10.0
    assert b.take() == 0 and b.take() == 0 and b.take() > 0  # refilled only up to the burst


def test_shared_secrets_are_refused():
    with pytest.raises(ConfigError, match="own secret"):
        Access(FEEDBACK, FEEDBACK, {})
    with pytest.raises(ConfigError, match="own secret"):
        Access(FEEDBACK, ADMIN, {"c": (ADMIN, ClientSpec(name="c", key_env="C"))})


def test_load_access_generates_each_missing_secret(tmp_path, monkeypatch):
    for env in ("RAY_ROUTER_TOKEN", "RAY_ROUTER_ADMIN_TOKEN", "RAY_ROUTER_CLIENT_KEY"):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv("RAY_ROUTER_TOKEN", FEEDBACK)
    access, sources = load_access(AuthSpec(), tmp_path)
    assert sources == {
        "feedback_token": "$RAY_ROUTER_TOKEN",
        "admin_token": str(tmp_path / "secrets" / "admin_token"),
        "client:default": str(tmp_path / "secrets" / "client_default"),
    }
    admin = (tmp_path / "secrets" / "admin_token").read_text()
    client = (tmp_path / "secrets" / "client_default").read_text()
    assert access.require(bearer(admin), "admin").kind == "admin"
    assert access.require(bearer(client), "client").name == "default"


@pytest.mark.parametrize(
    "auth, match",
    [
        ({"admin_token_env": "RAY_ROUTER_TOKEN"}, "own env var"),
        ({"clients": [{"name": "a", "key_env": "K"}, {"name": "a", "key_env": "L"}]}, "duplicate name"),
        ({"clients": [{"name": "a", "key_env": "K"}, {"name": "b", "key_env": "K"}]}, "duplicate key_env"),
        ({"clients": [{"name": "a b", "key_env": "K"}]}, "pattern"),
        ({"clients": [{"name": "a", "key_env": "K", "rate_per_s": 0}]}, "greater than 0"),
    ],
)
def test_auth_config_is_checked(auth, match):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=match):
        AuthSpec.model_validate(auth)
