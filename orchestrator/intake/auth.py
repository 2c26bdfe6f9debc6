"""Who is calling: bearer tokens, basic auth and Grafana's HMAC signature, per source.

Each ``[sources.NAME]`` carries its own credentials (config.py). A request to a source's
webhook must satisfy *every kind* of credential the source configures:

* **identity** — ``token`` (``Authorization: Bearer ...``) or ``username``/``password``
  (``Authorization: Basic ...``), what Alertmanager's and Grafana's ``http_config`` send;
  with both configured either one is enough (one Authorization header cannot carry both);
* **signature** — with ``hmac_secret``, the hex HMAC-SHA256 in ``X-Grafana-Alert-Signature``
  over the raw body, or, when Grafana is configured with a timestamp header, over
  ``"{timestamp}:{body}"`` with the Unix seconds in :data:`TIMESTAMP_HEADER`.

Rules that make this safe:

* Verification runs on the **raw bytes before any parsing**: a body whose re-serialised
  JSON would differ is still checked exactly as sent.
* Every secret comparison is constant time (:func:`hmac.compare_digest`), and credential
  lookups across sources compare against *every* source without stopping at the first
  match, so response time does not tell which source (or how many) matched.
* A timestamp more than :data:`WINDOW_S` (5 minutes) away from our wall clock is refused
  (Grafana itself enforces no window). Inside the window a signed request is *processed*
  once: the :class:`ReplayCache` remembers each signature until its timestamp leaves the
  window (without a timestamp header: for 5 minutes after receipt) together with the
  answer it got, and a byte-identical replay receives that same answer without being
  processed again (reliability.md §3: "accepted once, second time returns the original
  result"). A replay that arrives while the original is still being processed gets 409.
  A request that fails (any non-2xx) gives its signature back, so the sender's retry of
  the very same signed request after a 503 is processed normally.
* Unknown sources and wrong credentials get the same 401; the reason is logged, not sent.

GET endpoints accept the bearer/basic credentials of any source; sources that only have
an ``hmac_secret`` cannot sign a GET and so can only post webhooks.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from orchestrator.config import SourceSettings
from orchestrator.intake.schemas import Conflict, Unauthorized, Unavailable, retry_after_header

SIGNATURE_HEADER: Final = "X-Grafana-Alert-Signature"
#: Grafana's timestamp header has no default name; configure this one in the contact point.
TIMESTAMP_HEADER: Final = "X-Grafana-Alert-Timestamp"
#: Accepted distance between a signed timestamp and our clock, and the replay-cache span.
WINDOW_S: Final = 300.0
#: Upper bound of remembered signatures (each ~200 bytes); at the default per-source rate
#: limit (50/s) one source fills 15,000 of them in a full window.
MAX_REPLAY_ENTRIES: Final = 100_000


class AuthFailure(Unauthorized):
    """401 with an internal ``reason`` for logs and metrics (the client sees a generic text)."""

    def __init__(self, reason: str, message: str = "missing or invalid credentials") -> None:
        super().__init__(message)
        self.reason = reason


def _utf8(text: str) -> bytes | None:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates cannot match any configured secret
        return None


def _same(presented: bytes | None, expected: bytes) -> bool:
    """Constant-time equality; ``None`` (unencodable input) compares as a mismatch."""
    if presented is None:
        # Still spend the comparison so timing does not reveal the early exit.
        hmac.compare_digest(expected, expected)
        return False
    return hmac.compare_digest(presented, expected)


@dataclass(frozen=True, slots=True)
class Presented:
    """The credentials a request carries in its ``Authorization`` header."""

    bearer: bytes | None = None
    username: bytes | None = None
    password: bytes | None = None

    @property
    def empty(self) -> bool:
        """No usable Authorization header at all."""
        return self.bearer is None and self.username is None


def presented_credentials(authorization: str | None) -> Presented:
    """Parse ``Authorization: Bearer <token>`` or ``Basic <base64(user:pass)>``."""
    if not authorization:
        return Presented()
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if not value:
        return Presented()
    if scheme.lower() == "bearer":
        return Presented(bearer=_utf8(value))
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return Presented()
        user, sep, password = decoded.partition(b":")
        if not sep:
            return Presented()
        return Presented(username=user, password=password)
    return Presented()


class ReplayCache:
    """Signatures seen inside the window, each with the answer its request got.

    A dict for lookups plus a heap of expiries for pruning. Expiries come from the wall
    clock because they are derived from signed wall-clock timestamps. An entry without an
    answer yet is a request still in progress.
    """

    def __init__(
        self,
        *,
        max_entries: int = MAX_REPLAY_ENTRIES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._max = max_entries
        self._clock = clock
        self._entries: dict[str, tuple[float, bytes | None]] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        """How many signatures are remembered (expired ones are dropped first)."""
        self._prune(self._clock())
        return len(self._entries)

    def _prune(self, now: float) -> None:
        heap, entries = self._heap, self._entries
        while heap and heap[0][0] <= now:
            at, key = heapq.heappop(heap)
            entry = entries.get(key)
            if entry is not None and entry[0] == at:
                del entries[key]

    def reserve(self, key: str, expires_at: float) -> bytes | None:
        """Start processing ``key``: ``None`` if it is new, else the answer it already got.

        Raises :class:`~orchestrator.intake.schemas.Conflict` while the first request with
        this signature is still in progress, and 503 when the cache is full.
        """
        now = self._clock()
        self._prune(now)
        entry = self._entries.get(key)
        if entry is not None:
            if entry[1] is None:
                raise Conflict(
                    "the same signed request is still being processed; retry shortly",
                    code="replay_in_progress",
                )
            return entry[1]
        if len(self._entries) >= self._max:
            # Refusing is the safe choice: forgetting early would let replays through.
            raise Unavailable(
                "too many signed requests in the replay window; retry shortly",
                code="overloaded",
                headers=retry_after_header(1),
            )
        self._entries[key] = (expires_at, None)
        heapq.heappush(self._heap, (expires_at, key))
        return None

    def complete(self, key: str, answer: bytes) -> None:
        """Record the answer of ``key``'s request, returned to any replay inside the window."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries[key] = (entry[0], answer)

    def release(self, key: str) -> None:
        """Forget ``key`` (its request failed and will be retried by the sender)."""
        self._entries.pop(key, None)


@dataclass(frozen=True, slots=True)
class _SourceSecrets:
    """A source's secrets as bytes, ready for constant-time comparison."""

    settings: SourceSettings
    token: bytes | None
    username: bytes | None
    password: bytes | None
    hmac_key: bytes | None

    @classmethod
    def of(cls, src: SourceSettings) -> _SourceSecrets:
        return cls(
            settings=src,
            token=src.token.value.encode() if src.token else None,
            username=src.username.encode() if src.username is not None else None,
            password=src.password.value.encode() if src.password else None,
            hmac_key=src.hmac_secret.value.encode() if src.hmac_secret else None,
        )

    @property
    def has_identity(self) -> bool:
        return self.token is not None or self.password is not None

    def identity_matches(self, presented: Presented) -> bool:
        """Bearer equals the token, or basic equals username+password (constant time)."""
        ok = False
        if self.token is not None:
            ok |= _same(presented.bearer, self.token)
        if self.username is not None and self.password is not None:
            # Both halves are always compared: no early exit on a wrong user name.
            user_ok = _same(presented.username, self.username)
            password_ok = _same(presented.password, self.password)
            ok |= user_ok & password_ok
        return ok


@dataclass(frozen=True, slots=True)
class Grant:
    """A request authenticated as ``source``.

    ``replay_key`` is set when a signature was checked; ``replayed`` holds the answer an
    identical signed request already got (send it back, process nothing).
    """

    source: SourceSettings
    replay_key: str | None = None
    replayed: bytes | None = None


def sign(secret: bytes, body: bytes, timestamp: str | None = None) -> str:
    """Grafana's signature: hex HMAC-SHA256 of the body, or of ``"{timestamp}:{body}"``."""
    message = body if timestamp is None else timestamp.encode() + b":" + body
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


class Authenticator:
    """Checks requests against the configured sources (one instance per app)."""

    def __init__(
        self,
        sources: Mapping[str, SourceSettings],
        *,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.time,
        replay_cache: ReplayCache | None = None,
    ) -> None:
        self._sources = {name: _SourceSecrets.of(src) for name, src in sources.items()}
        self._window_s = window_s
        self._clock = clock
        self.replay_cache = replay_cache if replay_cache is not None else ReplayCache(clock=clock)

    def source(self, name: str) -> SourceSettings | None:
        """The configured source called ``name``, if any."""
        found = self._sources.get(name)
        return found.settings if found is not None else None

    def authenticate_source(
        self,
        name: str,
        authorization: str | None,
        signature: str | None,
        timestamp: str | None,
        body: bytes,
    ) -> Grant:
        """Check a request to source ``name``'s own endpoint; raise :class:`AuthFailure`."""
        secrets = self._sources.get(name)
        if secrets is None:
            # Same answer as a wrong token: a 401 must not confirm which sources exist.
            raise AuthFailure("unknown_source")
        if not secrets.has_identity and secrets.hmac_key is None:
            raise AuthFailure("source_without_credentials")  # never run open
        if secrets.has_identity:
            presented = presented_credentials(authorization)
            if presented.empty:
                raise AuthFailure("missing_credentials")
            if not secrets.identity_matches(presented):
                raise AuthFailure("wrong_credentials")
        if secrets.hmac_key is None:
            return Grant(secrets.settings)
        replay_key, expires_at = self._verify_signature(
            name, secrets.hmac_key, signature, timestamp, body
        )
        replayed = self.replay_cache.reserve(replay_key, expires_at)
        return Grant(secrets.settings, None if replayed is not None else replay_key, replayed)

    def authenticate_any(self, authorization: str | None) -> SourceSettings:
        """The source whose bearer/basic credentials the request carries (any source).

        Every source is compared, so the time taken does not depend on which one matched.
        Sources of every kind are recognised, so a caller using the wrong kind of source
        for an endpoint gets 403 (known, not allowed there) rather than 401.
        """
        presented = presented_credentials(authorization)
        if presented.empty:
            raise AuthFailure("missing_credentials")
        found: SourceSettings | None = None
        for secrets in self._sources.values():
            if secrets.has_identity and secrets.identity_matches(presented) and found is None:
                found = secrets.settings
        if found is None:
            raise AuthFailure("wrong_credentials")
        return found

    def _verify_signature(
        self,
        name: str,
        key: bytes,
        signature: str | None,
        timestamp: str | None,
        body: bytes,
    ) -> tuple[str, float]:
        """Check the signature; return its replay-cache key and when that may expire."""
        if not signature:
            raise AuthFailure("missing_signature", "missing request signature")
        now = self._clock()
        if timestamp is not None:
            stamp = timestamp.strip()
            if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
                raise AuthFailure("bad_timestamp", "malformed signature timestamp")
            signed_at = float(int(stamp))
            if abs(now - signed_at) > self._window_s:
                raise AuthFailure(
                    "stale_timestamp",
                    f"signature timestamp is more than {int(self._window_s)} s from the "
                    "server clock",
                )
            expected = sign(key, body, stamp)
            expires_at = signed_at + self._window_s
        else:
            expected = sign(key, body)
            expires_at = now + self._window_s
        presented = signature.strip().lower()
        if not _same(_utf8(presented), expected.encode()):
            raise AuthFailure("wrong_signature", "invalid request signature")
        return f"{name}:{expected}", expires_at

    def complete(self, grant: Grant, answer: bytes) -> None:
        """Remember the answer of a signed request for replays inside the window."""
        if grant.replay_key is not None:
            self.replay_cache.complete(grant.replay_key, answer)

    def release(self, grant: Grant | None) -> None:
        """Give a grant's signature back after a failure the sender will retry."""
        if grant is not None and grant.replay_key is not None:
            self.replay_cache.release(grant.replay_key)
