"""Golden-signal activities: read evidence and judge verification intervals.

The incident workflow calls `collect_evidence` in step 1 and `verify_interval`
once per verification interval in step 10. Both read the intake's
golden-signal store over HTTP (`GET /v1/signals/{namespace}/{app}` at
`IntakeSettings.url`), so workers need no access to the OTLP receiver's memory.

Errors: connection failures, timeouts and 5xx responses are retryable; 4xx
responses and bodies that are not `Evidence` raise a non-retryable
`ApplicationError`, because repeating the same request cannot fix them.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from urllib.parse import quote

import httpx
from pydantic import ValidationError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from remediator.settings import Settings
from workflows.models import (
    ApplicationList,
    DiscoveryQuery,
    Evidence,
    SignalQuery,
    VerifyInput,
    VerifyResult,
)

REQUEST_TIMEOUT_SECONDS = 10.0


class SignalActivities:
    """Activities that read the golden-signal store of the intake service.

    `transport` replaces the HTTP transport, so tests can serve the intake
    application in process.
    """

    def __init__(
        self, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self._settings = settings
        self._transport = transport

    @activity.defn(name="collect_evidence")
    async def collect_evidence(self, query: SignalQuery) -> Evidence:
        """Read one application's golden signals over the query's window."""
        evidence = await self._fetch_evidence(query)
        if not query.recent_seconds or query.recent_seconds >= query.window_seconds:
            return evidence
        recent = query.model_copy(
            update={
                "window_seconds": query.recent_seconds,
                "step_seconds": query.recent_seconds,
                "end": query.end or _end_of(evidence),
            }
        )
        return with_recent_summary(evidence, await self._fetch_evidence(recent))

    @activity.defn(name="verify_interval")
    async def verify_interval(self, input: VerifyInput) -> VerifyResult:
        """Judge one verification interval against the thresholds.

        Healthy needs traffic, an error ratio at or under the maximum and, when
        a latency maximum is set, a known p99 at or under it. No data and no
        traffic are never healthy.
        """
        _check_thresholds(input)
        evidence = await self._fetch_evidence(input.query)
        return judge_interval(evidence, input)

    @activity.defn(name="discover_applications")
    async def discover_applications(self, query: DiscoveryQuery) -> list[str]:
        """List the applications the signal store has data for, as namespace/app."""
        response = await self._get("/v1/signals", {})
        self._check_status(response, f"the application list from {self._where()}")
        try:
            listing = ApplicationList.model_validate_json(response.content)
        except ValidationError as error:
            raise ApplicationError(
                f"signal store returned a body that is not an application list "
                f"from {self._where()}: {error}",
                type="InvalidEvidence",
                non_retryable=True,
            ) from error
        return listing.applications

    async def _fetch_evidence(self, query: SignalQuery) -> Evidence:
        end = query.end or datetime.now(UTC)
        path = (
            f"/v1/signals/{quote(query.namespace, safe='')}/{quote(query.app, safe='')}"
        )
        params = {
            "window_seconds": query.window_seconds,
            "step_seconds": query.step_seconds,
            "end": end.isoformat(),
        }
        response = await self._get(path, params)
        where = f"{query.namespace}/{query.app} from {self._where()}"
        self._check_status(response, where)
        try:
            return Evidence.model_validate_json(response.content)
        except ValidationError as error:
            raise ApplicationError(
                f"signal store returned a body that is not Evidence for {where}: "
                f"{error}",
                type="InvalidEvidence",
                non_retryable=True,
            ) from error

    def _where(self) -> str:
        return self._settings.intake.url

    async def _get(self, path: str, params: dict) -> httpx.Response:
        headers = {}
        token = self._settings.intake.bearer_token
        if token is not None and token.get_secret_value():
            headers["Authorization"] = f"Bearer {token.get_secret_value()}"
        async with httpx.AsyncClient(
            base_url=self._settings.intake.url,
            transport=self._transport,
            timeout=REQUEST_TIMEOUT_SECONDS,
        ) as client:
            # httpx.TransportError (refused, reset, timed out) propagates as a
            # plain exception, which Temporal retries.
            return await client.get(path, params=params, headers=headers)

    @staticmethod
    def _check_status(response: httpx.Response, where: str) -> None:
        if response.status_code >= 500:
            raise ApplicationError(
                f"signal store returned {response.status_code} for {where}: "
                f"{response.text[:200]}",
                type="SignalStoreUnavailable",
            )
        if response.status_code >= 400:
            raise ApplicationError(
                f"signal store rejected the request for {where} with "
                f"{response.status_code}: {response.text[:500]}",
                type="SignalQueryRejected",
                non_retryable=True,
            )


def _check_thresholds(input: VerifyInput) -> None:
    limits = {
        "max_error_ratio": input.max_error_ratio,
        "max_latency_p99_seconds": input.max_latency_p99_seconds,
    }
    for name, value in limits.items():
        if value is not None and not math.isfinite(value):
            raise ApplicationError(
                f"{name} must be a finite number, got {value}",
                type="InvalidThreshold",
                non_retryable=True,
            )


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _end_of(evidence: Evidence) -> datetime | None:
    return evidence.points[-1].end if evidence.points else None


def with_recent_summary(window: Evidence, recent: Evidence) -> Evidence:
    """Return the window's points with the summary signals of the recent part.

    No data in the recent part is no data, whatever the window held earlier.
    """
    return window.model_copy(
        update={
            "has_data": recent.has_data,
            "no_traffic": recent.no_traffic,
            "request_rate": recent.request_rate,
            "error_ratio": recent.error_ratio,
            "latency_p99_seconds": recent.latency_p99_seconds,
        }
    )


def judge_interval(evidence: Evidence, input: VerifyInput) -> VerifyResult:
    """Compare one interval's evidence with the thresholds; missing data fails."""
    window = f"the {input.query.window_seconds:g} s window"
    error_ratio = _finite(evidence.error_ratio)
    latency = _finite(evidence.latency_p99_seconds)
    if not evidence.has_data:
        return VerifyResult(
            healthy=False,
            no_data=True,
            reason=f"no golden-signal data for {evidence.namespace}/{evidence.app} in "
            f"{window}; missing data never counts as recovery",
        )
    if evidence.no_traffic:
        return VerifyResult(
            healthy=False,
            no_traffic=True,
            reason=f"{evidence.namespace}/{evidence.app} served no requests in "
            f"{window}; an idle application is not proof of recovery",
        )
    if error_ratio is None:
        return VerifyResult(
            healthy=False,
            latency_p99_seconds=latency,
            reason=f"error ratio is unknown for {window}",
        )

    result = VerifyResult(
        healthy=False, error_ratio=error_ratio, latency_p99_seconds=latency
    )
    if error_ratio > input.max_error_ratio:
        result.reason = (
            f"error ratio {error_ratio:.4f} is above the maximum "
            f"{input.max_error_ratio:.4f}"
        )
        return result
    max_latency = input.max_latency_p99_seconds
    if max_latency is not None:
        if latency is None:
            result.reason = (
                f"p99 latency is unknown (no histogram buckets) and the maximum is "
                f"{max_latency:g} s"
            )
            return result
        if latency > max_latency:
            result.reason = (
                f"p99 latency {latency:.3f} s is above the maximum {max_latency:g} s"
            )
            return result

    result.healthy = True
    result.reason = (
        f"error ratio {error_ratio:.4f} is at or under {input.max_error_ratio:.4f}"
    )
    if max_latency is not None:
        result.reason += (
            f" and p99 latency {latency:.3f} s is at or under {max_latency:g} s"
        )
    return result
