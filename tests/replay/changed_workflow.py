"""IncidentWorkflow with one activity call added at the start of run.

It lives in its own module because the workflow sandbox re-imports the module
of a workflow class, and the replay test module reads files at import.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from workflows.incident import IncidentWorkflow
    from workflows.models import IncidentInput, IncidentStatus


@workflow.defn(name="IncidentWorkflow")
class IncidentWorkflowWithExtraActivity(IncidentWorkflow):
    """The incident workflow as a careless change would leave it."""

    @workflow.run
    async def run(self, input: IncidentInput) -> IncidentStatus:
        await workflow.execute_activity(
            "audit_start", input, start_to_close_timeout=timedelta(seconds=5)
        )
        return await super().run(input)
