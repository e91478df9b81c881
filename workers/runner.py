"""Run one worker process until SIGTERM or SIGINT, then drain it.

`remediator worker orchestrator|detection` calls `run_worker`. On a signal the
worker stops polling, lets running activities finish within its graceful
shutdown timeout and exits, so Kubernetes can roll it without losing work.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from remediator.settings import Settings
from remediator.temporal import connect, worker_runtime

logger = logging.getLogger(__name__)

KINDS = ("orchestrator", "detection")


async def run_worker(kind: str, settings: Settings) -> None:
    """Connect, build the worker of `kind` and run it until a stop signal."""
    if kind not in KINDS:
        raise ValueError(f"unknown worker kind {kind!r}; use one of {', '.join(KINDS)}")
    try:
        runtime = worker_runtime(settings.temporal)
    except (RuntimeError, ValueError) as err:
        raise SystemExit(
            f"Worker {kind} cannot serve metrics on "
            f"{settings.temporal.metrics_host}:{settings.temporal.metrics_port}: "
            f"{err}. Choose a free REMEDIATOR_TEMPORAL_METRICS_PORT."
        ) from None
    if runtime is not None:
        logger.info(
            "Worker %s serves Prometheus metrics at http://%s:%s/metrics.",
            kind,
            settings.temporal.metrics_host,
            settings.temporal.metrics_port,
        )
    try:
        client = await connect(settings.temporal, runtime=runtime)
    except RuntimeError as err:
        raise SystemExit(
            f"Worker {kind} cannot connect to Temporal at "
            f"{settings.temporal.address} (namespace {settings.temporal.namespace}): "
            f"{err}. Start it (remediator dev-server) or set "
            "REMEDIATOR_TEMPORAL_ADDRESS."
        ) from None
    if kind == "orchestrator":
        from workers.orchestrator import build_worker
    else:
        from workers.detection import build_worker
    worker = build_worker(client, settings)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    logger.info(
        "Worker %s polls task queue %s at %s.",
        kind,
        worker.task_queue,
        settings.temporal.address,
    )
    async with worker:
        await stop.wait()
        logger.info("Worker %s is draining after a stop signal.", kind)
    logger.info("Worker %s stopped.", kind)
