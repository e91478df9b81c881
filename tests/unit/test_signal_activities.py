"""Tests of the collect_evidence and verify_interval activities."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2
from pydantic import SecretStr
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.signals import SignalActivities, judge_interval
from remediator.intake.app import create_app
from remediator.intake.store import GoldenSignalStore
from remediator.settings import IntakeSettings, Settings
from workflows.models import DiscoveryQuery, Evidence, SignalQuery, VerifyInput

END = datetime.now(UTC).replace(microsecond=0)
BOUNDS = [0.1, 0.5, 1.0]


class UnusedStarter:
    async def signal_with_start(self, entry):
        raise AssertionError("no alerts are sent in this test")

    async def signal_open(self, entry):
        raise AssertionError("no alerts are sent in this test")


def duration_points(
    app: str,
    seconds_before_end: float,
    buckets: list[int],
    status: int = 200,
    end: datetime = END,
) -> ExportMetricsServiceRequest:
    point = metrics_pb2.HistogramDataPoint(
        attributes=[
            KeyValue(key="http.response.status_code", value=AnyValue(int_value=status))
        ],
        time_unix_nano=int((end.timestamp() - seconds_before_end) * 1e9),
        count=sum(buckets),
        bucket_counts=buckets,
        explicit_bounds=BOUNDS,
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
            KeyValue(key="service.name", value=AnyValue(string_value=app)),
            KeyValue(key="service.namespace", value=AnyValue(string_value="shop")),
        ]
    }
    return ExportMetricsServiceRequest(
        resource_metrics=[
            metrics_pb2.ResourceMetrics(
                resource=resource,
                scope_metrics=[metrics_pb2.ScopeMetrics(metrics=[metric])],
            )
        ]
    )


@pytest.fixture
def activities() -> SignalActivities:
    """Activities reading a real intake app, served in process."""
    store = GoldenSignalStore()
    store.ingest(duration_points("healthy", 10, [100, 0, 0, 0]))
    store.ingest(duration_points("failing", 10, [80, 0, 0, 0]))
    store.ingest(duration_points("failing", 10, [20, 0, 0, 0], status=503))
    store.ingest(duration_points("slow", 10, [0, 0, 0, 50]))
    store.ingest(duration_points("idle", 10, [0, 0, 0, 0]))
    settings = Settings()
    app = create_app(settings, UnusedStarter(), store=store)
    return SignalActivities(settings, transport=httpx.ASGITransport(app=app))


def query(app: str, window: float = 30) -> SignalQuery:
    return SignalQuery(
        namespace="shop", app=app, window_seconds=window, step_seconds=15, end=END
    )


def verify(app: str, max_error_ratio=0.05, max_latency=None) -> VerifyInput:
    return VerifyInput(
        query=query(app),
        max_error_ratio=max_error_ratio,
        max_latency_p99_seconds=max_latency,
    )


# --- collect_evidence ---


async def test_collect_evidence_reads_store(activities):
    evidence = await ActivityEnvironment().run(
        activities.collect_evidence, query("failing")
    )
    assert evidence.has_data
    assert evidence.error_ratio == pytest.approx(0.2)
    assert evidence.request_rate == pytest.approx(100 / 30)
    assert [p.requests for p in evidence.points] == [100]


async def test_discover_applications_lists_the_store(activities):
    found = await ActivityEnvironment().run(
        activities.discover_applications, DiscoveryQuery()
    )
    assert found == ["shop/failing", "shop/healthy", "shop/idle", "shop/slow"]


async def test_discover_applications_needs_the_token():
    settings = Settings(intake=IntakeSettings(bearer_token=SecretStr("s3cret")))
    app = create_app(settings, UnusedStarter(), store=GoldenSignalStore())
    unauthorised = Settings(intake=IntakeSettings(bearer_token=SecretStr("wrong")))
    activities = SignalActivities(unauthorised, transport=httpx.ASGITransport(app=app))
    with pytest.raises(ApplicationError) as raised:
        await ActivityEnvironment().run(
            activities.discover_applications, DiscoveryQuery()
        )
    assert raised.value.non_retryable
    assert "401" in str(raised.value)


async def test_collect_evidence_without_end_uses_now():
    # The point is written relative to the clock now, not to END, because the
    # suite may run for minutes before this test.
    store = GoldenSignalStore()
    store.ingest(duration_points("recent", 5, [10, 0, 0, 0], end=datetime.now(UTC)))
    settings = Settings()
    app = create_app(settings, UnusedStarter(), store=store)
    activities = SignalActivities(settings, transport=httpx.ASGITransport(app=app))
    unset = SignalQuery(
        namespace="shop", app="recent", window_seconds=60, step_seconds=15
    )
    evidence = await ActivityEnvironment().run(activities.collect_evidence, unset)
    assert evidence.has_data


async def test_collect_evidence_sends_query_and_token():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200, json=Evidence(namespace="shop", app="cart").model_dump(mode="json")
        )

    settings = Settings(
        intake=IntakeSettings(
            url="http://intake.test:9000", bearer_token=SecretStr("t0k")
        )
    )
    activities = SignalActivities(settings, transport=httpx.MockTransport(handler))
    await ActivityEnvironment().run(activities.collect_evidence, query("cart"))
    request = seen[0]
    assert request.url.host == "intake.test"
    assert request.url.path == "/v1/signals/shop/cart"
    assert request.url.params["window_seconds"] == "30.0"
    assert datetime.fromisoformat(request.url.params["end"]) == END
    assert request.headers["authorization"] == "Bearer t0k"


def mock_activities(handler) -> SignalActivities:
    return SignalActivities(Settings(), transport=httpx.MockTransport(handler))


async def test_collect_evidence_5xx_is_retryable():
    activities = mock_activities(lambda request: httpx.Response(503, text="busy"))
    with pytest.raises(ApplicationError) as caught:
        await ActivityEnvironment().run(activities.collect_evidence, query("cart"))
    assert caught.value.type == "SignalStoreUnavailable"
    assert not caught.value.non_retryable


async def test_collect_evidence_4xx_is_not_retryable():
    activities = mock_activities(
        lambda request: httpx.Response(422, json={"detail": "x"})
    )
    with pytest.raises(ApplicationError) as caught:
        await ActivityEnvironment().run(activities.collect_evidence, query("cart"))
    assert caught.value.type == "SignalQueryRejected"
    assert caught.value.non_retryable


async def test_collect_evidence_connection_error_propagates():
    def fail_connect(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    activities = mock_activities(fail_connect)
    with pytest.raises(httpx.ConnectError):
        await ActivityEnvironment().run(activities.collect_evidence, query("cart"))


async def test_collect_evidence_invalid_body_is_not_retryable():
    activities = mock_activities(lambda request: httpx.Response(200, json={"app": 1}))
    with pytest.raises(ApplicationError) as caught:
        await ActivityEnvironment().run(activities.collect_evidence, query("cart"))
    assert caught.value.type == "InvalidEvidence"
    assert caught.value.non_retryable


# --- verify_interval ---


async def test_verify_healthy_interval(activities):
    result = await ActivityEnvironment().run(
        activities.verify_interval, verify("healthy", max_latency=0.5)
    )
    assert result.healthy
    assert result.error_ratio == 0.0
    assert result.latency_p99_seconds is not None
    assert result.latency_p99_seconds <= 0.5


async def test_verify_error_ratio_above_max(activities):
    result = await ActivityEnvironment().run(
        activities.verify_interval, verify("failing")
    )
    assert not result.healthy
    assert result.error_ratio == pytest.approx(0.2)
    assert "above the maximum" in result.reason


async def test_verify_latency_above_max(activities):
    result = await ActivityEnvironment().run(
        activities.verify_interval, verify("slow", max_latency=0.5)
    )
    assert not result.healthy
    assert "p99 latency" in result.reason


async def test_verify_without_latency_max_ignores_latency(activities):
    result = await ActivityEnvironment().run(activities.verify_interval, verify("slow"))
    assert result.healthy


async def test_verify_no_traffic_is_not_healthy(activities):
    result = await ActivityEnvironment().run(activities.verify_interval, verify("idle"))
    assert not result.healthy
    assert result.no_traffic
    assert not result.no_data
    assert "no requests" in result.reason


async def test_verify_no_data_is_not_healthy(activities):
    result = await ActivityEnvironment().run(
        activities.verify_interval, verify("missing")
    )
    assert not result.healthy
    assert result.no_data
    assert "missing data" in result.reason


async def test_verify_old_data_is_no_data(activities):
    stale = verify("healthy")
    stale.query.end = END + timedelta(minutes=10)
    result = await ActivityEnvironment().run(activities.verify_interval, stale)
    assert result.no_data


async def test_verify_nan_threshold_is_rejected(activities):
    with pytest.raises(ApplicationError) as caught:
        await ActivityEnvironment().run(
            activities.verify_interval, verify("healthy", max_error_ratio=math.nan)
        )
    assert caught.value.non_retryable


def test_unknown_latency_with_max_is_not_healthy():
    evidence = Evidence(
        namespace="shop",
        app="cart",
        has_data=True,
        request_rate=1.0,
        error_ratio=0.0,
        latency_p99_seconds=None,
    )
    result = judge_interval(evidence, verify("cart", max_latency=1.0))
    assert not result.healthy
    assert "unknown" in result.reason


def test_nan_error_ratio_is_not_healthy():
    evidence = Evidence(
        namespace="shop",
        app="cart",
        has_data=True,
        request_rate=1.0,
        error_ratio=math.nan,
    )
    result = judge_interval(evidence, verify("cart"))
    assert not result.healthy
    assert result.error_ratio is None


async def test_collect_evidence_summarises_recent_part():
    # A bad minute at the end of a healthy window: the summary shows the bad
    # minute, the points still show the whole window.
    now = datetime.now(UTC).replace(microsecond=0)
    store = GoldenSignalStore()
    store.ingest(duration_points("deploy", 50, [100, 0, 0, 0], end=now))
    store.ingest(duration_points("deploy", 5, [60, 0, 0, 0], end=now))
    store.ingest(duration_points("deploy", 5, [40, 0, 0, 0], status=500, end=now))
    settings = Settings()
    app = create_app(settings, UnusedStarter(), store=store)
    activities = SignalActivities(settings, transport=httpx.ASGITransport(app=app))
    query = SignalQuery(
        namespace="shop",
        app="deploy",
        window_seconds=60,
        step_seconds=15,
        end=now,
        recent_seconds=15,
    )
    evidence = await ActivityEnvironment().run(activities.collect_evidence, query)
    assert evidence.error_ratio == pytest.approx(0.4)
    assert sum(point.requests for point in evidence.points) == 200
