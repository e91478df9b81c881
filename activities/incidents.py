"""The `open_incident` activity: the detection sweep's way into the loop.

A sweep that finds a sustained anomaly opens the application's incident the
way the intake does for an alert: signal-with-start of `IncidentWorkflow`
under `incident-<namespace>-<app>`, with a synthetic firing alert that names
the series, its score and the sweep. An incident already open for the
application records the alert instead of starting a second one. The alert's
fingerprint is the same for every sweep of an application, so repeated sweeps
count as repeats of one alert.
"""

from __future__ import annotations

from datetime import UTC, datetime

from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from remediator.intake.alertmanager import PlanEntry, is_dns1123_label
from remediator.intake.app import StarterUnavailableError, TemporalStarter
from remediator.settings import Settings
from workflows.models import AlertSignal, OpenIncidentInput

SWEEP_ALERT_NAME = "RemediatorSweepAnomaly"


def sweep_alert(input: OpenIncidentInput, now: datetime) -> AlertSignal:
    """Build the firing alert that a sweep finding sends to the incident."""
    finding = input.finding
    return AlertSignal(
        fingerprint=f"sweep-{input.namespace}-{input.app}",
        status="firing",
        alertname=SWEEP_ALERT_NAME,
        labels={
            "alertname": SWEEP_ALERT_NAME,
            "namespace": input.namespace,
            "app": input.app,
            "source": "detection-sweep",
        },
        annotations={
            "summary": (
                f"{finding.series} scored {finding.score:.2f}, anomalous for "
                f"{finding.sustained_seconds:.0f} s"
            ),
            "sweep": input.sweep_id,
        },
        starts_at=now.isoformat(),
    )


class IncidentActivities:
    """Activities that start incidents from inside other workflows."""

    def __init__(self, client: Client, settings: Settings) -> None:
        self._starter = TemporalStarter(client, settings)

    @activity.defn(name="open_incident")
    async def open_incident(self, input: OpenIncidentInput) -> str:
        """Start or signal the application's incident; return its workflow id."""
        if not (is_dns1123_label(input.namespace) and is_dns1123_label(input.app)):
            raise ApplicationError(
                f"invalid namespace {input.namespace[:80]!r} or app "
                f"{input.app[:80]!r}: both must be Kubernetes names (DNS-1123 labels)",
                type="InvalidApplication",
                non_retryable=True,
            )
        entry = PlanEntry(
            namespace=input.namespace,
            app=input.app,
            alerts=[sweep_alert(input, datetime.now(UTC))],
        )
        try:
            return await self._starter.signal_with_start(entry)
        except StarterUnavailableError as error:
            # Retryable: the activity's retry policy waits for Temporal.
            raise ApplicationError(
                f"Temporal is unreachable: {error}", type="TemporalUnavailable"
            ) from error
