"""Operator commands on incident workflows: approve, abort, status and list.

Each function takes a connected Temporal client, so the CLI and tests share one
code path. Failures an operator can act on (unknown id, closed incident, bad
filter) raise `ControlError` with a one-line message that names the workflow id
and the Temporal address and namespace.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pydantic import BaseModel
from temporalio.client import (
    Client,
    WorkflowExecution,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowQueryFailedError,
)
from temporalio.service import RPCError, RPCStatusCode

from workflows.incident import (
    APP_ATTRIBUTE,
    NAMESPACE_ATTRIBUTE,
    OUTCOME_ATTRIBUTE,
    STAGE_ATTRIBUTE,
)
from workflows.models import (
    INCIDENT_WORKFLOW,
    Approval,
    IncidentStatus,
    incident_workflow_id,
)

# A worker handles the query of a running incident. When no worker polls, the
# frontend would hold the call until its own deadline, so the client stops sooner.
QUERY_TIMEOUT = timedelta(seconds=10)


class ControlError(Exception):
    """An operator command that could not be carried out; the message is one line."""


class IncidentNotFound(ControlError):
    """No incident workflow has the requested id."""


class IncidentNotRunning(ControlError):
    """The incident workflow exists but has already closed."""


class InvalidFilter(ControlError, ValueError):
    """A `list_incidents` filter value that cannot be put into a visibility query."""


class IncidentRow(BaseModel):
    """One incident workflow run as the visibility store lists it.

    Later incidents of an application reuse its workflow id, so one id can
    appear on several rows with different run ids.
    """

    workflow_id: str
    run_id: str
    app_key: str = ""
    stage: str = ""
    outcome: str = ""
    status: str
    start_time: datetime
    close_time: datetime | None = None


def resolve_workflow_id(reference: str) -> str:
    """Map `namespace/app` to its incident workflow id; return any other id as is."""
    if "/" in reference:
        namespace, _, app = reference.partition("/")
        if not namespace or not app or "/" in app:
            raise ControlError(
                f"{reference!r} is neither a workflow id nor namespace/app"
            )
        return incident_workflow_id(namespace, app)
    return reference


def status_name(status: WorkflowExecutionStatus | None) -> str:
    """Spell a workflow status as the Web UI does: Running, ContinuedAsNew, ..."""
    if status is None:
        return "Unknown"
    return "".join(part.capitalize() for part in status.name.split("_"))


async def approve(client: Client, workflow_id: str, by: str, reason: str = "") -> None:
    """Send the `approve` signal to a running incident.

    An approval sent before the incident reaches `awaiting-approval` is kept by
    the workflow and used when it gets there.
    """
    await _signal_running(
        client, workflow_id, "approve", Approval(by=by, reason=reason)
    )


async def abort(client: Client, workflow_id: str, by: str, reason: str = "") -> None:
    """Send the `abort` signal to a running incident."""
    await _signal_running(client, workflow_id, "abort", Approval(by=by, reason=reason))


async def status(client: Client, workflow_id: str) -> IncidentStatus:
    """Return the `status` query of a running incident, or a closed one's result."""
    execution = await _describe(client, workflow_id)
    handle = client.get_workflow_handle(
        workflow_id, run_id=execution.run_id, result_type=IncidentStatus
    )
    if execution.status == WorkflowExecutionStatus.RUNNING:
        try:
            return await handle.query(
                "status", result_type=IncidentStatus, rpc_timeout=QUERY_TIMEOUT
            )
        except WorkflowQueryFailedError as err:
            raise ControlError(
                f"status query of incident {workflow_id} failed: {err}"
            ) from err
        except RPCError as err:
            raise ControlError(
                f"status query of incident {workflow_id} failed on {_where(client)} "
                f"(is a worker polling its task queue?): {_one_line(err)}"
            ) from err
    if execution.status != WorkflowExecutionStatus.COMPLETED:
        raise ControlError(
            f"incident {workflow_id} ended {status_name(execution.status)} "
            "without a status result"
        )
    try:
        return await handle.result(follow_runs=False)
    except WorkflowFailureError as err:
        raise ControlError(
            f"incident {workflow_id} has no status result: {err.cause or err}"
        ) from err


async def list_incidents(
    client: Client,
    app: str | None = None,
    namespace: str | None = None,
    stage: str | None = None,
    outcome: str | None = None,
    limit: int = 50,
) -> list[IncidentRow]:
    """List incident workflows through the visibility store, newest first.

    `app` may be `namespace/app`. Visibility is eventually consistent, so a
    stage change shows up here a moment after the workflow made it.
    """
    query = incident_query(app=app, namespace=namespace, stage=stage, outcome=outcome)
    if limit < 1:
        raise InvalidFilter(f"limit must be at least 1, not {limit}")
    try:
        return [
            _row(execution)
            async for execution in client.list_workflows(query, limit=limit)
        ]
    except RPCError as err:
        raise ControlError(
            f"listing incidents on {_where(client)} failed: {_one_line(err)}"
        ) from err


def incident_query(
    app: str | None = None,
    namespace: str | None = None,
    stage: str | None = None,
    outcome: str | None = None,
) -> str:
    """Build the visibility query that selects incident workflows by attribute."""
    if app is not None and "/" in app:
        app_namespace, _, app = app.partition("/")
        if namespace is not None and namespace != app_namespace:
            raise InvalidFilter(
                f"namespace {namespace!r} contradicts app "
                f"{app_namespace}/{app} given as namespace/app"
            )
        namespace = app_namespace
    clauses = [f"WorkflowType = {_quote(INCIDENT_WORKFLOW)}"]
    for key, value in (
        (APP_ATTRIBUTE, app),
        (NAMESPACE_ATTRIBUTE, namespace),
        (STAGE_ATTRIBUTE, stage),
        (OUTCOME_ATTRIBUTE, outcome),
    ):
        if value is not None:
            clauses.append(f"{key.name} = {_quote(value)}")
    return " AND ".join(clauses)


def _quote(value: str) -> str:
    """Quote a string literal for a visibility query.

    Values with quotes, backslashes or control characters are rejected instead
    of escaped: Kubernetes names and stage values never contain them.
    """
    if not value:
        raise InvalidFilter("filter values must not be empty")
    bad = [c for c in value if c in "'\"\\`" or not c.isprintable()]
    if bad:
        raise InvalidFilter(
            f"filter value {value!r} contains {bad[0]!r}; quotes, backslashes "
            "and control characters are not allowed"
        )
    return f"'{value}'"


def _row(execution: WorkflowExecution) -> IncidentRow:
    attributes = execution.typed_search_attributes
    namespace = attributes.get(NAMESPACE_ATTRIBUTE) or ""
    app = attributes.get(APP_ATTRIBUTE) or ""
    return IncidentRow(
        workflow_id=execution.id,
        run_id=execution.run_id,
        app_key=f"{namespace}/{app}" if namespace or app else "",
        stage=attributes.get(STAGE_ATTRIBUTE) or "",
        outcome=attributes.get(OUTCOME_ATTRIBUTE) or "",
        status=status_name(execution.status),
        start_time=execution.start_time,
        close_time=execution.close_time,
    )


async def _describe(client: Client, workflow_id: str) -> WorkflowExecution:
    """Describe the latest run of an incident, or raise `IncidentNotFound`."""
    try:
        execution = await client.get_workflow_handle(workflow_id).describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise IncidentNotFound(
                f"incident {workflow_id} not found on {_where(client)}"
            ) from err
        raise ControlError(
            f"could not describe incident {workflow_id} on {_where(client)}: "
            f"{_one_line(err)}"
        ) from err
    if execution.workflow_type != INCIDENT_WORKFLOW:
        raise IncidentNotFound(
            f"workflow {workflow_id} on {_where(client)} is a "
            f"{execution.workflow_type}, not an {INCIDENT_WORKFLOW}"
        )
    return execution


async def _signal_running(
    client: Client, workflow_id: str, signal: str, approval: Approval
) -> None:
    execution = await _describe(client, workflow_id)
    if execution.status != WorkflowExecutionStatus.RUNNING:
        outcome = execution.typed_search_attributes.get(OUTCOME_ATTRIBUTE)
        ended = f" with outcome {outcome}" if outcome else ""
        raise IncidentNotRunning(
            f"incident {workflow_id} is not running: it ended "
            f"{status_name(execution.status)}{ended}"
        )
    handle = client.get_workflow_handle(workflow_id, run_id=execution.run_id)
    try:
        await handle.signal(signal, approval)
    except RPCError as err:
        # The run closed between the describe and the signal.
        if err.status == RPCStatusCode.NOT_FOUND:
            raise IncidentNotRunning(
                f"incident {workflow_id} closed before the {signal} signal "
                f"arrived: {_one_line(err)}"
            ) from err
        raise ControlError(
            f"could not send {signal} to incident {workflow_id} on "
            f"{_where(client)}: {_one_line(err)}"
        ) from err


def _where(client: Client) -> str:
    return f"{client.service_client.config.target_host} namespace {client.namespace}"


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
