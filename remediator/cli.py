"""The `remediator` command line.

Subcommands: `demo` (the whole loop on the embedded stack), `dev-server` (the
embedded Temporal server with the Web UI), `serve` (the intake), `worker
orchestrator|detection` (one worker process), the operator commands
`approve`, `abort`, `status` and `list` on incident workflows, `sweep` (the
detection sweep, now or on a Schedule), and `config check`, which connects to
each configured backend. Every process
reads the same settings from `REMEDIATOR_*` environment variables; `--help`
lists them.

Entry points leave with `os._exit` after flushing their output, because a
process that ran a Temporal client can crash at interpreter exit and turn a
success into a false failure status (temporalio/sdk-python issue 300).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from remediator.settings import SettingsError, describe_settings, load_settings

logger = logging.getLogger(__name__)

SCENARIOS = (
    "rollback",
    "budget",
    "approval",
    "abort",
    "flapping",
    "verify-fails",
    "shadow",
    "sweep",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with one subparser per command."""
    epilog = describe_settings()
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="remediator",
        description="Heal GitOps-deployed Kubernetes applications with durable "
        "Temporal workflows.",
        epilog=epilog,
        formatter_class=formatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="run one incident end to end on the embedded stack",
        epilog=epilog,
        formatter_class=formatter,
    )
    demo.add_argument(
        "--layout",
        choices=("plain", "kustomize", "helm"),
        default="plain",
        help="shape of the demo application in the GitOps repository",
    )
    demo.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="rollback",
        help="which incident story to play; each ends with its own expected outcome",
    )
    demo.add_argument(
        "--json", action="store_true", help="print one JSON object at the end"
    )
    demo.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the stack up for the Web UI until Ctrl-C",
    )
    demo.add_argument(
        "--save-histories",
        type=Path,
        default=None,
        metavar="DIR",
        help="write the run's workflow histories to DIR as JSON (for replay tests)",
    )
    demo.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="empty or new directory that keeps the repository, database and "
        "logs after the run (default: a temporary directory, removed at the end)",
    )

    dev = commands.add_parser(
        "dev-server",
        help="run the embedded Temporal dev server with the Web UI",
        epilog=epilog,
        formatter_class=formatter,
    )
    dev.add_argument(
        "--port", type=int, default=7233, help="frontend port (default: 7233)"
    )
    dev.add_argument(
        "--ui-port", type=int, default=8233, help="Web UI port (default: 8233)"
    )
    dev.add_argument(
        "--db-file",
        type=Path,
        default=None,
        help="SQLite file that keeps histories across restarts (default: in memory)",
    )

    serve = commands.add_parser(
        "serve",
        help="run the HTTP intake (Alertmanager webhook and OTLP receiver)",
        epilog=epilog,
        formatter_class=formatter,
    )
    serve.add_argument("--host", default=None, help="listen address")
    serve.add_argument("--port", type=int, default=None, help="listen port")

    worker = commands.add_parser(
        "worker",
        help="run one worker process",
        epilog=epilog,
        formatter_class=formatter,
    )
    worker.add_argument("kind", choices=("orchestrator", "detection"))

    from remediator.config_check import add_config_command

    add_config_command(commands, epilog, formatter)

    from remediator.control_cli import add_control_commands

    add_control_commands(commands, epilog, formatter, os.environ.get("USER"))

    from remediator.sweep import add_sweep_command

    add_sweep_command(commands, epilog, formatter)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run the command line and leave the process with its exit status."""
    args = build_parser().parse_args(argv)
    try:
        status = _dispatch(args)
    except KeyboardInterrupt:
        status = 130
    except SystemExit as exit_:
        # A command stops with a one-line reason instead of a traceback.
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
            status = 1
        else:
            status = exit_.code or 0
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _dispatch(args: argparse.Namespace) -> int:
    from remediator.telemetry import setup_logging, setup_tracing

    setup_logging()
    try:
        settings = load_settings()
    except SettingsError as error:
        raise SystemExit(f"error: {error}") from None
    if args.command == "demo":
        from remediator.demo.run import run_demo

        return asyncio.run(
            run_demo(
                layout=args.layout,
                scenario=args.scenario,
                as_json=args.json,
                keep_running=args.keep_running,
                work_dir=args.work_dir,
                history_dir=args.save_histories,
            )
        )
    if args.command == "dev-server":
        return _run_dev_server(args.port, args.ui_port, args.db_file)
    if args.command == "serve":
        setup_tracing("remediator-intake")
        from remediator.intake.server import serve

        host = args.host or settings.intake.host
        port = args.port or settings.intake.port
        asyncio.run(serve(settings, host, port))
        return 0
    if args.command == "worker":
        setup_tracing(f"remediator-{args.kind}-worker")
        from workers.runner import run_worker

        asyncio.run(run_worker(args.kind, settings))
        return 0
    if args.command == "config":
        from remediator.config_check import run_config_check

        return asyncio.run(run_config_check(args, settings))
    if args.command == "sweep":
        from remediator.sweep import run_sweep_command

        return asyncio.run(run_sweep_command(args, settings))
    from remediator.control_cli import COMMANDS, run_control_command

    if args.command in COMMANDS:
        return asyncio.run(run_control_command(args, settings))
    raise AssertionError(f"unhandled command {args.command}")


def _run_dev_server(port: int, ui_port: int, db_file: Path | None) -> int:
    import signal
    import subprocess

    from remediator.devserver import dev_server_command

    command = dev_server_command(port, ui_port, db_file)
    logger.info(
        "Starting the Temporal dev server on 127.0.0.1:%s, Web UI on "
        "http://127.0.0.1:%s.",
        port,
        ui_port,
    )
    process = subprocess.Popen(command)

    # Pass SIGTERM on, so stopping this command never leaves the server behind.
    def forward(signum: int, _frame: object) -> None:
        process.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:
            # The terminal sent SIGINT to the server too; wait for it to stop.
            continue


if __name__ == "__main__":
    main()
