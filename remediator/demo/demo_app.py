"""A simulated HTTP service whose error ratio and latency follow its live image.

`remediator demo` runs one `DemoApplication` per demo app. A background thread
generates synthetic requests and records them on the OpenTelemetry histogram
`http.server.request.duration`, which the real OTLP/HTTP exporter sends to the
intake's receiver. The live image comes from a callable, usually
`ArgoCDStandIn.live_image`, so a bad image pushed through Git raises the error
ratio and the rollback lowers it again.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import requests
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.metrics import Histogram
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

logger = logging.getLogger(__name__)

METRIC_NAME = "http.server.request.duration"

# Bucket boundaries in seconds that the OpenTelemetry HTTP semantic conventions
# advise for http.server.request.duration.
DURATION_BUCKETS_SECONDS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)

# Spread of simulated latency: sigma of the log-normal around the median.
LATENCY_SIGMA = 0.35

# Seconds between two batches of simulated requests.
TICK_SECONDS = 0.05


@dataclass(frozen=True)
class ImageBehaviour:
    """Error ratio and median latency of the service while it runs one image."""

    error_ratio: float = 0.0
    latency_median_seconds: float = 0.05


ImageBehaviourSource = (
    Callable[[str], float | ImageBehaviour] | Mapping[str, float | ImageBehaviour]
)


class DemoApplication:
    """Simulated traffic of one application, exported as OTLP metrics.

    `image_behaviour` maps an image to an error ratio in [0, 1] or an
    `ImageBehaviour`, either as a callable or as a mapping. Images missing from
    a mapping use `default_behaviour`. The outcome of each request is drawn from
    `random.Random(seed)`, so the same seed gives the same sequence of outcomes,
    though the number of requests per export still follows the wall clock.
    """

    def __init__(
        self,
        namespace: str,
        app: str,
        otlp_endpoint: str,
        image_behaviour: ImageBehaviourSource,
        live_image: Callable[[], str],
        *,
        requests_per_second: float = 50.0,
        export_interval_seconds: float = 1.0,
        export_timeout_seconds: float = 5.0,
        seed: int = 0,
        default_behaviour: ImageBehaviour | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if requests_per_second <= 0:
            raise ValueError(
                f"requests_per_second must be positive, got {requests_per_second}"
            )
        if export_interval_seconds <= 0:
            raise ValueError(
                "export_interval_seconds must be positive, "
                f"got {export_interval_seconds}"
            )
        self.namespace = namespace
        self.app = app
        self.otlp_endpoint = otlp_endpoint
        self.requests_per_second = requests_per_second
        self.export_interval_seconds = export_interval_seconds
        self.export_timeout_seconds = export_timeout_seconds
        self._headers = dict(headers or {})
        self._image_behaviour = image_behaviour
        self._live_image = live_image
        self._default = default_behaviour or ImageBehaviour()
        self._random = random.Random(seed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._provider: MeterProvider | None = None
        self._counts_lock = threading.Lock()
        self._requests = 0
        self._errors = 0

    @property
    def requests_sent(self) -> int:
        """Number of simulated requests recorded since `start()`."""
        with self._counts_lock:
            return self._requests

    @property
    def errors_sent(self) -> int:
        """Number of simulated requests that returned status 500."""
        with self._counts_lock:
            return self._errors

    def behaviour_of(self, image: str) -> ImageBehaviour:
        """Look up how the service behaves on `image`."""
        source = self._image_behaviour
        if isinstance(source, Mapping):
            value = source.get(image, self._default)
        else:
            value = source(image)
        if isinstance(value, ImageBehaviour):
            return value
        return ImageBehaviour(
            error_ratio=float(value),
            latency_median_seconds=self._default.latency_median_seconds,
        )

    def start(self) -> None:
        """Create the meter provider and start generating traffic."""
        if self._thread is not None:
            raise RuntimeError(f"demo application {self.app} is already started")
        session = requests.Session()
        # The collector is local, so proxy variables from the environment are ignored.
        session.trust_env = False
        exporter = OTLPMetricExporter(
            endpoint=self.otlp_endpoint,
            timeout=self.export_timeout_seconds,
            headers=self._headers,
            session=session,
        )

        reader = PeriodicExportingMetricReader(
            exporter,
            export_interval_millis=self.export_interval_seconds * 1000,
            export_timeout_millis=self.export_timeout_seconds * 1000,
        )
        resource = Resource.create(
            {"service.name": self.app, "service.namespace": self.namespace}
        )
        self._provider = MeterProvider(resource=resource, metric_readers=[reader])

        meter = self._provider.get_meter("remediator.demo")
        histogram = meter.create_histogram(
            METRIC_NAME,
            unit="s",
            description="Duration of simulated HTTP server requests.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_SECONDS,
        )

        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run,
            args=(histogram,),
            name=f"demo-app-{self.namespace}-{self.app}",
            daemon=True,
        )
        self._thread.start()
        logger.info(
            "Demo application %s/%s started: %.0f requests/s, exporting to %s "
            "every %.2f s",
            self.namespace,
            self.app,
            self.requests_per_second,
            self.otlp_endpoint,
            self.export_interval_seconds,
        )

    def stop(self) -> None:
        """Stop the traffic, export what is recorded and shut the provider down."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self._provider is not None:
            self._provider.force_flush(
                timeout_millis=self.export_timeout_seconds * 1000
            )
            self._provider.shutdown()
            self._provider = None
        logger.info(
            "Demo application %s/%s stopped after %d requests (%d errors)",
            self.namespace,
            self.app,
            self.requests_sent,
            self.errors_sent,
        )

    def _run(self, histogram: Histogram) -> None:
        # Requests are owed at the configured rate, so the fraction carries over.
        owed = 0.0
        last = time.monotonic()
        callback_failed = False
        while not self._stop.wait(TICK_SECONDS):
            now = time.monotonic()
            owed += (now - last) * self.requests_per_second
            last = now
            count = int(owed)
            owed -= count
            try:
                image = self._live_image()
                behaviour = self.behaviour_of(image)
            # The traffic thread must survive a faulty callback: log the first
            # failure of a run and send no requests until the callback recovers.
            except Exception:
                if not callback_failed:
                    logger.exception(
                        "Demo application %s/%s could not read its live image",
                        self.namespace,
                        self.app,
                    )
                callback_failed = True
                continue
            callback_failed = False
            self._record(histogram, behaviour, count)

    def _record(
        self, histogram: Histogram, behaviour: ImageBehaviour, count: int
    ) -> None:
        errors = 0
        for _ in range(count):
            failed = self._random.random() < behaviour.error_ratio
            latency = behaviour.latency_median_seconds * self._random.lognormvariate(
                0.0, LATENCY_SIGMA
            )
            status_code = 500 if failed else 200
            histogram.record(latency, {"http.response.status_code": status_code})
            errors += failed
        with self._counts_lock:
            self._requests += count
            self._errors += errors
