"""The command line: the only place that parses argv, installs signal handlers and exits.

Exit codes (contract.md): 0 success, 2 bad usage or configuration, 1 runtime failure,
each failure with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import NoReturn

from orchestrator import __version__
from orchestrator.config import Settings, load_settings
from orchestrator.errors import ConfigError, RollbackError
from orchestrator.logging import configure_logging, get_logger

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

log = get_logger("cli")


class _Parser(argparse.ArgumentParser):
    """argparse that exits with our usage code and a one-line reason."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sae-rollback", description="Rollback orchestrator for Alibaba Cloud SAE."
    )
    parser.add_argument("--version", action="version", version=f"sae-rollback {__version__}")
    parser.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        default="auto",
        help="log renderer (auto: console on a terminal, JSON lines otherwise)",
    )
    parser.add_argument("--log-level", default="info", help="debug, info, warning or error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    migrate = sub.add_parser("migrate", help="create or upgrade the store schema")
    _add_config_arg(migrate)

    sim = sub.add_parser("simulate", help="run the SAE simulator")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=18080)
    sim.add_argument("--access-key-id", default=None)
    sim.add_argument("--access-key-secret", default=None)
    sim.add_argument("--seed", type=int, default=None)
    sim.add_argument(
        "--calls-per-minute",
        type=int,
        default=None,
        help="answer Throttling.User beyond this many signed calls per minute (default: off)",
    )
    sim.add_argument(
        "--no-demo", action="store_true", help="do not create demo-app with a running change order"
    )
    return parser


def _add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=os.environ.get("SAE_ROLLBACK_CONFIG"),
        help="TOML config file (default: $SAE_ROLLBACK_CONFIG)",
    )


def _settings(args: argparse.Namespace) -> Settings:
    if not args.config:
        raise ConfigError("no config file: pass --config FILE or set SAE_ROLLBACK_CONFIG")
    return load_settings(args.config)


async def _cmd_migrate(args: argparse.Namespace) -> int:
    from orchestrator.store import open_store

    settings = _settings(args)
    store = open_store(settings.store.url)
    try:
        applied = await store.migrate()
    finally:
        await store.close()
    if applied:
        print(f"applied {len(applied)} migration(s): {', '.join(applied)}")
    else:
        print("schema is up to date")
    return EXIT_OK


async def _cmd_simulate(args: argparse.Namespace) -> int:
    from orchestrator.simulator import (
        DEFAULT_ACCESS_KEY_ID,
        DEFAULT_ACCESS_KEY_SECRET,
        serve_forever,
    )

    if (args.access_key_id is None) != (args.access_key_secret is None):
        raise ConfigError("--access-key-id and --access-key-secret go together")
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port must be 0-65535, got {args.port}")
    credentials = {
        args.access_key_id or DEFAULT_ACCESS_KEY_ID: args.access_key_secret
        or DEFAULT_ACCESS_KEY_SECRET
    }
    await serve_forever(
        args.host,
        args.port,
        credentials=credentials,
        seed=args.seed,
        calls_per_minute=args.calls_per_minute,
        demo=not args.no_demo,
    )
    return EXIT_OK


_COMMANDS: dict[str, Callable[[argparse.Namespace], Awaitable[int]]] = {
    "migrate": _cmd_migrate,
    "simulate": _cmd_simulate,
}


async def _run_until_signalled(coro: Awaitable[int]) -> int:
    """Run ``coro``; SIGTERM/SIGINT cancel it, which each command treats as a clean stop."""
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        return EXIT_OK
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sae-rollback`` console script."""
    args = _build_parser().parse_args(argv)
    fmt = args.log_format
    configure_logging(json=None if fmt == "auto" else fmt == "json", level=args.log_level)
    command = _COMMANDS[args.command]
    try:
        return asyncio.run(_run_until_signalled(command(args)))
    except ConfigError as exc:
        print(f"sae-rollback: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RollbackError as exc:
        print(f"sae-rollback: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        print(f"sae-rollback: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
