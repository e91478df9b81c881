"""The detection worker: anomaly scoring on the `remediation-detection` queue.

It is a separate process so Kubernetes can pin it to GPU nodes and scale it
apart from the orchestrator. `remediator worker detection` starts it.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import Worker

from activities.detection import DetectionActivities
from remediator.settings import Settings


def build_worker(client: Client, settings: Settings) -> Worker:
    """Create the detection worker for the settings' detection task queue."""
    detection = DetectionActivities()
    return Worker(
        client,
        task_queue=settings.temporal.detection_task_queue,
        activities=[detection.score_series],
        # Scoring is CPU-bound; a few at a time keep the event loop responsive.
        max_concurrent_activities=4,
        graceful_shutdown_timeout=timedelta(seconds=20),
    )
