"""Gateway-side checks of a signed request: V3 signature, access key, STS token, date, nonce.

Verification follows sae-api.md §4.5. The signature is recomputed over exactly the header names
the caller listed in ``SignedHeaders`` (the SDK signs ``user-agent``, ``accept`` and more, so no
fixed list would do), with the query form-decoded from the raw request target (``+`` is a space:
the SDK's sync client sends ``quote_plus`` encoding, its async client a yarl-decoded variant) and
re-encoded canonically. The order of checks, and the error for each:

====================================================  ========================================
Authorization missing, malformed, other algorithm,     ``IncompleteSignature`` (400)
or a mandatory header (``host``, ``x-acs-action``,
``x-acs-version``, ``x-acs-date``,
``x-acs-signature-nonce``, ``x-acs-content-sha256``,
``x-acs-security-token`` when sent) not signed
unknown access key id                                  ``InvalidAccessKeyId.NotFound`` (404)
STS token not the configured one (or missing)          ``InvalidSecurityToken.Malformed`` (400)
body hash differs from ``x-acs-content-sha256``,       ``SignatureDoesNotMatch`` (400)
signed header absent, or signature differs
``x-acs-date`` unparsable                              ``InvalidTimeStamp.Format`` (400)
``x-acs-date`` more than 15 minutes off                ``InvalidTimeStamp.Expired`` (400)
nonce seen in the last 15 minutes                      ``SignatureNonceUsed`` (400)
====================================================  ========================================

The nonce is remembered only after the signature verified, so forged requests cannot burn a
legitimate client's nonces.
"""

from __future__ import annotations

import hmac
from collections import deque
from collections.abc import Mapping
from datetime import datetime
from typing import Final

from orchestrator.sae import signer
from orchestrator.simulator.state import api_error

__all__ = ["MANDATORY_SIGNED_HEADERS", "NonceCache", "Verifier"]

MANDATORY_SIGNED_HEADERS: Final = frozenset(
    {
        "host",
        "x-acs-action",
        "x-acs-version",
        "x-acs-date",
        "x-acs-signature-nonce",
        "x-acs-content-sha256",
    }
)
WINDOW_S: Final = 15 * 60.0


def _parse_date(value: str) -> float | None:
    """Epoch seconds of an ``x-acs-date`` (``%Y-%m-%dT%H:%M:%SZ``), ``None`` if malformed."""
    # Requiring the `Z` keeps the parse zone-aware (a naive time would be read as local time).
    if not value.endswith("Z"):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


class NonceCache:
    """Nonces seen in the last ``ttl_s`` seconds, at most ``capacity`` of them.

    A dict for O(1) lookups plus a FIFO of (expiry, key) for O(1) amortized expiry. When full,
    the oldest nonce is forgotten early: under extreme load replay protection shrinks instead of
    memory growing without bound.
    """

    def __init__(self, ttl_s: float = WINDOW_S, capacity: int = 1_000_000) -> None:
        self.ttl_s = ttl_s
        self.capacity = capacity
        self._expiry: dict[str, float] = {}
        self._fifo: deque[tuple[float, str]] = deque()

    def __len__(self) -> int:
        return len(self._expiry)

    def check_and_add(self, key: str, now: float) -> bool:
        """Remember ``key``; ``False`` if it was already seen and has not expired (a replay)."""
        expiry, fifo = self._expiry, self._fifo
        while fifo and (fifo[0][0] <= now or len(expiry) >= self.capacity):
            old_expiry, old_key = fifo.popleft()
            # The key may have been re-added later with a newer expiry; keep that one.
            if expiry.get(old_key) == old_expiry:
                del expiry[old_key]
        seen = expiry.get(key)
        if seen is not None and seen > now:
            return False
        until = now + self.ttl_s
        expiry[key] = until
        fifo.append((until, key))
        return True


class Verifier:
    """Verifies ACS3-HMAC-SHA256 requests against known access keys (and STS tokens)."""

    def __init__(
        self,
        credentials: Mapping[str, str],
        *,
        security_tokens: Mapping[str, str] | None = None,
        window_s: float = WINDOW_S,
        nonce_capacity: int = 1_000_000,
    ) -> None:
        self._secrets = dict(credentials)
        self._tokens = dict(security_tokens or {})
        self.window_s = window_s
        self.nonces = NonceCache(window_s, nonce_capacity)

    def __repr__(self) -> str:
        # Secrets stay out of reprs; key ids are not secret.
        return f"Verifier(access_key_ids={sorted(self._secrets)!r})"

    def verify(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        headers: Mapping[str, str],
        body: bytes,
        now: float,
    ) -> str:
        """Check one request; return its access key id or raise the gateway's ``ApiError``.

        ``path`` is the raw (still escaped) path, ``query`` the form-decoded parameters.
        """
        value = headers.get("Authorization")
        if not value:
            raise api_error("IncompleteSignature", "The Authorization header is missing.")
        try:
            auth = signer.parse_authorization(value)
        except ValueError as exc:
            raise api_error("IncompleteSignature", str(exc)) from None
        if auth.algorithm != signer.ALGORITHM:
            raise api_error("IncompleteSignature", f"Unsupported algorithm {auth.algorithm[:40]}.")
        secret = self._secrets.get(auth.access_key_id)
        if secret is None:
            raise api_error("InvalidAccessKeyId.NotFound")
        signed = auth.signed_headers
        missing = MANDATORY_SIGNED_HEADERS.difference(signed)
        token = headers.get("x-acs-security-token")
        if token is not None and "x-acs-security-token" not in signed:
            missing = missing | {"x-acs-security-token"}
        if missing:
            raise api_error(
                "IncompleteSignature", f"Headers must be signed: {', '.join(sorted(missing))}."
            )
        expected_token = self._tokens.get(auth.access_key_id)
        if token is not None:
            if headers.get("x-acs-accesskey-id", auth.access_key_id) != auth.access_key_id:
                raise api_error(
                    "IncompleteSignature", "x-acs-accesskey-id differs from the Credential."
                )
            if expected_token is not None and not hmac.compare_digest(
                token.encode("utf-8", "surrogateescape"),
                expected_token.encode("utf-8", "surrogateescape"),
            ):
                raise api_error("InvalidSecurityToken.Malformed")
        elif expected_token is not None:
            raise api_error("InvalidSecurityToken.Malformed")

        content_sha = headers.get("x-acs-content-sha256", "")
        if content_sha.strip() != signer.payload_sha256(body):
            raise api_error(
                "SignatureDoesNotMatch", "(x-acs-content-sha256 does not match the body)"
            )
        try:
            canonical = signer.canonical_request(
                method, path, query, headers, signed, content_sha.strip()
            )
        except ValueError:
            # A signed header missing from the request, or escapes that are not UTF-8: nothing
            # the caller signed can match.
            raise api_error("SignatureDoesNotMatch", "(unverifiable request)") from None
        to_sign = signer.string_to_sign(canonical)
        if not hmac.compare_digest(
            signer.signature(secret, to_sign).encode(),
            auth.signature.encode("utf-8", "surrogateescape"),
        ):
            raise api_error("SignatureDoesNotMatch", to_sign)

        date = headers.get("x-acs-date", "")
        stamp = _parse_date(date)
        if stamp is None:
            raise api_error("InvalidTimeStamp.Format")
        if abs(now - stamp) > self.window_s:
            raise api_error("InvalidTimeStamp.Expired", f"The x-acs-date is {date}.")
        nonce = headers.get("x-acs-signature-nonce", "")
        if not self.nonces.check_and_add(f"{auth.access_key_id}:{nonce}", now):
            raise api_error("SignatureNonceUsed")
        return auth.access_key_id
