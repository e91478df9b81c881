"""RollbackBudgetWorkflow with the real budget activities, on the time-skipping server.

Only the activities that reach outside Temporal are faked; reservations go
through update-with-start exactly as in production.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

from temporalio.client import WorkflowUpdateFailedError
from temporalio.worker import Worker

from activities.budget import BudgetActivities
from tests.workflow.test_incident_workflow import FakeWorld, firing, incident_input
from workflows.budget import RollbackBudgetWorkflow, compute_state
from workflows.incident import IncidentWorkflow
from workflows.models import (
    BudgetEntry,
    BudgetQuery,
    BudgetReservation,
    BudgetReservationResult,
    BudgetState,
    BudgetWorkflowInput,
    IncidentStatus,
    budget_workflow_id,
)

INCIDENTS = 20
REAL_BUDGET_ACTIVITIES = {"read_budget", "reserve_budget", "release_budget"}


def worker_activities(world: FakeWorld, budget: BudgetActivities) -> list:
    fakes = [
        fake
        for fake in world.activities()
        if fake.__temporal_activity_definition.name not in REAL_BUDGET_ACTIVITIES
    ]
    return [*fakes, budget.read_budget, budget.reserve_budget, budget.release_budget]


async def test_twenty_concurrent_incidents_two_merges(time_skipping_env, task_queue):
    client = time_skipping_env.client
    world = FakeWorld()
    budget = BudgetActivities(client, task_queue)
    async with (
        Worker(
            client,
            task_queue=task_queue,
            workflows=[IncidentWorkflow, RollbackBudgetWorkflow],
            activities=worker_activities(world, budget),
        ),
        Worker(
            client,
            task_queue=f"{task_queue}-detection",
            activities=world.detection_activities(),
        ),
    ):
        handles = []
        for _ in range(INCIDENTS):
            request = incident_input(task_queue)
            handles.append(
                await client.start_workflow(
                    IncidentWorkflow.run,
                    request,
                    id=f"{request.incident_id}-{uuid.uuid4().hex[:6]}",
                    task_queue=task_queue,
                    start_signal="alert",
                    start_signal_args=[firing()],
                )
            )
        # One result at a time: each wait unlocks time skipping on its own.
        results: list[IncidentStatus] = [await handle.result() for handle in handles]
        state = await client.get_workflow_handle(
            budget_workflow_id("shop", "shop")
        ).query("state", result_type=BudgetState)

    outcomes = [status.outcome for status in results]
    assert outcomes.count("recovered") == 2
    assert outcomes.count("budget-exhausted") == 18
    assert world.calls.count("merge_pull_request") == 2
    assert world.calls.count("open_pull_request") == 2
    assert state.used == 2
    assert all(entry.committed for entry in state.entries)


async def test_reserve_twice_same_incident_one_entry(time_skipping_env, task_queue):
    client = time_skipping_env.client
    world = FakeWorld()
    budget = BudgetActivities(client, task_queue)
    query = BudgetQuery(
        namespace="pay", app="api", max_rollbacks=2, window_seconds=1800
    )
    async with Worker(
        client,
        task_queue=task_queue,
        workflows=[RollbackBudgetWorkflow],
        activities=worker_activities(world, budget),
    ):
        request = BudgetReservation(budget=query, incident_id="incident-pay-api")
        first = await _reserve(client, task_queue, request)
        second = await _reserve(client, task_queue, request)
    assert first.granted and second.granted
    assert second.state.used == 1


async def test_validator_rejects_without_history(local_env, task_queue):
    # The dev server drops a rejected update's speculative workflow task from
    # the history; the time-skipping test server does not, so this runs there.
    client = local_env.client
    query = BudgetQuery(
        namespace="pay", app="web", max_rollbacks=1, window_seconds=1800
    )
    async with Worker(
        client, task_queue=task_queue, workflows=[RollbackBudgetWorkflow]
    ):
        handle = await client.start_workflow(
            RollbackBudgetWorkflow.run,
            BudgetWorkflowInput(budget=query),
            id=f"budget-test-{uuid.uuid4().hex[:8]}",
            task_queue=task_queue,
        )
        await handle.execute_update(
            "reserve",
            BudgetReservation(budget=query, incident_id="a"),
            result_type=BudgetReservationResult,
        )
        events_before = len([e async for e in handle.fetch_history_events()])
        try:
            await handle.execute_update(
                "reserve",
                BudgetReservation(budget=query, incident_id="b"),
                result_type=BudgetReservationResult,
            )
            rejected = False
        except WorkflowUpdateFailedError as err:
            rejected = "used up" in str(err.cause)
        events_after = len([e async for e in handle.fetch_history_events()])
    assert rejected
    assert events_after == events_before


def test_window_slides_and_names_next_free_slot() -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    query = BudgetQuery(namespace="a", app="b", max_rollbacks=2, window_seconds=1800)
    entries = [
        BudgetEntry(incident_id="old", reserved_at=now - timedelta(minutes=40)),
        BudgetEntry(incident_id="one", reserved_at=now - timedelta(minutes=20)),
        BudgetEntry(incident_id="two", reserved_at=now - timedelta(minutes=5)),
    ]
    state = compute_state(query, entries, now)
    assert state.used == 2
    assert state.remaining == 0
    assert state.next_free_at == now + timedelta(minutes=10)


async def _reserve(client, task_queue: str, request: BudgetReservation):
    from temporalio.client import WithStartWorkflowOperation
    from temporalio.common import WorkflowIDConflictPolicy

    from workflows.models import BUDGET_WORKFLOW

    operation = WithStartWorkflowOperation(
        BUDGET_WORKFLOW,
        BudgetWorkflowInput(budget=request.budget),
        id=budget_workflow_id(request.budget.namespace, request.budget.app),
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
    )
    return await client.execute_update_with_start_workflow(
        "reserve",
        request,
        start_workflow_operation=operation,
        result_type=BudgetReservationResult,
    )
