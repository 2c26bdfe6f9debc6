"""Unit tests of intake request validation and the per-source rate limits."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.config import parse_settings
from orchestrator.intake.ratelimit import InFlight, RateLimiter, RecentKeys
from orchestrator.intake.schemas import (
    BadRequest,
    Unprocessable,
    is_valid_region,
    parse_cancel_request,
    parse_idempotency_key,
    parse_list_query,
    parse_rollback_request,
    retry_after_header,
)
from orchestrator.jobs import JobStatus


def test_rollback_request_needs_a_target() -> None:
    """A body naming neither change_order_id nor app_id is refused with 422."""
    with pytest.raises(Unprocessable, match="one of change_order_id or app_id"):
        parse_rollback_request({"reason": "bad deploy"})


def test_rollback_request_keeps_every_field() -> None:
    """A valid body comes back field by field, optional text defaulting to empty."""
    request = parse_rollback_request(
        {"change_order_id": "co-1", "app_id": "app-1", "reason": "r", "region": "cn-shanghai"}
    )
    assert (request.change_order_id, request.app_id, request.reason) == ("co-1", "app-1", "r")
    assert (request.requested_by, request.region) == ("", "cn-shanghai")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ([], "JSON object"),
        ({"app_id": 5}, "must be a string"),
        ({"app_id": ""}, "app_id must be"),
        ({"app_id": "a/b"}, "app_id must be"),
        ({"app_id": "-a"}, "app_id must be"),
        ({"app_id": "a" * 129}, "at most 128"),
        ({"changeOrderId": "co-1"}, "unknown field(s): changeOrderId"),
        ({"app_id": "a", "reason": "x" * 1001}, "at most 1000"),
        ({"app_id": "a", "region": "sae.evil.com"}, "region must be"),
        ({"app_id": "a", "requested_by": ["me"]}, "must be a string"),
    ],
)
def test_invalid_rollback_requests_are_unprocessable(body: Any, fragment: str) -> None:
    """Wrong types, bad identifiers, oversized text and unknown fields are each refused."""
    with pytest.raises(Unprocessable) as info:
        parse_rollback_request(body)
    assert fragment in info.value.message


@pytest.mark.parametrize("region", ["cn-hangzhou", "ap-southeast-1", "cn-shanghai-finance-1"])
def test_real_region_ids_are_valid(region: str) -> None:
    """Alibaba Cloud region ids pass the region check."""
    assert is_valid_region(region)


@pytest.mark.parametrize("region", ["", "cn", "evil.com", "cn-hangzhou/x", "CN-HANGZHOU", "cn_x"])
def test_region_cannot_carry_a_host_or_path(region: str) -> None:
    """Anything that could change the SAE endpoint's host or path is not a region."""
    assert not is_valid_region(region)


def test_cancel_body_is_optional_and_strict() -> None:
    """No body means no reason; a body may only carry a string reason."""
    assert parse_cancel_request(None) is None
    assert parse_cancel_request({"reason": "false alarm"}) == "false alarm"
    with pytest.raises(Unprocessable):
        parse_cancel_request({"why": "x"})
    with pytest.raises(Unprocessable):
        parse_cancel_request("x")


@pytest.mark.parametrize("key", ["", "has space", "x" * 256, "ключ"])
def test_bad_idempotency_keys_are_bad_requests(key: str) -> None:
    """Idempotency keys must be 1-255 printable ASCII characters."""
    with pytest.raises(BadRequest):
        parse_idempotency_key(key)


def test_list_query_defaults_and_filters() -> None:
    """Without parameters the first 50 of everything; filters are parsed to their types."""
    default = parse_list_query({})
    assert (default.status, default.limit, default.cursor) == (None, 50, None)
    query = parse_list_query({"status": "queued", "app_id": "a", "limit": "1000", "source": "am"})
    assert (query.status, query.app_id, query.limit, query.source) == (
        JobStatus.QUEUED,
        "a",
        1000,
        "am",
    )


@pytest.mark.parametrize(
    "query",
    [
        {"status": "done"},
        {"limit": "0"},
        {"limit": "1001"},
        {"limit": "-1"},
        {"limit": "ten"},
        {"limit": "1e3"},
        {"app_id": "a b"},
        {"source": "a/b"},
        {"cursor": ""},
        {"sort": "asc"},
    ],
)
def test_bad_list_queries_are_bad_requests(query: dict[str, str]) -> None:
    """Unknown statuses, out-of-range limits, bad filters and unknown parameters give 400."""
    with pytest.raises(BadRequest):
        parse_list_query(query)


def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    """Retry-After rounds up and never invites an immediate retry."""
    assert retry_after_header(0.01) == {"Retry-After": "1"}
    assert retry_after_header(2.2) == {"Retry-After": "3"}


class Tick:
    """A settable monotonic clock."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_burst_then_rate() -> None:
    """A source gets `burst` requests at once, then `rate_per_s` per second."""
    settings = parse_settings(
        {
            "sources": {
                "am": {"kind": "alertmanager", "token": "t-0001", "rate_per_s": 2, "burst": 3}
            }
        }
    )
    tick = Tick()
    limiter = RateLimiter(settings.sources, clock=tick)
    assert [limiter.acquire("am") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.acquire("am")
    assert wait == pytest.approx(0.5)
    tick.now += 0.5
    assert limiter.acquire("am") == 0.0
    assert limiter.acquire("am") > 0
    tick.now += 100  # refills to the burst, not beyond
    assert [limiter.acquire("am") == 0.0 for _ in range(4)] == [True, True, True, False]


def test_sources_have_separate_buckets() -> None:
    """One source spending its tokens leaves another source's bucket untouched."""
    settings = parse_settings(
        {
            "sources": {
                "a": {"kind": "api", "token": "t-0001", "burst": 1},
                "b": {"kind": "api", "token": "t-0002", "burst": 1},
            }
        }
    )
    limiter = RateLimiter(settings.sources, clock=Tick())
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") > 0
    assert limiter.acquire("b") == 0.0


def test_in_flight_cap_sheds_beyond_the_limit() -> None:
    """Entering beyond the cap fails until a request leaves."""
    gate = InFlight(2)
    assert gate.try_enter()
    assert gate.try_enter()
    assert not gate.try_enter()
    gate.leave()
    assert gate.try_enter()
    with pytest.raises(ValueError, match="in-flight limit"):
        InFlight(0)


def test_recent_keys_expire_and_evict_the_least_recent() -> None:
    """Remembered keys expire after the TTL and the oldest go first beyond the bound."""
    tick = Tick()
    recent = RecentKeys(max_entries=2, ttl_s=10, clock=tick)
    recent.put("am", "k1", "job-1")
    recent.put("am", "k2", "job-2")
    assert recent.get("am", "k1") == "job-1"
    assert recent.get("other", "k1") is None  # keys are scoped by source
    recent.put("am", "k1", "job-1")  # refreshed: k2 is now the least recent
    recent.put("am", "k3", "job-3")
    assert (recent.get("am", "k2"), len(recent)) == (None, 2)
    tick.now += 11
    assert recent.get("am", "k1") is None
    assert recent.get("am", "k3") is None
