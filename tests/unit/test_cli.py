"""CLI exit codes: 2 for bad usage or config, with a one-line reason on stderr."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from orchestrator.cli import EXIT_USAGE, _build_parser, main


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def test_unknown_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown subcommand is a usage error."""
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == EXIT_USAGE
    assert "invalid choice" in capsys.readouterr().err


def test_missing_config_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command that needs a config and gets none says so and exits 2."""
    monkeypatch.delenv("SAE_ROLLBACK_CONFIG", raising=False)
    assert main(["migrate"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "no config file" in err
    assert "Traceback" not in err


def test_invalid_config_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A misspelt key is reported as one line naming it, never a traceback."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("[worker]\nconcurency = 4\n")
    assert main(["migrate", "--config", str(cfg)]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err == "sae-rollback: unknown key(s) in [worker]: concurency"


def test_config_from_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SAE_ROLLBACK_CONFIG stands in for --config."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("[server]\nport = 0\n")
    monkeypatch.setenv("SAE_ROLLBACK_CONFIG", str(cfg))
    assert main(["migrate"]) == EXIT_USAGE
    assert "port must be 1-65535" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["list"], ("auto", "info")),
        (["--log-format", "console", "list"], ("console", "info")),
        (["list", "--log-format", "json", "--log-level", "debug"], ("json", "debug")),
        (["--log-format", "console", "worker", "--log-format", "json"], ("json", "info")),
        (["--log-level", "warning", "simulate"], ("auto", "warning")),
    ],
)
def test_logging_options_on_either_side_of_the_command(
    argv: list[str], expected: tuple[str, str]
) -> None:
    """After the subcommand they override the ones before it; omitted, the top level's stay."""
    args = _build_parser().parse_args(argv)
    assert (args.log_format, args.log_level) == expected
