"""Every SQL statement the PostgreSQL engine runs (besides the migration files), by name.

Parameters are positional (``$n``, asyncpg). Each worker write is ONE statement — the
fencing check, the update, the audit row and the wake-up notification in data-modifying
CTEs — so it is atomic without an explicit transaction and costs one round trip.
Lease and schedule times use the database clock (``now()``), never a worker's clock.
Status lists match the groups in ``orchestrator.jobs``; ``tests/unit/test_jobs.py`` checks
that they agree.
"""

from __future__ import annotations

import functools
from typing import Final

from orchestrator.jobs import WORKER_TARGETS, sources_for

LIVE_SQL: Final = "('queued', 'running', 'waiting', 'verifying')"
ACTIVE_SQL: Final = "('running', 'verifying')"
CLAIMABLE_SQL: Final = "('queued', 'waiting')"
TERMINAL_SQL: Final = "('succeeded', 'failed', 'cancelled', 'skipped')"

# One channel per schema, so stores in different schemas of one database do not wake
# each other. (LISTEN takes the same name: see PostgresStore._listen.)
CHANNEL_SQL: Final = "'sae_rollback_' || current_schema()"
CHANNEL: Final = f"SELECT {CHANNEL_SQL}"


def _rfc3339(column: str) -> str:
    """A timestamptz as the RFC 3339 text jobs.rfc3339 writes (audit details match SQLite's)."""
    return f"""to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"""


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


def _prefixed(columns: str, alias: str) -> str:
    return ", ".join(f"{alias}.{c.strip()}" for c in columns.split(","))


# -- migrations -------------------------------------------------------------------------------

# Serializes concurrent `migrate` runs (any constant works; this one spells "saerollb").
MIGRATION_LOCK: Final = "SELECT pg_advisory_xact_lock(7233170476936735842)"
CREATE_MIGRATIONS_TABLE: Final = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer     PRIMARY KEY,
    name        text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)"""
MIGRATIONS_TABLE_EXISTS: Final = "SELECT to_regclass('schema_migrations') IS NOT NULL"
APPLIED_VERSIONS: Final = "SELECT version FROM schema_migrations ORDER BY version"
INSERT_MIGRATION: Final = "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)"
SCHEMA_VERSION: Final = "SELECT coalesce(max(version), 0) FROM schema_migrations"
PING: Final = "SELECT 1"

# -- intake -------------------------------------------------------------------------------------

# The common case in one round trip: a new job (no live duplicate, key unseen) with its key,
# its audit row and the wake-up. No row back means "duplicate or replay": the caller takes
# the slow path (a transaction with fresh snapshots, see PostgresStore.enqueue).
# $1 id, $2 change_order_id, $3 app_id, $4 region, $5 source, $6 reason, $7 requested_by,
# $8 dry_run, $9 idempotency_key, $10 audit detail (json)
ENQUEUE_NEW: Final = f"""
WITH ins AS (
    INSERT INTO jobs (id, change_order_id, app_id, region, status, source, reason,
                      requested_by, dry_run, created_at, updated_at, next_attempt_at)
    SELECT $1::text, $2::text, $3::text, $4::text, 'queued', $5::text, $6::text, $7::text,
           $8::boolean, now(), now(), now()
    WHERE $9::text IS NULL
       OR NOT EXISTS (SELECT 1 FROM idempotency_keys WHERE source = $5 AND key = $9)
    ON CONFLICT DO NOTHING
    RETURNING {JOB_COLUMNS}
), keyed AS (
    INSERT INTO idempotency_keys (source, key, job_id, created_at)
    SELECT source, $9, id, created_at FROM ins WHERE $9::text IS NOT NULL
), audited AS (
    INSERT INTO audit_events (job_id, at, event, actor, detail)
    SELECT id, created_at, 'accepted', source, $10::jsonb FROM ins
), notified AS (
    SELECT pg_notify({CHANNEL_SQL}, '') FROM ins
)
SELECT ins.*, (SELECT count(*) FROM notified) AS notified FROM ins"""

JOB_BY_KEY: Final = f"""
SELECT {_prefixed(JOB_COLUMNS, "j")}
FROM idempotency_keys AS k JOIN jobs AS j ON j.id = k.job_id
WHERE k.source = $1 AND k.key = $2"""

INSERT_JOB: Final = f"""
INSERT INTO jobs (id, change_order_id, app_id, region, status, source, reason, requested_by,
                  dry_run, created_at, updated_at, next_attempt_at)
VALUES ($1, $2, $3, $4, 'queued', $5, $6, $7, $8, now(), now(), now())
ON CONFLICT DO NOTHING
RETURNING {JOB_COLUMNS}"""

LIVE_JOB_BY_CHANGE_ORDER: Final = f"""
SELECT {JOB_COLUMNS} FROM jobs WHERE change_order_id = $1 AND status IN {LIVE_SQL}"""

LIVE_APP_ONLY_JOB: Final = f"""
SELECT {JOB_COLUMNS} FROM jobs
WHERE app_id = $1 AND change_order_id IS NULL AND status IN {LIVE_SQL}"""

INSERT_KEY: Final = """
INSERT INTO idempotency_keys (source, key, job_id, created_at) VALUES ($1, $2, $3, now())
ON CONFLICT DO NOTHING
RETURNING job_id"""

# $1 job_id (NULL for rejections), $2 event, $3 actor, $4 detail (json)
INSERT_AUDIT: Final = """
INSERT INTO audit_events (job_id, at, event, actor, detail) VALUES ($1, now(), $2, $3, $4::jsonb)"""

NOTIFY: Final = f"SELECT pg_notify({CHANNEL_SQL}, '')"

# $1 id, $2 reason, $3 by
CANCEL: Final = f"""
WITH upd AS (
    UPDATE jobs SET status = 'cancelled', finished_at = now(), updated_at = now(),
           next_attempt_at = NULL, error_code = 'cancelled', error_message = $2
    WHERE id = $1 AND status IN {CLAIMABLE_SQL}
    RETURNING {JOB_COLUMNS}
), audited AS (
    INSERT INTO audit_events (job_id, at, event, actor, detail)
    SELECT id, now(), 'cancelled', $3, jsonb_build_object('reason', $2::text) FROM upd
)
SELECT * FROM upd"""

JOB_ID_BY_KEY: Final = "SELECT job_id FROM idempotency_keys WHERE source = $1 AND key = $2"

# -- worker ---------------------------------------------------------------------------------------

# $1 owner, $2 lease seconds; the batch size is part of the text (see claim()).
# * candidates: due, app not busy, oldest due first; rows another claimer holds are skipped.
#   Exactly ``limit`` rows are locked: locking more would hide them from concurrent
#   claimers for nothing (a batch may come out smaller when two candidates share an app).
# * one job per app in the batch (row_number), and a transaction-scoped advisory lock per
#   app so two concurrent claimers rarely pick two jobs of one app. The unique index
#   jobs_one_active_per_app is the guarantee: if both still do, one UPDATE fails with a
#   unique violation and that claim is retried (PostgresStore.claim).
_CLAIM_TEMPLATE: Final = f"""
WITH candidates AS (
    SELECT j.id, j.app_id, j.next_attempt_at, j.seq FROM jobs AS j
    WHERE j.status IN {CLAIMABLE_SQL} AND j.next_attempt_at <= now()
      AND (j.app_id IS NULL OR NOT EXISTS (
            SELECT 1 FROM jobs AS r WHERE r.app_id = j.app_id AND r.status IN {ACTIVE_SQL}))
    ORDER BY j.next_attempt_at, j.seq
    LIMIT {{limit}}
    FOR UPDATE SKIP LOCKED
), ranked AS (
    SELECT c.*, row_number() OVER (PARTITION BY coalesce(c.app_id, c.id)
                                   ORDER BY c.next_attempt_at, c.seq) AS rn
    FROM candidates AS c
), picked AS (
    SELECT id, next_attempt_at AS due, seq FROM ranked
    WHERE rn = 1 AND (app_id IS NULL OR pg_try_advisory_xact_lock(hashtextextended(app_id, 0)))
), claimed AS (
    UPDATE jobs AS j SET status = 'running', attempt_count = j.attempt_count + 1,
           lease_owner = $1, lease_token = gen_random_uuid()::text,
           lease_expires_at = now() + make_interval(secs => $2), next_attempt_at = NULL,
           updated_at = now()
    FROM picked WHERE j.id = picked.id
    RETURNING {_prefixed(JOB_COLUMNS, "j")}, picked.due
), audited AS (
    -- clock_timestamp(), not now(): now() is when this statement's transaction began, which
    -- can precede the commit of the write that freed the app (a backend descheduled between
    -- Bind and Execute), so the trail would show this claim before the other job's end.
    -- Read during execution, it is after our snapshot and so after that commit.
    INSERT INTO audit_events (job_id, at, event, actor, detail)
    SELECT id, clock_timestamp(), 'claimed', $1,
           jsonb_build_object('attempt', attempt_count,
                              'lease_expires_at', {_rfc3339("lease_expires_at")})
    FROM claimed
)
SELECT * FROM claimed ORDER BY due, seq"""


@functools.lru_cache(maxsize=64)
def claim(limit: int) -> str:
    """The claim statement for batches of ``limit``.

    The limit is written into the text rather than passed as ``$3``: with a parameter
    PostgreSQL deems the generic plan costlier and re-plans the statement on every call
    (measured: 30 of 30 executions custom-planned, planning ≈ 1-8 ms each); with a
    constant it caches one plan per batch size.
    """
    if not isinstance(limit, int) or not 1 <= limit <= 100_000:
        raise ValueError(f"bad claim limit {limit!r}")
    return _CLAIM_TEMPLATE.replace("{limit}", str(limit))


# Seconds until the earliest claimable job is due (negative: due already; NULL: none).
NEXT_DUE_IN: Final = f"""
SELECT extract(epoch FROM min(next_attempt_at) - now())::float8 FROM jobs AS j
WHERE status IN {CLAIMABLE_SQL}
  AND (app_id IS NULL OR NOT EXISTS (
        SELECT 1 FROM jobs AS r WHERE r.app_id = j.app_id AND r.status IN {ACTIVE_SQL}))"""

LEASE_STATE: Final = "SELECT status, lease_token FROM jobs WHERE id = $1"

# $1 id, $2 token, $3 lease seconds
HEARTBEAT: Final = f"""
UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $3)
WHERE id = $1 AND lease_token = $2 AND status IN {ACTIVE_SQL}
RETURNING lease_expires_at"""

# Many callers' attempts in one statement (PostgresStore coalesces concurrent calls; one
# commit for all). $1..$11 are arrays, one element per call: id, token, then the AttemptIn
# fields. Job ids in one batch are distinct. The counter on the job row numbers the
# attempt: the row lock serializes recorders, where max(number)+1 could read a stale
# snapshot. Calls whose lease is not current return no row.
RECORD_ATTEMPTS: Final = f"""
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::integer[],
                         $6::integer[], $7::text[], $8::text[], $9::text[], $10::text[],
                         $11::text[])
        AS i(id, token, action, started_at, duration_ms, http_status, code, message,
             request_id, trace_id, outcome)
), j AS (
    UPDATE jobs SET call_count = jobs.call_count + 1, updated_at = now(),
           first_attempt_at = coalesce(jobs.first_attempt_at, i.started_at)
    FROM input AS i
    WHERE jobs.id = i.id AND jobs.lease_token = i.token AND jobs.status IN {ACTIVE_SQL}
    RETURNING jobs.id, jobs.call_count, jobs.attempt_count, i.action, i.started_at,
              i.duration_ms, i.http_status, i.code, i.message, i.request_id, i.trace_id,
              i.outcome
)
INSERT INTO attempts ({ATTEMPT_COLUMNS})
SELECT id, call_count, attempt_count, action, started_at, duration_ms, http_status, code,
       message, request_id, trace_id, outcome
FROM j
RETURNING job_id AS id, number"""

# $1 id, $2 token, $3 change_order_id, $4 app_id. Fill-only: a known value is never changed.
SET_TARGET: Final = f"""
WITH upd AS (
    UPDATE jobs SET change_order_id = coalesce($3, change_order_id),
           app_id = coalesce($4, app_id), updated_at = now()
    WHERE id = $1 AND lease_token = $2 AND status IN {ACTIVE_SQL}
      AND ($3::text IS NULL OR change_order_id IS NULL OR change_order_id = $3)
      AND ($4::text IS NULL OR app_id IS NULL OR app_id = $4)
    RETURNING {JOB_COLUMNS}
), audited AS (
    INSERT INTO audit_events (job_id, at, event, actor, detail)
    SELECT id, now(), 'target_set', lease_owner,
           jsonb_build_object('change_order_id', change_order_id, 'app_id', app_id)
    FROM upd
)
SELECT * FROM upd"""

TARGET_STATE: Final = "SELECT status, lease_token, change_order_id, app_id FROM jobs WHERE id = $1"
OTHER_LIVE_JOB_WITH_CHANGE_ORDER: Final = f"""
SELECT id FROM jobs WHERE change_order_id = $1 AND status IN {LIVE_SQL} AND id <> $2"""
OTHER_ACTIVE_JOB_OF_APP: Final = f"""
SELECT id FROM jobs WHERE app_id = $1 AND status IN {ACTIVE_SQL} AND id <> $2"""


def _attempt_cte(first: int) -> str:
    """A CTE recording the caller's SAE call along with the update ``upd`` of its job.

    Parameters ``$first`` (bool: is there an attempt) and the nine after it (the
    AttemptIn fields); ``upd`` must have bumped ``call_count`` by one when there is.
    """
    p = [f"${n}" for n in range(first, first + 10)]
    return f"""attempted AS (
    INSERT INTO attempts ({ATTEMPT_COLUMNS})
    SELECT id, call_count, attempt_count, {p[1]}::text, {p[2]}::timestamptz, {p[3]}::integer,
           {p[4]}::integer, {p[5]}::text, {p[6]}::text, {p[7]}::text, {p[8]}::text, {p[9]}::text
    FROM upd WHERE {p[0]}::boolean
)"""


def _transition_guard() -> str:
    """SQL: the job's current status allows the requested one (jobs.sources_for)."""
    parts = []
    for target in sorted(WORKER_TARGETS):
        sources = sorted(str(s) for s in sources_for(target))
        current = (
            f"j.status = '{sources[0]}'"
            if len(sources) == 1
            else "j.status IN (" + ", ".join(f"'{s}'" for s in sources) + ")"
        )
        parts.append(f"(i.status = '{target}' AND {current})")
    return "\n        OR ".join(parts)


# Many callers' transitions in one statement (PostgresStore coalesces concurrent calls; one
# commit for all). Arrays, one element per call: $1 id, $2 token, $3 target status,
# $4 error_code, $5 error_message, $6 audit event, $7..$16 the attempt (has_attempt, then
# the AttemptIn fields). Job ids in one batch are distinct. Calls whose lease is not
# current, or whose job's status does not allow the target, return no row. A finished job
# frees its app: notify when that app has another job waiting.
TRANSITIONS: Final = f"""
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                         $6::text[], $7::boolean[], $8::text[], $9::timestamptz[],
                         $10::integer[], $11::integer[], $12::text[], $13::text[], $14::text[],
                         $15::text[], $16::text[])
        AS i(id, token, status, error_code, error_message, event, has_attempt, action,
             started_at, duration_ms, http_status, code, message, request_id, trace_id,
             outcome)
), upd AS (
    UPDATE jobs AS j SET status = i.status, error_code = i.error_code,
           error_message = i.error_message, updated_at = now(), next_attempt_at = NULL,
           call_count = j.call_count + CASE WHEN i.has_attempt THEN 1 ELSE 0 END,
           first_attempt_at = coalesce(j.first_attempt_at, i.started_at),
           finished_at = CASE WHEN i.status IN {TERMINAL_SQL} THEN now() END,
           lease_token = CASE WHEN i.status IN {TERMINAL_SQL} THEN NULL ELSE j.lease_token END,
           lease_expires_at = CASE WHEN i.status IN {TERMINAL_SQL} THEN NULL
                                   ELSE j.lease_expires_at END
    FROM input AS i
    WHERE j.id = i.id AND j.lease_token = i.token AND (
        {_transition_guard()})
    RETURNING {_prefixed(JOB_COLUMNS, "j")}, i.event, i.has_attempt, i.action, i.started_at,
              i.duration_ms, i.http_status, i.code, i.message, i.request_id, i.trace_id,
              i.outcome
), attempted AS (
    INSERT INTO attempts ({ATTEMPT_COLUMNS})
    SELECT id, call_count, attempt_count, action, started_at, duration_ms, http_status, code,
           message, request_id, trace_id, outcome
    FROM upd WHERE has_attempt
), audited AS (
    INSERT INTO audit_events (job_id, at, event, actor, detail)
    SELECT id, updated_at, event, lease_owner,
           jsonb_strip_nulls(jsonb_build_object('status', status, 'error_code', error_code,
                                                'error_message', error_message))
    FROM upd
), notified AS (
    SELECT pg_notify({CHANNEL_SQL}, '') FROM (
        SELECT 1 FROM upd
        WHERE finished_at IS NOT NULL AND upd.app_id IS NOT NULL AND EXISTS (
            SELECT 1 FROM jobs AS p WHERE p.app_id = upd.app_id AND p.status IN {CLAIMABLE_SQL})
        LIMIT 1
    ) AS freed
)
SELECT {JOB_COLUMNS}, (SELECT count(*) FROM notified) AS notified FROM upd"""

# $1 id, $2 token, $3 due at (timestamptz or NULL), $4 delay seconds (or NULL),
# $5 error_code, $6 error_message, $7 reconcile, $8..$17 the attempt (see _attempt_cte)
SCHEDULE_RETRY: Final = f"""
WITH upd AS (
    UPDATE jobs SET status = 'waiting',
           next_attempt_at = coalesce($3::timestamptz, now() + make_interval(secs => $4)),
           error_code = $5, error_message = $6, needs_reconcile = $7,
           call_count = call_count + CASE WHEN $8 THEN 1 ELSE 0 END,
           first_attempt_at = coalesce(first_attempt_at, $10::timestamptz),
           lease_token = NULL, lease_expires_at = NULL, updated_at = now()
    WHERE id = $1 AND lease_token = $2 AND status IN {ACTIVE_SQL}
    RETURNING {JOB_COLUMNS}
), {_attempt_cte(8)}, audited AS (
    INSERT INTO audit_events (job_id, at, event, actor, detail)
    SELECT id, now(), 'retried', lease_owner,
           jsonb_build_object('next_attempt_at', {_rfc3339("next_attempt_at")},
                              'error_code', error_code,
                              'error_message', error_message, 'reconcile', $7::boolean)
    FROM upd
), notified AS (
    SELECT pg_notify({CHANNEL_SQL}, '') FROM upd
)
SELECT upd.*, (SELECT count(*) FROM notified) AS notified FROM upd"""

# $1 id, $2 token, $3 reconcile. Back to the queue, due now: ``queued`` if no SAE call was
# ever recorded, else ``waiting``.
RELEASE: Final = f"""
WITH upd AS (
    UPDATE jobs SET status = CASE WHEN call_count > 0 THEN 'waiting' ELSE 'queued' END,
           next_attempt_at = now(), needs_reconcile = (needs_reconcile OR $3),
           lease_token = NULL, lease_expires_at = NULL, updated_at = now()
    WHERE id = $1 AND lease_token = $2 AND status IN {ACTIVE_SQL}
    RETURNING {JOB_COLUMNS}
), audited AS (
    INSERT INTO audit_events (job_id, at, event, actor, detail)
    SELECT id, now(), 'released', lease_owner,
           jsonb_build_object('status', status, 'reconcile', needs_reconcile)
    FROM upd
), notified AS (
    SELECT pg_notify({CHANNEL_SQL}, '') FROM upd
)
SELECT upd.*, (SELECT count(*) FROM notified) AS notified FROM upd"""

# $1 max_interrupts. A rescued job may have reached SAE without recording it:
# needs_reconcile. Each rescue is one interrupted run; the one that reaches the limit fails
# the job (a job that takes its worker down every time must end; ordinary retries, which
# also bump attempt_count, do not count).
RESCUE_EXPIRED: Final = f"""
WITH expired AS (
    SELECT id, status AS old_status, lease_owner AS old_owner FROM jobs
    WHERE status IN {ACTIVE_SQL} AND lease_expires_at < now()
    FOR UPDATE SKIP LOCKED
), upd AS (
    UPDATE jobs AS j SET
        interrupted_count = j.interrupted_count + 1,
        status = CASE WHEN j.interrupted_count + 1 >= $1 THEN 'failed'
                      WHEN j.call_count > 0 THEN 'waiting' ELSE 'queued' END,
        finished_at = CASE WHEN j.interrupted_count + 1 >= $1 THEN now() END,
        next_attempt_at = CASE WHEN j.interrupted_count + 1 >= $1 THEN NULL ELSE now() END,
        error_code = CASE WHEN j.interrupted_count + 1 >= $1 THEN 'interrupted_too_often'
                          ELSE 'lease_expired' END,
        error_message = CASE WHEN j.interrupted_count + 1 >= $1
                             THEN 'gave up after ' || (j.interrupted_count + 1)
                                  || ' interrupted runs'
                                  || ' (each time the lease of the worker expired: it died or hung)'
                             ELSE 'the lease of ' || coalesce(j.lease_owner, '?') || ' expired'
                        END,
        needs_reconcile = true, lease_token = NULL, lease_expires_at = NULL, updated_at = now()
    FROM expired WHERE j.id = expired.id
    RETURNING j.id, j.status, j.interrupted_count, j.error_code, j.error_message,
              j.attempt_count, expired.old_owner, expired.old_status
), audited AS (
    INSERT INTO audit_events (job_id, at, event, actor, detail)
    SELECT id, now(), 'rescued', old_owner,
           jsonb_build_object('from', old_status, 'status', status,
                              'interrupted_count', interrupted_count,
                              'error_code', error_code, 'error_message', error_message,
                              'attempt_count', attempt_count, 'owner', old_owner)
    FROM upd
), notified AS (
    SELECT pg_notify({CHANNEL_SQL}, '') FROM (SELECT 1 FROM upd LIMIT 1) AS any_rescued
)
SELECT count(*) AS rescued, (SELECT count(*) FROM notified) AS notified FROM upd"""

# $1 bucket, $2 rate per minute, $3 burst, $4 tokens wanted. One atomic upsert: refill by
# elapsed database time (never negative: a statement that waited for the row lock may
# have an older now()), grant if enough, remember whether it granted.
TAKE_CALL_TOKENS: Final = """
INSERT INTO call_budget AS b (bucket, tokens, updated_at, granted)
VALUES ($1, $3::float8 - $4::float8, now(), true)
ON CONFLICT (bucket) DO UPDATE SET
    tokens = CASE
        WHEN least($3, b.tokens + greatest(0, extract(epoch FROM now() - b.updated_at))
                                  * $2::float8 / 60.0) >= $4
        THEN least($3, b.tokens + greatest(0, extract(epoch FROM now() - b.updated_at))
                                  * $2::float8 / 60.0) - $4
        ELSE least($3, b.tokens + greatest(0, extract(epoch FROM now() - b.updated_at))
                                  * $2::float8 / 60.0)
    END,
    granted = least($3, b.tokens + greatest(0, extract(epoch FROM now() - b.updated_at))
                             * $2::float8 / 60.0) >= $4,
    updated_at = greatest(b.updated_at, now())
RETURNING tokens, granted"""

# -- reads ---------------------------------------------------------------------------------------

JOB_BY_ID: Final = f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"
ATTEMPTS_OF_JOB: Final = f"SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE job_id = $1 ORDER BY number"
ATTEMPTS_OF_JOBS: Final = f"""
SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE job_id = ANY($1::text[]) ORDER BY job_id, number"""

# $1 status, $2 app_id, $3 source, $4 before seq, $5 limit
LIST_JOBS: Final = f"""
SELECT {JOB_COLUMNS} FROM jobs
WHERE ($1::text IS NULL OR status = $1)
  AND ($2::text IS NULL OR app_id = $2)
  AND ($3::text IS NULL OR source = $3)
  AND ($4::bigint IS NULL OR seq < $4)
ORDER BY seq DESC
LIMIT $5"""

AUDIT_OF_JOB: Final = """
SELECT id, job_id, at, event, actor, detail FROM audit_events WHERE job_id = $1 ORDER BY id"""

JOBLESS_AUDIT: Final = """
SELECT id, job_id, at, event, actor, detail FROM audit_events WHERE job_id IS NULL
ORDER BY at DESC, id DESC LIMIT $1"""

COUNT_BY_STATUS: Final = "SELECT status, count(*) FROM jobs GROUP BY status"
OLDEST_DUE_AGE: Final = f"""
SELECT coalesce(extract(epoch FROM now() - min(next_attempt_at)), 0)::float8 FROM jobs
WHERE status IN {CLAIMABLE_SQL} AND next_attempt_at <= now()"""

# -- retention ------------------------------------------------------------------------------------

PRUNE_JOBS: Final = f"""
WITH gone AS (
    DELETE FROM jobs WHERE status IN {TERMINAL_SQL} AND finished_at < $1 RETURNING 1
)
SELECT count(*) FROM gone"""
PRUNE_JOBLESS_AUDIT: Final = "DELETE FROM audit_events WHERE job_id IS NULL AND at < $1"

# reltuples is -1 until the first ANALYZE (PostgreSQL 14+); n_mod_since_analyze comes
# from the cumulative statistics, which may lag by a second: good enough for a minute's
# cadence.
JOBS_STATISTICS_STALE = """
SELECT c.reltuples < 0
       OR coalesce(s.n_mod_since_analyze, 0) > greatest(50, 0.1 * greatest(c.reltuples, 0))
FROM pg_class c
LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
WHERE c.oid = 'jobs'::regclass
"""
