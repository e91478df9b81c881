"""The service's own telemetry: one trace per alert, and its Prometheus metrics.

The trace test posts an Alertmanager webhook to the intake application, which
starts the incident through a real `TemporalStarter` on the local dev server. A
worker in this process runs `IncidentWorkflow` with the fake activities of the
workflow tests. Both clients carry the tracing interceptor, and an in-memory
exporter on the global tracer provider collects the spans, so the test can check
that intake, workflow and activity spans belong to the trace whose id the
workflow input carries.

The metrics tests scrape the intake's `GET /metrics` and the Prometheus endpoint
of a worker runtime made by `remediator.temporal.metrics_runtime`.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from pydantic import SecretStr
from temporalio.client import Client, WorkflowHandle
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.runtime import Runtime
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from activities.policy import PolicyActivities
from remediator.intake.alertmanager import PlanEntry
from remediator.intake.app import TemporalStarter, create_app
from remediator.settings import (
    IntakeSettings,
    PolicySettings,
    Settings,
    TemporalSettings,
    VerifySettings,
)
from remediator.temporal import metrics_runtime
from tests.workflow.test_incident_workflow import FakeWorld
from workflows.incident import IncidentWorkflow
from workflows.models import IncidentStatus

pytestmark = pytest.mark.integration

TOKEN = "intake-token-that-must-not-leak"
RESULT_TIMEOUT = 60.0


# --- helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def span_exporter() -> Iterator[InMemorySpanExporter]:
    """Collect every finished span of this process in memory.

    The global tracer provider can be set once per process, so when an SDK
    provider is already installed the exporter joins it instead.
    """
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        current.add_span_processor(processor)
    else:
        provider = TracerProvider()
        provider.add_span_processor(processor)
        trace.set_tracer_provider(provider)
        assert trace.get_tracer_provider() is provider
    yield exporter
    exporter.clear()


def unique_app(prefix: str) -> str:
    """An application name, a DNS label, that no other test's incident uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def settings_for(task_queue: str, **intake: Any) -> Settings:
    """Settings whose incidents verify recovery in well under a second."""
    return Settings(
        temporal=TemporalSettings(
            task_queue=task_queue, detection_task_queue=f"{task_queue}-detection"
        ),
        verify=VerifySettings(
            interval_seconds=0.1, consecutive_intervals=1, max_intervals=3
        ),
        intake=IntakeSettings(**intake),
    )


def webhook(namespace: str, app: str, *, unroutable: int = 0) -> dict:
    """An Alertmanager webhook with one firing alert, plus unroutable ones."""
    alerts = [
        {
            "status": "firing",
            "labels": {
                "alertname": "HighErrorRatio",
                "namespace": namespace,
                "app": app,
            },
            "annotations": {"summary": "error ratio above 5%"},
            "fingerprint": f"fp-{app}",
        }
    ]
    alerts += [
        {
            "status": "firing",
            "labels": {"alertname": "Watchdog"},
            "fingerprint": f"watchdog-{index}",
        }
        for index in range(unroutable)
    ]
    return {"version": "4", "status": "firing", "alerts": alerts}


def otlp_request(namespace: str, app: str) -> bytes:
    """One duration point the store accepts and one in a unit it rejects."""

    def histogram(unit: str) -> metrics_pb2.Metric:
        point = metrics_pb2.HistogramDataPoint(
            attributes=[
                KeyValue(key="http.response.status_code", value=AnyValue(int_value=200))
            ],
            time_unix_nano=time.time_ns(),
            count=4,
            bucket_counts=[4, 0],
            explicit_bounds=[0.1],
        )
        return metrics_pb2.Metric(
            name="http.server.request.duration",
            unit=unit,
            histogram=metrics_pb2.Histogram(
                data_points=[point],
                aggregation_temporality=metrics_pb2.AGGREGATION_TEMPORALITY_DELTA,
            ),
        )

    resource = {
        "attributes": [
            KeyValue(key="service.name", value=AnyValue(string_value=app)),
            KeyValue(key="service.namespace", value=AnyValue(string_value=namespace)),
        ]
    }
    request = ExportMetricsServiceRequest(
        resource_metrics=[
            metrics_pb2.ResourceMetrics(
                resource=resource,
                scope_metrics=[
                    metrics_pb2.ScopeMetrics(
                        metrics=[histogram("s"), histogram("furlong")]
                    )
                ],
            )
        ]
    )
    return request.SerializeToString()


def intake_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://intake.test"
    )


def traced_client(env: WorkflowEnvironment) -> Client:
    """The environment's client with the OpenTelemetry tracing interceptor."""
    config = env.client.config()
    config["interceptors"] = [*config.get("interceptors", []), TracingInterceptor()]
    return Client(**config)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sample(text: str, name: str, **labels: str) -> float | None:
    """Return the value of the first sample of `name` carrying every label given."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(
            re.findall(
                r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', match.group(2) or ""
            )
        )
        if all(found.get(key) == value for key, value in labels.items()):
            return float(match.group(3))
    return None


class FakeEngine:
    """A policy engine that always decides a rollback, for the real `decide`."""

    name = "fake"

    def evaluate(self, query: str, input: dict[str, Any]) -> Any:
        return {"allow": True, "action": "rollback", "reasons": ["error ratio high"]}


async def result_of(handle: WorkflowHandle) -> IncidentStatus:
    return await asyncio.wait_for(handle.result(), timeout=RESULT_TIMEOUT)


# --- one trace from intake to activities -----------------------------------------


async def test_one_trace_spans_intake_workflow_and_activities(
    local_env: WorkflowEnvironment, span_exporter: InMemorySpanExporter, task_queue
):
    span_exporter.clear()
    settings = settings_for(task_queue)
    client = traced_client(local_env)
    world = FakeWorld()
    app = create_app(settings, TemporalStarter(client, settings))
    namespace, name = "shop", unique_app("traced")

    async with (
        Worker(
            client,
            task_queue=task_queue,
            workflows=[IncidentWorkflow],
            activities=world.activities(),
        ),
        Worker(
            client,
            task_queue=f"{task_queue}-detection",
            activities=world.detection_activities(),
        ),
        intake_client(app) as http,
    ):
        response = await http.post("/v1/alerts", json=webhook(namespace, name))
        assert response.status_code == 202, response.text
        body = response.json()
        [workflow_id] = body["incidents"]
        handle = client.get_workflow_handle(workflow_id, result_type=IncidentStatus)
        status = await result_of(handle)

    assert status.outcome == "recovered"
    trace_id = body["trace_id"]
    # IncidentInput.trace_id, as the workflow received it.
    assert status.trace_id == trace_id
    started = await handle.fetch_history()
    first = started.events[0].workflow_execution_started_event_attributes
    assert trace_id.encode() in first.input.payloads[0].data

    spans = span_exporter.get_finished_spans()
    # Every span of the request, FastAPI's own HTTP server span included, and
    # of the incident belongs to the one trace.
    assert {format(span.context.trace_id, "032x") for span in spans} == {trace_id}
    of_trace = spans
    names = {span.name for span in of_trace}
    assert "intake.alerts" in names
    assert "SignalWithStartWorkflow:IncidentWorkflow" in names
    assert "RunWorkflow:IncidentWorkflow" in names
    for activity_name in ("find_change", "open_pull_request", "merge_pull_request"):
        assert f"StartActivity:{activity_name}" in names
        assert f"RunActivity:{activity_name}" in names
    # No span of this incident went to another trace.
    of_workflow = [
        span for span in spans if _attribute(span, "temporalWorkflowID") == workflow_id
    ]
    assert {format(span.context.trace_id, "032x") for span in of_workflow} == {trace_id}
    # The workflow start span is a child of the intake's span.
    [intake_span] = [span for span in of_trace if span.name == "intake.alerts"]
    [start_span] = [
        span
        for span in of_trace
        if span.name == "SignalWithStartWorkflow:IncidentWorkflow"
    ]
    assert start_span.parent is not None
    assert start_span.parent.span_id == intake_span.context.span_id


def _attribute(span: ReadableSpan, key: str) -> Any:
    return (span.attributes or {}).get(key)


async def test_intake_span_joins_the_callers_trace(span_exporter):
    span_exporter.clear()
    caller = "4bf92f3577b34da6a3ce929d0e0e4736"
    app = create_app(settings_for("unused"), CountingStarter())
    async with intake_client(app) as http:
        response = await http.post(
            "/v1/alerts",
            json=webhook("shop", "cart"),
            headers={"traceparent": f"00-{caller}-00f067aa0ba902b7-01"},
        )
    assert response.json()["trace_id"] == caller
    spans = span_exporter.get_finished_spans()
    assert "intake.alerts" in {span.name for span in spans}
    assert {format(span.context.trace_id, "032x") for span in spans} == {caller}


# --- intake metrics ------------------------------------------------------------


class CountingStarter:
    """Starts nothing; returns the workflow id as if the incident had started."""

    async def signal_with_start(self, entry: PlanEntry) -> str:
        return entry.workflow_id

    async def signal_open(self, entry: PlanEntry) -> str | None:
        return None


async def test_intake_metrics_endpoint():
    settings = settings_for("unused", bearer_token=SecretStr(TOKEN))
    app = create_app(settings, CountingStarter())
    auth = {"authorization": f"Bearer {TOKEN}"}
    async with intake_client(app) as http:
        alerts = await http.post(
            "/v1/alerts", json=webhook("shop", "cart", unroutable=2), headers=auth
        )
        assert alerts.status_code == 202
        resolved = webhook("shop", "idle")
        resolved["alerts"][0]["status"] = "resolved"
        assert (
            await http.post("/v1/alerts", json=resolved, headers=auth)
        ).status_code == 202
        points = await http.post(
            "/v1/metrics",
            content=otlp_request("shop", "cart"),
            headers={**auth, "content-type": "application/x-protobuf"},
        )
        assert points.status_code == 200
        assert (await http.get("/v1/signals/shop/cart")).status_code == 401
        # No token needed, and the one configured is never shown.
        scrape = await http.get("/metrics")

    assert scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain")
    text = scrape.text
    assert TOKEN not in text
    assert sample(text, "remediator_intake_alerts_received_total", status="firing") == 1
    assert (
        sample(text, "remediator_intake_alerts_received_total", status="resolved") == 1
    )
    assert sample(text, "remediator_intake_unroutable_alerts_total") == 2
    assert (
        sample(text, "remediator_intake_incidents_signalled_total", action="start") == 1
    )
    assert sample(text, "remediator_intake_otlp_points_total", result="accepted") == 1
    assert sample(text, "remediator_intake_otlp_points_total", result="rejected") == 1
    duration = "remediator_intake_request_duration_seconds_count"
    assert sample(text, duration, method="POST", route="/v1/alerts", status="202") == 2
    assert (
        sample(
            text,
            duration,
            method="GET",
            route="/v1/signals/{namespace}/{app}",
            status="401",
        )
        == 1
    )


# --- worker metrics ------------------------------------------------------------


@dataclass
class MeteredClient:
    """A client on a runtime of its own, whose endpoint serves its metrics."""

    client: Client
    runtime: Runtime
    url: str

    async def scrape(self) -> str:
        async with httpx.AsyncClient() as http:
            response = await http.get(self.url)
        response.raise_for_status()
        return response.text


@pytest.fixture(scope="module")
async def metered(local_env: WorkflowEnvironment) -> MeteredClient:
    port = free_port()
    runtime = metrics_runtime("127.0.0.1", port)
    client = await Client.connect(
        local_env.client.service_client.config.target_host,
        namespace=local_env.client.namespace,
        data_converter=pydantic_data_converter,
        runtime=runtime,
    )
    return MeteredClient(client, runtime, f"http://127.0.0.1:{port}/metrics")


async def test_worker_metrics_count_incidents(metered: MeteredClient, task_queue):
    metrics_client = metered.client
    settings = settings_for(task_queue)
    recovering, denied = FakeWorld(), FakeWorld()
    denied.budget_granted = False
    policy = PolicyActivities(PolicySettings(), engine=FakeEngine())
    starter = TemporalStarter(metrics_client, settings)
    recovered_app, denied_app = unique_app("metered"), unique_app("denied")

    handles = []
    for world, name in ((recovering, recovered_app), (denied, denied_app)):
        activities = [a for a in world.activities() if a.__name__ != "decide"]
        async with (
            Worker(
                metrics_client,
                task_queue=task_queue,
                workflows=[IncidentWorkflow],
                activities=[*activities, policy.decide],
            ),
            Worker(
                metrics_client,
                task_queue=f"{task_queue}-detection",
                activities=world.detection_activities(),
            ),
            intake_client(create_app(settings, starter)) as http,
        ):
            response = await http.post("/v1/alerts", json=webhook("shop", name))
            assert response.status_code == 202, response.text
            [workflow_id] = response.json()["incidents"]
            handle = metrics_client.get_workflow_handle(
                workflow_id, result_type=IncidentStatus
            )
            handles.append(handle)
            await result_of(handle)

    assert (await handles[0].result()).outcome == "recovered"
    assert (await handles[1].result()).outcome == "budget-exhausted"

    text = await metered.scrape()
    incidents = "remediation_incidents_total"
    assert (
        sample(
            text,
            incidents,
            outcome="recovered",
            app_namespace="shop",
            app=recovered_app,
        )
        == 1
    )
    assert sample(text, incidents, outcome="budget-exhausted", app=denied_app) == 1
    assert sample(text, "remediation_budget_denials_total", app=denied_app) == 1
    assert sample(text, "remediation_budget_denials_total", app=recovered_app) is None
    # Every stage of the recovered incident, the verification included.
    stages = "remediation_stage_duration_seconds_count"
    for stage in ("collect-evidence", "decide", "merge-pull-request", "verify"):
        assert (sample(text, stages, stage=stage, task_queue=task_queue) or 0) >= 1
    assert (
        sample(text, "remediation_stage_duration_seconds_bucket", le="3600") is not None
    )
    latency = "remediation_decision_latency_seconds_count"
    assert sample(text, latency, engine="fake", activity_type="decide") == 2
    # The SDK's own metrics share the endpoint.
    assert "temporal_request" in text
    assert "temporal_activity_execution_latency" in text

    # Replaying the histories records nothing.
    replayer = Replayer(
        workflows=[IncidentWorkflow],
        data_converter=pydantic_data_converter,
        runtime=metered.runtime,
    )
    for handle in handles:
        await replayer.replay_workflow(await handle.fetch_history())
    again = await metered.scrape()
    for name in (recovered_app, denied_app):
        assert sample(again, incidents, app=name) == 1
    assert sample(again, latency, engine="fake", activity_type="decide") == 2
