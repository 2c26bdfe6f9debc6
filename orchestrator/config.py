"""Configuration: one TOML file plus environment overrides, read once into frozen Settings.

This is the only module that reads the environment (besides the Alibaba credentials chain,
which the credentials package reads on its own). Components receive plain values taken
from :class:`Settings` by the composition root, never the Settings object itself.

Rules:

* Unknown sections or keys are a :class:`~orchestrator.errors.ConfigError`, not ignored:
  a misspelt ``max_elapsed_s`` must not silently fall back to its default.
* Every scalar key can be overridden by ``SAE_ROLLBACK_<SECTION>_<KEY>`` (upper case),
  e.g. ``SAE_ROLLBACK_STORE_URL`` or ``SAE_ROLLBACK_WORKER_CONCURRENCY``.
* Secrets (tokens, passwords, HMAC secrets) may be given inline or as ``*_file`` paths;
  they are wrapped in :class:`Secret`, whose ``repr`` never shows the value.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

from orchestrator.errors import ConfigError

ENV_PREFIX: Final = "SAE_ROLLBACK_"
SOURCE_KINDS: Final = frozenset({"alertmanager", "grafana", "api"})
API_STYLES: Final = frozenset({"current", "legacy-v5"})
SIMULATOR_ENDPOINT: Final = "simulator"


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret string that never shows itself in ``repr``/``str`` (and so never in logs)."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self.value)


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 1_048_576
    shutdown_grace_s: float = 25.0


@dataclass(frozen=True, slots=True)
class StoreSettings:
    url: str = "sqlite:///var/sae-rollback.db"
    retention_days: float = 30.0


@dataclass(frozen=True, slots=True)
class SaeSettings:
    region: str = "cn-hangzhou"
    endpoint: str = ""
    protocol: str = "https"
    api_style: str = "current"
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    calls_per_minute: float = 60.0

    @property
    def uses_builtin_simulator(self) -> bool:
        return self.endpoint == SIMULATOR_ENDPOINT


@dataclass(frozen=True, slots=True)
class RetrySettings:
    initial_s: float = 1.0
    max_interval_s: float = 30.0
    max_elapsed_s: float = 1800.0


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    concurrency: int = 16
    lease_s: float = 30.0
    max_attempts: int = 10
    drain_grace_s: float = 20.0
    breaker_failures: int = 5
    breaker_open_s: float = 10.0


@dataclass(frozen=True, slots=True)
class VerifySettings:
    enabled: bool = True
    poll_interval_s: float = 5.0
    timeout_s: float = 1800.0


@dataclass(frozen=True, slots=True)
class SourceSettings:
    """One caller of the intake API: how it authenticates and what it may roll back."""

    name: str
    kind: str
    token: Secret | None = None
    username: str | None = None
    password: Secret | None = None
    hmac_secret: Secret | None = None
    allowed_apps: tuple[str, ...] = ("*",)
    dry_run: bool = False
    cancel_on_resolved: bool = False
    rate_per_s: float = 50.0
    burst: int = 200

    def allows_app(self, app_id: str | None) -> bool:
        """Whether this source may roll back ``app_id`` (``None``: not known yet)."""
        if "*" in self.allowed_apps:
            return True
        return app_id is not None and app_id in self.allowed_apps


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = ServerSettings()
    store: StoreSettings = StoreSettings()
    sae: SaeSettings = SaeSettings()
    retry: RetrySettings = RetrySettings()
    worker: WorkerSettings = WorkerSettings()
    verify: VerifySettings = VerifySettings()
    sources: Mapping[str, SourceSettings] = field(default_factory=dict)


_SECTIONS: Final[dict[str, type[Any]]] = {
    "server": ServerSettings,
    "store": StoreSettings,
    "sae": SaeSettings,
    "retry": RetrySettings,
    "worker": WorkerSettings,
    "verify": VerifySettings,
}


def load_settings(
    path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None
) -> Settings:
    """Read ``path`` (TOML; ``None`` = defaults only), apply env overrides, validate."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        file = Path(path)
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {file}") from exc
        except OSError as exc:
            raise ConfigError(f"cannot read config file {file}: {exc.strerror}") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {file} is not valid TOML: {exc}") from exc
        base = file.resolve().parent
    return parse_settings(raw, env=env, base_dir=base)


def parse_settings(
    raw: Mapping[str, Any], *, env: Mapping[str, str] | None = None, base_dir: Path | None = None
) -> Settings:
    """Build Settings from an already-parsed TOML mapping (plus env overrides)."""
    env = {} if env is None else env
    base_dir = Path.cwd() if base_dir is None else base_dir
    unknown = set(raw) - set(_SECTIONS) - {"sources"}
    if unknown:
        raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}")
    built: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        table = raw.get(section, {})
        if not isinstance(table, Mapping):
            raise ConfigError(f"[{section}] must be a table")
        built[section] = _build_section(section, cls, table, env)
    built["sources"] = _build_sources(raw.get("sources", {}), env, base_dir)
    settings = Settings(**built)
    _validate(settings)
    return settings


def _build_section(
    section: str, cls: type[Any], table: Mapping[str, Any], env: Mapping[str, str]
) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = set(table) - set(known)
    if unknown:
        raise ConfigError(f"unknown key(s) in [{section}]: {', '.join(sorted(unknown))}")
    # A misspelt override is an error like a misspelt key, not silently ignored.
    env_prefix = f"{ENV_PREFIX}{section}_".upper()
    known_env = {f"{env_prefix}{name}".upper() for name in known}
    unknown_env = sorted(k for k in env if k.startswith(env_prefix) and k not in known_env)
    if unknown_env:
        raise ConfigError(
            f"unknown environment override(s) for [{section}]: {', '.join(unknown_env)}"
        )
    values: dict[str, Any] = {}
    for name, f in known.items():
        default = f.default
        env_key = f"{ENV_PREFIX}{section}_{name}".upper()
        where = f"[{section}] {name}"
        if env_key in env:
            values[name] = _from_env(env[env_key], default, f"{env_key}")
        elif name in table:
            values[name] = _coerce(table[name], default, where)
    return cls(**values)


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Check a TOML value against the type of its default; ints are accepted for floats."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be finite, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported value {value!r}")  # pragma: no cover


def _from_env(text: str, default: Any, where: str) -> Any:
    if isinstance(default, bool):
        lowered = text.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{where} must be true or false, got {text!r}")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{where} must be an integer, got {text!r}") from None
    if isinstance(default, float):
        try:
            number = float(text)
        except ValueError:
            raise ConfigError(f"{where} must be a number, got {text!r}") from None
        return _coerce(number, default, where)
    return text


_SOURCE_KEYS: Final = frozenset(
    {
        "kind",
        "token",
        "token_file",
        "username",
        "password",
        "password_file",
        "hmac_secret",
        "hmac_secret_file",
        "allowed_apps",
        "dry_run",
        "cancel_on_resolved",
        "rate_per_s",
        "burst",
    }
)


def _build_sources(raw: Any, env: Mapping[str, str], base_dir: Path) -> dict[str, SourceSettings]:
    if not isinstance(raw, Mapping):
        raise ConfigError("[sources] must contain tables like [sources.NAME]")
    sources: dict[str, SourceSettings] = {}
    for name, table in raw.items():
        where = f"[sources.{name}]"
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where} must be a table")
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise ConfigError(f"{where}: source names may only use letters, digits, '-' and '_'")
        unknown = set(table) - _SOURCE_KEYS
        if unknown:
            raise ConfigError(f"unknown key(s) in {where}: {', '.join(sorted(unknown))}")
        kind = table.get("kind")
        if kind not in SOURCE_KINDS:
            raise ConfigError(f"{where} kind must be one of {sorted(SOURCE_KINDS)}, got {kind!r}")
        env_name = name.upper().replace("-", "_")
        token = _secret(
            table, "token", where, base_dir, env.get(f"{ENV_PREFIX}SOURCE_{env_name}_TOKEN")
        )
        password = _secret(table, "password", where, base_dir, None)
        hmac_secret = _secret(
            table,
            "hmac_secret",
            where,
            base_dir,
            env.get(f"{ENV_PREFIX}SOURCE_{env_name}_HMAC_SECRET"),
        )
        username = table.get("username")
        if username is not None and not isinstance(username, str):
            raise ConfigError(f"{where} username must be a string")
        if (username is None) != (password is None):
            raise ConfigError(f"{where}: basic auth needs both username and password")
        if token is None and password is None and hmac_secret is None:
            raise ConfigError(
                f"{where} has no credentials: set token/token_file, username+password, "
                "or hmac_secret/hmac_secret_file"
            )
        apps = table.get("allowed_apps", ["*"])
        if not isinstance(apps, list) or not all(isinstance(a, str) and a for a in apps):
            raise ConfigError(f'{where} allowed_apps must be a list of app ids (or ["*"])')
        defaults = SourceSettings(name=name, kind=kind)
        sources[name] = SourceSettings(
            name=name,
            kind=kind,
            token=token,
            username=username,
            password=password,
            hmac_secret=hmac_secret,
            allowed_apps=tuple(apps),
            dry_run=_coerce(table.get("dry_run", False), False, f"{where} dry_run"),
            cancel_on_resolved=_coerce(
                table.get("cancel_on_resolved", False), False, f"{where} cancel_on_resolved"
            ),
            rate_per_s=_coerce(
                table.get("rate_per_s", defaults.rate_per_s), 0.0, f"{where} rate_per_s"
            ),
            burst=_coerce(table.get("burst", defaults.burst), 0, f"{where} burst"),
        )
    return sources


def _secret(
    table: Mapping[str, Any], key: str, where: str, base_dir: Path, env_value: str | None
) -> Secret | None:
    """A secret from the environment, inline, or ``<key>_file`` (first line, trimmed)."""
    if env_value:
        return Secret(env_value)
    inline, file_key = table.get(key), f"{key}_file"
    path = table.get(file_key)
    if inline is not None and path is not None:
        raise ConfigError(f"{where}: set {key} or {file_key}, not both")
    if inline is not None:
        if not isinstance(inline, str) or not inline:
            raise ConfigError(f"{where} {key} must be a non-empty string")
        return Secret(inline)
    if path is None:
        return None
    if not isinstance(path, str):
        raise ConfigError(f"{where} {file_key} must be a path string")
    file = Path(path) if Path(path).is_absolute() else base_dir / path
    try:
        value = file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{where} {file_key}: cannot read {file}: {exc.strerror}") from exc
    if not value:
        raise ConfigError(f"{where} {file_key}: {file} is empty")
    return Secret(value)


def _validate(s: Settings) -> None:
    def positive(value: float, where: str) -> None:
        if value <= 0:
            raise ConfigError(f"{where} must be greater than 0, got {value}")

    if not 0 < s.server.port < 65536:
        raise ConfigError(f"[server] port must be 1-65535, got {s.server.port}")
    positive(s.server.max_body_bytes, "[server] max_body_bytes")
    positive(s.server.shutdown_grace_s, "[server] shutdown_grace_s")
    if not s.store.url.startswith(("sqlite://", "postgresql://", "postgres://")):
        raise ConfigError(
            "[store] url must start with sqlite://, postgresql:// or postgres://, "
            f"got {s.store.url!r}"
        )
    positive(s.store.retention_days, "[store] retention_days")
    if s.sae.protocol not in {"http", "https"}:
        raise ConfigError(f"[sae] protocol must be http or https, got {s.sae.protocol!r}")
    if s.sae.api_style not in API_STYLES:
        raise ConfigError(
            f"[sae] api_style must be one of {sorted(API_STYLES)}, got {s.sae.api_style!r}"
        )
    if "://" in s.sae.endpoint or "/" in s.sae.endpoint:
        raise ConfigError("[sae] endpoint is host[:port] without a scheme or path (see protocol)")
    if not s.sae.region:
        raise ConfigError("[sae] region must not be empty")
    positive(s.sae.connect_timeout_s, "[sae] connect_timeout_s")
    positive(s.sae.read_timeout_s, "[sae] read_timeout_s")
    if s.sae.calls_per_minute < 0:
        raise ConfigError("[sae] calls_per_minute must be >= 0 (0 = no budget)")
    positive(s.retry.initial_s, "[retry] initial_s")
    positive(s.retry.max_interval_s, "[retry] max_interval_s")
    positive(s.retry.max_elapsed_s, "[retry] max_elapsed_s")
    if s.retry.max_interval_s < s.retry.initial_s:
        raise ConfigError("[retry] max_interval_s must be >= initial_s")
    positive(s.worker.concurrency, "[worker] concurrency")
    positive(s.worker.lease_s, "[worker] lease_s")
    positive(s.worker.max_attempts, "[worker] max_attempts")
    positive(s.worker.drain_grace_s, "[worker] drain_grace_s")
    if s.worker.breaker_failures < 0:
        raise ConfigError("[worker] breaker_failures must be >= 0 (0 = no circuit breaker)")
    positive(s.worker.breaker_open_s, "[worker] breaker_open_s")
    if s.worker.lease_s <= s.sae.read_timeout_s + s.sae.connect_timeout_s:
        raise ConfigError(
            "[worker] lease_s must exceed [sae] connect_timeout_s + read_timeout_s, "
            "or a slow call could outlive its lease"
        )
    positive(s.verify.poll_interval_s, "[verify] poll_interval_s")
    positive(s.verify.timeout_s, "[verify] timeout_s")
    for src in s.sources.values():
        positive(src.rate_per_s, f"[sources.{src.name}] rate_per_s")
        positive(src.burst, f"[sources.{src.name}] burst")
