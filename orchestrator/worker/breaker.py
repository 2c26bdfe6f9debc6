"""A circuit breaker in front of SAE: stop calling a service that keeps failing.

Retries stay per job and per error class (``retry.py``); this is the one account-level
decision above them. When SAE — or the way to it — fails ``threshold`` calls in a row with
5xx, transport errors or an unreachable credential source, the breaker *opens*: for
``open_s`` no job calls SAE at all. Jobs that want to call meanwhile are put back as
``waiting`` (``circuit_open``) without spending a budget token or an attempt, so an outage
costs neither a stream of doomed calls nor 30 minutes of each job's retry budget burnt in
parallel. After ``open_s`` one call goes through as a *probe* (half-open): if SAE answers,
the breaker closes and everyone resumes; if not, it opens again for twice as long (up to
``max_open_s``).

Any answer from SAE — success, busy, throttled, not running, a permanent error — proves it
is up and closes the breaker; throttling and busy are handled by the budget and the retry
policy, not here. The breaker is per worker process: each process learns about an outage
from its own calls (``threshold`` of them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum
from typing import Final

from orchestrator.logging import get_logger
from orchestrator.sae.errors import SaeCallError, SaeServerError, SaeTransportError

__all__ = ["BreakerState", "CircuitBreaker", "CircuitOpen", "Permit", "trips_breaker"]

log = get_logger("orchestrator.worker.breaker")

#: While the probe is out, how long the others wait before asking again, as a share of the
#: current open period (they need not come back before the probe can have answered).
_HALF_OPEN_WAIT_SHARE: Final = 0.5


class BreakerState(StrEnum):
    """Closed: calls flow. Open: no calls. Half-open: one probe call is allowed."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitOpen(Exception):
    """No SAE call now: the breaker is open (or its probe is out). Try after ``wait_s``."""

    def __init__(self, wait_s: float, failures: int, last_error: str) -> None:
        super().__init__(
            f"SAE calls are paused after {failures} failures in a row (last: {last_error}); "
            f"next try in {wait_s:.0f} s"
        )
        self.wait_s = wait_s
        self.failures = failures
        self.last_error = last_error


def trips_breaker(exc: BaseException) -> bool:
    """Whether a failed call counts against SAE's health: 5xx and no answer at all."""
    return isinstance(exc, (SaeServerError, SaeTransportError))


class Permit:
    """Leave to make one call; report its result with :meth:`done` (or it is abandoned)."""

    __slots__ = ("_breaker", "_probe", "reported")

    def __init__(self, breaker: CircuitBreaker, *, probe: bool) -> None:
        self._breaker = breaker
        self._probe = probe
        self.reported = False

    def done(self, exc: BaseException | None) -> None:
        """The call ended: ``exc`` is its failure, ``None`` on success."""
        if self.reported:
            return
        self.reported = True
        self._breaker._record(exc, probe=self._probe)

    def abandon(self) -> None:
        """The call never happened or never ended (drain, cancel): free a probe slot."""
        if not self.reported:
            self.reported = True
            if self._probe:
                self._breaker._probe_out = False


class CircuitBreaker:
    """Counts consecutive failing SAE calls of this process; see the module docstring.

    ``threshold = 0`` disables it (every permit is granted).
    """

    def __init__(
        self,
        *,
        threshold: int = 5,
        open_s: float = 10.0,
        max_open_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        if threshold < 0 or open_s <= 0 or max_open_s < open_s:
            raise ValueError(
                f"need threshold >= 0 and 0 < open_s <= max_open_s, got "
                f"{threshold}, {open_s}, {max_open_s}"
            )
        self.threshold = threshold
        self.base_open_s = open_s
        self.max_open_s = max_open_s
        self._clock = clock
        self._on_change = on_change
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.last_error = ""
        self._open_s = open_s
        self._open_until = 0.0
        self._probe_out = False

    def permit(self) -> Permit:
        """Leave for one call now, or :class:`CircuitOpen` saying how long to wait."""
        if self.threshold == 0 or self.state is BreakerState.CLOSED:
            return Permit(self, probe=False)
        now = self._clock()
        if self.state is BreakerState.OPEN:
            if now < self._open_until:
                raise CircuitOpen(self._open_until - now, self.failures, self.last_error)
            self._set(BreakerState.HALF_OPEN)
        if self._probe_out:
            raise CircuitOpen(self._open_s * _HALF_OPEN_WAIT_SHARE, self.failures, self.last_error)
        self._probe_out = True
        log.info("circuit_probe", failures=self.failures)
        return Permit(self, probe=True)

    def _record(self, exc: BaseException | None, *, probe: bool) -> None:
        if probe:
            self._probe_out = False
        if self.threshold == 0:
            return
        if exc is None or not trips_breaker(exc):
            # SAE answered: it is up.
            if self.state is not BreakerState.CLOSED:
                log.info("circuit_closed", after_failures=self.failures)
                self._set(BreakerState.CLOSED)
            self.failures = 0
            self._open_s = self.base_open_s
            return
        self.failures += 1
        self.last_error = _describe(exc)
        if probe and self.state is BreakerState.HALF_OPEN:
            self._open_s = min(self.max_open_s, self._open_s * 2)
            self._open(reason="probe_failed")
        elif self.state is BreakerState.CLOSED and self.failures >= self.threshold:
            self._open(reason="threshold")

    def _open(self, *, reason: str) -> None:
        self._open_until = self._clock() + self._open_s
        self._set(BreakerState.OPEN)
        log.warning(
            "circuit_opened",
            reason=reason,
            failures=self.failures,
            open_s=self._open_s,
            last_error=self.last_error,
        )

    def _set(self, state: BreakerState) -> None:
        if state is not self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(state)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SaeCallError):
        return f"{exc.code}" + (f" (HTTP {exc.http_status})" if exc.http_status else "")
    return type(exc).__name__
