"""The detection worker process's start line and its drain on a stop signal.

`run_worker("detection", ...)` runs as under `remediator worker detection`,
with a stop event in place of SIGTERM. Scoring is slowed down so that the
stop arrives while an activity runs: the worker must finish that activity and
return its verdicts before it leaves.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from datetime import timedelta

import pytest
from temporalio import workflow
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

import activities.detection as detection
from remediator.settings import DetectionSettings, Settings, TemporalSettings
from workers.runner import run_worker
from workflows.models import DetectionInput, DetectionResult, Series

pytestmark = pytest.mark.integration


@workflow.defn(sandboxed=False)
class ScoreOnce:
    @workflow.run
    async def run(self, queue: str) -> DetectionResult:
        return await workflow.execute_activity(
            "score_series",
            DetectionInput(
                series=[
                    Series(
                        key="shop/cart:error_ratio",
                        step_seconds=15,
                        values=[0.01] * 40 + [0.4] * 10,
                    )
                ]
            ),
            result_type=DetectionResult,
            task_queue=queue,
            start_to_close_timeout=timedelta(seconds=60),
        )


@pytest.mark.asyncio
async def test_stop_signal_lets_the_running_activity_finish(
    local_env: WorkflowEnvironment,
    task_queue: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="workers.detection")
    started = threading.Event()
    real = detection.score_detection_input

    def slow(input, backend=None):
        started.set()
        time.sleep(2.0)
        return real(input, backend)

    monkeypatch.setattr(detection, "score_detection_input", slow)
    settings = Settings(
        temporal=TemporalSettings(
            address=local_env.client.service_client.config.target_host,
            namespace=local_env.client.namespace,
            detection_task_queue=task_queue,
        ),
        detection=DetectionSettings(device="cpu", max_concurrent_activities=1),
    )
    stop = asyncio.Event()
    worker_task = asyncio.create_task(run_worker("detection", settings, stop))
    async with Worker(
        local_env.client, task_queue=f"{task_queue}-wf", workflows=[ScoreOnce]
    ):
        handle = await local_env.client.start_workflow(
            ScoreOnce.run,
            task_queue,
            id=f"score-{uuid.uuid4()}",
            task_queue=f"{task_queue}-wf",
        )
        assert await asyncio.to_thread(started.wait, 30)
        stop.set()
        await asyncio.wait_for(worker_task, 30)
        result = await asyncio.wait_for(handle.result(), 30)

    assert result.verdicts[0].anomalous
    assert result.device == "cpu"
    lines = [r.getMessage() for r in caplog.records if r.name == "workers.detection"]
    assert any("Detection worker scores with numpy" in line for line in lines)
    assert any("per batch" in line for line in lines)


@pytest.mark.asyncio
async def test_cuda_without_gpu_stops_with_reason(
    local_env: WorkflowEnvironment, task_queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import activities.detection_backend as backend

    # Whatever this machine has, the worker must find no CUDA device.
    monkeypatch.setattr(backend, "_cuda_backend", lambda memory_fraction: None)
    settings = Settings(
        temporal=TemporalSettings(
            address=local_env.client.service_client.config.target_host,
            namespace=local_env.client.namespace,
            detection_task_queue=task_queue,
        ),
        detection=DetectionSettings(device="cuda"),
    )
    with pytest.raises(SystemExit) as stopped:
        await run_worker("detection", settings, asyncio.Event())
    message = str(stopped.value.code)
    assert message.startswith("Worker detection cannot start:")
    assert "REMEDIATOR_DETECTION_DEVICE is cuda" in message
    assert "set REMEDIATOR_DETECTION_DEVICE to auto or cpu" in message
