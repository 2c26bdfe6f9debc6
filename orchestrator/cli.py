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
from typing import TYPE_CHECKING, NoReturn

from orchestrator import __version__
from orchestrator.config import Settings, load_settings
from orchestrator.errors import ConfigError, RollbackError
from orchestrator.logging import configure_logging, get_logger

if TYPE_CHECKING:
    from orchestrator.app import ServiceInfo

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

    for name, text in (
        ("serve", "run intake and worker in one process"),
        ("api", "run the intake/results API only"),
        ("worker", "run the worker only (scale out on PostgreSQL)"),
        ("migrate", "create or upgrade the store schema"),
    ):
        _add_config_arg(sub.add_parser(name, help=text, description=text))

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


def _print_next_steps(info: ServiceInfo) -> None:
    """Tell a newcomer what to do next (stdout, so it stays readable beside JSON logs)."""
    lines = [f"sae-rollback is running (store: {info.store_engine})."]
    if info.api_url:
        lines.append(f"  API:       {info.api_url}  (GET {info.api_url}/metrics, /openapi.json)")
    if info.simulator_url:
        token = info.demo_token or "$TOKEN"
        server = f"--server {info.api_url} --token {token}"
        lines += [
            f"  Simulator: {info.simulator_url}  (built in; 'demo-app' has a running change order)",
            "Next, in another terminal:",
            f"  .venv/bin/sae-rollback submit --app-id demo-app --reason 'bad deploy' {server}",
            f"  .venv/bin/sae-rollback status JOB_ID {server}",
        ]
    lines.append("Stop with Ctrl-C (running rollbacks are drained first).")
    print("\n".join(lines), flush=True)


async def _run(args: argparse.Namespace, stop: asyncio.Event, *, intake: bool, worker: bool) -> int:
    from orchestrator.app import run_service

    settings = _settings(args)
    await run_service(
        settings,
        intake=intake,
        worker=worker,
        stop=stop,
        on_ready=_print_next_steps if intake else None,
    )
    return EXIT_OK


async def _cmd_serve(args: argparse.Namespace, stop: asyncio.Event) -> int:
    return await _run(args, stop, intake=True, worker=True)


async def _cmd_api(args: argparse.Namespace, stop: asyncio.Event) -> int:
    return await _run(args, stop, intake=True, worker=False)


async def _cmd_worker(args: argparse.Namespace, stop: asyncio.Event) -> int:
    return await _run(args, stop, intake=False, worker=True)


async def _cmd_migrate(args: argparse.Namespace, stop: asyncio.Event) -> int:
    settings = _settings(args)
    from orchestrator.store import open_store

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


async def _cmd_simulate(args: argparse.Namespace, stop: asyncio.Event) -> int:
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
    server = asyncio.ensure_future(
        serve_forever(
            args.host,
            args.port,
            credentials=credentials,
            seed=args.seed,
            calls_per_minute=args.calls_per_minute,
            demo=not args.no_demo,
        )
    )
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({server, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    server.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await server  # re-raises the server's own failure (e.g. port in use)
    return EXIT_OK


Command = Callable[[argparse.Namespace, asyncio.Event], Awaitable[int]]

_COMMANDS: dict[str, Command] = {
    "serve": _cmd_serve,
    "api": _cmd_api,
    "worker": _cmd_worker,
    "migrate": _cmd_migrate,
    "simulate": _cmd_simulate,
}


async def _run_until_signalled(command: Command, args: argparse.Namespace) -> int:
    """Run ``command``; the first SIGTERM/SIGINT asks it to stop gracefully, a second one
    cancels it outright (an operator pressing Ctrl-C twice wants out now)."""
    stop = asyncio.Event()
    task = asyncio.ensure_future(command(args, stop))
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            task.cancel()
        else:
            log.info("shutdown_requested")
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        return await task
    except asyncio.CancelledError:
        return EXIT_FAILURE
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
        return asyncio.run(_run_until_signalled(command, args))
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
