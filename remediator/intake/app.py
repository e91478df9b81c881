"""The intake HTTP service: Alertmanager webhook, OTLP receiver and signal reads.

`create_app` builds the FastAPI application that the command line serves with
uvicorn. Routes:

- `POST /v1/alerts`: an Alertmanager webhook (version 4). Each application key
  gets one signal-with-start of `IncidentWorkflow` for its firing alerts;
  resolved alerts only reach an incident that is already open.
- `POST /v1/metrics`: the OTLP/HTTP metrics receiver feeding the store.
- `GET /v1/signals`: the applications the store has data for, read by the
  detection sweep's `discover_applications` activity.
- `GET /v1/signals/{namespace}/{app}`: golden signals as `Evidence` JSON, read
  by the `collect_evidence` and `verify_interval` activities.
- `GET /healthz`: liveness.
- `GET /metrics`: the intake's own Prometheus metrics (`remediator_intake_*`).

When `IntakeSettings.bearer_token` is set, every `/v1/` route requires it.
`/healthz` and `/metrics` need no token and reveal none.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import zlib
from datetime import datetime
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from pydantic import ValidationError
from temporalio.client import Client, WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode

from remediator.intake.alertmanager import IntakePlan, PlanEntry, plan_incidents
from remediator.intake.metrics import IntakeMetrics, RequestTimer
from remediator.intake.otlp import (
    BodyTooLargeError,
    UnsupportedEncodingError,
    decode_content,
    export_metrics,
)
from remediator.intake.store import GoldenSignalStore
from remediator.settings import Settings
from remediator.temporal import connect
from workflows.models import (
    INCIDENT_WORKFLOW,
    AlertSignal,
    ApplicationList,
    Evidence,
    IncidentConfig,
    IncidentInput,
    VerifyConfig,
)

logger = logging.getLogger(__name__)

ALERT_SIGNAL = "alert"
KUBERNETES_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
MAX_REPORTED_ERRORS = 20
RETRY_AFTER_SECONDS = 5

# Path parameter of a namespace or app name: a DNS-1123 label.
KubernetesName = Annotated[str, Path(pattern=KUBERNETES_NAME_PATTERN, max_length=63)]


class StarterUnavailableError(Exception):
    """Temporal is unreachable, so the webhook responds 503 and Alertmanager retries."""


class IncidentStarter(Protocol):
    """Starts and signals incident workflows for the alerts route."""

    async def signal_with_start(self, entry: PlanEntry) -> str:
        """Signal every alert of the entry, starting the incident if none is open.

        Returns the incident workflow id. Raises StarterUnavailableError when
        Temporal cannot be reached.
        """
        ...

    async def signal_open(self, entry: PlanEntry) -> str | None:
        """Signal the entry's alerts to an open incident, never starting one.

        Returns the workflow id, or None when no incident is open.
        """
        ...


# --- Incident input ---


def argocd_application_name(settings: Settings, namespace: str, app: str) -> str:
    """Render `ArgoCDSettings.application_template` for one application."""
    return settings.argocd.application_template.format(namespace=namespace, app=app)


def check_application_template(settings: Settings) -> None:
    """Raise ValueError when the Argo CD application template does not render."""
    template = settings.argocd.application_template
    try:
        argocd_application_name(settings, "namespace", "app")
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(
            f"REMEDIATOR_ARGOCD_APPLICATION_TEMPLATE {template!r} is invalid "
            f"({error!r}); it may use only {{namespace}} and {{app}}"
        ) from error


def web_ui_url(settings: Settings, workflow_id: str) -> str:
    """Return the Temporal Web UI link of a workflow."""
    base = settings.temporal.ui_url.rstrip("/")
    return f"{base}/namespaces/{settings.temporal.namespace}/workflows/{workflow_id}"


def build_incident_input(entry: PlanEntry, settings: Settings) -> IncidentInput:
    """Build the start input of `IncidentWorkflow` from the service settings."""
    workflow_id = entry.workflow_id
    config = IncidentConfig(
        argocd_application=argocd_application_name(
            settings, entry.namespace, entry.app
        ),
        signal_window_seconds=settings.signals.window_seconds,
        signal_step_seconds=settings.signals.step_seconds,
        signal_recent_seconds=settings.signals.recent_seconds,
        verify=VerifyConfig(
            interval_seconds=settings.verify.interval_seconds,
            consecutive_intervals=settings.verify.consecutive_intervals,
            max_intervals=settings.verify.max_intervals,
        ),
        detection_task_queue=settings.temporal.detection_task_queue,
        shadow=settings.remediation.shadow,
        strategy=settings.git.strategy,
        web_ui_url=web_ui_url(settings, workflow_id),
        sync_timeout_seconds=settings.argocd.sync_timeout_seconds,
        approval_timeout_seconds=settings.remediation.approval_timeout_seconds,
        max_rollbacks=settings.budget.max_rollbacks,
        budget_window_seconds=settings.budget.window_seconds,
        search_attributes=settings.temporal.search_attributes,
    )
    return IncidentInput(
        incident_id=workflow_id,
        namespace=entry.namespace,
        app=entry.app,
        trace_id=entry.trace_id,
        config=config,
    )


# --- Temporal ---

_UNREACHABLE_STATUSES = {
    RPCStatusCode.UNAVAILABLE,
    RPCStatusCode.DEADLINE_EXCEEDED,
    RPCStatusCode.RESOURCE_EXHAUSTED,
}


def _is_unreachable(error: Exception) -> bool:
    if isinstance(error, RPCError):
        return error.status in _UNREACHABLE_STATUSES
    # A lazy client raises a plain RuntimeError when its first connect fails
    # (temporalio 1.35); the message prefix is the only way to tell it apart.
    return isinstance(error, RuntimeError) and str(error).startswith(
        "Failed client connect"
    )


class TemporalStarter:
    """Starts incidents on Temporal with signal-with-start, one per application.

    The client must use `temporalio.contrib.pydantic.pydantic_data_converter`,
    because the workflow input and the `alert` signal argument are pydantic
    models. The first firing alert rides on the signal-with-start. The other
    alerts of the entry follow as separate `alert` signals, which may go
    concurrently because the plan contains each fingerprint once.
    """

    def __init__(
        self, client: Client, settings: Settings, *, signal_concurrency: int = 16
    ) -> None:
        check_application_template(settings)
        self._client = client
        self._settings = settings
        self._signal_concurrency = signal_concurrency

    async def signal_with_start(self, entry: PlanEntry) -> str:
        firing = entry.firing
        if not firing:
            raise ValueError(f"entry {entry.key} has no firing alert to start with")
        first = firing[0]
        try:
            handle = await self._client.start_workflow(
                INCIDENT_WORKFLOW,
                build_incident_input(entry, self._settings),
                id=entry.workflow_id,
                task_queue=self._settings.temporal.task_queue,
                start_signal=ALERT_SIGNAL,
                start_signal_args=[first],
                static_summary=f"Incident of {entry.key}: {first.alertname or 'alert'}",
                static_details=_static_details(entry, first),
            )
            await self._signal_all(handle, [a for a in entry.alerts if a is not first])
        except (RPCError, RuntimeError) as error:
            if _is_unreachable(error):
                raise StarterUnavailableError(str(error)) from error
            raise
        return entry.workflow_id

    async def signal_open(self, entry: PlanEntry) -> str | None:
        handle = self._client.get_workflow_handle(entry.workflow_id)
        try:
            await self._signal_all(handle, entry.alerts)
        except (RPCError, RuntimeError) as error:
            if isinstance(error, RPCError) and error.status == RPCStatusCode.NOT_FOUND:
                return None  # no open incident: resolved alerts start nothing
            if _is_unreachable(error):
                raise StarterUnavailableError(str(error)) from error
            raise
        return entry.workflow_id

    async def _signal_all(
        self, handle: WorkflowHandle, alerts: list[AlertSignal]
    ) -> None:
        if not alerts:
            return
        # The first signal goes alone, so a missing workflow fails once.
        await handle.signal(ALERT_SIGNAL, alerts[0])
        limit = asyncio.Semaphore(self._signal_concurrency)

        async def send(alert: AlertSignal) -> None:
            async with limit:
                await handle.signal(ALERT_SIGNAL, alert)

        async with asyncio.TaskGroup() as group:
            for alert in alerts[1:]:
                group.create_task(send(alert))


def _static_details(entry: PlanEntry, first: AlertSignal) -> str:
    """Describe what started the incident, for the Web UI's summary panel."""
    lines = [
        f"**Application:** {entry.key}",
        f"**First alert:** {first.alertname or 'unnamed'} ({first.fingerprint})",
        f"**Trace id:** {entry.trace_id or 'none'}",
    ]
    summary = first.annotations.get("summary")
    if summary:
        lines.append(f"**Summary:** {summary}")
    return "\n\n".join(lines)


async def connect_temporal_starter(settings: Settings) -> TemporalStarter:
    """Create a lazy Temporal client and wrap it in a TemporalStarter.

    The client connects on the first alert, so the intake serves OTLP and
    signal reads while Temporal is still down and responds to alerts with 503.
    """
    client = await connect(settings.temporal, lazy=True)
    return TemporalStarter(client, settings)


# --- HTTP helpers ---


async def read_body(request: Request, max_bytes: int) -> bytes:
    """Read the request body, raising 413 as soon as it exceeds `max_bytes`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPException(400, f"invalid Content-Length header {declared[:40]!r}")
        if int(declared) > max_bytes:
            raise _body_too_large(request, int(declared), max_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise _body_too_large(request, len(body), max_bytes)
    return bytes(body)


def _body_too_large(request: Request, size: int, max_bytes: int) -> HTTPException:
    # Alertmanager does not retry a 413, so the notification is lost: log it.
    logger.warning(
        "Rejected a %d-byte body on %s: the limit is %d bytes",
        size,
        request.url.path,
        max_bytes,
    )
    return HTTPException(413, _too_large_message(size, max_bytes))


def _too_large_message(size: int, max_bytes: int) -> str:
    return (
        f"request body of at least {size} bytes exceeds the limit of {max_bytes} "
        "bytes; raise REMEDIATOR_INTAKE_MAX_BODY_BYTES or set max_alerts on the "
        "Alertmanager receiver"
    )


def bearer_token_dependency(settings: Settings):
    """Build a dependency that checks `Authorization: Bearer` in constant time."""
    secret = settings.intake.bearer_token
    expected = secret.get_secret_value().encode() if secret is not None else b""

    async def require_token(request: Request) -> None:
        if not expected:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        valid = scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), expected
        )
        if not valid:
            logger.warning(
                "Rejected a request to %s from %s: missing or invalid bearer token",
                request.url.path,
                request.client.host if request.client else "unknown client",
            )
            raise HTTPException(
                401,
                "missing or invalid bearer token; send Authorization: Bearer <token>",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_token


def validation_error_response(error: ValidationError) -> JSONResponse:
    """Turn a body validation error into 400 (not JSON) or 422 (wrong fields)."""
    details = error.errors(
        include_url=False, include_input=False, include_context=False
    )
    status_code = 400 if any(d["type"] == "json_invalid" for d in details) else 422
    reported: list[dict[str, Any]] = [
        {**detail, "loc": ["body", *detail["loc"]]}
        for detail in details[:MAX_REPORTED_ERRORS]
    ]
    content: dict[str, Any] = {"detail": reported}
    if len(details) > MAX_REPORTED_ERRORS:
        content["errors_not_shown"] = len(details) - MAX_REPORTED_ERRORS
    return JSONResponse(content, status_code=status_code)


def current_trace_id(span: trace.Span) -> str:
    """Return the span's trace id as 32 hex digits.

    Without a configured tracer provider the span is not recording and has no
    trace id, so a random one is made up: it still ties the pull request, the
    workflow and the logs of one webhook request together.
    """
    context = span.get_span_context()
    trace_id = context.trace_id if context.is_valid else 0
    if not trace_id:
        trace_id = RandomIdGenerator().generate_trace_id()
    return format(trace_id, "032x")


def _span_parent(request: Request) -> tuple[otel_context.Context, trace.SpanKind]:
    """Return the parent context and kind of the intake's span.

    When a tracer provider is configured, FastAPI's own telemetry (or an ASGI
    instrumentation) starts a server span from the request's trace headers.
    The intake's span is then its child, so the HTTP request, the workflow and
    the activities share one trace. Without such a span the intake's span is
    the server span, and its parent comes from the request's `traceparent`.
    """
    if trace.get_current_span().get_span_context().is_valid:
        return otel_context.get_current(), trace.SpanKind.INTERNAL
    return propagate.extract(request.headers), trace.SpanKind.SERVER


def _log_plan(plan: IntakePlan) -> None:
    if plan.unroutable:
        first = plan.unroutable[0]
        logger.info(
            "Ignored %d unroutable alerts; first: fingerprint %s alertname %r: %s",
            len(plan.unroutable),
            first.fingerprint,
            first.alertname,
            first.reason,
        )
    if plan.truncated_alerts:
        logger.warning(
            "Alertmanager left %d alerts out of the webhook body (max_alerts); "
            "acting only on the %d listed alerts",
            plan.truncated_alerts,
            sum(len(entry.alerts) for entry in plan.entries),
        )


def _count_plan(metrics: IntakeMetrics, plan: IntakePlan) -> None:
    for entry in plan.entries:
        for alert in entry.alerts:
            metrics.alerts_received.labels(alert.status).inc()
    metrics.unroutable_alerts.inc(len(plan.unroutable))


# --- Application ---


def create_app(
    settings: Settings,
    starter: IncidentStarter,
    *,
    store: GoldenSignalStore | None = None,
    tracer_provider: trace.TracerProvider | None = None,
) -> FastAPI:
    """Build the intake application, whose `state.store` is its golden-signal store."""
    check_application_template(settings)
    store = store or GoldenSignalStore(settings.signals)
    tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)
    max_bytes = settings.intake.max_body_bytes
    authorized = [Depends(bearer_token_dependency(settings))]

    api = FastAPI(title="Remediator intake")
    api.state.store = store
    api.state.settings = settings
    metrics = IntakeMetrics()
    api.state.metrics = metrics
    api.add_middleware(RequestTimer, metrics=metrics)

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(
            metrics.render(), headers={"Content-Type": metrics.content_type}
        )

    @api.post("/v1/alerts", status_code=202, dependencies=authorized)
    async def receive_alerts(request: Request) -> Response:
        raw = await read_body(request, max_bytes)
        try:
            body = decode_content(
                raw, request.headers.get("content-encoding"), max_bytes
            )
        except (UnsupportedEncodingError, BodyTooLargeError, zlib.error) as error:
            logger.warning("Rejected an Alertmanager webhook body: %s", error)
            if isinstance(error, UnsupportedEncodingError):
                raise HTTPException(415, str(error)) from error
            if isinstance(error, BodyTooLargeError):
                raise HTTPException(413, str(error)) from error
            raise HTTPException(400, f"invalid compressed body: {error}") from error

        parent, kind = _span_parent(request)
        with tracer.start_as_current_span(
            "intake.alerts", context=parent, kind=kind
        ) as span:
            try:
                plan = plan_incidents(body, settings)
            except ValidationError as error:
                first = error.errors(include_url=False, include_input=False)[0]
                logger.warning(
                    "Rejected an Alertmanager webhook body with %d validation "
                    "errors; first at %s: %s",
                    error.error_count(),
                    ".".join(str(part) for part in first["loc"]) or "body",
                    first["msg"],
                )
                return validation_error_response(error)
            _log_plan(plan)
            _count_plan(metrics, plan)
            trace_id = current_trace_id(span)
            span.set_attribute("remediator.applications", len(plan.entries))
            span.set_attribute("remediator.unroutable_alerts", len(plan.unroutable))
            return await _start_incidents(plan, trace_id)

    async def _start_incidents(plan: IntakePlan, trace_id: str) -> JSONResponse:
        incidents: list[str] = []
        ignored_resolved = 0
        for entry in plan.entries:
            entry.trace_id = trace_id
            try:
                if entry.firing:
                    workflow_id = await starter.signal_with_start(entry)
                else:
                    workflow_id = await starter.signal_open(entry)
            except StarterUnavailableError as error:
                # Entries before this one were already signalled, and the
                # retry of the whole body signals them again.
                logger.warning(
                    "Temporal is unreachable, so the webhook responds 503 and "
                    "Alertmanager retries; application %s: %s",
                    entry.key,
                    error,
                )
                return JSONResponse(
                    {"detail": f"Temporal is unreachable: {error}; retry later"},
                    status_code=503,
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                )
            if workflow_id is None:
                ignored_resolved += len(entry.alerts)
                logger.info(
                    "Ignored %d resolved alerts of %s: no incident is open",
                    len(entry.alerts),
                    entry.key,
                )
                continue
            incidents.append(workflow_id)
            action = "start" if entry.firing else "signal"
            metrics.incidents_signalled.labels(action).inc()
            logger.info(
                "Signalled incident %s with %d alerts (%d firing), trace %s",
                workflow_id,
                len(entry.alerts),
                len(entry.firing),
                trace_id,
            )
        return JSONResponse(
            {
                "incidents": incidents,
                "unroutable": len(plan.unroutable),
                "ignored_resolved": ignored_resolved,
                "duplicates": plan.duplicates,
                "truncated_alerts": plan.truncated_alerts,
                "trace_id": trace_id,
            },
            status_code=202,
        )

    @api.post("/v1/metrics", dependencies=authorized)
    async def receive_metrics(request: Request) -> Response:
        body = await read_body(request, max_bytes)
        result = export_metrics(
            body,
            request.headers.get("content-type"),
            request.headers.get("content-encoding"),
            store,
            max_bytes,
        )
        metrics.otlp_points.labels("accepted").inc(result.accepted_points)
        metrics.otlp_points.labels("rejected").inc(result.rejected_points)
        return Response(
            result.body, status_code=result.status_code, media_type=result.media_type
        )

    @api.get("/v1/signals", dependencies=authorized)
    async def list_applications() -> ApplicationList:
        keys = store.applications()
        return ApplicationList(applications=[f"{ns}/{app}" for ns, app in keys])

    @api.get("/v1/signals/{namespace}/{app}", dependencies=authorized)
    async def read_signals(
        namespace: KubernetesName,
        app: KubernetesName,
        window_seconds: Annotated[float | None, Query(gt=0)] = None,
        step_seconds: Annotated[float | None, Query(gt=0)] = None,
        end: datetime | None = None,
    ) -> Evidence:
        try:
            return store.evidence(
                namespace,
                app,
                window_seconds or settings.signals.window_seconds,
                step_seconds or settings.signals.step_seconds,
                end,
            )
        except ValueError as error:
            raise HTTPException(422, str(error)) from error

    return api
