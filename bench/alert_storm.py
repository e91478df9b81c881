"""Alert storm: alerts accepted per second by the intake, without workers.

Starts a Temporal dev server (temporary database file) and the intake
(`create_app` with a `TemporalStarter`). The intake runs in this process,
served by uvicorn on 127.0.0.1 with a bearer token. The benchmark then posts
1,000 Alertmanager version 4 alerts for 200 applications, 5 alerts per
application with distinct fingerprints, in two shapes:

- grouped: 50 bodies of 20 alerts (4 applications each), sent one at a time,
  as one Alertmanager receiver sends its groups;
- single: 1,000 bodies of one alert each, 16 in flight at a time.

The figure is alerts per second from the first post to the last 202. Each
shape runs --repetitions times, each repetition on its own namespace label, so
every repetition starts 200 new incidents. After each repetition the
benchmark counts the running `IncidentWorkflow` executions whose id starts
with `incident-<namespace>-` (visibility) and the `alert` signals in their
histories: both must match (200 incidents, 1,000 alerts). No worker runs, so
the workflows stay open; they are terminated at the end.

    .venv/bin/python bench/alert_storm.py [--repetitions 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import uvicorn
from temporalio.api.enums.v1 import EventType

from remediator.demo.stack import _settings_from
from remediator.devserver import free_port, start_dev_server
from remediator.intake.app import TemporalStarter, create_app
from remediator.temporal import connect
from workflows.models import incident_workflow_id

APPS = 200
ALERTS_PER_APP = 5
ALERTS_PER_BODY = 20
SINGLE_CONCURRENCY = 16
ALERTNAMES = (
    "HighErrorRatio",
    "HighLatencyP99",
    "PodRestarts",
    "LowAvailability",
    "SaturationHigh",
)


def app_name(index: int) -> str:
    return f"app-{index:03d}"


def make_alert(namespace: str, app: str, alertname: str, starts_at: str) -> dict:
    labels = {
        "alertname": alertname,
        "namespace": namespace,
        "app": app,
        "severity": "page",
    }
    fingerprint = hashlib.sha256(
        json.dumps(labels, sort_keys=True).encode()
    ).hexdigest()[:16]
    return {
        "status": "firing",
        "labels": labels,
        "annotations": {"summary": f"{alertname} on {namespace}/{app}"},
        "startsAt": starts_at,
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus.bench.localhost/graph",
        "fingerprint": fingerprint,
    }


def make_body(alerts: list[dict]) -> dict:
    common = {
        key: value
        for key, value in alerts[0]["labels"].items()
        if all(a["labels"].get(key) == value for a in alerts)
    }
    return {
        "version": "4",
        "groupKey": '{}:{namespace="' + alerts[0]["labels"]["namespace"] + '"}',
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "remediator",
        "groupLabels": {"namespace": alerts[0]["labels"]["namespace"]},
        "commonLabels": common,
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.bench.localhost",
        "alerts": alerts,
    }


def all_alerts(namespace: str) -> list[dict]:
    """Build 1,000 alerts in application order: the 5 alerts of app-000 come first."""
    starts_at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return [
        make_alert(namespace, app_name(index), alertname, starts_at)
        for index in range(APPS)
        for alertname in ALERTNAMES[:ALERTS_PER_APP]
    ]


def bodies_for(shape: str, namespace: str) -> list[dict]:
    alerts = all_alerts(namespace)
    if shape == "grouped":
        return [
            make_body(alerts[start : start + ALERTS_PER_BODY])
            for start in range(0, len(alerts), ALERTS_PER_BODY)
        ]
    return [make_body([alert]) for alert in alerts]


async def post_all(http: httpx.AsyncClient, bodies: list[dict], concurrency: int):
    """Post every body, `concurrency` at a time, and return seconds to the last 202."""
    encoded = [json.dumps(body).encode() for body in bodies]
    limit = asyncio.Semaphore(concurrency)
    statuses: list[int] = []

    async def send(content: bytes) -> None:
        async with limit:
            response = await http.post(
                "/v1/alerts",
                content=content,
                headers={"Content-Type": "application/json"},
            )
            statuses.append(response.status_code)
            if response.status_code != 202:
                raise RuntimeError(
                    f"intake responded {response.status_code}, expected 202: "
                    f"{response.text[:300]}"
                )

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for content in encoded:
            group.create_task(send(content))
    return time.perf_counter() - started, statuses


async def count_incidents(client, namespace: str, timeout: float = 30.0) -> dict:
    """Count running incidents of the namespace (visibility) and their alerts."""
    query = (
        'WorkflowType="IncidentWorkflow" AND ExecutionStatus="Running" '
        f'AND WorkflowId STARTS_WITH "incident-{namespace}-"'
    )
    deadline = time.monotonic() + timeout
    while True:
        ids = {execution.id async for execution in client.list_workflows(query)}
        if len(ids) >= APPS or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    expected = {incident_workflow_id(namespace, app_name(i)) for i in range(APPS)}
    limit = asyncio.Semaphore(16)

    async def signals_of(workflow_id: str) -> int:
        async with limit:
            history = await client.get_workflow_handle(workflow_id).fetch_history()
        return sum(
            1
            for event in history.events
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
        )

    signal_counts = await asyncio.gather(*(signals_of(i) for i in sorted(expected)))
    return {
        "running_incidents_visible": len(ids),
        "ids_match_expected": ids == expected,
        "alert_signals_in_histories": sum(signal_counts),
        "incidents_with_5_alerts": sum(1 for c in signal_counts if c == 5),
    }


async def terminate_all(client, namespaces: list[str]) -> int:
    limit = asyncio.Semaphore(16)
    ids = [
        incident_workflow_id(namespace, app_name(i))
        for namespace in namespaces
        for i in range(APPS)
    ]

    async def terminate(workflow_id: str) -> None:
        async with limit:
            await client.get_workflow_handle(workflow_id).terminate("benchmark ended")

    await asyncio.gather(*(terminate(i) for i in ids))
    return len(ids)


async def run(repetitions: int) -> dict:
    work_dir = Path(tempfile.mkdtemp(prefix="remediator-storm-"))
    dev_server = await asyncio.to_thread(
        start_dev_server,
        db_file=work_dir / "temporal.db",
        log_file=work_dir / "temporal.log",
    )
    port = free_port()
    token = secrets.token_urlsafe(24)
    settings = _settings_from(
        {
            "REMEDIATOR_TEMPORAL_ADDRESS": dev_server.address,
            "REMEDIATOR_TEMPORAL_UI_URL": dev_server.ui_url,
            "REMEDIATOR_INTAKE_HOST": "127.0.0.1",
            "REMEDIATOR_INTAKE_PORT": str(port),
            "REMEDIATOR_INTAKE_BEARER_TOKEN": token,
        }
    )
    server = None
    serve_task = None
    namespaces: list[str] = []
    results: dict[str, dict] = {}
    try:
        client = await connect(settings.temporal)
        app = create_app(settings, TemporalStarter(client, settings))
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        serve_task = asyncio.create_task(server.serve())
        while not server.started:
            if serve_task.done():
                serve_task.result()
            await asyncio.sleep(0.02)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            timeout=60,
            headers={"Authorization": f"Bearer {token}"},
        ) as http:
            # Warm up with one alert on its own namespace, outside the measurement.
            warm = make_body([all_alerts("storm-warmup")[0]])
            await post_all(http, [warm], 1)
            for shape, concurrency in (
                ("grouped", 1),
                ("single", SINGLE_CONCURRENCY),
            ):
                runs = []
                for repetition in range(1, repetitions + 1):
                    namespace = f"storm-{shape}-{repetition}"
                    namespaces.append(namespace)
                    bodies = bodies_for(shape, namespace)
                    seconds, statuses = await post_all(http, bodies, concurrency)
                    check = await count_incidents(client, namespace)
                    alerts = APPS * ALERTS_PER_APP
                    runs.append(
                        {
                            "namespace": namespace,
                            "bodies": len(bodies),
                            "accepted_202": statuses.count(202),
                            "seconds": round(seconds, 3),
                            "alerts_per_second": round(alerts / seconds, 1),
                            **check,
                        }
                    )
                    print(json.dumps(runs[-1]), flush=True)
                rates = [r["alerts_per_second"] for r in runs]
                results[shape] = {
                    "concurrency": concurrency,
                    "median_alerts_per_second": statistics.median(rates),
                    "runs": runs,
                }
        terminated = await terminate_all(client, namespaces)
        await client.get_workflow_handle(
            incident_workflow_id("storm-warmup", app_name(0))
        ).terminate("benchmark ended")
    finally:
        if server is not None:
            server.should_exit = True
            await asyncio.wait_for(serve_task, 10)
        await asyncio.to_thread(dev_server.stop)
    return {
        "alerts_per_repetition": APPS * ALERTS_PER_APP,
        "applications_per_repetition": APPS,
        "repetitions": repetitions,
        "terminated_workflows": terminated + 1,
        **results,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    args = parser.parse_args()
    results = asyncio.run(run(args.repetitions))
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
