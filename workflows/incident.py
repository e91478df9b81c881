"""IncidentWorkflow: one incident of one application, from alert to outcome.

The intake starts it with signal-with-start (`incident-<namespace>-<app>`), so
later alerts for the same application land on the running workflow.

The loop first reads evidence, the suspect change and the budget, and confirms
the anomaly on the detection task queue. The policy then decides, and a human
approves when it asks. Then the workflow reserves a budget slot and opens and
merges the rollback pull request. Last, it waits for Argo CD to sync the merge
and verifies recovery over durable timers. Every path ends in a named
`Outcome`, and every wait has a timeout.

Activities are called by name, so this module imports no activity code into
the sandbox. The names and models are the contract with `activities/`.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.exceptions import TimeoutError as TemporalTimeoutError

with workflow.unsafe.imports_passed_through():
    from workflows.models import (
        AlertRecord,
        AlertSignal,
        Approval,
        BudgetQuery,
        BudgetRelease,
        BudgetReservation,
        BudgetReservationResult,
        BudgetState,
        ChangeQuery,
        ChangeResult,
        ClosePullRequestInput,
        Decision,
        DecisionInput,
        DetectionInput,
        DetectionResult,
        EscalationInput,
        Evidence,
        IncidentInput,
        IncidentStatus,
        MergeInput,
        Outcome,
        PullRequest,
        PullRequestInput,
        SeriesVerdict,
        SignalQuery,
        Stage,
        StageTiming,
        SyncInput,
        SyncResult,
        VerifyInput,
        VerifyResult,
        detection_series,
    )

APP_ATTRIBUTE = SearchAttributeKey.for_keyword("RemediationApp")
NAMESPACE_ATTRIBUTE = SearchAttributeKey.for_keyword("RemediationNamespace")
STAGE_ATTRIBUTE = SearchAttributeKey.for_keyword("RemediationStage")
OUTCOME_ATTRIBUTE = SearchAttributeKey.for_keyword("RemediationOutcome")

# Reads of metrics, git and Argo CD: retry quickly, give up within about a
# minute, then fail closed.
READ_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    maximum_attempts=6,
)
# Writes to the GitOps repository are idempotent, so they may retry longer.
WRITE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=8,
)
# Cleanup after a failure: best effort, bounded.
CLEANUP_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=10),
    maximum_attempts=5,
)
DEFAULT_MAX_ERROR_RATIO = 0.05
# A failed local activity reaches the workflow as its own error, not wrapped in
# an ActivityError as a failed activity is.
LOCAL_ACTIVITY_FAILURES = (ActivityError, ApplicationError, TemporalTimeoutError)

# Metrics recorded through `workflow.metric_meter()`, which records nothing
# while a worker replays history and adds no commands to it. The meter adds the
# attributes `namespace` (the Temporal namespace), `task_queue` and
# `workflow_type`, so the application's namespace is `app_namespace`.
INCIDENTS_METRIC = "remediation_incidents_total"
STAGE_DURATION_METRIC = "remediation_stage_duration_seconds"
BUDGET_DENIALS_METRIC = "remediation_budget_denials_total"


class _Finish(Exception):
    """Raised inside the loop to end the incident with an outcome."""

    def __init__(self, outcome: Outcome, *reasons: str) -> None:
        super().__init__(outcome.value)
        self.outcome = outcome
        self.reasons = list(reasons)


@workflow.defn(name="IncidentWorkflow")
class IncidentWorkflow:
    """Remediate one application's incident; see the module docstring."""

    @workflow.init
    def __init__(self, input: IncidentInput) -> None:
        # Signal-with-start delivers the first alert before run() starts, so
        # all state the handlers touch is created here.
        self._input = input
        self._config = input.config
        # The workflow id names the application and is reused by its next
        # incident, so the run id makes the branch, pull request and budget
        # entry of this incident its own.
        self._incident_id = f"{input.incident_id}-{workflow.info().run_id[:8]}"
        self._status = IncidentStatus(
            incident_id=self._incident_id,
            namespace=input.namespace,
            app=input.app,
            trace_id=input.trace_id,
        )
        self._alerts: dict[str, AlertRecord] = {}
        self._approved: Approval | None = None
        self._aborted: Approval | None = None
        self._merged = False
        self._open_stages: dict[str, tuple[StageTiming, datetime]] = {}

    # --- Messages -----------------------------------------------------------

    @workflow.signal
    def alert(self, alert: AlertSignal) -> None:
        now = workflow.now()
        record = self._alerts.get(alert.fingerprint)
        if record is None:
            record = AlertRecord(
                fingerprint=alert.fingerprint, alertname=alert.alertname, first_seen=now
            )
            self._alerts[alert.fingerprint] = record
        record.status = alert.status
        record.count += 1
        record.last_seen = now
        self._status.alerts = list(self._alerts.values())

    @workflow.signal
    def approve(self, approval: Approval) -> None:
        if self._approved is None:
            self._approved = approval
            self._status.approvals.append(approval)

    @workflow.signal
    def abort(self, approval: Approval) -> None:
        if self._aborted is None:
            self._aborted = approval
            self._status.aborted_by = approval

    @workflow.query
    def status(self) -> IncidentStatus:
        return self._status

    # --- The loop -----------------------------------------------------------

    @workflow.run
    async def run(self, input: IncidentInput) -> IncidentStatus:
        self._upsert_attributes(app=True)
        pull_request: PullRequest | None = None
        reserved = False
        try:
            evidence, anomaly, change, budget = await self._gather_facts()
            decision = await self._decide(evidence, anomaly, change, budget)
            shadow = decision.shadow or self._config.shadow
            if decision.require_approval and not shadow:
                await self._wait_for_approval(decision)
            if not shadow:
                reserved = await self._reserve_budget()
            pull_request = await self._open_pull_request(
                change, decision, evidence, draft=shadow
            )
            if shadow:
                raise _Finish(
                    Outcome.SHADOWED,
                    f"shadow mode: draft pull request {pull_request.url} "
                    "left open, not merged",
                    *decision.reasons,
                )
            pull_request = await self._merge(pull_request)
            await self._wait_for_sync(pull_request.merge_commit, change.repo_url)
            await self._verify(decision)
            raise _Finish(Outcome.RECOVERED, "golden signals back under thresholds")
        except _Finish as finish:
            await self._finish(finish, pull_request, reserved)
        return self._status

    # --- Steps --------------------------------------------------------------

    async def _gather_facts(
        self,
    ) -> tuple[Evidence, SeriesVerdict | None, ChangeResult, BudgetState]:
        """Run steps 1 to 4; they read independent systems, so concurrently."""

        async def timed(stage: Stage, announce: bool, step):
            self._open(stage, announce)
            try:
                return await step()
            finally:
                self._close(stage)

        async def evidence_then_anomaly():
            evidence = await timed(Stage.COLLECT_EVIDENCE, True, self._collect_evidence)
            anomaly = await timed(
                Stage.CONFIRM_ANOMALY, True, lambda: self._confirm_anomaly(evidence)
            )
            return evidence, anomaly

        results = await asyncio.gather(
            evidence_then_anomaly(),
            timed(Stage.FIND_CHANGE, False, self._find_change),
            timed(Stage.READ_BUDGET, False, self._read_budget),
            return_exceptions=True,
        )
        # Every branch has ended, so no activity is left running; the first
        # failure decides the outcome.
        for result in results:
            if isinstance(result, BaseException):
                raise result
        (evidence, anomaly), change, budget = results
        return evidence, anomaly, change, budget

    async def _collect_evidence(self) -> Evidence:
        # The window ends at a time fixed in the history, so a retry after a
        # worker crash reads the same window instead of a later one.
        query = SignalQuery(
            namespace=self._input.namespace,
            app=self._input.app,
            window_seconds=self._config.signal_window_seconds,
            step_seconds=self._config.signal_step_seconds,
            end=workflow.now(),
            recent_seconds=self._config.signal_recent_seconds,
        )
        try:
            # Local activities: quick reads that need no task queue round trip.
            evidence = await workflow.execute_local_activity(
                "collect_evidence",
                query,
                result_type=Evidence,
                start_to_close_timeout=timedelta(seconds=15),
                retry_policy=READ_RETRY,
            )
        except LOCAL_ACTIVITY_FAILURES as err:
            raise _Finish(
                Outcome.ESCALATED, f"metric source did not answer: {_cause(err)}"
            ) from err
        self._status.evidence = evidence
        return evidence

    async def _confirm_anomaly(self, evidence: Evidence) -> SeriesVerdict | None:
        series = detection_series(evidence, self._config.signal_step_seconds)
        if not series:
            # Missing data is not evidence, so the policy gets anomaly = None.
            return None
        try:
            result = await workflow.execute_activity(
                "score_series",
                DetectionInput(series=series),
                result_type=DetectionResult,
                task_queue=self._config.detection_task_queue,
                start_to_close_timeout=timedelta(seconds=30),
                # Bounded even when no detection worker polls the queue.
                schedule_to_close_timeout=timedelta(
                    seconds=self._config.detection_timeout_seconds
                ),
                retry_policy=READ_RETRY,
            )
        except ActivityError as err:
            raise _Finish(
                Outcome.ESCALATED, f"anomaly detection did not answer: {_cause(err)}"
            ) from err
        verdict = max(result.verdicts, key=lambda v: v.score, default=None)
        self._status.anomaly = verdict
        return verdict

    async def _find_change(self) -> ChangeResult:
        try:
            change = await workflow.execute_activity(
                "find_change",
                ChangeQuery(
                    incident_id=self._incident_id,
                    argocd_application=self._config.argocd_application,
                ),
                result_type=ChangeResult,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=READ_RETRY,
            )
        except ActivityError as err:
            raise _Finish(
                Outcome.ESCALATED, f"could not find the suspect change: {_cause(err)}"
            ) from err
        self._status.change = change
        self._check_interrupts()
        return change

    def _budget_query(self) -> BudgetQuery:
        # Policy data may lower an application's limit below the service's.
        limit = self._config.max_rollbacks
        decision = self._status.decision
        if decision is not None and decision.max_rollbacks is not None:
            limit = min(limit, decision.max_rollbacks)
        return BudgetQuery(
            namespace=self._input.namespace,
            app=self._input.app,
            max_rollbacks=limit,
            window_seconds=self._config.budget_window_seconds,
        )

    async def _read_budget(self) -> BudgetState:
        try:
            budget = await workflow.execute_local_activity(
                "read_budget",
                self._budget_query(),
                result_type=BudgetState,
                start_to_close_timeout=timedelta(seconds=15),
                retry_policy=READ_RETRY,
            )
        except LOCAL_ACTIVITY_FAILURES as err:
            raise _Finish(
                Outcome.ESCALATED, f"could not read the rollback budget: {_cause(err)}"
            ) from err
        self._status.budget = budget
        return budget

    async def _decide(
        self,
        evidence: Evidence,
        anomaly: SeriesVerdict | None,
        change: ChangeResult,
        budget: BudgetState,
    ) -> Decision:
        self._enter(Stage.DECIDE)
        request = DecisionInput(
            incident_id=self._incident_id,
            namespace=self._input.namespace,
            app=self._input.app,
            alerts_firing=sum(1 for a in self._alerts.values() if a.status == "firing"),
            evidence=evidence,
            anomaly=anomaly,
            change=change,
            budget=budget,
            approvals=list(self._status.approvals),
            shadow=self._config.shadow,
        )
        try:
            decision = await workflow.execute_local_activity(
                "decide",
                request,
                result_type=Decision,
                start_to_close_timeout=timedelta(seconds=15),
                retry_policy=READ_RETRY,
            )
        except LOCAL_ACTIVITY_FAILURES as err:
            # No decision means no action: fail closed.
            raise _Finish(
                Outcome.ESCALATED, f"policy gave no decision: {_cause(err)}"
            ) from err
        self._status.decision = decision
        self._check_interrupts()
        if not decision.evaluated:
            raise _Finish(Outcome.ESCALATED, *decision.reasons)
        if decision.action == "rollback" and decision.allow:
            return decision
        if decision.action == "escalate":
            if budget.remaining == 0:
                raise _Finish(Outcome.BUDGET_EXHAUSTED, *decision.reasons)
            raise _Finish(Outcome.ESCALATED, *decision.reasons)
        raise _Finish(Outcome.DENIED, *decision.reasons)

    async def _wait_for_approval(self, decision: Decision) -> None:
        self._enter(Stage.APPROVAL)
        timeout = (
            decision.approval_timeout_seconds or self._config.approval_timeout_seconds
        )
        try:
            await workflow.wait_condition(
                lambda: (
                    self._approved is not None
                    or self._aborted is not None
                    or self._all_resolved()
                ),
                timeout=timedelta(seconds=timeout),
            )
        except TimeoutError as err:
            raise _Finish(
                Outcome.ESCALATED, f"no approval within {timeout:.0f} s"
            ) from err
        self._check_interrupts()

    async def _reserve_budget(self) -> bool:
        self._enter(Stage.RESERVE_BUDGET)
        try:
            result = await workflow.execute_activity(
                "reserve_budget",
                BudgetReservation(
                    budget=self._budget_query(), incident_id=self._incident_id
                ),
                result_type=BudgetReservationResult,
                start_to_close_timeout=timedelta(seconds=10),
                retry_policy=READ_RETRY,
            )
        except ActivityError as err:
            raise _Finish(
                Outcome.ESCALATED, f"could not reserve a rollback slot: {_cause(err)}"
            ) from err
        self._status.budget = result.state
        if not result.granted:
            raise _Finish(Outcome.BUDGET_EXHAUSTED, result.reason)
        return True

    async def _open_pull_request(
        self,
        change: ChangeResult,
        decision: Decision,
        evidence: Evidence,
        draft: bool,
    ) -> PullRequest:
        self._enter(Stage.OPEN_PULL_REQUEST)
        try:
            pull_request = await workflow.execute_activity(
                "open_pull_request",
                PullRequestInput(
                    incident_id=self._incident_id,
                    namespace=self._input.namespace,
                    app=self._input.app,
                    change=change,
                    decision=decision,
                    evidence=evidence,
                    trace_id=self._input.trace_id,
                    web_ui_url=self._config.web_ui_url,
                    strategy=self._config.strategy,
                    draft=draft,
                ),
                result_type=PullRequest,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=WRITE_RETRY,
            )
        except ActivityError as err:
            raise _Finish(
                Outcome.ESCALATED, f"could not open the pull request: {_cause(err)}"
            ) from err
        self._status.pull_request = pull_request
        return pull_request

    async def _merge(self, pull_request: PullRequest) -> PullRequest:
        self._enter(Stage.MERGE_PULL_REQUEST)
        # The last point at which an abort or a resolved alert prevents the
        # rollback: both close the pull request instead.
        self._check_interrupts()
        try:
            merged = await workflow.execute_activity(
                "merge_pull_request",
                MergeInput(incident_id=self._incident_id, pull_request=pull_request),
                result_type=PullRequest,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=WRITE_RETRY,
            )
        except ActivityError as err:
            raise _Finish(
                Outcome.ESCALATED, f"could not merge the pull request: {_cause(err)}"
            ) from err
        self._merged = True
        self._status.pull_request = merged
        self._status.merge_commit = merged.merge_commit
        await self._release_budget(commit=True)
        return merged

    async def _wait_for_sync(self, revision: str, repo_url: str) -> SyncResult:
        self._enter(Stage.WAIT_FOR_SYNC)
        # The activity gives up at sync_timeout_seconds and reports its last
        # status; the margin lets that report arrive.
        timeout = timedelta(seconds=self._config.sync_timeout_seconds + 60)
        activity_task = workflow.start_activity(
            "wait_for_sync",
            SyncInput(
                argocd_application=self._config.argocd_application,
                revision=revision,
                timeout_seconds=self._config.sync_timeout_seconds,
                repo_url=repo_url,
            ),
            result_type=SyncResult,
            start_to_close_timeout=timeout,
            # Above the activity's longest back-off (10 s) plus one HTTP timeout.
            heartbeat_timeout=timedelta(seconds=25),
            retry_policy=READ_RETRY,
        )
        await workflow.wait_condition(
            lambda: activity_task.done() or self._aborted is not None
        )
        if not activity_task.done():
            activity_task.cancel()
            self._check_interrupts()
        try:
            result = await activity_task
        except ActivityError as err:
            raise _Finish(
                Outcome.ESCALATED,
                f"Argo CD did not sync revision {revision[:12]}: {_cause(err)}",
            ) from err
        self._status.sync = result
        if not result.synced:
            raise _Finish(
                Outcome.ESCALATED,
                f"Argo CD did not report revision {revision[:12]} synced and "
                f"healthy: {result.message or result.sync_status}",
            )
        return result

    async def _verify(self, decision: Decision) -> None:
        self._enter(Stage.VERIFY)
        verify = self._config.verify
        max_error_ratio = decision.max_error_ratio or DEFAULT_MAX_ERROR_RATIO
        healthy_in_a_row = 0
        for _ in range(verify.max_intervals):
            # A durable timer that an abort cuts short.
            try:
                await workflow.wait_condition(
                    lambda: self._aborted is not None,
                    timeout=timedelta(seconds=verify.interval_seconds),
                )
            except TimeoutError:
                pass
            self._check_interrupts()
            result = await self._verify_interval(
                max_error_ratio, decision.max_latency_p99_seconds
            )
            self._status.verifications.append(result)
            self._refresh_details()
            healthy_in_a_row = healthy_in_a_row + 1 if result.healthy else 0
            if healthy_in_a_row >= verify.consecutive_intervals:
                return
        last = (
            self._status.verifications[-1].reason if self._status.verifications else ""
        )
        raise _Finish(
            Outcome.ESCALATED,
            f"not recovered: fewer than {verify.consecutive_intervals} healthy "
            f"intervals in a row within {verify.max_intervals}",
            last,
        )

    async def _verify_interval(
        self, max_error_ratio: float, max_latency: float | None
    ) -> VerifyResult:
        query = SignalQuery(
            namespace=self._input.namespace,
            app=self._input.app,
            window_seconds=self._config.verify.interval_seconds,
            step_seconds=self._config.verify.interval_seconds,
        )
        try:
            return await workflow.execute_activity(
                "verify_interval",
                VerifyInput(
                    query=query,
                    max_error_ratio=max_error_ratio,
                    max_latency_p99_seconds=max_latency,
                ),
                result_type=VerifyResult,
                start_to_close_timeout=timedelta(seconds=15),
                retry_policy=READ_RETRY,
            )
        except ActivityError as err:
            # An unreadable interval never counts as recovered.
            return VerifyResult(
                healthy=False, no_data=True, reason=f"no answer: {_cause(err)}"
            )

    # --- Ending -------------------------------------------------------------

    async def _finish(
        self, finish: _Finish, pull_request: PullRequest | None, reserved: bool
    ) -> None:
        self._enter(Stage.CLOSE)
        outcome = finish.outcome
        if not self._merged and outcome is not Outcome.SHADOWED:
            if pull_request is not None:
                await self._close_pull_request(pull_request, outcome.value)
            if reserved:
                await self._release_budget(commit=False)
        self._status.outcome = outcome.value
        self._status.reasons = [r for r in finish.reasons if r]
        self._count_outcome(outcome)
        if outcome in (Outcome.ESCALATED, Outcome.BUDGET_EXHAUSTED):
            await self._escalate(outcome)
        self._enter(None)
        self._upsert_attributes()
        self._refresh_details()
        workflow.logger.info(
            "Incident %s ended %s: %s",
            self._incident_id,
            outcome.value,
            "; ".join(self._status.reasons),
        )

    async def _close_pull_request(self, pull_request: PullRequest, why: str) -> None:
        try:
            closed = await workflow.execute_activity(
                "close_pull_request",
                ClosePullRequestInput(
                    incident_id=self._incident_id,
                    pull_request=pull_request,
                    reason=why,
                ),
                result_type=PullRequest,
                start_to_close_timeout=timedelta(seconds=60),
                retry_policy=CLEANUP_RETRY,
            )
            self._status.pull_request = closed
        except ActivityError as err:
            # Leave the record of the open pull request; a human closes it.
            workflow.logger.error(
                "Could not close pull request %s: %s", pull_request.url, _cause(err)
            )

    async def _release_budget(self, commit: bool) -> None:
        try:
            self._status.budget = await workflow.execute_activity(
                "release_budget",
                BudgetRelease(
                    budget=self._budget_query(),
                    incident_id=self._incident_id,
                    commit=commit,
                ),
                result_type=BudgetState,
                start_to_close_timeout=timedelta(seconds=15),
                retry_policy=CLEANUP_RETRY,
            )
        except ActivityError as err:
            # An unreleased reservation expires with the window; log and go on.
            workflow.logger.error(
                "Could not update the rollback budget of incident %s: %s",
                self._incident_id,
                _cause(err),
            )

    async def _escalate(self, outcome: Outcome) -> None:
        try:
            await workflow.execute_activity(
                "escalate",
                EscalationInput(
                    incident_id=self._incident_id,
                    namespace=self._input.namespace,
                    app=self._input.app,
                    outcome=outcome.value,
                    reasons=self._status.reasons,
                    web_ui_url=self._config.web_ui_url,
                ),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=CLEANUP_RETRY,
            )
        except ActivityError as err:
            # The outcome stays visible in the Web UI even if no notifier works.
            workflow.logger.error(
                "Could not escalate incident %s: %s",
                self._incident_id,
                _cause(err),
            )

    # --- Helpers ------------------------------------------------------------

    def _all_resolved(self) -> bool:
        return bool(self._alerts) and all(
            record.status == "resolved" for record in self._alerts.values()
        )

    def _check_interrupts(self) -> None:
        """End the incident when a human aborted it or its alerts resolved."""
        if self._aborted is not None:
            by = self._aborted
            raise _Finish(Outcome.ABORTED, f"aborted by {by.by}: {by.reason}")
        if not self._merged and self._all_resolved():
            raise _Finish(Outcome.RESOLVED, "every alert resolved before any action")

    def _open(self, stage: Stage, announce: bool = True) -> None:
        """Start timing a stage; `announce` makes it the stage shown in the UI."""
        timing = StageTiming(name=stage.value, seconds=0.0)
        self._status.stages.append(timing)
        self._open_stages[stage.value] = (timing, workflow.now())
        if announce:
            self._status.stage = stage.value
            self._upsert_attributes()
            self._refresh_details()

    def _close(self, stage: Stage) -> None:
        timing, started = self._open_stages.pop(stage.value)
        timing.seconds = round((workflow.now() - started).total_seconds(), 3)
        workflow.metric_meter().create_histogram_float(
            STAGE_DURATION_METRIC, "Seconds an incident spent in one stage", "s"
        ).record(timing.seconds, {"stage": stage.value})

    def _count_outcome(self, outcome: Outcome) -> None:
        """Count the ended incident, and a budget denial when the budget ended it."""
        meter = workflow.metric_meter()
        application = {"app_namespace": self._input.namespace, "app": self._input.app}
        meter.create_counter(INCIDENTS_METRIC, "Incidents ended, by outcome").add(
            1, {"outcome": outcome.value, **application}
        )
        if outcome is Outcome.BUDGET_EXHAUSTED:
            meter.create_counter(
                BUDGET_DENIALS_METRIC,
                "Incidents ended without a rollback because the budget was used up",
            ).add(1, application)

    def _enter(self, stage: Stage | None) -> None:
        """Close every open stage and start the next one, if any."""
        for name in list(self._open_stages):
            self._close(Stage(name))
        if stage is not None:
            self._open(stage)

    def _upsert_attributes(self, app: bool = False) -> None:
        if not self._config.search_attributes:
            return
        updates = [STAGE_ATTRIBUTE.value_set(self._status.stage or "started")]
        if app:
            updates.append(APP_ATTRIBUTE.value_set(self._input.app))
            updates.append(NAMESPACE_ATTRIBUTE.value_set(self._input.namespace))
        if self._status.outcome:
            updates.append(OUTCOME_ATTRIBUTE.value_set(self._status.outcome))
        workflow.upsert_search_attributes(updates)

    def _refresh_details(self) -> None:
        workflow.set_current_details(_details_markdown(self._status))


def _cause(err: BaseException) -> str:
    """Return the innermost message of an activity failure."""
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err) or type(err).__name__


def _details_markdown(status: IncidentStatus) -> str:
    """Render the incident's current state for the Web UI's details panel."""
    lines = [f"**Stage:** {status.stage or 'started'}"]
    if status.outcome:
        lines.append(f"**Outcome:** {status.outcome}")
    if status.evidence is not None:
        ev = status.evidence
        lines.append(
            f"**Evidence:** error ratio {_number(ev.error_ratio)}, "
            f"p99 latency {_number(ev.latency_p99_seconds)} s, "
            f"request rate {_number(ev.request_rate)}/s"
        )
    if status.anomaly is not None:
        lines.append(
            f"**Anomaly:** score {status.anomaly.score:.2f}, sustained "
            f"{status.anomaly.sustained_seconds:.0f} s"
        )
    if status.decision is not None:
        lines.append(f"**Decision:** {status.decision.action}")
        lines.extend(f"- {reason}" for reason in status.decision.reasons)
    if status.pull_request is not None:
        pr = status.pull_request
        lines.append(
            f"**Pull request:** [{pr.title or pr.branch}]({pr.url}) ({pr.state})"
        )
    if status.budget is not None:
        lines.append(
            f"**Budget:** {status.budget.used} of {status.budget.max_rollbacks} used"
        )
    if status.reasons:
        lines.append("**Reasons:**")
        lines.extend(f"- {reason}" for reason in status.reasons)
    return "\n\n".join(lines)


def _number(value: float | None) -> str:
    return "no data" if value is None else f"{value:.3g}"
