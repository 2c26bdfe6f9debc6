"""Log redaction: secrets never reach either renderer."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog

from orchestrator.logging import REDACTED, configure_logging, get_logger, register_secrets

CANARY = "CANARY-s3cr3t-7f3a9b"


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    import logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    # configure_logging also installs a root handler and level: leave none behind.
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("json", [True, False])
def test_secrets_are_redacted_in_both_renderers(
    json: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """Secret keys, Authorization values, bearer tokens and registered values never print."""
    configure_logging(json=json, level="debug")
    register_secrets([CANARY])
    log = get_logger("test")
    log.info("with_secret_key", access_key_secret=CANARY, token=CANARY)
    log.info(
        "with_headers",
        headers={
            "Authorization": (
                f"ACS3-HMAC-SHA256 Credential=LTAI5x,SignedHeaders=host,Signature={'ab' * 32}"
            ),
            "x-acs-security-token": CANARY,
        },
    )
    log.info("with_text", detail=f"sent Authorization: Bearer {CANARY} to the API")
    log.info("with_registered_value", note=f"the value {CANARY} leaked into a message")
    try:
        raise ValueError(f"password={CANARY}")
    except ValueError:
        log.exception("with_exception")
    structlog.contextvars.bind_contextvars(hmac_secret=CANARY)
    log.info("with_context")
    out = capsys.readouterr()
    text = out.out + out.err
    assert CANARY not in text
    assert "ab" * 32 not in text
    assert text.count(REDACTED) >= 7
    assert "with_exception" in text


def test_non_secret_fields_are_kept(capsys: pytest.CaptureFixture[str]) -> None:
    """Ordinary data (ids, codes) passes through the redaction untouched."""
    configure_logging(json=True)
    get_logger().info("sae_call", request_id="91F9-ABC", code="Application.ChangerOrderRunning")
    err = capsys.readouterr().err
    assert '"request_id": "91F9-ABC"' in err
    assert '"code": "Application.ChangerOrderRunning"' in err


def test_loggers_created_before_configuration_are_redacted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A module-level logger made at import time still goes through the redaction processor."""
    early = get_logger("early")
    configure_logging(json=True)
    early.info("early_event", access_key_secret=CANARY)
    err = capsys.readouterr().err
    assert "early_event" in err
    assert CANARY not in err


@pytest.mark.parametrize("json", [True, False])
def test_library_logs_take_the_same_path_and_are_redacted(
    json: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """A standard-library record (aiohttp, asyncpg, the credentials chain) is one line in the
    same format, named by its logger, with secrets removed, its traceback included."""
    import logging

    configure_logging(json=json, level="info")
    library = logging.getLogger("aiohttp.server")
    library.info("chatty below WARNING")  # not shown at level info
    try:
        raise ValueError(f"bad header Authorization: Bearer {CANARY}")
    except ValueError:
        library.exception("Error handling request from %s", "127.0.0.1")
    err = capsys.readouterr().err
    assert CANARY not in err
    assert "chatty" not in err
    if json:
        import json as jsonlib

        [line] = err.strip().splitlines()
        record = jsonlib.loads(line)
        assert record["component"] == "aiohttp.server"
        assert record["event"] == "Error handling request from 127.0.0.1"
        assert record["level"] == "error"
        assert "ValueError" in record["exception"]
        assert REDACTED in record["exception"]
    else:
        assert "aiohttp.server" in err
        assert "Error handling request from 127.0.0.1" in err


@pytest.mark.parametrize(
    ("level", "shown"),
    [
        ("debug", {"debug", "info", "warning", "error"}),
        ("info", {"warning", "error"}),
        ("error", {"error"}),
    ],
)
def test_library_records_follow_the_level_but_stay_quiet_below_warning(
    level: str, shown: set[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Library INFO is noise unless debugging; --log-level error hides their warnings too."""
    import logging

    configure_logging(json=True, level=level)
    library = logging.getLogger("asyncpg.pool")
    for name in ("debug", "info", "warning", "error"):
        getattr(library, name)(f"record-{name}")
    err = capsys.readouterr().err
    assert {n for n in ("debug", "info", "warning", "error") if f"record-{n}" in err} == shown
