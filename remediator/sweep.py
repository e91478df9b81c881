"""Run the detection sweep now, or on a Temporal Schedule.

`remediator sweep` starts one `DetectionSweepWorkflow` and prints what it
found; `remediator sweep schedule` creates or updates the Schedule that starts
one every `REMEDIATOR_SWEEP_INTERVAL_SECONDS`, and `remediator sweep
unschedule` deletes it. Both build the workflow input from the same settings.
A sweep never overlaps the previous one: the Schedule skips a start while the
last sweep still runs.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime, timedelta

from rich.console import Console
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
)
from temporalio.service import RPCError, RPCStatusCode

from remediator.intake.alertmanager import is_dns1123_label
from remediator.settings import Settings
from remediator.temporal import connect, connect_failure, task_queue_pollers
from workflows.models import SWEEP_WORKFLOW, SweepInput, SweepResult


class SweepSettingsError(ValueError):
    """A sweep setting or argument cannot be used; the message names the fix."""


class SweepCommandError(RuntimeError):
    """A request that Temporal cannot carry out; the message gives the reason."""


def parse_applications(text: str, where: str) -> list[str]:
    """Split comma-separated namespace/app keys and check each one."""
    keys = []
    for raw in text.split(","):
        key = raw.strip()
        if not key:
            continue
        namespace, slash, app = key.partition("/")
        if not (slash and is_dns1123_label(namespace) and is_dns1123_label(app)):
            raise SweepSettingsError(
                f"{where}: {key[:80]!r} is not namespace/app with two Kubernetes "
                "names (lowercase letters, digits and '-'), such as shop/checkout"
            )
        keys.append(key)
    return sorted(set(keys))


def sweep_input(
    settings: Settings,
    *,
    applications: list[str] | None = None,
    open_incidents: bool = True,
) -> SweepInput:
    """Build the sweep's start input from the settings.

    `applications` replaces `REMEDIATOR_SWEEP_APPLICATIONS` and turns
    discovery off. Raises SweepSettingsError when no application is opted in
    and discovery is off, because such a sweep could never find anything.
    """
    sweep = settings.sweep
    if applications is None:
        keys = parse_applications(sweep.applications, "REMEDIATOR_SWEEP_APPLICATIONS")
        discover = sweep.discover
    else:
        keys = parse_applications(",".join(applications), "--app")
        discover = False
    if not keys and not discover:
        raise SweepSettingsError(
            "no application is opted in to the sweep: set "
            "REMEDIATOR_SWEEP_APPLICATIONS (namespace/app, comma-separated), set "
            "REMEDIATOR_SWEEP_DISCOVER=true, or pass --app"
        )
    if sweep.window_seconds <= 0 or sweep.batch_series < 1:
        raise SweepSettingsError(
            "REMEDIATOR_SWEEP_WINDOW_SECONDS must be above 0 and "
            "REMEDIATOR_SWEEP_BATCH_SERIES at least 1"
        )
    return SweepInput(
        applications=keys,
        discover=discover,
        window_seconds=sweep.window_seconds,
        step_seconds=sweep.step_seconds or settings.signals.step_seconds,
        threshold=settings.detection.threshold,
        min_sustained_seconds=sweep.min_sustained_seconds,
        batch_series=sweep.batch_series,
        open_incidents=open_incidents,
        detection_task_queue=settings.temporal.detection_task_queue,
    )


async def check_pollers(client: Client, settings: Settings) -> None:
    """Raise SweepCommandError when no worker polls a task queue the sweep
    needs, because the sweep would otherwise wait silently until its 30-minute
    execution timeout."""
    queues = [
        (
            settings.temporal.task_queue,
            TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
            "remediator worker orchestrator",
        ),
        (
            settings.temporal.detection_task_queue,
            TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
            "remediator worker detection",
        ),
    ]
    for name, queue_type, command in queues:
        pollers = await task_queue_pollers(
            client, name, queue_type, timedelta(seconds=10)
        )
        if not pollers:
            raise SweepCommandError(
                f"no worker polls task queue {name} in namespace "
                f"{client.namespace}; start `{command}` with the same settings"
            )


async def run_sweep(
    client: Client, settings: Settings, input: SweepInput
) -> SweepResult:
    """Start one sweep now and wait for its result."""
    workflow_id = f"sweep-now-{datetime.now(UTC):%Y%m%dT%H%M%S.%fZ}"
    return await client.execute_workflow(
        SWEEP_WORKFLOW,
        input,
        id=workflow_id,
        task_queue=settings.temporal.task_queue,
        result_type=SweepResult,
        execution_timeout=timedelta(minutes=30),
        static_summary="Detection sweep started by remediator sweep",
    )


async def schedule_sweep(client: Client, settings: Settings, input: SweepInput) -> str:
    """Create the sweep's Schedule, or update it when it exists; return its id."""
    interval = settings.sweep.interval_seconds
    if interval < 10:
        raise SweepSettingsError(
            f"REMEDIATOR_SWEEP_INTERVAL_SECONDS is {interval:g}; use 10 or more"
        )
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            SWEEP_WORKFLOW,
            input,
            id=f"sweep-{settings.sweep.schedule_id}",
            task_queue=settings.temporal.task_queue,
            execution_timeout=timedelta(seconds=max(interval * 2, 600)),
        ),
        spec=ScheduleSpec(
            intervals=[ScheduleIntervalSpec(every=timedelta(seconds=interval))]
        ),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )
    schedule_id = settings.sweep.schedule_id
    try:
        await client.create_schedule(schedule_id, schedule)
    except ScheduleAlreadyRunningError:

        def replace(update: ScheduleUpdateInput) -> ScheduleUpdate:
            return ScheduleUpdate(schedule=schedule)

        await client.get_schedule_handle(schedule_id).update(replace)
    return schedule_id


async def unschedule_sweep(client: Client, settings: Settings) -> bool:
    """Delete the sweep's Schedule and return True, or return False when there
    is none. Running sweeps finish."""
    try:
        await client.get_schedule_handle(settings.sweep.schedule_id).delete()
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
        return False
    return True


# --- command line ---------------------------------------------------------------


def add_sweep_command(
    commands: argparse._SubParsersAction,
    epilog: str,
    formatter: type[argparse.HelpFormatter],
) -> None:
    """Add `remediator sweep [now|schedule|unschedule]`."""
    parser = commands.add_parser(
        "sweep",
        help="look for anomalies no alert reported, now or on a Temporal Schedule",
        epilog=epilog,
        formatter_class=formatter,
    )
    parser.add_argument(
        "action",
        nargs="?",
        default="now",
        choices=("now", "schedule", "unschedule"),
        help="now (default): run one sweep and print it; schedule: create or "
        "update the Schedule; unschedule: delete it",
    )
    parser.add_argument(
        "--app",
        action="append",
        metavar="NAMESPACE/APP",
        help="sweep these applications instead of REMEDIATOR_SWEEP_APPLICATIONS",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="report anomalies without opening incidents",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


async def run_sweep_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run the parsed `sweep` command; a bad setting prints one line and exits 2."""
    console = Console(soft_wrap=True)
    try:
        input = None
        if args.action != "unschedule":
            input = sweep_input(
                settings, applications=args.app, open_incidents=not args.dry_run
            )
        client = await _connect(settings)
        if args.action == "schedule":
            schedule_id = await schedule_sweep(client, settings, input)
            console.print(
                f"Schedule {schedule_id} starts a sweep every "
                f"{settings.sweep.interval_seconds:g} s."
            )
            return 0
        if args.action == "unschedule":
            schedule_id = settings.sweep.schedule_id
            if not await unschedule_sweep(client, settings):
                raise SweepCommandError(
                    f"sweep Schedule {schedule_id} not found, so nothing was "
                    "deleted (REMEDIATOR_SWEEP_SCHEDULE_ID)"
                )
            console.print(f"Schedule {schedule_id} deleted.")
            return 0
        await check_pollers(client, settings)
        result = await run_sweep(client, settings, input)
    except SweepSettingsError as error:
        Console(stderr=True, soft_wrap=True).print(f"[red]{error}[/red]")
        return 2
    except SweepCommandError as error:
        Console(stderr=True, soft_wrap=True).print(
            f"[red]error: {error}[/red]", highlight=False
        )
        return 1
    if args.json:
        print(json.dumps(result.model_dump(mode="json"), indent=2))
    else:
        print_result(console, result)
    return 0


async def _connect(settings: Settings) -> Client:
    try:
        return await connect(settings.temporal)
    except RuntimeError as err:
        raise SweepCommandError(connect_failure(settings.temporal, err)) from None


def print_result(console: Console, result: SweepResult) -> None:
    """Print a sweep's findings and skipped applications for people."""
    device = result.device or "no device"
    console.print(
        f"Swept {_count(result.applications, 'application')}: "
        f"{_count(result.series_scored, 'series', 'series')} "
        f"in {_count(result.detection_calls, 'detection call')} on {device}."
    )
    if not result.findings:
        console.print("No sustained anomaly found.")
    for finding in result.findings:
        incident = finding.incident_workflow_id or "not opened (--dry-run)"
        console.print(
            f"[bold]{finding.application}[/bold]: {finding.series} scored "
            f"{finding.score:.2f}, anomalous for {finding.sustained_seconds:.0f} s; "
            f"incident {incident}"
        )
    for key, reason in sorted(result.skipped.items()):
        console.print(f"[yellow]{key} skipped[/yellow]: {reason}")


def _count(number: int, singular: str, plural: str | None = None) -> str:
    return f"{number} {singular if number == 1 else (plural or singular + 's')}"
