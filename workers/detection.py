"""The detection worker: anomaly scoring on the `remediation-detection` queue.

It is a separate process so Kubernetes can pin it to GPU nodes and scale it
apart from the orchestrator. `remediator worker detection` starts it. At start
it chooses the scorer and device (`activities.detection_backend`), measures
the memory one point needs and logs one line naming the device and the batch
size. It runs at most `REMEDIATOR_DETECTION_MAX_CONCURRENT_ACTIVITIES`
scoring activities at once. On SIGTERM the runner stops polling and lets the
running activities finish for up to `GRACEFUL_SHUTDOWN`. An activity still
running after that is cancelled, so Temporal retries it on another worker.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import Worker

from activities.detection import DetectionActivities
from activities.detection_backend import describe, select_backend
from remediator.settings import Settings

logger = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN = timedelta(seconds=20)


def build_worker(client: Client, settings: Settings) -> Worker:
    """Create the detection worker for the settings' detection task queue."""
    detection = settings.detection
    backend = select_backend(
        detection.device, detection.memory_fraction, detection.max_batch_series
    )
    logger.info("%s.", describe(backend))
    return Worker(
        client,
        task_queue=settings.temporal.detection_task_queue,
        activities=[DetectionActivities(backend).score_series],
        max_concurrent_activities=detection.max_concurrent_activities,
        graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
    )
