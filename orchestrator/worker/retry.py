"""The retry policy: which failures are retried, how long to wait, and when to give up.

Retry in one layer, by error class (reliability.md rule 5): the SAE client never retries,
the worker decides here. :func:`is_retryable` is the named predicate; :func:`retry_reason`
gives the metrics label (``busy``, ``throttled``, ``server``, ``transport``).

A job does not sleep in memory between attempts: the wait is written to the store
(``schedule_retry``), the job shows ``waiting`` with its ``next_attempt_at``, and any worker
claims it again when it is due. So the policy is evaluated from *stored* facts: the number
of retries so far and the time elapsed since the job's first SAE call as recorded in its
attempts. A restart therefore neither resets nor loses the retry budget.

The waits and the stop rule are tenacity strategies (injectable, so tests never wait for
real), evaluated on a ``RetryCallState`` rebuilt from those stored facts:

* **throttled, server, transport** — capped exponential backoff with "equal jitter":
  ``d = min(max_interval, initial * 2**(n-1))``, wait uniformly in ``[d/2, d]``
  (``wait_exponential(d/2) + wait_random_exponential(d/2)``). Half the wait is kept so a
  retry never comes back almost at once; the random half spreads jobs that failed together.
  A throttled answer's ``x-acs-retry-after`` is a lower bound.
* **busy** (``Application.ChangerOrderRunning``: another change holds the app) — with a call
  budget, *fixed-rate polling at a share of the budget* instead of exponential backoff.
  The app becomes free at a moment nobody can predict, and every probe costs one call of the
  account-wide budget, so the only lever is the probe rate. For probes every ``T`` seconds
  the time from "app free" to "abort accepted" (the overshoot) is uniform on ``[0, T]``:
  median ``T/2``. No schedule does better for the same number of calls (with ``n`` calls
  over a wait ``W`` the overshoot CDF is at most ``x·n/W``, so the median is at least
  ``W/2n``); exponential backoff does much worse (at a 30 s cap the median is 15 s). One
  waiting job polls at :data:`BUSY_SHARE_ONE` (25 %) of the budget — every 4 s at 60 calls
  per minute, median overshoot 2 s — and all waiting jobs together stay within
  :data:`BUSY_SHARE_ALL` (50 %): with ``k`` jobs waiting each polls every
  ``max(4 s, k · 2 s)``. The interval is measured from the previous probe's start, so the
  claim and call latency do not stretch it. There is no jitter at this rate: jobs of
  different apps start waiting at unrelated moments, and the call budget spaces them anyway.
  Without a budget (``calls_per_minute = 0``) busy answers back off like the others.
* **stop** — ``stop_after_delay(max_elapsed_s)`` on the time since the first attempt; the
  last wait is shortened so the final try happens at the deadline, not after it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

import tenacity
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from orchestrator.sae.errors import (
    SaeBusy,
    SaeServerError,
    SaeThrottled,
    SaeTransportError,
)

__all__ = [
    "BUSY_SHARE_ALL",
    "BUSY_SHARE_ONE",
    "RetryDecision",
    "RetryPolicy",
    "RetryReason",
    "busy_poll_interval",
    "is_retryable",
    "retry_reason",
]

#: Share of the call budget one job may spend probing a busy app.
BUSY_SHARE_ONE: Final = 0.25
#: Share of the call budget all jobs probing busy apps may spend together.
BUSY_SHARE_ALL: Final = 0.5


class RetryReason(StrEnum):
    """Why a call is retried; the values are the ``sae_rollback_retries_total`` labels."""

    BUSY = "busy"
    THROTTLED = "throttled"
    SERVER = "server"
    TRANSPORT = "transport"


def retry_reason(exc: BaseException) -> RetryReason | None:
    """The retry reason for a failed SAE call, or ``None`` when retrying cannot help.

    Busy, throttled, server and transport failures are retried. ``SaeNotRunning`` is not
    (the flow reconciles with the order's state instead) and neither is a permanent error
    (not found, no permission, bad signature, missing credentials).
    """
    if isinstance(exc, SaeBusy):
        return RetryReason.BUSY
    if isinstance(exc, SaeThrottled):
        return RetryReason.THROTTLED
    if isinstance(exc, SaeServerError):
        return RetryReason.SERVER
    if isinstance(exc, SaeTransportError):
        return RetryReason.TRANSPORT
    return None


def is_retryable(exc: BaseException) -> bool:
    """Whether a failed SAE call should be tried again later (by error class, not status)."""
    return retry_reason(exc) is not None


def busy_poll_interval(calls_per_minute: float, waiting_jobs: int) -> float:
    """Seconds between probes of one busy app so busy probes stay within their budget share.

    ``waiting_jobs`` is how many jobs are probing at the same time (at least this one).
    0 when there is no budget (``calls_per_minute <= 0``).
    """
    if calls_per_minute <= 0:
        return 0.0
    per_call_s = 60.0 / calls_per_minute
    jobs = max(1, waiting_jobs)
    return per_call_s * max(1.0 / BUSY_SHARE_ONE, jobs / BUSY_SHARE_ALL)


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """What to do after a failed call: wait ``delay_s`` and try again, or give up."""

    reason: RetryReason
    #: Seconds to wait before the next try; ``None`` means the retry budget is spent.
    delay_s: float | None
    #: Seconds since the job's first attempt when the decision was made.
    elapsed_s: float

    @property
    def give_up(self) -> bool:
        """True when the job must fail instead of retrying."""
        return self.delay_s is None


def _equal_jitter(initial_s: float, max_interval_s: float) -> wait_base:
    half_initial = initial_s / 2.0
    half_max = max_interval_s / 2.0
    return tenacity.wait_exponential(
        multiplier=half_initial, max=half_max
    ) + tenacity.wait_random_exponential(multiplier=half_initial, max=half_max)


class RetryPolicy:
    """Turns a failed call plus the job's stored history into a :class:`RetryDecision`."""

    def __init__(
        self,
        *,
        initial_s: float,
        max_interval_s: float,
        max_elapsed_s: float,
        calls_per_minute: float = 0.0,
        wait: wait_base | None = None,
        stop: stop_base | None = None,
    ) -> None:
        if initial_s <= 0 or max_interval_s < initial_s or max_elapsed_s <= 0:
            raise ValueError(
                "need 0 < initial_s <= max_interval_s and max_elapsed_s > 0, got "
                f"{initial_s}, {max_interval_s}, {max_elapsed_s}"
            )
        self.initial_s = initial_s
        self.max_interval_s = max_interval_s
        self.max_elapsed_s = max_elapsed_s
        self.calls_per_minute = max(0.0, calls_per_minute)
        # The Retrying object only carries the strategies: the job's attempts are separated
        # by store round trips, so tenacity's own loop (and its sleep) is never used here.
        self._retrying = tenacity.AsyncRetrying(
            wait=wait if wait is not None else _equal_jitter(initial_s, max_interval_s),
            stop=stop if stop is not None else tenacity.stop_after_delay(max_elapsed_s),
            reraise=True,
        )

    def __repr__(self) -> str:
        return (
            f"RetryPolicy(initial_s={self.initial_s}, max_interval_s={self.max_interval_s}, "
            f"max_elapsed_s={self.max_elapsed_s}, calls_per_minute={self.calls_per_minute})"
        )

    def _state(self, retry_number: int, elapsed_s: float) -> tenacity.RetryCallState:
        """A tenacity call state as if ``retry_number`` tries failed over ``elapsed_s``."""
        state = tenacity.RetryCallState(self._retrying, fn=None, args=(), kwargs={})
        state.attempt_number = max(1, retry_number)
        # Only the difference matters (seconds_since_start); anchor it on the monotonic now.
        now = time.monotonic()
        state.start_time = now - max(0.0, elapsed_s)
        state.outcome_timestamp = now
        return state

    def decide(
        self,
        exc: BaseException,
        *,
        retry_number: int,
        elapsed_s: float,
        since_call_start_s: float = 0.0,
        waiting_jobs: int = 1,
    ) -> RetryDecision:
        """Decide about a retryable failure (``ValueError`` for a non-retryable one).

        ``retry_number`` counts this failure (1 for the first); ``elapsed_s`` is the time
        since the job's first attempt as stored; ``since_call_start_s`` the time since the
        failed call started (busy probes are spaced from probe start to probe start);
        ``waiting_jobs`` how many jobs are waiting for a retry (shares the busy budget).
        """
        reason = retry_reason(exc)
        if reason is None:
            raise ValueError(f"not a retryable failure: {exc!r}")
        state = self._state(retry_number, elapsed_s)
        if self._retrying.stop(state):
            return RetryDecision(reason, None, elapsed_s)
        if reason is RetryReason.BUSY and self.calls_per_minute > 0:
            interval = max(self.initial_s, busy_poll_interval(self.calls_per_minute, waiting_jobs))
            delay = interval - max(0.0, since_call_start_s)
        else:
            delay = float(self._retrying.wait(state))
        if isinstance(exc, SaeThrottled) and exc.retry_after_s is not None:
            delay = max(delay, exc.retry_after_s)
        remaining = self.max_elapsed_s - elapsed_s
        delay = min(max(0.0, delay), max(0.0, remaining))
        if not math.isfinite(delay):
            delay = self.max_interval_s
        return RetryDecision(reason, delay, elapsed_s)
