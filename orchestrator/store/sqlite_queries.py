"""Every SQL statement the SQLite engine runs (besides the migration files), by name.

Parameters are named (``:name``). Timestamps are integer microseconds since the epoch.
Status lists match the groups in ``orchestrator.jobs`` (LIVE, ACTIVE, CLAIMABLE, TERMINAL);
``tests/unit/test_jobs.py`` checks that they agree.
"""

from __future__ import annotations

from typing import Final

LIVE_SQL: Final = "('queued', 'running', 'waiting', 'verifying')"
ACTIVE_SQL: Final = "('running', 'verifying')"
CLAIMABLE_SQL: Final = "('queued', 'waiting')"
TERMINAL_SQL: Final = "('succeeded', 'failed', 'cancelled', 'skipped')"

JOB_COLUMNS: Final = (
    "seq, id, change_order_id, app_id, region, status, source, reason, requested_by, dry_run,"
    " created_at, updated_at, finished_at, next_attempt_at, error_code, error_message,"
    " attempt_count, call_count, needs_reconcile, lease_owner, lease_token, lease_expires_at,"
    " interrupted_count, first_attempt_at"
)
ATTEMPT_COLUMNS: Final = (
    "job_id, number, run, action, started_at, duration_ms, http_status, code, message,"
    " request_id, trace_id, outcome"
)

# -- connection and migrations --------------------------------------------------------------

PRAGMAS: Final = (
    "PRAGMA journal_mode = WAL",
    # FULL: a commit is on disk when it returns (WAL + NORMAL may lose the last commits on
    # power loss, and intake answers 202 only after a commit).
    "PRAGMA synchronous = FULL",
    "PRAGMA foreign_keys = ON",
)
CREATE_MIGRATIONS_TABLE: Final = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL,
    applied_at  INTEGER NOT NULL
)"""
MIGRATIONS_TABLE_EXISTS: Final = (
    "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
)
APPLIED_VERSIONS: Final = "SELECT version FROM schema_migrations ORDER BY version"
INSERT_MIGRATION: Final = (
    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (:version, :name, :now)"
)
SCHEMA_VERSION: Final = "SELECT coalesce(max(version), 0) FROM schema_migrations"
PING: Final = "SELECT 1"

# -- intake ---------------------------------------------------------------------------------

JOB_BY_KEY: Final = f"""
SELECT {", ".join("j." + c.strip() for c in JOB_COLUMNS.split(","))}
FROM idempotency_keys AS k JOIN jobs AS j ON j.id = k.job_id
WHERE k.source = :source AND k.key = :key"""

INSERT_JOB: Final = f"""
INSERT INTO jobs (id, change_order_id, app_id, region, status, source, reason, requested_by,
                  dry_run, created_at, updated_at, next_attempt_at)
VALUES (:id, :change_order_id, :app_id, :region, 'queued', :source, :reason, :requested_by,
        :dry_run, :now, :now, :now)
ON CONFLICT DO NOTHING
RETURNING {JOB_COLUMNS}"""

LIVE_JOB_BY_CHANGE_ORDER: Final = f"""
SELECT {JOB_COLUMNS} FROM jobs
WHERE change_order_id = :change_order_id AND status IN {LIVE_SQL}"""

LIVE_APP_ONLY_JOB: Final = f"""
SELECT {JOB_COLUMNS} FROM jobs
WHERE app_id = :app_id AND change_order_id IS NULL AND status IN {LIVE_SQL}"""

INSERT_KEY: Final = """
INSERT INTO idempotency_keys (source, key, job_id, created_at)
VALUES (:source, :key, :job_id, :now)
ON CONFLICT DO NOTHING"""

INSERT_AUDIT: Final = """
INSERT INTO audit_events (job_id, at, event, actor, detail)
VALUES (:job_id, :at, :event, :actor, :detail)"""

CANCEL: Final = f"""
UPDATE jobs SET status = 'cancelled', finished_at = :now, updated_at = :now,
       next_attempt_at = NULL, error_code = 'cancelled', error_message = :reason
WHERE id = :id AND status IN {CLAIMABLE_SQL}
RETURNING {JOB_COLUMNS}"""

JOB_ID_BY_KEY: Final = "SELECT job_id FROM idempotency_keys WHERE source = :source AND key = :key"

# -- worker ---------------------------------------------------------------------------------

# Candidates for a claim: due, and the app has no running/verifying job. ``scan`` bounds the
# rows read; the caller keeps one per app (two jobs of one app must not share a batch).
# INDEXED BY: left alone, the planner picks jobs_status_seq and sorts every queued row on
# each claim; the partial index jobs_due is already in claim order, so LIMIT stops early.
CLAIM_CANDIDATES: Final = f"""
SELECT seq, app_id FROM jobs AS j INDEXED BY jobs_due
WHERE status IN {CLAIMABLE_SQL} AND next_attempt_at <= :now
  AND (app_id IS NULL OR NOT EXISTS (
        SELECT 1 FROM jobs AS r WHERE r.app_id = j.app_id AND r.status IN {ACTIVE_SQL}))
ORDER BY next_attempt_at, seq
LIMIT :scan"""

CLAIM_ONE: Final = f"""
UPDATE jobs SET status = 'running', attempt_count = attempt_count + 1, lease_owner = :owner,
       lease_token = :token, lease_expires_at = :expires, next_attempt_at = NULL,
       updated_at = :now
WHERE seq = :seq AND status IN {CLAIMABLE_SQL}
RETURNING {JOB_COLUMNS}"""

# Earliest time a job could be claimed (jobs of busy apps excluded: they wait for a wake-up).
NEXT_DUE: Final = f"""
SELECT next_attempt_at FROM jobs AS j INDEXED BY jobs_due
WHERE status IN {CLAIMABLE_SQL}
  AND (app_id IS NULL OR NOT EXISTS (
        SELECT 1 FROM jobs AS r WHERE r.app_id = j.app_id AND r.status IN {ACTIVE_SQL}))
ORDER BY next_attempt_at, seq
LIMIT 1"""

LEASE_STATE: Final = "SELECT status, lease_token FROM jobs WHERE id = :id"

HEARTBEAT: Final = f"""
UPDATE jobs SET lease_expires_at = :expires
WHERE id = :id AND lease_token = :token AND status IN {ACTIVE_SQL}
RETURNING lease_expires_at"""

# ``first_attempt_at`` keeps the start of the job's first call (the retry budget's origin).
COUNT_CALL: Final = f"""
UPDATE jobs SET call_count = call_count + 1, updated_at = :now,
       first_attempt_at = coalesce(first_attempt_at, :started_at)
WHERE id = :id AND lease_token = :token AND status IN {ACTIVE_SQL}
RETURNING call_count, attempt_count"""

INSERT_ATTEMPT: Final = f"""
INSERT INTO attempts ({ATTEMPT_COLUMNS})
VALUES (:job_id, :number, :run, :action, :started_at, :duration_ms, :http_status, :code,
        :message, :request_id, :trace_id, :outcome)"""

FENCED_JOB: Final = f"""
SELECT {JOB_COLUMNS} FROM jobs
WHERE id = :id AND lease_token = :token AND status IN {ACTIVE_SQL}"""

OTHER_LIVE_JOB_WITH_CHANGE_ORDER: Final = f"""
SELECT id FROM jobs
WHERE change_order_id = :change_order_id AND status IN {LIVE_SQL} AND id <> :id"""

OTHER_ACTIVE_JOB_OF_APP: Final = f"""
SELECT id FROM jobs WHERE app_id = :app_id AND status IN {ACTIVE_SQL} AND id <> :id"""

SET_TARGET: Final = f"""
UPDATE jobs SET change_order_id = coalesce(:change_order_id, change_order_id),
       app_id = coalesce(:app_id, app_id), updated_at = :now
WHERE id = :id AND lease_token = :token
RETURNING {JOB_COLUMNS}"""

# ``:s1``/``:s2`` are the statuses the target can be reached from (jobs.sources_for), both
# within ACTIVE since only leased jobs have a token.
TRANSITION: Final = f"""
UPDATE jobs SET status = :status, error_code = :error_code, error_message = :error_message,
       updated_at = :now, next_attempt_at = NULL,
       finished_at = CASE WHEN :terminal THEN :now END,
       lease_token = CASE WHEN :terminal THEN NULL ELSE lease_token END,
       lease_expires_at = CASE WHEN :terminal THEN NULL ELSE lease_expires_at END
WHERE id = :id AND lease_token = :token AND status IN (:s1, :s2)
RETURNING {JOB_COLUMNS}"""

SCHEDULE_RETRY: Final = f"""
UPDATE jobs SET status = 'waiting', next_attempt_at = :due, error_code = :error_code,
       error_message = :error_message, needs_reconcile = :reconcile, lease_token = NULL,
       lease_expires_at = NULL, updated_at = :now
WHERE id = :id AND lease_token = :token AND status IN {ACTIVE_SQL}
RETURNING {JOB_COLUMNS}"""

# Back to the queue, due now: ``queued`` if no SAE call was ever recorded, else ``waiting``.
RELEASE: Final = f"""
UPDATE jobs SET status = CASE WHEN call_count > 0 THEN 'waiting' ELSE 'queued' END,
       next_attempt_at = :now, needs_reconcile = (needs_reconcile OR :reconcile),
       lease_token = NULL, lease_expires_at = NULL, updated_at = :now
WHERE id = :id AND lease_token = :token AND status IN {ACTIVE_SQL}
RETURNING {JOB_COLUMNS}"""

EXPIRED_LEASES: Final = f"""
SELECT id, status, lease_owner FROM jobs
WHERE status IN {ACTIVE_SQL} AND lease_expires_at < :now"""

# A rescued job may have reached SAE without recording it: needs_reconcile. Each rescue is
# one interrupted run; the one that reaches ``:max_interrupts`` fails the job (a job that
# takes its worker down every time must end; ordinary retries do not count).
RESCUE_ONE: Final = f"""
UPDATE jobs SET
    interrupted_count = interrupted_count + 1,
    status = CASE WHEN interrupted_count + 1 >= :max_interrupts THEN 'failed'
                  WHEN call_count > 0 THEN 'waiting' ELSE 'queued' END,
    finished_at = CASE WHEN interrupted_count + 1 >= :max_interrupts THEN :now END,
    next_attempt_at = CASE WHEN interrupted_count + 1 >= :max_interrupts THEN NULL ELSE :now END,
    error_code = CASE WHEN interrupted_count + 1 >= :max_interrupts THEN 'interrupted_too_often'
                      ELSE 'lease_expired' END,
    error_message = CASE WHEN interrupted_count + 1 >= :max_interrupts
                         THEN 'gave up after ' || (interrupted_count + 1) || ' interrupted runs'
                              || ' (each time the lease of the worker expired: it died or hung)'
                         ELSE 'the lease of ' || coalesce(lease_owner, '?') || ' expired' END,
    needs_reconcile = 1, lease_token = NULL, lease_expires_at = NULL, updated_at = :now
WHERE id = :id AND status IN {ACTIVE_SQL} AND lease_expires_at < :now
RETURNING id, status, interrupted_count, error_code, error_message, attempt_count"""

BUDGET_GET: Final = "SELECT tokens, updated_at FROM call_budget WHERE bucket = :bucket"
BUDGET_PUT: Final = """
INSERT INTO call_budget (bucket, tokens, updated_at) VALUES (:bucket, :tokens, :now)
ON CONFLICT (bucket) DO UPDATE SET tokens = excluded.tokens, updated_at = excluded.updated_at"""

# -- reads ------------------------------------------------------------------------------------

JOB_BY_ID: Final = f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = :id"
ATTEMPTS_OF_JOB: Final = (
    f"SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE job_id = :id ORDER BY number"
)
# ``:ids`` is a JSON array of job ids (one statement for a whole page).
ATTEMPTS_OF_JOBS: Final = f"""
SELECT {ATTEMPT_COLUMNS} FROM attempts
WHERE job_id IN (SELECT value FROM json_each(:ids))
ORDER BY job_id, number"""

LIST_JOBS: Final = f"""
SELECT {JOB_COLUMNS} FROM jobs
WHERE (:status IS NULL OR status = :status)
  AND (:app_id IS NULL OR app_id = :app_id)
  AND (:source IS NULL OR source = :source)
  AND (:before IS NULL OR seq < :before)
ORDER BY seq DESC
LIMIT :limit"""

AUDIT_OF_JOB: Final = """
SELECT id, job_id, at, event, actor, detail FROM audit_events WHERE job_id = :id ORDER BY id"""

JOBLESS_AUDIT: Final = """
SELECT id, job_id, at, event, actor, detail FROM audit_events WHERE job_id IS NULL
ORDER BY at DESC, id DESC LIMIT :limit"""

COUNT_BY_STATUS: Final = "SELECT status, count(*) FROM jobs GROUP BY status"
OLDEST_DUE: Final = f"""
SELECT next_attempt_at FROM jobs INDEXED BY jobs_due
WHERE status IN {CLAIMABLE_SQL} AND next_attempt_at <= :now
ORDER BY next_attempt_at, seq
LIMIT 1"""

# -- retention --------------------------------------------------------------------------------

PRUNE_JOBS: Final = f"DELETE FROM jobs WHERE status IN {TERMINAL_SQL} AND finished_at < :cutoff"
PRUNE_JOBLESS_AUDIT: Final = "DELETE FROM audit_events WHERE job_id IS NULL AND at < :cutoff"
