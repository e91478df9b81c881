"""Run one worker process until SIGTERM or SIGINT, then drain it.

`remediator worker orchestrator|detection` calls `run_worker`. On a signal the
worker stops polling, lets running activities finish within its graceful
shutdown timeout and exits, so Kubernetes can roll it without losing work.

Each worker also serves a small health endpoint for its probes
(`REMEDIATOR_WORKER_HEALTH_HOST`:`REMEDIATOR_WORKER_HEALTH_PORT`):

- `GET /healthz`: 200 while the process runs (liveness).
- `GET /readyz`: 200 only when Temporal lists a poller with this worker's
  identity on each task queue type the worker serves, seen within
  `REMEDIATOR_WORKER_READY_POLL_AGE_SECONDS`; 503 before the worker starts,
  while Temporal cannot be asked, and from the stop signal on. One
  `DescribeTaskQueue` response is reused for `REMEDIATOR_WORKER_READY_CACHE_SECONDS`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from dataclasses import dataclass
from datetime import timedelta

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.client import Client
from temporalio.service import RPCError
from temporalio.worker import Worker

from activities.detection_backend import DeviceUnavailableError
from remediator.settings import Settings, WorkerSettings
from remediator.temporal import connect, task_queue_pollers, worker_runtime

logger = logging.getLogger(__name__)

KINDS = ("orchestrator", "detection")

# Request lines and headers larger than this are rejected, because probes send little.
MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class Readiness:
    """Result of a /readyz check: whether the worker polls, and the reason."""

    ready: bool
    reason: str


@dataclass(frozen=True)
class PolledQueue:
    """Task queue, task queue types and poller identity that /readyz looks up."""

    client: Client
    namespace: str
    task_queue: str
    identity: str
    types: tuple[int, ...]


def polled_queue(worker: Worker, client: Client) -> PolledQueue:
    """Describe the task queue, the types and the identity that `worker` polls with."""
    config = worker.config()
    types: list[int] = []
    if config.get("workflows"):
        types.append(TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW)
    if config.get("activities"):
        types.append(TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY)
    return PolledQueue(
        client=client,
        namespace=client.namespace,
        task_queue=worker.task_queue,
        identity=config.get("identity") or client.identity,
        types=tuple(types),
    )


class WorkerHealth:
    """The /healthz and /readyz endpoint of one worker process.

    Start it before the worker, hand it the worker with `watch` once the
    worker runs, and call `draining` on the stop signal so /readyz fails
    while the worker finishes its activities.
    """

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self._queue: PolledQueue | None = None
        self._draining = False
        self._cached: tuple[float, Readiness] | None = None
        self._last_ready: bool | None = None
        self._lock = asyncio.Lock()
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int | None:
        """The bound port, which differs from the setting when that is 0."""
        if self._server is None or not self._server.sockets:
            return None
        return self._server.sockets[0].getsockname()[1]

    async def start(self, host: str, port: int) -> None:
        """Listen on host:port. Raises OSError when the port cannot be bound."""
        self._server = await asyncio.start_server(self._handle, host, port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def watch(self, queue: PolledQueue) -> None:
        """Report readiness from now on for `queue`."""
        self._queue = queue
        self._draining = False
        self._cached = None

    def draining(self) -> None:
        """Fail /readyz from now on: the worker stops polling."""
        self._draining = True
        self._cached = None

    async def readiness(self) -> Readiness:
        """Check whether the worker polls, reusing a result within the cache time."""
        if self._draining:
            return Readiness(False, "the worker is draining after a stop signal")
        queue = self._queue
        if queue is None:
            return Readiness(False, "the worker has not started")
        async with self._lock:
            now = time.monotonic()
            if (
                self._cached is not None
                and now - self._cached[0] < self.settings.ready_cache_seconds
            ):
                return self._cached[1]
            result = await self._describe(queue)
            if queue is self._queue and not self._draining:
                self._log_change(result)
                self._cached = (time.monotonic(), result)
            return result

    def _log_change(self, result: Readiness) -> None:
        """Log readiness when it flips, so a failing probe shows its reason once."""
        if result.ready == self._last_ready:
            return
        self._last_ready = result.ready
        if result.ready:
            logger.info("Worker is ready: %s.", result.reason)
        else:
            logger.warning("Worker is not ready: %s.", result.reason)

    async def _describe(self, queue: PolledQueue) -> Readiness:
        max_age = self.settings.ready_poll_age_seconds
        for queue_type in queue.types:
            type_name = TaskQueueType.Name(queue_type)
            try:
                pollers = await task_queue_pollers(
                    queue.client,
                    queue.task_queue,
                    queue_type,
                    timedelta(seconds=REQUEST_TIMEOUT_SECONDS),
                )
            except Exception as err:  # Any RPC failure means the polling is unknown.
                return Readiness(
                    False, f"cannot describe task queue {queue.task_queue}: {err}"
                )
            seen = [poller for poller in pollers if poller.identity == queue.identity]
            if not seen:
                return Readiness(
                    False,
                    f"no {type_name} poller with identity {queue.identity} on "
                    f"task queue {queue.task_queue}",
                )
            newest = max(p.last_access_time.ToDatetime().timestamp() for p in seen)
            age = time.time() - newest
            if age > max_age:
                return Readiness(
                    False,
                    f"last {type_name} poll on task queue {queue.task_queue} was "
                    f"{age:.0f} s ago (more than {max_age:g} s)",
                )
        return Readiness(True, f"polling task queue {queue.task_queue}")

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            try:
                head = await asyncio.wait_for(
                    reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_SECONDS
                )
            except (
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                TimeoutError,
            ):
                return
            if len(head) > MAX_REQUEST_BYTES:
                await _respond(writer, 431, {"error": "request header too large"})
                return
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            if len(parts) != 3:
                await _respond(writer, 400, {"error": "bad request line"})
                return
            method, target, _version = parts
            path = target.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                await _respond(writer, 405, {"error": "use GET"}, head_only=False)
                return
            head_only = method == "HEAD"
            if path == "/healthz":
                await _respond(writer, 200, {"status": "alive"}, head_only=head_only)
            elif path == "/readyz":
                readiness = await self.readiness()
                await _respond(
                    writer,
                    200 if readiness.ready else 503,
                    {"ready": readiness.ready, "reason": readiness.reason},
                    head_only=head_only,
                )
            else:
                await _respond(writer, 404, {"error": "not found"}, head_only=head_only)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


async def _respond(
    writer: asyncio.StreamWriter, status: int, body: dict, *, head_only: bool = False
) -> None:
    payload = json.dumps(body).encode()
    lines = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if status == 405:
        lines.append("Allow: GET, HEAD")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    if not head_only:
        writer.write(payload)
    await writer.drain()


async def start_health(kind: str, settings: WorkerSettings) -> WorkerHealth | None:
    """Start the health endpoint the settings ask for, or return None when off."""
    if settings.health_port is None:
        return None
    health = WorkerHealth(settings)
    try:
        await health.start(settings.health_host, settings.health_port)
    except OSError as err:
        raise SystemExit(
            f"Worker {kind} cannot serve its health endpoint on "
            f"{settings.health_host}:{settings.health_port}: {err.strerror or err}. "
            "Choose a free REMEDIATOR_WORKER_HEALTH_PORT."
        ) from None
    logger.info(
        "Worker %s serves /healthz and /readyz at http://%s:%s.",
        kind,
        settings.health_host,
        health.port,
    )
    return health


async def run_worker(
    kind: str, settings: Settings, stop: asyncio.Event | None = None
) -> None:
    """Connect, build the worker of `kind` and run it until a stop signal.

    With `stop`, the worker runs until that event is set and installs no
    signal handlers (for callers that own the signals, such as tests).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown worker kind {kind!r}; use one of {', '.join(KINDS)}")
    health = await start_health(kind, settings.worker)
    try:
        await _run(kind, settings, stop, health)
    finally:
        if health is not None:
            await health.close()


async def _run(
    kind: str,
    settings: Settings,
    stop: asyncio.Event | None,
    health: WorkerHealth | None,
) -> None:
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
    try:
        worker = build_worker(client, settings)
    except (DeviceUnavailableError, ValueError) as err:
        raise SystemExit(f"Worker {kind} cannot start: {err}") from None
    if kind == "orchestrator" and settings.sweep.schedule_on_start:
        await ensure_sweep_schedule(client, settings)

    if stop is None:
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
        if health is not None:
            health.watch(polled_queue(worker, client))
        await stop.wait()
        if health is not None:
            health.draining()
        logger.info("Worker %s is draining after a stop signal.", kind)
    logger.info("Worker %s stopped.", kind)


async def ensure_sweep_schedule(client: Client, settings: Settings) -> None:
    """Create or update the sweep's Schedule from the settings.

    With no application opted in and discovery off, the Schedule is deleted
    if it exists, because the deployment owns it. Other bad sweep settings stop
    the worker with the setting to fix. When Temporal rejects the Schedule,
    the worker logs the error and keeps running, because incidents must not
    wait on the sweep. The next start tries again.
    """
    from remediator.sweep import (
        SweepSettingsError,
        schedule_sweep,
        sweep_input,
        unschedule_sweep,
    )

    sweep = settings.sweep
    try:
        if not sweep.applications.strip() and not sweep.discover:
            if await unschedule_sweep(client, settings):
                logger.info(
                    "No application is opted in to the sweep; deleted the sweep "
                    "Schedule %s.",
                    sweep.schedule_id,
                )
            else:
                logger.info(
                    "No application is opted in to the sweep, so there is no "
                    "sweep Schedule."
                )
            return
        schedule_id = await schedule_sweep(client, settings, sweep_input(settings))
    except SweepSettingsError as err:
        raise SystemExit(
            "The orchestrator worker cannot create the sweep Schedule "
            f"(REMEDIATOR_SWEEP_SCHEDULE_ON_START=true): {err}"
        ) from None
    except RPCError as err:
        logger.error(
            "Could not keep the sweep Schedule %s in step with the settings: %s. "
            "Incidents run on; the next worker start tries again, or run "
            "remediator sweep schedule.",
            settings.sweep.schedule_id,
            err,
        )
        return
    logger.info(
        "Sweep Schedule %s starts a sweep every %g s.",
        schedule_id,
        settings.sweep.interval_seconds,
    )
