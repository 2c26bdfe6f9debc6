"""Alert payloads → rollback targets: Alertmanager v4 (and ARMS), plus the shared core.

Alertmanager's webhook body (version ``"4"``) and Grafana's (version ``"1"``) share every
field this service reads, so one parser handles both; ``grafana.py`` adds what is only
Grafana's. Alibaba Cloud ARMS sends the Alertmanager format with extra ``_aliyun_arms_*``
labels and annotations (payloads.md §3.3), handled here.

Per alert:

* **Target**: ``sae_change_order_id`` and/or ``sae_app_id``, optional ``sae_region`` — each
  looked up in the alert's labels first, then its annotations; empty values count as
  absent. Without ``sae_region`` an ARMS alert's ``_aliyun_arms_region_id`` is used, then
  the configured default region. Every value must match the identifier patterns of
  ``schemas.py`` (the region selects an SAE endpoint, so it can never carry a host).
* **Identity**: the alert's ``fingerprint`` plus its ``startsAt`` (normalised to UTC) form
  the idempotency key, so a re-send every ``repeat_interval`` and the same alert from both
  members of an HA pair map to one job, while a new episode (new ``startsAt``) is new. When
  a sender omits the fingerprint it is computed exactly as Alertmanager does
  (``model.LabelSet.Fingerprint``: FNV-1a 64 over the label names in byte order, each name
  and value followed by a 0xff byte, printed as 16 hex digits), so the same alert has the
  same identity whichever way it arrives (labels with empty values are left out, as
  Alertmanager drops them).
* **Status**: the alert's own ``status`` (``firing``/``resolved``), falling back to the
  group's. Resolved alerts never start a rollback.

Problems with one alert (no target, malformed labels, a bad id) put it in ``ignored`` with
the reason and never fail the delivery; only a payload that is not an alert group at all is
refused (422), because Alertmanager does not retry 4xx and one bad alert must not cost the
others their rollback.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final

from orchestrator.intake.schemas import (
    MAX_REASON_CHARS,
    MAX_REQUESTED_BY_CHARS,
    Unprocessable,
    is_valid_id,
    is_valid_region,
)

CHANGE_ORDER_KEY: Final = "sae_change_order_id"
APP_KEY: Final = "sae_app_id"
REGION_KEY: Final = "sae_region"
ARMS_PREFIX: Final = "_aliyun_arms_"
ARMS_REGION_KEY: Final = "_aliyun_arms_region_id"
ARMS_MESSAGE_KEY: Final = "_aliyun_arms_alert_message"
ARMS_INTEGRATION_KEY: Final = "_aliyun_arms_integration_name"

ALERTMANAGER_VERSION: Final = "4"
GRAFANA_VERSION: Final = "1"
#: Alerts per delivery; beyond it the sender should use ``max_alerts`` (Alertmanager) or
#: ``maxAlerts`` (Grafana). Bounds the store writes one request can cause.
MAX_ALERTS: Final = 1000

_FNV_OFFSET: Final = 0xCBF29CE484222325
_FNV_PRIME: Final = 0x100000001B3
_MASK64: Final = 0xFFFFFFFFFFFFFFFF
_SEPARATOR: Final = 0xFF

_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})$"
)


def label_fingerprint(labels: Mapping[str, str]) -> str:
    """Alertmanager's fingerprint of a label set (``model.LabelSet.Fingerprint``)."""
    value = _FNV_OFFSET
    # An empty label value means "no such label" in Prometheus; Alertmanager drops them.
    for name in sorted(n for n, v in labels.items() if v):
        for part in (name, labels[name]):
            for byte in part.encode("utf-8", "surrogatepass"):
                value = ((value ^ byte) * _FNV_PRIME) & _MASK64
            value = ((value ^ _SEPARATOR) * _FNV_PRIME) & _MASK64
    return f"{value:016x}"


def normalize_timestamp(text: str) -> str | None:
    """An RFC 3339 time as UTC ``YYYY-MM-DDTHH:MM:SS[.fraction]Z`` (``None``: invalid/zero).

    Fractions keep every digit sent (up to nanoseconds, as Go prints them) minus trailing
    zeros, so equal instants written with different offsets or padding compare equal.
    Go's zero time (``0001-01-01T00:00:00Z``) is not a start time and counts as invalid.
    """
    match = _RFC3339.fullmatch(text.strip())
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        if zone in ("Z", "z"):
            tz = UTC
        else:
            sign = 1 if zone[0] == "+" else -1
            offset = timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
            tz = timezone(sign * offset)
        moment = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=tz
        ).astimezone(UTC)
    except (ValueError, OverflowError):
        return None
    if moment.year <= 1:
        return None
    digits = (fraction or "").rstrip("0")
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + (f".{digits}" if digits else "") + "Z"


@dataclass(frozen=True, slots=True)
class AlertTarget:
    """A firing alert that names something to roll back."""

    index: int
    fingerprint: str
    starts_at: str
    change_order_id: str | None
    app_id: str | None
    region: str
    reason: str
    requested_by: str

    @property
    def idempotency_key(self) -> str:
        """``alert:<fingerprint>:<startsAt>``: one job per alert episode (scoped by source)."""
        return alert_key(self.fingerprint, self.starts_at)


@dataclass(frozen=True, slots=True)
class ResolvedAlert:
    """A resolved alert: never a rollback; may cancel the job its firing episode created."""

    index: int
    fingerprint: str
    starts_at: str
    #: Whether it names a change order or app (without one, its firing made no job either).
    has_target: bool = True

    @property
    def idempotency_key(self) -> str:
        """The key its firing episode was accepted under."""
        return alert_key(self.fingerprint, self.starts_at)


@dataclass(frozen=True, slots=True)
class IgnoredAlert:
    """An alert that starts nothing, with the reason (part of the webhook response)."""

    index: int
    fingerprint: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """``{"fingerprint", "reason"}`` as listed in the response's ``ignored``."""
        return {"fingerprint": self.fingerprint, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class ParsedWebhook:
    """One delivery, split into what to enqueue, what may cancel, and what to ignore."""

    format: str
    firing: tuple[AlertTarget, ...]
    resolved: tuple[ResolvedAlert, ...]
    ignored: tuple[IgnoredAlert, ...]
    truncated_alerts: int
    receiver: str | None


def alert_key(fingerprint: str, starts_at: str) -> str:
    """The idempotency key of an alert episode."""
    return f"alert:{fingerprint}:{starts_at}"


#: Extra reason text for one alert (Grafana adds its ``values``), or ``None``.
ReasonExtra = Callable[[Mapping[str, Any]], str | None]


def _string_map(value: Any) -> dict[str, str] | None:
    """``value`` if it is a JSON object of strings to strings (``None`` when absent)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return None
    return value


def _lookup(labels: Mapping[str, str], annotations: Mapping[str, str], key: str) -> str | None:
    """Labels first, then annotations; blank values count as absent."""
    for source in (labels, annotations):
        value = source.get(key, "").strip()
        if value:
            return value
    return None


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _reason(
    fmt: str,
    labels: Mapping[str, str],
    annotations: Mapping[str, str],
    extra: str | None,
) -> str:
    name = labels.get("alertname", "").strip() or "unnamed alert"
    summary = (
        annotations.get("summary")
        or annotations.get("description")
        or annotations.get(ARMS_MESSAGE_KEY)
        or ""
    ).strip()
    text = f"{fmt} alert {name} firing"
    if summary:
        text += f": {summary}"
    if extra:
        text += f" ({extra})"
    return _truncate(text, MAX_REASON_CHARS)


def _requested_by(fmt: str, receiver: str | None, labels: Mapping[str, str]) -> str:
    via = labels.get(ARMS_INTEGRATION_KEY, "").strip()
    who = f"arms:{via}" if via else (f"{fmt}:{receiver}" if receiver else fmt)
    return _truncate(who, MAX_REQUESTED_BY_CHARS)


def _status(alert: Mapping[str, Any], group_status: Any) -> str | None:
    """The alert's own status; the group's only when the alert carries none at all."""
    status = alert.get("status")
    if status is None:
        status = group_status
    return str(status) if status in ("firing", "resolved") else None


def parse_alert_group(
    payload: Any,
    *,
    default_region: str,
    fmt: str,
    reason_extra: ReasonExtra | None = None,
) -> ParsedWebhook:
    """Split an Alertmanager/Grafana group into targets, resolved alerts and ignored ones.

    Raises :class:`Unprocessable` only when ``payload`` is not an alert group at all (not an
    object, no ``alerts`` list, an unknown ``version``, too many alerts).
    """
    if not isinstance(payload, dict):
        raise Unprocessable("the body must be a JSON object (an alert group)")
    version = payload.get("version")
    if "version" in payload and version not in (ALERTMANAGER_VERSION, GRAFANA_VERSION):
        raise Unprocessable(
            f'unsupported payload version {version!r}: expected "4" (Alertmanager, ARMS) '
            'or "1" (Grafana)',
            code="unsupported_version",
        )
    alerts = payload.get("alerts")
    if not isinstance(alerts, list):
        raise Unprocessable("alerts must be a list")
    if len(alerts) > MAX_ALERTS:
        raise Unprocessable(
            f"{len(alerts)} alerts in one delivery; at most {MAX_ALERTS} "
            "(set max_alerts / maxAlerts on the sender)"
        )
    receiver = payload.get("receiver")
    receiver = (receiver.strip() or None) if isinstance(receiver, str) else None
    truncated = payload.get("truncatedAlerts")
    truncated_alerts = truncated if isinstance(truncated, int) and truncated > 0 else 0
    group_status = payload.get("status")

    firing: list[AlertTarget] = []
    resolved: list[ResolvedAlert] = []
    ignored: list[IgnoredAlert] = []
    for index, alert in enumerate(alerts):
        if not isinstance(alert, dict):
            ignored.append(IgnoredAlert(index, None, "malformed alert: not an object"))
            continue
        labels = _string_map(alert.get("labels"))
        annotations = _string_map(alert.get("annotations"))
        if labels is None or annotations is None:
            ignored.append(
                IgnoredAlert(
                    index, None, "malformed alert: labels/annotations must map strings to strings"
                )
            )
            continue
        raw_fp = alert.get("fingerprint")
        if isinstance(raw_fp, str) and raw_fp.strip():
            fingerprint = _truncate(raw_fp.strip(), 128)
        else:
            fingerprint = label_fingerprint(labels)
        status = _status(alert, group_status)
        if status is None:
            ignored.append(
                IgnoredAlert(index, fingerprint, "status is neither firing nor resolved")
            )
            continue
        raw_start = alert.get("startsAt")
        starts_at = normalize_timestamp(raw_start) if isinstance(raw_start, str) else None
        if starts_at is None:
            ignored.append(
                IgnoredAlert(index, fingerprint, "startsAt is missing or not an RFC 3339 time")
            )
            continue
        if status == "resolved":
            has_target = any(
                _lookup(labels, annotations, key) is not None for key in (CHANGE_ORDER_KEY, APP_KEY)
            )
            resolved.append(ResolvedAlert(index, fingerprint, starts_at, has_target))
            continue
        target = _target(
            index,
            fingerprint,
            starts_at,
            labels,
            annotations,
            default_region=default_region,
            fmt=fmt,
            receiver=receiver,
            extra=reason_extra(alert) if reason_extra is not None else None,
        )
        if isinstance(target, IgnoredAlert):
            ignored.append(target)
        else:
            firing.append(target)
    return ParsedWebhook(
        format=fmt,
        firing=tuple(firing),
        resolved=tuple(resolved),
        ignored=tuple(ignored),
        truncated_alerts=truncated_alerts,
        receiver=receiver,
    )


def _target(
    index: int,
    fingerprint: str,
    starts_at: str,
    labels: Mapping[str, str],
    annotations: Mapping[str, str],
    *,
    default_region: str,
    fmt: str,
    receiver: str | None,
    extra: str | None,
) -> AlertTarget | IgnoredAlert:
    change_order_id = _lookup(labels, annotations, CHANGE_ORDER_KEY)
    app_id = _lookup(labels, annotations, APP_KEY)
    if change_order_id is None and app_id is None:
        return IgnoredAlert(
            index, fingerprint, f"no target: neither {CHANGE_ORDER_KEY} nor {APP_KEY} is set"
        )
    for key, value in ((CHANGE_ORDER_KEY, change_order_id), (APP_KEY, app_id)):
        if value is not None and not is_valid_id(value):
            return IgnoredAlert(index, fingerprint, f"{key} is not a valid identifier")
    region = _lookup(labels, annotations, REGION_KEY)
    if region is not None and not is_valid_region(region):
        return IgnoredAlert(index, fingerprint, f"{REGION_KEY} is not a valid region id")
    if region is None:
        arms_region = labels.get(ARMS_REGION_KEY, "").strip()
        region = arms_region if arms_region and is_valid_region(arms_region) else default_region
    return AlertTarget(
        index=index,
        fingerprint=fingerprint,
        starts_at=starts_at,
        change_order_id=change_order_id,
        app_id=app_id,
        region=region,
        reason=_reason(fmt, labels, annotations, extra),
        requested_by=_requested_by(fmt, receiver, labels),
    )


def parse_alertmanager(payload: Any, *, default_region: str) -> ParsedWebhook:
    """An Alertmanager (or ARMS ``$alertmanager_content``) delivery."""
    fmt = "arms" if _mentions_arms(payload) else "alertmanager"
    return parse_alert_group(payload, default_region=default_region, fmt=fmt)


def _mentions_arms(payload: Any) -> bool:
    """Whether any alert carries ARMS's own labels (only used to describe the sender)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("alerts"), list):
        return False
    for alert in payload["alerts"][:MAX_ALERTS]:
        labels = alert.get("labels") if isinstance(alert, dict) else None
        if isinstance(labels, dict) and any(
            isinstance(k, str) and k.startswith(ARMS_PREFIX) for k in labels
        ):
            return True
    return False
