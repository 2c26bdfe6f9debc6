"""ACS3-HMAC-SHA256 request signing (Alibaba Cloud OpenAPI "V3" signature), shared by both ends.

The SAE client signs its requests with :func:`sign_request`; the simulator verifies incoming
requests by parsing the ``Authorization`` header with :func:`parse_authorization` and recomputing
:func:`canonical_request` over exactly the header names listed in ``SignedHeaders``.

The rules (see sae-api.md §4.3-§4.4)::

    CanonicalRequest = METHOD \\n CanonicalURI \\n CanonicalQuery \\n CanonicalHeaders \\n
                       SignedHeaders \\n HashedPayload
    StringToSign     = "ACS3-HMAC-SHA256" \\n lowerhex(sha256(CanonicalRequest))
    Signature        = lowerhex(hmac_sha256(secret, StringToSign))
    Authorization    = "ACS3-HMAC-SHA256 Credential=<ak>,SignedHeaders=<a;b;c>,Signature=<sig>"

Pure functions, standard library only. The only exception raised is :class:`ValueError` for
malformed input, and no secret ever appears in an exception message or a ``repr``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote

__all__ = [
    "ALGORITHM",
    "EMPTY_BODY_SHA256",
    "ParsedAuthorization",
    "authorization",
    "canonical_headers",
    "canonical_query",
    "canonical_request",
    "canonical_uri",
    "parse_authorization",
    "payload_sha256",
    "percent_encode",
    "sign_request",
    "signature",
    "string_to_sign",
]

ALGORITHM = "ACS3-HMAC-SHA256"
EMPTY_BODY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

# RFC 3986 unreserved characters besides ASCII letters and digits (which `quote` never escapes).
_UNRESERVED_PUNCTUATION = "-_.~"


def percent_encode(value: str) -> str:
    """Encode ``value`` per RFC 3986: only ``A-Za-z0-9-_.~`` stay literal, UTF-8, upper-case hex.

    A space becomes ``%20`` (never ``+``), ``*`` becomes ``%2A`` and ``/`` becomes ``%2F``.
    """
    try:
        return quote(value, safe=_UNRESERVED_PUNCTUATION, encoding="utf-8", errors="strict")
    except UnicodeEncodeError:
        # Lone surrogates cannot be sent as UTF-8; keep the value out of the message.
        raise ValueError("value is not encodable as UTF-8") from None


def payload_sha256(body: bytes) -> str:
    """Lower-case hex SHA-256 of the exact body bytes (the ``x-acs-content-sha256`` value)."""
    return hashlib.sha256(body).hexdigest()


def canonical_query(query: Mapping[str, str | None]) -> str:
    """Canonical query string: drop ``None`` values, sort by name, ``name=value`` joined by ``&``.

    Values are percent-encoded; names are encoded too (the documented rule). The SDK leaves names
    as they are, which gives the same result for every name made of unreserved characters, as
    all OpenAPI parameter names are. An empty value gives ``name=``; no parameters give ``""``.
    """
    names = sorted(name for name, value in query.items() if value is not None)
    parts: list[str] = []
    for name in names:
        value = query[name]
        assert value is not None  # filtered above; narrows the type for mypy
        parts.append(f"{percent_encode(name)}={percent_encode(value)}")
    return "&".join(parts)


def canonical_uri(path: str) -> str:
    """Canonical URI: percent-decode ``path`` then RFC 3986-encode each ``/``-separated segment.

    Decoding first makes the result independent of how the sender escaped the path on the wire
    (``/a%20b`` and ``/a b`` canonicalize alike). An empty path is ``/``.
    """
    if not path:
        return "/"
    try:
        decoded = unquote(path, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise ValueError("path escapes are not valid UTF-8") from None
    return "/".join(percent_encode(segment) for segment in decoded.split("/"))


def canonical_headers(headers: Mapping[str, str], signed: Sequence[str]) -> tuple[str, str]:
    """Canonical header block and signed-header list for the names in ``signed``.

    Names are lower-cased and values trimmed (inner whitespace is kept). Values of a name that
    appears more than once case-insensitively are sorted and joined with ``,``. Returns the block
    (``name:value\\n`` per header, sorted by name, so it ends in ``\\n`` unless empty) and the
    ``a;b;c`` list. Raises :class:`ValueError` if a signed name has no header.
    """
    wanted = {name.strip().lower() for name in signed}
    if "" in wanted:
        raise ValueError("empty header name in the signed header list")
    values: dict[str, list[str]] = {}
    for name, value in headers.items():
        lowered = name.strip().lower()
        if lowered in wanted:
            values.setdefault(lowered, []).append(value.strip())
    missing = sorted(wanted - values.keys())
    if missing:
        # Header names are not secret; their values (which may hold a token) stay out.
        raise ValueError(f"signed header(s) missing from the request: {', '.join(missing)}")
    names = sorted(values)
    block = "".join(f"{name}:{','.join(sorted(values[name]))}\n" for name in names)
    return block, ";".join(names)


def canonical_request(
    method: str,
    path: str,
    query: Mapping[str, str | None],
    headers: Mapping[str, str],
    signed: Sequence[str],
    payload_sha256: str,
) -> str:
    """The canonical request text that :func:`string_to_sign` hashes (sae-api.md §4.3)."""
    block, signed_list = canonical_headers(headers, signed)
    return _canonical_request(method, path, query, block, signed_list, payload_sha256)


def _canonical_request(
    method: str,
    path: str,
    query: Mapping[str, str | None],
    block: str,
    signed_list: str,
    payload_sha256: str,
) -> str:
    if not method or not method.isalpha():
        raise ValueError("HTTP method must be a non-empty alphabetic token")
    return "\n".join(
        [
            method.upper(),
            canonical_uri(path),
            canonical_query(query),
            block,
            signed_list,
            payload_sha256,
        ]
    )


def string_to_sign(canonical_request: str) -> str:
    """``ACS3-HMAC-SHA256\\n`` followed by the lower-hex SHA-256 of the canonical request."""
    digest = hashlib.sha256(canonical_request.encode("utf-8")).hexdigest()
    return f"{ALGORITHM}\n{digest}"


def signature(secret: str, string_to_sign: str) -> str:
    """Lower-hex HMAC-SHA256 of ``string_to_sign`` keyed with the UTF-8 secret (no derivation)."""
    return hmac.new(
        secret.encode("utf-8"), string_to_sign.encode("utf-8"), hashlib.sha256
    ).hexdigest()


def authorization(access_key_id: str, signed_headers: str, signature: str) -> str:
    """The ``Authorization`` header value; no spaces after the commas, as the SDK sends it."""
    return (
        f"{ALGORITHM} Credential={access_key_id},"
        f"SignedHeaders={signed_headers},Signature={signature}"
    )


def sign_request(
    method: str,
    path: str,
    query: Mapping[str, str | None],
    headers: Mapping[str, str],
    body: bytes,
    access_key_id: str,
    access_key_secret: str,
) -> str:
    """Sign a request and return its ``Authorization`` header value.

    Every header in ``headers`` is signed: the caller passes exactly the headers it will send
    (including ``x-acs-content-sha256``) and adds ``Authorization`` afterwards. If
    ``x-acs-content-sha256`` is present it must equal the SHA-256 of ``body``; a mismatch would
    produce a request no server accepts, so it is a :class:`ValueError` here.
    """
    body_hash = payload_sha256(body)
    for name, value in headers.items():
        if name.strip().lower() == "x-acs-content-sha256" and value.strip() != body_hash:
            raise ValueError("x-acs-content-sha256 does not match the body")
    block, signed_list = canonical_headers(headers, list(headers))
    canonical = _canonical_request(method, path, query, block, signed_list, body_hash)
    return authorization(
        access_key_id, signed_list, signature(access_key_secret, string_to_sign(canonical))
    )


@dataclass(frozen=True)
class ParsedAuthorization:
    """The parts of an ``Authorization: ACS3-... Credential=..,SignedHeaders=..,Signature=..``."""

    algorithm: str
    access_key_id: str
    signed_headers: tuple[str, ...]
    signature: str


def parse_authorization(value: str) -> ParsedAuthorization:
    """Split an ``Authorization`` header value into its parts; :class:`ValueError` if malformed.

    Tolerates optional whitespace after the commas. Signed header names are lower-cased. The
    algorithm is returned as sent; the verifier decides whether it is supported.
    """
    algorithm, sep, rest = value.strip().partition(" ")
    if not sep or not algorithm or not rest.strip():
        raise ValueError("Authorization must be '<algorithm> Credential=..,SignedHeaders=..,...'")
    fields: dict[str, str] = {}
    for item in rest.split(","):
        key, eq, field_value = item.strip().partition("=")
        if not eq or not key:
            raise ValueError("Authorization has a part without 'name=value'")
        if key in fields:
            raise ValueError(f"Authorization repeats {key}")
        fields[key] = field_value.strip()
    for required in ("Credential", "SignedHeaders", "Signature"):
        if not fields.get(required):
            raise ValueError(f"Authorization lacks {required}")
    names = tuple(name.strip().lower() for name in fields["SignedHeaders"].split(";"))
    if any(not name for name in names):
        raise ValueError("Authorization has an empty name in SignedHeaders")
    return ParsedAuthorization(
        algorithm=algorithm,
        access_key_id=fields["Credential"],
        signed_headers=names,
        signature=fields["Signature"],
    )
