"""The embedded stack: every part of Remediator on loopback, for the demo and tests.

`EmbeddedStack` starts, on free 127.0.0.1 ports, the Temporal dev server with
the Web UI, a bare GitOps repository seeded with the demo application, the
intake (Alertmanager webhook and OTLP receiver), the Argo CD stand-in, the
demo application exporting OTLP metrics, and both workers as separate
processes. Settings reach the workers through `REMEDIATOR_*` variables, the
same way production passes them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client

from remediator.demo.argocd_standin import ArgoCDStandIn
from remediator.demo.demo_app import DemoApplication, ImageBehaviour
from remediator.demo.seed import SeedResult, render_image, seed_repository
from remediator.devserver import (
    DevServer,
    free_port,
    start_dev_server,
    stop_with_parent,
)
from remediator.intake.app import TemporalStarter, create_app
from remediator.settings import Settings
from remediator.temporal import connect

logger = logging.getLogger(__name__)

DEMO_NAMESPACE = "demo"
DEMO_APP = "guestbook"
GOOD_IMAGE = "registry.demo.localhost/guestbook:1.10"
BAD_IMAGE = "registry.demo.localhost/guestbook:1.11"
BEHAVIOUR = {
    GOOD_IMAGE: ImageBehaviour(error_ratio=0.005, latency_median_seconds=0.04),
    BAD_IMAGE: ImageBehaviour(error_ratio=0.35, latency_median_seconds=0.25),
}
# A downstream outage fails requests whatever image runs, so a rollback cannot
# help; the verify-fails scenario switches it on.
OUTAGE = ImageBehaviour(error_ratio=0.4, latency_median_seconds=0.3)

# Timings of the demo: seconds instead of the production minutes, so one
# incident, verification included, takes well under a minute.
DEMO_ENVIRONMENT = {
    "REMEDIATOR_SIGNALS_WINDOW_SECONDS": "30",
    "REMEDIATOR_SIGNALS_STEP_SECONDS": "1",
    "REMEDIATOR_SIGNALS_RECENT_SECONDS": "3",
    "REMEDIATOR_VERIFY_INTERVAL_SECONDS": "2",
    "REMEDIATOR_VERIFY_CONSECUTIVE_INTERVALS": "3",
    "REMEDIATOR_VERIFY_MAX_INTERVALS": "10",
    "REMEDIATOR_ARGOCD_POLL_SECONDS": "0.2",
    "REMEDIATOR_ARGOCD_SYNC_TIMEOUT_SECONDS": "60",
    # The detection sweep reads the same 30-point window as an incident.
    "REMEDIATOR_SWEEP_APPLICATIONS": f"{DEMO_NAMESPACE}/{DEMO_APP}",
    "REMEDIATOR_SWEEP_WINDOW_SECONDS": "30",
    "REMEDIATOR_SWEEP_MIN_SUSTAINED_SECONDS": "2",
    "REMEDIATOR_SWEEP_INTERVAL_SECONDS": "10",
}


@dataclass
class _Server:
    server: uvicorn.Server
    task: asyncio.Task


@dataclass
class EmbeddedStack:
    """Start with `await stack.start()`, stop with `await stack.stop()`."""

    work_dir: Path
    layout: str = "plain"
    environment: dict[str, str] = field(default_factory=dict)
    dev_server: DevServer | None = None
    client: Client | None = None
    seed: SeedResult | None = None
    standin: ArgoCDStandIn | None = None
    demo_app: DemoApplication | None = None
    settings: Settings | None = None
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    _servers: list[_Server] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    outage: bool = False

    @property
    def bare_path(self) -> Path:
        return self.work_dir / "gitops.git"

    @property
    def intake_url(self) -> str:
        return self.environment["REMEDIATOR_INTAKE_URL"]

    @property
    def intake_token(self) -> str:
        return self.environment["REMEDIATOR_INTAKE_BEARER_TOKEN"]

    async def start(self) -> None:
        """Start every part and wait until both workers poll their queues."""
        started = time.monotonic()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        (self.work_dir / "logs").mkdir(exist_ok=True)
        self.dev_server = await asyncio.to_thread(
            start_dev_server,
            db_file=self.work_dir / "temporal.db",
            log_file=self.work_dir / "logs" / "temporal.log",
        )
        intake_port, argocd_port = free_port(), free_port()
        self.environment = {
            **DEMO_ENVIRONMENT,
            "REMEDIATOR_TEMPORAL_ADDRESS": self.dev_server.address,
            "REMEDIATOR_TEMPORAL_UI_URL": self.dev_server.ui_url,
            "REMEDIATOR_INTAKE_HOST": "127.0.0.1",
            "REMEDIATOR_INTAKE_PORT": str(intake_port),
            "REMEDIATOR_INTAKE_URL": f"http://127.0.0.1:{intake_port}",
            # Tokens set in the environment win, so a test can plant markers.
            "REMEDIATOR_INTAKE_BEARER_TOKEN": _token("REMEDIATOR_INTAKE_BEARER_TOKEN"),
            "REMEDIATOR_ARGOCD_URL": f"http://127.0.0.1:{argocd_port}",
            "REMEDIATOR_ARGOCD_TOKEN": _token("REMEDIATOR_ARGOCD_TOKEN"),
            "REMEDIATOR_GIT_WORK_DIR": str(self.work_dir / "git-work"),
            **self.environment,
        }
        self.settings = _settings_from(self.environment)
        self._start_workers()

        self.seed = await asyncio.to_thread(
            seed_repository,
            self.bare_path,
            self.layout,
            DEMO_NAMESPACE,
            DEMO_APP,
            GOOD_IMAGE,
        )
        self.client = await connect(self.settings.temporal)
        await self._start_intake(intake_port)
        await self._start_standin(argocd_port)
        self.demo_app = DemoApplication(
            DEMO_NAMESPACE,
            DEMO_APP,
            f"{self.intake_url}/v1/metrics",
            self._behaviour_of,
            lambda: self.standin.live_image(DEMO_APP),
            export_interval_seconds=0.5,
            requests_per_second=80.0,
            headers={"Authorization": f"Bearer {self.intake_token}"},
        )
        await self.wait_for_live_image(GOOD_IMAGE)
        self.demo_app.start()
        await self._wait_for_pollers()
        self.timings["stack_start_seconds"] = round(time.monotonic() - started, 3)

    async def stop(self) -> None:
        """Stop every part; safe to call after a failed start."""
        if self.demo_app is not None:
            await asyncio.to_thread(self.demo_app.stop)
        for name, process in self.workers.items():
            if process.poll() is None:
                process.terminate()
                try:
                    await asyncio.to_thread(process.wait, 25)
                except subprocess.TimeoutExpired:
                    logger.warning("Worker %s did not drain in 25 s; killing it.", name)
                    process.kill()
        for server in self._servers:
            server.server.should_exit = True
        for server in self._servers:
            try:
                await asyncio.wait_for(server.task, 10)
            except TimeoutError:
                server.task.cancel()
        if self.dev_server is not None:
            await asyncio.to_thread(self.dev_server.stop)

    def _behaviour_of(self, image: str) -> ImageBehaviour:
        if self.outage:
            return OUTAGE
        return BEHAVIOUR.get(image, BEHAVIOUR[GOOD_IMAGE])

    async def restart_worker(self, kind: str, signum: int = signal.SIGKILL) -> None:
        """Stop a worker process with `signum`, start a new one, wait for it to poll."""
        process = self.workers[kind]
        if process.poll() is None:
            process.send_signal(signum)
            await asyncio.to_thread(process.wait, 30)
        self._start_worker(kind)
        await self._wait_for_pollers()

    async def restart_dev_server(self) -> None:
        """Stop the Temporal dev server and start it again on the same database file."""
        port, ui_port = self.dev_server.port, self.dev_server.ui_port
        await asyncio.to_thread(self.dev_server.stop)
        self.dev_server = await asyncio.to_thread(
            start_dev_server,
            port=port,
            ui_port=ui_port,
            db_file=self.work_dir / "temporal.db",
            log_file=self.work_dir / "logs" / "temporal.log",
        )

    # --- Parts ---------------------------------------------------------------

    def _start_workers(self) -> None:
        for kind in ("orchestrator", "detection"):
            self._start_worker(kind)

    def _start_worker(self, kind: str) -> None:
        # Each worker process on this host needs its own health port.
        env = {
            **os.environ,
            **self.environment,
            "REMEDIATOR_WORKER_HEALTH_PORT": str(free_port()),
        }
        log = open(self.work_dir / "logs" / f"worker-{kind}.log", "ab")
        self.workers[kind] = subprocess.Popen(
            [sys.executable, "-m", "remediator", "worker", kind],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=stop_with_parent,
        )

    async def _serve(self, app, port: int) -> None:
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        self._servers.append(_Server(server, task))
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError(f"server on 127.0.0.1:{port} stopped at start")
            await asyncio.sleep(0.02)

    async def _start_intake(self, port: int) -> None:
        starter = TemporalStarter(self.client, self.settings)
        await self._serve(create_app(self.settings, starter), port)

    async def _start_standin(self, port: int) -> None:
        self.standin = ArgoCDStandIn(
            token=self.environment["REMEDIATOR_ARGOCD_TOKEN"],
            poll_seconds=0.1,
            sync_delay_seconds=0.3,
        )
        self.standin.register(
            DEMO_APP,
            namespace=DEMO_NAMESPACE,
            repo_path=self.bare_path,
            app_path=self.seed.app_path,
            render_image=render_image,
            target_branch=self.seed.branch,
            layout=self.layout,
        )
        await self._serve(self.standin.app, port)

    async def wait_for_live_image(self, image: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.standin.live_image(DEMO_APP) != image:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Argo CD stand-in did not deploy {image} within {timeout:.0f} s; "
                    f"it runs {self.standin.live_image(DEMO_APP)!r}"
                )
            await asyncio.sleep(0.05)

    async def _wait_for_pollers(self, timeout: float = 60.0) -> None:
        queues = [
            (self.settings.temporal.task_queue, TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW),
            (
                self.settings.temporal.detection_task_queue,
                TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
            ),
        ]
        deadline = time.monotonic() + timeout
        for name, kind in queues:
            while not await task_queue_has_pollers(self.client, name, kind):
                for worker, process in self.workers.items():
                    if process.poll() is not None:
                        raise RuntimeError(
                            f"worker {worker} exited with status {process.returncode}; "
                            f"see {self.work_dir / 'logs' / f'worker-{worker}.log'}"
                        )
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"no worker polled task queue {name} within {timeout:.0f} s"
                    )
                await asyncio.sleep(0.1)


async def task_queue_has_pollers(
    client: Client, task_queue: str, kind: TaskQueueType.ValueType
) -> bool:
    """Tell whether any worker polled the task queue recently."""
    response = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=task_queue),
            task_queue_type=kind,
        )
    )
    return len(response.pollers) > 0


def _token(variable: str) -> str:
    """Return the token set in the environment, or a new random one."""
    return os.environ.get(variable) or secrets.token_urlsafe(24)


def _settings_from(environment: dict[str, str]) -> Settings:
    """Build settings as a worker would, from the stack's environment."""
    saved = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)
    try:
        return Settings()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
