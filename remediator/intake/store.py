"""In-memory store of per-application golden signals, fed by OTLP metrics.

`remediator.intake.otlp` passes every decoded OTLP/HTTP export request to
`GoldenSignalStore.ingest`. The `GET /v1/signals` route calls
`GoldenSignalStore.evidence`, which is how the `collect_evidence` and
`verify_interval` activities read request rate, error ratio and p99 latency.

The store reads one instrument: the HTTP server duration histogram of the
OpenTelemetry semantic conventions (`http.server.request.duration` in seconds,
or the older `http.server.duration` in milliseconds). Its count is the request
count, points with a 5xx `http.response.status_code` are errors, and its
buckets give the latency quantile. Cumulative points are turned into increments
on arrival, so a query only sums increments.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import pairwise

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from remediator.intake.alertmanager import is_dns1123_label
from remediator.settings import SignalSettings
from workflows.models import Evidence, SignalPoint

logger = logging.getLogger(__name__)

REQUEST_DURATION_METRIC = "http.server.request.duration"
LEGACY_DURATION_METRIC = "http.server.duration"
DEFAULT_UNITS = {REQUEST_DURATION_METRIC: "s", LEGACY_DURATION_METRIC: "ms"}
UNIT_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
STATUS_CODE_ATTRIBUTES = ("http.response.status_code", "http.status_code")
ERROR_TYPE_ATTRIBUTE = "error.type"
NAMESPACE_ATTRIBUTES = ("service.namespace", "k8s.namespace.name")
SERVICE_NAME_ATTRIBUTE = "service.name"

LATENCY_QUANTILE = 0.99
MAX_STEPS = 10_000
_NANOS = 1_000_000_000

_CUMULATIVE = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
_DELTA = metrics_pb2.AGGREGATION_TEMPORALITY_DELTA
_NO_RECORDED_VALUE = metrics_pb2.DATA_POINT_FLAGS_NO_RECORDED_VALUE_MASK

AppKey = tuple[str, str]
Bounds = tuple[float, ...]


@dataclass(frozen=True)
class _Sample:
    """One histogram data point, bounds converted to seconds."""

    start_ns: int
    time_ns: int
    count: float
    bounds: Bounds
    bucket_counts: tuple[float, ...]
    is_error: bool


# Returned by `_to_increment` for a point that was rejected, not just skipped.
_REJECTED = _Sample(
    start_ns=0, time_ns=0, count=0.0, bounds=(), bucket_counts=(), is_error=False
)


@dataclass
class _Increment:
    """Requests seen by one application in the interval ending at `time_ns`."""

    time_ns: int
    requests: float = 0.0
    errors: float = 0.0
    histograms: dict[Bounds, list[float]] = field(default_factory=dict)

    def add(self, sample: _Sample) -> None:
        self.requests += sample.count
        if sample.is_error:
            self.errors += sample.count
        if sample.bucket_counts:
            merged = self.histograms.setdefault(
                sample.bounds, [0.0] * len(sample.bucket_counts)
            )
            for index, count in enumerate(sample.bucket_counts):
                merged[index] += count


@dataclass
class _SeriesState:
    """The last cumulative point of one series, to subtract from the next one."""

    sample: _Sample
    seen_ns: int


@dataclass
class _AppSignals:
    times: list[int] = field(default_factory=list)
    increments: list[_Increment] = field(default_factory=list)
    series: dict[tuple, _SeriesState] = field(default_factory=dict)
    # Resource id -> (time_ns of its earliest point, when it was last seen).
    resources: dict[tuple, tuple[int, int]] = field(default_factory=dict)
    capped: bool = False


@dataclass
class IngestResult:
    """Point counts of one export request, whose rejected points become OTLP
    partial success."""

    accepted_points: int = 0
    rejected_points: int = 0
    ignored_points: int = 0
    errors: list[str] = field(default_factory=list)

    def reject(self, points: int, message: str) -> None:
        self.rejected_points += points
        # Keep the first few distinct messages so one bad exporter cannot flood them.
        if message not in self.errors and len(self.errors) < 5:
            self.errors.append(message)


class GoldenSignalStore:
    """Thread-safe golden signals per application `(namespace, app)`.

    Points older than `settings.retention_seconds` are dropped, and each
    application keeps at most `max_points_per_app` increments (oldest dropped
    first) and `max_series_per_app` cumulative series.
    """

    def __init__(
        self,
        settings: SignalSettings | None = None,
        *,
        max_points_per_app: int = 50_000,
        max_series_per_app: int = 10_000,
        max_apps: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        settings = settings or SignalSettings()
        self._retention_ns = int(settings.retention_seconds * _NANOS)
        self._max_points = max_points_per_app
        self._max_series = max_series_per_app
        self._max_apps = max_apps
        self._clock = clock
        self._created_ns = int(clock() * _NANOS)
        self._apps: dict[AppKey, _AppSignals] = {}
        self._lock = threading.Lock()

    # --- ingest ---------------------------------------------------------------

    def ingest(self, request: ExportMetricsServiceRequest) -> IngestResult:
        """Add the HTTP server duration points of one OTLP export request.

        Other metrics are counted as ignored. Points whose resource names no
        valid application, or that are malformed, are counted as rejected.
        """
        result = IngestResult()
        now_ns = int(self._clock() * _NANOS)
        with self._lock:
            for resource_metrics in request.resource_metrics:
                self._ingest_resource(resource_metrics, now_ns, result)
            self._prune(now_ns)
        return result

    def _ingest_resource(
        self,
        resource_metrics: metrics_pb2.ResourceMetrics,
        now_ns: int,
        result: IngestResult,
    ) -> None:
        app_key = application_of(resource_metrics.resource)
        resource_id = _attributes_key(resource_metrics.resource.attributes)
        increments: dict[int, _Increment] = {}
        earliest_ns: int | None = None
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                points = _data_points(metric)
                if metric.name not in DEFAULT_UNITS:
                    result.ignored_points += len(points)
                    continue
                if isinstance(app_key, str):
                    result.reject(len(points), app_key)
                    continue
                signals = self._signals_for(app_key, len(points), result)
                if signals is None:
                    continue
                known = signals.resources.get(resource_id)
                series_prefix = (resource_id, scope_metrics.scope.name, metric.name)
                for sample, temporality, attributes_key in self._samples(
                    metric, result
                ):
                    if earliest_ns is None or sample.time_ns < earliest_ns:
                        earliest_ns = sample.time_ns
                    # A cumulative exporter sends every series in every
                    # export, so a series missing from an earlier export of
                    # the same resource was created after it.
                    series_is_new = known is not None and known[0] < sample.time_ns
                    increment_sample = self._to_increment(
                        signals,
                        (*series_prefix, attributes_key),
                        sample,
                        temporality,
                        series_is_new,
                        now_ns,
                        result,
                    )
                    if increment_sample is _REJECTED:
                        continue
                    result.accepted_points += 1
                    if increment_sample is None:
                        continue
                    increment = increments.setdefault(
                        increment_sample.time_ns, _Increment(increment_sample.time_ns)
                    )
                    increment.add(increment_sample)
        if isinstance(app_key, str) or app_key not in self._apps:
            return
        if earliest_ns is not None:
            signals = self._apps[app_key]
            known = signals.resources.get(resource_id)
            first_ns = earliest_ns if known is None else min(known[0], earliest_ns)
            signals.resources[resource_id] = (first_ns, now_ns)
        if increments:
            self._store_increments(app_key, increments.values(), now_ns)

    def _signals_for(
        self, app_key: AppKey, points: int, result: IngestResult
    ) -> _AppSignals | None:
        signals = self._apps.get(app_key)
        if signals is not None:
            return signals
        if len(self._apps) >= self._max_apps:
            result.reject(
                points,
                f"the signal store already tracks {self._max_apps} applications; "
                f"points of {app_key[0]}/{app_key[1]} were dropped",
            )
            return None
        signals = self._apps[app_key] = _AppSignals()
        return signals

    def _samples(
        self, metric: metrics_pb2.Metric, result: IngestResult
    ) -> Iterable[tuple[_Sample, int, tuple]]:
        unit = metric.unit or DEFAULT_UNITS[metric.name]
        scale = UNIT_SECONDS.get(unit)
        kind = metric.WhichOneof("data")
        points = _data_points(metric)
        if scale is None:
            result.reject(
                len(points),
                f"metric {metric.name} has unsupported unit {unit!r}; "
                f"use one of {', '.join(UNIT_SECONDS)}",
            )
            return
        if kind not in ("histogram", "exponential_histogram"):
            result.reject(
                len(points),
                f"metric {metric.name} must be a histogram, not {kind or 'empty'}",
            )
            return
        temporality = getattr(metric, kind).aggregation_temporality
        if temporality not in (_CUMULATIVE, _DELTA):
            result.reject(
                len(points),
                f"metric {metric.name} has no aggregation temporality",
            )
            return
        for point in points:
            if point.flags & _NO_RECORDED_VALUE:
                result.ignored_points += 1
                continue
            if kind == "histogram":
                sample = _explicit_sample(point, scale)
            else:
                sample = _exponential_sample(point, scale)
            if isinstance(sample, str):
                result.reject(1, f"metric {metric.name}: {sample}")
                continue
            yield sample, temporality, _attributes_key(point.attributes)

    def _to_increment(
        self,
        signals: _AppSignals,
        series_key: tuple,
        sample: _Sample,
        temporality: int,
        series_is_new: bool,
        now_ns: int,
        result: IngestResult,
    ) -> _Sample | None:
        """Return the increment a point adds, None when it adds nothing yet, or
        `_REJECTED` when the series cannot be tracked."""
        if temporality == _DELTA:
            return sample

        state = signals.series.get(series_key)
        if state is None:
            if len(signals.series) >= self._max_series:
                result.reject(
                    1,
                    f"an application may have at most {self._max_series} series; "
                    "drop high-cardinality attributes from the duration histogram",
                )
                return _REJECTED
            signals.series[series_key] = _SeriesState(sample, now_ns)
            # A series that started while this store was running, or that
            # appeared after its resource's first export, has been seen whole,
            # so its first value is all new. Any other series may carry hours
            # of history from before this store started, so its first point
            # is only a baseline.
            if series_is_new:
                return sample
            if sample.start_ns and sample.start_ns >= self._created_ns:
                return sample
            return None

        previous = state.sample
        if sample.time_ns <= previous.time_ns:
            return None  # a repeat or an out-of-order point
        state.sample = sample
        state.seen_ns = now_ns
        if _restarted(previous, sample):
            return sample
        if sample.bounds != previous.bounds:
            return None  # new bucket layout: the next point is the baseline
        return _Sample(
            start_ns=previous.time_ns,
            time_ns=sample.time_ns,
            count=sample.count - previous.count,
            bounds=sample.bounds,
            bucket_counts=tuple(
                now - before
                for now, before in zip(
                    sample.bucket_counts, previous.bucket_counts, strict=False
                )
            ),
            is_error=sample.is_error,
        )

    def _store_increments(
        self, app_key: AppKey, increments: Iterable[_Increment], now_ns: int
    ) -> None:
        signals = self._apps[app_key]
        oldest_ns = now_ns - self._retention_ns
        for increment in increments:
            if increment.time_ns < oldest_ns:
                continue
            index = bisect.bisect_right(signals.times, increment.time_ns)
            signals.times.insert(index, increment.time_ns)
            signals.increments.insert(index, increment)
        excess = len(signals.times) - self._max_points
        if excess > 0:
            del signals.times[:excess]
            del signals.increments[:excess]
            if not signals.capped:
                signals.capped = True
                logger.warning(
                    "The signal store reached %d points for %s/%s and drops the "
                    "oldest ones; raise max_points_per_app or lower "
                    "REMEDIATOR_SIGNALS_RETENTION_SECONDS.",
                    self._max_points,
                    app_key[0],
                    app_key[1],
                )

    def _prune(self, now_ns: int) -> None:
        oldest_ns = now_ns - self._retention_ns
        for app_key in list(self._apps):
            signals = self._apps[app_key]
            cut = bisect.bisect_left(signals.times, oldest_ns)
            if cut:
                del signals.times[:cut]
                del signals.increments[:cut]
            stale = [k for k, s in signals.series.items() if s.seen_ns < oldest_ns]
            for series_key in stale:
                del signals.series[series_key]
            stale_resources = [
                k for k, (_, seen) in signals.resources.items() if seen < oldest_ns
            ]
            for resource_id in stale_resources:
                del signals.resources[resource_id]
            if not signals.times and not signals.series:
                del self._apps[app_key]

    # --- query ----------------------------------------------------------------

    def evidence(
        self,
        namespace: str,
        app: str,
        window_seconds: float,
        step_seconds: float,
        end: datetime | None = None,
    ) -> Evidence:
        """Summarise the window of `window_seconds` ending at `end` (now if None).

        Steps without any point are left out of `points`, so a gap never reads
        as zero traffic. Raises ValueError for a non-positive window or step,
        or more than MAX_STEPS steps.
        """
        if not (math.isfinite(window_seconds) and window_seconds > 0):
            raise ValueError(f"window_seconds must be positive, got {window_seconds}")
        if not (math.isfinite(step_seconds) and step_seconds > 0):
            raise ValueError(f"step_seconds must be positive, got {step_seconds}")
        steps = math.ceil(window_seconds / step_seconds - 1e-9)
        if steps > MAX_STEPS:
            raise ValueError(
                f"window_seconds / step_seconds gives {steps} steps, more than "
                f"{MAX_STEPS}; use a larger step"
            )

        end_ns = _to_nanos(end) if end is not None else int(self._clock() * _NANOS)
        start_ns = end_ns - round(window_seconds * _NANOS)
        step_ns = max(1, round(step_seconds * _NANOS))
        with self._lock:
            self._prune(int(self._clock() * _NANOS))
            signals = self._apps.get((namespace, app))
            if signals is None:
                selected: list[_Increment] = []
            else:
                low = bisect.bisect_right(signals.times, start_ns)
                high = bisect.bisect_right(signals.times, end_ns)
                selected = signals.increments[low:high]
            window = _Increment(end_ns)
            by_step: dict[int, _Increment] = {}
            for increment in selected:
                index = steps - 1 - (end_ns - increment.time_ns) // step_ns
                step_end = end_ns - (steps - 1 - index) * step_ns
                _merge(by_step.setdefault(index, _Increment(step_end)), increment)
                _merge(window, increment)

        evidence = Evidence(namespace=namespace, app=app, source="otlp")
        if not selected:
            return evidence
        evidence.has_data = True
        evidence.no_traffic = window.requests == 0
        evidence.request_rate = window.requests / window_seconds
        evidence.error_ratio = _ratio(window.errors, window.requests)
        evidence.latency_p99_seconds = _window_quantile(window)
        evidence.points = [
            SignalPoint(
                end=_from_nanos(step.time_ns),
                requests=step.requests,
                errors=step.errors,
                error_ratio=_ratio(step.errors, step.requests),
                latency_p99_seconds=_window_quantile(step),
            )
            for _, step in sorted(by_step.items())
        ]
        return evidence

    def applications(self) -> list[AppKey]:
        """List the applications that have points or series in the store."""
        with self._lock:
            return sorted(self._apps)


# --- helpers ---


def application_of(resource: Resource) -> AppKey | str:
    """Return `(namespace, app)` of a resource, or why it has none."""
    attributes = {kv.key: kv.value for kv in resource.attributes}
    namespace = ""
    for name in NAMESPACE_ATTRIBUTES:
        value = attributes.get(name)
        if value is not None and value.string_value:
            namespace = value.string_value
            break
    service = attributes.get(SERVICE_NAME_ATTRIBUTE)
    app = service.string_value if service is not None else ""
    if not namespace:
        return (
            "resource has no service.namespace or k8s.namespace.name attribute; "
            "set OTEL_RESOURCE_ATTRIBUTES=service.namespace=<namespace>"
        )
    if not app:
        return "resource has no service.name attribute; set OTEL_SERVICE_NAME"
    if not is_dns1123_label(namespace):
        return f"resource namespace {namespace[:80]!r} is not a valid Kubernetes name"
    if not is_dns1123_label(app):
        return f"resource service.name {app[:80]!r} is not a valid Kubernetes name"
    return namespace, app


def histogram_quantile(
    quantile: float, histograms: dict[Bounds, list[float]]
) -> float | None:
    """Estimate a quantile from explicit-bucket histograms, in seconds.

    Like Prometheus's `histogram_quantile`, it interpolates linearly inside
    the bucket that contains the rank and returns the highest finite bound when
    the rank falls in the overflow bucket. Histograms with different bounds
    are merged on the union of their bounds, which is an approximation.
    Returns None when the histograms hold no observations or no finite bound.
    """
    merged: dict[float, float] = {}
    for bounds, counts in histograms.items():
        uppers = (*bounds, math.inf)
        for upper, count in zip(uppers, counts, strict=False):
            merged[upper] = merged.get(upper, 0.0) + count
    total = sum(merged.values())
    finite = [upper for upper in merged if not math.isinf(upper)]
    if total <= 0 or not finite:
        return None

    rank = quantile * total
    cumulative = 0.0
    lower = min(0.0, min(finite))
    for upper in sorted(merged):
        count = merged[upper]
        if count > 0 and cumulative + count >= rank:
            if math.isinf(upper):
                return max(finite)
            return lower + (upper - lower) * (rank - cumulative) / count
        cumulative += count
        lower = upper
    return max(finite)


def _window_quantile(increment: _Increment) -> float | None:
    if increment.requests <= 0:
        return None
    return histogram_quantile(LATENCY_QUANTILE, increment.histograms)


def _merge(target: _Increment, source: _Increment) -> None:
    target.requests += source.requests
    target.errors += source.errors
    for bounds, counts in source.histograms.items():
        merged = target.histograms.setdefault(bounds, [0.0] * len(counts))
        for index, count in enumerate(counts):
            merged[index] += count


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


def _restarted(previous: _Sample, sample: _Sample) -> bool:
    """Tell whether a cumulative series was reset between two points."""
    if sample.start_ns and previous.start_ns and sample.start_ns != previous.start_ns:
        return True
    if sample.count < previous.count:
        return True
    if sample.bounds == previous.bounds:
        return any(
            now < before
            for now, before in zip(
                sample.bucket_counts, previous.bucket_counts, strict=False
            )
        )
    return False


def _data_points(metric: metrics_pb2.Metric) -> list:
    kind = metric.WhichOneof("data")
    if kind is None:
        return []
    return list(getattr(metric, kind).data_points)


def _explicit_sample(
    point: metrics_pb2.HistogramDataPoint, scale: float
) -> _Sample | str:
    if point.time_unix_nano == 0:
        return "data point has no time_unix_nano"
    bounds = tuple(bound * scale for bound in point.explicit_bounds)
    if not all(math.isfinite(bound) for bound in bounds):
        return "explicit_bounds must be finite"
    if any(later <= earlier for earlier, later in pairwise(bounds)):
        return "explicit_bounds must be strictly increasing"
    counts = tuple(float(count) for count in point.bucket_counts)
    if counts and len(counts) != len(bounds) + 1:
        return (
            f"bucket_counts has {len(counts)} entries, expected "
            f"len(explicit_bounds) + 1 = {len(bounds) + 1}"
        )
    return _Sample(
        start_ns=point.start_time_unix_nano,
        time_ns=point.time_unix_nano,
        count=float(point.count),
        bounds=bounds if counts else (),
        bucket_counts=counts,
        is_error=_is_error(point.attributes),
    )


def _exponential_sample(
    point: metrics_pb2.ExponentialHistogramDataPoint, scale: float
) -> _Sample | str:
    """Convert an exponential histogram point to explicit buckets.

    Positive bucket `i` covers (base**(offset+i), base**(offset+i+1)] with
    base = 2**(2**-scale). The zero bucket and any negative buckets (not
    possible for a duration) go below the zero threshold.
    """
    if point.time_unix_nano == 0:
        return "data point has no time_unix_nano"
    try:
        base = 2.0 ** (2.0**-point.scale)
        offset = point.positive.offset
        positive = [float(count) for count in point.positive.bucket_counts]
        first_lower = base**offset
        uppers = [base ** (offset + index + 1) for index in range(len(positive))]
    except OverflowError:
        return f"exponential histogram scale {point.scale} is out of range"
    below_zero = float(point.zero_count) + float(sum(point.negative.bucket_counts))
    bounds = [point.zero_threshold]
    counts = [below_zero]
    if positive and first_lower > point.zero_threshold:
        bounds.append(first_lower)
        counts.append(0.0)
    bounds.extend(uppers)
    counts.extend(positive)
    counts.append(0.0)
    seconds = tuple(bound * scale for bound in bounds)
    if not all(math.isfinite(bound) for bound in seconds):
        return "exponential histogram bounds are not finite"
    return _Sample(
        start_ns=point.start_time_unix_nano,
        time_ns=point.time_unix_nano,
        count=float(point.count),
        bounds=seconds,
        bucket_counts=tuple(counts),
        is_error=_is_error(point.attributes),
    )


def _is_error(attributes: Iterable[KeyValue]) -> bool:
    """Tell whether a point counts errors: a 5xx status code, or no status code
    but an `error.type` (the server failed before it sent a response)."""
    values = {kv.key: kv.value for kv in attributes}
    for name in STATUS_CODE_ATTRIBUTES:
        if name in values:
            code = _status_code(values[name])
            return code is not None and 500 <= code <= 599
    return ERROR_TYPE_ATTRIBUTE in values


def _status_code(value: AnyValue) -> int | None:
    kind = value.WhichOneof("value")
    if kind == "int_value":
        return value.int_value
    if kind == "string_value" and value.string_value.isdigit():
        return int(value.string_value)
    return None


def _attributes_key(attributes: Iterable[KeyValue]) -> tuple:
    return tuple(
        sorted(
            (kv.key, kv.value.SerializeToString(deterministic=True))
            for kv in attributes
        )
    )


def _to_nanos(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * _NANOS + delta.microseconds * 1000


def _from_nanos(nanos: int) -> datetime:
    return datetime.fromtimestamp(nanos / _NANOS, tz=UTC)
