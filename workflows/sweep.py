"""DetectionSweepWorkflow: look for anomalies that no alert reported.

A Temporal Schedule (`remediator sweep schedule`) or `remediator sweep` starts
it. It reads the golden signals of every opted-in application over one window,
scores all their series in batches on the detection task queue, and opens an
incident, through signal-with-start as the intake does, for each application
with a sustained anomaly. The incident then confirms the anomaly again and runs
the usual loop, so the budget and the policy still apply.

A read that fails for one application skips that application and names the
reason in the result: the sweep never opens an incident on missing data. Each
run sweeps at most `SweepInput.applications_per_run` applications and continues
as new for the rest, so the evidence in the history stays bounded.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from workflows.incident import READ_RETRY, WRITE_RETRY, _cause
    from workflows.models import (
        DetectionInput,
        DetectionResult,
        DiscoveryQuery,
        Evidence,
        OpenIncidentInput,
        Series,
        SignalQuery,
        SweepFinding,
        SweepInput,
        SweepResult,
        detection_series,
    )


def _split_key(key: str) -> tuple[str, str]:
    namespace, _, app = key.partition("/")
    return namespace, app


@workflow.defn(name="DetectionSweepWorkflow")
class DetectionSweepWorkflow:
    """Sweep the opted-in applications once; see the module docstring."""

    def __init__(self) -> None:
        self._result = SweepResult()

    @workflow.query(name="status")
    def status(self) -> SweepResult:
        """Return what the sweep has read, scored and found so far."""
        return self._result

    @workflow.run
    async def run(self, input: SweepInput) -> SweepResult:
        self._result = input.carried or SweepResult()
        offset = input.offset
        per_run = max(1, input.applications_per_run)
        keys = await self._applications(input)
        page = keys[offset : offset + per_run]
        end = workflow.now()

        evidence = await self._read_all(input, page, end)
        series: list[Series] = []
        for key in page:
            if key not in evidence:
                continue
            found = detection_series(evidence[key], input.step_seconds)
            if found:
                series.extend(found)
            else:
                self._result.skipped[key] = "no data in the window"
        verdicts = await self._score(input, series)

        flagged: dict[str, SweepFinding] = {}
        for verdict in verdicts:
            application = verdict.key.rpartition(":")[0]
            if not verdict.anomalous:
                continue
            if verdict.sustained_seconds < input.min_sustained_seconds:
                continue
            best = flagged.get(application)
            if best is None or verdict.score > best.score:
                flagged[application] = SweepFinding(
                    application=application,
                    series=verdict.key,
                    score=verdict.score,
                    sustained_seconds=verdict.sustained_seconds,
                )
        for application in sorted(flagged):
            finding = flagged[application]
            if input.open_incidents:
                finding.incident_workflow_id = await self._open_incident(finding)
            self._result.findings.append(finding)
        self._result.applications += len(page)
        self._result.series_scored += len(series)
        workflow.set_current_details(_details_markdown(self._result))

        if offset + per_run < len(keys):
            workflow.continue_as_new(
                input.model_copy(
                    update={
                        "offset": offset + per_run,
                        "carried": self._result,
                    }
                )
            )
        return self._result

    async def _applications(self, input: SweepInput) -> list[str]:
        keys = set(input.applications)
        if input.discover:
            found = await workflow.execute_activity(
                "discover_applications",
                DiscoveryQuery(window_seconds=input.window_seconds),
                result_type=list[str],
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=READ_RETRY,
            )
            keys.update(found)
        return sorted(keys)

    async def _read_all(
        self, input: SweepInput, keys: list[str], end: datetime
    ) -> dict[str, Evidence]:
        evidence: dict[str, Evidence] = {}
        for start in range(0, len(keys), max(1, input.concurrency)):
            chunk = keys[start : start + max(1, input.concurrency)]
            reads = await asyncio.gather(
                *(self._read(input, key, end) for key in chunk),
                return_exceptions=True,
            )
            for key, read in zip(chunk, reads, strict=True):
                if isinstance(read, ActivityError):
                    self._result.skipped[key] = (
                        f"metric source did not answer: {_cause(read)}"
                    )
                elif isinstance(read, BaseException):
                    raise read
                elif not read.has_data:
                    self._result.skipped[key] = "no data in the window"
                else:
                    evidence[key] = read
        return evidence

    async def _read(self, input: SweepInput, key: str, end: datetime) -> Evidence:
        namespace, app = _split_key(key)
        return await workflow.execute_activity(
            "collect_evidence",
            SignalQuery(
                namespace=namespace,
                app=app,
                window_seconds=input.window_seconds,
                step_seconds=input.step_seconds,
                end=end,
            ),
            result_type=Evidence,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=READ_RETRY,
        )

    async def _score(self, input: SweepInput, series: list[Series]) -> list:
        verdicts = []
        for batch in _batches(series, input.batch_series, input.batch_points):
            try:
                result = await workflow.execute_activity(
                    "score_series",
                    DetectionInput(series=batch, threshold=input.threshold),
                    result_type=DetectionResult,
                    task_queue=input.detection_task_queue,
                    start_to_close_timeout=timedelta(seconds=60),
                    schedule_to_close_timeout=timedelta(
                        seconds=input.detection_timeout_seconds
                    ),
                    retry_policy=READ_RETRY,
                )
            except ActivityError as err:
                reason = f"anomaly detection did not answer: {_cause(err)}"
                for item in batch:
                    self._result.skipped.setdefault(item.key.rpartition(":")[0], reason)
                continue
            self._result.detection_calls += 1
            self._result.device = result.device
            verdicts.extend(result.verdicts)
        return verdicts

    async def _open_incident(self, finding: SweepFinding) -> str:
        namespace, app = _split_key(finding.application)
        return await workflow.execute_activity(
            "open_incident",
            OpenIncidentInput(
                namespace=namespace,
                app=app,
                finding=finding,
                sweep_id=workflow.info().workflow_id,
            ),
            result_type=str,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=WRITE_RETRY,
        )


def _batches(series: list[Series], max_series: int, max_points: int):
    """Split `series` into runs of at most `max_series` series and `max_points`."""
    batch: list[Series] = []
    points = 0
    for item in series:
        size = len(item.values)
        if batch and (len(batch) >= max_series or points + size > max_points):
            yield batch
            batch, points = [], 0
        batch.append(item)
        points += size
    if batch:
        yield batch


def _details_markdown(result: SweepResult) -> str:
    lines = [
        f"**Applications swept:** {result.applications}",
        f"**Series scored:** {result.series_scored} "
        f"in {result.detection_calls} detection calls",
    ]
    for finding in result.findings:
        lines.append(
            f"- **{finding.application}**: {finding.series} scored "
            f"{finding.score:.2f} for {finding.sustained_seconds:.0f} s; incident "
            f"{finding.incident_workflow_id or 'not opened'}"
        )
    for key, reason in sorted(result.skipped.items()):
        lines.append(f"- {key} skipped: {reason}")
    return "\n\n".join(lines)
