"""Tests of the simulated demo service and its real OTLP/HTTP export.

A small HTTP server on 127.0.0.1 decodes every OTLP metrics request, so the
tests check what the exporter actually sends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

from remediator.demo.demo_app import (
    DURATION_BUCKETS_SECONDS,
    METRIC_NAME,
    DemoApplication,
    ImageBehaviour,
)

GOOD = "registry.local/checkout:1.0.0"
BAD = "registry.local/checkout:2.0.0"


@dataclass
class Collected:
    """The latest cumulative histogram per status code, and what came with it."""

    requests: int = 0
    paths: list[str] = field(default_factory=list)
    content_types: list[str] = field(default_factory=list)
    resources: list[dict[str, str]] = field(default_factory=list)
    counts: dict[int, int] = field(default_factory=dict)
    sums: dict[int, float] = field(default_factory=dict)
    units: set[str] = field(default_factory=set)
    bounds: list[list[float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ingest(self, request: ExportMetricsServiceRequest) -> None:
        with self.lock:
            self.requests += 1
            for resource_metrics in request.resource_metrics:
                attributes = {
                    a.key: a.value.string_value
                    for a in resource_metrics.resource.attributes
                }
                self.resources.append(attributes)
                for scope in resource_metrics.scope_metrics:
                    for metric in scope.metrics:
                        if metric.name != METRIC_NAME:
                            continue
                        self.units.add(metric.unit)
                        for point in metric.histogram.data_points:
                            code = next(
                                a.value.int_value
                                for a in point.attributes
                                if a.key == "http.response.status_code"
                            )
                            self.counts[code] = point.count
                            self.sums[code] = point.sum
                            self.bounds.append(list(point.explicit_bounds))

    def count(self, code: int) -> int:
        with self.lock:
            return self.counts.get(code, 0)


@pytest.fixture
def collector() -> Iterator[tuple[str, Collected]]:
    collected = Collected()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            request = ExportMetricsServiceRequest()
            request.ParseFromString(body)
            collected.paths.append(self.path)
            collected.content_types.append(self.headers["Content-Type"])
            collected.ingest(request)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1/metrics", collected
    finally:
        server.shutdown()
        server.server_close()


def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.02)


def test_demo_app_error_ratio_follows_image(
    collector: tuple[str, Collected],
) -> None:
    endpoint, collected = collector
    live = [GOOD]
    demo = DemoApplication(
        "shop",
        "checkout",
        endpoint,
        {GOOD: 0.0, BAD: ImageBehaviour(error_ratio=0.5, latency_median_seconds=0.4)},
        lambda: live[0],
        requests_per_second=400.0,
        export_interval_seconds=0.2,
        seed=7,
    )
    demo.start()
    try:
        wait_for(lambda: collected.count(200) >= 100)
        good_errors = collected.count(500)
        at_switch = demo.requests_sent
        live[0] = BAD
        wait_for(lambda: demo.requests_sent - at_switch >= 400)
    finally:
        demo.stop()

    bad_requests = demo.requests_sent - at_switch
    bad_ratio = demo.errors_sent / bad_requests
    assert good_errors == 0
    assert 0.4 < bad_ratio < 0.6
    # After the final flush, the exported cumulative counts match what was sent.
    assert collected.count(200) + collected.count(500) == demo.requests_sent
    assert collected.count(500) == demo.errors_sent
    assert collected.sums[500] / collected.counts[500] > 0.2
    assert collected.requests >= 2
    assert set(collected.paths) == {"/v1/metrics"}
    assert set(collected.content_types) == {"application/x-protobuf"}
    assert collected.resources[0]["service.name"] == "checkout"
    assert collected.resources[0]["service.namespace"] == "shop"
    assert collected.units == {"s"}
    assert collected.bounds[0] == list(DURATION_BUCKETS_SECONDS)


def test_demo_app_survives_failing_callback(
    collector: tuple[str, Collected],
) -> None:
    endpoint, collected = collector
    calls = [0]

    def live_image() -> str:
        calls[0] += 1
        if calls[0] <= 3:
            raise RuntimeError("stand-in not started")
        return GOOD

    demo = DemoApplication(
        "shop",
        "checkout",
        endpoint,
        lambda image: 0.0,
        live_image,
        requests_per_second=400.0,
        export_interval_seconds=0.2,
    )
    demo.start()
    try:
        wait_for(lambda: collected.count(200) > 0)
    finally:
        demo.stop()

    assert calls[0] > 3
    assert collected.count(500) == 0


class RecordingHistogram:
    def __init__(self) -> None:
        self.points: list[tuple[float, int]] = []

    def record(self, value: float, attributes: dict[str, int]) -> None:
        self.points.append((value, attributes["http.response.status_code"]))


def test_demo_app_seeded_outcomes_repeat() -> None:
    behaviour = ImageBehaviour(error_ratio=0.3, latency_median_seconds=0.1)
    first, second, other = (
        RecordingHistogram(),
        RecordingHistogram(),
        RecordingHistogram(),
    )

    for histogram, seed in ((first, 11), (second, 11), (other, 12)):
        demo = DemoApplication("shop", "checkout", "", {}, lambda: GOOD, seed=seed)
        demo._record(histogram, behaviour, 200)

    assert first.points == second.points
    assert first.points != other.points
    assert 0 < sum(code == 500 for _, code in first.points) < 200


def test_demo_app_behaviour_lookup() -> None:
    default = ImageBehaviour(error_ratio=0.01, latency_median_seconds=0.02)
    demo = DemoApplication(
        "shop",
        "checkout",
        "",
        {BAD: 0.5},
        lambda: GOOD,
        default_behaviour=default,
    )
    by_callable = DemoApplication(
        "shop", "checkout", "", lambda image: 0.25, lambda: GOOD
    )

    assert demo.behaviour_of(GOOD) == default
    assert demo.behaviour_of(BAD) == ImageBehaviour(0.5, 0.02)
    assert by_callable.behaviour_of(BAD).error_ratio == 0.25


def test_demo_app_rejects_zero_rate() -> None:
    with pytest.raises(ValueError, match="requests_per_second"):
        DemoApplication("shop", "checkout", "", {}, lambda: GOOD, requests_per_second=0)
