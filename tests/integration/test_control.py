"""Operator commands against a real dev server with its visibility store.

IncidentWorkflow runs with the fake activities of the workflow tests, and a
decision that requires approval parks each incident at `awaiting-approval`
until a test approves or aborts it through `remediator.control` or the CLI.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import TypeVar

import pytest
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from remediator import control
from remediator.settings import REPO_ROOT
from tests.workflow.test_incident_workflow import FakeWorld, firing
from workflows.incident import IncidentWorkflow
from workflows.models import (
    IncidentConfig,
    IncidentInput,
    IncidentStatus,
    VerifyConfig,
    incident_workflow_id,
)

T = TypeVar("T")

# The dev server's visibility store lags the workflow's upserts a little.
VISIBILITY_TIMEOUT = 10.0


@asynccontextmanager
async def parking_world(
    env: WorkflowEnvironment, task_queue: str
) -> AsyncIterator[FakeWorld]:
    """Run workers whose fake policy requires approval for every incident."""
    world = FakeWorld()
    world.decision = world.decision.model_copy(
        update={"require_approval": True, "approval_timeout_seconds": 600}
    )
    async with (
        Worker(
            env.client,
            task_queue=task_queue,
            workflows=[IncidentWorkflow],
            activities=world.activities(),
        ),
        Worker(
            env.client,
            task_queue=f"{task_queue}-detection",
            activities=world.detection_activities(),
        ),
    ):
        yield world


async def start_incident(
    env: WorkflowEnvironment, task_queue: str
) -> tuple[WorkflowHandle, str, str]:
    """Start an incident of a fresh application; return its handle, namespace, app."""
    namespace = "shop"
    app = f"web-{uuid.uuid4().hex[:8]}"
    request = IncidentInput(
        incident_id=incident_workflow_id(namespace, app),
        namespace=namespace,
        app=app,
        trace_id="0" * 32,
        config=IncidentConfig(
            argocd_application=app,
            detection_task_queue=f"{task_queue}-detection",
            # Real time passes on the dev server, so verification is short.
            verify=VerifyConfig(
                interval_seconds=0.1, consecutive_intervals=1, max_intervals=3
            ),
            search_attributes=True,
        ),
    )
    handle = await env.client.start_workflow(
        IncidentWorkflow.run,
        request,
        id=request.incident_id,
        task_queue=task_queue,
        start_signal="alert",
        start_signal_args=[firing()],
    )
    return handle, namespace, app


async def eventually(
    probe: Callable[[], Awaitable[T]],
    accept: Callable[[T], bool],
    timeout: float = VISIBILITY_TIMEOUT,
) -> T:
    """Call `probe` until `accept` passes on its result or `timeout` seconds pass."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await probe()
        if accept(value):
            return value
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"condition not met within {timeout} s; last value {value!r}")
        await asyncio.sleep(0.2)


async def parked(env: WorkflowEnvironment, workflow_id: str) -> IncidentStatus:
    return await eventually(
        lambda: control.status(env.client, workflow_id),
        lambda status: status.stage == "awaiting-approval",
    )


def where(env: WorkflowEnvironment) -> str:
    client = env.client
    return f"{client.service_client.config.target_host} namespace {client.namespace}"


async def test_approve_continues_to_recovered(local_env, task_queue):
    client = local_env.client
    async with parking_world(local_env, task_queue):
        handle, namespace, app = await start_incident(local_env, task_queue)

        rows = await eventually(
            lambda: control.list_incidents(client, stage="awaiting-approval"),
            lambda rows: any(row.workflow_id == handle.id for row in rows),
        )
        row = next(row for row in rows if row.workflow_id == handle.id)
        assert row.app_key == f"{namespace}/{app}"
        assert row.status == "Running"
        assert row.outcome == ""
        assert row.close_time is None

        await control.approve(client, handle.id, "alice", "checked the dashboards")
        result = await handle.result()

    assert result.outcome == "recovered"
    assert result.approvals[0].by == "alice"
    assert result.approvals[0].reason == "checked the dashboards"

    rows = await eventually(
        lambda: control.list_incidents(client, app=f"{namespace}/{app}"),
        lambda rows: bool(rows) and rows[0].outcome == "recovered",
    )
    assert [row.workflow_id for row in rows] == [handle.id]
    assert rows[0].status == "Completed"
    assert rows[0].close_time is not None
    recovered = await control.list_incidents(client, outcome="recovered")
    assert handle.id in [row.workflow_id for row in recovered]

    # A closed incident's status comes from its result, with no worker running.
    status = await control.status(client, handle.id)
    assert status.outcome == "recovered"
    assert status.merge_commit == "d" * 40


async def test_abort_ends_aborted(local_env, task_queue):
    client = local_env.client
    async with parking_world(local_env, task_queue) as world:
        handle, namespace, app = await start_incident(local_env, task_queue)
        status = await parked(local_env, handle.id)
        assert status.decision is not None
        assert status.decision.require_approval
        assert status.namespace == namespace
        assert status.app == app

        await control.abort(client, handle.id, "bob", "false alarm")
        result = await handle.result()

    assert result.outcome == "aborted"
    assert result.aborted_by is not None
    assert result.aborted_by.by == "bob"
    assert "aborted by bob: false alarm" in result.reasons
    assert "open_pull_request" not in world.calls
    rows = await eventually(
        lambda: control.list_incidents(client, app=app, outcome="aborted"),
        lambda rows: bool(rows),
    )
    assert rows[0].workflow_id == handle.id

    with pytest.raises(control.IncidentNotRunning, match=handle.id) as raised:
        await control.approve(client, handle.id, "alice")
    assert "ended Completed with outcome aborted" in str(raised.value)


async def test_unknown_incident_is_a_clear_error(local_env):
    client = local_env.client
    expected = f"incident incident-nowhere-none not found on {where(local_env)}"
    for command in (control.approve, control.abort):
        with pytest.raises(control.IncidentNotFound) as raised:
            await command(client, "incident-nowhere-none", "alice", "")
        assert str(raised.value) == expected
    with pytest.raises(control.IncidentNotFound) as raised:
        await control.status(client, "incident-nowhere-none")
    assert str(raised.value) == expected


async def test_list_filters_compose(local_env, task_queue):
    client = local_env.client
    async with parking_world(local_env, task_queue):
        handle, namespace, app = await start_incident(local_env, task_queue)
        await parked(local_env, handle.id)
        rows = await eventually(
            lambda: control.list_incidents(
                client, app=app, namespace=namespace, stage="awaiting-approval"
            ),
            lambda rows: bool(rows),
        )
        assert [row.workflow_id for row in rows] == [handle.id]
        assert await control.list_incidents(client, app=app, stage="verify") == []
        assert await control.list_incidents(client, app=app, namespace="other") == []
        await control.abort(client, handle.id, "bob")
        await handle.result()


def test_filter_values_are_checked():
    assert control.incident_query(app="shop/web", stage="awaiting-approval") == (
        "WorkflowType = 'IncidentWorkflow' AND RemediationApp = 'web' "
        "AND RemediationNamespace = 'shop' AND RemediationStage = 'awaiting-approval'"
    )
    for bad in ("web' OR WorkflowType != '", 'web"', "web\\", "web\n", ""):
        with pytest.raises(control.InvalidFilter):
            control.incident_query(app=bad)
    with pytest.raises(control.InvalidFilter, match="contradicts"):
        control.incident_query(app="shop/web", namespace="other")


def test_workflow_reference_maps_namespace_and_app():
    assert control.resolve_workflow_id("shop/web") == "incident-shop-web"
    assert control.resolve_workflow_id("incident-shop-web") == "incident-shop-web"
    with pytest.raises(control.ControlError):
        control.resolve_workflow_id("shop/web/extra")


# --- The command line ---------------------------------------------------------


async def remediator(env: WorkflowEnvironment, *args: str) -> tuple[int, str, str]:
    """Run `python -m remediator ARGS` against the env's server.

    The subprocess is awaited without blocking the event loop, so the test's
    workers keep handling queries and signals meanwhile.
    """
    environment = {
        **os.environ,
        "REMEDIATOR_TEMPORAL_ADDRESS": env.client.service_client.config.target_host,
        "REMEDIATOR_TEMPORAL_NAMESPACE": env.client.namespace,
        "REMEDIATOR_LOG_LEVEL": "WARNING",
        "COLUMNS": "160",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "remediator",
        *args,
        cwd=REPO_ROOT,
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_cli_status_list_and_approve(local_env, task_queue):
    async with parking_world(local_env, task_queue):
        handle, namespace, app = await start_incident(local_env, task_queue)
        await parked(local_env, handle.id)
        reference = f"{namespace}/{app}"

        code, stdout, stderr = await remediator(
            local_env, "status", reference, "--json"
        )
        assert code == 0, stderr
        status = IncidentStatus.model_validate_json(stdout)
        assert status.incident_id.startswith(handle.id)
        assert status.stage == "awaiting-approval"

        code, stdout, stderr = await remediator(local_env, "status", handle.id)
        assert code == 0, stderr
        for heading in ("Incident", "Evidence", "Change", "Decision", "Budget"):
            assert heading in stdout
        assert "awaiting-approval" in stdout
        assert "shop:1.1" in stdout
        assert "shop:1.0" in stdout

        code, stdout, stderr = await eventually(
            lambda: remediator(
                local_env, "list", "--app", reference, "--stage", "awaiting-approval"
            ),
            lambda answer: handle.id in answer[1],
        )
        assert code == 0, stderr

        code, stdout, stderr = await remediator(
            local_env, "list", "--app", app, "--json"
        )
        assert code == 0, stderr
        rows = json.loads(stdout)
        assert [row["workflow_id"] for row in rows] == [handle.id]
        assert rows[0]["app_key"] == reference
        assert rows[0]["run_id"] == handle.result_run_id
        assert rows[0]["status"] == "Running"

        code, stdout, stderr = await remediator(
            local_env, "approve", reference, "--by", "carol", "--reason", "go"
        )
        assert code == 0, stderr
        assert f"approved incident {handle.id} as carol" in stdout
        result = await handle.result()

    assert result.outcome == "recovered"
    assert result.approvals[0].by == "carol"


async def test_cli_errors_are_one_line(local_env):
    code, stdout, stderr = await remediator(
        local_env, "approve", "nowhere/none", "--by", "alice"
    )
    assert code == 1
    assert stderr.strip() == (
        f"error: incident incident-nowhere-none not found on {where(local_env)}"
    )
    assert stdout == ""

    code, _, stderr = await remediator(local_env, "list", "--app", "web'")
    assert code == 1
    assert len(stderr.strip().splitlines()) == 1
    assert "quotes, backslashes" in stderr


async def test_status_without_worker_fails(local_env, task_queue, monkeypatch):
    monkeypatch.setattr(control, "QUERY_TIMEOUT", timedelta(seconds=1))
    async with parking_world(local_env, task_queue):
        handle, _, _ = await start_incident(local_env, task_queue)
        await parked(local_env, handle.id)
    try:
        with pytest.raises(control.ControlError, match="is a worker polling") as raised:
            await control.status(local_env.client, handle.id)
        assert handle.id in str(raised.value)
    finally:
        await handle.terminate("test over")
