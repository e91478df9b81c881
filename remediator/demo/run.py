"""`remediator demo`: one incident from a bad deploy to a verified rollback.

The demo starts the embedded stack, lets the application serve a baseline on
the good image, pushes the bad image through the GitOps repository, waits until
the error ratio has stayed high for a few seconds (as a Prometheus alerting rule
with `for:` would), posts the Alertmanager webhook body to the intake and
follows the incident workflow to its outcome.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
from rich.console import Console
from temporalio.client import WorkflowFailureError

from remediator.demo.seed import push_image
from remediator.demo.stack import (
    BAD_IMAGE,
    DEMO_APP,
    DEMO_NAMESPACE,
    GOOD_IMAGE,
    EmbeddedStack,
)
from remediator.temporal import workflow_url
from workflows.models import IncidentStatus, Outcome, incident_workflow_id

BASELINE_SECONDS = 6.0
ALERT_FOR_SECONDS = 3.0
ALERT_THRESHOLD = 0.1
INCIDENT_TIMEOUT_SECONDS = 120.0


def alertmanager_body(namespace: str, app: str, starts_at: datetime) -> dict:
    """Build the webhook body Alertmanager sends for the demo's alert (version 4)."""
    labels = {
        "alertname": "HighErrorRatio",
        "namespace": namespace,
        "app": app,
        "severity": "page",
    }
    fingerprint = hashlib.sha256(
        json.dumps(labels, sort_keys=True).encode()
    ).hexdigest()[:16]
    alert = {
        "status": "firing",
        "labels": labels,
        "annotations": {
            "summary": f"{app} answers more than 10% of requests with 5xx",
        },
        "startsAt": starts_at.isoformat().replace("+00:00", "Z"),
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus.demo.localhost/graph",
        "fingerprint": fingerprint,
    }
    return {
        "version": "4",
        "groupKey": '{}:{alertname="HighErrorRatio"}',
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "remediator",
        "groupLabels": {"alertname": "HighErrorRatio"},
        "commonLabels": labels,
        "commonAnnotations": alert["annotations"],
        "externalURL": "http://alertmanager.demo.localhost",
        "alerts": [alert],
    }


async def run_demo(
    layout: str = "plain",
    as_json: bool = False,
    keep_running: bool = False,
    work_dir: Path | None = None,
) -> int:
    """Run the demo and return the exit status: 0 only when recovered."""
    console = Console(stderr=as_json)
    started = time.monotonic()
    temporary = work_dir is None
    work_dir = work_dir or Path(tempfile.mkdtemp(prefix="remediator-demo-"))
    stack = EmbeddedStack(work_dir=work_dir, layout=layout)
    try:
        with console.status("Starting the embedded stack..."):
            await stack.start()
        console.print(
            f"Stack up in {stack.timings['stack_start_seconds']:.1f} s "
            f"(layout {layout}); Web UI at {stack.dev_server.ui_url}"
        )
        report = await _run_incident(stack, console)
        report["layout"] = layout
        report["total_seconds"] = round(time.monotonic() - started, 2)
        report["stack_start_seconds"] = stack.timings["stack_start_seconds"]
        _print_report(console, report, as_json)
        if keep_running:
            console.print(
                f"The stack stays up; open {report['web_ui_url']}. Ctrl-C stops it."
            )
            await asyncio.Event().wait()
        return 0 if report["outcome"] == Outcome.RECOVERED else 1
    finally:
        await stack.stop()
        if temporary and not keep_running:
            shutil.rmtree(work_dir, ignore_errors=True)


async def _run_incident(stack: EmbeddedStack, console: Console) -> dict:
    timings: dict[str, float] = {}

    # Baseline: the good image serves long enough for the detector's history.
    await asyncio.sleep(BASELINE_SECONDS)

    mark = time.monotonic()
    bad_commit = await asyncio.to_thread(
        push_image, stack.bare_path, stack.layout, DEMO_APP, BAD_IMAGE
    )
    console.print(f"Pushed bad image {BAD_IMAGE} as commit {bad_commit[:12]}.")
    await stack.wait_for_live_image(BAD_IMAGE)
    console.print("Argo CD stand-in synced the bad image; errors rise.")

    async with httpx.AsyncClient(
        base_url=stack.intake_url,
        timeout=10,
        headers={"Authorization": f"Bearer {stack.intake_token}"},
    ) as http:
        fired_at = await _wait_for_alert_condition(http)
        timings["bad_deploy_to_alert_seconds"] = round(time.monotonic() - mark, 2)
        body = alertmanager_body(DEMO_NAMESPACE, DEMO_APP, fired_at)
        alert_posted = time.monotonic()
        response = await http.post("/v1/alerts", json=body)
    if response.status_code != 202:
        raise RuntimeError(
            f"intake answered {response.status_code} to the alert: {response.text}"
        )
    workflow_id = incident_workflow_id(DEMO_NAMESPACE, DEMO_APP)
    link = workflow_url(stack.settings.temporal, workflow_id)
    console.print(f"Alert posted; incident {workflow_id} started: {link}")

    status = await _follow(stack, workflow_id, console, alert_posted, timings)
    return {
        "workflow_id": workflow_id,
        "outcome": status.outcome,
        "reasons": status.reasons,
        "stages": [stage.model_dump() for stage in status.stages],
        "merge_commit": status.merge_commit,
        "pull_request": status.pull_request.url if status.pull_request else "",
        "trace_id": status.trace_id,
        "web_ui_url": link,
        "bad_commit": bad_commit,
        "bad_image": BAD_IMAGE,
        "good_image": GOOD_IMAGE,
        "live_image": stack.standin.live_image(DEMO_APP),
        "timings": timings,
    }


async def _wait_for_alert_condition(http: httpx.AsyncClient) -> datetime:
    """Wait until the error ratio stays above the threshold for ALERT_FOR_SECONDS."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = await http.get(
            f"/v1/signals/{DEMO_NAMESPACE}/{DEMO_APP}",
            params={"window_seconds": ALERT_FOR_SECONDS, "step_seconds": 1},
        )
        response.raise_for_status()
        points = response.json().get("points", [])
        ratios = [p.get("error_ratio") for p in points]
        if (
            len(ratios) >= ALERT_FOR_SECONDS
            and all(r is not None for r in ratios)
            and min(ratios) > ALERT_THRESHOLD
        ):
            return datetime.now(UTC)
        await asyncio.sleep(0.25)
    raise TimeoutError("the error ratio never crossed the demo's alert threshold")


async def _follow(
    stack: EmbeddedStack,
    workflow_id: str,
    console: Console,
    alert_posted: float,
    timings: dict[str, float],
) -> IncidentStatus:
    """Print each stage as the workflow enters it, then return its result."""
    handle = stack.client.get_workflow_handle(workflow_id, result_type=IncidentStatus)
    result = asyncio.create_task(handle.result())
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
            if seen == "wait-for-sync" and "alert_to_merge_seconds" not in timings:
                timings["alert_to_merge_seconds"] = round(
                    time.monotonic() - alert_posted, 3
                )
            console.print(f"  stage {seen}")
        await asyncio.wait({result}, timeout=0.1)
    try:
        return result.result()
    except WorkflowFailureError as err:
        raise RuntimeError(f"incident {workflow_id} failed: {err.cause}") from err


def _print_report(console: Console, report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    colour = "green" if report["outcome"] == Outcome.RECOVERED else "red"
    console.print(f"\nOutcome: [{colour}]{report['outcome']}[/{colour}]")
    for reason in report["reasons"]:
        console.print(f"  - {reason}")
    console.print("Seconds per stage:")
    for stage in report["stages"]:
        console.print(f"  {stage['name']:<20} {stage['seconds']:>7.2f}")
    console.print(f"Merge commit:  {report['merge_commit'] or 'none'}")
    console.print(f"Pull request:  {report['pull_request'] or 'none'}")
    console.print(f"Trace id:      {report['trace_id'] or 'none'}")
    console.print(f"Web UI:        {report['web_ui_url']}")
    console.print(f"Live image:    {report['live_image']}")
    console.print(f"Total:         {report['total_seconds']:.1f} s")
