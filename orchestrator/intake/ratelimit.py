"""What keeps an alert storm from reaching the store: rate limits, a cap, a recent-keys cache.

Per-source token buckets: each source gets ``rate_per_s`` tokens per second up to
``burst``; a request takes one. When the bucket is empty the caller learns how long until
the next token, and the app answers differently by sender (reliability.md rule 1, row 23):

* ``api`` sources get **429** with ``Retry-After`` — bots and the CLI understand it;
* webhook sources get **503** with ``Retry-After``, because Alertmanager retries only 5xx:
  a 429 would end its attempt and the notification would wait a whole ``group_interval``
  (or, for a resolved alert, might never come).

The limit is checked after authentication, so a flood of unauthenticated requests cannot
spend a real source's tokens and lock its alerts out. The clock is monotonic and
injectable (tests never sleep).

:class:`InFlight` caps how many intake requests are being processed at once across all
sources: beyond it requests are shed with 503 at once instead of queueing without bound in
front of the store (degrade, do not collapse).

:class:`RecentKeys` remembers which job an alert's idempotency key mapped to. In a storm
most deliveries repeat an alert already accepted (re-sends, HA pairs); answering those
from memory spares the store a write transaction and an fsync each. It is safe because
the store's key → job mapping never changes once made (until the job is pruned, weeks
after the cache forgot it), and it is only a shortcut: a miss goes to the store as usual.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from orchestrator.config import SourceSettings

#: Recent alert keys kept, and for how long: a storm's duplicates arrive within minutes.
RECENT_KEYS_MAX: Final = 50_000
RECENT_KEYS_TTL_S: Final = 600.0


@dataclass(slots=True)
class _Bucket:
    rate_per_s: float
    burst: float
    tokens: float
    updated: float


class RateLimiter:
    """One token bucket per configured source (full at start)."""

    def __init__(
        self,
        sources: Mapping[str, SourceSettings],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        now = clock()
        self._buckets = {
            name: _Bucket(src.rate_per_s, float(src.burst), float(src.burst), now)
            for name, src in sources.items()
        }

    def acquire(self, source: str) -> float:
        """Take one token: 0.0 if granted, else the seconds until one will be available."""
        bucket = self._buckets.get(source)
        if bucket is None:
            return 0.0  # unknown sources never get this far (401 first)
        now = self._clock()
        elapsed = max(0.0, now - bucket.updated)
        bucket.tokens = min(bucket.burst, bucket.tokens + elapsed * bucket.rate_per_s)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / bucket.rate_per_s


class InFlight:
    """A non-blocking counter of requests in progress with a hard cap."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"in-flight limit must be >= 1, got {limit}")
        self.limit = limit
        self.current = 0

    def try_enter(self) -> bool:
        """Count one more request in, unless the cap is reached."""
        if self.current >= self.limit:
            return False
        self.current += 1
        return True

    def leave(self) -> None:
        """Count one request out."""
        self.current -= 1


class RecentKeys:
    """A bounded, expiring map ``(source, idempotency key) → job id`` (least recent out)."""

    def __init__(
        self,
        *,
        max_entries: int = RECENT_KEYS_MAX,
        ttl_s: float = RECENT_KEYS_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max = max_entries
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, source: str, key: str) -> str | None:
        """The job id ``key`` mapped to, if remembered and not expired."""
        entry = self._entries.get((source, key))
        if entry is None:
            return None
        job_id, expires = entry
        if expires <= self._clock():
            del self._entries[(source, key)]
            return None
        return job_id

    def put(self, source: str, key: str, job_id: str) -> None:
        """Remember that ``key`` maps to ``job_id`` (refreshing its place and expiry)."""
        self._entries[(source, key)] = (job_id, self._clock() + self._ttl_s)
        self._entries.move_to_end((source, key))
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)
