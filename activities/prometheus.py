"""Golden-signal activities backed by a Prometheus server.

`PrometheusSignals` registers the same two activities as
`activities.signals.SignalActivities` (`collect_evidence` and
`verify_interval`), so a worker chooses the backend with a setting
(`signal_activities_for`) and the workflow does not change.

Each golden signal is a PromQL template with the placeholders `{namespace}`,
`{app}` and `{window}` (a Prometheus duration such as `300s`):

- `request_rate`: requests per second; the proof that the application served
  traffic.
- `error_ratio`: the fraction of requests that got a 5xx response.
- `latency_p99`: the 99th percentile latency in seconds, from a histogram with
  `histogram_quantile`.
- `restarts`: container restarts in the window.

`DEFAULT_QUERIES` contains the built-in templates. `PrometheusSettings.queries`
(JSON in `REMEDIATOR_PROMETHEUS_QUERIES`) and `queries_file` (YAML or JSON)
override them, for every application under the key `*` and for one
application under `namespace/app`. An empty template turns off
`latency_p99` or `restarts`.

Evidence uses instant queries over the whole window; the detector's series
(`Evidence.points`) use range queries with one point per step.

Values Prometheus cannot compute are missing data, never evidence: `NaN`,
`+Inf` and `-Inf` samples (a 0/0 or x/0 ratio) are treated like absent
samples, an empty result means no data, and only a finite request rate of at
least `min_requests` per window counts as traffic.

Errors, as `ApplicationError` types:

- `PrometheusQueryError`, non-retryable: a 400 or 422 response, which means
  the template or the data is invalid, or a window or name that cannot be
  queried.
- `PrometheusRequestRejected`, non-retryable: other 4xx responses (401, 403,
  404).
- `PrometheusUnavailable`, retryable: 408, 429 and 5xx responses (Prometheus
  returns 503 when a query times out), client timeouts and connection errors.
  Temporal's retry policy decides when to try again.
- `PrometheusBadResponse`, non-retryable: a 200 response that is not a
  Prometheus success envelope, such as a proxy's HTML page.

Every error message keeps the start of the raw body. The `warnings` and
`infos` of a successful response are logged and the data is kept. With
`warnings_block_recovery`, a warning (such as partial data) keeps a
verification interval from counting as healthy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import requests
import yaml
from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
from requests.adapters import BaseAdapter
from temporalio import activity
from temporalio.exceptions import ApplicationError
from urllib3.util.retry import Retry

from activities.signals import (
    SignalActivities,
    _check_thresholds,
    judge_interval,
    with_recent_summary,
)
from remediator.settings import PrometheusSettings, Settings
from workflows.models import (
    DiscoveryQuery,
    Evidence,
    SignalPoint,
    SignalQuery,
    VerifyInput,
    VerifyResult,
)

logger = logging.getLogger(__name__)

SIGNALS = ("request_rate", "error_ratio", "latency_p99", "restarts")
# Signals read with range queries for `Evidence.points`.
RANGE_SIGNALS = ("request_rate", "error_ratio", "latency_p99")
# Without these, every interval would be no traffic or an unknown error ratio.
REQUIRED_SIGNALS = ("request_rate", "error_ratio")
PLACEHOLDERS = ("namespace", "app", "window")
ALL_APPLICATIONS = "*"
MAX_STEPS = 10_000
MAX_BODY_IN_MESSAGE = 500

_SELECTOR = '{namespace="{namespace}",app="{app}"}'
_ERRORS_SELECTOR = '{namespace="{namespace}",app="{app}",code=~"5.."}'
DEFAULT_QUERIES: dict[str, str] = {
    "request_rate": f"sum(rate(http_requests_total{_SELECTOR}[{{window}}]))",
    # `or vector(0)`: an application without any 5xx series has an error
    # ratio of 0, not an empty result. With no requests at all it is 0/0 = NaN.
    "error_ratio": (
        f"(sum(rate(http_requests_total{_ERRORS_SELECTOR}[{{window}}])) "
        f"or vector(0)) / sum(rate(http_requests_total{_SELECTOR}[{{window}}]))"
    ),
    "latency_p99": (
        "histogram_quantile(0.99, sum by (le) "
        f"(rate(http_server_request_duration_seconds_bucket{_SELECTOR}"
        "[{window}])))"
    ),
    "restarts": (
        "sum(increase(kube_pod_container_status_restarts_total"
        '{namespace="{namespace}",pod=~"{app}-.*"}[{window}]))'
    ),
}

# Kubernetes namespace and Service names are DNS-1123 labels. Checking them
# keeps label values from changing the meaning of a PromQL template.
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

Templates = dict[str, str]
QueryOverrides = dict[str, dict[str, str]]


def load_query_overrides(settings: PrometheusSettings) -> QueryOverrides:
    """Load and validate the template overrides of `queries_file` and `queries`.

    Templates in `queries` override those of the file. Raises ValueError for an
    unreadable file, an unknown signal, a template that is not a string or a
    placeholder other than {namespace}, {app} and {window}.
    """
    merged: QueryOverrides = {}
    sources: list[tuple[str, Any]] = []
    if settings.queries_file is not None:
        path = settings.queries_file
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as error:
            raise ValueError(
                f"failed to read REMEDIATOR_PROMETHEUS_QUERIES_FILE {str(path)!r}: "
                f"{error}"
            ) from error
        sources.append((f"queries file {str(path)!r}", loaded or {}))
    sources.append(("REMEDIATOR_PROMETHEUS_QUERIES", settings.queries))
    for where, overrides in sources:
        if not isinstance(overrides, Mapping):
            raise ValueError(
                f"{where} must map '*' or 'namespace/app' to templates, got "
                f"{type(overrides).__name__}"
            )
        for key, templates in overrides.items():
            if not isinstance(templates, Mapping):
                raise ValueError(
                    f"{where}: entry {key!r} must map signal names to PromQL "
                    f"templates, got {type(templates).__name__}"
                )
            _check_key(where, str(key))
            for signal, template in templates.items():
                _check_template(f"{where}: {key} {signal}", str(signal), template)
            merged.setdefault(str(key), {}).update(templates)
    return merged


def _check_key(where: str, key: str) -> None:
    if key == ALL_APPLICATIONS:
        return
    namespace, _, app = key.partition("/")
    if not (_is_label(namespace) and _is_label(app)):
        raise ValueError(
            f"{where}: key {key!r} must be '*' or 'namespace/app' with Kubernetes names"
        )


def _check_template(where: str, signal: str, template: Any) -> None:
    if signal not in SIGNALS:
        raise ValueError(
            f"{where}: unknown signal {signal!r}. Use one of {', '.join(SIGNALS)}"
        )
    if not isinstance(template, str):
        raise ValueError(
            f"{where}: the template must be a string, got {type(template).__name__}"
        )
    if signal in REQUIRED_SIGNALS and not template.strip():
        raise ValueError(
            f"{where}: {signal} cannot be turned off, because without it no "
            "interval can show traffic or an error ratio"
        )
    unknown = sorted(
        {name for name in _PLACEHOLDER.findall(template)} - set(PLACEHOLDERS)
    )
    if unknown:
        raise ValueError(
            f"{where}: unknown placeholders {unknown}. Templates may use only "
            "{namespace}, {app} and {window}"
        )


def templates_for(overrides: QueryOverrides, namespace: str, app: str) -> Templates:
    """Return the templates of one application: built-in, then `*`, then its own."""
    templates = dict(DEFAULT_QUERIES)
    templates.update(overrides.get(ALL_APPLICATIONS, {}))
    templates.update(overrides.get(f"{namespace}/{app}", {}))
    return templates


def render(template: str, namespace: str, app: str, window: str) -> str:
    """Fill the placeholders of a template, leaving PromQL's other braces alone."""
    values = {"namespace": namespace, "app": app, "window": window}
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def prometheus_duration(seconds: float) -> str:
    """Format seconds as a Prometheus duration: `300s`, or `1500ms` for fractions.

    Raises a non-retryable ApplicationError for a duration under 1 ms, which
    Prometheus would reject with `duration must be greater than 0`.
    """
    milliseconds = round(seconds * 1000) if math.isfinite(seconds) else 0
    if milliseconds <= 0:
        raise ApplicationError(
            f"invalid query window {seconds} s: it must be at least 1 ms",
            type="PrometheusQueryError",
            non_retryable=True,
        )
    if milliseconds % 1000 == 0:
        return f"{milliseconds // 1000}s"
    return f"{milliseconds}ms"


def _is_label(value: str) -> bool:
    return len(value) <= 63 and _DNS1123_LABEL.fullmatch(value) is not None


# --- results -------------------------------------------------------------------


def sample_value(raw: Any) -> float | None:
    """Parse one sample value, returning None for NaN, +Inf, -Inf and invalid ones.

    Prometheus sends values as strings because JSON has no NaN or infinity.
    """
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


@dataclass
class QueryResult:
    """Samples of one query, per series as (Unix time, value or None) pairs."""

    query: str
    series: list[list[tuple[float, float | None]]] = field(default_factory=list)
    labels: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    infos: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """True when Prometheus returned no sample at all."""
        return not any(self.series)


def parse_result(query: str, result: Any) -> QueryResult:
    """Parse `data.result` of a vector, matrix or scalar response into samples."""
    parsed = QueryResult(query)
    if (
        isinstance(result, list)
        and len(result) == 2
        and not isinstance(result[0], dict)
    ):
        result = [{"metric": {}, "value": result}]  # a scalar
    if not isinstance(result, list):
        raise _bad_response(
            query, f"data.result is a {type(result).__name__}, not a list"
        )
    for item in result:
        if not isinstance(item, dict):
            raise _bad_response(query, "data.result contains a non-object item")
        pairs = item["values"] if "values" in item else [item.get("value")]
        samples: list[tuple[float, float | None]] = []
        for pair in pairs:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise _bad_response(query, f"invalid sample {pair!r:.80}")
            try:
                timestamp = float(pair[0])
            except (TypeError, ValueError) as error:
                raise _bad_response(
                    query, f"invalid sample time {pair[0]!r:.40}"
                ) from error
            samples.append((timestamp, sample_value(pair[1])))
        parsed.series.append(samples)
        metric = item.get("metric")
        parsed.labels.append(
            {str(k): str(v) for k, v in metric.items()}
            if isinstance(metric, dict)
            else {}
        )
    return parsed


def combine(result: QueryResult, how: Literal["sum", "max"]) -> float | None:
    """Reduce an instant result to one value, ignoring missing samples.

    A template should return one series. When it returns several, rates and
    counts are summed and ratios and latencies take the worst (the maximum).
    """
    values = [v for series in result.series for _, v in series if v is not None]
    if len(result.series) > 1:
        logger.warning(
            "Prometheus query returned %d series where one was expected; using "
            "their %s. Aggregate the template with sum() or max(): %s",
            len(result.series),
            how,
            result.query,
        )
    if not values:
        return None
    return sum(values) if how == "sum" else max(values)


def by_time(result: QueryResult, how: Literal["sum", "max"]) -> dict[float, float]:
    """Reduce a range result to finite values keyed by time."""
    merged: dict[float, list[float]] = {}
    for series in result.series:
        for timestamp, value in series:
            if value is not None:
                merged.setdefault(timestamp, []).append(value)
    return {t: (sum(v) if how == "sum" else max(v)) for t, v in merged.items()}


# --- errors --------------------------------------------------------------------


def _body_text(response: requests.Response | None) -> str:
    if response is None:
        return ""
    text = response.content[:MAX_BODY_IN_MESSAGE].decode("utf-8", errors="replace")
    return " ".join(text.split())


def _envelope(response: requests.Response) -> dict[str, Any] | None:
    try:
        body = json.loads(response.content)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _bad_response(query: str, reason: str, body: str = "") -> ApplicationError:
    message = f"invalid Prometheus response to {query!r}: {reason}"
    if body:
        message += f". Body: {body}"
    return ApplicationError(message, type="PrometheusBadResponse", non_retryable=True)


def classify_error(
    query: str, url: str, response: requests.Response
) -> ApplicationError:
    """Build the ApplicationError for a non-200 response, retryable or not."""
    status = response.status_code
    envelope = _envelope(response)
    if envelope is not None and envelope.get("status") == "error":
        detail = f"{envelope.get('errorType', 'error')}: {envelope.get('error', '')}"
    else:
        content_type = response.headers.get("content-type", "no content type")
        detail = f"non-JSON body ({content_type}): {_body_text(response)}"
    message = f"Prometheus at {url} responded {status} to {query!r}: {detail}"
    if status in (400, 422):
        return ApplicationError(
            message + ". The template or the data is invalid, so a retry cannot help",
            type="PrometheusQueryError",
            non_retryable=True,
        )
    if status in (408, 429) or status >= 500:
        return ApplicationError(message, type="PrometheusUnavailable")
    return ApplicationError(
        message, type="PrometheusRequestRejected", non_retryable=True
    )


# --- client --------------------------------------------------------------------


@dataclass
class _ResponseRecorder:
    """Raw responses of one query, recorded by a requests response hook."""

    responses: list[requests.Response] = field(default_factory=list)

    def record(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self.responses.append(response)

    @property
    def last(self) -> requests.Response | None:
        return self.responses[-1] if self.responses else None


class PrometheusReader:
    """Client of the Prometheus query API, built on prometheus-api-client.

    The library drops `warnings` and `infos` and reports a failed request as a
    string, so every query records its raw response with a requests hook and
    reads both from there. The library's own retries are turned off, so a
    failed query raises at once and the activity's retry policy takes over.

    `adapter` replaces the HTTP transport for every `/api/` URL, for tests.
    """

    def __init__(
        self, settings: PrometheusSettings, *, adapter: BaseAdapter | None = None
    ) -> None:
        self._settings = settings
        self._url = settings.url.rstrip("/")
        self._adapter = adapter

    def _connect(self, call: _ResponseRecorder) -> PrometheusConnect:
        settings = self._settings
        session = requests.Session()
        session.verify = (
            str(settings.ca_file)
            if settings.verify_tls and settings.ca_file is not None
            else settings.verify_tls
        )
        session.hooks["response"].append(call.record)
        headers = {"Accept": "application/json"}
        token = settings.bearer_token
        if token is not None and token.get_secret_value():
            headers["Authorization"] = f"Bearer {token.get_secret_value()}"
        client = PrometheusConnect(
            url=self._url,
            headers=headers,
            disable_ssl=not settings.verify_tls,
            retry=Retry(total=0, raise_on_status=False),
            session=session,
            timeout=settings.timeout_seconds,
        )
        if self._adapter is not None:
            # A longer prefix than the client's own adapter, so this one wins.
            session.mount(f"{self._url}/api/", self._adapter)
        return client

    def instant(self, query: str, at: datetime) -> QueryResult:
        """Evaluate `query` at one time (`/api/v1/query`)."""
        return self._run(
            query,
            lambda client: client.custom_query(
                query, params={"time": f"{at.timestamp():.3f}", **self._server_timeout}
            ),
        )

    def range(
        self, query: str, start: datetime, end: datetime, step_seconds: float
    ) -> QueryResult:
        """Evaluate `query` from `start` to `end` every `step_seconds`."""
        return self._run(
            query,
            lambda client: client.custom_query_range(
                query,
                start_time=start,
                end_time=end,
                step=f"{step_seconds:g}",
                params=self._server_timeout,
            ),
        )

    @property
    def _server_timeout(self) -> dict[str, str]:
        return {"timeout": f"{self._settings.timeout_seconds:g}s"}

    def _run(self, query: str, send: Callable[[PrometheusConnect], Any]) -> QueryResult:
        call = _ResponseRecorder()
        client = self._connect(call)
        try:
            result = send(client)
        except requests.Timeout as error:
            raise ApplicationError(
                f"query {query!r} to Prometheus at {self._url} timed out after "
                f"{self._settings.timeout_seconds:g} s: {error}",
                type="PrometheusUnavailable",
            ) from error
        except requests.ConnectionError as error:
            raise ApplicationError(
                f"failed to connect to Prometheus at {self._url}: {error}",
                type="PrometheusUnavailable",
            ) from error
        except PrometheusApiClientException as error:
            if call.last is None:
                raise ApplicationError(
                    f"Prometheus query {query!r} failed: {error}",
                    type="PrometheusUnavailable",
                ) from error
            raise classify_error(query, self._url, call.last) from error
        except (ValueError, KeyError, TypeError) as error:
            # A 200 response that is not JSON, or JSON without data.result.
            raise _bad_response(
                query, f"{type(error).__name__}: {error}", _body_text(call.last)
            ) from error
        except requests.RequestException as error:
            raise ApplicationError(
                f"failed to read the response of Prometheus at {self._url}: {error}",
                type="PrometheusUnavailable",
            ) from error
        finally:
            client.close()

        envelope = _envelope(call.last) if call.last is not None else None
        if envelope is None or envelope.get("status") != "success":
            raise _bad_response(query, "status is not success", _body_text(call.last))
        parsed = parse_result(query, result)
        parsed.warnings = [str(w) for w in envelope.get("warnings") or []]
        parsed.infos = [str(i) for i in envelope.get("infos") or []]
        if parsed.warnings:
            logger.warning(
                "Prometheus returned warnings for %r (data kept): %s",
                query,
                "; ".join(parsed.warnings),
            )
        if parsed.infos:
            logger.info(
                "Prometheus returned infos for %r: %s", query, "; ".join(parsed.infos)
            )
        return parsed


# --- activities ----------------------------------------------------------------


@dataclass
class Reading:
    """Evidence with the warnings and infos of the queries behind it."""

    evidence: Evidence
    warnings: list[str] = field(default_factory=list)
    infos: list[str] = field(default_factory=list)


class PrometheusSignals:
    """Activities `collect_evidence` and `verify_interval` that query Prometheus.

    `prometheus` defaults to `settings.prometheus`. The query overrides are
    loaded and checked here, so a worker with a bad template fails at start.
    """

    def __init__(
        self,
        settings: Settings,
        prometheus: PrometheusSettings | None = None,
        *,
        adapter: BaseAdapter | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._settings = settings
        self._prometheus = prometheus or settings.prometheus
        self._overrides = load_query_overrides(self._prometheus)
        self._reader = PrometheusReader(self._prometheus, adapter=adapter)
        self._clock = clock

    @activity.defn(name="collect_evidence")
    async def collect_evidence(self, query: SignalQuery) -> Evidence:
        """Read one application's golden signals and their series over the window."""
        reading = await self.read(query, with_points=True)
        if not query.recent_seconds or query.recent_seconds >= query.window_seconds:
            return reading.evidence
        end = query.end or self._clock()
        recent = await self.read(
            query.model_copy(
                update={"window_seconds": query.recent_seconds, "end": end}
            ),
            with_points=False,
        )
        return with_recent_summary(reading.evidence, recent.evidence)

    @activity.defn(name="verify_interval")
    async def verify_interval(self, input: VerifyInput) -> VerifyResult:
        """Judge one verification interval against the thresholds.

        The rules are those of the OTLP backend
        (`activities.signals.judge_interval`), so no data and no traffic are
        never healthy. With `warnings_block_recovery`, an interval whose queries
        returned warnings is not healthy either.
        """
        _check_thresholds(input)
        reading = await self.read(input.query, with_points=False)
        result = judge_interval(reading.evidence, input)
        if (
            result.healthy
            and reading.warnings
            and self._prometheus.warnings_block_recovery
        ):
            result.healthy = False
            result.reason = (
                f"{result.reason}, but Prometheus returned warnings, so the data "
                f"may be partial: {'; '.join(reading.warnings)[:MAX_BODY_IN_MESSAGE]}"
            )
        return result

    @activity.defn(name="discover_applications")
    async def discover_applications(self, query: DiscoveryQuery) -> list[str]:
        """List the applications that `REMEDIATOR_SWEEP_DISCOVERY_QUERY` returns.

        Each series of the query's result names one application through the
        intake's label maps (`REMEDIATOR_INTAKE_NAMESPACE_LABELS` and
        `REMEDIATOR_INTAKE_APP_LABELS`). Series whose labels are missing or are
        not Kubernetes names are skipped with a warning.
        """
        promql = self._settings.sweep.discovery_query.strip()
        if not promql:
            raise ApplicationError(
                "REMEDIATOR_SWEEP_DISCOVERY_QUERY is empty; set it to a PromQL "
                "query whose series carry the namespace and app labels, or turn "
                "discovery off with REMEDIATOR_SWEEP_DISCOVER=false",
                type="PrometheusQueryError",
                non_retryable=True,
            )
        result = await asyncio.to_thread(self._reader.instant, promql, self._clock())
        intake = self._settings.intake
        namespace_labels = [n.strip() for n in intake.namespace_labels.split(",")]
        app_labels = [n.strip() for n in intake.app_labels.split(",")]
        found: set[str] = set()
        for labels in result.labels:
            namespace = next((labels[n] for n in namespace_labels if labels.get(n)), "")
            app = next((labels[n] for n in app_labels if labels.get(n)), "")
            if _is_label(namespace) and _is_label(app):
                found.add(f"{namespace}/{app}")
            else:
                logger.warning(
                    "Discovery series %s names no valid namespace and app; skipped.",
                    json.dumps(labels)[:MAX_BODY_IN_MESSAGE],
                )
        return sorted(found)

    async def read(self, query: SignalQuery, *, with_points: bool) -> Reading:
        """Query every signal of the application, adding range queries for points."""
        if not (_is_label(query.namespace) and _is_label(query.app)):
            raise ApplicationError(
                f"invalid namespace {query.namespace[:80]!r} or app "
                f"{query.app[:80]!r}: both must be Kubernetes names (DNS-1123 labels)",
                type="PrometheusQueryError",
                non_retryable=True,
            )
        end = query.end or self._clock()
        if end.tzinfo is None:
            end = end.replace(tzinfo=UTC)
        window = prometheus_duration(query.window_seconds)
        templates = {
            signal: template
            for signal, template in templates_for(
                self._overrides, query.namespace, query.app
            ).items()
            if template.strip()
        }

        calls: dict[tuple[str, str], Any] = {}
        for signal, template in templates.items():
            promql = render(template, query.namespace, query.app, window)
            calls[("instant", signal)] = asyncio.to_thread(
                self._reader.instant, promql, end
            )
        if with_points:
            start, step, range_window = self._range_of(query, end)
            for signal in RANGE_SIGNALS:
                if signal in templates:
                    promql = render(
                        templates[signal], query.namespace, query.app, range_window
                    )
                    calls[("range", signal)] = asyncio.to_thread(
                        self._reader.range, promql, start, end, step
                    )
        results = dict(zip(calls, await _gather(calls.values()), strict=True))

        evidence = self._evidence(query, results)
        reading = Reading(evidence)
        for result in results.values():
            reading.warnings.extend(result.warnings)
            reading.infos.extend(result.infos)
        return reading

    def _range_of(
        self, query: SignalQuery, end: datetime
    ) -> tuple[datetime, float, str]:
        step = query.step_seconds
        if not (math.isfinite(step) and step > 0):
            raise ApplicationError(
                f"step_seconds must be positive, got {step}",
                type="PrometheusQueryError",
                non_retryable=True,
            )
        steps = math.ceil(query.window_seconds / step - 1e-9)
        if steps > MAX_STEPS:
            raise ApplicationError(
                f"window_seconds / step_seconds gives {steps} steps, more than "
                f"the maximum {MAX_STEPS}. Use a larger step",
                type="PrometheusQueryError",
                non_retryable=True,
            )
        start = end - timedelta(seconds=(steps - 1) * step)
        scrape = self._prometheus.scrape_interval_seconds
        range_window = prometheus_duration(max(step + scrape, 4 * scrape))
        return start, step, range_window

    def _evidence(
        self, query: SignalQuery, results: dict[tuple[str, str], QueryResult]
    ) -> Evidence:
        evidence = Evidence(
            namespace=query.namespace, app=query.app, source="prometheus"
        )
        rate = results.get(("instant", "request_rate"))
        ratio = results.get(("instant", "error_ratio"))
        # A sample, even NaN, shows that the series exist. Only an empty
        # result (or a signal turned off) is no data.
        if (rate is None or rate.empty) and (ratio is None or ratio.empty):
            return evidence
        evidence.has_data = True
        evidence.request_rate = combine(rate, "sum") if rate is not None else None
        requests_in_window = (evidence.request_rate or 0.0) * query.window_seconds
        evidence.no_traffic = (
            evidence.request_rate is None
            or requests_in_window < self._prometheus.min_requests
            or requests_in_window <= 0
        )
        if not evidence.no_traffic and ratio is not None:
            evidence.error_ratio = combine(ratio, "max")
        latency = results.get(("instant", "latency_p99"))
        if latency is not None and not evidence.no_traffic:
            evidence.latency_p99_seconds = combine(latency, "max")
        restarts = results.get(("instant", "restarts"))
        if restarts is not None:
            evidence.restarts = combine(restarts, "sum")
        evidence.points = self._points(query, results)
        return evidence

    def _points(
        self, query: SignalQuery, results: dict[tuple[str, str], QueryResult]
    ) -> list[SignalPoint]:
        rate = results.get(("range", "request_rate"))
        if rate is None:
            return []
        ratio_result = results.get(("range", "error_ratio"))
        latency_result = results.get(("range", "latency_p99"))
        ratios = by_time(ratio_result, "max") if ratio_result is not None else {}
        latencies = by_time(latency_result, "max") if latency_result is not None else {}
        points: list[SignalPoint] = []
        # Steps without a finite request rate are left out, so a gap never
        # reads as zero traffic.
        for timestamp, per_second in sorted(by_time(rate, "sum").items()):
            requests_in_step = per_second * query.step_seconds
            has_traffic = requests_in_step > 0
            ratio = ratios.get(timestamp) if has_traffic else None
            # NOTE: errors is 0.0 when the ratio is unknown, because
            # SignalPoint.errors cannot be None. error_ratio stays None.
            points.append(
                SignalPoint(
                    end=datetime.fromtimestamp(timestamp, UTC),
                    requests=requests_in_step,
                    errors=requests_in_step * ratio if ratio is not None else 0.0,
                    error_ratio=ratio,
                    latency_p99_seconds=latencies.get(timestamp)
                    if has_traffic
                    else None,
                )
            )
        return points


async def _gather(calls: Any) -> list[QueryResult]:
    """Run the queries concurrently and raise the first failure.

    A non-retryable failure wins over a retryable one, because retrying cannot
    fix it.
    """
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, ApplicationError) and result.non_retryable:
            raise result
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def signal_activities_for(settings: Settings) -> SignalActivities | PrometheusSignals:
    """Pick the golden-signal backend named by `REMEDIATOR_SIGNALS_BACKEND`.

    `otlp` (the default) reads the intake's store and `prometheus` queries
    Prometheus. Both objects provide `collect_evidence` and `verify_interval`.
    """
    backend = getattr(settings.signals, "backend", "otlp")
    if backend == "prometheus":
        return PrometheusSignals(settings)
    if backend == "otlp":
        return SignalActivities(settings)
    raise ValueError(
        f"REMEDIATOR_SIGNALS_BACKEND must be otlp or prometheus, got {backend!r}"
    )
