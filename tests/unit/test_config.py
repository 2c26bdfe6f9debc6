"""Configuration: defaults, validation, env overrides, secrets from files."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import Secret, load_settings, parse_settings
from orchestrator.errors import ConfigError

API_SOURCE = {"sources": {"bot": {"kind": "api", "token": "t0ken-value"}}}


def test_defaults_match_the_contract() -> None:
    """An empty config yields the defaults documented in contract.md."""
    s = parse_settings({})
    assert (s.server.host, s.server.port, s.server.max_body_bytes) == ("127.0.0.1", 8080, 1048576)
    assert s.store.url == "sqlite:///var/sae-rollback.db"
    assert (s.sae.region, s.sae.endpoint, s.sae.protocol, s.sae.api_style) == (
        "cn-hangzhou",
        "",
        "https",
        "current",
    )
    assert (s.sae.connect_timeout_s, s.sae.read_timeout_s, s.sae.calls_per_minute) == (5, 10, 60)
    assert (s.retry.initial_s, s.retry.max_interval_s, s.retry.max_elapsed_s) == (1, 30, 1800)
    assert (s.worker.concurrency, s.worker.lease_s) == (16, 30)
    assert (s.verify.enabled, s.verify.poll_interval_s, s.verify.timeout_s) == (True, 5, 1800)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"retry": {"max_elapsed": 5}}, "unknown key(s) in [retry]: max_elapsed"),
        ({"serverr": {}}, "unknown config section(s): serverr"),
        ({"server": {"port": "8080"}}, "[server] port must be an integer"),
        ({"server": {"port": 70000}}, "port must be 1-65535"),
        ({"worker": {"concurrency": 0}}, "[worker] concurrency must be greater than 0"),
        ({"verify": {"enabled": "yes"}}, "[verify] enabled must be true or false"),
        ({"sae": {"api_style": "v5"}}, "[sae] api_style must be one of"),
        ({"sae": {"endpoint": "http://127.0.0.1:1"}}, "without a scheme"),
        ({"store": {"url": "mysql://x"}}, "[store] url must start with"),
        ({"retry": {"initial_s": 10, "max_interval_s": 5}}, "max_interval_s must be >= initial_s"),
        ({"sources": {"x": {"kind": "slack", "token": "t"}}}, "kind must be one of"),
        ({"sources": {"x": {"kind": "api"}}}, "has no credentials"),
        ({"sources": {"x": {"kind": "api", "tokn": "t"}}}, "unknown key(s) in [sources.x]: tokn"),
        ({"sources": {"x": {"kind": "api", "username": "u"}}}, "needs both username and password"),
        (
            {"sources": {"x": {"kind": "api", "token": "t", "allowed_apps": "app"}}},
            "allowed_apps must be a list",
        ),
        ({"sources": {"a b": {"kind": "api", "token": "t"}}}, "source names may only use"),
    ],
)
def test_invalid_config_is_rejected_with_the_key_named(
    raw: dict[str, object], fragment: str
) -> None:
    """Every invalid or unknown key raises ConfigError naming what is wrong."""
    with pytest.raises(ConfigError) as info:
        parse_settings(raw)
    assert fragment in str(info.value)


def test_env_overrides_file_values() -> None:
    """SAE_ROLLBACK_<SECTION>_<KEY> beats the file and is type-checked."""
    env = {"SAE_ROLLBACK_STORE_URL": "postgresql://db/x", "SAE_ROLLBACK_WORKER_CONCURRENCY": "3"}
    s = parse_settings({"store": {"url": "sqlite:///a.db"}}, env=env)
    assert s.store.url == "postgresql://db/x"
    assert s.worker.concurrency == 3
    with pytest.raises(ConfigError, match="SAE_ROLLBACK_WORKER_CONCURRENCY must be an integer"):
        parse_settings({}, env={"SAE_ROLLBACK_WORKER_CONCURRENCY": "many"})


def test_misspelt_env_override_is_an_error_and_other_variables_are_not() -> None:
    """SAE_ROLLBACK_<SECTION>_<typo> is refused like a misspelt key; the CLI's own variables
    (SAE_ROLLBACK_SERVER, _TOKEN, _CONFIG) and the test/bench ones are not config keys."""
    with pytest.raises(ConfigError) as info:
        parse_settings({}, env={"SAE_ROLLBACK_WORKER_CONCURENCY": "4"})
    assert str(info.value) == (
        "unknown environment override(s) for [worker]: SAE_ROLLBACK_WORKER_CONCURENCY"
    )
    others = {
        "SAE_ROLLBACK_SERVER": "http://127.0.0.1:8080",
        "SAE_ROLLBACK_TOKEN": "t",
        "SAE_ROLLBACK_CONFIG": "c.toml",
        "SAE_ROLLBACK_TEST_PG_DSN": "postgresql://x",
        "SAE_ROLLBACK_REQUIRE_PG": "1",
        "SAE_ROLLBACK_SERVER_PORT": "9000",
    }
    assert parse_settings({}, env=others).server.port == 9000


def test_secrets_load_from_files_relative_to_the_config(tmp_path: Path) -> None:
    """token_file is read relative to the config file and trimmed; the value never shows in repr."""
    (tmp_path / "am.token").write_text("s3cret-token\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[sources.am]\nkind = "alertmanager"\ntoken_file = "am.token"\n')
    s = load_settings(cfg, env={})
    token = s.sources["am"].token
    assert token == Secret("s3cret-token")
    assert "s3cret-token" not in repr(s)
    assert "s3cret-token" not in str(s.sources["am"])


def test_missing_secret_file_is_a_config_error(tmp_path: Path) -> None:
    """A token_file that cannot be read is reported with its path."""
    with pytest.raises(ConfigError, match="token_file: cannot read"):
        parse_settings(
            {"sources": {"am": {"kind": "alertmanager", "token_file": "nope"}}}, base_dir=tmp_path
        )


def test_unreadable_or_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    """A missing file or broken TOML is a ConfigError, not a traceback."""
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nport=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad)


def test_allowed_apps_star_allows_everything() -> None:
    """A source with ["*"] may roll back any app; otherwise only the listed ones."""
    s = parse_settings(API_SOURCE)
    assert s.sources["bot"].allows_app("anything")
    narrow = parse_settings(
        {"sources": {"b": {"kind": "api", "token": "t", "allowed_apps": ["app-1"]}}}
    )
    assert narrow.sources["b"].allows_app("app-1")
    assert not narrow.sources["b"].allows_app("app-2")
    assert not narrow.sources["b"].allows_app(None)


@pytest.mark.parametrize("name", ["local.toml", "example.toml"])
def test_shipped_configs_parse(name: str) -> None:
    """The config files shipped in config/ are valid."""
    path = Path(__file__).resolve().parents[2] / "config" / name
    load_settings(path, env={})
