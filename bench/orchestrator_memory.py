"""Orchestrator memory: resident memory of one worker holding open incidents.

Starts a Temporal dev server (temporary database file), a stand-in golden-signal
store on 127.0.0.1 that returns, for every `GET /v1/signals/{namespace}/{app}`,
the same breaching evidence (an error ratio of 0.3 over the whole
window), and ONE orchestrator worker process (`python -m remediator worker
orchestrator`). No detection worker runs. The benchmark then starts
--incidents `IncidentWorkflow` executions by signal-with-start, built as the
intake builds them, except that `detection_timeout_seconds` is 86400, so each
incident parks at step 2 with its `score_series` activity scheduled on the
unpolled detection queue. `find_change` fails beside it (the Argo CD URL is
a closed 127.0.0.1 port) and gives up after its retries. The incident still
waits on detection, because the workflow acts on a failed step only after
every fact-gathering step has ended.

The worker's resident set (VmRSS from /proc) is read after its queue has a
poller (before), and once every incident is parked, meaning its only pending
activity is `score_series` (after). Incidents start in batches of --batch
(100 by default), each once the previous batch is parked, and the reading is
also taken after every batch. The growth from the first batch to the last is
the cost of one more incident without the worker's one-time warm-up
(imports, connection pools, the policy engine). Every workflow is terminated
at the end.

Batches keep the measurement about memory. Started at once on two shared
cores, 900 incidents overloaded the worker: workflow tasks ran over 5 s while
their `collect_evidence` local activities waited, and workflow task timeouts
discarded local activity results. Fewer than 140 of them had parked after
4 minutes.

The worker uses the SDK's default workflow cache, `max_cached_workflows` =
1000 (temporalio 1.35). With more than 1,000 open incidents the cache evicts,
so the figure is expected to stop growing per incident (not measured).

    .venv/bin/python bench/orchestrator_memory.py [--incidents 1000] [--batch 100]
        [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import temporalio
import uvicorn
from fastapi import FastAPI
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.worker import Worker

from remediator.demo.stack import _settings_from, task_queue_has_pollers
from remediator.devserver import free_port, start_dev_server, stop_with_parent
from remediator.intake.app import ALERT_SIGNAL, build_incident_input
from remediator.temporal import connect
from workflows.models import (
    INCIDENT_WORKFLOW,
    AlertSignal,
    Evidence,
    SignalPoint,
    incident_workflow_id,
)

NAMESPACE = "memory"
NO_DETECTION_QUEUE = "bench-detection-nobody-polls"
PARKED_ACTIVITY = "score_series"
MAX_POINTS = 240


def rss_mib(pid: int) -> float:
    """Return the resident set of a process in MiB, read from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"VmRSS missing from /proc/{pid}/status")


def signal_store() -> FastAPI:
    """Build a stand-in for the intake's signal read that returns breaching evidence."""
    api = FastAPI()

    @api.get("/v1/signals/{namespace}/{app}")
    async def signals(
        namespace: str, app: str, window_seconds: float, step_seconds: float, end: str
    ) -> dict:
        stop = datetime.fromisoformat(end)
        count = max(1, min(MAX_POINTS, int(window_seconds // step_seconds)))
        points = [
            SignalPoint(
                end=stop - timedelta(seconds=step_seconds * (count - 1 - i)),
                requests=100.0,
                errors=30.0,
                error_ratio=0.3,
                latency_p99_seconds=0.25,
            )
            for i in range(count)
        ]
        evidence = Evidence(
            namespace=namespace,
            app=app,
            has_data=True,
            request_rate=100.0 / step_seconds,
            error_ratio=0.3,
            latency_p99_seconds=0.25,
            points=points,
        )
        return evidence.model_dump(mode="json")

    return api


async def serve(app: FastAPI, port: int) -> tuple[uvicorn.Server, asyncio.Task]:
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    return server, task


async def start_incidents(client, settings, first: int, stop: int) -> list[str]:
    limit = asyncio.Semaphore(16)
    ids: list[str] = []

    async def start(index: int) -> None:
        app = f"app-{index:04d}"
        workflow_id = incident_workflow_id(NAMESPACE, app)
        entry = SimpleNamespace(
            workflow_id=workflow_id,
            namespace=NAMESPACE,
            app=app,
            trace_id=secrets.token_hex(16),
        )
        incident = build_incident_input(entry, settings)
        incident.config.detection_timeout_seconds = 86400.0
        alert = AlertSignal(
            fingerprint=secrets.token_hex(8),
            status="firing",
            alertname="HighErrorRatio",
            labels={"alertname": "HighErrorRatio", "namespace": NAMESPACE, "app": app},
            starts_at=datetime.now(UTC).isoformat(),
        )
        async with limit:
            await client.start_workflow(
                INCIDENT_WORKFLOW,
                incident,
                id=workflow_id,
                task_queue=settings.temporal.task_queue,
                start_signal=ALERT_SIGNAL,
                start_signal_args=[alert],
            )
        ids.append(workflow_id)

    await asyncio.gather(*(start(i) for i in range(first, stop)))
    return sorted(ids)


async def parked_states(client, ids: list[str]) -> list[tuple[bool, bool]]:
    """Return (running, parked) of each incident.

    An incident is parked when `score_series` is its only pending activity.
    """
    limit = asyncio.Semaphore(16)

    async def state(workflow_id: str) -> tuple[bool, bool]:
        async with limit:
            described = await client.get_workflow_handle(workflow_id).describe()
        raw = described.raw_description
        running = described.status is not None and described.status.name == "RUNNING"
        pending = [p.activity_type.name for p in raw.pending_activities]
        return running, running and pending == [PARKED_ACTIVITY]

    return await asyncio.gather(*(state(i) for i in ids))


async def wait_parked(
    client, ids: list[str], worker: subprocess.Popen, log: str, timeout: float
) -> tuple[int, int, list[float]]:
    """Wait until every incident is parked, then sample the worker's RSS for 10 s."""

    deadline = time.monotonic() + timeout
    waiting = list(ids)
    while waiting and time.monotonic() < deadline:
        states = await parked_states(client, waiting)
        waiting = [
            i for i, (_, parked) in zip(waiting, states, strict=True) if not parked
        ]
        print(
            f"{len(ids) - len(waiting)} of {len(ids)} parked, "
            f"RSS {rss_mib(worker.pid):.1f} MiB",
            flush=True,
        )
        if not waiting:
            break
        if worker.poll() is not None:
            raise RuntimeError(
                f"worker exited with status {worker.returncode}; see {log}"
            )
        await asyncio.sleep(3)
    # Let the worker settle, then sample its resident set.
    await asyncio.sleep(5)
    samples = []
    for _ in range(10):
        samples.append(rss_mib(worker.pid))
        await asyncio.sleep(1)
    states = await parked_states(client, ids)
    running = sum(r for r, _ in states)
    parked = sum(p for _, p in states)
    return running, parked, samples


async def terminate_all(client, ids: list[str]) -> None:
    limit = asyncio.Semaphore(16)

    async def terminate(workflow_id: str) -> None:
        async with limit:
            await client.get_workflow_handle(workflow_id).terminate("benchmark ended")

    await asyncio.gather(*(terminate(i) for i in ids))


async def run(incidents: int, batch: int, park_timeout: float) -> dict:
    work_dir = Path(tempfile.mkdtemp(prefix="remediator-memory-"))
    dev_server = await asyncio.to_thread(
        start_dev_server,
        db_file=work_dir / "temporal.db",
        log_file=work_dir / "temporal.log",
    )
    store_port = free_port()
    environment = {
        "REMEDIATOR_TEMPORAL_ADDRESS": dev_server.address,
        "REMEDIATOR_TEMPORAL_UI_URL": dev_server.ui_url,
        "REMEDIATOR_TEMPORAL_DETECTION_TASK_QUEUE": NO_DETECTION_QUEUE,
        "REMEDIATOR_INTAKE_URL": f"http://127.0.0.1:{store_port}",
        "REMEDIATOR_INTAKE_BEARER_TOKEN": secrets.token_urlsafe(24),
        # Nothing listens there, so find_change fails fast and gives up after retries.
        "REMEDIATOR_ARGOCD_URL": f"http://127.0.0.1:{free_port()}",
        "REMEDIATOR_ARGOCD_TOKEN": secrets.token_urlsafe(24),
        "REMEDIATOR_GIT_WORK_DIR": str(work_dir / "git-work"),
        "REMEDIATOR_WORKER_HEALTH_PORT": str(free_port()),
    }
    settings = _settings_from(environment)
    store, store_task = await serve(signal_store(), store_port)
    log = open(work_dir / "worker-orchestrator.log", "ab")
    worker = subprocess.Popen(
        [sys.executable, "-m", "remediator", "worker", "orchestrator"],
        env={**os.environ, **environment},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=stop_with_parent,
    )
    ids: list[str] = []
    try:
        client = await connect(settings.temporal)
        deadline = time.monotonic() + 60
        while not await task_queue_has_pollers(
            client,
            settings.temporal.task_queue,
            TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
        ):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"worker did not poll its task queue within 60 s; see {log.name}"
                )
            await asyncio.sleep(0.1)
        await asyncio.sleep(3)
        before = rss_mib(worker.pid)
        print(f"worker RSS before: {before:.1f} MiB", flush=True)

        stages = []
        started = time.monotonic()
        for target in [*range(batch, incidents, batch), incidents]:
            ids += await start_incidents(client, settings, len(ids), target)
            print(f"started {len(ids)} incidents", flush=True)
            running, parked, samples = await wait_parked(
                client, ids, worker, log.name, park_timeout
            )
            stages.append(
                {
                    "incidents": len(ids),
                    "running": running,
                    "parked": parked,
                    "seconds_since_first_start": round(time.monotonic() - started, 1),
                    "rss_mib": round(samples[-1], 1),
                    "rss_max_mib": round(max(samples), 1),
                }
            )
            print(json.dumps(stages[-1]), flush=True)
    finally:
        if ids:
            await terminate_all(client, ids)
        if worker.poll() is None:
            worker.terminate()
            try:
                await asyncio.to_thread(worker.wait, 30)
            except subprocess.TimeoutExpired:
                worker.kill()
        store.should_exit = True
        await asyncio.wait_for(store_task, 10)
        await asyncio.to_thread(dev_server.stop)
    cache_default = (
        inspect.signature(Worker.__init__).parameters["max_cached_workflows"].default
    )
    last, first = stages[-1], stages[0]
    marginal = None
    if last["incidents"] > first["incidents"]:
        marginal = (last["rss_mib"] - first["rss_mib"]) / (
            last["incidents"] - first["incidents"]
        )
    return {
        "incidents": incidents,
        "running_at_end": last["running"],
        "parked_at_end": last["parked"],
        "rss_before_mib": round(before, 1),
        "rss_after_mib": last["rss_mib"],
        "rss_growth_mib": round(last["rss_mib"] - before, 1),
        "mib_per_incident": round((last["rss_mib"] - before) / incidents, 3),
        "marginal_mib_per_incident": round(marginal, 3)
        if marginal is not None
        else None,
        "stages": stages,
        "max_cached_workflows": cache_default,
        "temporalio": temporalio.__version__,
        "worker_log": log.name,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--incidents", type=int, default=1000)
    parser.add_argument(
        "--batch",
        type=int,
        default=100,
        help="incidents started at once. The next batch starts once all are parked",
    )
    parser.add_argument("--park-timeout", type=float, default=600.0)
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    args = parser.parse_args()
    results = asyncio.run(run(args.incidents, args.batch, args.park_timeout))
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
