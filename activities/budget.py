"""Budget activities: read and reserve rollback slots on RollbackBudgetWorkflow.

The incident workflow calls these on the `remediation` task queue. They reach
the budget workflow through the Temporal client, by workflow id and by name,
so this module never imports a workflow class.
"""

from __future__ import annotations

import logging

from temporalio import activity
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowUpdateFailedError,
)
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError, RPCStatusCode

from workflows.models import (
    BUDGET_WORKFLOW,
    BudgetQuery,
    BudgetRelease,
    BudgetReservation,
    BudgetReservationResult,
    BudgetState,
    BudgetWorkflowInput,
    budget_workflow_id,
)

logger = logging.getLogger(__name__)


def empty_state(budget: BudgetQuery) -> BudgetState:
    """Return the state of a budget no incident has touched yet."""
    return BudgetState(
        key=f"{budget.namespace}/{budget.app}",
        max_rollbacks=budget.max_rollbacks,
        window_seconds=budget.window_seconds,
        used=0,
        remaining=budget.max_rollbacks,
    )


class BudgetActivities:
    """Activities that talk to the budget workflows through a Temporal client."""

    def __init__(self, client: Client, task_queue: str) -> None:
        self._client = client
        self._task_queue = task_queue

    def _start_operation(self, budget: BudgetQuery) -> WithStartWorkflowOperation:
        return WithStartWorkflowOperation(
            BUDGET_WORKFLOW,
            BudgetWorkflowInput(budget=budget),
            id=budget_workflow_id(budget.namespace, budget.app),
            task_queue=self._task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )

    @activity.defn(name="read_budget")
    async def read_budget(self, budget: BudgetQuery) -> BudgetState:
        handle = self._client.get_workflow_handle(
            budget_workflow_id(budget.namespace, budget.app)
        )
        try:
            state = await handle.query("state", result_type=BudgetState)
        except RPCError as err:
            # No budget workflow yet (or a closed one): nothing was spent.
            if err.status == RPCStatusCode.NOT_FOUND:
                return empty_state(budget)
            raise
        # The limits of this incident's policy win over those stored earlier.
        return state.model_copy(
            update={
                "max_rollbacks": budget.max_rollbacks,
                "remaining": max(0, budget.max_rollbacks - state.used),
            }
        )

    @activity.defn(name="reserve_budget")
    async def reserve_budget(
        self, request: BudgetReservation
    ) -> BudgetReservationResult:
        try:
            return await self._client.execute_update_with_start_workflow(
                "reserve",
                request,
                start_workflow_operation=self._start_operation(request.budget),
                result_type=BudgetReservationResult,
            )
        except WorkflowUpdateFailedError as err:
            # The validator rejected the update: the budget is used up. That is
            # a result, not a failure, so return it instead of retrying.
            reason = str(err.cause) if err.cause else str(err)
            logger.info(
                "Rollback budget denied incident %s: %s", request.incident_id, reason
            )
            state = await self.read_budget(request.budget)
            return BudgetReservationResult(granted=False, reason=reason, state=state)

    @activity.defn(name="release_budget")
    async def release_budget(self, request: BudgetRelease) -> BudgetState:
        handle = self._client.get_workflow_handle(
            budget_workflow_id(request.budget.namespace, request.budget.app)
        )
        try:
            await handle.signal("release", request)
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
            logger.warning(
                "No budget workflow for %s/%s when releasing incident %s.",
                request.budget.namespace,
                request.budget.app,
                request.incident_id,
            )
        return await self.read_budget(request.budget)
