"""Pydantic models that cross the boundary between workflows and activities.

Every workflow, activity, signal, query and update takes and returns one of these
models, so the workflow history in the Temporal Web UI reads as an audit record.
Fields are only ever added with defaults, which keeps old histories replayable.
Nothing in this module may import outside the standard library and pydantic,
because the workflow sandbox re-imports it.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, Field

INCIDENT_WORKFLOW = "IncidentWorkflow"
BUDGET_WORKFLOW = "RollbackBudgetWorkflow"


def incident_workflow_id(namespace: str, app: str) -> str:
    """Return the id of an application's incident workflow."""
    return f"incident-{namespace}-{app}"


def budget_workflow_id(namespace: str, app: str) -> str:
    """Return the id of an application's budget workflow."""
    return f"budget-{namespace}-{app}"


class Outcome(StrEnum):
    """Outcome of an incident."""

    RECOVERED = "recovered"
    ESCALATED = "escalated"
    ABORTED = "aborted"
    DENIED = "denied"
    RESOLVED = "resolved"
    BUDGET_EXHAUSTED = "budget-exhausted"
    SHADOWED = "shadowed"


class Stage(StrEnum):
    """The steps of the incident loop, in order."""

    COLLECT_EVIDENCE = "collect-evidence"
    CONFIRM_ANOMALY = "confirm-anomaly"
    FIND_CHANGE = "find-change"
    READ_BUDGET = "read-budget"
    DECIDE = "decide"
    APPROVAL = "awaiting-approval"
    RESERVE_BUDGET = "reserve-budget"
    OPEN_PULL_REQUEST = "open-pull-request"
    MERGE_PULL_REQUEST = "merge-pull-request"
    WAIT_FOR_SYNC = "wait-for-sync"
    VERIFY = "verify"
    CLOSE = "close"


# --- Alerts -----------------------------------------------------------------


class AlertSignal(BaseModel):
    """One Alertmanager alert, as recorded on the incident workflow."""

    fingerprint: str
    status: str = Field(description="firing or resolved, taken from the alert itself")
    alertname: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    starts_at: str = ""
    ends_at: str = ""
    generator_url: str = ""


class AlertRecord(BaseModel):
    """Record of one alert fingerprint on the incident workflow."""

    fingerprint: str
    alertname: str = ""
    status: str = "firing"
    count: int = 0
    first_seen: datetime | None = None
    last_seen: datetime | None = None


# --- Incident input and configuration ---------------------------------------


class VerifyConfig(BaseModel):
    """Settings of the recovery check after the rollback has synced."""

    interval_seconds: float = 30.0
    consecutive_intervals: int = 3
    max_intervals: int = 10


class IncidentConfig(BaseModel):
    """Settings the workflow needs, copied from the service settings at start.

    Only non-secret values belong here: the input is stored in the history.
    """

    argocd_application: str
    signal_window_seconds: float = 300.0
    signal_step_seconds: float = 15.0
    signal_recent_seconds: float | None = None
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    detection_task_queue: str = "remediation-detection"
    detection_timeout_seconds: float = Field(
        default=120.0, description="give up on the detection queue after this long"
    )
    shadow: bool = False
    strategy: str = Field(default="pin", description="pin or revert")
    web_ui_url: str = ""
    sync_timeout_seconds: float = 600.0
    approval_timeout_seconds: float = 900.0
    max_rollbacks: int = 2
    budget_window_seconds: float = 1800.0
    search_attributes: bool = Field(
        default=False, description="upsert the Remediation* search attributes"
    )


class IncidentInput(BaseModel):
    """Start input of IncidentWorkflow."""

    incident_id: str = Field(
        description="the workflow id; the workflow appends its run id to name the "
        "incident, because the next incident of the application reuses the id"
    )
    namespace: str
    app: str
    trace_id: str = ""
    config: IncidentConfig


# --- Step 1: evidence --------------------------------------------------------


class SignalQuery(BaseModel):
    """Ask the golden-signal store for one application's recent signals."""

    namespace: str
    app: str
    window_seconds: float
    step_seconds: float
    end: datetime | None = Field(
        default=None, description="end of the window; the activity's clock when unset"
    )
    recent_seconds: float | None = Field(
        default=None,
        description="the summary signals cover only the last recent_seconds of the "
        "window, so a bad deploy minutes old is not averaged away; points still "
        "cover the whole window",
    )


class SignalPoint(BaseModel):
    """Golden signals of one step of the window."""

    end: datetime
    requests: float
    errors: float
    error_ratio: float | None = Field(
        default=None, description="None when the step saw no requests"
    )
    latency_p99_seconds: float | None = None


class Evidence(BaseModel):
    """Golden signals of an application over a window.

    Missing data is never evidence: `has_data` is false when the store contains no
    points at all, and `no_traffic` is true when points exist but saw no request.
    """

    namespace: str
    app: str
    source: str = "otlp"
    has_data: bool = False
    no_traffic: bool = False
    request_rate: float | None = None
    error_ratio: float | None = None
    latency_p99_seconds: float | None = None
    restarts: float | None = None
    points: list[SignalPoint] = Field(default_factory=list)


# --- Step 2: detection ------------------------------------------------------


class Series(BaseModel):
    """One time series to score; `values` are in time order, `None` is a gap."""

    key: str
    step_seconds: float
    values: list[float | None]


class DetectionInput(BaseModel):
    """Series to score on the detection task queue."""

    series: list[Series]
    threshold: float = 0.8


class SeriesVerdict(BaseModel):
    """The detector's verdict on one series."""

    key: str
    score: float = Field(description="anomaly score of the last point, in [0, 1]")
    anomalous: bool
    sustained_seconds: float = 0.0
    points_scored: int = 0


class DetectionResult(BaseModel):
    """Verdicts in the order of the input series."""

    verdicts: list[SeriesVerdict]
    device: str = "cpu"


# --- Detection sweep -----------------------------------------------------------


SWEEP_WORKFLOW = "DetectionSweepWorkflow"


class SweepFinding(BaseModel):
    """A sustained anomaly found by a sweep, and the incident it opened."""

    application: str
    series: str
    score: float
    sustained_seconds: float
    incident_workflow_id: str = Field(
        default="", description="empty when the sweep only reports"
    )


class SweepResult(BaseModel):
    """Result of one sweep: the applications read, the series scored, the findings."""

    applications: int = 0
    series_scored: int = 0
    detection_calls: int = 0
    device: str = ""
    findings: list[SweepFinding] = Field(default_factory=list)
    skipped: dict[str, str] = Field(
        default_factory=dict, description="application to why it was not scored"
    )


class SweepInput(BaseModel):
    """Start input of DetectionSweepWorkflow, built from `SweepSettings`.

    The Temporal Schedule stores this input, so it contains no secret.
    """

    applications: list[str] = Field(
        default_factory=list, description="opted-in applications as namespace/app"
    )
    discover: bool = Field(
        default=False,
        description="also sweep every application the signal backend knows",
    )
    window_seconds: float = 1800.0
    step_seconds: float = 15.0
    threshold: float = 0.8
    min_sustained_seconds: float = Field(
        default=0.0, description="open incidents only for anomalies at least this old"
    )
    batch_series: int = Field(default=200, description="series per detection call")
    batch_points: int = Field(
        default=50_000,
        description="points per detection call, which keeps the call's payload "
        "under Temporal's 2 MB limit",
    )
    concurrency: int = Field(default=8, description="evidence reads at a time")
    applications_per_run: int = Field(
        default=200, description="applications per run before continue-as-new"
    )
    open_incidents: bool = Field(
        default=True, description="false reports findings without opening incidents"
    )
    detection_task_queue: str = "remediation-detection"
    detection_timeout_seconds: float = 120.0
    offset: int = Field(
        default=0, description="applications already swept by earlier runs"
    )
    carried: SweepResult | None = Field(
        default=None, description="the result of earlier runs, after continue-as-new"
    )


class DiscoveryQuery(BaseModel):
    """Ask the signal backend which applications it has signals for."""

    window_seconds: float = 1800.0


class ApplicationList(BaseModel):
    """Applications a signal backend has data for, as namespace/app."""

    applications: list[str] = Field(default_factory=list)


class OpenIncidentInput(BaseModel):
    """Open, or add to, the incident of an application a sweep flagged."""

    namespace: str
    app: str
    finding: SweepFinding
    sweep_id: str = ""


def detection_series(evidence: Evidence, step_seconds: float) -> list[Series]:
    """Build the detector's series (error ratio, and p99 latency when known)."""
    if not evidence.points:
        return []
    key = f"{evidence.namespace}/{evidence.app}"
    series = [
        Series(
            key=f"{key}:error_ratio",
            step_seconds=step_seconds,
            values=[p.error_ratio for p in evidence.points],
        )
    ]
    if any(p.latency_p99_seconds is not None for p in evidence.points):
        series.append(
            Series(
                key=f"{key}:latency_p99_seconds",
                step_seconds=step_seconds,
                values=[p.latency_p99_seconds for p in evidence.points],
            )
        )
    return series


# --- Step 3: the change ------------------------------------------------------


class ChangeQuery(BaseModel):
    """Ask Argo CD and git which change is the suspect."""

    incident_id: str
    argocd_application: str


class ImageChange(BaseModel):
    """One YAML scalar that the suspect change set and the rollback restores."""

    file: str
    location: str = Field(description="key path inside the document, like 0.spec.image")
    good: str
    bad: str


class ChangeResult(BaseModel):
    """The suspect revision, the last good one and what changed between them."""

    found: bool
    reason: str = ""
    repo_url: str = ""
    path: str = ""
    target_branch: str = "main"
    suspect_revision: str = ""
    last_good_revision: str = ""
    suspect_commits: list[str] = Field(default_factory=list)
    image_changes: list[ImageChange] = Field(default_factory=list)
    deployed_at: datetime | None = None


# --- Steps 4 and 7: budget ---------------------------------------------------


class BudgetEntry(BaseModel):
    """One reserved or committed rollback slot."""

    incident_id: str
    reserved_at: datetime
    committed: bool = False


class BudgetState(BaseModel):
    """The rollback budget of one application at a point in time."""

    key: str
    max_rollbacks: int
    window_seconds: float
    used: int
    remaining: int
    entries: list[BudgetEntry] = Field(default_factory=list)
    next_free_at: datetime | None = None


class BudgetQuery(BaseModel):
    """Identify the budget workflow of an application and its limits."""

    namespace: str
    app: str
    max_rollbacks: int
    window_seconds: float


class BudgetWorkflowInput(BaseModel):
    """Start input of RollbackBudgetWorkflow, carried across continue-as-new."""

    budget: BudgetQuery
    entries: list[BudgetEntry] = Field(default_factory=list)


class BudgetReservation(BaseModel):
    """Update argument and activity input: one incident requests one slot."""

    budget: BudgetQuery
    incident_id: str


class BudgetReservationResult(BaseModel):
    """Whether the slot was granted, and the budget after the request."""

    granted: bool
    reason: str = ""
    state: BudgetState


class BudgetRelease(BaseModel):
    """Give back or commit a reservation."""

    budget: BudgetQuery
    incident_id: str
    commit: bool = False


# --- Step 5: decision --------------------------------------------------------


class Approval(BaseModel):
    """Signal argument of `approve` and `abort`."""

    by: str
    reason: str = ""


class DecisionInput(BaseModel):
    """The policy input: everything the decision may depend on."""

    incident_id: str
    namespace: str
    app: str
    alerts_firing: int
    evidence: Evidence
    anomaly: SeriesVerdict | None
    change: ChangeResult
    budget: BudgetState
    approvals: list[Approval] = Field(default_factory=list)
    shadow: bool = False


class Decision(BaseModel):
    """The result of `data.remediation.decision`; undefined or errors fail closed."""

    allow: bool = False
    action: str = "none"
    require_approval: bool = False
    approval_timeout_seconds: float | None = None
    reasons: list[str] = Field(default_factory=list)
    max_error_ratio: float | None = None
    max_latency_p99_seconds: float | None = None
    max_rollbacks: int | None = Field(
        default=None, description="per-application budget limit from policy data"
    )
    shadow: bool = False
    engine: str = ""
    evaluated: bool = Field(
        default=True, description="false when the engine gave no decision"
    )


# --- Step 8: pull request ----------------------------------------------------


class PullRequestInput(BaseModel):
    """Open (or find) the rollback pull request of an incident."""

    incident_id: str
    namespace: str
    app: str
    change: ChangeResult
    decision: Decision
    evidence: Evidence
    trace_id: str = ""
    web_ui_url: str = ""
    strategy: str = "pin"
    draft: bool = False


class PullRequest(BaseModel):
    """A rollback pull request as the provider reports it."""

    provider: str
    number: int
    url: str
    branch: str
    target_branch: str
    head_commit: str
    title: str = ""
    draft: bool = False
    state: str = "open"
    merge_commit: str = ""


class MergeInput(BaseModel):
    """Merge a pull request opened earlier."""

    incident_id: str
    pull_request: PullRequest


class ClosePullRequestInput(BaseModel):
    """Close a pull request without merging and delete its branch."""

    incident_id: str
    pull_request: PullRequest
    reason: str = ""


# --- Step 9: sync ------------------------------------------------------------


class SyncInput(BaseModel):
    """Wait until Argo CD runs the merged revision and reports it healthy."""

    argocd_application: str
    revision: str
    poll_seconds: float | None = Field(
        default=None,
        description="interval between reads; the worker's setting when unset",
    )
    timeout_seconds: float | None = Field(
        default=None,
        description="maximum wait in seconds; the worker's setting when unset",
    )
    repo_url: str = Field(
        default="", description="source of a multi-source Application to compare"
    )


class SyncResult(BaseModel):
    """Argo CD status at the end of the sync wait."""

    synced: bool
    revision: str = ""
    sync_status: str = ""
    health_status: str = ""
    operation_phase: str = ""
    message: str = ""
    polls: int = 0


# --- Step 10: verification ---------------------------------------------------


class VerifyInput(BaseModel):
    """Check one verification interval against the thresholds."""

    query: SignalQuery
    max_error_ratio: float
    max_latency_p99_seconds: float | None = None


class VerifyResult(BaseModel):
    """The verdict of one verification interval."""

    healthy: bool
    no_data: bool = False
    no_traffic: bool = False
    error_ratio: float | None = None
    latency_p99_seconds: float | None = None
    reason: str = ""


# --- Escalation and the incident's record -----------------------------------


class EscalationInput(BaseModel):
    """Tell humans that the incident needs them."""

    incident_id: str
    namespace: str
    app: str
    outcome: str
    reasons: list[str]
    web_ui_url: str = ""


class StageTiming(BaseModel):
    """Seconds spent in one stage, measured on the workflow clock."""

    name: str
    seconds: float


class IncidentStatus(BaseModel):
    """Result of the `status` query and, at the end, of the workflow."""

    incident_id: str
    namespace: str
    app: str
    stage: str = ""
    outcome: str = ""
    reasons: list[str] = Field(default_factory=list)
    trace_id: str = ""
    alerts: list[AlertRecord] = Field(default_factory=list)
    evidence: Evidence | None = None
    anomaly: SeriesVerdict | None = None
    change: ChangeResult | None = None
    budget: BudgetState | None = None
    decision: Decision | None = None
    pull_request: PullRequest | None = None
    sync: SyncResult | None = None
    verifications: list[VerifyResult] = Field(default_factory=list)
    approvals: list[Approval] = Field(default_factory=list)
    aborted_by: Approval | None = None
    stages: list[StageTiming] = Field(default_factory=list)
    merge_commit: str = ""
