"""The rollback worker: claims jobs from the store and drives SAE until each one is settled.

Modules: ``runner`` (``Worker``: claim loop, bounded concurrency, lease renewal, supervised
side tasks, drain), ``rollback`` (one job's flow: resolve, pre-check, abort, reconcile,
verify), ``retry`` (which failures are retried and when; the busy-polling policy),
``budget`` (the account-wide SAE call budget with priorities).
"""

from orchestrator.worker.budget import CallBudget, Priority, make_budget
from orchestrator.worker.retry import RetryDecision, RetryPolicy, RetryReason, is_retryable
from orchestrator.worker.rollback import JobRun, RunResult, SaeApi
from orchestrator.worker.runner import Worker, WorkerConfig, WorkerCrashed

__all__ = [
    "CallBudget",
    "JobRun",
    "Priority",
    "RetryDecision",
    "RetryPolicy",
    "RetryReason",
    "RunResult",
    "SaeApi",
    "Worker",
    "WorkerConfig",
    "WorkerCrashed",
    "is_retryable",
    "make_budget",
]
