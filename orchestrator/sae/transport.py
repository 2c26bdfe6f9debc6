"""The one place SAE calls touch the network: an HTTP exchange behind a single async callable.

Split as httpx does it: :class:`~orchestrator.sae.client.SaeClient` owns policy (signing,
parsing, classification) and hands a fully built :class:`HttpRequest` to a *transport*, any
``async (HttpRequest) -> HttpResponse`` callable. Unit tests pass a plain function; production
uses :class:`AiohttpTransport`, one shared ``aiohttp.ClientSession`` with connect and read
timeouts always on.

A transport raises only :class:`TransportFailure`, whose :class:`TransportKind` tells whether
the request may have reached the server (the worker must reconcile when it may have).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp
from yarl import URL

from orchestrator.sae.errors import TransportKind

__all__ = [
    "MAX_RESPONSE_BYTES",
    "AiohttpTransport",
    "HttpRequest",
    "HttpResponse",
    "Transport",
    "TransportFailure",
]

#: Answers larger than this are refused: SAE's JSON answers are a few kilobytes at most.
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class HttpRequest:
    """A request ready for the wire: ``url`` is already percent-encoded exactly as it was signed.

    ``repr`` leaves out the headers (they carry the STS token) and the body.
    """

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes

    def __repr__(self) -> str:
        return f"HttpRequest(method={self.method!r}, url={self.url!r}, body={len(self.body)}B)"


@dataclass(frozen=True)
class HttpResponse:
    """The answer: status, headers with lower-cased names, and the raw body bytes."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class TransportFailure(Exception):
    """No complete answer came; ``kind`` says how far the exchange got."""

    def __init__(self, kind: TransportKind, detail: str) -> None:
        self.kind = kind
        self.detail = detail
        super().__init__(f"{kind}: {detail}")


Transport = Callable[[HttpRequest], Awaitable[HttpResponse]]


class AiohttpTransport:
    """A :data:`Transport` over one shared ``aiohttp.ClientSession``.

    Timeouts are always on: ``sock_connect`` (connect), ``sock_read`` (gap between bytes of the
    answer) and a ``total`` deadline that defaults to both plus a margin, so that a server that
    never answers surfaces as a *read* timeout, distinguishable from a connect timeout. Each
    request is sent exactly once (aiohttp's hidden re-send is switched off). Given a
    ``session``, the transport uses it (with that re-send switched off too) and leaves closing
    it to its owner.
    """

    def __init__(
        self,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        total_timeout_s: float | None = None,
        max_connections: int = 100,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        if connect_timeout_s <= 0 or read_timeout_s <= 0:
            raise ValueError("connect and read timeouts must be positive")
        self._timeout = aiohttp.ClientTimeout(
            total=total_timeout_s or (connect_timeout_s + read_timeout_s + 5.0),
            sock_connect=connect_timeout_s,
            sock_read=read_timeout_s,
        )
        self._max_connections = max_connections
        self._session = session
        self._owns_session = session is None
        if session is not None:
            _disable_hidden_retry(session)

    async def open(self) -> None:
        """Create the session (idempotent); no-op for an injected session."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=self._timeout,
                # SAE answers set no cookies; a jar would only be state shared between calls.
                cookie_jar=aiohttp.DummyCookieJar(),
                # Proxies from the environment are an explicit choice, not a default (the SDK
                # honours HTTP(S)_PROXY silently; tests talk to loopback only).
                trust_env=False,
            )
            _disable_hidden_retry(self._session)

    async def close(self) -> None:
        """Close the session if this transport created it."""
        session, self._session = self._session, None
        if session is not None and self._owns_session:
            await session.close()

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        """Send ``request`` and read the whole answer, or raise :class:`TransportFailure`."""
        session = self._session
        if session is None:
            raise RuntimeError("AiohttpTransport is not open")
        try:
            async with session.request(
                request.method,
                # encoded=True: the query was percent-encoded by the signer exactly as signed;
                # letting yarl re-encode it would change the bytes on the wire.
                URL(request.url, encoded=True),
                headers=dict(request.headers),
                data=request.body or None,
                allow_redirects=False,
                timeout=self._timeout,
            ) as response:
                body = await _read_capped(response)
                headers = {name.lower(): value for name, value in response.headers.items()}
                return HttpResponse(status=response.status, headers=headers, body=body)
        # Order matters: aiohttp's timeout errors are also OSError/TimeoutError subclasses.
        except aiohttp.ConnectionTimeoutError as exc:
            raise TransportFailure(TransportKind.CONNECT_TIMEOUT, _text(exc)) from exc
        except aiohttp.ServerTimeoutError as exc:
            raise TransportFailure(TransportKind.READ_TIMEOUT, _text(exc)) from exc
        except aiohttp.ClientConnectorError as exc:
            raise TransportFailure(TransportKind.CONNECT, _text(exc)) from exc
        except aiohttp.InvalidURL as exc:
            raise TransportFailure(TransportKind.CONNECT, "invalid URL") from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
            raise TransportFailure(TransportKind.RESET, _text(exc)) from exc
        except (aiohttp.ClientOSError, ConnectionResetError, BrokenPipeError) as exc:
            raise TransportFailure(TransportKind.RESET, _text(exc)) from exc
        except aiohttp.ClientError as exc:
            raise TransportFailure(TransportKind.OTHER, _text(exc)) from exc
        except TimeoutError as exc:
            # The overall deadline: the request may or may not have been sent.
            raise TransportFailure(TransportKind.TIMEOUT, "overall deadline passed") from exc


def _disable_hidden_retry(session: aiohttp.ClientSession) -> None:
    """Stop aiohttp from silently sending a request a second time.

    aiohttp re-sends an "idempotent" request (GET, PUT, DELETE...) once when the connection
    drops (``ClientOSError``/``ServerDisconnectedError``). For SAE that is wrong twice over:
    AbortAndRollbackChangeOrder is a PUT whose outcome is not idempotent (the worker must
    reconcile after a reset, not have it re-sent behind its back), and the re-sent request
    carries the same signed nonce, so SAE answers ``SignatureNonceUsed``, a permanent error that
    hides the real, ambiguous outcome. There is no public switch; aiohttp's own test client sets
    this attribute. It is listed in ``ClientSession.ATTRS``: should a future aiohttp drop it,
    the assignment raises a DeprecationWarning, which the test suite turns into a failure.
    """
    session._retry_connection = False


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(_CHUNK):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise TransportFailure(
                TransportKind.BAD_BODY, f"answer larger than {MAX_RESPONSE_BYTES} bytes"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _text(exc: BaseException) -> str:
    # aiohttp's messages name host:port and the OS error, never headers or the query.
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
