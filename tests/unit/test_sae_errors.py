"""SAE error classification: every documented code, the status fallbacks, retryable/ambiguous."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from orchestrator.errors import RollbackError, SaeError
from orchestrator.sae.client import interpret_response
from orchestrator.sae.errors import (
    SaeBusy,
    SaeCallError,
    SaeNotRunning,
    SaePermanentError,
    SaeServerError,
    SaeThrottled,
    SaeTransportError,
    TransportKind,
    classify,
    error_for,
    is_ambiguous,
    is_retryable,
    parse_retry_after,
)
from orchestrator.sae.models import CallOutcome, Classification
from orchestrator.sae.transport import HttpResponse

B = Classification.BUSY
T = Classification.THROTTLED
S = Classification.SERVER
N = Classification.NOT_RUNNING
P = Classification.PERMANENT

# (HTTP status, code, expected) for every code in sae-api.md §1.3, §2.4 and §3.3, at the
# status(es) the docs give (both where they disagree).
DOCUMENTED = [
    # §1.3 AbortAndRollbackChangeOrder
    (400, "InvalidParameter.NotEmpty", P),
    (400, "Resouce.no.permission", P),
    (400, "Application.ChangerOrderRunning", B),
    (400, "InvalidChangeOrder.NotFound", P),
    (400, "Application.ChangerOrder.Not.Running", N),
    (400, "System.Upgrading", B),
    (404, "InvalidAppId.NotFound", P),
    # §2.4 RollbackApplication / AbortChangeOrder
    (400, "InvalidApplication.NotFound", P),
    (400, "InvalidParameter.Obviously", P),
    (400, "InvalidParameter.WithMessage", P),
    (400, "Application.InvalidStatus", B),
    (400, "Application.NotDeployYet", P),
    (400, "rollback.error", P),
    (400, "NoComputeResourceQuota.Exceed", P),
    (400, "user.indebt", P),
    (404, "InvalidNamespaceId.NotFound", P),
    # §3.3 gateway errors
    (400, "Throttling.User", T),
    (400, "Throttling.Api", T),
    (400, "Throttling", T),
    (503, "ServiceUnavailable", S),
    (500, "InternalError", S),
    (400, "SignatureDoesNotMatch", P),
    (403, "SignatureDoesNotMatch", P),
    (400, "IncompleteSignature", P),
    (404, "InvalidAccessKeyId.NotFound", P),
    (400, "InvalidAccessKeyId.NotFound", P),
    (400, "InvalidAccessKeyId.Inactive", P),
    (400, "InvalidTimeStamp.Expired", P),
    (400, "InvalidTimeStamp.Format", P),
    (400, "SignatureNonceUsed", P),
    (400, "InvalidSecurityToken.Expired", P),
    (400, "InvalidSecurityToken.Malformed", P),
    (400, "MissingParameter", P),
    (400, "MissingChangeOrderId", P),
    (404, "InvalidApi.NotFound", P),
    (403, "Forbidden.RAM", P),
    (400, "UnsupportedHTTPMethod", P),
    (403, "UnsupportedHTTPMethod", P),
]

EXCEPTION_TYPES: dict[Classification, type[SaeCallError]] = {
    B: SaeBusy,
    T: SaeThrottled,
    S: SaeServerError,
    N: SaeNotRunning,
    P: SaePermanentError,
}

STARTED = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)


def _outcome(classification: Classification | None, **kw: object) -> CallOutcome:
    values: dict[str, object] = {
        "action": "AbortAndRollbackChangeOrder",
        "http_status": 400,
        "code": "X",
        "error_code": None,
        "message": None,
        "request_id": "RID",
        "trace_id": None,
        "duration_s": 0.01,
        "started_at": STARTED,
        "classification": classification,
    }
    values.update(kw)
    return CallOutcome(**values)  # type: ignore[arg-type]


def _interpret(status: int, body: object, headers: dict[str, str] | None = None) -> CallOutcome:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = HttpResponse(status=status, headers=headers or {}, body=raw)
    outcome, _, _ = interpret_response(
        "AbortAndRollbackChangeOrder", response, started_at=STARTED, duration_s=0.01
    )
    return outcome


@pytest.mark.parametrize(("status", "code", "expected"), DOCUMENTED)
def test_documented_code_is_classified(status: int, code: str, expected: Classification) -> None:
    """Each documented SAE / gateway code maps to the class the worker must act on."""
    assert classify(status, code) is expected


@pytest.mark.parametrize(("status", "code", "expected"), DOCUMENTED)
def test_documented_code_in_sae_body_raises_its_type(
    status: int, code: str, expected: Classification
) -> None:
    """A recommended SAE error body (§3.1) with that code yields the matching exception type."""
    body = {
        "RequestId": "91F93257-7A4A",
        "HostId": "sae.cn-hangzhou.aliyuncs.com",
        "Code": code,
        "ErrorCode": code,
        "Message": "m",
        "TraceId": "0a98a023",
        "Success": False,
        "Data": None,
    }
    response = HttpResponse(status=status, headers={}, body=json.dumps(body).encode())
    outcome, _, error = interpret_response(
        "AbortAndRollbackChangeOrder", response, started_at=STARTED, duration_s=0.01
    )
    assert type(error) is EXCEPTION_TYPES[expected]
    assert outcome.code == code
    assert outcome.classification is expected
    assert (outcome.request_id, outcome.trace_id) == ("91F93257-7A4A", "0a98a023")


@pytest.mark.parametrize(("status", "code", "expected"), DOCUMENTED)
def test_documented_code_in_gateway_body_raises_its_type(
    status: int, code: str, expected: Classification
) -> None:
    """A POP gateway body (only ``Code``, no ErrorCode/Success/TraceId) classifies the same."""
    outcome = _interpret(status, {"RequestId": "R", "Code": code, "Message": "m", "HostId": "h"})
    assert outcome.code == code
    assert outcome.error_code is None
    assert outcome.trace_id is None
    assert outcome.classification is expected


@pytest.mark.parametrize(
    ("status", "expected"), [(400, P), (401, P), (403, P), (404, P), (409, P), (500, S), (502, S)]
)
def test_unknown_code_falls_back_on_status(status: int, expected: Classification) -> None:
    """Unknown codes are permanent on 4xx and server errors on 5xx."""
    assert classify(status, "Some.New.Code") is expected
    assert classify(status, None) is expected


def test_no_answer_is_transport() -> None:
    """Without an HTTP status (no answer at all) the call is a transport failure."""
    assert classify(None, None) is Classification.TRANSPORT
    assert classify(None, "Application.ChangerOrderRunning") is Classification.TRANSPORT


def test_known_code_wins_over_status() -> None:
    """A busy code on a 500 is still busy: the code says what happened."""
    assert classify(500, "Application.ChangerOrderRunning") is B
    assert classify(400, "ServiceUnavailable") is S


def test_throttling_variants_and_http_429() -> None:
    """Any Throttling* code, Rejected.Throttling and HTTP 429 are throttling."""
    assert classify(400, "Throttling.Whatever") is T
    assert classify(400, "Rejected.Throttling") is T
    assert classify(429, None) is T


def test_retry_after_on_unknown_4xx_is_throttling_but_not_on_5xx() -> None:
    """x-acs-retry-after turns an unknown 4xx into throttling; a 5xx stays a server error."""
    assert classify(400, "Unknown.Code", 1.5) is T
    assert classify(503, "Unknown.Code", 1.5) is S
    assert classify(400, "InvalidChangeOrder.NotFound", 1.5) is P


def test_success_false_on_200_is_classified_by_code() -> None:
    """A 200 whose Success is not true is a failure, classified by its code."""
    busy = _interpret(200, {"Success": False, "Code": "200", "ErrorCode": "System.Upgrading"})
    assert busy.classification is B
    assert busy.code == "System.Upgrading"
    unknown = _interpret(200, {"Success": False, "Code": 200})
    assert unknown.classification is P
    assert unknown.code == "Success.NotTrue"
    missing = _interpret(200, {"RequestId": "R", "Data": {"ChangeOrderId": "x"}})
    assert missing.classification is P


@pytest.mark.parametrize("code_value", ["Throttling.User", 400, "400"])
def test_code_may_be_string_or_int(code_value: object) -> None:
    """Code as a string or an int parses; a numeric Code defers to ErrorCode or the status."""
    outcome = _interpret(400, {"Code": code_value, "ErrorCode": "Throttling.User"})
    assert outcome.code == "Throttling.User"
    assert outcome.classification is T
    bare = _interpret(400, {"Code": code_value})
    expected = code_value if isinstance(code_value, str) else str(code_value)
    assert bare.code == expected


def test_lowercase_keys_parse() -> None:
    """Lower-case ``code``/``requestId``/``message`` (as the SDK also accepts) are read."""
    outcome = _interpret(
        400, {"code": "InvalidChangeOrder.NotFound", "requestId": "r1", "message": "gone"}
    )
    assert (outcome.code, outcome.request_id, outcome.message) == (
        "InvalidChangeOrder.NotFound",
        "r1",
        "gone",
    )


def test_error_code_success_placeholder_is_ignored() -> None:
    """Docs show ErrorCode "success"; on a failure the real code is taken from Code instead."""
    outcome = _interpret(400, {"Code": "InvalidParameter.NotEmpty", "ErrorCode": "success"})
    assert outcome.code == "InvalidParameter.NotEmpty"
    assert outcome.error_code == "success"


@pytest.mark.parametrize("status", [200, 400, 502, 503])
def test_html_body_is_transport_bad_body(status: int) -> None:
    """An HTML page from a proxy is a transport failure (ambiguous), keeping the HTTP status."""
    response = HttpResponse(
        status=status,
        headers={"content-type": "text/html"},
        body=b"<html><body><h1>502 Bad Gateway</h1></body></html>",
    )
    outcome, answer, error = interpret_response(
        "DescribeChangeOrder", response, started_at=STARTED, duration_s=0.2
    )
    assert isinstance(error, SaeTransportError)
    assert error.kind is TransportKind.BAD_BODY
    assert is_ambiguous(error)
    assert outcome.http_status == status
    assert outcome.code == "Transport"
    assert answer == {}


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"text"', b"null", b"42", b"", b"\xff\xfe{"])
def test_json_that_is_not_an_object_is_transport(raw: bytes) -> None:
    """Valid JSON that is not an object, an empty body or undecodable bytes: transport."""
    response = HttpResponse(status=200, headers={}, body=raw)
    _, _, error = interpret_response(
        "DescribeChangeOrder", response, started_at=STARTED, duration_s=0.0
    )
    assert isinstance(error, SaeTransportError)
    assert error.kind is TransportKind.BAD_BODY


def test_429_with_html_body_is_throttled() -> None:
    """A proxy's 429 page is throttling, not a transport failure."""
    response = HttpResponse(status=429, headers={"x-acs-retry-after": "2000"}, body=b"<html/>")
    _, _, error = interpret_response(
        "DescribeChangeOrder", response, started_at=STARTED, duration_s=0.0
    )
    assert isinstance(error, SaeThrottled)
    assert error.retry_after_s == 2.0


def test_retry_after_header_is_milliseconds() -> None:
    """x-acs-retry-after is read as milliseconds into SaeThrottled.retry_after_s."""
    response = HttpResponse(
        status=400,
        headers={"x-acs-retry-after": "1500"},
        body=json.dumps({"Code": "Throttling.User", "RequestId": "r"}).encode(),
    )
    _, _, error = interpret_response(
        "AbortAndRollbackChangeOrder", response, started_at=STARTED, duration_s=0.0
    )
    assert isinstance(error, SaeThrottled)
    assert error.retry_after_s == 1.5


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("1500", 1.5), (" 200 ", 0.2), ("0", None), ("-5", None), ("1.5", None), ("x", None)],
)
def test_parse_retry_after(value: str, seconds: float | None) -> None:
    """Only positive integer milliseconds count, as in the SDK."""
    assert parse_retry_after(value) == seconds


def test_parse_retry_after_absent() -> None:
    """No header, no wait."""
    assert parse_retry_after(None) is None


@pytest.mark.parametrize(
    ("classification", "retryable"), [(B, True), (T, True), (S, True), (N, False), (P, False)]
)
def test_is_retryable_by_class(classification: Classification, retryable: bool) -> None:
    """Busy, throttled and server errors are retryable; not-running and permanent are not."""
    assert is_retryable(error_for(_outcome(classification))) is retryable


@pytest.mark.parametrize(
    ("kind", "ambiguous"),
    [
        (TransportKind.CONNECT, False),
        (TransportKind.CONNECT_TIMEOUT, False),
        (TransportKind.READ_TIMEOUT, True),
        (TransportKind.TIMEOUT, True),
        (TransportKind.RESET, True),
        (TransportKind.BAD_BODY, True),
        (TransportKind.OTHER, True),
    ],
)
def test_transport_errors_are_retryable_and_ambiguous_unless_never_sent(
    kind: TransportKind, ambiguous: bool
) -> None:
    """Every transport error is retryable; only those that never reached SAE are unambiguous."""
    error = error_for(_outcome(Classification.TRANSPORT, http_status=None), kind)
    assert isinstance(error, SaeTransportError)
    assert is_retryable(error)
    assert is_ambiguous(error) is ambiguous


@pytest.mark.parametrize("classification", [B, T, N, P])
def test_answered_refusals_are_not_ambiguous(classification: Classification) -> None:
    """SAE explicitly refused: the call did not take effect."""
    assert not is_ambiguous(error_for(_outcome(classification)))


def test_server_error_is_ambiguous() -> None:
    """A 5xx may have taken effect before failing: reconcile before calling again."""
    assert is_ambiguous(error_for(_outcome(S, http_status=503)))


def test_foreign_exceptions_are_neither_retryable_nor_ambiguous() -> None:
    """The helpers only vouch for classified SAE errors."""
    assert not is_retryable(RuntimeError("x"))
    assert not is_ambiguous(TimeoutError())


def test_error_for_requires_a_failure_and_a_transport_kind() -> None:
    """error_for refuses a success outcome and a transport outcome without its kind."""
    with pytest.raises(ValueError, match="failed outcome"):
        error_for(_outcome(None))
    with pytest.raises(ValueError, match="TransportKind"):
        error_for(_outcome(Classification.TRANSPORT))


def test_errors_are_in_the_package_tree_and_describe_themselves() -> None:
    """Every class is an orchestrator SaeError; str() names action, status, code and request."""
    for cls in [SaeBusy, SaeThrottled, SaeServerError, SaeTransportError, SaeNotRunning]:
        assert issubclass(cls, SaeError)
        assert issubclass(cls, RollbackError)
    error = error_for(
        _outcome(B, code="Application.ChangerOrderRunning", message="try later", request_id="R9")
    )
    text = str(error)
    assert "AbortAndRollbackChangeOrder" in text
    assert "HTTP 400" in text
    assert "Application.ChangerOrderRunning: try later" in text
    assert "R9" in text
    assert error.code == "Application.ChangerOrderRunning"
    assert error.http_status == 400
    assert error.request_id == "R9"
    transport = error_for(
        _outcome(Classification.TRANSPORT, http_status=None, code="Transport"),
        TransportKind.READ_TIMEOUT,
    )
    assert "no answer" in str(transport)
    assert "read_timeout" in str(transport)
