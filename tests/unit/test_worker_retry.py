"""The retry policy: what is retried, how long each wait is, and when the job gives up."""

from __future__ import annotations

import pytest
import tenacity
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.sae import TransportKind
from orchestrator.worker.retry import (
    BUSY_SHARE_ONE,
    RetryPolicy,
    RetryReason,
    busy_poll_interval,
    is_retryable,
    retry_reason,
)

from .worker_fakes import (
    busy,
    not_running,
    permanent,
    server_error,
    throttled,
    transport,
)


def policy(**overrides: float) -> RetryPolicy:
    """Defaults of the shipped config: 1 s, 30 s cap, 1800 s budget, 60 calls/min."""
    values: dict[str, float] = {
        "initial_s": 1.0,
        "max_interval_s": 30.0,
        "max_elapsed_s": 1800.0,
        "calls_per_minute": 60.0,
    }
    values.update(overrides)
    return RetryPolicy(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (busy, RetryReason.BUSY),
        (throttled, RetryReason.THROTTLED),
        (server_error, RetryReason.SERVER),
        (transport, RetryReason.TRANSPORT),
    ],
)
def test_retryable_classes_have_their_reason(make: object, reason: RetryReason) -> None:
    """Busy, throttled, server and transport failures are retried under their own label."""
    exc = make()  # type: ignore[operator]
    assert is_retryable(exc)
    assert retry_reason(exc) is reason


@pytest.mark.parametrize(
    "exc",
    [
        permanent(),
        permanent(code="InvalidChangeOrder.NotFound"),
        not_running(),
        ValueError("a bug"),
    ],
)
def test_non_retryable_failures(exc: BaseException) -> None:
    """Permanent errors, Not.Running (reconciled instead) and foreign errors are not retried."""
    assert not is_retryable(exc)
    assert retry_reason(exc) is None


def test_decide_rejects_non_retryable() -> None:
    """Asking for a retry of a permanent error is a caller bug."""
    with pytest.raises(ValueError, match="not a retryable failure"):
        policy().decide(permanent(), retry_number=1, elapsed_s=0)


@given(n=st.integers(min_value=1, max_value=40))
def test_backoff_is_equal_jitter_within_the_cap(n: int) -> None:
    """The n-th wait lies in [d/2, d] with d = min(cap, initial * 2**(n-1))."""
    p = policy(calls_per_minute=0)
    d = min(30.0, 1.0 * 2 ** (n - 1))
    delay = p.decide(server_error(), retry_number=n, elapsed_s=1.0).delay_s
    assert delay is not None
    assert d / 2 - 1e-9 <= delay <= d + 1e-9


def test_backoff_is_random() -> None:
    """Jobs that failed together do not come back together."""
    p = policy(calls_per_minute=0)
    delays = {p.decide(transport(), retry_number=6, elapsed_s=5).delay_s for _ in range(20)}
    assert len(delays) > 10


def test_gives_up_when_budget_spent() -> None:
    """A failure at or past max_elapsed_s since the first attempt ends the retries."""
    p = policy(max_elapsed_s=100)
    decision = p.decide(busy(), retry_number=30, elapsed_s=100.0)
    assert decision.give_up
    assert decision.delay_s is None
    assert decision.reason is RetryReason.BUSY


def test_last_wait_is_cut_at_the_deadline() -> None:
    """The final try happens at the deadline, not after it."""
    p = policy(calls_per_minute=0, max_elapsed_s=100)
    decision = p.decide(server_error(), retry_number=20, elapsed_s=98.5)
    assert decision.delay_s == pytest.approx(1.5)


def test_throttled_honours_retry_after() -> None:
    """x-acs-retry-after is a lower bound for the wait."""
    p = policy(calls_per_minute=0)
    decision = p.decide(throttled(retry_after_s=12.0), retry_number=1, elapsed_s=0)
    assert decision.delay_s == pytest.approx(12.0)


def test_busy_polls_at_a_quarter_of_the_budget() -> None:
    """One busy job at 60 calls/min probes every 4 s, measured from the last probe's start."""
    p = policy()
    assert busy_poll_interval(60, 1) == pytest.approx(60 / 60 / BUSY_SHARE_ONE) == 4.0
    for n in (1, 2, 10, 50):
        decision = p.decide(busy(), retry_number=n, elapsed_s=n * 4.0, since_call_start_s=0.03)
        assert decision.delay_s == pytest.approx(3.97)


def test_busy_probes_share_half_the_budget() -> None:
    """Ten jobs probing at once each wait 20 s at 60 calls/min: 30 calls/min together."""
    p = policy()
    decision = p.decide(busy(), retry_number=3, elapsed_s=10, waiting_jobs=10)
    assert decision.delay_s == pytest.approx(20.0)
    assert 10 * 60 / decision.delay_s == pytest.approx(30.0)


def test_busy_interval_never_below_initial() -> None:
    """A large budget does not turn busy probing into a tight loop."""
    p = policy(calls_per_minute=6000)
    assert p.decide(busy(), retry_number=1, elapsed_s=0).delay_s == pytest.approx(1.0)


def test_busy_without_budget_backs_off_exponentially() -> None:
    """With calls_per_minute = 0 a busy app is retried with the normal backoff."""
    p = policy(calls_per_minute=0)
    delay = p.decide(busy(), retry_number=10, elapsed_s=60).delay_s
    assert delay is not None
    assert 15.0 <= delay <= 30.0


def test_wait_strategy_is_injectable() -> None:
    """Tests (and tuning) can swap the tenacity wait: here a fixed zero wait."""
    p = RetryPolicy(initial_s=1, max_interval_s=30, max_elapsed_s=60, wait=tenacity.wait_fixed(0))
    assert p.decide(transport(kind=TransportKind.RESET), retry_number=5, elapsed_s=3).delay_s == 0


def test_invalid_settings_are_rejected() -> None:
    """initial must be positive and not above the cap."""
    with pytest.raises(ValueError, match="initial_s"):
        RetryPolicy(initial_s=5, max_interval_s=1, max_elapsed_s=10)
