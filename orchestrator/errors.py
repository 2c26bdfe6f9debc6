"""The package's exception tree: every boundary translates foreign errors into these.

::

    RollbackError                      root; never raised itself
    ├── ConfigError                    bad configuration or usage (CLI exit code 2)
    ├── StoreError                     anything the store could not do
    │   ├── StoreUnavailable           cannot commit now (disk full, I/O, DB down): 503, retry
    │   ├── SchemaError                schema missing or newer/older than this code: run `migrate`
    │   ├── JobNotFound                no job with that id
    │   ├── LeaseLost                  the caller's lease/fencing token is no longer current
    │   └── InvalidTransition          the job is not in a state that allows the change
    └── SaeError                       an SAE call did not succeed (orchestrator.sae.errors)
        └── SaeCallError               carries the call's outcome (ids, status, code)
            ├── SaeBusy                the app is busy with another change: retry later
            ├── SaeThrottled           flow control: retry later, honour retry_after_s
            ├── SaeServerError         5xx, InternalError, ServiceUnavailable: reconcile
            ├── SaeTransportError      no usable answer: connect error, timeout, reset, garbage
            ├── SaeNotRunning          Application.ChangerOrder.Not.Running: reconcile
            └── SaePermanentError      will never succeed as sent: not found, permission, signature

Library exceptions (aiohttp, sqlite3, asyncpg) never escape a component: they are
re-raised as one of these with ``raise ... from exc`` so the cause stays visible.
"""

from __future__ import annotations


class RollbackError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(RollbackError):
    """The configuration or command line is invalid; the message says which key and why."""


class StoreError(RollbackError):
    """The store could not perform an operation."""


class StoreUnavailable(StoreError):
    """The store cannot commit right now (disk full, I/O error, database unreachable).

    Callers treat it as transient: intake answers 503 with ``Retry-After``, the worker
    stops claiming until the store is back.
    """


class SchemaError(StoreError):
    """The store's schema is missing or at a different version than this code expects."""


class JobNotFound(StoreError):
    """No job has the requested id."""


class LeaseLost(StoreError):
    """The caller's lease token is no longer current: another worker owns the job now."""


class InvalidTransition(StoreError):
    """The job's current status does not allow the requested change."""


class SaeError(RollbackError):
    """An SAE call did not succeed; the subclasses in ``orchestrator.sae.errors`` say how."""
