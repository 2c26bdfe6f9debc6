"""Injected faults: what ``POST /_sim/faults`` asks for, and which calls they hit.

A fault matches the next ``count`` signed API calls for its ``action`` (any action if unset) and,
optionally, one ``change_order_id``. Faults are consumed in the order they were posted. Modes:

``error``    answer ``http_status``/``code`` with a proper SAE or gateway error body
``hang``     never answer: hold the connection until the client gives up or the server stops
             (bounded by the server's ``hang_max_s``), then close it without a response
``reset``    close the connection without a response (TCP RST)
``garbage``  an HTML 502 page, as a proxy in front of the service would send
(none)       ``latency_ms`` alone: wait, then answer normally

``latency_ms`` also delays the other modes. With ``apply: true`` the call takes effect first
(an abort is accepted) and only its answer is replaced by the fault: the ambiguous outcome a
client must reconcile.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final

from orchestrator.simulator.state import ControlError, default_status

__all__ = ["FAULT_MODES", "Fault", "FaultBook", "parse_fault"]

FAULT_MODES: Final = ("error", "hang", "reset", "garbage")

_FIELDS: Final = frozenset(
    {
        "action",
        "change_order_id",
        "mode",
        "http_status",
        "code",
        "message",
        "count",
        "latency_ms",
        "apply",
        "retry_after_ms",
    }
)
# Codes an error fault gets when only a 5xx status is given.
_DEFAULT_5XX_CODES: Final = {500: "InternalError", 503: "ServiceUnavailable"}


@dataclass(slots=True, eq=False)
class Fault:
    """One posted fault and how many more calls it will hit."""

    action: str | None
    change_order_id: str | None
    mode: str | None  # None: latency only, then a normal answer
    http_status: int
    code: str | None
    message: str | None
    latency_s: float
    apply: bool
    remaining: int
    retry_after_ms: int | None

    def matches(self, action: str, change_order_id: str | None) -> bool:
        """Whether a call of ``action`` on ``change_order_id`` is hit by this fault."""
        return (self.action is None or self.action == action) and (
            self.change_order_id is None or self.change_order_id == change_order_id
        )

    def as_json(self) -> dict[str, Any]:
        """The control API's view of this fault."""
        return {
            "action": self.action,
            "change_order_id": self.change_order_id,
            "mode": self.mode,
            "http_status": self.http_status,
            "code": self.code,
            "message": self.message,
            "latency_ms": round(self.latency_s * 1000),
            "apply": self.apply,
            "remaining": self.remaining,
            "retry_after_ms": self.retry_after_ms,
        }


class FaultBook:
    """Posted faults, oldest first. ``take`` is O(1) when none are posted (the usual case)."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def __len__(self) -> int:
        return len(self._faults)

    def add(self, fault: Fault) -> None:
        """Queue ``fault`` behind the ones already posted."""
        self._faults.append(fault)

    def clear(self) -> None:
        """Drop every fault."""
        self._faults.clear()

    def take(self, action: str, change_order_id: str | None) -> Fault | None:
        """Consume one hit of the first fault matching this call, if any."""
        if not self._faults:
            return None
        for index, fault in enumerate(self._faults):
            if fault.matches(action, change_order_id):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    del self._faults[index]
                return fault
        return None

    def as_json(self) -> list[dict[str, Any]]:
        """Every pending fault."""
        return [fault.as_json() for fault in self._faults]


def _int(body: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    # bool is an int subclass in Python; `true` is not a count.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ControlError("InvalidParameter", f"{name} must be an integer in [{low}, {high}]")
    return value


def _str(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ControlError("InvalidParameter", f"{name} must be a non-empty string")
    return value


def parse_fault(body: object, actions: Collection[str]) -> Fault:
    """Validate a ``POST /_sim/faults`` body into a :class:`Fault`; :class:`ControlError` if bad.

    Unknown keys are rejected so a misspelt option cannot silently turn into a different fault.
    """
    if not isinstance(body, dict):
        raise ControlError("InvalidParameter", "the body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise ControlError("InvalidParameter", f"unknown field(s): {', '.join(unknown)}")
    action = _str(body, "action")
    if action is not None and action not in actions:
        raise ControlError(
            "InvalidParameter", f"action must be one of: {', '.join(sorted(actions))}"
        )
    mode = _str(body, "mode")
    if mode is not None and mode not in FAULT_MODES:
        raise ControlError("InvalidParameter", f"mode must be one of: {', '.join(FAULT_MODES)}")
    http_status = _int(body, "http_status", 200, 599)
    code = _str(body, "code")
    message = _str(body, "message")
    count = _int(body, "count", 1, 10_000_000)
    latency_ms = body.get("latency_ms")
    if latency_ms is not None and (
        isinstance(latency_ms, bool)
        or not isinstance(latency_ms, int | float)
        or not 0 <= latency_ms <= 600_000
    ):
        raise ControlError("InvalidParameter", "latency_ms must be a number in [0, 600000]")
    apply = body.get("apply", False)
    if not isinstance(apply, bool):
        raise ControlError("InvalidParameter", "apply must be a boolean")
    retry_after_ms = _int(body, "retry_after_ms", 0, 86_400_000)

    if mode is None and (http_status is not None or code is not None or latency_ms is None):
        mode = "error"  # a bare `{}` means "fail the next call" (503 ServiceUnavailable)
    if mode is None and apply:
        raise ControlError("InvalidParameter", "apply needs a mode: a latency-only call applies")

    status: int
    if mode == "error":
        if http_status is not None and http_status < 400:
            raise ControlError("InvalidParameter", "an error fault needs http_status >= 400")
        if code is None:
            if http_status is None:
                code, status = "ServiceUnavailable", 503
            elif http_status >= 500:
                code, status = _DEFAULT_5XX_CODES.get(http_status, "InternalError"), http_status
            else:
                raise ControlError("InvalidParameter", "a 4xx error fault needs a code")
        else:
            status = http_status or default_status(code) or 400
    else:
        status = http_status if http_status is not None else 502
    return Fault(
        action=action,
        change_order_id=_str(body, "change_order_id"),
        mode=mode,
        http_status=status,
        code=code,
        message=message,
        latency_s=float(latency_ms or 0) / 1000.0,
        apply=apply,
        remaining=count if count is not None else 1,
        retry_after_ms=retry_after_ms,
    )
