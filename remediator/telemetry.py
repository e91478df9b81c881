"""Tracing and logging setup shared by every Remediator process.

Each process installs an OpenTelemetry SDK tracer provider so the intake's span,
the Temporal tracing interceptor's workflow and activity spans and the trace id
written into the pull request belong to one trace. Spans are exported over
OTLP/HTTP when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (or the generic
`OTEL_EXPORTER_OTLP_ENDPOINT`) is set, and kept in-process otherwise.
"""

from __future__ import annotations

import logging
import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

_configured = False


def setup_tracing(service_name: str) -> None:
    """Install the SDK tracer provider once per process."""
    global _configured
    if _configured:
        return
    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": service_name, "service.namespace": "remediator"}
        )
    )
    if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    ):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter,
        )

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _configured = True


def setup_logging(level: str | None = None) -> None:
    """Log sentences with time, level and module to stderr."""
    logging.basicConfig(
        level=(level or os.environ.get("REMEDIATOR_LOG_LEVEL", "INFO")).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One line per HTTP request drowns the service's own messages.
    logging.getLogger("httpx").setLevel(logging.WARNING)
