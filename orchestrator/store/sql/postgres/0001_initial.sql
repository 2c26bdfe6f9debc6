-- sae-rollback store schema, PostgreSQL, version 1.
-- Objects are created in the first schema of the connection's search_path.
-- All lease and schedule times come from the database clock (now()).
-- The status lists in the partial indexes are the groups of orchestrator/jobs.py:
--   live = queued, running, waiting, verifying; active = running, verifying;
--   claimable = queued, waiting; terminal = succeeded, failed, cancelled, skipped.

CREATE TABLE jobs (
    seq              bigint      GENERATED ALWAYS AS IDENTITY UNIQUE,  -- keyset pagination
    id               text        PRIMARY KEY,
    change_order_id  text,
    app_id           text,
    region           text        NOT NULL,
    status           text        NOT NULL CHECK (status IN ('queued', 'running', 'waiting',
                                  'verifying', 'succeeded', 'failed', 'cancelled', 'skipped')),
    source           text        NOT NULL,
    reason           text        NOT NULL DEFAULT '',
    requested_by     text        NOT NULL DEFAULT '',
    dry_run          boolean     NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    finished_at      timestamptz,
    next_attempt_at  timestamptz,                    -- due time while queued/waiting
    error_code       text,
    error_message    text,
    attempt_count    integer     NOT NULL DEFAULT 0, -- claims (incremented at claim time)
    call_count       integer     NOT NULL DEFAULT 0, -- recorded SAE calls (attempt rows)
    needs_reconcile  boolean     NOT NULL DEFAULT false,
    lease_owner      text,                           -- last claimer, kept for forensics
    lease_token      text,                           -- fencing token, NULL when no lease
    lease_expires_at timestamptz,
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
-- At most one running/verifying job per app across every worker process: two concurrent
-- claims of different jobs of one app cannot both commit (the claim retries on conflict).
CREATE UNIQUE INDEX jobs_one_active_per_app ON jobs (app_id)
    WHERE status IN ('running', 'verifying');
-- Claim order: oldest due first.
CREATE INDEX jobs_due ON jobs (next_attempt_at, seq)
    WHERE status IN ('queued', 'waiting');
-- Also serves rescue (active rows) and prune (terminal rows). No index on lease_expires_at
-- or finished_at on purpose: heartbeats and call counters then leave every index alone
-- (PostgreSQL can update those rows in place, "HOT").
CREATE INDEX jobs_status_seq ON jobs (status, seq);
CREATE INDEX jobs_app_seq ON jobs (app_id, seq);

CREATE TABLE attempts (
    job_id       text        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    number       integer     NOT NULL,
    run          integer     NOT NULL,
    action       text        NOT NULL,
    started_at   timestamptz NOT NULL,
    duration_ms  integer     NOT NULL,
    http_status  integer,
    code         text,
    message      text,
    request_id   text,
    trace_id     text,
    outcome      text        NOT NULL CHECK (outcome IN ('retry', 'success', 'failed')),
    PRIMARY KEY (job_id, number)
);

-- Append-only: the store never updates these rows; prune deletes them with their job.
CREATE TABLE audit_events (
    id      bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id  text        REFERENCES jobs (id) ON DELETE CASCADE,  -- NULL for rejected requests
    at      timestamptz NOT NULL,
    event   text        NOT NULL,
    actor   text,
    detail  jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_events_job ON audit_events (job_id, id);
CREATE INDEX audit_events_jobless_at ON audit_events (at) WHERE job_id IS NULL;

-- Idempotency keys, scoped by source; several keys may map to one job (a duplicate's key
-- maps to the live job it was folded into, so its replays keep returning that job).
CREATE TABLE idempotency_keys (
    source      text        NOT NULL,
    key         text        NOT NULL,
    job_id      text        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (source, key)
);
CREATE INDEX idempotency_keys_job ON idempotency_keys (job_id);

-- Token buckets shared by every worker process (the account-wide SAE call budget).
CREATE TABLE call_budget (
    bucket      text             PRIMARY KEY,
    tokens      double precision NOT NULL,
    updated_at  timestamptz      NOT NULL,
    granted     boolean          NOT NULL   -- outcome of the last request (RETURNING needs it)
);
