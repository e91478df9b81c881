"""The worker's health endpoint against a real Temporal dev server.

`run_worker("detection", ...)` runs as it does under `remediator worker
detection`, with a stop event in place of SIGTERM, so the test covers the
process's own code path: /healthz returns 200 as soon as the process listens,
/readyz is 503 until Temporal lists a poller with the worker's identity on
its task queue, 200 once it does, and 503 again from the stop signal on.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from remediator.settings import Settings, TemporalSettings, WorkerSettings
from workers.runner import WorkerHealth, run_worker

pytestmark = pytest.mark.integration


def _settings(env: WorkflowEnvironment, task_queue: str, port: int) -> Settings:
    return Settings(
        temporal=TemporalSettings(
            address=env.client.service_client.config.target_host,
            namespace=env.client.namespace,
            detection_task_queue=task_queue,
            search_attributes=False,
        ),
        worker=WorkerSettings(
            health_host="127.0.0.1", health_port=port, ready_cache_seconds=0.2
        ),
    )


async def _get(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5) as http:
        return await http.get(url)


async def _wait_for_status(url: str, status: int, seconds: float) -> httpx.Response:
    deadline = time.monotonic() + seconds
    while True:
        try:
            response = await _get(url)
            if response.status_code == status or time.monotonic() > deadline:
                return response
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.2)


async def test_readyz_follows_polling(local_env: WorkflowEnvironment, task_queue: str):
    # Bind a free port first, so the worker process's endpoint gets a known one.
    probe = WorkerHealth(WorkerSettings())
    await probe.start("127.0.0.1", 0)
    port = probe.port
    await probe.close()
    assert port

    base = f"http://127.0.0.1:{port}"
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_worker("detection", _settings(local_env, task_queue, port), stop)
    )
    try:
        alive = await _wait_for_status(f"{base}/healthz", 200, 10)
        assert alive.status_code == 200
        assert alive.json() == {"status": "alive"}

        ready = await _wait_for_status(f"{base}/readyz", 200, 20)
        assert ready.status_code == 200, ready.text
        assert ready.json()["ready"] is True
        assert task_queue in ready.json()["reason"]

        stop.set()
        draining = await _get(f"{base}/readyz")
        assert draining.status_code == 503
        assert "draining" in draining.json()["reason"]
        await asyncio.wait_for(task, 30)
    finally:
        stop.set()
        if not task.done():
            task.cancel()
    with pytest.raises(httpx.TransportError):
        await _get(f"{base}/healthz")


async def test_readyz_is_503_before_the_worker_polls(
    local_env: WorkflowEnvironment, task_queue: str
):
    health = WorkerHealth(WorkerSettings(ready_cache_seconds=0))
    await health.start("127.0.0.1", 0)
    base = f"http://127.0.0.1:{health.port}"
    try:
        alive = await _get(f"{base}/healthz")
        assert alive.status_code == 200
        not_started = await _get(f"{base}/readyz")
        assert not_started.status_code == 503
        assert "not started" in not_started.json()["reason"]
        missing = await _get(f"{base}/nothing")
        assert missing.status_code == 404
    finally:
        await health.close()


async def test_readyz_is_503_for_a_queue_nobody_polls(
    local_env: WorkflowEnvironment, task_queue: str
):
    """A worker built but never run has no poller, so it is not ready."""
    from temporalio.worker import Worker

    from activities.detection import DetectionActivities
    from workers.runner import polled_queue

    detection = DetectionActivities()
    worker = Worker(
        local_env.client,
        task_queue=f"{task_queue}-idle",
        activities=[detection.score_series],
    )
    health = WorkerHealth(WorkerSettings(ready_cache_seconds=0))
    health.watch(polled_queue(worker, local_env.client))
    answer = await health.readiness()
    assert not answer.ready
    assert "no TASK_QUEUE_TYPE_ACTIVITY poller" in answer.reason
