"""Tests of the golden-signal store and the OTLP/HTTP decoder that feeds it."""

from __future__ import annotations

import gzip
import json
import math
import socket
import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import uvicorn
from google.protobuf import json_format
from google.rpc import status_pb2
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExportResult,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource

from remediator.intake.app import create_app
from remediator.intake.otlp import export_metrics
from remediator.intake.store import GoldenSignalStore, histogram_quantile
from remediator.settings import Settings, SignalSettings

CUMULATIVE = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
DELTA = metrics_pb2.AGGREGATION_TEMPORALITY_DELTA
BOUNDS = (0.1, 0.5, 1.0)
T0 = 1_700_000_000.0  # store creation time in the fake clock, seconds
NANOS = 1_000_000_000


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def attribute(key: str, value: str | int) -> KeyValue:
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def point(
    time_s: float,
    buckets: list[int],
    *,
    start_s: float = T0 - 3600,
    status: int | str | None = 200,
    bounds: tuple[float, ...] = BOUNDS,
) -> metrics_pb2.HistogramDataPoint:
    """A histogram point; `buckets` has len(bounds) + 1 counts."""
    attributes = [attribute("http.request.method", "GET")]
    if status is not None:
        attributes.append(attribute("http.response.status_code", status))
    return metrics_pb2.HistogramDataPoint(
        attributes=attributes,
        start_time_unix_nano=int(start_s * NANOS),
        time_unix_nano=int(time_s * NANOS),
        count=sum(buckets),
        sum=0.0,
        bucket_counts=buckets,
        explicit_bounds=list(bounds),
    )


def request_of(
    points: list[metrics_pb2.HistogramDataPoint],
    *,
    temporality: int = DELTA,
    name: str = "http.server.request.duration",
    unit: str = "s",
    resource: dict[str, str] | None = None,
) -> ExportMetricsServiceRequest:
    resource = (
        resource
        if resource is not None
        else {"service.name": "checkout", "service.namespace": "shop"}
    )
    metric = metrics_pb2.Metric(
        name=name,
        unit=unit,
        histogram=metrics_pb2.Histogram(
            data_points=points, aggregation_temporality=temporality
        ),
    )
    return ExportMetricsServiceRequest(
        resource_metrics=[
            metrics_pb2.ResourceMetrics(
                resource={"attributes": [attribute(k, v) for k, v in resource.items()]},
                scope_metrics=[metrics_pb2.ScopeMetrics(metrics=[metric])],
            )
        ]
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> GoldenSignalStore:
    return GoldenSignalStore(SignalSettings(retention_seconds=3600), clock=clock)


def evidence(
    store: GoldenSignalStore, end: float, window: float = 60, step: float = 15
):
    return store.evidence("shop", "checkout", window, step, at(end))


# --- quantile ---


def test_quantile_interpolates_inside_bucket():
    assert histogram_quantile(0.99, {BOUNDS: [0, 100, 0, 0]}) == pytest.approx(0.496)


def test_quantile_at_bucket_edge():
    assert histogram_quantile(0.99, {BOUNDS: [90, 9, 1, 0]}) == pytest.approx(0.5)


def test_quantile_in_overflow_returns_highest_bound():
    assert histogram_quantile(0.99, {BOUNDS: [0, 0, 0, 5]}) == 1.0


def test_quantile_without_observations_is_none():
    assert histogram_quantile(0.99, {BOUNDS: [0, 0, 0, 0]}) is None
    assert histogram_quantile(0.99, {}) is None


def test_quantile_merges_different_bounds():
    merged = histogram_quantile(0.5, {(1.0,): [10, 0], (0.5, 1.0): [0, 10, 0]})
    assert 0.5 <= merged <= 1.0


# --- delta points ---


def test_delta_points_give_steps_and_summary(store, clock):
    clock.now = T0 + 60
    store.ingest(
        request_of(
            [
                point(T0 + 10, [90, 0, 0, 0]),
                point(T0 + 10, [0, 0, 10, 0], status=503),
                point(T0 + 40, [50, 0, 0, 0]),
            ]
        )
    )
    result = evidence(store, T0 + 60)
    assert result.has_data
    assert not result.no_traffic
    assert result.request_rate == pytest.approx(150 / 60)
    assert result.error_ratio == pytest.approx(10 / 150)
    assert result.latency_p99_seconds is not None
    assert [p.requests for p in result.points] == [100, 50]
    assert [p.errors for p in result.points] == [10, 0]
    assert result.points[0].error_ratio == pytest.approx(0.1)
    assert result.points[0].end == at(T0 + 15)
    assert result.points[1].end == at(T0 + 45)
    assert result.points[0].latency_p99_seconds == pytest.approx(0.5 + 0.5 * 0.9)


def test_string_status_code_counts_as_error(store, clock):
    store.ingest(request_of([point(T0 + 5, [4, 0, 0, 0], status="502")]))
    assert evidence(store, T0 + 10).error_ratio == 1.0


def test_4xx_is_not_an_error(store):
    store.ingest(request_of([point(T0 + 5, [4, 0, 0, 0], status=404)]))
    assert evidence(store, T0 + 10).error_ratio == 0.0


def test_error_type_without_status_is_an_error(store):
    request = request_of([point(T0 + 5, [2, 0, 0, 0], status=None)])
    data_point = request.resource_metrics[0].scope_metrics[0].metrics[0].histogram
    data_point.data_points[0].attributes.append(attribute("error.type", "timeout"))
    store.ingest(request)
    assert evidence(store, T0 + 10).error_ratio == 1.0


def test_window_excludes_points_outside(store):
    store.ingest(
        request_of(
            [
                point(T0 - 100, [7, 0, 0, 0]),
                point(T0 + 5, [3, 0, 0, 0]),
                point(T0 + 100, [9, 0, 0, 0]),
            ]
        )
    )
    result = evidence(store, T0 + 30)
    assert sum(p.requests for p in result.points) == 3


def test_legacy_millisecond_metric_is_converted(store):
    request = request_of(
        [point(T0 + 5, [0, 10, 0, 0], bounds=(100.0, 500.0, 1000.0))],
        name="http.server.duration",
        unit="ms",
    )
    store.ingest(request)
    assert evidence(store, T0 + 10).latency_p99_seconds == pytest.approx(0.496)


# --- cumulative points ---


def test_cumulative_first_point_of_old_series_is_baseline(store):
    store.ingest(request_of([point(T0 + 10, [100, 0, 0, 0])], temporality=CUMULATIVE))
    assert not evidence(store, T0 + 15).has_data
    store.ingest(request_of([point(T0 + 20, [130, 0, 0, 0])], temporality=CUMULATIVE))
    result = evidence(store, T0 + 30)
    assert result.has_data
    assert [p.requests for p in result.points] == [30]


def test_cumulative_series_started_after_store_counts_whole(store):
    first = point(T0 + 10, [20, 0, 0, 0], start_s=T0 + 1)
    store.ingest(request_of([first], temporality=CUMULATIVE))
    assert [p.requests for p in evidence(store, T0 + 15).points] == [20]


def test_cumulative_new_series_of_known_resource_counts_whole(store):
    store.ingest(request_of([point(T0 + 10, [100, 0, 0, 0])], temporality=CUMULATIVE))
    # The first 5xx of a process that started before the store: a new series
    # whose start time is the process start, like the OpenTelemetry SDKs send.
    later = [point(T0 + 20, [130, 0, 0, 0]), point(T0 + 20, [0, 0, 5, 0], status=500)]
    store.ingest(request_of(later, temporality=CUMULATIVE))
    result = evidence(store, T0 + 30)
    assert [p.requests for p in result.points] == [35]
    assert [p.errors for p in result.points] == [5]


def test_cumulative_split_batches_are_baselines(store):
    first = point(T0 + 10, [100, 0, 0, 0])
    second = point(T0 + 10, [0, 0, 40, 0], status=500)
    store.ingest(request_of([first], temporality=CUMULATIVE))
    store.ingest(request_of([second], temporality=CUMULATIVE))
    assert not evidence(store, T0 + 15).has_data


def test_cumulative_counter_reset_counts_new_value(store):
    old_start = T0 - 600
    new_start = T0 + 25
    store.ingest(
        request_of(
            [point(T0 + 10, [100, 0, 0, 0], start_s=old_start)], temporality=CUMULATIVE
        )
    )
    store.ingest(
        request_of(
            [point(T0 + 20, [150, 0, 0, 0], start_s=old_start)], temporality=CUMULATIVE
        )
    )
    # The process restarted: a new start time and a smaller count.
    store.ingest(
        request_of(
            [point(T0 + 35, [0, 0, 8, 0], start_s=new_start)], temporality=CUMULATIVE
        )
    )
    result = evidence(store, T0 + 45)
    assert [p.requests for p in result.points] == [50, 8]
    assert all(p.requests >= 0 for p in result.points)


def test_cumulative_count_drop_without_start_time_is_reset(store):
    for time_s, count in [(T0 + 10, 100), (T0 + 20, 120), (T0 + 35, 5)]:
        store.ingest(
            request_of(
                [point(time_s, [count, 0, 0, 0], start_s=0)], temporality=CUMULATIVE
            )
        )
    assert [p.requests for p in evidence(store, T0 + 45).points] == [20, 5]


def test_cumulative_repeated_point_adds_nothing(store):
    for time_s, count in [(T0 + 10, 100), (T0 + 20, 120), (T0 + 20, 120)]:
        store.ingest(
            request_of([point(time_s, [count, 0, 0, 0])], temporality=CUMULATIVE)
        )
    assert [p.requests for p in evidence(store, T0 + 30).points] == [20]


def test_cumulative_errors_tracked_per_series(store):
    def export(time_s, ok, failed):
        store.ingest(
            request_of(
                [
                    point(time_s, [ok, 0, 0, 0]),
                    point(time_s, [0, 0, failed, 0], status=500),
                ],
                temporality=CUMULATIVE,
            )
        )

    export(T0 + 10, 1000, 10)
    export(T0 + 20, 1090, 20)
    result = evidence(store, T0 + 30)
    assert result.points[0].requests == 100
    assert result.points[0].errors == 10
    assert result.error_ratio == pytest.approx(0.1)


# --- no data, no traffic, NaN ---


def test_unknown_application_has_no_data(store):
    result = store.evidence("shop", "missing", 60, 15, at(T0))
    assert not result.has_data
    assert result.points == []
    assert result.error_ratio is None
    assert result.request_rate is None


def test_zero_count_points_are_no_traffic(store):
    store.ingest(request_of([point(T0 + 5, [0, 0, 0, 0])]))
    result = evidence(store, T0 + 10)
    assert result.has_data
    assert result.no_traffic
    assert result.request_rate == 0.0
    assert result.error_ratio is None
    assert result.latency_p99_seconds is None
    assert result.points[0].error_ratio is None


def test_evidence_json_has_no_nan(store):
    store.ingest(
        request_of([point(T0 + 5, [0, 0, 0, 0]), point(T0 + 20, [1, 0, 0, 0])])
    )
    dumped = evidence(store, T0 + 30).model_dump_json()
    assert "NaN" not in dumped
    assert "Infinity" not in dumped
    for value in json.loads(dumped)["points"]:
        assert value["error_ratio"] is None or math.isfinite(value["error_ratio"])


def test_histogram_without_buckets_has_no_latency(store):
    bare = metrics_pb2.HistogramDataPoint(
        time_unix_nano=int((T0 + 5) * NANOS), count=10, sum=1.0
    )
    store.ingest(request_of([bare]))
    result = evidence(store, T0 + 10)
    assert result.points[0].requests == 10
    assert result.latency_p99_seconds is None


def test_infinite_bound_is_rejected(store):
    bad = point(T0 + 5, [1, 0, 0, 0], bounds=(0.1, math.inf, 1.0))
    result = store.ingest(request_of([bad]))
    assert result.rejected_points == 1
    assert not evidence(store, T0 + 10).has_data


def test_bucket_count_mismatch_is_rejected(store):
    bad = point(T0 + 5, [1, 0, 0, 0])
    del bad.bucket_counts[-1]
    result = store.ingest(request_of([bad]))
    assert result.rejected_points == 1
    assert "bucket_counts" in result.errors[0]


@pytest.mark.parametrize(
    ("window", "step"),
    [(0, 15), (60, 0), (60, -1), (math.inf, 15), (60, math.nan), (1_000_000, 1)],
)
def test_invalid_window_raises(store, window, step):
    with pytest.raises(ValueError):
        store.evidence("shop", "checkout", window, step, at(T0))


# --- routing, limits, other metrics ---


def test_k8s_namespace_attribute_is_accepted(store):
    request = request_of(
        [point(T0 + 5, [1, 0, 0, 0])],
        resource={"service.name": "checkout", "k8s.namespace.name": "shop"},
    )
    store.ingest(request)
    assert evidence(store, T0 + 10).has_data


@pytest.mark.parametrize(
    "resource",
    [
        {"service.name": "checkout"},
        {"service.namespace": "shop"},
        {"service.name": "Checkout", "service.namespace": "shop"},
        {"service.name": "checkout", "service.namespace": "../shop"},
    ],
)
def test_resource_without_valid_app_is_rejected(store, resource):
    result = store.ingest(request_of([point(T0 + 5, [1, 0, 0, 0])], resource=resource))
    assert result.rejected_points == 1
    assert result.accepted_points == 0
    assert store.applications() == []


def test_other_metrics_are_ignored(store):
    result = store.ingest(
        request_of([point(T0 + 5, [1, 0, 0, 0])], name="rpc.duration")
    )
    assert result.ignored_points == 1
    assert result.rejected_points == 0
    assert store.applications() == []


def test_retention_drops_old_points(store, clock):
    store.ingest(request_of([point(T0 + 5, [1, 0, 0, 0])]))
    clock.now = T0 + 3700
    store.ingest(request_of([point(T0 + 3690, [2, 0, 0, 0])]))
    result = store.evidence("shop", "checkout", 7200, 60, at(T0 + 3700))
    assert sum(p.requests for p in result.points) == 2


def test_points_per_app_are_capped(clock):
    store = GoldenSignalStore(SignalSettings(), max_points_per_app=3, clock=clock)
    for index in range(5):
        store.ingest(request_of([point(T0 + index, [1, 0, 0, 0])]))
    result = store.evidence("shop", "checkout", 60, 1, at(T0 + 10))
    assert [p.end for p in result.points] == [at(T0 + 2), at(T0 + 3), at(T0 + 4)]


def test_exponential_histogram_is_read(store):
    exponential = metrics_pb2.ExponentialHistogramDataPoint(
        attributes=[attribute("http.response.status_code", 200)],
        time_unix_nano=int((T0 + 5) * NANOS),
        count=100,
        scale=0,
        zero_count=0,
        positive=metrics_pb2.ExponentialHistogramDataPoint.Buckets(
            offset=-4, bucket_counts=[0, 0, 100]
        ),
    )
    request = request_of([])
    metric = request.resource_metrics[0].scope_metrics[0].metrics[0]
    metric.exponential_histogram.aggregation_temporality = DELTA
    metric.exponential_histogram.data_points.append(exponential)
    store.ingest(request)
    # Bucket offset -4 + 2 covers (0.25, 0.5] at scale 0.
    p99 = evidence(store, T0 + 10).latency_p99_seconds
    assert 0.25 < p99 <= 0.5


# --- OTLP decoding ---


def otlp_json() -> bytes:
    """An OTLP/JSON body as the specification encodes it: camelCase names,
    64-bit integers as strings, the temporality as an integer and hex ids."""
    exemplar = {
        "timeUnixNano": str(int(T0 * NANOS)),
        "asDouble": 0.7,
        "traceId": "5b8efff798038103d269b633813fc60c",
        "spanId": "eee19b7ec3c1b174",
    }
    data_point = {
        "startTimeUnixNano": str(int(T0 * NANOS)),
        "timeUnixNano": str(int((T0 + 5) * NANOS)),
        "count": "4",
        "sum": 0.8,
        "bucketCounts": ["0", "2", "2", "0"],
        "explicitBounds": [0.1, 0.5, 1.0],
        "attributes": [
            {"key": "http.response.status_code", "value": {"intValue": "503"}}
        ],
        "exemplars": [exemplar],
    }
    metric = {
        "name": "http.server.request.duration",
        "unit": "s",
        "histogram": {"aggregationTemporality": 1, "dataPoints": [data_point]},
    }
    resource = {
        "attributes": [
            {"key": "service.name", "value": {"stringValue": "checkout"}},
            {"key": "service.namespace", "value": {"stringValue": "shop"}},
        ]
    }
    scope = {"name": "my.library", "version": "1.0.0"}
    body = {
        "resourceMetrics": [
            {
                "resource": resource,
                "scopeMetrics": [{"scope": scope, "metrics": [metric]}],
            }
        ]
    }
    return json.dumps(body).encode()


def test_otlp_json_is_ingested(store):
    response = export_metrics(otlp_json(), "application/json", None, store, 1 << 20)
    assert response.status_code == 200
    assert response.media_type == "application/json"
    assert json.loads(response.body) == {}
    result = evidence(store, T0 + 10)
    assert result.error_ratio == 1.0
    assert result.points[0].requests == 4


def test_otlp_protobuf_gzip_is_ingested(store):
    body = gzip.compress(request_of([point(T0 + 5, [3, 0, 0, 0])]).SerializeToString())
    response = export_metrics(body, "application/x-protobuf", "gzip", store, 1 << 20)
    assert response.status_code == 200
    assert response.media_type == "application/x-protobuf"
    assert ExportMetricsServiceResponse.FromString(response.body) == (
        ExportMetricsServiceResponse()
    )
    assert evidence(store, T0 + 10).points[0].requests == 3


def test_otlp_rejected_points_are_partial_success(store):
    request = request_of([point(T0 + 5, [3, 0, 0, 0])], resource={"service.name": "x"})
    response = export_metrics(
        request.SerializeToString(), "application/x-protobuf", None, store, 1 << 20
    )
    parsed = ExportMetricsServiceResponse.FromString(response.body)
    assert response.status_code == 200
    assert parsed.partial_success.rejected_data_points == 1
    assert "service.namespace" in parsed.partial_success.error_message


def test_otlp_other_content_type_is_415(store):
    response = export_metrics(b"{}", "text/plain", None, store, 1 << 20)
    assert response.status_code == 415
    assert "application/x-protobuf" in json.loads(response.body)["message"]


def test_otlp_unknown_encoding_is_415(store):
    response = export_metrics(b"{}", "application/json", "br", store, 1 << 20)
    assert response.status_code == 415


def test_otlp_invalid_protobuf_is_400(store):
    response = export_metrics(
        b"\xff\xff\xff\xff", "application/x-protobuf", None, store, 1 << 20
    )
    assert response.status_code == 400
    status = status_pb2.Status.FromString(response.body)
    assert "protobuf" in status.message


def test_otlp_invalid_json_is_400(store):
    response = export_metrics(b"{not json", "application/json", None, store, 1 << 20)
    assert response.status_code == 400
    assert "JSON" in json.loads(response.body)["message"]


def test_otlp_truncated_gzip_is_400(store):
    body = gzip.compress(b"{}" * 1000)[:20]
    response = export_metrics(body, "application/json", "gzip", store, 1 << 20)
    assert response.status_code == 400


def test_otlp_gzip_bomb_is_413(store):
    body = gzip.compress(b" " * (2 << 20))
    response = export_metrics(body, "application/json", "gzip", store, 1 << 20)
    assert response.status_code == 413


def test_json_format_round_trip_is_ingested(store):
    text = json_format.MessageToJson(request_of([point(T0 + 5, [2, 0, 0, 0])]))
    response = export_metrics(text.encode(), "application/json", None, store, 1 << 20)
    assert response.status_code == 200
    assert evidence(store, T0 + 10).points[0].requests == 2


# --- real exporter over HTTP ---


class RecordingExporter(OTLPMetricExporter):
    """The real OTLP/HTTP exporter, keeping the result of each export."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.results: list[MetricExportResult] = []

    def export(self, metrics_data, timeout_millis: float | None = 10000, **kwargs):
        result = super().export(metrics_data, timeout_millis, **kwargs)
        self.results.append(result)
        return result


class FakeStarter:
    async def signal_with_start(self, entry):
        raise AssertionError("no alerts are sent in this test")

    async def signal_open(self, entry):
        raise AssertionError("no alerts are sent in this test")


@pytest.fixture
def intake_server(monkeypatch):
    """Serve the intake app with uvicorn on a free 127.0.0.1 port."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    app = create_app(Settings(), FakeStarter())
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]})
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start within 10 s"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    listener.close()


def test_real_exporter_feeds_store(intake_server):
    exporter = RecordingExporter(
        endpoint=f"{intake_server}/v1/metrics", compression=Compression.Gzip, timeout=5
    )
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(
        metric_readers=[reader],
        resource=Resource.create(
            {"service.name": "checkout", "service.namespace": "shop"}
        ),
    )
    histogram = provider.get_meter("test").create_histogram(
        "http.server.request.duration",
        unit="s",
        explicit_bucket_boundaries_advisory=[
            0.005,
            0.01,
            0.025,
            0.05,
            0.1,
            0.25,
            0.5,
            1,
        ],
    )
    try:
        for _ in range(90):
            histogram.record(0.02, {"http.response.status_code": 200})
        for _ in range(10):
            histogram.record(0.4, {"http.response.status_code": 503})
        assert provider.force_flush()
        # The second export is cumulative: only its increase may be added.
        for _ in range(50):
            histogram.record(0.02, {"http.response.status_code": 200})
        assert provider.force_flush()
    finally:
        provider.shutdown()
    assert exporter.results[:2] == [MetricExportResult.SUCCESS] * 2

    end = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    with httpx.Client(base_url=intake_server, trust_env=False) as client:
        response = client.get(
            "/v1/signals/shop/checkout",
            params={"window_seconds": 300, "step_seconds": 15, "end": end},
        )
    assert response.status_code == 200
    body = response.json()
    assert body["has_data"] is True
    assert sum(p["requests"] for p in body["points"]) == 150
    assert sum(p["errors"] for p in body["points"]) == 10
    assert body["error_ratio"] == pytest.approx(10 / 150)
    assert 0.25 < body["latency_p99_seconds"] <= 0.5
