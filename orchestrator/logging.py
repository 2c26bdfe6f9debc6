"""Structured logging: structlog configured once by the CLI, secrets removed on the way out.

Event names are stable identifiers (``job_claimed``, ``sae_call``, ...) and data goes in
keys. Per-job context (``job_id``, ``change_order_id``, ...) is bound through contextvars by
the worker. The :func:`redact` processor runs last before rendering, so no renderer (JSON
or console) ever sees a secret, whichever component logged it.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, Final

import structlog

REDACTED: Final = "[REDACTED]"

# Keys whose values are secrets wherever they appear (compared case-insensitively, with
# '-' folded to '_', so both `Authorization` headers and `access_key_secret` fields match).
_SECRET_KEYS: Final = frozenset(
    {
        "authorization",
        "access_key_secret",
        "accesskeysecret",
        "alibaba_cloud_access_key_secret",
        "security_token",
        "securitytoken",
        "x_acs_security_token",
        "alibaba_cloud_security_token",
        "token",
        "bearer",
        "password",
        "secret",
        "hmac_secret",
        "x_grafana_alert_signature",
        "cookie",
    }
)

# Secret-shaped substrings inside free text: Authorization header values and
# `key=value` pairs naming a secret.
_TEXT_PATTERNS: Final = (
    (
        re.compile(r"(ACS3-HMAC-SHA256\s+Credential=)[^\s,]+(.*?Signature=)[0-9a-fA-F]+"),
        rf"\g<1>{REDACTED}\g<2>{REDACTED}",
    ),
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"), rf"\g<1>{REDACTED}"),
    (re.compile(r"(?i)(basic\s+)[A-Za-z0-9+/=]+"), rf"\g<1>{REDACTED}"),
    (
        re.compile(
            r"(?i)((?:access_?key_?secret|security_?token|password|hmac_?secret|secret|token)"
            r"[\"']?\s*[=:]\s*[\"']?)[^\s\"',;&]+"
        ),
        rf"\g<1>{REDACTED}",
    ),
)

_extra_secrets: set[str] = set()


def register_secrets(values: Iterable[str]) -> None:
    """Remember exact secret values (configured tokens, keys) to scrub from any log text."""
    _extra_secrets.update(v for v in values if v and len(v) >= 4)


def _scrub_text(text: str) -> str:
    for secret in _extra_secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    for pattern, replacement in _TEXT_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _scrub(value: Any, depth: int = 0) -> Any:
    if depth > 6:
        return value
    if isinstance(value, str):
        return _scrub_text(value)
    if isinstance(value, dict):
        return {
            k: (REDACTED if _is_secret_key(k) else _scrub(v, depth + 1)) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v, depth + 1) for v in value)
    return value


def _is_secret_key(key: object) -> bool:
    return isinstance(key, str) and key.lower().replace("-", "_") in _SECRET_KEYS


def redact(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: replace secret values in every key, nested value and text."""
    for key in list(event_dict):
        value = event_dict[key]
        if _is_secret_key(key):
            event_dict[key] = REDACTED
        elif isinstance(value, BaseException):
            event_dict[key] = _scrub_text(repr(value))
        else:
            event_dict[key] = _scrub(value)
    return event_dict


def _scrub_exception(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    exc = event_dict.get("exception")
    if isinstance(exc, str):
        event_dict["exception"] = _scrub_text(exc)
    return event_dict


def configure_logging(*, json: bool | None = None, level: str = "info") -> None:
    """Configure structlog for the process: JSON lines, or console output on a terminal."""
    use_json = (not sys.stderr.isatty()) if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    level_no = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.format_exc_info,
            _scrub_exception,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries log through the standard library (aiohttp's server and client, asyncpg, the
    # Alibaba credentials chain). Route them through the same processors: one line per
    # record in the same format, and the same redaction: an aiohttp error may quote a header.
    # They are chatty at INFO, so below WARNING only when debugging; --log-level error
    # silences their warnings too.
    handler = _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                _component_from_logger_name,
                timestamper,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                _scrub_exception,
                redact,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, _OURS, False):
            root.removeHandler(existing)
    setattr(handler, _OURS, True)
    root.addHandler(handler)
    root.setLevel(level_no if level_no <= logging.DEBUG else max(level_no, logging.WARNING))


# Marks the root handler configure_logging installed, so a second call replaces it.
_OURS: Final = "_sae_rollback_handler"


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler that writes to ``sys.stderr`` as it is at each record, not as it was at
    set-up (like structlog's own output; tests and embedders swap the stream)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        """StreamHandler.__init__ assigns the stream; there is nothing to keep."""


def _component_from_logger_name(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    record = event_dict.get("_record")
    if isinstance(record, logging.LogRecord):
        event_dict["component"] = record.name
    return event_dict


def get_logger(name: str | None = None) -> structlog.typing.FilteringBoundLogger:
    """A lazy bound logger; ``name`` becomes the ``component`` key.

    Lazy matters: module-level loggers are created at import time, before the CLI calls
    :func:`configure_logging`; a proxy picks up the configuration (and so the redaction
    processor) on first use instead of freezing the defaults.
    """
    logger: structlog.typing.FilteringBoundLogger = (
        structlog.get_logger(component=name) if name else structlog.get_logger()
    )
    return logger
