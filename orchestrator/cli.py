"""The command line: the only place that parses argv, installs signal handlers and exits.

Exit codes (contract.md): 0 success, 2 bad usage or configuration, 1 runtime failure,
each failure with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Final, NoReturn, TypeVar

from orchestrator import __version__
from orchestrator.config import Settings, load_settings
from orchestrator.errors import ConfigError, RollbackError
from orchestrator.jobs import JobStatus
from orchestrator.logging import configure_logging, get_logger

if TYPE_CHECKING:
    from orchestrator.app import ServiceInfo

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
#: Where ``submit``/``status``/``list`` find the API by default: ``make run``'s address.
_DEFAULT_SERVER = "http://127.0.0.1:8080"

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
    _add_logging_args(parser, defaults=True)
    # The same options after the subcommand (`sae-rollback worker --log-format console`);
    # SUPPRESS keeps a subcommand that does not repeat them from resetting the top level's.
    logging_opts = _Parser(add_help=False)
    _add_logging_args(logging_opts, defaults=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_parser = functools.partial(sub.add_parser, parents=[logging_opts])

    for name, text in (
        ("serve", "run intake and worker in one process"),
        ("api", "run the intake/results API only"),
        ("worker", "run the worker only (scale out on PostgreSQL)"),
        ("migrate", "create or upgrade the store schema"),
    ):
        _add_config_arg(add_parser(name, help=text, description=text))

    sim = add_parser("simulate", help="run the SAE simulator")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=18080)
    sim.add_argument(
        "--access-key-id",
        default=None,
        help="the key clients must sign with (default: a published test-only key, printed "
        "at start)",
    )
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

    submit = add_parser(
        "submit", help="request a rollback through the API", description="enqueue a rollback"
    )
    target = submit.add_mutually_exclusive_group(required=True)
    target.add_argument("--change-order-id", help="the SAE change order to abort and roll back")
    target.add_argument("--app-id", help="the SAE app whose running change order to roll back")
    submit.add_argument("--reason", default=None, help="why (shown in status and audit)")
    submit.add_argument(
        "--idempotency-key", default=None, help="retrying with the same key never adds a job"
    )
    _add_client_args(submit)

    status = add_parser(
        "status", help="show one rollback job and its attempts", description="show one job"
    )
    status.add_argument("id", help="the job id printed by submit")
    _add_client_args(status)

    listing = add_parser("list", help="list rollback jobs", description="list jobs")
    listing.add_argument("--status", choices=[s.value for s in JobStatus], default=None)
    listing.add_argument("--app-id", default=None)
    listing.add_argument("--limit", type=int, default=None, help="page size (1-1000)")
    listing.add_argument("--cursor", default=None, help="next_cursor of the previous page")
    _add_client_args(listing)
    return parser


def _add_logging_args(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    parser.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        default="auto" if defaults else argparse.SUPPRESS,
        help="log renderer (auto: console on a terminal, JSON lines otherwise)",
    )
    parser.add_argument(
        "--log-level",
        default="info" if defaults else argparse.SUPPRESS,
        help="debug, info, warning or error",
    )


def _add_client_args(parser: argparse.ArgumentParser) -> None:
    """--server/--token (also from SAE_ROLLBACK_SERVER/SAE_ROLLBACK_TOKEN) and --json."""
    parser.add_argument(
        "--server",
        default=os.environ.get("SAE_ROLLBACK_SERVER", _DEFAULT_SERVER),
        help=f"API base URL (default: $SAE_ROLLBACK_SERVER or {_DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("SAE_ROLLBACK_TOKEN"),
        help="bearer token of a configured source (default: $SAE_ROLLBACK_TOKEN)",
    )
    parser.add_argument("--json", action="store_true", help="print the raw JSON answer")


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
    if args.access_key_id is None:
        # The default key is public and test-only; a newcomer needs it to point a worker
        # (or the official SDK) at this simulator.
        print(
            "simulator test-only key: "
            f"ALIBABA_CLOUD_ACCESS_KEY_ID={DEFAULT_ACCESS_KEY_ID} "
            f"ALIBABA_CLOUD_ACCESS_KEY_SECRET={DEFAULT_ACCESS_KEY_SECRET}",
            flush=True,
        )
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


async def _cmd_submit(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from orchestrator.intake.apiclient import ApiClient

    async with ApiClient(args.server, args.token) as api:
        submitted = await _api_call(
            args,
            api.submit(
                change_order_id=args.change_order_id,
                app_id=args.app_id,
                reason=args.reason,
                idempotency_key=args.idempotency_key,
            ),
        )
    job = submitted.job
    if args.json:
        print(json.dumps(job, indent=2))
    else:
        what = "already queued as" if submitted.deduplicated else "accepted:"
        print(f"rollback {what} job {job.get('id')} ({job.get('status')})")
        hint = f"sae-rollback status {job.get('id')} --server {args.server}"
        if args.token and args.token != os.environ.get("SAE_ROLLBACK_TOKEN"):
            # The token came from --token: the follow-up needs it too. Not echoed (it is a
            # secret and stdout may be a CI log); the environment variable is the easy way.
            hint += " --token TOKEN  (the same token; or export SAE_ROLLBACK_TOKEN)"
        print(f"follow it with: {hint}")
    return EXIT_OK


async def _cmd_status(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from orchestrator.intake.apiclient import ApiClient, format_job

    async with ApiClient(args.server, args.token) as api:
        job = await _api_call(args, api.get(args.id))
    print(json.dumps(job, indent=2) if args.json else format_job(job))
    return EXIT_OK


async def _cmd_list(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from orchestrator.intake.apiclient import ApiClient, format_page

    if args.limit is not None and not 1 <= args.limit <= 1000:
        raise ConfigError(f"--limit must be 1-1000, got {args.limit}")
    async with ApiClient(args.server, args.token) as api:
        page = await _api_call(
            args,
            api.list(status=args.status, app_id=args.app_id, limit=args.limit, cursor=args.cursor),
        )
    print(json.dumps(page, indent=2) if args.json else format_page(page))
    return EXIT_OK


_T = TypeVar("_T")
#: API answers that mean the command line itself was wrong (exit 2, not 1).
_USAGE_STATUSES: Final = frozenset({400, 413, 415, 422})


async def _api_call(args: argparse.Namespace, call: Awaitable[_T]) -> _T:
    """Await an API call; add a hint to a 401 when no token was given."""
    from orchestrator.intake.apiclient import ApiClientError

    try:
        return await call
    except ApiClientError as exc:
        if exc.status == 401 and not args.token:
            raise ApiClientError(
                f"{exc} (pass --token or set SAE_ROLLBACK_TOKEN)", status=401, code=exc.code
            ) from exc
        if exc.status in _USAGE_STATUSES:
            # The server refused what was typed (a malformed id, a bad filter): bad usage.
            raise ConfigError(str(exc)) from exc
        raise


Command = Callable[[argparse.Namespace, asyncio.Event], Awaitable[int]]

_COMMANDS: dict[str, Command] = {
    "serve": _cmd_serve,
    "api": _cmd_api,
    "worker": _cmd_worker,
    "migrate": _cmd_migrate,
    "simulate": _cmd_simulate,
    "submit": _cmd_submit,
    "status": _cmd_status,
    "list": _cmd_list,
}


async def _run_until_signalled(command: Command, args: argparse.Namespace) -> int:
    """Run ``command``; the first SIGTERM/SIGINT asks it to stop gracefully, a second one
    cancels it outright (an operator pressing Ctrl-C twice wants out now)."""
    stop = asyncio.Event()
    task = asyncio.ensure_future(command(args, stop))
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            print(
                "sae-rollback: second signal: stopping now, without waiting for running work",
                file=sys.stderr,
                flush=True,
            )
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
