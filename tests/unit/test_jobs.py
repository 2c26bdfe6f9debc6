"""Unit tests of the job model: statuses, transitions, value types and the contract JSON."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta, timezone
from importlib import resources

import pytest

from orchestrator.jobs import (
    ACTIVE,
    CLAIMABLE,
    LIVE,
    TERMINAL,
    TRANSITIONS,
    WORKER_TARGETS,
    Attempt,
    AttemptIn,
    AttemptOutcome,
    Job,
    JobStatus,
    NewJob,
    can_transition,
    new_job_id,
    rfc3339,
    sources_for,
)
from orchestrator.store import postgres_queries, sqlite_queries

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


def _job(**kw: object) -> Job:
    fields: dict[str, object] = {
        "id": "j1",
        "change_order_id": "co-1",
        "app_id": "app-1",
        "region": "cn-hangzhou",
        "status": JobStatus.FAILED,
        "source": "alertmanager",
        "reason": "error rate",
        "requested_by": "am",
        "dry_run": False,
        "created_at": T0,
        "updated_at": T0 + timedelta(seconds=2),
        "finished_at": T0 + timedelta(seconds=2),
        "next_attempt_at": None,
        "error_code": "Forbidden",
        "error_message": "no permission",
        "attempt_count": 1,
        "call_count": 1,
        "needs_reconcile": False,
        "lease_owner": "w1",
        "lease_token": None,
        "lease_expires_at": None,
    }
    fields.update(kw)
    return Job(**fields)  # type: ignore[arg-type]


def test_every_status_is_live_or_terminal_and_not_both() -> None:
    """LIVE and TERMINAL partition the statuses; ACTIVE and CLAIMABLE partition LIVE."""
    assert set(JobStatus) == LIVE | TERMINAL
    assert not LIVE & TERMINAL
    assert ACTIVE | CLAIMABLE == LIVE
    assert not ACTIVE & CLAIMABLE
    assert all(s.is_live != s.is_terminal for s in JobStatus)


def test_terminal_statuses_have_no_way_out() -> None:
    """Nothing leaves succeeded/failed/cancelled/skipped."""
    for status in TERMINAL:
        assert TRANSITIONS[status] == frozenset()
        assert not any(can_transition(status, t) for t in JobStatus)


def test_the_lifecycle_edges_of_the_design() -> None:
    """Claim, verify, finish, retry and cancel edges exist; shortcuts do not."""
    assert can_transition(JobStatus.QUEUED, JobStatus.RUNNING)
    assert can_transition(JobStatus.WAITING, JobStatus.RUNNING)
    assert can_transition(JobStatus.RUNNING, JobStatus.VERIFYING)
    assert can_transition(JobStatus.VERIFYING, JobStatus.SUCCEEDED)
    assert can_transition(JobStatus.RUNNING, JobStatus.WAITING)
    assert can_transition(JobStatus.QUEUED, JobStatus.CANCELLED)
    assert not can_transition(JobStatus.RUNNING, JobStatus.CANCELLED)
    assert not can_transition(JobStatus.QUEUED, JobStatus.SUCCEEDED)
    assert not can_transition(JobStatus.VERIFYING, JobStatus.SKIPPED)
    assert not can_transition(JobStatus.QUEUED, JobStatus.VERIFYING)


def test_worker_targets_are_reached_only_from_leased_statuses() -> None:
    """Only leased (running/verifying) jobs carry a token, so the SQL can fence on it."""
    for target in WORKER_TARGETS:
        sources = sources_for(target)
        assert sources
        assert sources <= ACTIVE
        assert len(sources) <= 2  # the SQLite statement has two slots for them
    assert sources_for(JobStatus.SKIPPED) == {JobStatus.RUNNING}


_GROUPS = {
    "LIVE": LIVE,
    "ACTIVE": ACTIVE,
    "CLAIMABLE": CLAIMABLE,
    "TERMINAL": TERMINAL,
}


def _statuses(sql_list: str) -> frozenset[JobStatus]:
    return frozenset(JobStatus(s) for s in re.findall(r"'([a-z]+)'", sql_list))


def test_the_sql_status_lists_match_the_model() -> None:
    """Every status list in the queries and migrations is one of the model's groups."""
    for module in (sqlite_queries, postgres_queries):
        for name, group in _GROUPS.items():
            assert _statuses(getattr(module, f"{name}_SQL")) == group, (module, name)
    texts = [
        f.read_text()
        for engine in ("sqlite", "postgres")
        for f in resources.files("orchestrator.store").joinpath("sql", engine).iterdir()
        if f.name.endswith(".sql")
    ]
    texts += [v for m in (sqlite_queries, postgres_queries) for v in vars(m).values()]
    checked = 0
    for text in texts:
        if not isinstance(text, str):
            continue
        for listed in re.findall(r"status IN \(([^)]*)\)", text):
            if "'" not in listed:  # placeholders like (:s1, :s2)
                continue
            statuses = _statuses(listed)
            if len(statuses) == len(JobStatus):  # the CHECK constraint lists them all
                continue
            assert statuses in _GROUPS.values(), listed
            checked += 1
    assert checked > 20


def test_a_new_job_needs_a_change_order_or_an_app() -> None:
    """Intake cannot submit a job with no target."""
    with pytest.raises(ValueError, match="change_order_id or an app_id"):
        NewJob(region="cn-hangzhou", source="api")
    assert NewJob(region="r", source="api", app_id="a").change_order_id is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"change_order_id": " "},
        {"app_id": ""},
        {"idempotency_key": ""},
        {"region": ""},
        {"source": " "},
    ],
)
def test_a_new_job_refuses_blank_fields(kwargs: dict[str, str]) -> None:
    """Blank strings are refused rather than stored as a target or key."""
    base = {"region": "cn-hangzhou", "source": "api", "change_order_id": "co-1"}
    with pytest.raises(ValueError, match="must"):
        NewJob(**{**base, **kwargs})  # type: ignore[arg-type]


def test_to_dict_has_exactly_the_contract_shape() -> None:
    """The job JSON of contract.md: keys, RFC 3339 UTC strings, error object, attempts."""
    attempt = Attempt(
        number=1,
        run=1,
        action="AbortAndRollbackChangeOrder",
        started_at=T0,
        duration_ms=41,
        outcome=AttemptOutcome.FAILED,
        http_status=403,
        code="Forbidden",
        message="no permission",
        request_id="req",
        trace_id="trace",
    )
    data = _job(attempts=(attempt,)).to_dict()
    assert data == {
        "id": "j1",
        "change_order_id": "co-1",
        "app_id": "app-1",
        "region": "cn-hangzhou",
        "status": "failed",
        "source": "alertmanager",
        "reason": "error rate",
        "requested_by": "am",
        "dry_run": False,
        "created_at": "2024-05-01T12:00:00.123Z",
        "updated_at": "2024-05-01T12:00:02.123Z",
        "finished_at": "2024-05-01T12:00:02.123Z",
        "next_attempt_at": None,
        "error": {"code": "Forbidden", "message": "no permission"},
        "attempts": [
            {
                "number": 1,
                "action": "AbortAndRollbackChangeOrder",
                "started_at": "2024-05-01T12:00:00.123Z",
                "duration_ms": 41,
                "http_status": 403,
                "code": "Forbidden",
                "message": "no permission",
                "request_id": "req",
                "trace_id": "trace",
                "outcome": "failed",
            }
        ],
    }


def test_to_dict_shows_no_error_object_when_there_is_no_error() -> None:
    """``error`` is null for a job that never failed."""
    data = _job(status=JobStatus.QUEUED, error_code=None, error_message=None).to_dict()
    assert data["error"] is None
    assert data["attempts"] == []


def test_rfc3339_converts_to_utc_with_a_z() -> None:
    """Any aware datetime is rendered in UTC with millisecond precision and ``Z``."""
    plus8 = datetime(2024, 5, 1, 20, 0, 0, tzinfo=timezone(timedelta(hours=8)))
    assert rfc3339(plus8) == "2024-05-01T12:00:00.000Z"
    assert rfc3339(None) is None


def test_job_ids_are_uuid7_and_ordered_by_creation_time() -> None:
    """Ids are RFC 4122 UUIDs, version 7, whose text sorts by creation millisecond."""
    ids = [new_job_id() for _ in range(50)]
    assert len(set(ids)) == 50
    for job_id in ids:
        parsed = uuid.UUID(job_id)
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
    stamps = [int(i.replace("-", "")[:12], 16) for i in ids]
    assert stamps == sorted(stamps)
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    assert abs(stamps[-1] - now_ms) < 5_000


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"started_at": datetime(2024, 1, 1)}, "timezone"),
        ({"duration_ms": -1}, "duration_ms"),
        ({"duration_ms": 2**31}, "duration_ms"),
        ({"http_status": 42}, "http_status"),
        ({"action": ""}, "action"),
    ],
)
def test_an_attempt_with_out_of_range_values_is_refused(
    kwargs: dict[str, object], message: str
) -> None:
    """Bad attempt values fail at construction, never inside a shared database write."""
    base: dict[str, object] = {
        "action": "AbortAndRollbackChangeOrder",
        "started_at": T0,
        "duration_ms": 5,
        "outcome": AttemptOutcome.RETRY,
        "http_status": 400,
    }
    with pytest.raises(ValueError, match=message):
        AttemptIn(**{**base, **kwargs})  # type: ignore[arg-type]
