"""DetectionSweepWorkflow on the time-skipping test server, with faked activities.

The fakes are registered under the real activity names: `collect_evidence`,
`discover_applications` and `open_incident` on the sweep's task queue, and
`score_series` on a detection queue of its own. An application is anomalous
when its error ratio ends above 0.2.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from workflows.models import (
    DetectionInput,
    DetectionResult,
    DiscoveryQuery,
    Evidence,
    OpenIncidentInput,
    SeriesVerdict,
    SignalPoint,
    SignalQuery,
    SweepInput,
    SweepResult,
)
from workflows.sweep import DetectionSweepWorkflow

START = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


class FakeFleet:
    """Error ratios per application, and a record of the incidents opened."""

    def __init__(self, ratios: dict[str, float | None]) -> None:
        self.ratios = ratios
        self.unreachable: set[str] = set()
        self.discovered: list[str] = []
        self.opened: list[OpenIncidentInput] = []
        self.batches: list[int] = []
        self.detection_down = False

    def activities(self) -> list:
        @activity.defn(name="collect_evidence")
        async def collect_evidence(query: SignalQuery) -> Evidence:
            key = f"{query.namespace}/{query.app}"
            if key in self.unreachable:
                raise ApplicationError(
                    "Prometheus returned 403", type="Rejected", non_retryable=True
                )
            ratio = self.ratios.get(key)
            if ratio is None:
                return Evidence(namespace=query.namespace, app=query.app)
            points = [
                SignalPoint(
                    end=START + timedelta(seconds=15 * i),
                    requests=100,
                    errors=100 * (0.01 if i < 50 else ratio),
                    error_ratio=0.01 if i < 50 else ratio,
                )
                for i in range(60)
            ]
            return Evidence(
                namespace=query.namespace, app=query.app, has_data=True, points=points
            )

        @activity.defn(name="discover_applications")
        async def discover_applications(query: DiscoveryQuery) -> list[str]:
            return self.discovered

        @activity.defn(name="open_incident")
        async def open_incident(input: OpenIncidentInput) -> str:
            self.opened.append(input)
            return f"incident-{input.namespace}-{input.app}"

        return [collect_evidence, discover_applications, open_incident]

    def detection(self) -> list:
        @activity.defn(name="score_series")
        async def score_series(input: DetectionInput) -> DetectionResult:
            if self.detection_down:
                raise ApplicationError("CUDA error", non_retryable=True)
            self.batches.append(len(input.series))
            verdicts = []
            for series in input.series:
                last = series.values[-1] or 0.0
                anomalous = series.key.endswith(":error_ratio") and last > 0.2
                verdicts.append(
                    SeriesVerdict(
                        key=series.key,
                        score=0.99 if anomalous else 0.1,
                        anomalous=anomalous,
                        sustained_seconds=150.0 if anomalous else 0.0,
                        points_scored=len(series.values),
                    )
                )
            return DetectionResult(verdicts=verdicts, device="fake")

        return [score_series]


async def sweep(
    env: WorkflowEnvironment, fleet: FakeFleet, task_queue: str, **fields
) -> SweepResult:
    detection_queue = f"{task_queue}-detection"
    input = SweepInput(detection_task_queue=detection_queue, **fields)
    async with (
        Worker(
            env.client,
            task_queue=task_queue,
            workflows=[DetectionSweepWorkflow],
            activities=fleet.activities(),
        ),
        Worker(env.client, task_queue=detection_queue, activities=fleet.detection()),
    ):
        return await env.client.execute_workflow(
            DetectionSweepWorkflow.run,
            input,
            id=f"sweep-{uuid.uuid4()}",
            task_queue=task_queue,
            result_type=SweepResult,
        )


@pytest.mark.asyncio
async def test_sweep_opens_incident_per_anomaly(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fleet = FakeFleet({"shop/cart": 0.4, "shop/checkout": 0.01, "web/front": 0.3})
    result = await sweep(
        time_skipping_env,
        fleet,
        task_queue,
        applications=["shop/cart", "shop/checkout", "web/front"],
    )
    assert result.applications == 3
    assert result.series_scored == 3
    assert [f.application for f in result.findings] == ["shop/cart", "web/front"]
    assert result.findings[0].series == "shop/cart:error_ratio"
    assert result.findings[0].incident_workflow_id == "incident-shop-cart"
    assert [(i.namespace, i.app) for i in fleet.opened] == [
        ("shop", "cart"),
        ("web", "front"),
    ]
    assert result.device == "fake"
    assert result.skipped == {}


@pytest.mark.asyncio
async def test_dry_run_reports_without_opening(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fleet = FakeFleet({"shop/cart": 0.4})
    result = await sweep(
        time_skipping_env,
        fleet,
        task_queue,
        applications=["shop/cart"],
        open_incidents=False,
    )
    assert [f.application for f in result.findings] == ["shop/cart"]
    assert result.findings[0].incident_workflow_id == ""
    assert fleet.opened == []


@pytest.mark.asyncio
async def test_unreadable_applications_are_skipped(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fleet = FakeFleet({"shop/cart": 0.4, "shop/quiet": None, "shop/locked": 0.9})
    fleet.unreachable.add("shop/locked")
    result = await sweep(
        time_skipping_env,
        fleet,
        task_queue,
        applications=["shop/cart", "shop/locked", "shop/quiet"],
    )
    assert [f.application for f in result.findings] == ["shop/cart"]
    assert "403" in result.skipped["shop/locked"]
    assert result.skipped["shop/quiet"] == "no data in the window"
    # Fail closed: no incident for an application the sweep could not read.
    assert [i.app for i in fleet.opened] == ["cart"]


@pytest.mark.asyncio
async def test_detection_failure_opens_nothing(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fleet = FakeFleet({"shop/cart": 0.4})
    fleet.detection_down = True
    result = await sweep(
        time_skipping_env, fleet, task_queue, applications=["shop/cart"]
    )
    assert result.findings == []
    assert "anomaly detection did not answer" in result.skipped["shop/cart"]
    assert fleet.opened == []


@pytest.mark.asyncio
async def test_discovery_and_continue_as_new(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    ratios = {f"team/app-{i}": (0.5 if i % 4 == 0 else 0.01) for i in range(9)}
    fleet = FakeFleet(ratios)
    fleet.discovered = sorted(ratios)[3:]
    result = await sweep(
        time_skipping_env,
        fleet,
        task_queue,
        applications=sorted(ratios)[:3],
        discover=True,
        batch_series=2,
        applications_per_run=4,
    )
    # Nine applications over three runs (4 + 4 + 1), scored two series a call.
    assert result.applications == 9
    assert result.series_scored == 9
    assert max(fleet.batches) == 2
    assert result.detection_calls == len(fleet.batches)
    assert [f.application for f in result.findings] == [
        "team/app-0",
        "team/app-4",
        "team/app-8",
    ]


@pytest.mark.asyncio
async def test_short_anomalies_open_nothing(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fleet = FakeFleet({"shop/cart": 0.4})
    result = await sweep(
        time_skipping_env,
        fleet,
        task_queue,
        applications=["shop/cart"],
        min_sustained_seconds=300,
    )
    assert result.findings == []
    assert fleet.opened == []


@pytest.mark.asyncio
async def test_batches_stay_under_the_points_limit(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    ratios = {f"team/app-{i}": 0.01 for i in range(5)}
    fleet = FakeFleet(ratios)
    # Each series has 60 points, so 130 points allow two series a call.
    result = await sweep(
        time_skipping_env,
        fleet,
        task_queue,
        applications=sorted(ratios),
        batch_points=130,
    )
    assert fleet.batches == [2, 2, 1]
    assert result.series_scored == 5
