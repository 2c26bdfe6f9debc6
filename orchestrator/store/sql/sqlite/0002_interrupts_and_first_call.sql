-- sae-rollback store schema, SQLite, version 2.
-- interrupted_count: how many times lease rescue took the job back from a worker that
--   died or hung. rescue_expired(max_interrupts) fails the job when it reaches the limit.
--   Distinct from attempt_count (claims), which also grows with every ordinary retry.
-- first_attempt_at: started_at of the job's first recorded SAE call (the retry budget's
--   max_elapsed_s is measured from it); NULL until a call is recorded.
-- Existing rows are backfilled from what version 1 recorded: the 'rescued' audit events
-- (what the worker used to count) and the earliest attempt.

ALTER TABLE jobs ADD COLUMN interrupted_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN first_attempt_at INTEGER;

UPDATE jobs SET
    interrupted_count = (SELECT count(*) FROM audit_events AS a
                         WHERE a.job_id = jobs.id AND a.event = 'rescued'),
    first_attempt_at = (SELECT min(started_at) FROM attempts AS t WHERE t.job_id = jobs.id);
