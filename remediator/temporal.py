"""Temporal client construction shared by the CLI, the intake and the workers.

Every process connects with the pydantic data converter, so the models in
`workflows.models` travel as JSON, and with the OpenTelemetry tracing
interceptor, so one trace spans intake, workflow and activities. Workers may
pass a `metrics_runtime`, whose Prometheus endpoint serves the SDK's metrics
and the `remediation_*` metrics that workflows and activities record.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from temporalio.api.enums.v1 import TaskQueueKind
from temporalio.api.taskqueue.v1 import PollerInfo, TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.service import TLSConfig

from remediator.settings import TemporalSettings

# Bucket bounds, in seconds, of the histograms the service records itself.
# The SDK's defaults suit milliseconds.
STAGE_BUCKETS = [0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900, 1800, 3600]
DECISION_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]
HISTOGRAM_BUCKETS: dict[str, list[float]] = {
    "remediation_stage_duration_seconds": STAGE_BUCKETS,
    "remediation_decision_latency_seconds": DECISION_BUCKETS,
}


def metrics_runtime(host: str, port: int) -> Runtime:
    """Create a Temporal runtime that serves Prometheus metrics at host:port/metrics.

    The endpoint has no authentication; keep it on 127.0.0.1 or a network that
    only the scraper reaches. Create one runtime per process.
    """
    return Runtime(
        telemetry=TelemetryConfig(
            metrics=PrometheusConfig(
                bind_address=f"{host}:{port}",
                histogram_bucket_overrides=HISTOGRAM_BUCKETS,
            )
        )
    )


def worker_runtime(settings: TemporalSettings) -> Runtime | None:
    """Return the metrics runtime the settings ask for, or None when it is off."""
    if settings.metrics_port is None:
        return None
    return metrics_runtime(settings.metrics_host, settings.metrics_port)


class TemporalSettingsError(RuntimeError):
    """The TLS or API key settings of the Temporal client are invalid."""


def _read_pem(path: Path | None, variable: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise TemporalSettingsError(
            f"cannot read {variable} {path}: {error.strerror or error}"
        ) from None


def connect_options(settings: TemporalSettings) -> dict[str, Any]:
    """Build the namespace, TLS and API key arguments of `Client.connect`.

    TLS is on when `tls` is set, and also when an API key, a certificate
    file or a server name is set, because Temporal Cloud and mutual TLS
    need it. Without files or a server name, `tls` is True and the SDK
    verifies the server against the system roots. Raises
    TemporalSettingsError when only one half of the client key pair is set
    or a file cannot be read.
    """
    options: dict[str, Any] = {"namespace": settings.namespace}
    api_key = settings.api_key.get_secret_value() if settings.api_key else ""
    if api_key:
        options["api_key"] = api_key
    if (settings.tls_cert_file is None) != (settings.tls_key_file is None):
        raise TemporalSettingsError(
            "mutual TLS needs both REMEDIATOR_TEMPORAL_TLS_CERT_FILE and "
            "REMEDIATOR_TEMPORAL_TLS_KEY_FILE; only one is set"
        )
    custom = (
        settings.tls_cert_file is not None
        or settings.tls_ca_file is not None
        or bool(settings.tls_server_name)
    )
    if custom:
        options["tls"] = TLSConfig(
            server_root_ca_cert=_read_pem(
                settings.tls_ca_file, "REMEDIATOR_TEMPORAL_TLS_CA_FILE"
            ),
            client_cert=_read_pem(
                settings.tls_cert_file, "REMEDIATOR_TEMPORAL_TLS_CERT_FILE"
            ),
            client_private_key=_read_pem(
                settings.tls_key_file, "REMEDIATOR_TEMPORAL_TLS_KEY_FILE"
            ),
            domain=settings.tls_server_name or None,
        )
    elif settings.tls or api_key:
        options["tls"] = True
    return options


async def connect(
    settings: TemporalSettings, lazy: bool = False, runtime: Runtime | None = None
) -> Client:
    """Connect to the Temporal frontend named in the settings.

    A lazy client connects on its first call, so a process can start while
    Temporal is still down. `runtime` defaults to the SDK's default runtime,
    which exports no metrics. Raises TemporalSettingsError for unreadable
    TLS files.
    """
    return await Client.connect(
        settings.address,
        **connect_options(settings),
        data_converter=pydantic_data_converter,
        interceptors=[TracingInterceptor()],
        lazy=lazy,
        runtime=runtime,
    )


def connect_failure(settings: TemporalSettings, error: Exception) -> str:
    """Return the one-line message for a failed `connect`: the address, the
    namespace, the first line of the error and what to do next."""
    first_line = (str(error).strip() or type(error).__name__).splitlines()[0]
    return (
        f"cannot connect to Temporal at {settings.address} (namespace "
        f"{settings.namespace}): {first_line}. Start it (remediator dev-server) "
        "or set REMEDIATOR_TEMPORAL_ADDRESS"
    )


async def task_queue_pollers(
    client: Client, task_queue: str, queue_type: int, timeout: timedelta
) -> list[PollerInfo]:
    """Return the pollers Temporal lists for one type of a task queue."""
    response = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(
                name=task_queue, kind=TaskQueueKind.TASK_QUEUE_KIND_NORMAL
            ),
            task_queue_type=queue_type,
        ),
        timeout=timeout,
    )
    return list(response.pollers)


def workflow_url(settings: TemporalSettings, workflow_id: str) -> str:
    """Return the Web UI link of a workflow."""
    base = settings.ui_url.rstrip("/")
    return f"{base}/namespaces/{settings.namespace}/workflows/{workflow_id}"
