"""The Prometheus golden-signal backend against a real Prometheus server.

A test exporter on 127.0.0.1 serves one `/metrics/<app>` page per application,
whose counters grow at set rates, so the expected error ratio and p99 latency
are known exactly. Prometheus (the Debian `prometheus` package) scrapes it every
second into a temporary TSDB.

The real-server tests need the `prometheus` binary. Without it they are skipped
on a workstation and fail when the `CI` environment variable is set, so CI never
passes by skipping them. The tests after them use a requests adapter that
returns canned responses, for responses that a healthy local server does not
send (503, non-JSON bodies, `infos`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import requests
import yaml
from pydantic import SecretStr
from requests.adapters import BaseAdapter
from temporalio.exceptions import ApplicationError

from activities.prometheus import (
    DEFAULT_QUERIES,
    PrometheusSettings,
    PrometheusSignals,
    load_query_overrides,
    prometheus_duration,
    render,
    signal_activities_for,
    templates_for,
)
from activities.signals import SignalActivities
from remediator.settings import Settings
from workflows.models import DiscoveryQuery, SignalQuery, VerifyInput

INSTALL_HINT = (
    "apt-get update && apt-get install -y --no-install-recommends "
    "prometheus prometheus-alertmanager"
)
NAMESPACE = "shop"
BUCKETS = (0.1, 0.5, 1.0)
# Share of requests per bucket: <= 0.1 s, <= 0.5 s, <= 1 s, above 1 s.
FAST_PROFILE = (0.90, 0.05, 0.05, 0.0)
READY_TIMEOUT = 30.0


# --- binaries and processes ------------------------------------------------------


def require_binary(name: str) -> str:
    """Return the path of a server binary, failing under CI and skipping elsewhere."""
    path = shutil.which(name)
    if path:
        return path
    message = f"the {name!r} binary is not on PATH. Install it with: {INSTALL_HINT}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so this test may not be skipped)")
    pytest.skip(message)


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    """A server started by a test, with its log file for failure messages."""

    name: str
    process: subprocess.Popen
    log: Path
    url: str

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, path: str, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}:\n"
                    f"{self.log_tail()}"
                )
            try:
                if httpx.get(self.url + path, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(
            f"{self.name} was not ready after {timeout:g} s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_server(
    name: str, binary: str, args: list[str], port: int, ready_path: str, work: Path
) -> ServerProcess:
    """Start a server binary listening on 127.0.0.1:`port` and wait until ready."""
    log = work / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, *args], stdout=out, stderr=subprocess.STDOUT, cwd=work
        )
    server = ServerProcess(name, process, log, f"http://127.0.0.1:{port}")
    try:
        server.wait_ready(ready_path)
    except BaseException:
        server.stop()
        raise
    return server


def start_prometheus(
    work: Path, config: dict, rules: dict | None = None
) -> ServerProcess:
    """Start Prometheus with `config` (and rule groups) on a fresh TSDB."""
    binary = require_binary("prometheus")
    if rules is not None:
        (work / "rules.yml").write_text(yaml.safe_dump(rules))
        config = {**config, "rule_files": [str(work / "rules.yml")]}
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    return start_server(
        "prometheus",
        binary,
        [
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--rules.alert.resend-delay=1s",
            "--log.level=warn",
        ],
        port,
        "/-/ready",
        work,
    )


def scrape_config(exporter_port: int, apps: list[str]) -> dict:
    """One scrape job per application, labelled with its namespace and app."""
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": app,
                "metrics_path": f"/metrics/{app}",
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{exporter_port}"],
                        "labels": {"namespace": NAMESPACE, "app": app},
                    }
                ],
            }
            for app in apps
        ],
    }


def instant_query(url: str, query: str) -> list:
    response = httpx.get(f"{url}/api/v1/query", params={"query": query}, timeout=5)
    response.raise_for_status()
    return response.json()["data"]["result"]


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, log: Callable[[], str]
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{log()}")


# --- the test exporter ----------------------------------------------------------


@dataclass
class AppTraffic:
    """Counters of one application that grow linearly at set rates.

    Each value is `base + rate * (now - since)`. Changing the rates first folds
    the growth so far into the base, so counters never go down.
    """

    ok_rate: float = 0.0
    error_rate: float = 0.0
    profile: tuple[float, ...] = FAST_PROFILE
    base: dict[str, float] = field(default_factory=dict)
    since: float = field(default_factory=time.time)

    def rates(self) -> dict[str, float]:
        total = self.ok_rate + self.error_rate
        rates = {'http_requests_total{code="200"}': self.ok_rate}
        rates['http_requests_total{code="500"}'] = self.error_rate
        cumulative = 0.0
        for bound, share in zip((*BUCKETS, math.inf), self.profile, strict=True):
            cumulative += share
            le = "+Inf" if math.isinf(bound) else f"{bound:g}"
            rates[f'http_server_request_duration_seconds_bucket{{le="{le}"}}'] = (
                total * cumulative
            )
        rates["http_server_request_duration_seconds_count"] = total
        rates["http_server_request_duration_seconds_sum"] = total * 0.05
        return rates

    def values(self, now: float) -> dict[str, float]:
        return {
            name: self.base.get(name, 100.0) + rate * (now - self.since)
            for name, rate in self.rates().items()
        }

    def set(self, ok_rate: float, error_rate: float, now: float) -> None:
        self.base = self.values(now)
        self.since = now
        self.ok_rate = ok_rate
        self.error_rate = error_rate

    def render(self, now: float) -> str:
        lines = [
            "# HELP http_requests_total Requests served, by status code.",
            "# TYPE http_requests_total counter",
            "# HELP http_server_request_duration_seconds Request duration.",
            "# TYPE http_server_request_duration_seconds histogram",
        ]
        lines += [f"{name} {value:.6f}" for name, value in self.values(now).items()]
        return "\n".join(lines) + "\n"


class Exporter:
    """An HTTP server on 127.0.0.1 serving `/metrics/<app>` in text format."""

    def __init__(self) -> None:
        self.apps: dict[str, AppTraffic] = {}
        self.lock = threading.Lock()
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                app = self.path.removeprefix("/metrics/")
                with exporter.lock:
                    traffic = exporter.apps.get(app)
                    body = traffic.render(time.time()).encode() if traffic else b""
                if traffic is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add(self, app: str, ok_rate: float, error_rate: float) -> None:
        with self.lock:
            self.apps[app] = AppTraffic(ok_rate=ok_rate, error_rate=error_rate)

    def set(self, app: str, ok_rate: float, error_rate: float) -> None:
        with self.lock:
            self.apps[app].set(ok_rate, error_rate, time.time())

    def __enter__(self) -> Exporter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


# --- real Prometheus --------------------------------------------------------------

# cart: 45 ok and 5 failed requests per second, so the error ratio is 0.1 and the
# p99 lies in the (0.5, 1] bucket: 0.5 + 0.5 * (0.99 - 0.95) / 0.05 = 0.9 s.
CART_ERROR_RATIO = 0.1
CART_P99 = 0.9
WINDOW_SECONDS = 8.0


@dataclass
class Stack:
    prometheus: ServerProcess
    exporter: Exporter
    overrides: dict[str, dict[str, str]]

    def signals(self, **settings: object) -> PrometheusSignals:
        prometheus = PrometheusSettings(
            url=self.prometheus.url,
            timeout_seconds=5,
            scrape_interval_seconds=1,
            queries=self.overrides,
            **settings,
        )
        return PrometheusSignals(Settings(), prometheus)


BROKEN_TEMPLATE = 'sum(rate(http_requests_total{app="{app}"[{window}]))'
# The right side has one series per code under the empty match group.
MANY_TO_MANY = "vector(1) / on() http_requests_total"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with tempfile.TemporaryDirectory(prefix="prometheus-") as tmp, Exporter() as exp:
        exp.add("cart", ok_rate=45.0, error_rate=5.0)
        exp.add("idle", ok_rate=0.0, error_rate=0.0)
        exp.add("broken", ok_rate=10.0, error_rate=0.0)
        exp.add("joined", ok_rate=10.0, error_rate=1.0)
        config = scrape_config(exp.port, list(exp.apps))
        server = start_prometheus(Path(tmp), config)
        try:
            # Wait until the samples cover the whole evidence window, so that
            # rate() extrapolates to its edges and the request rate is exact.
            wanted = int(WINDOW_SECONDS) + 2
            wait_until(
                lambda: all(
                    instant_query(
                        server.url,
                        f'count_over_time(up{{app="{app}"}}[1m]) >= {wanted}',
                    )
                    for app in exp.apps
                ),
                READY_TIMEOUT,
                f"{wanted} scrapes of every application",
                server.log_tail,
            )
            overrides = {
                f"{NAMESPACE}/broken": {"error_ratio": BROKEN_TEMPLATE},
                f"{NAMESPACE}/joined": {"error_ratio": MANY_TO_MANY},
            }
            yield Stack(server, exp, overrides)
        finally:
            server.stop()


def query(app: str, window: float = WINDOW_SECONDS, step: float = 2.0) -> SignalQuery:
    return SignalQuery(
        namespace=NAMESPACE, app=app, window_seconds=window, step_seconds=step
    )


async def test_error_ratio_and_p99_are_computed_right(stack: Stack) -> None:
    evidence = await stack.signals().collect_evidence(query("cart"))

    assert evidence.source == "prometheus"
    assert evidence.has_data and not evidence.no_traffic
    assert evidence.error_ratio == pytest.approx(CART_ERROR_RATIO, rel=1e-6)
    assert evidence.latency_p99_seconds == pytest.approx(CART_P99, rel=1e-6)
    assert evidence.request_rate == pytest.approx(50.0, rel=0.05)
    assert evidence.restarts is None  # no kube-state-metrics here

    assert evidence.points, "range queries returned no points"
    for point in evidence.points:
        assert point.requests > 0
        assert point.error_ratio == pytest.approx(CART_ERROR_RATIO, rel=1e-6)
        assert point.errors == pytest.approx(point.requests * CART_ERROR_RATIO)
        assert point.latency_p99_seconds == pytest.approx(CART_P99, rel=1e-6)
    ends = [point.end for point in evidence.points]
    assert ends == sorted(ends)


async def test_verify_judges_the_real_ratio(stack: Stack) -> None:
    signals = stack.signals()
    healthy = await signals.verify_interval(
        VerifyInput(query=query("cart"), max_error_ratio=0.2)
    )
    assert healthy.healthy, healthy.reason
    assert healthy.error_ratio == pytest.approx(CART_ERROR_RATIO, rel=1e-6)

    failing = await signals.verify_interval(
        VerifyInput(
            query=query("cart"), max_error_ratio=0.2, max_latency_p99_seconds=0.5
        )
    )
    assert not failing.healthy
    assert "p99 latency" in failing.reason


async def test_no_traffic_nan_is_never_healthy(stack: Stack) -> None:
    # The series exist but do not grow, so the error ratio is 0/0, for which
    # Prometheus returns "NaN".
    promql = render(DEFAULT_QUERIES["error_ratio"], NAMESPACE, "idle", "8s")
    assert instant_query(stack.prometheus.url, promql)[0]["value"][1] == "NaN"

    signals = stack.signals()
    evidence = await signals.collect_evidence(query("idle"))
    assert evidence.has_data and evidence.no_traffic
    assert evidence.error_ratio is None
    assert evidence.latency_p99_seconds is None
    assert all(p.error_ratio is None and p.requests == 0 for p in evidence.points)

    result = await signals.verify_interval(
        VerifyInput(query=query("idle"), max_error_ratio=0.5)
    )
    assert not result.healthy
    assert result.no_traffic


async def test_empty_result_is_no_data(stack: Stack) -> None:
    signals = stack.signals()
    evidence = await signals.collect_evidence(query("ghost"))
    assert not evidence.has_data
    assert evidence.points == []
    assert evidence.request_rate is None
    assert evidence.error_ratio is None

    result = await signals.verify_interval(
        VerifyInput(query=query("ghost"), max_error_ratio=0.5)
    )
    assert not result.healthy
    assert result.no_data


async def test_discovery_lists_applications_from_labels(stack: Stack) -> None:
    found = await stack.signals().discover_applications(DiscoveryQuery())
    assert found == [f"{NAMESPACE}/{app}" for app in sorted(stack.exporter.apps)]


async def test_discovery_skips_series_without_names(stack: Stack) -> None:
    settings = Settings()
    settings.sweep.discovery_query = 'label_replace(up, "app", "Not_A_Name", "", "")'
    prometheus = PrometheusSettings(url=stack.prometheus.url, timeout_seconds=5)
    found = await PrometheusSignals(settings, prometheus).discover_applications(
        DiscoveryQuery()
    )
    assert found == []


async def test_empty_discovery_query_names_the_setting(stack: Stack) -> None:
    settings = Settings()
    settings.sweep.discovery_query = " "
    signals = PrometheusSignals(settings, PrometheusSettings(url=stack.prometheus.url))
    with pytest.raises(ApplicationError, match="REMEDIATOR_SWEEP_DISCOVERY_QUERY"):
        await signals.discover_applications(DiscoveryQuery())


async def test_bad_data_query_is_not_retryable(stack: Stack) -> None:
    with pytest.raises(ApplicationError) as raised:
        await stack.signals().collect_evidence(query("broken"))
    error = raised.value
    assert error.non_retryable
    assert error.type == "PrometheusQueryError"
    assert "400" in error.message
    assert "bad_data" in error.message


async def test_execution_error_is_not_retryable(stack: Stack) -> None:
    with pytest.raises(ApplicationError) as raised:
        await stack.signals().collect_evidence(query("joined"))
    error = raised.value
    assert error.non_retryable
    assert error.type == "PrometheusQueryError"
    assert "422" in error.message
    assert "execution" in error.message


async def test_unreachable_server_is_retryable() -> None:
    signals = PrometheusSignals(
        Settings(), PrometheusSettings(url=f"http://127.0.0.1:{free_port()}")
    )
    with pytest.raises(ApplicationError) as raised:
        await signals.collect_evidence(query("cart"))
    assert not raised.value.non_retryable
    assert raised.value.type == "PrometheusUnavailable"


# --- canned responses ---------------------------------------------------------------


@dataclass
class Canned:
    status: int
    body: str
    content_type: str = "application/json"


def success(value: str | list, warnings=None, infos=None) -> Canned:
    """Build a vector response with one series, or a matrix if `value` is a list."""
    if isinstance(value, list):
        result = {"resultType": "matrix", "result": [{"metric": {}, "values": value}]}
    else:
        result = {
            "resultType": "vector",
            "result": [{"metric": {}, "value": [1435781451.781, value]}],
        }
    body: dict = {"status": "success", "data": result}
    if warnings:
        body["warnings"] = warnings
    if infos:
        body["infos"] = infos
    return Canned(200, json.dumps(body))


EMPTY = Canned(200, '{"status":"success","data":{"resultType":"vector","result":[]}}')


def signal_of(promql: str) -> str:
    if "histogram_quantile" in promql:
        return "latency_p99"
    if "restarts" in promql:
        return "restarts"
    if "5.." in promql:
        return "error_ratio"
    return "request_rate"


class CannedAdapter(BaseAdapter):
    """Transport adapter that returns canned Prometheus responses, with no network.

    `answers` maps a signal, or a `(kind, signal)` pair with kind `query` or
    `query_range`, to a Canned response or to an exception to raise.
    """

    def __init__(self, answers: dict) -> None:
        super().__init__()
        self.answers = answers
        self.requests: list[requests.PreparedRequest] = []

    def send(
        self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None
    ):
        self.requests.append(request)
        parts = urlsplit(request.url)
        kind = parts.path.rsplit("/", 1)[-1]
        signal = signal_of(parse_qs(parts.query)["query"][0])
        answer = self.answers.get((kind, signal), self.answers.get(signal, EMPTY))
        if isinstance(answer, BaseException):
            raise answer
        response = requests.Response()
        response.status_code = answer.status
        response.headers["Content-Type"] = answer.content_type
        response._content = answer.body.encode()
        response.url = request.url
        response.request = request
        response.reason = "canned"
        return response

    def close(self) -> None:
        pass


def canned(
    answers: dict, **settings: object
) -> tuple[PrometheusSignals, CannedAdapter]:
    adapter = CannedAdapter(answers)
    prometheus = PrometheusSettings(url="http://127.0.0.1:9", **settings)
    return PrometheusSignals(Settings(), prometheus, adapter=adapter), adapter


TRAFFIC = {"request_rate": success("10"), "error_ratio": success("0.01")}
END = datetime(2025, 1, 1, tzinfo=UTC)
CANNED_QUERY = SignalQuery(
    namespace=NAMESPACE, app="cart", window_seconds=300, step_seconds=15, end=END
)


# Error bodies in the shapes Prometheus sends, with text written for these tests.
EXECUTION_422 = Canned(
    422,
    json.dumps(
        {
            "status": "error",
            "errorType": "execution",
            "error": 'found duplicate series for the match group {pod="cart-1"} on '
            "the right hand-side of the operation; many-to-many matching not allowed",
        }
    ),
)
TIMEOUT_503 = Canned(
    503,
    '{"status":"error","errorType":"timeout","error":"query timed out in '
    'expression evaluation"}',
)
TEXT_400 = Canned(
    400,
    '1:12: parse error: unexpected identifier "oops" in label matching',
    "text/plain; charset=utf-8",
)
PROXY_502 = Canned(502, "<html><body>Bad Gateway</body></html>", "text/html")


async def test_422_execution_error_is_not_retryable() -> None:
    signals, _ = canned({**TRAFFIC, "error_ratio": EXECUTION_422})
    with pytest.raises(ApplicationError) as raised:
        await signals.collect_evidence(CANNED_QUERY)
    assert raised.value.non_retryable
    assert raised.value.type == "PrometheusQueryError"
    assert "many-to-many matching not allowed" in raised.value.message


async def test_503_timeout_is_retryable() -> None:
    signals, _ = canned({**TRAFFIC, "latency_p99": TIMEOUT_503})
    with pytest.raises(ApplicationError) as raised:
        await signals.verify_interval(
            VerifyInput(query=CANNED_QUERY, max_error_ratio=0.05)
        )
    assert not raised.value.non_retryable
    assert raised.value.type == "PrometheusUnavailable"
    assert "query timed out" in raised.value.message


async def test_permanent_error_wins_over_retryable() -> None:
    signals, _ = canned(
        {**TRAFFIC, "latency_p99": TIMEOUT_503, "error_ratio": EXECUTION_422}
    )
    with pytest.raises(ApplicationError) as raised:
        await signals.collect_evidence(CANNED_QUERY)
    assert raised.value.non_retryable


async def test_client_timeout_is_retryable() -> None:
    signals, _ = canned({**TRAFFIC, "request_rate": requests.ReadTimeout("slow")})
    with pytest.raises(ApplicationError) as raised:
        await signals.collect_evidence(CANNED_QUERY)
    assert not raised.value.non_retryable
    assert raised.value.type == "PrometheusUnavailable"


async def test_non_json_error_body_keeps_the_raw_text() -> None:
    signals, _ = canned({**TRAFFIC, "error_ratio": TEXT_400})
    with pytest.raises(ApplicationError) as raised:
        await signals.collect_evidence(CANNED_QUERY)
    assert raised.value.non_retryable
    assert "non-JSON body (text/plain" in raised.value.message
    assert 'unexpected identifier "oops"' in raised.value.message


async def test_html_from_a_proxy_is_retryable() -> None:
    signals, _ = canned({**TRAFFIC, "request_rate": PROXY_502})
    with pytest.raises(ApplicationError) as raised:
        await signals.collect_evidence(CANNED_QUERY)
    assert not raised.value.non_retryable
    assert "Bad Gateway" in raised.value.message


async def test_non_json_success_body_is_a_bad_response() -> None:
    login_page = Canned(200, "<html>Sign in</html>", "text/html")
    signals, _ = canned({**TRAFFIC, "request_rate": login_page})
    with pytest.raises(ApplicationError) as raised:
        await signals.collect_evidence(CANNED_QUERY)
    assert raised.value.non_retryable
    assert raised.value.type == "PrometheusBadResponse"
    assert "Sign in" in raised.value.message


async def test_infos_are_logged_and_the_data_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    info = (
        "PromQL info: metric might not be a counter, name does not end in "
        '_total/_sum/_count/_bucket: "cart_request"'
    )
    signals, _ = canned({**TRAFFIC, "error_ratio": success("0.25", infos=[info])})
    with caplog.at_level(logging.INFO, logger="activities.prometheus"):
        result = await signals.verify_interval(
            VerifyInput(query=CANNED_QUERY, max_error_ratio=0.5)
        )
    assert result.healthy, result.reason
    assert result.error_ratio == 0.25
    assert info in caplog.text


async def test_warnings_keep_the_data_but_block_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    warning = "partial response: store 127.0.0.1:10901 did not answer"
    answers = {**TRAFFIC, "error_ratio": success("0.01", warnings=[warning])}
    signals, _ = canned(answers)
    with caplog.at_level(logging.WARNING, logger="activities.prometheus"):
        evidence = await signals.collect_evidence(CANNED_QUERY)
        result = await signals.verify_interval(
            VerifyInput(query=CANNED_QUERY, max_error_ratio=0.05)
        )
    assert evidence.error_ratio == 0.01
    assert not result.healthy
    assert "partial" in result.reason
    assert warning in caplog.text

    lenient, _ = canned(answers, warnings_block_recovery=False)
    result = await lenient.verify_interval(
        VerifyInput(query=CANNED_QUERY, max_error_ratio=0.05)
    )
    assert result.healthy


@pytest.mark.parametrize("special", ["NaN", "+Inf", "-Inf"])
async def test_special_values_are_missing_data(special: str) -> None:
    # The error ratio is NaN or infinite (x/0) while requests were counted.
    signals, _ = canned({**TRAFFIC, "error_ratio": success(special)})
    evidence = await signals.collect_evidence(CANNED_QUERY)
    assert evidence.has_data and evidence.error_ratio is None
    result = await signals.verify_interval(
        VerifyInput(query=CANNED_QUERY, max_error_ratio=0.05)
    )
    assert not result.healthy

    # A NaN or infinite request rate is no proof of traffic.
    signals, _ = canned({**TRAFFIC, "request_rate": success(special)})
    evidence = await signals.collect_evidence(CANNED_QUERY)
    assert evidence.no_traffic and evidence.request_rate is None
    result = await signals.verify_interval(
        VerifyInput(query=CANNED_QUERY, max_error_ratio=0.05)
    )
    assert not result.healthy
    assert result.no_traffic


async def test_range_gaps_are_left_out_of_the_points() -> None:
    rates = [[1695022662, "2"], [1695022677, "NaN"], [1695022692, "4"]]
    ratios = [[1695022662, "0.0007628829906666"], [1695022692, "+Inf"]]
    signals, _ = canned(
        {
            **TRAFFIC,
            ("query_range", "request_rate"): success(rates),
            ("query_range", "error_ratio"): success(ratios),
        }
    )
    evidence = await signals.collect_evidence(CANNED_QUERY)
    assert [p.end.timestamp() for p in evidence.points] == [1695022662, 1695022692]
    first, second = evidence.points
    assert first.requests == 2 * 15
    assert first.error_ratio == pytest.approx(0.0007628829906666)
    assert second.error_ratio is None
    assert second.errors == 0.0


async def test_few_requests_are_no_traffic() -> None:
    # 0.001 requests per second over 300 s is 0.3 requests: not traffic.
    signals, _ = canned({**TRAFFIC, "request_rate": success("0.001")})
    evidence = await signals.collect_evidence(CANNED_QUERY)
    assert evidence.no_traffic and evidence.error_ratio is None


async def test_requests_carry_token_window_and_server_timeout() -> None:
    signals, adapter = canned(
        TRAFFIC, bearer_token=SecretStr("s3cret"), timeout_seconds=7
    )
    await signals.collect_evidence(CANNED_QUERY)
    assert adapter.requests
    for sent in adapter.requests:
        assert sent.headers["Authorization"] == "Bearer s3cret"
        params = parse_qs(urlsplit(sent.url).query)
        assert params["timeout"] == ["7s"]
    instant = [r for r in adapter.requests if r.url.split("?")[0].endswith("/query")]
    promql = [parse_qs(urlsplit(r.url).query)["query"][0] for r in instant]
    assert any('namespace="shop",app="cart"' in q and "[300s]" in q for q in promql)
    times = {parse_qs(urlsplit(r.url).query)["time"][0] for r in instant}
    assert times == {f"{END.timestamp():.3f}"}


async def test_zero_window_is_rejected_before_querying() -> None:
    # Prometheus rejects `[0s]` with "duration must be greater than 0".
    signals, adapter = canned(TRAFFIC)
    bad = CANNED_QUERY.model_copy(update={"window_seconds": 0.0})
    with pytest.raises(ApplicationError) as raised:
        await signals.collect_evidence(bad)
    assert raised.value.non_retryable
    assert raised.value.type == "PrometheusQueryError"
    assert adapter.requests == []


async def test_invalid_names_never_reach_a_query() -> None:
    signals, adapter = canned(TRAFFIC)
    bad = CANNED_QUERY.model_copy(update={"app": 'cart"} or vector(1) #'})
    with pytest.raises(ApplicationError) as raised:
        await signals.collect_evidence(bad)
    assert raised.value.non_retryable
    assert adapter.requests == []


# --- templates and settings ----------------------------------------------------


def test_overrides_from_env_json_and_yaml_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    queries_file = tmp_path / "queries.yaml"
    queries_file.write_text(
        yaml.safe_dump(
            {
                "*": {"restarts": ""},
                "shop/cart": {"latency_p99": "file p99 {app} {window}"},
            }
        )
    )
    monkeypatch.setenv(
        "REMEDIATOR_PROMETHEUS_QUERIES",
        json.dumps({"shop/cart": {"error_ratio": "env ratio {namespace}"}}),
    )
    monkeypatch.setenv("REMEDIATOR_PROMETHEUS_QUERIES_FILE", str(queries_file))
    overrides = load_query_overrides(PrometheusSettings())

    cart = templates_for(overrides, "shop", "cart")
    assert cart["error_ratio"] == "env ratio {namespace}"
    assert cart["latency_p99"] == "file p99 {app} {window}"
    assert cart["restarts"] == ""
    assert cart["request_rate"] == DEFAULT_QUERIES["request_rate"]
    other = templates_for(overrides, "shop", "other")
    assert other["error_ratio"] == DEFAULT_QUERIES["error_ratio"]


@pytest.mark.parametrize(
    ("queries", "message"),
    [
        ({"*": {"errors": "x"}}, "unknown signal"),
        ({"*": {"error_ratio": "rate(x[{range}])"}}, "unknown placeholders"),
        ({"Shop/Cart": {"error_ratio": "x"}}, "namespace/app"),
        ({"*": {"request_rate": " "}}, "cannot be turned off"),
    ],
)
def test_bad_overrides_fail_at_start(queries: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PrometheusSignals(Settings(), PrometheusSettings(queries=queries))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- error_ratio: x\n", "must map '\\*' or 'namespace/app'"),
        ("'*': x\n", "must map signal names"),
        ("'*': {error_ratio: [unclosed\n", "failed to read"),
    ],
)
def test_bad_queries_file_fails_at_start(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "queries.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        PrometheusSignals(Settings(), PrometheusSettings(queries_file=path))
    with pytest.raises(ValueError, match="failed to read"):
        PrometheusSignals(
            Settings(), PrometheusSettings(queries_file=tmp_path / "missing.yaml")
        )


def test_render_keeps_promql_braces() -> None:
    promql = render(DEFAULT_QUERIES["latency_p99"], "shop", "cart", "5m")
    assert 'bucket{namespace="shop",app="cart"}[5m]' in promql
    assert prometheus_duration(300) == "300s"
    assert prometheus_duration(1.5) == "1500ms"


def test_backend_is_chosen_by_setting() -> None:
    def with_backend(backend: str) -> Settings:
        # SignalSettings has no `backend` field yet, so a namespace replaces the group.
        return Settings().model_copy(
            update={"signals": SimpleNamespace(backend=backend)}
        )

    assert isinstance(signal_activities_for(Settings()), SignalActivities)
    assert isinstance(signal_activities_for(with_backend("otlp")), SignalActivities)
    assert isinstance(
        signal_activities_for(with_backend("prometheus")), PrometheusSignals
    )
    with pytest.raises(ValueError, match="otlp or prometheus"):
        signal_activities_for(with_backend("graphite"))
