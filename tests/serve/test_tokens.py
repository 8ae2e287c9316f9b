"""Signed decision ids (context included), bearer checks and generated secrets."""

from __future__ import annotations

import base64
import os
import stat

import numpy as np
import pytest

from ray_router.errors import ConfigError
from ray_router.serve.errors import ExpiredDecision, ForgedDecision, MalformedRequest, NotADuel, StaleDecision
from ray_router.serve.tokens import (
    DecisionSigner,
    bearer_value,
    check_bearer,
    decision_signer,
    new_nonce,
    quantise,
    resolve_secret,
)

KEY = "k" * 32
ARMS = ("a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k")
NOW = 1_700_000_000.0


def _x(dim: int = 384) -> np.ndarray:
    x = np.random.default_rng(0).normal(size=dim).astype(np.float32)
    return quantise(x / np.linalg.norm(x))


def test_duel_ids_carry_the_whole_decision():
    s = DecisionSigner(KEY, ARMS)
    nonce, x = new_nonce(), _x()
    tok = s.issue(nonce, NOW + 60, "duel", 3, 7, [3, 7, 10], x)
    c = s.verify(tok, NOW)
    assert (c.nonce, c.expires_at, c.mode, c.first, c.second, c.offered) == (
        nonce,
        int(NOW + 60),
        "duel",
        3,
        7,
        (3, 7, 10),
    )
    np.testing.assert_array_equal(c.x, x)  # exact: the id carries the float16 the ranking used
    assert 1000 < len(tok) < 1200
    everything = s.verify(s.issue(nonce, NOW + 60, "duel", 0, 1, None, x), NOW)
    assert everything.offered is None


def test_single_ids_are_short():
    s = DecisionSigner(KEY, ARMS)
    tok = s.issue(new_nonce(), NOW + 60, "single", 4)
    c = s.verify(tok, NOW)
    assert c.mode == "single" and c.second is None and c.x is None and len(tok) < 100


def _flip(text: str, i: int) -> str:
    return text[:i] + ("A" if text[i] != "A" else "B") + text[i + 1 :]


def _payload_edit(tok: str, edit) -> str:
    prefix, payload, sig = tok.split(".")
    raw = bytearray(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    edit(raw)
    return f"{prefix}.{base64.urlsafe_b64encode(bytes(raw)).decode().rstrip('=')}.{sig}"


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda t: _flip(t, len(t) - 1), ForgedDecision),  # signature changed
        (lambda t: _payload_edit(t, lambda r: r.__setitem__(1, 1)), ForgedDecision),  # mode changed
        (lambda t: _payload_edit(t, lambda r: r.__setitem__(2, r[2] ^ 1)), ForgedDecision),  # nonce changed
        (lambda t: _payload_edit(t, lambda r: r.__setitem__(20, r[20] ^ 1)), ForgedDecision),  # expiry extended
        (lambda t: _payload_edit(t, lambda r: r.__setitem__(23, r[23] ^ 1)), ForgedDecision),  # first arm changed
        (lambda t: _payload_edit(t, lambda r: r.__setitem__(len(r) - 1, r[-1] ^ 1)), ForgedDecision),  # embedding
        (
            lambda t: DecisionSigner("x" * 32, ARMS).issue(new_nonce(), NOW + 60, "duel", 0, 1, None, _x()),
            ForgedDecision,
        ),
        (lambda t: "not-a-token", MalformedRequest),
        (lambda t: "", MalformedRequest),
        (lambda t: t + ".extra", MalformedRequest),
        (lambda t: "d1." + t[3:], MalformedRequest),
        (lambda t: "x" * 20000, MalformedRequest),
        # hostile characters (the issue's 500: UnicodeEncodeError in the HMAC of a non-ASCII payload)
        (lambda t: "d2.\u00e9.x", MalformedRequest),
        (lambda t: t[:10] + "\u00e9" + t[11:], MalformedRequest),  # a genuine id with one letter replaced
        (lambda t: t[:-1] + "\u00e9", MalformedRequest),  # ... in the signature
        (lambda t: t[:10] + "\x00" + t[11:], MalformedRequest),  # NUL
        (lambda t: t[:10] + "\ud800" + t[11:], MalformedRequest),  # a lone surrogate (not encodable)
        (lambda t: t[:10] + "=" + t[11:], MalformedRequest),  # not base64url
        (lambda t: t + "\n", MalformedRequest),
        (lambda t: "d2..", MalformedRequest),
        (lambda t: "d2.\uff21\uff22.\uff23", MalformedRequest),  # full-width letters
    ],
)
def test_tampered_or_foreign_ids_are_refused(mutate, error):
    s = DecisionSigner(KEY, ARMS)
    tok = s.issue(new_nonce(), NOW + 60, "duel", 1, 2, None, _x())
    with pytest.raises(error):
        s.verify(mutate(tok), NOW)


def test_verify_duel_is_the_whole_feedback_check():
    s = DecisionSigner(KEY, ARMS)
    duel = s.issue(new_nonce(), NOW + 60, "duel", 0, 1, None, _x())
    assert s.verify_duel(duel, NOW).mode == "duel"
    with pytest.raises(NotADuel):
        s.verify_duel(s.issue(new_nonce(), NOW + 60, "single", 2), NOW)
    with pytest.raises(ForgedDecision):
        s.verify_duel(_flip(duel, len(duel) - 1), NOW)


def test_ingress_and_posterior_load_the_same_signing_key(tmp_path, monkeypatch):
    """The posterior verifies decision ids itself: ``decision_signer`` gives it the ingress's key."""
    monkeypatch.delenv("RR_TEST_HMAC", raising=False)
    ingress, where = decision_signer("RR_TEST_HMAC", tmp_path, ARMS)
    posterior, _ = decision_signer("RR_TEST_HMAC", tmp_path, ARMS)
    assert where == str(tmp_path / "secrets" / "hmac_key")
    tok = ingress.issue(new_nonce(), NOW + 60, "duel", 0, 1, None, _x())
    assert posterior.verify_duel(tok, NOW).first == 0


def test_expired_ids_are_refused_after_the_signature_check():
    s = DecisionSigner(KEY, ARMS)
    tok = s.issue(new_nonce(), NOW + 60, "duel", 0, 1, None, _x())
    with pytest.raises(ExpiredDecision):
        s.verify(tok, NOW + 61)
    with pytest.raises(ForgedDecision):  # a forgery is a forgery, expired or not
        s.verify(_flip(tok, len(tok) - 2), NOW + 61)


def test_ids_of_another_arm_table_are_stale():
    old = DecisionSigner(KEY, ARMS).issue(new_nonce(), NOW + 60, "duel", 0, 1, None, _x())
    with pytest.raises(StaleDecision):
        DecisionSigner(KEY, (*ARMS[:-1], "renamed")).verify(old, NOW)


def test_short_keys_are_refused():
    with pytest.raises(ConfigError):
        DecisionSigner("short", ARMS)


@pytest.mark.parametrize(
    "header, ok",
    [
        ("Bearer " + KEY, True),
        ("bearer " + KEY, True),
        ("Bearer " + KEY + "x", False),
        ("Basic " + KEY, False),
        (KEY, False),
        ("", False),
        (None, False),
        ("Bearer ", False),
        ("Bearer \u00e9\u00e9", False),  # non-ASCII (Latin-1 on the wire): compared, not crashed on
        ("Bearer \ud800", False),
    ],
)
def test_bearer(header, ok):
    assert check_bearer(header, KEY) is ok
    assert (bearer_value(header) == KEY) is ok


def test_resolve_secret_prefers_env_then_generates_a_private_file(tmp_path, monkeypatch):
    monkeypatch.setenv("RR_TEST_SECRET", "s" * 20)
    assert resolve_secret("RR_TEST_SECRET", tmp_path / "sec") == ("s" * 20, "$RR_TEST_SECRET")
    monkeypatch.delenv("RR_TEST_SECRET")
    value, where = resolve_secret("RR_TEST_SECRET", tmp_path / "sec")
    assert len(value) == 64 and where == str(tmp_path / "sec")
    assert stat.S_IMODE(os.stat(tmp_path / "sec").st_mode) == 0o600
    assert resolve_secret("RR_TEST_SECRET", tmp_path / "sec")[0] == value  # stable across restarts
    monkeypatch.setenv("RR_TEST_SECRET", "short")
    with pytest.raises(ConfigError):
        resolve_secret("RR_TEST_SECRET", tmp_path / "sec")
