"""The circuit breaker's state machine, on a fake clock."""

from __future__ import annotations

import pytest

from orchestrator.worker.breaker import BreakerState, CircuitBreaker, CircuitOpen, trips_breaker

from .worker_fakes import busy, server_error, throttled, transport


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fail(breaker: CircuitBreaker, exc: BaseException | None, times: int = 1) -> None:
    for _ in range(times):
        breaker.permit().done(exc)


def test_only_5xx_and_missing_answers_trip() -> None:
    assert trips_breaker(server_error())
    assert trips_breaker(transport())
    assert not trips_breaker(busy())
    assert not trips_breaker(throttled())


def test_opens_after_threshold_failures_in_a_row_and_says_how_long() -> None:
    clock = Clock()
    changes: list[BreakerState] = []
    breaker = CircuitBreaker(threshold=3, open_s=10, clock=clock, on_change=changes.append)
    fail(breaker, server_error(), 2)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker, transport())
    assert breaker.state is BreakerState.OPEN
    assert changes == [BreakerState.OPEN]
    clock.now += 4
    with pytest.raises(CircuitOpen) as info:
        breaker.permit()
    assert info.value.wait_s == pytest.approx(6)
    assert info.value.failures == 3
    assert "Transport" in str(info.value)


def test_any_answer_resets_the_count() -> None:
    """Busy, throttled, success: SAE answered, so the failures are no longer 'in a row'."""
    breaker = CircuitBreaker(threshold=3, open_s=10, clock=Clock())
    for answered in (busy(), throttled(), None):
        fail(breaker, server_error(), 2)
        fail(breaker, answered)
        assert breaker.failures == 0
        assert breaker.state is BreakerState.CLOSED


def test_half_open_lets_one_probe_through_and_closes_on_an_answer() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=2, open_s=10, clock=clock)
    fail(breaker, server_error(), 2)
    clock.now += 10
    probe = breaker.permit()
    assert breaker.state is BreakerState.HALF_OPEN
    with pytest.raises(CircuitOpen) as info:  # only one probe at a time
        breaker.permit()
    assert info.value.wait_s == pytest.approx(5)
    probe.done(busy())
    assert breaker.state is BreakerState.CLOSED
    breaker.permit().done(None)


def test_a_failed_probe_reopens_for_twice_as_long_up_to_the_cap() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, open_s=10, max_open_s=30, clock=clock)
    fail(breaker, server_error())
    waits = []
    for _ in range(4):
        with pytest.raises(CircuitOpen) as info:
            breaker.permit()
        waits.append(round(info.value.wait_s))
        clock.now += info.value.wait_s
        breaker.permit().done(server_error())
    assert waits == [10, 20, 30, 30]
    # One success and the period is back to the start.
    clock.now += 30
    breaker.permit().done(None)
    fail(breaker, server_error())
    with pytest.raises(CircuitOpen) as info:
        breaker.permit()
    assert info.value.wait_s == pytest.approx(10)


def test_an_abandoned_probe_frees_the_probe_slot() -> None:
    """A probe that never ran (drained, cancelled) must not block probing for ever."""
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, open_s=10, clock=clock)
    fail(breaker, server_error())
    clock.now += 10
    breaker.permit().abandon()
    probe = breaker.permit()
    probe.done(None)
    assert breaker.state is BreakerState.CLOSED


def test_threshold_zero_never_opens() -> None:
    breaker = CircuitBreaker(threshold=0, open_s=10, clock=Clock())
    fail(breaker, server_error(), 50)
    assert breaker.state is BreakerState.CLOSED
    breaker.permit()


@pytest.mark.parametrize(
    ("threshold", "open_s", "max_open_s"), [(-1, 10, 10), (1, 0, 10), (1, 10, 5)]
)
def test_bad_settings_are_refused(threshold: int, open_s: float, max_open_s: float) -> None:
    with pytest.raises(ValueError, match="threshold >= 0"):
        CircuitBreaker(threshold=threshold, open_s=open_s, max_open_s=max_open_s)
