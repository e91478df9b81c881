"""Temporal client construction shared by the CLI, the intake and the workers.

Every process connects with the pydantic data converter, so the models in
`workflows.models` travel as JSON, and with the OpenTelemetry tracing
interceptor, so one trace spans intake, workflow and activities.
"""

from __future__ import annotations

from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.contrib.pydantic import pydantic_data_converter

from remediator.settings import TemporalSettings


async def connect(settings: TemporalSettings, lazy: bool = False) -> Client:
    """Connect to the Temporal frontend named in the settings.

    A lazy client connects on its first call, so a process can start while
    Temporal is still down.
    """
    return await Client.connect(
        settings.address,
        namespace=settings.namespace,
        data_converter=pydantic_data_converter,
        interceptors=[TracingInterceptor()],
        lazy=lazy,
    )


def workflow_url(settings: TemporalSettings, workflow_id: str) -> str:
    """Return the Web UI link of a workflow."""
    base = settings.ui_url.rstrip("/")
    return f"{base}/namespaces/{settings.namespace}/workflows/{workflow_id}"
