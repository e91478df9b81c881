"""Tests of `remediator config check` against local fakes on 127.0.0.1.

One `http.server` fake plays the intake, Prometheus, OPA, Argo CD, the
GitHub and GitLab APIs and the Kubernetes API, each on its own free port. The
Temporal row uses the session's dev server, the Git rows temporary bare
repositories.
"""

from __future__ import annotations

import argparse
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kubernetes import client as k8s
from pydantic import SecretStr

from remediator.cli import build_parser
from remediator.config_check import (
    FAILED,
    OK,
    SKIPPED,
    CheckRow,
    run_checks,
    run_config_check,
)
from remediator.demo.seed import seed_repository
from remediator.devserver import free_port
from remediator.settings import (
    ArgoCDSettings,
    GitSettings,
    IntakeSettings,
    PolicySettings,
    PrometheusSettings,
    Settings,
    SignalSettings,
    TemporalSettings,
)

TOKEN = "tok-3f9a1c77e0"
OTHER_TOKEN = "tok-b82d5510aa"
DECISION = {"allow": True, "action": "rollback", "reasons": ["sample"]}

Route = tuple[int, object]


@dataclass
class Fake:
    """A JSON HTTP server that sends the responses in `routes` (path: status, body)."""

    routes: dict[str, Route]
    delay_seconds: float = 0.0
    seen: list[tuple[str, str, str]] = field(default_factory=list)
    url: str = ""


def _handler(fake: Fake) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            path = self.path
            fake.seen.append(
                (self.command, path, self.headers.get("Authorization", ""))
            )
            if fake.delay_seconds:
                time.sleep(fake.delay_seconds)
            route = fake.routes.get(path.split("?", 1)[0])
            status, body = route if route is not None else (404, {"error": "none"})
            data = json.dumps(body).encode() if not isinstance(body, bytes) else body
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - the http.server interface
            self._answer()

        def do_POST(self) -> None:  # noqa: N802 - the http.server interface
            length = int(self.headers.get("Content-Length", "0"))
            self.rfile.read(length)
            self._answer()

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def serve() -> Iterator[Callable[..., Fake]]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(routes: dict[str, Route], delay_seconds: float = 0.0) -> Fake:
        fake = Fake(routes, delay_seconds)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        fake.url = f"http://127.0.0.1:{server.server_address[1]}"
        return fake

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def bare_repo(tmp_path: Path) -> Path:
    seed = seed_repository(
        tmp_path / "gitops.git", "plain", "shop", "cart", "registry.example.test/c:1"
    )
    return seed.bare_path


def _settings(**groups: object) -> Settings:
    defaults = {
        "temporal": TemporalSettings(address=f"127.0.0.1:{free_port()}"),
        "intake": IntakeSettings(url=f"http://127.0.0.1:{free_port()}"),
        "signals": SignalSettings(backend="otlp"),
        "prometheus": PrometheusSettings(),
        "policy": PolicySettings(),
        "git": GitSettings(provider="local", repo_url=""),
        "argocd": ArgoCDSettings(url=f"http://127.0.0.1:{free_port()}"),
    }
    defaults.update(groups)
    return Settings(**defaults)


def _row(rows: list[CheckRow], prefix: str) -> CheckRow:
    return next(row for row in rows if row.backend.startswith(prefix))


def _args(as_json: bool, timeout: float = 3.0) -> argparse.Namespace:
    return argparse.Namespace(json=as_json, timeout=timeout)


# --- all ok -------------------------------------------------------------------


async def test_all_backends_ok(local_env, serve, bare_repo, capsys):
    fake = serve(
        {
            "/healthz": (200, {"status": "ok"}),
            "/api/version": (200, {"Version": "v2.13.1+abc"}),
        }
    )
    target = local_env.client.service_client.config.target_host
    settings = _settings(
        temporal=TemporalSettings(address=target),
        intake=IntakeSettings(url=fake.url),
        git=GitSettings(provider="local", repo_url=str(bare_repo)),
        argocd=ArgoCDSettings(url=fake.url, token=SecretStr(TOKEN)),
    )
    status = await run_config_check(_args(as_json=True), settings)
    rows = json.loads(capsys.readouterr().out)
    assert status == 0
    assert [row["status"] for row in rows] == [OK] * 5
    by_backend = {row["backend"]: row for row in rows}
    assert by_backend["temporal"]["detail"].startswith("Temporal server ")
    assert by_backend["temporal"]["target"].startswith(target)
    assert by_backend["signals (otlp)"]["detail"] == "intake healthy"
    assert by_backend["policy (embedded)"]["detail"].endswith(
        "sample decision: action rollback, allow True"
    )
    assert by_backend["git (local)"]["detail"].startswith("bare repository, main at ")
    assert by_backend["argocd (rest)"]["detail"] == "Argo CD v2.13.1+abc"
    assert ("GET", "/api/version", f"Bearer {TOKEN}") in fake.seen


async def test_table_output_lists_rows(serve, bare_repo, capsys):
    fake = serve({"/healthz": (200, {"status": "ok"})})
    settings = _settings(
        intake=IntakeSettings(url=fake.url),
        git=GitSettings(provider="local", repo_url=str(bare_repo)),
    )
    status = await run_config_check(_args(as_json=False), settings)
    out = capsys.readouterr().out
    assert status == 1
    for word in ("Backend", "temporal", "signals (otlp)", "intake healthy", "failed"):
        assert word in out


# --- failed rows ----------------------------------------------------------------


async def test_unreachable_backends_fail(tmp_path, capsys):
    settings = _settings(
        policy=PolicySettings(directory=tmp_path / "no-policies"),
        git=GitSettings(provider="local", repo_url=str(tmp_path / "absent.git")),
    )
    status = await run_config_check(_args(as_json=True, timeout=2.0), settings)
    rows = json.loads(capsys.readouterr().out)
    assert status == 1
    assert [row["status"] for row in rows] == [FAILED] * 5
    by_backend = {row["backend"]: row for row in rows}
    assert "connect" in by_backend["temporal"]["detail"].lower()
    assert "policy directory" in by_backend["policy (embedded)"]["detail"]
    assert "not found" in by_backend["git (local)"]["detail"]


async def test_http_errors_fail(serve):
    fake = serve(
        {
            "/healthz": (503, {"status": "starting"}),
            "/api/version": (200, {"unexpected": True}),
        }
    )
    settings = _settings(
        intake=IntakeSettings(url=fake.url), argocd=ArgoCDSettings(url=fake.url)
    )
    rows = await run_checks(settings, timeout=2.0)
    assert _row(rows, "signals").status == FAILED
    assert "HTTP 503" in _row(rows, "signals").detail
    assert _row(rows, "argocd").status == FAILED
    assert "no Version" in _row(rows, "argocd").detail


async def test_slow_backend_times_out(serve):
    fake = serve({"/healthz": (200, {"status": "ok"})}, delay_seconds=3.0)
    settings = _settings(intake=IntakeSettings(url=fake.url))
    started = time.monotonic()
    rows = await run_checks(settings, timeout=0.5)
    assert time.monotonic() - started < 2.5
    assert _row(rows, "signals").status == FAILED
    assert "timed out" in _row(rows, "signals").detail


async def test_unset_repo_url_skipped():
    rows = await run_checks(_settings(), timeout=1.0)
    git_row = _row(rows, "git")
    assert git_row.status == SKIPPED
    assert "REMEDIATOR_GIT_REPO_URL" in git_row.detail


async def test_skipped_row_does_not_fail(serve, capsys, local_env):
    fake = serve(
        {
            "/healthz": (200, {"status": "ok"}),
            "/api/version": (200, {"Version": "v2.13.1"}),
        }
    )
    settings = _settings(
        temporal=TemporalSettings(
            address=local_env.client.service_client.config.target_host
        ),
        intake=IntakeSettings(url=fake.url),
        argocd=ArgoCDSettings(url=fake.url),
    )
    assert await run_config_check(_args(as_json=True), settings) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["status"] for row in rows] == [OK, OK, OK, SKIPPED, OK]


# --- golden signals and policy ----------------------------------------------------


async def test_prometheus_buildinfo(serve):
    fake = serve(
        {
            "/api/v1/status/buildinfo": (
                200,
                {"status": "success", "data": {"version": "2.53.0"}},
            )
        }
    )
    settings = _settings(
        signals=SignalSettings(backend="prometheus"),
        prometheus=PrometheusSettings(url=fake.url, bearer_token=SecretStr(TOKEN)),
    )
    rows = await run_checks(settings, timeout=2.0)
    row = _row(rows, "signals")
    assert row.backend == "signals (prometheus)"
    assert row.status == OK
    assert row.detail == "Prometheus 2.53.0"
    assert row.target == f"{fake.url}/api/v1/status/buildinfo"
    assert fake.seen[0][2] == f"Bearer {TOKEN}"


async def test_opa_health_and_decision(serve):
    fake = serve(
        {
            "/health": (200, {}),
            "/v1/data/remediation/decision": (200, {"result": DECISION}),
        }
    )
    settings = _settings(
        policy=PolicySettings(
            engine="opa", opa_url=fake.url, opa_token=SecretStr(TOKEN)
        )
    )
    rows = await run_checks(settings, timeout=2.0)
    row = _row(rows, "policy")
    assert row.status == OK
    assert row.detail == "OPA healthy; sample decision: action rollback, allow True"
    paths = [path for _, path, _ in fake.seen]
    assert paths == ["/health", "/v1/data/remediation/decision"]
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in fake.seen)


async def test_opa_unhealthy_fails(serve):
    fake = serve({"/health": (500, {"code": "internal_error"})})
    settings = _settings(policy=PolicySettings(engine="opa", opa_url=fake.url))
    row = _row(await run_checks(settings, timeout=2.0), "policy")
    assert row.status == FAILED
    assert "HTTP 500" in row.detail


async def test_opa_undefined_decision_fails(serve):
    fake = serve({"/health": (200, {}), "/v1/data/remediation/decision": (200, {})})
    settings = _settings(policy=PolicySettings(engine="opa", opa_url=fake.url))
    row = _row(await run_checks(settings, timeout=2.0), "policy")
    assert row.status == FAILED
    assert "undefined" in row.detail


# --- Git ------------------------------------------------------------------------


async def test_git_remote_ls_remote(bare_repo):
    settings = _settings(git=GitSettings(provider="git", repo_url=bare_repo.as_uri()))
    row = _row(await run_checks(settings, timeout=3.0), "git")
    assert row.backend == "git (git)"
    assert row.status == OK
    assert row.detail.startswith("git ls-remote: main at ")


async def test_git_remote_missing_branch(bare_repo):
    settings = _settings(
        git=GitSettings(
            provider="git", repo_url=bare_repo.as_uri(), target_branch="release"
        )
    )
    row = _row(await run_checks(settings, timeout=3.0), "git")
    assert row.status == FAILED
    assert "no branch 'release'" in row.detail


async def test_local_provider_rejects_remote_url():
    settings = _settings(
        git=GitSettings(provider="local", repo_url="https://git.example.test/r.git")
    )
    row = _row(await run_checks(settings, timeout=1.0), "git")
    assert row.status == FAILED
    assert "REMEDIATOR_GIT_PROVIDER=git" in row.detail


async def test_local_path_not_bare(tmp_path):
    settings = _settings(git=GitSettings(provider="local", repo_url=str(tmp_path)))
    row = _row(await run_checks(settings, timeout=1.0), "git")
    assert row.status == FAILED
    assert "not a bare git repository" in row.detail


async def test_git_http_remote_token_redacted(serve):
    fake = serve({})
    url = f"{fake.url}/org/repo.git"
    settings = _settings(
        git=GitSettings(provider="git", repo_url=url, token=SecretStr(TOKEN))
    )
    row = _row(await run_checks(settings, timeout=3.0), "git")
    assert row.status == FAILED
    assert row.target == url
    assert any(auth.startswith("Basic ") for _, _, auth in fake.seen)
    assert TOKEN not in row.detail


async def test_github_repository(serve):
    fake = serve(
        {"/repos/org/repo": (200, {"full_name": "org/repo", "default_branch": "main"})}
    )
    settings = _settings(
        git=GitSettings(
            provider="github",
            repository="org/repo",
            api_url=fake.url,
            token=SecretStr(TOKEN),
        )
    )
    row = _row(await run_checks(settings, timeout=2.0), "git")
    assert row.status == OK
    assert row.detail == "org/repo, default branch main"
    assert row.target == f"{fake.url}/repos/org/repo"
    assert fake.seen[0][2] == f"Bearer {TOKEN}"


async def test_gitlab_project(serve):
    fake = serve(
        {
            "/projects/group%2Fproj": (
                200,
                {"path_with_namespace": "group/proj", "default_branch": "trunk"},
            )
        }
    )
    settings = _settings(
        git=GitSettings(provider="gitlab", repository="group/proj", api_url=fake.url)
    )
    row = _row(await run_checks(settings, timeout=2.0), "git")
    assert row.status == OK
    assert row.detail == "group/proj, default branch trunk"


async def test_forge_rejects_token(serve):
    # The forge echoes the token in its error body; the row must not.
    fake = serve({"/repos/org/repo": (401, {"message": f"bad credentials {TOKEN}"})})
    settings = _settings(
        git=GitSettings(
            provider="github",
            repository="org/repo",
            api_url=fake.url,
            token=SecretStr(TOKEN),
        )
    )
    row = _row(await run_checks(settings, timeout=2.0), "git")
    assert row.status == FAILED
    assert "HTTP 401" in row.detail
    assert TOKEN not in row.detail


# --- Argo CD on Kubernetes ---------------------------------------------------------


def _api_client(url: str) -> k8s.ApiClient:
    configuration = k8s.Configuration(host=url)
    return k8s.ApiClient(configuration)


async def test_kubernetes_applications_listed(serve):
    path = "/apis/argoproj.io/v1alpha1/namespaces/argocd/applications"
    fake = serve(
        {path: (200, {"items": [{"metadata": {"name": "cart"}}], "metadata": {}})}
    )
    settings = _settings(argocd=ArgoCDSettings(backend="kubernetes"))
    rows = await run_checks(
        settings, timeout=2.0, kubernetes_api_client=_api_client(fake.url)
    )
    row = _row(rows, "argocd")
    assert row.backend == "argocd (kubernetes)"
    assert row.status == OK
    assert row.detail == "1 Application(s) readable in argocd"
    assert row.target == f"{fake.url} namespace argocd"
    assert fake.seen[0][1] == f"{path}?limit=1"


async def test_kubernetes_forbidden(serve):
    path = "/apis/argoproj.io/v1alpha1/namespaces/argocd/applications"
    fake = serve({path: (403, {"kind": "Status", "reason": "Forbidden"})})
    settings = _settings(argocd=ArgoCDSettings(backend="kubernetes"))
    rows = await run_checks(
        settings, timeout=2.0, kubernetes_api_client=_api_client(fake.url)
    )
    row = _row(rows, "argocd")
    assert row.status == FAILED
    assert "HTTP 403" in row.detail


# --- secrets --------------------------------------------------------------------


async def test_tokens_never_printed(serve, bare_repo, capsys):
    # Every fake echoes the tokens back in its error bodies.
    echo = {"error": f"denied {TOKEN} {OTHER_TOKEN}"}
    fake = serve(
        {
            "/healthz": (500, echo),
            "/api/version": (401, echo),
            "/health": (403, echo),
        }
    )
    settings = _settings(
        temporal=TemporalSettings(
            address=f"127.0.0.1:{free_port()}", api_key=SecretStr(OTHER_TOKEN)
        ),
        intake=IntakeSettings(url=fake.url, bearer_token=SecretStr(TOKEN)),
        policy=PolicySettings(
            engine="opa", opa_url=fake.url, opa_token=SecretStr(OTHER_TOKEN)
        ),
        git=GitSettings(
            provider="git",
            repo_url=f"http://user:{TOKEN}@127.0.0.1:{free_port()}/r.git",
            token=SecretStr(OTHER_TOKEN),
        ),
        argocd=ArgoCDSettings(url=fake.url, token=SecretStr(TOKEN)),
    )
    for as_json in (True, False):
        status = await run_config_check(_args(as_json, timeout=2.0), settings)
        captured = capsys.readouterr()
        assert status == 1
        for secret in (TOKEN, OTHER_TOKEN):
            assert secret not in captured.out
            assert secret not in captured.err


# --- command line ---------------------------------------------------------------


def test_parser_accepts_config_check():
    args = build_parser().parse_args(["config", "check", "--json", "--timeout", "2"])
    assert args.command == "config"
    assert args.config_command == "check"
    assert args.json is True
    assert args.timeout == 2.0


def test_parser_rejects_bad_timeout(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["config", "check", "--timeout", "0"])
    assert "must be above 0" in capsys.readouterr().err
