"""`remediator demo`: incident stories played for real on the embedded stack.

Every scenario starts the embedded stack, lets the application serve a baseline
on the good image, pushes the bad image through the GitOps repository, waits
until the error ratio has stayed high for a few seconds (as a Prometheus
alerting rule with `for:` would), posts the Alertmanager webhook body to the
intake and follows the incident workflow to its outcome. In the sweep scenario
no alert is posted: `remediator sweep` has to find the bad deploy. The scenarios differ
in policy, settings and what a human does while the incident runs; each one
lists the outcomes it expects, and the demo exits 0 only when they happen.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
from rich.console import Console
from temporalio.client import WorkflowFailureError
from temporalio.service import RPCError

from remediator.demo.seed import push_image
from remediator.demo.stack import (
    BAD_IMAGE,
    DEMO_APP,
    DEMO_NAMESPACE,
    GOOD_IMAGE,
    EmbeddedStack,
)
from remediator.temporal import workflow_url
from workflows.models import (
    SWEEP_WORKFLOW,
    Approval,
    IncidentStatus,
    Stage,
    budget_workflow_id,
    incident_workflow_id,
)

BASELINE_SECONDS = 6.0
ALERT_FOR_SECONDS = 3.0
ALERT_THRESHOLD = 0.1
INCIDENT_TIMEOUT_SECONDS = 120.0
SWEEP_TIMEOUT_SECONDS = 60.0
APPROVAL_POLICY = {
    "remediation": {
        "applications": {
            f"{DEMO_NAMESPACE}/{DEMO_APP}": {
                "require_approval": True,
                "approval_timeout_seconds": 120,
            }
        }
    }
}

# Called with the stack, an HTTP client of the intake, the workflow id and the
# stage the incident just entered.
StageHook = Callable[[EmbeddedStack, httpx.AsyncClient, str, str], Awaitable[None]]


@dataclass
class Scenario:
    """One incident story: its settings, its human actions, its outcomes."""

    description: str
    expected: list[str]
    environment: dict[str, str] = field(default_factory=dict)
    policy_data: dict | None = None
    on_stage: StageHook | None = None
    outage: bool = False
    # "alert": the demo posts an Alertmanager alert; "sweep": no alert is
    # sent, and `remediator sweep` must find the bad deploy by itself.
    trigger: str = "alert"


async def _approve(stack, http, workflow_id, stage) -> None:
    if stage != Stage.APPROVAL:
        return
    handle = stack.client.get_workflow_handle(workflow_id)
    await asyncio.sleep(1.0)  # long enough to see the waiting state
    await handle.signal(
        "approve", Approval(by="demo-operator", reason="checked the evidence")
    )


async def _abort(stack, http, workflow_id, stage) -> None:
    if stage != Stage.APPROVAL:
        return
    handle = stack.client.get_workflow_handle(workflow_id)
    await asyncio.sleep(1.0)
    await handle.signal(
        "abort", Approval(by="demo-operator", reason="the release team owns this")
    )


async def _resolve_by_hand(stack, http, workflow_id, stage) -> None:
    """Repeat the alert, then let a developer redeploy the good image."""
    if stage != Stage.APPROVAL:
        return
    body = alertmanager_body(DEMO_NAMESPACE, DEMO_APP, datetime.now(UTC))
    for _ in range(2):
        await post_alert(http, body)
    await asyncio.to_thread(
        push_image, stack.bare_path, stack.layout, DEMO_APP, GOOD_IMAGE
    )
    await stack.wait_for_live_image(GOOD_IMAGE)
    await wait_for_error_ratio(http, above=False)
    await post_alert(http, alertmanager_body(DEMO_NAMESPACE, DEMO_APP, None))


SCENARIOS: dict[str, Scenario] = {
    "rollback": Scenario(
        "A bad image raises the error ratio; Remediator rolls it back.",
        ["recovered"],
    ),
    "budget": Scenario(
        "Three bad deploys in a row: two rollbacks, then the budget stops it.",
        ["recovered", "recovered", "budget-exhausted"],
    ),
    "approval": Scenario(
        "The policy asks for approval; an operator approves through the signal.",
        ["recovered"],
        policy_data=APPROVAL_POLICY,
        on_stage=_approve,
    ),
    "abort": Scenario(
        "The policy asks for approval; an operator aborts instead.",
        ["aborted"],
        policy_data=APPROVAL_POLICY,
        on_stage=_abort,
    ),
    "flapping": Scenario(
        "The alert repeats, then resolves after a developer redeploys the good "
        "image, before Remediator acts.",
        ["resolved"],
        policy_data=APPROVAL_POLICY,
        on_stage=_resolve_by_hand,
    ),
    "verify-fails": Scenario(
        "A downstream outage causes the errors, so the rollback does not help.",
        ["escalated"],
        environment={"REMEDIATOR_VERIFY_MAX_INTERVALS": "5"},
        outage=True,
    ),
    "shadow": Scenario(
        "Shadow mode: a draft pull request shows what would happen; no merge.",
        ["shadowed"],
        environment={"REMEDIATOR_REMEDIATION_SHADOW": "true"},
    ),
    "sweep": Scenario(
        "No alert fires; `remediator sweep` finds the bad deploy and opens the "
        "incident.",
        ["recovered"],
        trigger="sweep",
    ),
}


def alertmanager_body(namespace: str, app: str, starts_at: datetime | None) -> dict:
    """Build the webhook body Alertmanager sends (version 4).

    With `starts_at` None the alert is resolved, as Alertmanager reports it once
    the rule stops firing.
    """
    labels = {
        "alertname": "HighErrorRatio",
        "namespace": namespace,
        "app": app,
        "severity": "page",
    }
    fingerprint = hashlib.sha256(
        json.dumps(labels, sort_keys=True).encode()
    ).hexdigest()[:16]
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    status = "firing" if starts_at is not None else "resolved"
    alert = {
        "status": status,
        "labels": labels,
        "annotations": {"summary": f"{app} answers more than 10% of requests with 5xx"},
        "startsAt": starts_at.isoformat().replace("+00:00", "Z") if starts_at else now,
        "endsAt": "0001-01-01T00:00:00Z" if starts_at else now,
        "generatorURL": "http://prometheus.demo.localhost/graph",
        "fingerprint": fingerprint,
    }
    return {
        "version": "4",
        "groupKey": '{}:{alertname="HighErrorRatio"}',
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "remediator",
        "groupLabels": {"alertname": "HighErrorRatio"},
        "commonLabels": labels,
        "commonAnnotations": alert["annotations"],
        "externalURL": "http://alertmanager.demo.localhost",
        "alerts": [alert],
    }


async def run_demo(
    layout: str = "plain",
    scenario: str = "rollback",
    as_json: bool = False,
    keep_running: bool = False,
    work_dir: Path | None = None,
    history_dir: Path | None = None,
) -> int:
    """Run one scenario and return 0 only when its expected outcomes happen.

    With `history_dir`, the workflow histories of the run are written there as
    JSON, for the replay tests.
    """
    story = SCENARIOS[scenario]
    console = Console(stderr=as_json, soft_wrap=True)
    if work_dir is not None and work_dir.exists() and any(work_dir.iterdir()):
        console.print(
            f"[red]--work-dir {work_dir} is not empty; give a new or empty "
            "directory, because the demo seeds a fresh repository there[/red]"
        )
        return 2
    started = time.monotonic()
    temporary = work_dir is None
    work_dir = work_dir or Path(tempfile.mkdtemp(prefix="remediator-demo-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    environment = dict(story.environment)
    if story.policy_data is not None:
        policy_file = work_dir / "policy-data.json"
        policy_file.write_text(json.dumps(story.policy_data), encoding="utf-8")
        environment["REMEDIATOR_POLICY_DATA_FILE"] = str(policy_file)
    stack = EmbeddedStack(work_dir=work_dir, layout=layout, environment=environment)
    try:
        with console.status("Starting the embedded stack..."):
            await stack.start()
        console.print(
            f"Stack up in {stack.timings['stack_start_seconds']:.1f} s "
            f"(layout {layout}, scenario {scenario}); Web UI at "
            f"{stack.dev_server.ui_url}"
        )
        console.print(story.description)
        await asyncio.sleep(BASELINE_SECONDS)
        incidents = []
        try:
            for index in range(len(story.expected)):
                if index:
                    # The detector takes the first points of its window as the
                    # baseline, so the next bad deploy waits until the previous
                    # episode has left the evidence window.
                    await asyncio.sleep(stack.settings.signals.window_seconds)
                incidents.append(await _play_incident(stack, story, console))
        except (RuntimeError, TimeoutError, httpx.HTTPError, RPCError) as error:
            _print_failure(console, scenario, layout, story, incidents, error, as_json)
            return 1
        outcomes = [incident["outcome"] for incident in incidents]
        if history_dir is not None:
            await _save_histories(stack, scenario, incidents, history_dir)
        report = {
            **incidents[-1],
            "scenario": scenario,
            "layout": layout,
            "expected_outcomes": story.expected,
            "outcomes": outcomes,
            "incidents": incidents,
            "total_seconds": round(time.monotonic() - started, 2),
            "stack_start_seconds": stack.timings["stack_start_seconds"],
            "temporary_work_dir": temporary,
        }
        _print_report(console, report, as_json)
        if keep_running:
            env_file = write_operator_env(stack, work_dir)
            console.print(
                f"The stack stays up; open {report['web_ui_url']}. Ctrl-C stops it.\n"
                f"Operator commands in another shell: set -a; . {env_file}; set +a; "
                "then remediator list, or remediator sweep --dry-run"
            )
            await asyncio.Event().wait()
        return 0 if outcomes == story.expected else 1
    finally:
        await stack.stop()
        if temporary and not keep_running:
            shutil.rmtree(work_dir, ignore_errors=True)


async def _play_incident(
    stack: EmbeddedStack, story: Scenario, console: Console
) -> dict:
    """Deploy the bad image, fire the alert and follow the incident to its end."""
    timings: dict[str, float] = {}
    mark = time.monotonic()
    bad_commit = await asyncio.to_thread(
        push_image, stack.bare_path, stack.layout, DEMO_APP, BAD_IMAGE
    )
    console.print(f"Pushed bad image {BAD_IMAGE} as commit {bad_commit[:12]}.")
    await stack.wait_for_live_image(BAD_IMAGE)
    stack.outage = story.outage
    console.print("Argo CD stand-in synced the bad image; errors rise.")

    async with httpx.AsyncClient(
        base_url=stack.intake_url,
        timeout=10,
        headers={"Authorization": f"Bearer {stack.intake_token}"},
    ) as http:
        await wait_for_error_ratio(http, above=True)
        timings["bad_deploy_to_alert_seconds"] = round(time.monotonic() - mark, 2)
        alert_posted = time.monotonic()
        workflow_id = incident_workflow_id(DEMO_NAMESPACE, DEMO_APP)
        link = workflow_url(stack.settings.temporal, workflow_id)
        if story.trigger == "sweep":
            console.print("No alert is sent; running `remediator sweep`.")
            output = await run_sweep_command(stack)
            console.print(output.rstrip())
            if workflow_id not in output:
                raise RuntimeError(
                    f"remediator sweep did not open {workflow_id}; it printed:\n"
                    f"{output}"
                )
            console.print(f"The sweep opened incident {workflow_id}: {link}")
        else:
            body = alertmanager_body(DEMO_NAMESPACE, DEMO_APP, datetime.now(UTC))
            await post_alert(http, body)
            console.print(f"Alert posted; incident {workflow_id}: {link}")
        status, run_id = await _follow(
            stack, http, story, workflow_id, console, alert_posted, timings
        )
    stack.outage = False
    return {
        "workflow_id": workflow_id,
        "run_id": run_id,
        "outcome": status.outcome,
        "reasons": status.reasons,
        "stages": [stage.model_dump() for stage in status.stages],
        "merge_commit": status.merge_commit,
        "pull_request": status.pull_request.url if status.pull_request else "",
        "pull_request_state": status.pull_request.state if status.pull_request else "",
        "pull_request_draft": bool(status.pull_request and status.pull_request.draft),
        "alerts": [alert.model_dump(mode="json") for alert in status.alerts],
        "trace_id": status.trace_id,
        "web_ui_url": link,
        "bad_commit": bad_commit,
        "bad_image": BAD_IMAGE,
        "good_image": GOOD_IMAGE,
        "live_image": stack.standin.live_image(DEMO_APP),
        "timings": timings,
    }


async def _save_histories(
    stack: EmbeddedStack, scenario: str, incidents: list[dict], history_dir: Path
) -> None:
    """Write the histories of each incident, sweep and budget workflow as JSON."""
    history_dir.mkdir(parents=True, exist_ok=True)
    for index, incident in enumerate(incidents, start=1):
        handle = stack.client.get_workflow_handle(
            incident["workflow_id"], run_id=incident["run_id"]
        )
        history = await handle.fetch_history()
        path = history_dir / f"{scenario}-incident-{index}.json"
        path.write_text(history.to_json(), encoding="utf-8")
    sweeps = stack.client.list_workflows(f"WorkflowType = '{SWEEP_WORKFLOW}'")
    index = 0
    async for execution in sweeps:
        index += 1
        handle = stack.client.get_workflow_handle(execution.id, run_id=execution.run_id)
        path = history_dir / f"{scenario}-sweep-{index}.json"
        path.write_text((await handle.fetch_history()).to_json(), encoding="utf-8")
    budget = stack.client.get_workflow_handle(
        budget_workflow_id(DEMO_NAMESPACE, DEMO_APP)
    )
    try:
        history = await budget.fetch_history()
    except RPCError:
        return  # no incident reached the budget
    path = history_dir / f"{scenario}-budget.json"
    path.write_text(history.to_json(), encoding="utf-8")


def write_operator_env(stack: EmbeddedStack, work_dir: Path) -> Path:
    """Write the stack's settings, tokens left out, for operator commands."""
    path = work_dir / "operator.env"
    lines = [
        f"{name}={value}"
        for name, value in sorted(stack.environment.items())
        if not name.endswith("_TOKEN")
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


async def run_sweep_command(stack: EmbeddedStack) -> str:
    """Run `remediator sweep` on the stack as an operator would; return its output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "remediator",
        "sweep",
        env={**os.environ, **stack.environment},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), SWEEP_TIMEOUT_SECONDS)
    text = output.decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(
            f"remediator sweep exited {process.returncode}:\n{text[-2000:]}"
        )
    return text


async def post_alert(http: httpx.AsyncClient, body: dict) -> None:
    response = await http.post("/v1/alerts", json=body)
    if response.status_code != 202:
        raise RuntimeError(
            f"intake returned HTTP {response.status_code} for the alert: "
            f"{response.text}"
        )


async def wait_for_error_ratio(http: httpx.AsyncClient, above: bool) -> None:
    """Wait until every second of the last ALERT_FOR_SECONDS is above (or below)
    the alert threshold, as an alerting rule with `for:` decides."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = await http.get(
            f"/v1/signals/{DEMO_NAMESPACE}/{DEMO_APP}",
            params={"window_seconds": ALERT_FOR_SECONDS, "step_seconds": 1},
        )
        response.raise_for_status()
        ratios = [p.get("error_ratio") for p in response.json().get("points", [])]
        known = [r for r in ratios if r is not None]
        if len(known) >= ALERT_FOR_SECONDS and len(known) == len(ratios):
            if above and min(known) > ALERT_THRESHOLD:
                return
            if not above and max(known) < ALERT_THRESHOLD:
                return
        await asyncio.sleep(0.25)
    state = "above" if above else "below"
    raise TimeoutError(f"the error ratio never stayed {state} the alert threshold")


async def _follow(
    stack: EmbeddedStack,
    http: httpx.AsyncClient,
    story: Scenario,
    workflow_id: str,
    console: Console,
    alert_posted: float,
    timings: dict[str, float],
) -> tuple[IncidentStatus, str]:
    """Print each stage as the workflow enters it; return its result and run id."""
    handle = stack.client.get_workflow_handle(workflow_id, result_type=IncidentStatus)
    # The alert may have started a new run under an id an earlier incident used.
    description = await handle.describe()
    handle = stack.client.get_workflow_handle(
        workflow_id, run_id=description.run_id, result_type=IncidentStatus
    )
    result = asyncio.create_task(handle.result())
    hooks: list[asyncio.Task] = []
    seen = ""
    deadline = time.monotonic() + INCIDENT_TIMEOUT_SECONDS
    while not result.done():
        if time.monotonic() > deadline:
            result.cancel()
            limit = INCIDENT_TIMEOUT_SECONDS
            raise TimeoutError(f"incident {workflow_id} did not end in {limit:.0f} s")
        try:
            status = await handle.query("status", result_type=IncidentStatus)
        except Exception:  # noqa: BLE001 - the query can race the workflow's start
            status = None
        if status is not None and status.stage != seen:
            seen = status.stage
            if seen == Stage.WAIT_FOR_SYNC and "alert_to_merge_seconds" not in timings:
                timings["alert_to_merge_seconds"] = round(
                    time.monotonic() - alert_posted, 3
                )
            console.print(f"  stage {seen}")
            if seen == Stage.APPROVAL:
                console.print(
                    f"  waiting for a human: remediator approve {workflow_id} "
                    f"(or abort)"
                )
            if story.on_stage is not None:
                hooks.append(
                    asyncio.create_task(story.on_stage(stack, http, workflow_id, seen))
                )
        await asyncio.wait({result}, timeout=0.1)
    for hook in hooks:
        await hook
    try:
        return result.result(), description.run_id
    except WorkflowFailureError as err:
        raise RuntimeError(f"incident {workflow_id} failed: {err.cause}") from err


def _print_failure(
    console: Console,
    scenario: str,
    layout: str,
    story: Scenario,
    incidents: list[dict],
    error: Exception,
    as_json: bool,
) -> None:
    """Print why the demo stopped before its incidents ended. With `as_json`,
    print a report whose outcome is "error" too, so scripts always get JSON."""
    message = f"{type(error).__name__}: {error}"
    if as_json:
        report = {
            "scenario": scenario,
            "layout": layout,
            "outcome": "error",
            "error": message,
            "expected_outcomes": story.expected,
            "outcomes": [incident["outcome"] for incident in incidents],
            "incidents": incidents,
        }
        print(json.dumps(report, indent=2))
    console.print(f"[red]The demo stopped: {message}[/red]", highlight=False)


def _print_report(console: Console, report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    matched = report["outcomes"] == report["expected_outcomes"]
    colour = "green" if matched else "red"
    outcomes = ", ".join(report["outcomes"])
    console.print(f"\nOutcome: [{colour}]{outcomes}[/{colour}]", highlight=False)
    if not matched:
        expected = ", ".join(report["expected_outcomes"])
        console.print(f"Expected: {expected}")
    for reason in report["reasons"]:
        console.print(f"  - {reason}")
    console.print("Seconds per stage (last incident):")
    for stage in report["stages"]:
        console.print(f"  {stage['name']:<20} {stage['seconds']:>7.2f}")
    console.print(f"Merge commit:  {report['merge_commit'] or 'none'}")
    console.print(f"Pull request:  {report['pull_request'] or 'none'}")
    if report.get("temporary_work_dir"):
        console.print(
            "               (removed with the temporary directory; keep it with "
            "--work-dir DIR)"
        )
    console.print(f"Trace id:      {report['trace_id'] or 'none'}")
    console.print(f"Web UI:        {report['web_ui_url']}")
    console.print(f"Live image:    {report['live_image']}")
    console.print(f"Total:         {report['total_seconds']:.1f} s")
