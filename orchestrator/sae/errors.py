"""Classified SAE call failures, and the named helpers the worker's retry policy is built on.

::

    orchestrator.errors.SaeError
    └── SaeCallError              a call failed; carries its CallOutcome (never raised itself)
        ├── SaeBusy               Application.ChangerOrderRunning, System.Upgrading,
        │                         Application.InvalidStatus: retry later
        ├── SaeThrottled          Throttling*, HTTP 429: retry later, honour retry_after_s
        ├── SaeServerError        5xx, ServiceUnavailable, InternalError: retry, but ambiguous
        ├── SaeTransportError     no parsable answer: connect error, timeout, reset, garbage body
        ├── SaeNotRunning         Application.ChangerOrder.Not.Running: reconcile with state
        └── SaePermanentError     will never succeed as sent: not found, permission, parameter,
                                  signature / key / timestamp / nonce, Forbidden.RAM, credentials

Rules (:func:`classify`): a known code decides; otherwise ``Throttling*``, HTTP 429 and a 4xx
carrying ``x-acs-retry-after`` are throttled, any other 4xx permanent, 5xx server (the
retry-after is still kept); a 2xx whose ``Success`` is not true with an unknown code is
permanent. No status at all (no answer) is transport.

:func:`is_retryable` says whether trying again can help; :func:`is_ambiguous` says whether the
failed call may nevertheless have taken effect (read timeout, reset after sending, 5xx, garbage
body): after such an outcome the worker must reconcile with DescribeChangeOrder before calling
AbortAndRollbackChangeOrder again. A connect error never reached the server, so it is not ambiguous.
"""

from __future__ import annotations

import enum
from typing import ClassVar

from orchestrator.errors import SaeError
from orchestrator.sae.models import CallOutcome, Classification

__all__ = [
    "BUSY_CODES",
    "NOT_RUNNING_CODES",
    "PERMANENT_CODES",
    "SERVER_CODES",
    "SaeBusy",
    "SaeCallError",
    "SaeNotRunning",
    "SaePermanentError",
    "SaeServerError",
    "SaeThrottled",
    "SaeTransportError",
    "TransportKind",
    "classify",
    "error_for",
    "is_ambiguous",
    "is_retryable",
    "parse_retry_after",
]

#: Another change holds the app, or SAE is being upgraded: the same call works later.
BUSY_CODES = frozenset(
    {"Application.ChangerOrderRunning", "System.Upgrading", "Application.InvalidStatus"}
)
#: The change order is no longer running (it finished, or an earlier abort already took effect).
NOT_RUNNING_CODES = frozenset({"Application.ChangerOrder.Not.Running"})
#: Server-side failures that may or may not have taken effect.
SERVER_CODES = frozenset({"ServiceUnavailable", "InternalError"})
#: Known codes that never succeed as sent. Unknown 4xx codes are permanent too; this list makes
#: the classification independent of the HTTP status the gateway happens to use (the docs
#: disagree on 400/403/404 for several of them, sae-api.md §8).
PERMANENT_CODES = frozenset(
    {
        "InvalidParameter.NotEmpty",
        "InvalidParameter.Obviously",
        "InvalidParameter.WithMessage",
        "MissingParameter",
        "Resouce.no.permission",
        "InvalidChangeOrder.NotFound",
        "InvalidAppId.NotFound",
        "InvalidApplication.NotFound",
        "InvalidNamespaceId.NotFound",
        "Application.NotDeployYet",
        "rollback.error",
        "user.indebt",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "InvalidAccessKeyId.NotFound",
        "InvalidAccessKeyId.Inactive",
        "InvalidTimeStamp.Expired",
        "InvalidTimeStamp.Format",
        "SignatureNonceUsed",
        "InvalidSecurityToken.Expired",
        "InvalidSecurityToken.Malformed",
        "InvalidSecurityToken.MismatchWithAccessKey",
        "InvalidApi.NotFound",
        "Forbidden.RAM",
        "UnsupportedHTTPMethod",
        "InvalidCredentials",
    }
)
#: Throttling codes that do not start with "Throttling" (Terraform's NeedRetry list).
_EXTRA_THROTTLING_CODES = frozenset({"Rejected.Throttling"})


class TransportKind(enum.StrEnum):
    """Why no parsable answer came; decides whether the call may have reached the server."""

    CONNECT = "connect"  # refused, DNS, TLS handshake: the request was never sent
    CONNECT_TIMEOUT = "connect_timeout"  # no connection within connect_timeout_s: never sent
    READ_TIMEOUT = "read_timeout"  # sent, no answer within read_timeout_s
    TIMEOUT = "timeout"  # the overall deadline passed; unknown whether it was sent
    RESET = "reset"  # the connection dropped after the request was (possibly) sent
    BAD_BODY = "bad_body"  # an answer came but it is not a JSON object (proxy HTML page)
    OTHER = "other"  # any other client-side failure during the exchange
    # The credential source (ECS metadata, STS for RRSA, a profile file) failed: nothing was
    # signed or sent. Retried like a connect error: a metadata-service blip must not fail a
    # rollback for good, and a chain that stays empty fails the job at max_elapsed_s.
    CREDENTIALS = "credentials"

    @property
    def ambiguous(self) -> bool:
        """True unless the request certainly never reached the server."""
        return self not in (
            TransportKind.CONNECT,
            TransportKind.CONNECT_TIMEOUT,
            TransportKind.CREDENTIALS,
        )


class SaeCallError(SaeError):
    """An SAE call that did not succeed; ``outcome`` records what happened.

    The message is built from the outcome only (action, status, code, SAE's message, request
    id), which never holds credentials; the client scrubs secrets from SAE's message text.
    """

    classification: ClassVar[Classification]

    def __init__(self, outcome: CallOutcome) -> None:
        self.outcome = outcome
        super().__init__(self._describe())

    def _describe(self) -> str:
        outcome = self.outcome
        status = f"HTTP {outcome.http_status}" if outcome.http_status is not None else "no answer"
        text = f"{outcome.action} failed ({self.classification}): {status}, {outcome.code}"
        if outcome.message:
            text += f": {outcome.message}"
        if outcome.request_id:
            text += f" [RequestId {outcome.request_id}]"
        return text

    @property
    def code(self) -> str:
        """The normalized error code (see :class:`CallOutcome`)."""
        return self.outcome.code

    @property
    def http_status(self) -> int | None:
        """The HTTP status, or ``None`` when no answer came."""
        return self.outcome.http_status

    @property
    def request_id(self) -> str | None:
        """SAE's ``RequestId`` when the answer had one."""
        return self.outcome.request_id

    @property
    def trace_id(self) -> str | None:
        """SAE's ``TraceId`` when the answer had one."""
        return self.outcome.trace_id


class SaeBusy(SaeCallError):
    """The application is busy with another change (or SAE is upgrading): retry later."""

    classification = Classification.BUSY


class SaeThrottled(SaeCallError):
    """SAE flow control refused the call: retry later, no sooner than ``retry_after_s``."""

    classification = Classification.THROTTLED

    @property
    def retry_after_s(self) -> float | None:
        """Seconds to wait from ``x-acs-retry-after`` (sent in milliseconds), if present."""
        return self.outcome.retry_after_s


class SaeServerError(SaeCallError):
    """SAE failed on its side (5xx, ServiceUnavailable, InternalError); it may have acted."""

    classification = Classification.SERVER


class SaeTransportError(SaeCallError):
    """No parsable answer came; ``kind`` says whether the request may have been processed."""

    classification = Classification.TRANSPORT

    def __init__(self, outcome: CallOutcome, kind: TransportKind) -> None:
        self.kind = kind
        super().__init__(outcome)

    def _describe(self) -> str:
        return f"{super()._describe()} (transport: {self.kind})"


class SaeNotRunning(SaeCallError):
    """The change order is not running: it finished, or an earlier abort already took effect.

    The caller must reconcile with DescribeChangeOrder to tell "already rolled back" from
    "finished by itself".
    """

    classification = Classification.NOT_RUNNING


class SaePermanentError(SaeCallError):
    """The call will never succeed as sent (not found, no permission, bad signature, ...)."""

    classification = Classification.PERMANENT


_ERROR_TYPES: dict[Classification, type[SaeCallError]] = {
    Classification.BUSY: SaeBusy,
    Classification.THROTTLED: SaeThrottled,
    Classification.SERVER: SaeServerError,
    Classification.NOT_RUNNING: SaeNotRunning,
    Classification.PERMANENT: SaePermanentError,
}


def classify(
    http_status: int | None, code: str | None, retry_after_s: float | None = None
) -> Classification:
    """Classify a failed call from its HTTP status (``None``: no answer) and its error code.

    A known code decides regardless of status, so a gateway answering ``SignatureDoesNotMatch``
    with 403 instead of 400 changes nothing. A 4xx with an unknown code and an
    ``x-acs-retry-after`` is throttled (the SDK raises ThrottlingException for such answers); a
    5xx stays a server error even then, because it may have taken effect. Other unknown codes
    fall back on the status.
    """
    if http_status is None:
        return Classification.TRANSPORT
    if code is not None:
        if code in BUSY_CODES:
            return Classification.BUSY
        if code in NOT_RUNNING_CODES:
            return Classification.NOT_RUNNING
        if code in SERVER_CODES:
            return Classification.SERVER
        if code.startswith("Throttling") or code in _EXTRA_THROTTLING_CODES:
            return Classification.THROTTLED
        if code in PERMANENT_CODES:
            return Classification.PERMANENT
    if http_status == 429 or (retry_after_s is not None and 400 <= http_status < 500):
        return Classification.THROTTLED
    if http_status >= 500:
        return Classification.SERVER
    # 4xx with an unknown code, a 2xx whose Success is not true, and (never followed) 3xx.
    return Classification.PERMANENT


def error_for(outcome: CallOutcome, kind: TransportKind | None = None) -> SaeCallError:
    """The exception for a failed ``outcome``; ``kind`` is required for transport failures."""
    classification = outcome.classification
    if classification is None:
        raise ValueError("error_for() needs a failed outcome")
    if classification is Classification.TRANSPORT:
        if kind is None:
            raise ValueError("a transport failure needs its TransportKind")
        return SaeTransportError(outcome, kind)
    return _ERROR_TYPES[classification](outcome)


def is_retryable(exc: BaseException) -> bool:
    """True when calling again later can succeed: busy, throttled, server or transport errors."""
    return isinstance(exc, SaeBusy | SaeThrottled | SaeServerError | SaeTransportError)


def is_ambiguous(exc: BaseException) -> bool:
    """True when the failed call may still have taken effect, so state must be reconciled.

    Server errors and transport failures after the request may have been sent (read timeout,
    overall timeout, reset, unparsable answer) are ambiguous. Connect errors and every answered
    refusal (busy, throttled, not running, permanent) are not.
    """
    if isinstance(exc, SaeServerError):
        return True
    if isinstance(exc, SaeTransportError):
        return exc.kind.ambiguous
    return False


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from an ``x-acs-retry-after`` value, a positive integer of milliseconds.

    The SDK (``Utils.get_throttling_time_left``/``ThrottlingException``) treats it as
    milliseconds; anything that is not a positive integer is ignored, as the SDK does.
    """
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit() or not text.isascii():
        return None
    milliseconds = int(text)
    if milliseconds <= 0:
        return None
    return milliseconds / 1000.0
