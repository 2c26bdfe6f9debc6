"""Unit tests of intake authentication: bearer, basic, Grafana HMAC, window and replay cache."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.config import parse_settings
from orchestrator.intake.auth import (
    WINDOW_S,
    Authenticator,
    AuthFailure,
    ReplayCache,
    presented_credentials,
    sign,
)
from orchestrator.intake.schemas import Conflict, Unavailable

NOW = 1_750_000_000.0
BODY = b'{"version":"1","alerts":[]}'


class Clock:
    """A settable wall clock."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _auth(clock: Clock | None = None) -> Authenticator:
    settings = parse_settings(
        {
            "sources": {
                "am": {"kind": "alertmanager", "token": "am-token-0001"},
                "am-basic": {"kind": "alertmanager", "username": "am", "password": "pw-0001"},
                "gf": {"kind": "grafana", "hmac_secret": "gf-secret-0001"},
                "gf-both": {
                    "kind": "grafana",
                    "token": "gf-token-0001",
                    "hmac_secret": "gf-secret-0002",
                },
                "bot": {"kind": "api", "token": "bot-token-0001"},
            }
        }
    )
    return Authenticator(settings.sources, clock=clock or Clock())


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_bearer_token_authenticates_its_source() -> None:
    """The configured bearer token grants access to its own source."""
    grant = _auth().authenticate_source("am", "Bearer am-token-0001", None, None, BODY)
    assert grant.source.name == "am"
    assert grant.replay_key is None


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer wrong", "Bearer am-token-000", "Token am-token-0001", "Basic !!"],
)
def test_missing_or_wrong_bearer_is_refused(authorization: str | None) -> None:
    """Absent, malformed or wrong credentials all end in the same 401."""
    with pytest.raises(AuthFailure) as info:
        _auth().authenticate_source("am", authorization, None, None, BODY)
    assert info.value.status == 401
    assert info.value.message == "missing or invalid credentials"


def test_another_sources_token_does_not_open_this_source() -> None:
    """A valid token of one source is a wrong token for another source's webhook."""
    with pytest.raises(AuthFailure, match="invalid credentials"):
        _auth().authenticate_source("am", "Bearer bot-token-0001", None, None, BODY)


def test_unknown_source_gets_the_same_answer_as_a_wrong_token() -> None:
    """A 401 for an unknown source looks exactly like one for a wrong token."""
    with pytest.raises(AuthFailure) as unknown:
        _auth().authenticate_source("nope", "Bearer am-token-0001", None, None, BODY)
    with pytest.raises(AuthFailure) as wrong:
        _auth().authenticate_source("am", "Bearer nope", None, None, BODY)
    assert unknown.value.reason == "unknown_source"
    assert (unknown.value.status, unknown.value.message) == (
        wrong.value.status,
        wrong.value.message,
    )


def test_basic_auth_needs_both_username_and_password() -> None:
    """Basic auth succeeds only with the right user name and the right password."""
    auth = _auth()
    assert auth.authenticate_source("am-basic", _basic("am", "pw-0001"), None, None, BODY)
    for header in (_basic("am", "wrong"), _basic("other", "pw-0001"), _basic("", "")):
        with pytest.raises(AuthFailure):
            auth.authenticate_source("am-basic", header, None, None, BODY)


def test_basic_credentials_without_colon_are_ignored() -> None:
    """A Basic value that does not decode to user:password counts as no credentials."""
    value = "Basic " + base64.b64encode(b"no-colon").decode()
    assert presented_credentials(value).empty


def test_signature_over_raw_body_is_processed_once() -> None:
    """A correct HMAC authenticates; an identical replay gets the first answer back."""
    auth = _auth()
    signature = hmac.new(b"gf-secret-0001", BODY, hashlib.sha256).hexdigest()
    grant = auth.authenticate_source("gf", None, signature, None, BODY)
    assert (grant.replay_key is not None, grant.replayed) == (True, None)
    with pytest.raises(Conflict):
        # The first request has not been answered yet.
        auth.authenticate_source("gf", None, signature, None, BODY)
    auth.complete(grant, b'{"accepted": ["job-1"]}')
    replay = auth.authenticate_source("gf", None, signature, None, BODY)
    assert replay.replayed == b'{"accepted": ["job-1"]}'
    assert replay.replay_key is None  # nothing to complete or release for a replay


def test_released_signature_can_be_retried() -> None:
    """After a failed request gives its signature back, the sender's retry is accepted."""
    auth = _auth()
    signature = sign(b"gf-secret-0001", BODY)
    grant = auth.authenticate_source("gf", None, signature, None, BODY)
    auth.release(grant)
    assert auth.authenticate_source("gf", None, signature, None, BODY).source.name == "gf"


def test_signature_with_timestamp_signs_timestamp_colon_body() -> None:
    """With a timestamp header the signed message is ``"{timestamp}:{body}"``."""
    auth = _auth()
    stamp = str(int(NOW))
    expected = hmac.new(b"gf-secret-0001", f"{stamp}:".encode() + BODY, hashlib.sha256)
    grant = auth.authenticate_source("gf", None, expected.hexdigest().upper(), stamp, BODY)
    assert grant.source.name == "gf"
    with pytest.raises(AuthFailure, match="invalid request signature"):
        # The body-only signature does not verify once a timestamp is present.
        auth.authenticate_source("gf", None, sign(b"gf-secret-0001", BODY), stamp, BODY)


@pytest.mark.parametrize("offset", [WINDOW_S + 1, -(WINDOW_S + 1), 10 * WINDOW_S])
def test_timestamp_outside_window_is_stale(offset: float) -> None:
    """A signed timestamp more than 5 minutes from our clock (either way) is refused."""
    auth = _auth()
    stamp = str(int(NOW + offset))
    with pytest.raises(AuthFailure) as info:
        auth.authenticate_source("gf", None, sign(b"gf-secret-0001", BODY, stamp), stamp, BODY)
    assert info.value.reason == "stale_timestamp"


@pytest.mark.parametrize("stamp", ["", "abc", "1.5", "-5", "1" * 13, "１２３"])
def test_malformed_timestamp_is_refused(stamp: str) -> None:
    """A timestamp that is not plain Unix seconds never reaches the HMAC."""
    with pytest.raises(AuthFailure) as info:
        _auth().authenticate_source("gf", None, "00" * 32, stamp, BODY)
    assert info.value.reason == "bad_timestamp"


def test_replay_window_expires_with_the_timestamp() -> None:
    """A signature is remembered until its timestamp leaves the window, then it is stale."""
    clock = Clock()
    auth = _auth(clock)
    stamp = str(int(NOW))
    signature = sign(b"gf-secret-0001", BODY, stamp)
    auth.complete(auth.authenticate_source("gf", None, signature, stamp, BODY), b"answer")
    clock.now = NOW + WINDOW_S - 1
    assert auth.authenticate_source("gf", None, signature, stamp, BODY).replayed == b"answer"
    clock.now = NOW + WINDOW_S + 1
    with pytest.raises(AuthFailure) as info:
        auth.authenticate_source("gf", None, signature, stamp, BODY)
    assert info.value.reason == "stale_timestamp"
    assert len(auth.replay_cache) == 0  # pruned once expired


def test_missing_signature_is_refused_when_the_source_has_a_secret() -> None:
    """A source with an hmac_secret cannot be reached without a signature."""
    with pytest.raises(AuthFailure) as info:
        _auth().authenticate_source("gf", None, None, None, BODY)
    assert info.value.reason == "missing_signature"


def test_source_with_token_and_secret_needs_both() -> None:
    """With both a token and an hmac_secret, each alone is not enough."""
    auth = _auth()
    signature = sign(b"gf-secret-0002", BODY)
    with pytest.raises(AuthFailure):
        auth.authenticate_source("gf-both", None, signature, None, BODY)
    with pytest.raises(AuthFailure):
        auth.authenticate_source("gf-both", "Bearer gf-token-0001", None, None, BODY)
    grant = auth.authenticate_source("gf-both", "Bearer gf-token-0001", signature, None, BODY)
    assert grant.source.name == "gf-both"


@pytest.mark.parametrize("signature", ["", "zz", "a" * 63, "a" * 65, "é" * 64, "\ud800" * 4])
def test_signatures_of_any_shape_fail_without_raising_other_errors(signature: str) -> None:
    """Odd lengths, non-hex and unencodable text are plain mismatches (compare_digest-safe)."""
    with pytest.raises(AuthFailure):
        _auth().authenticate_source("gf", None, signature, None, BODY)


@given(
    position=st.integers(min_value=0, max_value=len(BODY) - 1),
    flip=st.integers(min_value=1, max_value=255),
)
def test_any_single_byte_change_of_the_body_breaks_the_signature(position: int, flip: int) -> None:
    """Changing one byte of the signed body always fails verification."""
    auth = _auth()
    signature = sign(b"gf-secret-0001", BODY)
    tampered = bytearray(BODY)
    tampered[position] ^= flip
    with pytest.raises(AuthFailure) as info:
        auth.authenticate_source("gf", None, signature, None, bytes(tampered))
    assert info.value.reason == "wrong_signature"


def test_any_source_lookup_finds_the_matching_source_of_any_kind() -> None:
    """GET endpoints accept bearer or basic credentials of every source."""
    auth = _auth()
    assert auth.authenticate_any("Bearer bot-token-0001").name == "bot"
    assert auth.authenticate_any("bearer am-token-0001").name == "am"
    assert auth.authenticate_any(_basic("am", "pw-0001")).name == "am-basic"
    with pytest.raises(AuthFailure):
        auth.authenticate_any("Bearer gf-secret-0001")  # an HMAC secret is not a token
    with pytest.raises(AuthFailure):
        auth.authenticate_any(None)


def test_replay_cache_refuses_new_entries_when_full() -> None:
    """A full cache answers 503 rather than forgetting signatures early."""
    clock = Clock()
    cache = ReplayCache(max_entries=2, clock=clock)
    assert cache.reserve("a", NOW + 10) is None
    assert cache.reserve("b", NOW + 10) is None
    cache.complete("a", b"done")
    assert cache.reserve("a", NOW + 10) == b"done"
    with pytest.raises(Unavailable):
        cache.reserve("c", NOW + 10)
    clock.now = NOW + 11
    assert cache.reserve("c", NOW + 20) is None  # the expired ones made room
    assert len(cache) == 1
