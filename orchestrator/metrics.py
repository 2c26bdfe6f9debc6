"""Prometheus metrics, defined once, registered on an injected ``CollectorRegistry``.

Names, types and labels are the public contract (contract.md "Metrics"); dashboards and
alert rules in ``deploy/`` depend on them. No job or change-order id is ever a label value:
label sets stay small and bounded. Gauges are set by the worker's side task from
``Store.stats()``, never computed by a blocking collector at scrape time.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX: Final = "sae_rollback_"

# SAE calls take tens of milliseconds to a few seconds (read timeout 10 s by default).
API_CALL_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Time from commit to the first SAE call: milliseconds when idle, minutes under a backlog.
FIRST_CALL_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0)
# A rollback takes seconds to minutes; a busy app can stretch it to the 30 min retry budget.
JOB_DURATION_BUCKETS: Final = (
    1.0,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1200.0,
    1800.0,
    3600.0,
)

INTAKE_OUTCOMES: Final = (
    "accepted",
    "deduplicated",
    "ignored",
    "unauthorized",
    "forbidden",
    "invalid",
    "overloaded",
)
RETRY_REASONS: Final = ("busy", "throttled", "server", "transport", "circuit_open")
FINAL_STATUSES: Final = ("succeeded", "failed", "cancelled", "skipped")
JOB_STATUSES: Final = ("queued", "running", "waiting", "verifying", *FINAL_STATUSES)


class Metrics:
    """Every metric of the service, bound to one registry (tests pass a fresh one)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.intake_requests = Counter(
            f"{PREFIX}intake_requests",
            "Intake requests by source and outcome.",
            ["source", "outcome"],
            registry=r,
        )
        self.jobs_finished = Counter(
            f"{PREFIX}jobs_finished", "Jobs that reached a final status.", ["status"], registry=r
        )
        self.api_calls = Counter(
            f"{PREFIX}api_calls",
            'SAE API calls by action and code ("Success", the SAE error code, or "Transport").',
            ["action", "code"],
            registry=r,
        )
        self.api_budget_per_minute = Gauge(
            f"{PREFIX}api_budget_per_minute",
            "Configured account-wide SAE call budget (calls per minute; 0 = unlimited).",
            registry=r,
        )
        self.api_call_duration = Histogram(
            f"{PREFIX}api_call_duration_seconds",
            "Duration of SAE API calls.",
            ["action"],
            buckets=API_CALL_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            f"{PREFIX}retries",
            "Retries scheduled, by reason (busy, throttled, server, transport, circuit_open).",
            ["reason"],
            registry=r,
        )
        self.jobs = Gauge(f"{PREFIX}jobs", "Jobs in the store by status.", ["status"], registry=r)
        self.circuit_open = Gauge(
            f"{PREFIX}circuit_open",
            "1 while this worker's circuit breaker holds SAE calls back (SAE keeps failing).",
            registry=r,
        )
        self.oldest_queued_age = Gauge(
            f"{PREFIX}oldest_queued_age_seconds",
            "Age of the oldest job waiting to be claimed (0 when none).",
            registry=r,
        )
        self.time_to_first_call = Histogram(
            f"{PREFIX}time_to_first_call_seconds",
            "Time from a job's commit to its first SAE call.",
            buckets=FIRST_CALL_BUCKETS,
            registry=r,
        )
        self.job_duration = Histogram(
            f"{PREFIX}job_duration_seconds",
            "Time from a job's commit to its final status.",
            ["status"],
            buckets=JOB_DURATION_BUCKETS,
            registry=r,
        )
        # Counters are born at 0, not at their first event: `increase()` over a series
        # that appears at 1 misses that first failure, and alerts would stay silent.
        for status in FINAL_STATUSES:
            self.jobs_finished.labels(status)
            self.job_duration.labels(status)
        for reason in RETRY_REASONS:
            self.retries.labels(reason)
        for status in JOB_STATUSES:
            self.jobs.labels(status)
