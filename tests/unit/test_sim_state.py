"""The simulator's pure parts: state machine, call budget, fault parsing, nonces and verifier.

Time is an injected number here: nothing sleeps.
"""

from __future__ import annotations

import hashlib

import pytest
from multidict import CIMultiDict

from orchestrator.sae import signer
from orchestrator.simulator.auth import NonceCache, Verifier
from orchestrator.simulator.faults import FaultBook, parse_fault
from orchestrator.simulator.state import (
    ABORTABLE_STATUSES,
    TERMINAL_STATUSES,
    ApiError,
    CallBudget,
    ControlError,
    CoStatus,
    SimState,
)

AK = "LTAI5tTESTONLYAKID00000"
SECRET = "TestOnlySecretDoNotUse0000000000"


class Clock:
    """A settable clock."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    """A settable clock at a fixed epoch."""
    return Clock()


@pytest.fixture
def state(clock: Clock) -> SimState:
    """A seeded state on the settable clock."""
    return SimState(clock=clock, seed=7)


def _code(exc_info: pytest.ExceptionInfo[ApiError]) -> tuple[int, str]:
    """(HTTP status, code) of a raised ApiError."""
    return exc_info.value.http_status, exc_info.value.code


# --- state machine ----------------------------------------------------------------------


def test_accepted_abort_runs_for_rollback_s_then_terminates(state: SimState, clock: Clock) -> None:
    """An accepted abort keeps status 1 for rollback_s seconds, then the order is 6."""
    order = state.create_change_order("app", change_order_id="co-1", rollback_s=5)
    assert state.abort_and_rollback("co-1") is order
    assert order.status_at(clock.now) == CoStatus.RUNNING
    clock.advance(4.999)
    assert order.status_at(clock.now) == CoStatus.RUNNING
    assert order.finished_at(clock.now) is None
    clock.advance(0.001)
    assert order.status_at(clock.now) == CoStatus.ABORT
    assert order.finished_at(clock.now) == pytest.approx(clock.now)


def test_second_abort_answers_not_running_during_and_after_rollback(
    state: SimState, clock: Clock
) -> None:
    """Aborting an order again, while its rollback runs or after, answers Not.Running."""
    state.create_change_order("app", change_order_id="co-1", rollback_s=2)
    state.abort_and_rollback("co-1")
    with pytest.raises(ApiError) as during:
        state.abort_and_rollback("co-1")
    assert _code(during) == (400, "Application.ChangerOrder.Not.Running")
    clock.advance(10)
    with pytest.raises(ApiError) as after:
        state.abort_and_rollback("co-1")
    assert _code(after) == (400, "Application.ChangerOrder.Not.Running")


@pytest.mark.parametrize("status", [2, 3, 6, 10])
def test_abort_of_terminal_order_answers_not_running(state: SimState, status: int) -> None:
    """An order created terminal (2, 3, 6, 10) cannot be aborted."""
    state.create_change_order("app", change_order_id="co-t", status=status)
    with pytest.raises(ApiError) as exc_info:
        state.abort_and_rollback("co-t")
    assert _code(exc_info) == (400, "Application.ChangerOrder.Not.Running")


@pytest.mark.parametrize("status", [0, 1, 8, 9, 11, 12])
def test_abort_of_every_non_terminal_status_is_accepted(
    state: SimState, clock: Clock, status: int
) -> None:
    """Preparing, running, paused and approval states are all abortable."""
    order = state.create_change_order("app", change_order_id="co-a", status=status, rollback_s=1)
    state.abort_and_rollback("co-a")
    clock.advance(1)
    assert order.status_at(clock.now) == CoStatus.ABORT
    assert status in ABORTABLE_STATUSES
    assert status not in TERMINAL_STATUSES


def test_busy_app_answers_changer_order_running_until_the_window_ends(
    state: SimState, clock: Clock
) -> None:
    """While another change holds the app, aborts answer ChangerOrderRunning; then succeed."""
    order = state.create_change_order("app", change_order_id="co-1")
    state.set_busy("app", 30)
    with pytest.raises(ApiError) as exc_info:
        state.abort_and_rollback("co-1")
    assert _code(exc_info) == (400, "Application.ChangerOrderRunning")
    assert order.aborted_at is None
    clock.advance(29.9)
    with pytest.raises(ApiError):
        state.abort_and_rollback("co-1")
    clock.advance(0.1)
    state.abort_and_rollback("co-1")
    assert order.aborted_at == clock.now


def test_busy_zero_seconds_clears_the_window(state: SimState) -> None:
    """Setting busy for 0 s frees the app at once."""
    state.create_change_order("app", change_order_id="co-1")
    state.set_busy("app", 60)
    state.set_busy("app", 0)
    state.abort_and_rollback("co-1")


def test_terminal_order_of_busy_app_answers_not_running(state: SimState) -> None:
    """The order's own state is checked before the app's busy window."""
    state.create_change_order("app", change_order_id="done", status=2)
    state.set_busy("app", 60)
    with pytest.raises(ApiError) as exc_info:
        state.abort_and_rollback("done")
    assert exc_info.value.code == "Application.ChangerOrder.Not.Running"


def test_one_running_change_order_per_app(state: SimState, clock: Clock) -> None:
    """A second live order for an app is refused until the first is terminal."""
    state.create_change_order("app", change_order_id="co-1", rollback_s=3)
    with pytest.raises(ControlError) as exc_info:
        state.create_change_order("app", change_order_id="co-2")
    assert exc_info.value.code == "Application.ChangerOrderRunning"
    assert exc_info.value.http_status == 409
    # Terminal history may be added at any time; another app is independent.
    state.create_change_order("app", change_order_id="old", status=2)
    state.create_change_order("other", change_order_id="co-x")
    state.abort_and_rollback("co-1")
    with pytest.raises(ControlError):
        state.create_change_order("app", change_order_id="co-2")  # rollback still running
    clock.advance(3)
    state.create_change_order("app", change_order_id="co-2")


def test_order_without_rollback_support_is_refused_and_keeps_running(
    state: SimState, clock: Clock
) -> None:
    """support_rollback=False answers InvalidParameter.WithMessage; the order is untouched."""
    order = state.create_change_order("app", change_order_id="co-1", support_rollback=False)
    with pytest.raises(ApiError) as exc_info:
        state.abort_and_rollback("co-1")
    assert _code(exc_info) == (400, "InvalidParameter.WithMessage")
    assert "does not support rollback" in exc_info.value.message
    clock.advance(100)
    assert order.status_at(clock.now) == CoStatus.RUNNING


def test_missing_and_unknown_ids_get_sae_errors(state: SimState) -> None:
    """Missing ids are NotEmpty, unknown orders NotFound (400), unknown apps NotFound (404)."""
    with pytest.raises(ApiError) as missing:
        state.abort_and_rollback(None)
    assert _code(missing) == (400, "InvalidParameter.NotEmpty")
    assert missing.value.message == "You must specify the parameter ChangeOrderId."
    with pytest.raises(ApiError) as unknown:
        state.abort_and_rollback("nope")
    assert _code(unknown) == (400, "InvalidChangeOrder.NotFound")
    with pytest.raises(ApiError) as no_app:
        state.app("nope")
    assert _code(no_app) == (404, "InvalidAppId.NotFound")
    with pytest.raises(ApiError) as empty_app:
        state.app("")
    assert _code(empty_app) == (400, "InvalidParameter.NotEmpty")


def test_control_rejects_bad_orders(state: SimState) -> None:
    """Unknown status codes, negative rollback time and duplicate ids are control errors."""
    with pytest.raises(ControlError):
        state.create_change_order("app", status=5)
    with pytest.raises(ControlError):
        state.create_change_order("app", rollback_s=-1)
    state.create_change_order("app", change_order_id="co-1", status=2)
    with pytest.raises(ControlError) as duplicate:
        state.create_change_order("app", change_order_id="co-1", status=2)
    assert duplicate.value.http_status == 409
    with pytest.raises(ControlError):
        state.set_busy("app", -1)
    with pytest.raises(ControlError):
        state.set_busy("app", float("inf"))
    with pytest.raises(ControlError):
        state.create_change_order("app", rollback_s=float("nan"))


def test_last_order_is_the_live_one_else_the_newest(state: SimState, clock: Clock) -> None:
    """DescribeApplicationStatus's order: the live one while it runs, else the newest."""
    state.create_change_order("app", change_order_id="live", rollback_s=1)
    state.create_change_order("app", change_order_id="history", status=2)
    app = state.apps["app"]
    last = app.last_order(clock.now)
    assert last is not None
    assert last.change_order_id == "live"
    state.abort_and_rollback("live")
    clock.advance(1)
    last = app.last_order(clock.now)
    assert last is not None
    assert last.change_order_id == "history"


def test_list_filters_by_lazy_status_and_pages(state: SimState, clock: Clock) -> None:
    """CoStatus filters on the current status; pages are newest first unless reversed."""
    for index in range(5):
        state.create_change_order("app", change_order_id=f"done-{index}", status=2)
    state.create_change_order("app", change_order_id="live", rollback_s=1, co_type="CoScaleOut")
    page, total = state.list_change_orders("app", page=1, page_size=4)
    assert total == 6
    assert [o.change_order_id for o in page] == ["live", "done-4", "done-3", "done-2"]
    page, total = state.list_change_orders("app", page=2, page_size=4)
    assert [o.change_order_id for o in page] == ["done-1", "done-0"]
    page, _ = state.list_change_orders("app", page=1, page_size=2, reverse=True)
    assert [o.change_order_id for o in page] == ["done-0", "done-1"]
    running, total = state.list_change_orders("app", co_status=1)
    assert [o.change_order_id for o in running] == ["live"]
    assert state.list_change_orders("app", co_type="CoScaleOut")[1] == 1
    assert state.list_change_orders("app", key="done-3")[1] == 1
    state.abort_and_rollback("live")
    clock.advance(1)
    assert state.list_change_orders("app", co_status=1) == ([], 0)
    aborted, _ = state.list_change_orders("app", co_status=6)
    assert [o.change_order_id for o in aborted] == ["live"]
    assert state.list_change_orders("app", page=9) == ([], 6)


def test_ids_are_deterministic_for_a_seed(clock: Clock) -> None:
    """The same seed gives the same request, trace and change-order ids; another seed not."""

    def ids(seed: int) -> list[str]:
        state = SimState(clock=clock, seed=seed)
        order = state.create_change_order("app")
        return [state.new_request_id(), state.new_trace_id(), order.change_order_id]

    assert ids(1) == ids(1)
    assert ids(1) != ids(2)
    request_id, trace_id, order_id = ids(1)
    assert request_id == request_id.upper()
    assert [len(part) for part in request_id.split("-")] == [8, 4, 4, 4, 12]
    assert len(trace_id) == 30
    assert int(trace_id, 16) >= 0
    assert [len(part) for part in order_id.split("-")] == [8, 4, 4, 4, 12]


def test_call_log_is_bounded(clock: Clock) -> None:
    """The call log keeps the newest max_calls records and counts all of them."""
    from orchestrator.simulator.state import CallRecord

    state = SimState(clock=clock, max_calls=3)
    for index in range(5):
        state.record(CallRecord("A", "/", str(index), None, None, 200, "200", "r", None, clock.now))
    assert [c.change_order_id for c in state.calls] == ["2", "3", "4"]
    assert state.calls_total == 5


# --- call budget --------------------------------------------------------------------------


def test_budget_allows_n_calls_in_any_sliding_minute() -> None:
    """N calls pass, the next is refused, and room returns exactly 60 s after the oldest."""
    budget = CallBudget(3)
    assert [budget.try_acquire(t) for t in (0.0, 10.0, 20.0)] == [True, True, True]
    assert budget.try_acquire(59.9) is False
    assert budget.try_acquire(60.0) is True  # the call at 0.0 left the window
    assert budget.try_acquire(65.0) is False
    assert budget.try_acquire(70.0) is True
    # Refused calls do not use the budget: the window holds 20, 60, 70.
    assert budget.try_acquire(79.0) is False
    assert budget.try_acquire(80.0) is True


def test_state_budget_is_off_by_default(clock: Clock) -> None:
    """Without calls_per_minute there is no throttling at all."""
    assert SimState(clock=clock).budget is None
    budget = SimState(clock=clock, calls_per_minute=2).budget
    assert budget is not None
    assert budget.per_minute == 2
    with pytest.raises(ValueError, match="at least 1"):
        CallBudget(0)


# --- faults -------------------------------------------------------------------------------

ACTIONS = frozenset({"AbortAndRollbackChangeOrder", "DescribeChangeOrder"})


def test_fault_defaults_and_validation() -> None:
    """A bare fault is one 503; statuses pick default codes; bad input is a ControlError."""
    bare = parse_fault({}, ACTIONS)
    assert (bare.mode, bare.http_status, bare.code, bare.remaining) == (
        "error",
        503,
        "ServiceUnavailable",
        1,
    )
    assert parse_fault({"http_status": 500}, ACTIONS).code == "InternalError"
    throttled = parse_fault({"code": "Throttling.User"}, ACTIONS)
    assert throttled.http_status == 400
    latency = parse_fault({"latency_ms": 250}, ACTIONS)
    assert latency.mode is None
    assert latency.latency_s == pytest.approx(0.25)
    assert parse_fault({"mode": "garbage"}, ACTIONS).http_status == 502
    for bad in (
        [],
        {"mode": "explode"},
        {"count": 0},
        {"count": True},
        {"action": "Nope"},
        {"http_status": 404},
        {"latency_ms": -1},
        {"apply": "yes"},
        {"latency_ms": 5, "apply": True},
        {"colour": "red"},
    ):
        with pytest.raises(ControlError):
            parse_fault(bad, ACTIONS)


def test_fault_book_consumes_matching_faults_in_order() -> None:
    """Faults hit only matching calls, count down, and are consumed oldest first."""
    book = FaultBook()
    assert book.take("DescribeChangeOrder", None) is None
    book.add(parse_fault({"action": "AbortAndRollbackChangeOrder", "count": 2}, ACTIONS))
    book.add(parse_fault({"mode": "reset", "change_order_id": "co-9"}, ACTIONS))
    assert book.take("DescribeChangeOrder", "co-1") is None
    first = book.take("AbortAndRollbackChangeOrder", "co-1")
    assert first is not None
    assert first.mode == "error"
    assert first.remaining == 1
    assert book.take("AbortAndRollbackChangeOrder", "co-1") is first
    assert book.take("AbortAndRollbackChangeOrder", "co-1") is None
    reset = book.take("DescribeChangeOrder", "co-9")
    assert reset is not None
    assert reset.mode == "reset"
    assert book.as_json() == []


# --- nonces and signatures ---------------------------------------------------------------


def test_nonce_cache_detects_replays_within_the_window() -> None:
    """A nonce is refused again until ttl_s has passed."""
    cache = NonceCache(ttl_s=900)
    assert cache.check_and_add("n1", 0.0) is True
    assert cache.check_and_add("n1", 899.0) is False
    assert cache.check_and_add("n1", 900.0) is True
    assert cache.check_and_add("n2", 901.0) is True
    assert len(cache) == 2
    assert cache.check_and_add("n1", 1799.0) is False  # re-added at 900 above
    assert cache.check_and_add("n2", 5000.0) is True
    assert len(cache) == 1  # everything older expired


def test_nonce_cache_is_bounded() -> None:
    """Past capacity the oldest nonce is forgotten, so memory stays bounded."""
    cache = NonceCache(ttl_s=900, capacity=3)
    for index in range(4):
        assert cache.check_and_add(f"n{index}", float(index))
    assert len(cache) == 3
    assert cache.check_and_add("n0", 10.0) is True  # forgotten early
    assert cache.check_and_add("n3", 10.0) is False


# sae-api.md §4.6 vector V3: STS plus an id needing percent-encoding, as the sync SDK sends it.
_V3_HEADERS = {
    "host": "sae.cn-hangzhou.aliyuncs.com",
    "x-acs-version": "2019-05-06",
    "x-acs-action": "AbortAndRollbackChangeOrder",
    "user-agent": "AlibabaCloud (Linux; x86_64) Python/3.11.7 Core/0.4.3 TeaDSL/2",
    "x-acs-date": "2024-05-01T08:00:00Z",
    "x-acs-signature-nonce": "3f2b8c9d0e1a4b5c6d7e8f9012345678",
    "accept": "application/json",
    "x-acs-content-sha256": signer.EMPTY_BODY_SHA256,
    "x-acs-credentials-provider": "static_sts",
    "x-acs-accesskey-id": AK,
    "x-acs-security-token": "TestOnlyStsToken+/=",
    "Authorization": (
        "ACS3-HMAC-SHA256 Credential=LTAI5tTESTONLYAKID00000,SignedHeaders=accept;host;"
        "user-agent;x-acs-accesskey-id;x-acs-action;x-acs-content-sha256;"
        "x-acs-credentials-provider;x-acs-date;x-acs-security-token;x-acs-signature-nonce;"
        "x-acs-version,Signature=f3e02f09e3414ab06cbb3fdd4513321e3c728b03105a0155929dccbd9da6d3ca"
    ),
}
_V3_NOW = 1714550400.0  # 2024-05-01T08:00:00Z
_PATH = "/pop/v1/sam/changeorder/AbortAndRollbackChangeOrder"


def _verify(verifier: Verifier, headers: dict[str, str], now: float = _V3_NOW) -> str:
    """Verify the V3 request with ``headers`` (its query decoded, as the server sees it)."""
    return verifier.verify(
        "PUT", _PATH, {"ChangeOrderId": "abc 123/é+~*"}, CIMultiDict(headers), b"", now
    )


def _rejected(verifier: Verifier, headers: dict[str, str], now: float = _V3_NOW) -> str:
    """The code the verifier rejects the V3 request with."""
    with pytest.raises(ApiError) as exc_info:
        _verify(verifier, headers, now)
    return exc_info.value.code


def test_verifier_accepts_the_published_v3_vector_once() -> None:
    """sae-api.md's V3 vector verifies; replaying its nonce is SignatureNonceUsed."""
    verifier = Verifier({AK: SECRET}, security_tokens={AK: "TestOnlyStsToken+/="})
    assert _verify(verifier, _V3_HEADERS) == AK
    assert _rejected(verifier, _V3_HEADERS) == "SignatureNonceUsed"


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"Authorization": ""}, "IncompleteSignature"),
        (
            {"Authorization": "acs LTAI5tTESTONLYAKID00000:a5cuJnWw3z3HcOuhPRKq4IfwXps="},
            "IncompleteSignature",
        ),
        ({"x-acs-security-token": "OtherToken"}, "InvalidSecurityToken.Malformed"),
        ({"x-acs-accesskey-id": "LTAIother"}, "IncompleteSignature"),
        ({"user-agent": "tampered"}, "SignatureDoesNotMatch"),
        ({"x-acs-content-sha256": hashlib.sha256(b"x").hexdigest()}, "SignatureDoesNotMatch"),
    ],
)
def test_verifier_rejects_tampered_requests(change: dict[str, str], code: str) -> None:
    """Each tampering of the V3 request is answered with the gateway's code."""
    verifier = Verifier({AK: SECRET}, security_tokens={AK: "TestOnlyStsToken+/="})
    assert _rejected(verifier, {**_V3_HEADERS, **change}) == code


def test_verifier_checks_key_secret_and_clock() -> None:
    """Unknown key is NotFound, another secret mismatches, a 16-minute skew is Expired."""
    assert _rejected(Verifier({"LTAIother": SECRET}), _V3_HEADERS) == "InvalidAccessKeyId.NotFound"
    assert _rejected(Verifier({AK: SECRET + "x"}), _V3_HEADERS) == "SignatureDoesNotMatch"
    assert _rejected(Verifier({AK: SECRET}), _V3_HEADERS, _V3_NOW + 901) == (
        "InvalidTimeStamp.Expired"
    )
    assert _verify(Verifier({AK: SECRET}), _V3_HEADERS, _V3_NOW - 899) == AK


def test_verifier_requires_the_mandatory_headers_signed() -> None:
    """A request that leaves x-acs-signature-nonce out of SignedHeaders is incomplete."""
    headers = {k: v for k, v in _V3_HEADERS.items() if k != "Authorization"}
    del headers["x-acs-signature-nonce"]
    headers["Authorization"] = signer.sign_request(
        "PUT", _PATH, {"ChangeOrderId": "abc 123/é+~*"}, headers, b"", AK, SECRET
    )
    headers["x-acs-signature-nonce"] = "unsigned"
    assert _rejected(Verifier({AK: SECRET}), headers) == "IncompleteSignature"


def test_verifier_repr_hides_secrets() -> None:
    """The verifier's repr names key ids only."""
    text = repr(Verifier({AK: SECRET}, security_tokens={AK: "TokenCanary"}))
    assert AK in text
    assert SECRET not in text
    assert "TokenCanary" not in text
