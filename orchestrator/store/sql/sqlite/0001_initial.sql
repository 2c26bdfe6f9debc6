-- sae-rollback store schema, SQLite, version 1.
-- Timestamps are INTEGER microseconds since the Unix epoch (UTC), taken from the process
-- clock (one host shares one clock; design.md "clock for leases: process clock").
-- The status lists in the partial indexes are the groups of orchestrator/jobs.py:
--   live = queued, running, waiting, verifying; active = running, verifying;
--   claimable = queued, waiting; terminal = succeeded, failed, cancelled, skipped.

CREATE TABLE jobs (
    seq              INTEGER PRIMARY KEY,            -- insertion order: keyset pagination
    id               TEXT    NOT NULL UNIQUE,
    change_order_id  TEXT,
    app_id           TEXT,
    region           TEXT    NOT NULL,
    status           TEXT    NOT NULL CHECK (status IN ('queued', 'running', 'waiting',
                              'verifying', 'succeeded', 'failed', 'cancelled', 'skipped')),
    source           TEXT    NOT NULL,
    reason           TEXT    NOT NULL DEFAULT '',
    requested_by     TEXT    NOT NULL DEFAULT '',
    dry_run          INTEGER NOT NULL DEFAULT 0 CHECK (dry_run IN (0, 1)),
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    finished_at      INTEGER,
    next_attempt_at  INTEGER,                         -- due time while queued/waiting
    error_code       TEXT,
    error_message    TEXT,
    attempt_count    INTEGER NOT NULL DEFAULT 0,      -- claims (incremented at claim time)
    call_count       INTEGER NOT NULL DEFAULT 0,      -- recorded SAE calls (attempt rows)
    needs_reconcile  INTEGER NOT NULL DEFAULT 0 CHECK (needs_reconcile IN (0, 1)),
    lease_owner      TEXT,                            -- last claimer, kept for forensics
    lease_token      TEXT,                            -- fencing token, NULL when no lease
    lease_expires_at INTEGER,
    CHECK (change_order_id IS NOT NULL OR app_id IS NOT NULL)
);

-- One live job per change order (dedupe; also what set_target must respect).
CREATE UNIQUE INDEX jobs_live_change_order ON jobs (change_order_id)
    WHERE change_order_id IS NOT NULL
      AND status IN ('queued', 'running', 'waiting', 'verifying');
-- One live app-only job (no change order known yet) per app.
CREATE UNIQUE INDEX jobs_live_app_only ON jobs (app_id)
    WHERE change_order_id IS NULL
      AND status IN ('queued', 'running', 'waiting', 'verifying');
-- At most one running/verifying job per app, whatever process claimed it.
CREATE UNIQUE INDEX jobs_one_active_per_app ON jobs (app_id)
    WHERE status IN ('running', 'verifying');
-- Claim order: oldest due first.
CREATE INDEX jobs_due ON jobs (next_attempt_at, seq)
    WHERE status IN ('queued', 'waiting');
-- Also serves rescue (active rows) and prune (terminal rows). No index on lease_expires_at
-- or finished_at on purpose: heartbeats and call counters then touch no index.
CREATE INDEX jobs_status_seq ON jobs (status, seq);
CREATE INDEX jobs_app_seq ON jobs (app_id, seq);

CREATE TABLE attempts (
    job_id       TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    number       INTEGER NOT NULL,
    run          INTEGER NOT NULL,
    action       TEXT    NOT NULL,
    started_at   INTEGER NOT NULL,
    duration_ms  INTEGER NOT NULL,
    http_status  INTEGER,
    code         TEXT,
    message      TEXT,
    request_id   TEXT,
    trace_id     TEXT,
    outcome      TEXT    NOT NULL CHECK (outcome IN ('retry', 'success', 'failed')),
    PRIMARY KEY (job_id, number)
) WITHOUT ROWID;

-- Append-only: the store never updates these rows; prune deletes them with their job.
CREATE TABLE audit_events (
    id      INTEGER PRIMARY KEY,
    job_id  TEXT REFERENCES jobs (id) ON DELETE CASCADE,  -- NULL for rejected requests
    at      INTEGER NOT NULL,
    event   TEXT    NOT NULL,
    actor   TEXT,
    detail  TEXT    NOT NULL DEFAULT '{}'                 -- JSON object
);
CREATE INDEX audit_events_job ON audit_events (job_id, id);
CREATE INDEX audit_events_jobless_at ON audit_events (at) WHERE job_id IS NULL;

-- Idempotency keys, scoped by source; several keys may map to one job (a duplicate's key
-- maps to the live job it was folded into, so its replays keep returning that job).
CREATE TABLE idempotency_keys (
    source      TEXT    NOT NULL,
    key         TEXT    NOT NULL,
    job_id      TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (source, key)
) WITHOUT ROWID;
CREATE INDEX idempotency_keys_job ON idempotency_keys (job_id);

-- Token buckets shared by every process using this database (SAE call budget).
CREATE TABLE call_budget (
    bucket      TEXT PRIMARY KEY,
    tokens      REAL    NOT NULL,
    updated_at  INTEGER NOT NULL
) WITHOUT ROWID;
