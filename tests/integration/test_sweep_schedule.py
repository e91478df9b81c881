"""The sweep's Schedule and its `open_incident` activity on a real dev server.

The Schedule is created, updated, triggered and deleted through the functions
behind `remediator sweep schedule|unschedule`, and the sweep it starts runs on
workers with the fake fleet of the workflow tests. `open_incident` starts a
real `IncidentWorkflow` through signal-with-start; no worker runs that
workflow, so the test reads the signal from the history.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import uuid

import pytest
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Worker

from activities.incidents import SWEEP_ALERT_NAME, IncidentActivities
from remediator.devserver import free_port
from remediator.settings import Settings, SweepSettings, TemporalSettings
from remediator.sweep import (
    SweepSettingsError,
    run_sweep_command,
    schedule_sweep,
    sweep_input,
    unschedule_sweep,
)
from tests.workflow.test_sweep import FakeFleet
from workers.runner import ensure_sweep_schedule
from workflows.models import OpenIncidentInput, SweepFinding, SweepResult
from workflows.sweep import DetectionSweepWorkflow


def settings_for(task_queue: str, **sweep: object) -> Settings:
    return Settings(
        temporal=TemporalSettings(
            task_queue=task_queue, detection_task_queue=f"{task_queue}-detection"
        ),
        sweep=SweepSettings(
            applications="shop/cart,shop/checkout",
            schedule_id=f"sweep-{uuid.uuid4().hex[:8]}",
            **sweep,
        ),
    )


async def wait_for_sweep(client: Client, workflow_id: str) -> SweepResult:
    """Wait until the Schedule's first sweep has completed, and return its result."""
    for _ in range(300):
        async for execution in client.list_workflows(
            f"WorkflowType = 'DetectionSweepWorkflow' AND "
            f"WorkflowId STARTS_WITH '{workflow_id}' AND ExecutionStatus = 'Completed'"
        ):
            handle = client.get_workflow_handle(
                execution.id, run_id=execution.run_id, result_type=SweepResult
            )
            return await handle.result()
        await asyncio.sleep(0.1)
    raise AssertionError(f"no completed sweep under {workflow_id}")


@pytest.mark.asyncio
async def test_schedule_runs_updates_and_deletes(
    local_env: WorkflowEnvironment, task_queue: str
) -> None:
    client = local_env.client
    settings = settings_for(task_queue, interval_seconds=3600)
    fleet = FakeFleet({"shop/cart": 0.4, "shop/checkout": 0.01})
    schedule_id = await schedule_sweep(client, settings, sweep_input(settings))
    handle = client.get_schedule_handle(schedule_id)
    async with (
        Worker(
            client,
            task_queue=task_queue,
            workflows=[DetectionSweepWorkflow],
            activities=fleet.activities(),
        ),
        Worker(
            client,
            task_queue=f"{task_queue}-detection",
            activities=fleet.detection(),
        ),
    ):
        await handle.trigger()
        result = await wait_for_sweep(client, f"sweep-{schedule_id}")
    assert [f.application for f in result.findings] == ["shop/cart"]
    assert [(i.namespace, i.app) for i in fleet.opened] == [("shop", "cart")]

    # Scheduling again updates the Schedule in place.
    settings.sweep.interval_seconds = 600
    assert await schedule_sweep(client, settings, sweep_input(settings)) == schedule_id
    description = await handle.describe()
    assert description.schedule.spec.intervals[0].every.total_seconds() == 600
    assert description.schedule.policy.overlap.name == "SKIP"

    await unschedule_sweep(client, settings)
    ids = [s.id async for s in await client.list_schedules()]
    assert schedule_id not in ids


async def schedule_ids(client: Client) -> list[str]:
    return [s.id async for s in await client.list_schedules()]


@pytest.mark.asyncio
async def test_worker_start_syncs_schedule(
    local_env: WorkflowEnvironment, task_queue: str, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="workers.runner")
    client = local_env.client
    settings = settings_for(task_queue, interval_seconds=900, schedule_on_start=True)
    schedule_id = settings.sweep.schedule_id

    await ensure_sweep_schedule(client, settings)
    handle = client.get_schedule_handle(schedule_id)
    description = await handle.describe()
    assert description.schedule.spec.intervals[0].every.total_seconds() == 900

    # A restart with other settings updates the same Schedule.
    settings.sweep.interval_seconds = 1200
    await ensure_sweep_schedule(client, settings)
    description = await handle.describe()
    assert description.schedule.spec.intervals[0].every.total_seconds() == 1200

    # Opting every application out deletes it. A second start changes nothing.
    settings.sweep.applications = ""
    await ensure_sweep_schedule(client, settings)
    assert schedule_id not in await schedule_ids(client)
    await ensure_sweep_schedule(client, settings)
    assert "there is no sweep Schedule" in caplog.text


@pytest.mark.asyncio
async def test_bad_sweep_settings_stop_worker(
    local_env: WorkflowEnvironment, task_queue: str
) -> None:
    settings = settings_for(task_queue, interval_seconds=1, schedule_on_start=True)
    with pytest.raises(SystemExit, match="INTERVAL_SECONDS is 1"):
        await ensure_sweep_schedule(local_env.client, settings)
    assert settings.sweep.schedule_id not in await schedule_ids(local_env.client)


@pytest.mark.asyncio
async def test_short_interval_is_rejected(
    local_env: WorkflowEnvironment, task_queue: str
) -> None:
    settings = settings_for(task_queue, interval_seconds=1)
    with pytest.raises(SweepSettingsError, match="INTERVAL_SECONDS"):
        await schedule_sweep(local_env.client, settings, sweep_input(settings))


@pytest.mark.asyncio
async def test_open_incident_starts_then_signals(
    local_env: WorkflowEnvironment, task_queue: str
) -> None:
    settings = settings_for(task_queue)
    app = f"app-{uuid.uuid4().hex[:8]}"
    finding = SweepFinding(
        application=f"shop/{app}",
        series=f"shop/{app}:error_ratio",
        score=0.95,
        sustained_seconds=120,
    )
    activities = IncidentActivities(local_env.client, settings)
    input = OpenIncidentInput(namespace="shop", app=app, finding=finding, sweep_id="s1")
    first = await ActivityEnvironment().run(activities.open_incident, input)
    second = await ActivityEnvironment().run(activities.open_incident, input)
    assert first == second == f"incident-shop-{app}"

    handle = local_env.client.get_workflow_handle(first)
    description = await handle.describe()
    assert description.status == WorkflowExecutionStatus.RUNNING
    signals = [
        event
        async for event in handle.fetch_history_events()
        if event.HasField("workflow_execution_signaled_event_attributes")
    ]
    assert len(signals) == 2
    payload = signals[0].workflow_execution_signaled_event_attributes.input
    assert SWEEP_ALERT_NAME.encode() in payload.payloads[0].data
    await handle.terminate("test done")


@pytest.mark.asyncio
async def test_open_incident_rejects_invalid_names(
    local_env: WorkflowEnvironment,
) -> None:
    finding = SweepFinding(
        application="Shop/cart", series="x", score=1, sustained_seconds=1
    )
    activities = IncidentActivities(local_env.client, Settings())
    with pytest.raises(Exception, match="DNS-1123"):
        await ActivityEnvironment().run(
            activities.open_incident,
            OpenIncidentInput(namespace="Shop", app="cart", finding=finding),
        )


def command_args(action: str) -> argparse.Namespace:
    return argparse.Namespace(action=action, app=None, dry_run=True, json=False)


def connected_settings(env: WorkflowEnvironment, task_queue: str) -> Settings:
    settings = settings_for(task_queue)
    settings.temporal.address = env.client.service_client.config.target_host
    settings.temporal.namespace = env.client.namespace
    return settings


@pytest.mark.asyncio
async def test_sweep_without_workers_names_queue(
    local_env: WorkflowEnvironment, task_queue: str, capsys
) -> None:
    settings = connected_settings(local_env, task_queue)
    status = await run_sweep_command(command_args("now"), settings)
    assert status == 1
    error = capsys.readouterr().err
    assert f"no worker polls task queue {task_queue}" in error
    assert "remediator worker orchestrator" in error


@pytest.mark.asyncio
async def test_unschedule_twice_names_schedule(
    local_env: WorkflowEnvironment, task_queue: str, capsys
) -> None:
    settings = connected_settings(local_env, task_queue)
    assert await run_sweep_command(command_args("schedule"), settings) == 0
    assert await run_sweep_command(command_args("unschedule"), settings) == 0
    assert await run_sweep_command(command_args("unschedule"), settings) == 1
    error = capsys.readouterr().err
    assert f"sweep Schedule {settings.sweep.schedule_id} not found" in error


@pytest.mark.asyncio
async def test_sweep_without_temporal_names_address(task_queue: str, capsys) -> None:
    settings = settings_for(task_queue)
    settings.temporal.address = f"127.0.0.1:{free_port()}"
    status = await run_sweep_command(command_args("now"), settings)
    assert status == 1
    error = capsys.readouterr().err
    assert f"cannot connect to Temporal at {settings.temporal.address}" in error
