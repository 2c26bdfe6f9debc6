"""Grafana Alerting webhook deliveries (payload ``version: "1"``).

Grafana's body is the Alertmanager group format plus a few fields of its own (payloads.md
§3.2): ``orgId``, per-alert ``values`` (what triggered the state, e.g. ``{"B": 44.2}``),
``silenceURL``, ``dashboardURL``/``panelURL`` and the soon-deprecated ``title``/``state``/
``message``. The shared core in ``alertmanager.py`` does the parsing; this module only
recognises the format and adds the triggering values to each job's reason, which is what an
on-call engineer wants to see next to the rollback. Its HMAC signature is checked in
``auth.py`` before anything here runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

from orchestrator.intake.alertmanager import (
    GRAFANA_VERSION,
    ParsedWebhook,
    parse_alert_group,
    parse_alertmanager,
)

#: At most this many ``values`` entries are copied into a reason.
MAX_VALUES: Final = 8


def is_grafana_payload(payload: Any) -> bool:
    """Grafana's markers: ``version: "1"``, or ``orgId`` at the top (payloads.md §3.2)."""
    if not isinstance(payload, dict):
        return False
    return payload.get("version") == GRAFANA_VERSION or "orgId" in payload


def _format_value(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        # Huge integers would overflow float formatting (and Python's int→str limit).
        return str(value) if abs(value) < 10**21 else None
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}"
    return None


def values_text(alert: Mapping[str, Any]) -> str | None:
    """``"B=44.2, C=1"`` from an alert's ``values`` (numbers only; ``None`` if none)."""
    values = alert.get("values")
    if not isinstance(values, dict):
        return None
    parts: list[str] = []
    for name, value in values.items():
        shown = _format_value(value)
        if isinstance(name, str) and shown is not None:
            parts.append(f"{name[:40]}={shown}")
        if len(parts) == MAX_VALUES:
            break
    return ", ".join(parts) or None


def parse_grafana(payload: Any, *, default_region: str) -> ParsedWebhook:
    """A Grafana delivery: the shared core plus the triggering values in each reason."""
    return parse_alert_group(
        payload, default_region=default_region, fmt="grafana", reason_extra=values_text
    )


def parse_webhook(payload: Any, *, default_region: str) -> ParsedWebhook:
    """Either format, told apart by Grafana's markers (both share the core fields)."""
    if is_grafana_payload(payload):
        return parse_grafana(payload, default_region=default_region)
    return parse_alertmanager(payload, default_region=default_region)
