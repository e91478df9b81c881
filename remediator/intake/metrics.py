"""Prometheus metrics of the intake, served at `GET /metrics`.

Each application gets its own registry, so several intakes in one process (as
in the tests) never share counters or collide on metric names. Labels hold only route
templates, status codes and alert statuses, never header values, so bearer
tokens cannot reach the scrape output.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class IntakeMetrics:
    """The intake's counters and histograms, in a registry of their own."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.alerts_received = Counter(
            "remediator_intake_alerts_received",
            "Routable alerts received on the Alertmanager webhook, by alert status",
            ["status"],
            registry=self.registry,
        )
        self.unroutable_alerts = Counter(
            "remediator_intake_unroutable_alerts",
            "Alerts without a namespace or application label, ignored",
            registry=self.registry,
        )
        self.incidents_signalled = Counter(
            "remediator_intake_incidents_signalled",
            "Incident workflows signalled: started or reached with an alert",
            ["action"],
            registry=self.registry,
        )
        self.otlp_points = Counter(
            "remediator_intake_otlp_points",
            "OTLP data points the golden-signal store accepted or rejected",
            ["result"],
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "remediator_intake_request_duration_seconds",
            "Seconds to answer one HTTP request, by route template and status code",
            ["method", "route", "status"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> bytes:
        """Return the registry in the Prometheus text format."""
        return generate_latest(self.registry)


class RequestTimer:
    """ASGI middleware that observes each HTTP request's duration.

    The route label is the matched path template (`/v1/signals/{namespace}/{app}`),
    or `unmatched`, so unknown paths cannot grow the number of series.
    """

    def __init__(self, app, metrics: IntakeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_note_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.request_duration.labels(
                scope["method"], route, str(status)
            ).observe(time.perf_counter() - started)
