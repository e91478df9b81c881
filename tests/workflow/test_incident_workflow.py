"""IncidentWorkflow on the time-skipping test server, with every activity faked.

The fakes are registered under the real activity names, so these tests pin the
contract between the workflow and `activities/`.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest
from temporalio import activity
from temporalio.client import WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from workflows.budget import RollbackBudgetWorkflow
from workflows.incident import IncidentWorkflow
from workflows.models import (
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
    ImageChange,
    IncidentConfig,
    IncidentInput,
    IncidentStatus,
    MergeInput,
    PullRequest,
    PullRequestInput,
    SeriesVerdict,
    SignalPoint,
    SignalQuery,
    SyncInput,
    SyncResult,
    VerifyConfig,
    VerifyInput,
    VerifyResult,
)

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


class FakeWorld:
    """Canned results of every activity, and a record of the calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.decision = Decision(
            allow=True,
            action="rollback",
            reasons=["error ratio 0.40 above 0.05"],
            max_error_ratio=0.05,
            engine="fake",
        )
        self.budget_granted = True
        self.verify_healthy = [True] * 10
        self.sync_error: str | None = None
        self.evidence_error: str | None = None
        self.decide_error: str | None = None
        self.escalations: list[EscalationInput] = []
        self.releases: list[BudgetRelease] = []
        self.pull_requests: list[PullRequestInput] = []

    def activities(self) -> list:
        world = self

        @activity.defn(name="collect_evidence")
        async def collect_evidence(query: SignalQuery) -> Evidence:
            world.calls.append("collect_evidence")
            if world.evidence_error:
                raise ApplicationError(world.evidence_error, non_retryable=True)
            points = [
                SignalPoint(end=NOW, requests=100, errors=40, error_ratio=0.4)
            ] * 5
            return Evidence(
                namespace=query.namespace,
                app=query.app,
                has_data=True,
                request_rate=50.0,
                error_ratio=0.4,
                points=points,
            )

        @activity.defn(name="find_change")
        async def find_change(query: ChangeQuery) -> ChangeResult:
            world.calls.append("find_change")
            return ChangeResult(
                found=True,
                path="apps/shop",
                suspect_revision="b" * 40,
                last_good_revision="a" * 40,
                image_changes=[
                    ImageChange(
                        file="apps/shop/deployment.yaml",
                        location="0.spec.template.spec.containers.0.image",
                        good="shop:1.0",
                        bad="shop:1.1",
                    )
                ],
            )

        @activity.defn(name="read_budget")
        async def read_budget(budget: BudgetQuery) -> BudgetState:
            world.calls.append("read_budget")
            return BudgetState(
                key=f"{budget.namespace}/{budget.app}",
                max_rollbacks=budget.max_rollbacks,
                window_seconds=budget.window_seconds,
                used=0,
                remaining=budget.max_rollbacks,
            )

        @activity.defn(name="decide")
        async def decide(request: DecisionInput) -> Decision:
            world.calls.append("decide")
            if world.decide_error:
                raise ApplicationError(world.decide_error, non_retryable=True)
            return world.decision

        @activity.defn(name="reserve_budget")
        async def reserve_budget(request: BudgetReservation) -> BudgetReservationResult:
            world.calls.append("reserve_budget")
            state = BudgetState(
                key="shop/shop",
                max_rollbacks=2,
                window_seconds=1800,
                used=2 if not world.budget_granted else 1,
                remaining=0,
            )
            return BudgetReservationResult(
                granted=world.budget_granted,
                reason="" if world.budget_granted else "budget used up",
                state=state,
            )

        @activity.defn(name="release_budget")
        async def release_budget(request: BudgetRelease) -> BudgetState:
            world.calls.append("release_budget")
            world.releases.append(request)
            return BudgetState(
                key="shop/shop",
                max_rollbacks=2,
                window_seconds=1800,
                used=1,
                remaining=1,
            )

        @activity.defn(name="open_pull_request")
        async def open_pull_request(request: PullRequestInput) -> PullRequest:
            world.calls.append("open_pull_request")
            world.pull_requests.append(request)
            return PullRequest(
                provider="fake",
                number=1,
                url="file:///pulls/1",
                branch=f"remediation/{request.incident_id}",
                target_branch="main",
                head_commit="c" * 40,
                draft=request.draft,
            )

        @activity.defn(name="merge_pull_request")
        async def merge_pull_request(request: MergeInput) -> PullRequest:
            world.calls.append("merge_pull_request")
            return request.pull_request.model_copy(
                update={"state": "merged", "merge_commit": "d" * 40}
            )

        @activity.defn(name="close_pull_request")
        async def close_pull_request(request: ClosePullRequestInput) -> PullRequest:
            world.calls.append("close_pull_request")
            return request.pull_request.model_copy(update={"state": "closed"})

        @activity.defn(name="wait_for_sync")
        async def wait_for_sync(request: SyncInput) -> SyncResult:
            world.calls.append("wait_for_sync")
            if world.sync_error:
                raise ApplicationError(
                    world.sync_error, type="SyncFailed", non_retryable=True
                )
            return SyncResult(
                synced=True,
                revision=request.revision,
                sync_status="Synced",
                health_status="Healthy",
            )

        @activity.defn(name="verify_interval")
        async def verify_interval(request: VerifyInput) -> VerifyResult:
            world.calls.append("verify_interval")
            healthy = world.verify_healthy.pop(0) if world.verify_healthy else False
            return VerifyResult(
                healthy=healthy,
                error_ratio=0.01 if healthy else 0.4,
                reason="" if healthy else "error ratio 0.40 above 0.05",
            )

        @activity.defn(name="escalate")
        async def escalate(request: EscalationInput) -> None:
            world.calls.append("escalate")
            world.escalations.append(request)

        return [
            collect_evidence,
            find_change,
            read_budget,
            decide,
            reserve_budget,
            release_budget,
            open_pull_request,
            merge_pull_request,
            close_pull_request,
            wait_for_sync,
            verify_interval,
            escalate,
        ]

    def detection_activities(self) -> list:
        world = self

        @activity.defn(name="score_series")
        async def score_series(request: DetectionInput) -> DetectionResult:
            world.calls.append("score_series")
            return DetectionResult(
                verdicts=[
                    SeriesVerdict(
                        key=s.key, score=0.97, anomalous=True, sustained_seconds=60
                    )
                    for s in request.series
                ]
            )

        return [score_series]


def incident_input(task_queue: str, **config: object) -> IncidentInput:
    settings = {
        "argocd_application": "shop",
        "detection_task_queue": f"{task_queue}-detection",
        "verify": VerifyConfig(interval_seconds=30, consecutive_intervals=3),
        **config,
    }
    return IncidentInput(
        incident_id=f"incident-shop-shop-{uuid.uuid4().hex[:8]}",
        namespace="shop",
        app="shop",
        trace_id="0" * 32,
        config=IncidentConfig(**settings),
    )


def firing(fingerprint: str = "f1") -> AlertSignal:
    return AlertSignal(fingerprint=fingerprint, status="firing", alertname="HighErrors")


def resolved(fingerprint: str = "f1") -> AlertSignal:
    return AlertSignal(
        fingerprint=fingerprint, status="resolved", alertname="HighErrors"
    )


async def start(
    env: WorkflowEnvironment, task_queue: str, **config: object
) -> WorkflowHandle:
    request = incident_input(task_queue, **config)
    return await env.client.start_workflow(
        IncidentWorkflow.run,
        request,
        id=request.incident_id,
        task_queue=task_queue,
        start_signal="alert",
        start_signal_args=[firing()],
    )


async def run_incident(
    env: WorkflowEnvironment, task_queue: str, world: FakeWorld, **config: object
) -> IncidentStatus:
    async with (
        Worker(
            env.client,
            task_queue=task_queue,
            workflows=[IncidentWorkflow, RollbackBudgetWorkflow],
            activities=world.activities(),
        ),
        Worker(
            env.client,
            task_queue=f"{task_queue}-detection",
            activities=world.detection_activities(),
        ),
    ):
        handle = await start(env, task_queue, **config)
        return await handle.result()


async def test_rollback_recovers(time_skipping_env, task_queue):
    world = FakeWorld()
    status = await run_incident(time_skipping_env, task_queue, world)
    assert status.outcome == "recovered"
    assert status.merge_commit == "d" * 40
    assert [r.commit for r in world.releases] == [True]
    assert world.calls.count("verify_interval") == 3


async def test_stages_are_timed_in_order(time_skipping_env, task_queue):
    status = await run_incident(time_skipping_env, task_queue, FakeWorld())
    names = [stage.name for stage in status.stages]
    assert set(names[:4]) == {
        "collect-evidence",
        "confirm-anomaly",
        "find-change",
        "read-budget",
    }
    assert names[4:] == [
        "decide",
        "reserve-budget",
        "open-pull-request",
        "merge-pull-request",
        "wait-for-sync",
        "verify",
        "close",
    ]
    verify = next(stage for stage in status.stages if stage.name == "verify")
    assert verify.seconds >= 90


async def test_policy_no_action_is_denied(time_skipping_env, task_queue):
    world = FakeWorld()
    world.decision = Decision(action="none", reasons=["not breaching"])
    status = await run_incident(time_skipping_env, task_queue, world)
    assert status.outcome == "denied"
    assert "open_pull_request" not in world.calls


async def test_missing_decision_fails_closed(time_skipping_env, task_queue):
    world = FakeWorld()
    world.decision = Decision(
        action="escalate", evaluated=False, reasons=["no decision: undefined"]
    )
    status = await run_incident(time_skipping_env, task_queue, world)
    assert status.outcome == "escalated"
    assert "open_pull_request" not in world.calls
    assert len(world.escalations) == 1


async def test_budget_denial_ends_budget_exhausted(time_skipping_env, task_queue):
    world = FakeWorld()
    world.budget_granted = False
    status = await run_incident(time_skipping_env, task_queue, world)
    assert status.outcome == "budget-exhausted"
    assert "open_pull_request" not in world.calls
    assert world.escalations[0].outcome == "budget-exhausted"


async def test_verification_failure_escalates(time_skipping_env, task_queue):
    world = FakeWorld()
    world.verify_healthy = [False] * 10
    status = await run_incident(time_skipping_env, task_queue, world)
    assert status.outcome == "escalated"
    assert world.calls.count("merge_pull_request") == 1
    assert [r.commit for r in world.releases] == [True]


async def test_metric_source_down_escalates(time_skipping_env, task_queue):
    world = FakeWorld()
    world.evidence_error = "failed to connect to Prometheus"
    status = await run_incident(time_skipping_env, task_queue, world)
    assert status.outcome == "escalated"
    assert "metric source did not answer" in status.reasons[0]
    assert "open_pull_request" not in world.calls


async def test_policy_error_escalates(time_skipping_env, task_queue):
    world = FakeWorld()
    world.decide_error = "policy engine crashed"
    status = await run_incident(time_skipping_env, task_queue, world)
    assert status.outcome == "escalated"
    assert "policy gave no decision" in status.reasons[0]
    assert "open_pull_request" not in world.calls


async def test_sync_failure_escalates(time_skipping_env, task_queue):
    world = FakeWorld()
    world.sync_error = "operation Failed at the merged revision"
    status = await run_incident(time_skipping_env, task_queue, world)
    assert status.outcome == "escalated"
    assert "verify_interval" not in world.calls


async def test_shadow_mode_opens_draft_only(time_skipping_env, task_queue):
    world = FakeWorld()
    status = await run_incident(time_skipping_env, task_queue, world, shadow=True)
    assert status.outcome == "shadowed"
    assert world.pull_requests[0].draft is True
    assert "merge_pull_request" not in world.calls
    assert "reserve_budget" not in world.calls


async def test_detection_worker_absent_escalates(time_skipping_env, task_queue):
    world = FakeWorld()
    async with Worker(
        time_skipping_env.client,
        task_queue=task_queue,
        workflows=[IncidentWorkflow],
        activities=world.activities(),
    ):
        # The test server does not skip time while an activity waits for a
        # poller, so the timeout is short in real time.
        handle = await start(time_skipping_env, task_queue, detection_timeout_seconds=2)
        status = await handle.result()
    assert status.outcome == "escalated"
    assert "anomaly detection did not answer" in status.reasons[0]


class TestApproval:
    async def _started(self, env, task_queue, world):
        world.decision = world.decision.model_copy(
            update={"require_approval": True, "approval_timeout_seconds": 600}
        )
        return world

    async def test_approve_signal_continues(self, time_skipping_env, task_queue):
        world = await self._started(time_skipping_env, task_queue, FakeWorld())
        async with (
            Worker(
                time_skipping_env.client,
                task_queue=task_queue,
                workflows=[IncidentWorkflow],
                activities=world.activities(),
            ),
            Worker(
                time_skipping_env.client,
                task_queue=f"{task_queue}-detection",
                activities=world.detection_activities(),
            ),
        ):
            handle = await start(time_skipping_env, task_queue)
            await _wait_for_stage(time_skipping_env, handle, "awaiting-approval")
            await handle.signal("approve", Approval(by="alice", reason="checked"))
            status = await handle.result()
        assert status.outcome == "recovered"
        assert status.approvals[0].by == "alice"

    async def test_approval_timeout_escalates(self, time_skipping_env, task_queue):
        world = await self._started(time_skipping_env, task_queue, FakeWorld())
        status = await run_incident(time_skipping_env, task_queue, world)
        assert status.outcome == "escalated"
        assert "no approval within 600 s" in status.reasons
        assert "reserve_budget" not in world.calls

    async def test_abort_while_waiting(self, time_skipping_env, task_queue):
        world = await self._started(time_skipping_env, task_queue, FakeWorld())
        async with (
            Worker(
                time_skipping_env.client,
                task_queue=task_queue,
                workflows=[IncidentWorkflow],
                activities=world.activities(),
            ),
            Worker(
                time_skipping_env.client,
                task_queue=f"{task_queue}-detection",
                activities=world.detection_activities(),
            ),
        ):
            handle = await start(time_skipping_env, task_queue)
            await _wait_for_stage(time_skipping_env, handle, "awaiting-approval")
            await handle.signal("abort", Approval(by="bob", reason="false alarm"))
            status = await handle.result()
        assert status.outcome == "aborted"
        assert status.aborted_by.by == "bob"
        assert "open_pull_request" not in world.calls

    async def test_resolved_alert_ends_resolved(self, time_skipping_env, task_queue):
        world = await self._started(time_skipping_env, task_queue, FakeWorld())
        async with (
            Worker(
                time_skipping_env.client,
                task_queue=task_queue,
                workflows=[IncidentWorkflow],
                activities=world.activities(),
            ),
            Worker(
                time_skipping_env.client,
                task_queue=f"{task_queue}-detection",
                activities=world.detection_activities(),
            ),
        ):
            handle = await start(time_skipping_env, task_queue)
            await _wait_for_stage(time_skipping_env, handle, "awaiting-approval")
            await handle.signal("alert", firing())
            await handle.signal("alert", resolved())
            status = await handle.result()
        assert status.outcome == "resolved"
        assert status.alerts[0].count == 3
        assert "open_pull_request" not in world.calls


async def _wait_for_stage(
    env: WorkflowEnvironment, handle: WorkflowHandle, stage: str
) -> None:
    """Poll the status query until the workflow reaches `stage`."""
    for _ in range(200):
        status = await handle.query("status", result_type=IncidentStatus)
        if status.stage == stage:
            return
        with env.auto_time_skipping_disabled():
            await asyncio.sleep(0.05)
    pytest.fail(f"workflow never reached stage {stage}")
