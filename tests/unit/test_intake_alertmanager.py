"""Unit tests of the alert parsers: Alertmanager v4, ARMS, Grafana, and fuzzed payloads."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.intake.alertmanager import (
    MAX_ALERTS,
    label_fingerprint,
    normalize_timestamp,
    parse_alertmanager,
)
from orchestrator.intake.grafana import is_grafana_payload, parse_webhook, values_text
from orchestrator.intake.schemas import Unprocessable

REGION = "cn-hangzhou"


def _alert(**overrides: Any) -> dict[str, Any]:
    alert: dict[str, Any] = {
        "status": "firing",
        "labels": {"alertname": "HighErrorRate", "sae_app_id": "demo-app"},
        "annotations": {"summary": "5xx above 5%"},
        "startsAt": "2024-05-01T10:00:00.123456789Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus/graph",
        "fingerprint": "586ab8ed57e58448",
    }
    alert.update(overrides)
    return alert


def _group(*alerts: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    group: dict[str, Any] = {
        "version": "4",
        "groupKey": '{}:{alertname="HighErrorRate"}',
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "sae-rollback",
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager",
        "alerts": list(alerts),
    }
    group.update(overrides)
    return group


def test_fingerprint_matches_alertmanager() -> None:
    """Computed fingerprints equal those a real Alertmanager 0.25 assigned to the same labels."""
    assert (
        label_fingerprint(
            {"alertname": "HighErrorRate", "sae_app_id": "demo-app", "severity": "critical"}
        )
        == "586ab8ed57e58448"
    )
    assert label_fingerprint({"alertname": "x"}) == "d240efc3896bf266"
    assert label_fingerprint({"a": "ü"}) == "ffd1cb2f240bec9b"
    assert label_fingerprint({"a": "ü", "b": ""}) == "ffd1cb2f240bec9b"  # empty = absent


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("2024-05-01T10:00:00Z", "2024-05-01T10:00:00Z"),
        ("2024-05-01T10:00:00.120000Z", "2024-05-01T10:00:00.12Z"),
        ("2024-05-01T12:00:00.123456789+02:00", "2024-05-01T10:00:00.123456789Z"),
        ("2024-05-01t10:00:00.000z", "2024-05-01T10:00:00Z"),
        ("2024-05-01T00:30:00-01:30", "2024-05-01T02:00:00Z"),
    ],
)
def test_start_times_are_normalized_to_utc(raw: str, normalized: str) -> None:
    """Equal instants written differently normalise to one string (nanoseconds kept)."""
    assert normalize_timestamp(raw) == normalized


@pytest.mark.parametrize(
    "raw",
    ["", "yesterday", "2024-05-01", "2024-13-01T00:00:00Z", "2024-05-01T24:00:00Z",
     "0001-01-01T00:00:00Z", "2024-05-01T10:00:00", "2024-05-01T10:00:00.1234567890Z"],
)  # fmt: skip
def test_invalid_or_zero_start_times_are_rejected(raw: str) -> None:
    """Unparsable times, times without a zone and Go's zero time are not start times."""
    assert normalize_timestamp(raw) is None


def test_firing_alert_with_app_label_becomes_a_target() -> None:
    """A firing alert naming sae_app_id yields one target keyed by fingerprint + startsAt."""
    parsed = parse_alertmanager(_group(_alert()), default_region=REGION)
    assert parsed.format == "alertmanager"
    [target] = parsed.firing
    assert (target.app_id, target.change_order_id, target.region) == ("demo-app", None, REGION)
    assert target.idempotency_key == "alert:586ab8ed57e58448:2024-05-01T10:00:00.123456789Z"
    assert target.reason == "alertmanager alert HighErrorRate firing: 5xx above 5%"
    assert target.requested_by == "alertmanager:sae-rollback"
    assert parsed.ignored == ()


def test_labels_win_over_annotations_and_annotations_fill_gaps() -> None:
    """Each target key is read from the labels first and from the annotations otherwise."""
    alert = _alert(
        labels={"alertname": "A", "sae_app_id": "from-label", "sae_change_order_id": " "},
        annotations={
            "sae_app_id": "from-annotation",
            "sae_change_order_id": "co-1",
            "sae_region": "cn-shanghai",
        },
    )
    [target] = parse_alertmanager(_group(alert), default_region=REGION).firing
    assert target.app_id == "from-label"
    assert target.change_order_id == "co-1"  # the blank label counts as absent
    assert target.region == "cn-shanghai"


def test_alert_without_target_is_ignored_with_reason() -> None:
    """An alert naming neither a change order nor an app is listed, not enqueued."""
    parsed = parse_alertmanager(
        _group(_alert(labels={"alertname": "Disk"}, fingerprint=None)), default_region=REGION
    )
    assert parsed.firing == ()
    [ignored] = parsed.ignored
    assert ignored.fingerprint == label_fingerprint({"alertname": "Disk"})
    assert "no target" in ignored.reason


def test_resolved_alerts_never_become_targets() -> None:
    """A resolved alert is returned as resolved (for cancellation), never as a target."""
    parsed = parse_alertmanager(
        _group(_alert(status="resolved", endsAt="2024-05-01T10:05:00Z"), status="resolved"),
        default_region=REGION,
    )
    assert parsed.firing == ()
    [resolved] = parsed.resolved
    assert resolved.idempotency_key == "alert:586ab8ed57e58448:2024-05-01T10:00:00.123456789Z"
    assert resolved.has_target
    [untargeted] = parse_alertmanager(
        _group(_alert(status="resolved", labels={"alertname": "Disk"})), default_region=REGION
    ).resolved
    assert not untargeted.has_target


def test_alert_status_wins_over_group_status() -> None:
    """Each alert's own status decides; the group's status is only a fallback."""
    still_firing = _alert()
    no_status = _alert(fingerprint="other")
    del no_status["status"]
    parsed = parse_alertmanager(
        _group(still_firing, no_status, status="resolved"), default_region=REGION
    )
    assert [t.fingerprint for t in parsed.firing] == ["586ab8ed57e58448"]
    assert [r.fingerprint for r in parsed.resolved] == ["other"]


@pytest.mark.parametrize(
    ("alert", "reason"),
    [
        ("not an alert", "not an object"),
        (_alert(labels={"sae_app_id": 5}), "labels/annotations"),
        (_alert(annotations=["x"]), "labels/annotations"),
        (_alert(status="pending"), "neither firing nor resolved"),
        (_alert(startsAt="soon"), "startsAt"),
        (_alert(startsAt=None), "startsAt"),
        (_alert(labels={"sae_app_id": "bad app/../x"}), "sae_app_id is not a valid"),
        (_alert(labels={"sae_change_order_id": "x" * 200}), "sae_change_order_id is not a valid"),
        (_alert(labels={"sae_app_id": "a", "sae_region": "evil.example.com/"}), "sae_region"),
    ],
)
def test_malformed_alerts_are_ignored_not_fatal(alert: Any, reason: str) -> None:
    """One bad alert is listed with its reason while the good one next to it still counts."""
    parsed = parse_alertmanager(_group(alert, _alert(fingerprint="good")), default_region=REGION)
    assert [t.fingerprint for t in parsed.firing] == ["good"]
    [ignored] = parsed.ignored
    assert reason in ignored.reason


@pytest.mark.parametrize(
    "payload",
    [[], "x", None, {"alerts": {}}, {"version": "3", "alerts": []}, {"version": 4, "alerts": []},
     {"no": "alerts"}],
)  # fmt: skip
def test_payloads_that_are_not_alert_groups_are_unprocessable(payload: Any) -> None:
    """Only a payload that is not an alert group at all is refused as a whole (422)."""
    with pytest.raises(Unprocessable):
        parse_webhook(payload, default_region=REGION)


def test_too_many_alerts_are_refused() -> None:
    """A delivery above MAX_ALERTS alerts is refused (use max_alerts on the sender)."""
    with pytest.raises(Unprocessable, match="max_alerts"):
        parse_webhook(_group(*([_alert()] * (MAX_ALERTS + 1))), default_region=REGION)


def test_arms_alert_uses_its_region_and_integration() -> None:
    """ARMS alerts fall back to _aliyun_arms_region_id and name the integration as requester."""
    alert = _alert(
        labels={
            "alertname": "ArmsHighRT",
            "sae_app_id": "demo-app",
            "_aliyun_arms_region_id": "cn-beijing",
            "_aliyun_arms_integration_name": "prod-sae",
            "_aliyun_arms_alert_level": "P2",
        },
        annotations={"_aliyun_arms_alert_message": "RT above 2s"},
    )
    parsed = parse_webhook(_group(alert), default_region=REGION)
    assert parsed.format == "arms"
    [target] = parsed.firing
    assert target.region == "cn-beijing"
    assert target.requested_by == "arms:prod-sae"
    assert target.reason.endswith("firing: RT above 2s")


def test_explicit_region_wins_over_arms_region() -> None:
    """sae_region, when given, is used instead of the ARMS region label."""
    alert = _alert(
        labels={
            "sae_app_id": "a",
            "sae_region": "cn-shenzhen",
            "_aliyun_arms_region_id": "cn-beijing",
        }
    )
    [target] = parse_webhook(_group(alert), default_region=REGION).firing
    assert target.region == "cn-shenzhen"


def test_grafana_payload_is_recognized_and_values_reach_the_reason() -> None:
    """A version "1" body is Grafana's; the triggering values are appended to the reason."""
    group = _group(
        _alert(values={"B": 44.2, "C": 1, "label": "x", "huge": 10**30}),
        version="1",
        orgId=1,
    )
    assert is_grafana_payload(group)
    parsed = parse_webhook(group, default_region=REGION)
    assert parsed.format == "grafana"
    [target] = parsed.firing
    assert target.reason.endswith("(B=44.2, C=1)")


def test_values_text_skips_non_numbers() -> None:
    """Only finite numbers are shown; nothing numeric gives no text at all."""
    assert values_text({"values": {"A": float("nan"), "B": True, "C": "1"}}) is None
    assert values_text({"values": "nope"}) is None


# -- fuzzing -------------------------------------------------------------------------------

_text = st.text(max_size=12)
_json_scalar = st.none() | st.booleans() | st.integers() | st.floats() | _text
_json = st.recursive(
    _json_scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)
_label_maps = st.dictionaries(
    st.sampled_from(["alertname", "sae_app_id", "sae_change_order_id", "sae_region",
                     "_aliyun_arms_region_id", "severity"]) | _text,
    st.sampled_from(["demo-app", "co-1", "cn-hangzhou", "", " "]) | _text | _json,
    max_size=5,
)  # fmt: skip
_alerts = st.fixed_dictionaries(
    {},
    optional={
        "status": st.sampled_from(["firing", "resolved", "pending"]) | _json,
        "labels": _label_maps | _json,
        "annotations": _label_maps | _json,
        "startsAt": st.sampled_from(["2024-05-01T10:00:00Z", "0001-01-01T00:00:00Z"])
        | _text
        | _json,
        "fingerprint": _text | _json,
        "values": st.dictionaries(_text, _json_scalar, max_size=3) | _json,
    },
)
_groups = st.fixed_dictionaries(
    {"alerts": st.lists(_alerts | _json, max_size=6)},
    optional={
        "version": st.sampled_from(["4", "1"]) | _json,
        "status": st.sampled_from(["firing", "resolved"]) | _json,
        "receiver": _text | _json,
        "truncatedAlerts": st.integers() | _json,
        "orgId": _json,
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=_groups | _json)
def test_generated_payloads_never_crash_the_parser(payload: Any) -> None:
    """Any JSON value is either refused with 422 or split completely into the three lists."""
    original = copy.deepcopy(payload)
    try:
        parsed = parse_webhook(payload, default_region=REGION)
    except Unprocessable:
        return
    finally:
        assert payload == original  # the parser never mutates what it was given
    alerts = payload["alerts"]
    assert len(parsed.firing) + len(parsed.resolved) + len(parsed.ignored) == len(alerts)
    for target in parsed.firing:
        assert target.app_id is not None or target.change_order_id is not None
        assert target.idempotency_key.startswith("alert:")
