"""`remediator config check`: connect to each configured backend once and report.

One row per backend, with the target it reached (URL or address without
credentials), `ok`, `failed` or `skipped`, and a detail (the version the
backend reports, or the error):

- Temporal: connect, then `WorkflowService.GetSystemInfo`.
- Golden signals: the intake's `GET /healthz` (otlp), or Prometheus's
  `GET /api/v1/status/buildinfo`.
- Policy: the embedded engine loads its modules and evaluates a sample input;
  for OPA, `GET /health` and then the same sample decision over REST.
- Git: a local path must be a bare repository with the target branch. A
  remote of the git provider must list the target branch in `git ls-remote`,
  and GitHub `GET /repos/{repo}` or GitLab `GET /projects/:id` must read the
  repository with the token.
- Argo CD: `GET /api/version` (rest), or a list of Applications with limit 1
  through the Kubernetes API (kubernetes).

The checks run concurrently, each bounded by `--timeout`. The exit status is 0
only when no row failed; a skipped row (nothing configured to check) does not
fail. Every configured secret is replaced by `***` in the output, and URLs lose
their user and password.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from pydantic import SecretStr

from remediator.settings import Settings

DEFAULT_TIMEOUT_SECONDS = 5.0
OK = "ok"
FAILED = "failed"
SKIPPED = "skipped"
MAX_DETAIL_CHARS = 300


@dataclass
class CheckRow:
    """One backend's check: what was reached, whether it worked, and why."""

    backend: str
    target: str
    status: str
    detail: str


class CheckFailed(Exception):
    """A check reached its backend, or failed to, with a one-line reason."""


class CheckSkipped(Exception):
    """Nothing is configured for this check, for the reason in the message."""


# --- command line -------------------------------------------------------------


def add_config_command(
    commands: argparse._SubParsersAction,
    epilog: str,
    formatter: type[argparse.HelpFormatter],
) -> None:
    """Add the `config` subparser and its `check` subcommand."""
    config = commands.add_parser(
        "config",
        help="check the configured backends",
        epilog=epilog,
        formatter_class=formatter,
    )
    actions = config.add_subparsers(dest="config_command", required=True)
    check = actions.add_parser(
        "check",
        help="connect to Temporal, the golden-signal source, the policy engine, "
        "the GitOps repository and Argo CD, and print one row each",
        epilog=epilog,
        formatter_class=formatter,
    )
    check.add_argument(
        "--json", action="store_true", help="print the rows as a JSON array"
    )
    check.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help=f"timeout of each check in seconds (default: {DEFAULT_TIMEOUT_SECONDS})",
    )


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from err
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {value}")
    return value


async def run_config_check(args: argparse.Namespace, settings: Settings) -> int:
    """Run every check, print the rows, and return the process exit status."""
    rows = await run_checks(settings, timeout=args.timeout)
    if args.json:
        print(json.dumps([asdict(row) for row in rows], indent=2))
    else:
        from rich.console import Console

        Console(soft_wrap=False).print(render_rows(rows))
    sys.stdout.flush()
    return 1 if any(row.status == FAILED for row in rows) else 0


def render_rows(rows: list[CheckRow]) -> Any:
    """Render the rows as a rich table with a coloured status column."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    colours = {OK: "green", FAILED: "bold red", SKIPPED: "yellow"}
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("Backend", no_wrap=True)
    table.add_column("Target")
    table.add_column("Status", no_wrap=True)
    table.add_column("Detail")
    for row in rows:
        status = Text(row.status, style=colours.get(row.status, ""))
        table.add_row(row.backend, row.target, status, row.detail)
    return table


# --- running the checks -------------------------------------------------------


async def run_checks(
    settings: Settings,
    *,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    kubernetes_api_client: Any = None,
) -> list[CheckRow]:
    """Run the checks concurrently and return one redacted row per backend.

    `kubernetes_api_client` replaces the client that the kubernetes Argo CD
    backend builds from the in-cluster account or the kubeconfig.
    """
    checks: list[tuple[str, str, Callable[[], Awaitable[str]]]] = [
        (
            "temporal",
            _temporal_target(settings),
            lambda: _check_temporal(settings, timeout),
        ),
        (
            f"signals ({settings.signals.backend})",
            _signals_target(settings),
            lambda: _check_signals(settings, timeout),
        ),
        (
            f"policy ({settings.policy.engine})",
            _policy_target(settings),
            lambda: asyncio.to_thread(_check_policy, settings, timeout),
        ),
        (
            f"git ({settings.git.provider})",
            _git_target(settings),
            lambda: asyncio.to_thread(_check_git, settings, timeout),
        ),
        (
            f"argocd ({settings.argocd.backend})",
            _argocd_target(settings, kubernetes_api_client),
            lambda: _check_argocd(settings, timeout, kubernetes_api_client),
        ),
    ]
    results = await asyncio.gather(
        *(_run_one(check, timeout) for _, _, check in checks)
    )
    secrets = _secrets(settings)
    rows = []
    for (backend, target, _), (status, detail) in zip(checks, results, strict=True):
        rows.append(
            CheckRow(
                backend=backend,
                target=_redact(target, secrets),
                status=status,
                detail=_redact(detail, secrets),
            )
        )
    return rows


async def _run_one(
    check: Callable[[], Awaitable[str]], timeout: float
) -> tuple[str, str]:
    """Run one check and turn its result or error into (status, detail)."""
    started = time.monotonic()
    try:
        # Each check bounds its own requests by `timeout`; this bounds the
        # whole check, connection set-up and retries included.
        detail = await asyncio.wait_for(check(), timeout + 1.0)
    except TimeoutError:
        return FAILED, f"timed out after {time.monotonic() - started:.1f} s"
    except CheckFailed as error:
        return FAILED, str(error)
    except CheckSkipped as error:
        return SKIPPED, str(error)
    except Exception as error:  # any failure of a backend is a failed row
        return FAILED, _error_text(error)
    return OK, detail


def _error_text(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _secrets(settings: Settings) -> list[str]:
    values: list[SecretStr | None] = [
        settings.temporal.api_key,
        settings.intake.bearer_token,
        settings.prometheus.bearer_token,
        settings.policy.opa_token,
        settings.git.token,
        settings.argocd.token,
    ]
    secrets = [value.get_secret_value() for value in values if value is not None]
    return [secret for secret in secrets if secret]


def _redact(text: str, secrets: list[str]) -> str:
    from activities.gitops.local_provider import scrub
    from activities.gitops.repository import redact_url

    words = [redact_url(word) if "://" in word else word for word in text.split(" ")]
    text = " ".join(words)
    for secret in secrets:
        text = text.replace(secret, "***")
    return scrub(text)[:MAX_DETAIL_CHARS]


def _bearer(token: SecretStr | None) -> dict[str, str]:
    if token is None or not token.get_secret_value():
        return {}
    return {"Authorization": f"Bearer {token.get_secret_value()}"}


async def _get_json(
    url: str,
    timeout: float,
    headers: dict[str, str] | None = None,
    verify: Any = True,
) -> Any:
    """GET `url` and return its JSON body; raise CheckFailed for any failure."""
    import httpx

    try:
        async with httpx.AsyncClient(timeout=timeout, verify=verify) as http:
            response = await http.get(url, headers=headers or {})
    except httpx.TimeoutException:
        raise CheckFailed(f"GET timed out after {timeout:g} s") from None
    except httpx.HTTPError as error:
        raise CheckFailed(f"GET failed: {_error_text(error)}") from None
    if response.status_code != 200:
        raise CheckFailed(
            f"GET returned HTTP {response.status_code}: "
            f"{response.text.strip()[:200] or response.reason_phrase}"
        )
    try:
        return response.json()
    except ValueError:
        raise CheckFailed("GET returned a body that is not JSON") from None


# --- Temporal -----------------------------------------------------------------


def _temporal_target(settings: Settings) -> str:
    temporal = settings.temporal
    secure = (
        temporal.tls
        or temporal.api_key is not None
        or temporal.tls_ca_file is not None
        or temporal.tls_cert_file is not None
        or bool(temporal.tls_server_name)
    )
    scheme = "TLS" if secure else "plaintext"
    return f"{temporal.address} namespace {temporal.namespace} ({scheme})"


async def _check_temporal(settings: Settings, timeout: float) -> str:
    from temporalio.api.workflowservice.v1 import GetSystemInfoRequest

    from remediator.temporal import connect

    client = await asyncio.wait_for(connect(settings.temporal), timeout)
    info = await client.workflow_service.get_system_info(
        GetSystemInfoRequest(), timeout=timedelta(seconds=timeout)
    )
    version = info.server_version or "unknown version"
    return f"Temporal server {version}"


# --- golden signals -------------------------------------------------------------


def _signals_target(settings: Settings) -> str:
    if settings.signals.backend == "prometheus":
        return f"{settings.prometheus.url.rstrip('/')}/api/v1/status/buildinfo"
    return f"{settings.intake.url.rstrip('/')}/healthz"


async def _check_signals(settings: Settings, timeout: float) -> str:
    url = _signals_target(settings)
    if settings.signals.backend != "prometheus":
        body = await _get_json(url, timeout)
        status = body.get("status") if isinstance(body, dict) else None
        if status != "ok":
            raise CheckFailed(f"intake reported status {status!r}, not 'ok'")
        return "intake healthy"
    prometheus = settings.prometheus
    verify: Any = prometheus.verify_tls
    if prometheus.verify_tls and prometheus.ca_file is not None:
        import ssl

        verify = ssl.create_default_context(cafile=str(prometheus.ca_file))
    body = await _get_json(url, timeout, _bearer(prometheus.bearer_token), verify)
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict) or body.get("status") != "success":
        raise CheckFailed("buildinfo response has no data; is this Prometheus?")
    return f"Prometheus {data.get('version', 'unknown version')}"


# --- policy -----------------------------------------------------------------


def _policy_target(settings: Settings) -> str:
    policy = settings.policy
    if policy.engine == "opa":
        return f"{policy.opa_url.rstrip('/')} {policy.query}"
    return f"{policy.directory} {policy.query}"


def sample_decision_input() -> dict[str, Any]:
    """Build the policy input of the sample decision: a clear rollback case."""
    from workflows.models import (
        BudgetState,
        ChangeResult,
        DecisionInput,
        Evidence,
        ImageChange,
        SeriesVerdict,
    )

    sample = DecisionInput(
        incident_id="config-check",
        namespace="config-check",
        app="sample",
        alerts_firing=1,
        evidence=Evidence(
            namespace="config-check",
            app="sample",
            has_data=True,
            request_rate=10.0,
            error_ratio=0.5,
            latency_p99_seconds=0.2,
        ),
        anomaly=SeriesVerdict(
            key="config-check/sample/error_ratio",
            score=0.99,
            anomalous=True,
            sustained_seconds=600.0,
            points_scored=40,
        ),
        change=ChangeResult(
            found=True,
            path="apps/sample",
            suspect_revision="b" * 40,
            last_good_revision="a" * 40,
            suspect_commits=["b" * 40],
            image_changes=[
                ImageChange(
                    file="apps/sample/deployment.yaml",
                    location="spec.template.spec.containers[0].image",
                    good="registry.example.test/sample:1",
                    bad="registry.example.test/sample:2",
                )
            ],
        ),
        budget=BudgetState(
            key="config-check/sample",
            max_rollbacks=2,
            window_seconds=1800.0,
            used=0,
            remaining=2,
        ),
    )
    return sample.model_dump(mode="json")


def _check_policy(settings: Settings, timeout: float) -> str:
    from activities.policy import PolicyError, decision_from_result, load_engine

    policy = settings.policy.model_copy(
        update={"timeout_seconds": min(settings.policy.timeout_seconds, timeout)}
    )
    prefix = ""
    if policy.engine == "opa":
        import httpx

        url = f"{policy.opa_url.rstrip('/')}/health"
        try:
            response = httpx.get(
                url, headers=_bearer(policy.opa_token), timeout=timeout
            )
        except httpx.HTTPError as error:
            raise CheckFailed(f"GET /health failed: {_error_text(error)}") from None
        if response.status_code != 200:
            raise CheckFailed(f"GET /health returned HTTP {response.status_code}")
        prefix = "OPA healthy; "
    try:
        engine = load_engine(policy)
        result = engine.evaluate(policy.query, sample_decision_input())
    except PolicyError as error:
        raise CheckFailed(str(error)) from None
    if result is None:
        raise CheckFailed(f"{policy.query} is undefined for the sample input")
    try:
        decision = decision_from_result(result, engine.name)
    except PolicyError as error:
        raise CheckFailed(
            f"{policy.query} returned an invalid result: {error}"
        ) from None
    modules = getattr(engine, "modules", None)
    loaded = f"{len(modules)} module(s); " if modules is not None else ""
    return (
        f"{prefix}{loaded}sample decision: action {decision.action}, "
        f"allow {decision.allow}"
    )


# --- Git --------------------------------------------------------------------


def _forge_provider(settings: Settings) -> Any:
    from activities.gitops.forges import forge_provider

    return forge_provider(settings.git, settings.git.repo_url)


def _git_target(settings: Settings) -> str:
    git_settings = settings.git
    if git_settings.provider in ("github", "gitlab"):
        try:
            provider = _forge_provider(settings)
        except Exception:  # reported by the check itself
            return git_settings.repo_url or git_settings.repository or "(unset)"
        path = getattr(provider, "repo_path", None) or provider.project_path
        return f"{provider.client.base_url}{path}"
    return git_settings.repo_url or "(unset)"


def _check_git(settings: Settings, timeout: float) -> str:
    git_settings = settings.git
    provider = git_settings.provider
    if provider in ("github", "gitlab"):
        return _check_forge(settings, timeout)
    if not git_settings.repo_url:
        raise CheckSkipped(
            "REMEDIATOR_GIT_REPO_URL is unset, so workers use the repository URL "
            "of each Argo CD Application"
        )
    if provider == "local":
        return _check_local_repository(settings)
    if provider == "git":
        return _check_remote(settings, timeout)
    raise CheckFailed(
        f"unknown git provider {provider!r}; expected local, git, github or gitlab"
    )


def _check_local_repository(settings: Settings) -> str:
    from activities.gitops.repository import (
        is_bare_repository,
        local_path_of,
        run_git,
    )

    url = settings.git.repo_url
    path = local_path_of(url)
    if path is None:
        raise CheckFailed(
            "the local provider needs a local bare repository path, not a remote "
            "URL; set REMEDIATOR_GIT_PROVIDER=git for a remote"
        )
    if not path.exists():
        raise CheckFailed(f"{path} not found")
    if not is_bare_repository(path):
        raise CheckFailed(f"{path} is not a bare git repository")
    target = settings.git.target_branch
    try:
        head = run_git(path, "rev-parse", "--verify", f"refs/heads/{target}^{{commit}}")
    except Exception:
        raise CheckFailed(f"bare repository has no branch {target!r}") from None
    return f"bare repository, {target} at {head.strip()[:12]}"


def _check_remote(settings: Settings, timeout: float) -> str:
    from activities.gitops.plain_remote import credential_env

    url = settings.git.repo_url
    target = settings.git.target_branch
    env = {**os.environ, **credential_env(url, settings.git.token)}
    try:
        process = subprocess.run(
            ["git", "ls-remote", "--", url, f"refs/heads/{target}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"git ls-remote timed out after {timeout:g} s") from None
    if process.returncode != 0:
        lines = process.stderr.strip().splitlines()
        raise CheckFailed(
            f"git ls-remote failed: {lines[-1] if lines else process.returncode}"
        )
    line = process.stdout.split("\n", 1)[0]
    if not line.strip():
        raise CheckFailed(f"the remote has no branch {target!r}")
    return f"git ls-remote: {target} at {line.split()[0][:12]}"


def _check_forge(settings: Settings, timeout: float) -> str:
    from activities.gitops.forge import ForgeRequestError, ForgeUnavailableError
    from activities.gitops.local_provider import InvalidInputError

    git_settings = settings.git.model_copy(
        update={"api_timeout_seconds": min(settings.git.api_timeout_seconds, timeout)}
    )
    try:
        from activities.gitops.forges import forge_provider

        provider = forge_provider(git_settings, git_settings.repo_url)
    except InvalidInputError as error:
        raise CheckFailed(str(error)) from None
    path = getattr(provider, "repo_path", None) or provider.project_path
    try:
        body = provider.client.json("GET", path)
    except (ForgeRequestError, ForgeUnavailableError) as error:
        raise CheckFailed(str(error)) from None
    if not isinstance(body, dict):
        raise CheckFailed(f"GET {path} returned no JSON object")
    name = body.get("full_name") or body.get("path_with_namespace") or path
    default_branch = body.get("default_branch") or "unknown"
    return f"{name}, default branch {default_branch}"


# --- Argo CD ------------------------------------------------------------------


def _argocd_target(settings: Settings, api_client: Any) -> str:
    argocd = settings.argocd
    if argocd.backend == "kubernetes":
        host = getattr(getattr(api_client, "configuration", None), "host", None)
        where = host or "Kubernetes API (in-cluster or kubeconfig)"
        return f"{where} namespace {argocd.namespace}"
    return f"{argocd.url.rstrip('/')}/api/version"


async def _check_argocd(settings: Settings, timeout: float, api_client: Any) -> str:
    argocd = settings.argocd
    if argocd.backend == "kubernetes":
        return await asyncio.to_thread(
            _list_applications, argocd.namespace, timeout, api_client
        )
    url = f"{argocd.url.rstrip('/')}/api/version"
    body = await _get_json(url, timeout, _bearer(argocd.token))
    version = body.get("Version") if isinstance(body, dict) else None
    if not version:
        raise CheckFailed("the /api/version response has no Version; is this Argo CD?")
    return f"Argo CD {version}"


def _list_applications(namespace: str, timeout: float, api_client: Any) -> str:
    from kubernetes import client as k8s

    from activities.argocd_kubernetes import GROUP, PLURAL, VERSION

    if api_client is None:
        from activities.argocd_kubernetes import _default_api_client

        try:
            api_client = _default_api_client()
        except Exception as error:  # no service account and no kubeconfig
            raise CheckFailed(
                f"no Kubernetes credentials: {_error_text(error)}"
            ) from None
    api = k8s.CustomObjectsApi(api_client)
    try:
        listing = api.list_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, limit=1, _request_timeout=timeout
        )
    except k8s.ApiException as error:
        raise CheckFailed(
            f"listing {PLURAL}.{GROUP} in {namespace} returned HTTP "
            f"{error.status}: {error.reason}"
        ) from None
    items = listing.get("items") if isinstance(listing, dict) else None
    if items is None:
        raise CheckFailed("the Kubernetes API returned no item list")
    more = " or more" if (listing.get("metadata") or {}).get("continue") else ""
    return f"{len(items)}{more} Application(s) readable in {namespace}"
