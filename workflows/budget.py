"""RollbackBudgetWorkflow: the per-application rollback budget.

One long-running entity workflow per application (`budget-<namespace>-<app>`)
grants at most `max_rollbacks` rollbacks in any sliding window. Incidents reserve
a slot through the `reserve` update (sent with update-with-start by the budget
activities), so two concurrent incidents cannot both take the last slot: updates
run one at a time on the workflow's single thread. A reservation is released when
its incident ends before the merge and committed by the merge.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from workflows.models import (
        BudgetEntry,
        BudgetQuery,
        BudgetRelease,
        BudgetReservation,
        BudgetReservationResult,
        BudgetState,
        BudgetWorkflowInput,
    )

# Continue as new well before the server's history warnings (10,240 events).
MAX_HISTORY_EVENTS = 2_000


def compute_state(
    budget: BudgetQuery, entries: list[BudgetEntry], now: datetime
) -> BudgetState:
    """Count the entries inside the window ending at `now`."""
    window = timedelta(seconds=budget.window_seconds)
    live = [entry for entry in entries if entry.reserved_at > now - window]
    used = len(live)
    remaining = max(0, budget.max_rollbacks - used)
    next_free_at = None
    if remaining == 0 and live:
        # The oldest live entry leaves the window first and frees one slot.
        next_free_at = min(entry.reserved_at for entry in live) + window
    return BudgetState(
        key=f"{budget.namespace}/{budget.app}",
        max_rollbacks=budget.max_rollbacks,
        window_seconds=budget.window_seconds,
        used=used,
        remaining=remaining,
        entries=live,
        next_free_at=next_free_at,
    )


@workflow.defn(name="RollbackBudgetWorkflow")
class RollbackBudgetWorkflow:
    """Entity workflow that owns one application's rollback slots."""

    @workflow.init
    def __init__(self, input: BudgetWorkflowInput) -> None:
        # Initialised here, not in run(), because update-with-start delivers the
        # first update before run() executes its first line.
        self._budget = input.budget
        self._entries = list(input.entries)

    @workflow.run
    async def run(self, input: BudgetWorkflowInput) -> None:
        await workflow.wait_condition(self._should_continue_as_new)
        await workflow.wait_condition(workflow.all_handlers_finished)
        self._entries = self._state().entries
        workflow.continue_as_new(
            BudgetWorkflowInput(budget=self._budget, entries=self._entries)
        )

    def _should_continue_as_new(self) -> bool:
        info = workflow.info()
        return (
            info.is_continue_as_new_suggested()
            or info.get_current_history_length() > MAX_HISTORY_EVENTS
        )

    def _state(self) -> BudgetState:
        return compute_state(self._budget, self._entries, workflow.now())

    def _entry_of(self, incident_id: str) -> BudgetEntry | None:
        live = self._state().entries
        return next((e for e in live if e.incident_id == incident_id), None)

    @workflow.query
    def state(self) -> BudgetState:
        return self._state()

    @workflow.update
    def reserve(self, request: BudgetReservation) -> BudgetReservationResult:
        self._budget = request.budget
        if self._entry_of(request.incident_id) is None:
            self._entries = self._state().entries
            self._entries.append(
                BudgetEntry(incident_id=request.incident_id, reserved_at=workflow.now())
            )
        return BudgetReservationResult(granted=True, state=self._state())

    @reserve.validator
    def validate_reserve(self, request: BudgetReservation) -> None:
        # A rejected update writes nothing to the history, so a storm of denied
        # incidents cannot grow it.
        if self._entry_of(request.incident_id) is not None:
            return
        state = compute_state(request.budget, self._entries, workflow.now())
        if state.remaining == 0:
            free_at = (
                state.next_free_at.isoformat() if state.next_free_at else "unknown"
            )
            raise ApplicationError(
                f"rollback budget of {state.key} is used up: {state.used} of "
                f"{state.max_rollbacks} in {state.window_seconds:.0f} s; "
                f"next slot frees at {free_at}",
                type="BudgetExhausted",
                non_retryable=True,
            )

    @workflow.signal
    def release(self, request: BudgetRelease) -> None:
        entry = self._entry_of(request.incident_id)
        if entry is None:
            return
        if request.commit:
            entry.committed = True
        elif not entry.committed:
            self._entries = [e for e in self._entries if e is not entry]
