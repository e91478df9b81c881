"""The operator subcommands of the CLI: approve, abort, status and list.

`remediator.cli` parses the arguments and calls `run_control_command`, which
connects to Temporal, runs one function of `remediator.control` and prints the
result: rich tables for people, `--json` for scripts. Any failure becomes one
line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from datetime import datetime

from rich import box
from rich.console import Console, Group, RenderableType
from rich.padding import Padding
from rich.table import Table

from remediator import control
from remediator.settings import Settings
from workflows.models import Approval, IncidentStatus, Outcome, Stage

COMMANDS = ("approve", "abort", "status", "list")


def add_control_commands(
    commands: argparse._SubParsersAction,
    epilog: str,
    formatter: type[argparse.HelpFormatter],
    default_by: str | None,
) -> None:
    """Add the approve, abort, status and list subparsers."""
    id_help = "incident workflow id, or namespace/app for incident-<namespace>-<app>"
    for name, summary in (
        ("approve", "approve the rollback of an incident waiting for approval"),
        ("abort", "abort a running incident and close its unmerged pull request"),
    ):
        parser = commands.add_parser(
            name, help=summary, epilog=epilog, formatter_class=formatter
        )
        parser.add_argument("id", help=id_help)
        parser.add_argument(
            "--by",
            default=default_by,
            help="who decides, recorded on the incident (default: $USER)",
        )
        parser.add_argument(
            "--reason", default="", help="why, recorded on the incident too"
        )

    status = commands.add_parser(
        "status",
        help="show one incident's stage, evidence, decision and outcome",
        epilog=epilog,
        formatter_class=formatter,
    )
    status.add_argument("id", help=id_help)
    status.add_argument(
        "--json", action="store_true", help="print the IncidentStatus model as JSON"
    )

    listing = commands.add_parser(
        "list",
        help="list incidents from the Temporal visibility store, newest first",
        epilog=epilog,
        formatter_class=formatter,
    )
    listing.add_argument("--app", help="application name, or namespace/app")
    listing.add_argument("--namespace", help="Kubernetes namespace")
    # "started" is the stage the workflow records before its first step.
    stages = ["started", *(stage.value for stage in Stage)]
    listing.add_argument(
        "--stage",
        choices=stages,
        metavar="STAGE",
        help=f"current stage, one of: {', '.join(stages)}",
    )
    outcomes = [outcome.value for outcome in Outcome]
    listing.add_argument(
        "--outcome",
        choices=outcomes,
        metavar="OUTCOME",
        help=f"how the incident ended, one of: {', '.join(outcomes)}",
    )
    listing.add_argument(
        "--limit",
        type=_positive_int,
        default=50,
        help="maximum number of rows (default: 50)",
    )
    listing.add_argument("--json", action="store_true", help="print rows as JSON")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an integer, not {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


async def run_control_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run one operator subcommand and return the process exit status."""
    try:
        await _run(args, settings)
    except control.ControlError as err:
        _fail(str(err))
        return 1
    return 0


async def _run(args: argparse.Namespace, settings: Settings) -> None:
    from remediator.temporal import connect, connect_failure

    workflow_id = None
    if args.command in ("approve", "abort", "status"):
        workflow_id = control.resolve_workflow_id(args.id)
    if args.command in ("approve", "abort") and not args.by:
        raise control.ControlError(
            f"{args.command} needs --by NAME when $USER is unset"
        )
    if args.command == "list":
        # Reject bad filters before spending a connection on them.
        control.incident_query(
            app=args.app,
            namespace=args.namespace,
            stage=args.stage,
            outcome=args.outcome,
        )
    try:
        client = await connect(settings.temporal)
    except RuntimeError as err:
        raise control.ControlError(connect_failure(settings.temporal, err)) from err

    console = output_console()
    if args.command in ("approve", "abort"):
        action = control.approve if args.command == "approve" else control.abort
        await action(client, workflow_id, args.by, args.reason)
        verb = "approved" if args.command == "approve" else "aborted"
        console.print(f"{verb} incident {workflow_id} as {args.by}", highlight=False)
    elif args.command == "status":
        status = await control.status(client, workflow_id)
        if args.json:
            print(status.model_dump_json(indent=2))
        else:
            console.print(render_status(status))
    elif args.command == "list":
        rows = await control.list_incidents(
            client,
            app=args.app,
            namespace=args.namespace,
            stage=args.stage,
            outcome=args.outcome,
            limit=args.limit,
        )
        if args.json:
            print(json.dumps([row.model_dump(mode="json") for row in rows], indent=2))
        elif rows:
            console.print(render_rows(rows))
        else:
            console.print("no incidents match", highlight=False)


# Width of tables written to a pipe or file, where no terminal sets one.
PIPE_WIDTH = 400


def output_console() -> Console:
    """Return the console for command output. A terminal or COLUMNS sets its
    width. In a pipe rich would cut tables at 80 columns, so it is wider there."""
    width = None
    if not sys.stdout.isatty() and "COLUMNS" not in os.environ:
        width = PIPE_WIDTH
    return Console(soft_wrap=False, width=width)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


# --- Rendering --------------------------------------------------------------


def render_rows(rows: Iterable[control.IncidentRow]) -> Table:
    """Render `list` rows as one table."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    columns = ("ID", "Run", "App", "Stage", "Outcome", "Status", "Started", "Closed")
    for column in columns:
        table.add_column(column, no_wrap=column != "ID")
    for row in rows:
        table.add_row(
            row.workflow_id,
            row.run_id[:8],
            row.app_key,
            row.stage,
            row.outcome,
            row.status,
            _time(row.start_time),
            _time(row.close_time),
        )
    return table


def render_status(status: IncidentStatus) -> RenderableType:
    """Render an incident's status as a column of titled tables."""
    parts: list[RenderableType] = []
    summary = [
        ("incident", status.incident_id),
        ("application", f"{status.namespace}/{status.app}"),
        ("stage", status.stage or "started"),
        ("outcome", status.outcome or "(running)"),
    ]
    if status.trace_id:
        summary.append(("trace id", status.trace_id))
    summary.extend(("reason", reason) for reason in status.reasons)
    parts.append(_pairs("Incident", summary))

    if status.alerts:
        last_seen = max(
            (a.last_seen for a in status.alerts if a.last_seen), default=None
        )
        table = _table(
            f"Alerts: {len(status.alerts)}, last seen {_time(last_seen)}",
            "fingerprint",
            "alert",
            "status",
            "count",
            "first seen",
            "last seen",
        )
        for alert in status.alerts:
            table.add_row(
                alert.fingerprint,
                alert.alertname,
                alert.status,
                str(alert.count),
                _time(alert.first_seen),
                _time(alert.last_seen),
            )
        parts.append(table)

    if status.evidence is not None:
        evidence = status.evidence
        parts.append(
            _pairs(
                "Evidence",
                [
                    ("source", evidence.source),
                    ("has data", _yes_no(evidence.has_data)),
                    ("no traffic", _yes_no(evidence.no_traffic)),
                    ("request rate", _number(evidence.request_rate, "/s")),
                    ("error ratio", _number(evidence.error_ratio)),
                    ("p99 latency", _number(evidence.latency_p99_seconds, " s")),
                    ("restarts", _number(evidence.restarts)),
                    ("points", str(len(evidence.points))),
                ],
            )
        )

    if status.anomaly is not None:
        anomaly = status.anomaly
        parts.append(
            _pairs(
                "Anomaly",
                [
                    ("series", anomaly.key),
                    ("anomalous", _yes_no(anomaly.anomalous)),
                    ("score", f"{anomaly.score:.2f}"),
                    ("sustained", f"{anomaly.sustained_seconds:.0f} s"),
                    ("points scored", str(anomaly.points_scored)),
                ],
            )
        )

    if status.change is not None:
        parts.extend(_render_change(status))

    if status.decision is not None:
        decision = status.decision
        pairs = [
            ("action", decision.action),
            ("allow", _yes_no(decision.allow)),
            ("evaluated", _yes_no(decision.evaluated)),
            ("require approval", _yes_no(decision.require_approval)),
            ("shadow", _yes_no(decision.shadow)),
            ("engine", decision.engine or "-"),
            ("max error ratio", _number(decision.max_error_ratio)),
            ("max p99 latency", _number(decision.max_latency_p99_seconds, " s")),
        ]
        if decision.approval_timeout_seconds is not None:
            pairs.append(
                ("approval timeout", f"{decision.approval_timeout_seconds:.0f} s")
            )
        pairs.extend(("reason", reason) for reason in decision.reasons)
        parts.append(_pairs("Decision", pairs))

    if status.pull_request is not None:
        pull = status.pull_request
        pairs = [
            ("pull request", f"{pull.provider} #{pull.number}"),
            ("url", pull.url),
            ("state", pull.state + (" (draft)" if pull.draft else "")),
            ("branch", f"{pull.branch} -> {pull.target_branch}"),
            ("head commit", pull.head_commit),
        ]
        if pull.title:
            pairs.insert(1, ("title", pull.title))
        if pull.merge_commit or status.merge_commit:
            pairs.append(("merge commit", pull.merge_commit or status.merge_commit))
        parts.append(_pairs("Pull request", pairs))

    if status.budget is not None:
        budget = status.budget
        pairs = [
            ("key", budget.key),
            ("used", f"{budget.used} of {budget.max_rollbacks}"),
            ("remaining", str(budget.remaining)),
            ("window", f"{budget.window_seconds:.0f} s"),
        ]
        if budget.next_free_at is not None:
            pairs.append(("next free at", _time(budget.next_free_at)))
        parts.append(_pairs("Budget", pairs))

    if status.sync is not None:
        sync = status.sync
        pairs = [
            ("synced", _yes_no(sync.synced)),
            ("revision", sync.revision or "-"),
            ("sync status", sync.sync_status or "-"),
            ("health", sync.health_status or "-"),
            ("operation", sync.operation_phase or "-"),
            ("polls", str(sync.polls)),
        ]
        if sync.message:
            pairs.append(("message", sync.message))
        parts.append(_pairs("Sync", pairs))

    if status.verifications:
        table = _table(
            "Verifications", "#", "healthy", "error ratio", "p99 latency", "reason"
        )
        for number, result in enumerate(status.verifications, start=1):
            healthy = _yes_no(result.healthy)
            if result.no_data:
                healthy += " (no data)"
            elif result.no_traffic:
                healthy += " (no traffic)"
            table.add_row(
                str(number),
                healthy,
                _number(result.error_ratio),
                _number(result.latency_p99_seconds, " s"),
                result.reason,
            )
        parts.append(table)

    decisions = [("approved by", _who(a)) for a in status.approvals]
    if status.aborted_by is not None:
        decisions.append(("aborted by", _who(status.aborted_by)))
    if decisions:
        parts.append(_pairs("Approvals", decisions))

    if status.stages:
        table = _table("Stage timings", "stage", "seconds")
        for timing in status.stages:
            table.add_row(timing.name, f"{timing.seconds:.3f}")
        parts.append(table)
    # A blank line after each section keeps the sections apart.
    return Group(*(Padding(part, (0, 0, 1, 0), expand=False) for part in parts))


def _render_change(status: IncidentStatus) -> list[RenderableType]:
    change = status.change
    assert change is not None
    pairs = [("found", _yes_no(change.found))]
    if change.reason:
        pairs.append(("reason", change.reason))
    pairs += [
        ("suspect revision", change.suspect_revision or "-"),
        ("last good revision", change.last_good_revision or "-"),
    ]
    if change.repo_url:
        pairs.append(("repository", change.repo_url))
    if change.path:
        pairs.append(("path", change.path))
    if change.deployed_at is not None:
        pairs.append(("deployed at", _time(change.deployed_at)))
    pairs.extend(("suspect commit", commit) for commit in change.suspect_commits)
    parts: list[RenderableType] = [_pairs("Change", pairs)]
    if change.image_changes:
        table = _table("Image changes", "file", "location", "bad", "good")
        for image in change.image_changes:
            table.add_row(image.file, image.location, image.bad, image.good)
        parts.append(table)
    return parts


def _pairs(title: str, pairs: Iterable[tuple[str, str]]) -> Table:
    table = Table(
        title=title, title_justify="left", show_header=False, box=None, pad_edge=False
    )
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for key, value in pairs:
        table.add_row(key, value)
    return table


def _table(title: str, *columns: str) -> Table:
    table = Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )
    for column in columns:
        table.add_column(column)
    return table


def _who(approval: Approval) -> str:
    return f"{approval.by}: {approval.reason}" if approval.reason else approval.by


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _number(value: float | None, unit: str = "") -> str:
    return "no data" if value is None else f"{value:.3g}{unit}"


def _time(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.isoformat(sep=" ", timespec="seconds")
