"""Prometheus alert to Alertmanager to the intake, with real servers.

The test exporter of `test_prometheus` serves an application that fails 20% of
its requests, and a Prometheus alerting rule on its error ratio fires at once
(`for: 0s`). A real Alertmanager groups the alert by application and sends it
through a `webhook_configs` receiver with a bearer token to the intake. The
intake runs under uvicorn on 127.0.0.1 with a starter that records its calls.
Then the application stops failing and the alert resolves, so the resolved
notification must reach the same incident through `signal_open`.

Needs the `prometheus` and `prometheus-alertmanager` binaries (Debian
packages): skipped without them on a workstation, failed when `CI` is set.
"""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml
from pydantic import SecretStr

from remediator.intake.alertmanager import PlanEntry
from remediator.intake.app import create_app
from remediator.settings import IntakeSettings, Settings
from tests.integration.test_prometheus import (
    NAMESPACE,
    READY_TIMEOUT,
    Exporter,
    ServerProcess,
    free_port,
    require_binary,
    scrape_config,
    start_prometheus,
    start_server,
    wait_until,
)
from workflows.models import incident_workflow_id

TOKEN = "webhook-token-for-tests"
APP = "checkout"
ALERT = "HighErrorRatio"
# Firing, then resolving, takes a few evaluation and group intervals.
NOTIFY_TIMEOUT = 60.0

RULES = {
    "groups": [
        {
            "name": "remediator-test",
            "interval": "1s",
            "rules": [
                {
                    "alert": ALERT,
                    "expr": (
                        "sum by (namespace, app) "
                        '(rate(http_requests_total{code=~"5.."}[4s])) / '
                        "sum by (namespace, app) (rate(http_requests_total[4s])) "
                        "> 0.1"
                    ),
                    "for": "0s",
                    "labels": {"severity": "page"},
                    "annotations": {"summary": "error ratio above 10%"},
                }
            ],
        }
    ]
}


@dataclass
class Call:
    kind: str
    entry: PlanEntry


@dataclass
class RecordingStarter:
    """Thread-safe IncidentStarter that records every call."""

    calls: list[Call] = field(default_factory=list)
    open: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def signal_with_start(self, entry: PlanEntry) -> str:
        with self.lock:
            self.calls.append(Call("start", entry))
            self.open.add(entry.workflow_id)
        return entry.workflow_id

    async def signal_open(self, entry: PlanEntry) -> str | None:
        with self.lock:
            self.calls.append(Call("signal_open", entry))
            return entry.workflow_id if entry.workflow_id in self.open else None

    def of_kind(self, kind: str) -> list[Call]:
        with self.lock:
            return [call for call in self.calls if call.kind == kind]


class Intake:
    """The intake application served by uvicorn in a thread on 127.0.0.1."""

    def __init__(self, starter: RecordingStarter) -> None:
        settings = Settings(intake=IntakeSettings(bearer_token=SecretStr(TOKEN)))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.socket = sock
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(
            create_app(settings, starter), log_level="warning", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )

    def __enter__(self) -> Intake:
        self.thread.start()
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the intake did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


def alertmanager_config(intake_url: str) -> dict:
    return {
        "route": {
            "receiver": "intake",
            "group_by": ["namespace", "app"],
            "group_wait": "1s",
            "group_interval": "1s",
            "repeat_interval": "1h",
        },
        "receivers": [
            {
                "name": "intake",
                "webhook_configs": [
                    {
                        "url": f"{intake_url}/v1/alerts",
                        "send_resolved": True,
                        "http_config": {"authorization": {"credentials": TOKEN}},
                    }
                ],
            }
        ],
    }


def start_alertmanager(work: Path, intake_url: str) -> ServerProcess:
    binary = require_binary("prometheus-alertmanager")
    (work / "alertmanager.yml").write_text(
        yaml.safe_dump(alertmanager_config(intake_url))
    )
    port = free_port()
    return start_server(
        "alertmanager",
        binary,
        [
            f"--config.file={work / 'alertmanager.yml'}",
            f"--storage.path={work / 'alertmanager'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
            "--log.level=warn",
        ],
        port,
        "/-/ready",
        work,
    )


@dataclass
class Stack:
    exporter: Exporter
    intake: Intake
    starter: RecordingStarter
    prometheus: ServerProcess
    alertmanager: ServerProcess

    def logs(self) -> str:
        return (
            f"--- prometheus\n{self.prometheus.log_tail()}\n"
            f"--- alertmanager\n{self.alertmanager.log_tail()}\n"
            f"--- calls\n{self.starter.calls}"
        )


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    require_binary("prometheus")
    require_binary("prometheus-alertmanager")
    starter = RecordingStarter()
    with (
        tempfile.TemporaryDirectory(prefix="alertmanager-") as tmp,
        Exporter() as exporter,
        Intake(starter) as intake,
    ):
        work = Path(tmp)
        exporter.add(APP, ok_rate=40.0, error_rate=10.0)
        alertmanager = start_alertmanager(work, intake.url)
        try:
            config = scrape_config(exporter.port, [APP])
            am_target = alertmanager.url.removeprefix("http://")
            config["alerting"] = {
                "alertmanagers": [{"static_configs": [{"targets": [am_target]}]}]
            }
            prometheus = start_prometheus(work, config, RULES)
            try:
                yield Stack(exporter, intake, starter, prometheus, alertmanager)
            finally:
                prometheus.stop()
        finally:
            alertmanager.stop()


def test_firing_then_resolved_alert_reaches_one_incident(stack: Stack) -> None:
    starter = stack.starter
    wait_until(
        lambda: bool(starter.of_kind("start")),
        NOTIFY_TIMEOUT,
        "the firing notification",
        stack.logs,
    )
    start = starter.of_kind("start")[0].entry
    assert (start.namespace, start.app) == (NAMESPACE, APP)
    assert start.workflow_id == incident_workflow_id(NAMESPACE, APP)
    assert [alert.alertname for alert in start.firing] == [ALERT]
    assert start.firing[0].labels["severity"] == "page"
    assert start.firing[0].annotations["summary"] == "error ratio above 10%"
    assert start.trace_id, "the intake sets a trace id on every entry"

    stack.exporter.set(APP, ok_rate=50.0, error_rate=0.0)
    wait_until(
        lambda: any(call.entry.resolved for call in starter.of_kind("signal_open")),
        NOTIFY_TIMEOUT,
        "the resolved notification",
        stack.logs,
    )
    resolved = next(
        call.entry for call in starter.of_kind("signal_open") if call.entry.resolved
    )
    assert resolved.workflow_id == start.workflow_id
    assert [alert.fingerprint for alert in resolved.resolved] == [
        start.firing[0].fingerprint
    ]
    assert resolved.resolved[0].ends_at


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (b"not json", {}, 400),
        (b'{"version": "4", "status": "firing"}', {}, 422),
        (b'{"version": "4", "alerts": [{"status": "pending"}]}', {}, 422),
        (b'{"version": "1", "alerts": []}', {}, 422),
        (b'{"version": "4", "alerts": []}', {"Authorization": "Bearer wrong"}, 401),
    ],
)
def test_bad_body_gets_4xx(
    stack: Stack, body: bytes, headers: dict[str, str], status: int
) -> None:
    # Alertmanager retries only 5xx responses. A body that can never be
    # accepted must get a 4xx, so that Alertmanager does not resend it.
    sent = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    response = httpx.post(
        f"{stack.intake.url}/v1/alerts",
        content=body,
        headers={**sent, **headers},
        timeout=10,
    )
    assert response.status_code == status, response.text
