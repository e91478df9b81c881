"""Service settings, read from the environment by every Remediator process.

Each group has its own prefix under `REMEDIATOR_`, so the variable of a field is
the prefix plus the field name in capitals (`REMEDIATOR_TEMPORAL_ADDRESS`).
Secrets are `SecretStr` and never copied into workflow inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]


def _group(prefix: str) -> SettingsConfigDict:
    return SettingsConfigDict(
        env_prefix=f"REMEDIATOR_{prefix}_", extra="ignore", env_file=None
    )


class TemporalSettings(BaseSettings):
    """Temporal service address, namespace and the task queues the workers poll."""

    model_config = _group("TEMPORAL")

    address: str = Field("127.0.0.1:7233", description="frontend host:port")
    namespace: str = Field("default", description="Temporal namespace")
    task_queue: str = Field(
        "remediation", description="queue of workflows and I/O activities"
    )
    detection_task_queue: str = Field(
        "remediation-detection", description="queue of the anomaly detector"
    )
    ui_url: str = Field(
        "http://127.0.0.1:8233", description="Web UI base URL used in links"
    )
    search_attributes: bool = Field(
        True,
        description="upsert the Remediation* search attributes; they must be "
        "registered in the namespace first (remediator dev-server does it)",
    )
    tls: bool = Field(
        False,
        description="connect with TLS. An API key or any tls_* setting turns TLS "
        "on as well",
    )
    tls_cert_file: Path | None = Field(
        None,
        description="PEM client certificate for mutual TLS; needs tls_key_file",
    )
    tls_key_file: Path | None = Field(
        None, description="PEM private key of the mutual TLS client certificate"
    )
    tls_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle that verifies the server's certificate; the "
        "system roots when unset",
    )
    tls_server_name: str = Field(
        "",
        description="name sent as SNI and checked against the server's "
        "certificate, when it differs from the host in address",
    )
    api_key: SecretStr | None = Field(
        None,
        description="Temporal Cloud API key, sent as Authorization: Bearer <key>",
    )
    metrics_port: int | None = Field(
        None,
        description="port of the worker's Prometheus /metrics endpoint (Temporal "
        "SDK and remediation_* metrics); unset turns it off. Give each worker "
        "process on one host its own port",
    )
    metrics_host: str = Field(
        "127.0.0.1", description="listen address of the worker's /metrics endpoint"
    )


class WorkerSettings(BaseSettings):
    """The health endpoint that each worker process serves to its probes."""

    model_config = _group("WORKER")

    health_host: str = Field(
        "127.0.0.1",
        description="listen address of the worker's /healthz and /readyz "
        "endpoint; 0.0.0.0 in a container so the kubelet reaches it",
    )
    health_port: int | None = Field(
        8081,
        description="port of the worker's /healthz (process up) and /readyz "
        "(polling its task queue) endpoint; unset turns it off. Give each worker "
        "process on one host its own port",
    )
    ready_poll_age_seconds: float = Field(
        120.0,
        description="/readyz fails when Temporal last saw this worker poll its "
        "task queue longer ago than this, seconds. Keep it above the 70 s long "
        "poll",
    )
    ready_cache_seconds: float = Field(
        5.0,
        description="how long /readyz reuses one task queue description, seconds",
    )


class IntakeSettings(BaseSettings):
    """The HTTP intake: Alertmanager webhook and OTLP/HTTP receiver."""

    model_config = _group("INTAKE")

    host: str = Field("127.0.0.1", description="listen address")
    port: int = Field(8080, description="listen port")
    bearer_token: SecretStr | None = Field(
        None, description="token Alertmanager must send; unset accepts any caller"
    )
    max_body_bytes: int = Field(
        16 * 1024 * 1024,
        description="largest accepted request body in bytes; Alertmanager drops "
        "a notification answered with 413, so keep it above the largest group",
    )
    namespace_labels: str = Field(
        "namespace", description="comma-separated alert labels tried for namespace"
    )
    app_labels: str = Field(
        "app,service,job", description="comma-separated alert labels tried for app"
    )
    default_namespace: str = Field(
        "", description="namespace used when no namespace label is present"
    )
    url: str = Field(
        "http://127.0.0.1:8080",
        description="base URL at which workers reach the golden-signal store",
    )


class SignalSettings(BaseSettings):
    """Golden signals: the window read as evidence and its resolution."""

    model_config = _group("SIGNALS")

    backend: Literal["otlp", "prometheus"] = Field(
        "otlp", description="golden-signal source: otlp (intake store) or prometheus"
    )
    window_seconds: float = Field(300.0, description="evidence window, seconds")
    step_seconds: float = Field(15.0, description="resolution of the series, seconds")
    recent_seconds: float = Field(
        60.0,
        description="the policy compares the signals of the last recent_seconds "
        "of the window with its thresholds; the detector sees the whole window",
    )
    retention_seconds: float = Field(
        3600.0, description="how long the OTLP store keeps points, seconds"
    )


class PrometheusSettings(BaseSettings):
    """Connection and query settings of the Prometheus golden-signal backend."""

    model_config = _group("PROMETHEUS")

    url: str = Field("http://127.0.0.1:9090", description="Prometheus base URL")
    timeout_seconds: float = Field(
        10.0,
        description="timeout of one query in seconds, also sent to Prometheus as "
        "its query timeout. Keep it under the 15 s start-to-close timeout of "
        "collect_evidence",
    )
    bearer_token: SecretStr | None = Field(
        None, description="token sent as Authorization: Bearer <token>, if set"
    )
    verify_tls: bool = Field(True, description="check the server's certificate")
    ca_file: Path | None = Field(
        None, description="CA bundle for the server's certificate"
    )
    queries: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description='PromQL templates as JSON {"*" or "namespace/app": {signal: '
        "template}}. Signals: request_rate, error_ratio, latency_p99, restarts. "
        "Placeholders: {namespace}, {app}, {window}. An empty template turns "
        "latency_p99 or restarts off",
    )
    queries_file: Path | None = Field(
        None,
        description="YAML or JSON file of the same shape as "
        "REMEDIATOR_PROMETHEUS_QUERIES. Templates in that variable override the "
        "file's",
    )
    scrape_interval_seconds: float = Field(
        15.0,
        description="scrape interval of the metrics in seconds. Range queries use "
        "a rate window of max(step + scrape interval, 4 x scrape interval)",
    )
    min_requests: float = Field(
        1.0, description="minimum requests in a window that count as traffic"
    )
    warnings_block_recovery: bool = Field(
        True,
        description="a verification interval whose queries returned warnings "
        "(such as partial data) never counts as healthy",
    )


# --- templates -----------------------------------------------------------------


class DetectionSettings(BaseSettings):
    """The anomaly detector on the detection task queue."""

    model_config = _group("DETECTION")

    threshold: float = Field(
        0.8, description="score at or above which a point is anomalous"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto (CUDA when present), cpu (numpy) or cuda (torch)"
    )
    memory_fraction: float = Field(
        0.25, description="share of the device memory free at start that one batch uses"
    )
    max_batch_series: int = Field(10_000, description="upper bound of series per batch")
    max_concurrent_activities: int = Field(
        2, description="scoring activities one detection worker runs at a time"
    )


class SweepSettings(BaseSettings):
    """The detection sweep: which applications it reads, and how often."""

    model_config = _group("SWEEP")

    applications: str = Field(
        "", description="comma-separated namespace/app keys opted in to the sweep"
    )
    discover: bool = Field(
        False,
        description="also sweep every application the signal backend has data for",
    )
    discovery_query: str = Field(
        "group by (namespace, app) (http_requests_total)",
        description="PromQL listing the applications to sweep (Prometheus backend)",
    )
    window_seconds: float = Field(1800.0, description="window of the series, seconds")
    step_seconds: float = Field(
        0.0, description="step of the series, seconds; 0 takes SIGNALS_STEP_SECONDS"
    )
    min_sustained_seconds: float = Field(
        60.0, description="anomalies younger than this open no incident"
    )
    batch_series: int = Field(200, description="series per detection call")
    interval_seconds: float = Field(
        300.0, description="interval of the Temporal Schedule, seconds"
    )
    schedule_id: str = Field(
        "remediator-detection-sweep", description="id of the Temporal Schedule"
    )
    schedule_on_start: bool = Field(
        False,
        description="the orchestrator worker creates or updates the Schedule at "
        "start, so the deployment keeps it in step with these settings",
    )


class PolicySettings(BaseSettings):
    """The Rego decision policy."""

    model_config = _group("POLICY")

    engine: str = Field("embedded", description="embedded (regopy) or opa (REST)")
    directory: Path = Field(REPO_ROOT / "policies", description="Rego modules")
    data_file: Path | None = Field(
        None, description="JSON document loaded as `data`, for per-app overrides"
    )
    query: str = Field("data.remediation.decision", description="decision query")
    opa_url: str = Field("http://127.0.0.1:8181", description="OPA server base URL")
    opa_token: SecretStr | None = Field(None, description="OPA bearer token")
    timeout_seconds: float = Field(5.0, description="decision timeout, seconds")


class GitSettings(BaseSettings):
    """The GitOps repository and its pull-request provider."""

    model_config = _group("GIT")

    provider: str = Field(
        "local",
        description="local (bare repository), git (push to any git remote, no "
        "pull request), github or gitlab",
    )
    repo_url: str = Field(
        "", description="repository URL or bare path; Argo CD's repoURL when unset"
    )
    target_branch: str = Field("main", description="branch Argo CD deploys")
    work_dir: Path = Field(
        Path(".remediator/git"), description="where working clones are kept"
    )
    author_name: str = Field("Remediator", description="commit author name")
    author_email: str = Field("remediator@localhost", description="commit author email")
    strategy: str = Field("pin", description="pin (image back) or revert (commits)")
    api_url: str = Field(
        "",
        description="forge API base URL; derived from the repository URL when "
        "empty (api.github.com, <host>/api/v3, <host>/api/v4)",
    )
    repository: str = Field(
        "", description="GitHub owner/name or GitLab project path or id"
    )
    token: SecretStr | None = Field(
        None,
        description="forge API token; for the git provider, the HTTPS password "
        "sent as basic auth to an http(s) remote",
    )
    merge_method: Literal["merge", "squash", "rebase"] = Field(
        "merge", description="how the forge merges the pull request"
    )
    api_timeout_seconds: float = Field(10.0, description="forge request timeout, s")


class ArgoCDSettings(BaseSettings):
    """The Argo CD API that reports sync and health."""

    model_config = _group("ARGOCD")

    url: str = Field("http://127.0.0.1:8090", description="Argo CD API base URL")
    token: SecretStr | None = Field(None, description="Argo CD bearer token")
    backend: Literal["rest", "kubernetes"] = Field(
        "rest",
        description="Argo CD REST API, or the Application resource in Kubernetes",
    )
    namespace: str = Field(
        "argocd", description="namespace of the Application resources (kubernetes)"
    )
    application_template: str = Field(
        "{app}", description="Application name built from {namespace} and {app}"
    )
    sync_timeout_seconds: float = Field(600.0, description="maximum sync wait, seconds")
    poll_seconds: float = Field(2.0, description="interval between status reads")


class VerifySettings(BaseSettings):
    """Recovery verification after the rollback has synced."""

    model_config = _group("VERIFY")

    interval_seconds: float = Field(30.0, description="length of one interval")
    consecutive_intervals: int = Field(3, description="healthy intervals in a row")
    max_intervals: int = Field(10, description="intervals before escalation")


class BudgetSettings(BaseSettings):
    """How many rollbacks one application may get."""

    model_config = _group("BUDGET")

    max_rollbacks: int = Field(2, description="rollbacks allowed per window")
    window_seconds: float = Field(1800.0, description="sliding window, seconds")


class RemediationSettings(BaseSettings):
    """Behaviour of every incident."""

    model_config = _group("REMEDIATION")

    shadow: bool = Field(False, description="open draft pull requests, never merge")
    approval_timeout_seconds: float = Field(
        900.0, description="wait for approve/abort before escalating, seconds"
    )


class EscalationSettings(BaseSettings):
    """Escalation targets besides the log."""

    model_config = _group("ESCALATION")

    webhook_url: str = Field(
        "",
        description="JSON webhook that receives each escalation; empty: log only",
    )
    timeout_seconds: float = Field(10.0, description="webhook request timeout, s")


class Settings(BaseSettings):
    """All settings groups."""

    model_config = SettingsConfigDict(env_prefix="REMEDIATOR_", extra="ignore")

    temporal: TemporalSettings = Field(default_factory=TemporalSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    intake: IntakeSettings = Field(default_factory=IntakeSettings)
    signals: SignalSettings = Field(default_factory=SignalSettings)
    prometheus: PrometheusSettings = Field(default_factory=PrometheusSettings)
    detection: DetectionSettings = Field(default_factory=DetectionSettings)
    sweep: SweepSettings = Field(default_factory=SweepSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    git: GitSettings = Field(default_factory=GitSettings)
    argocd: ArgoCDSettings = Field(default_factory=ArgoCDSettings)
    verify: VerifySettings = Field(default_factory=VerifySettings)
    budget: BudgetSettings = Field(default_factory=BudgetSettings)
    remediation: RemediationSettings = Field(default_factory=RemediationSettings)
    escalation: EscalationSettings = Field(default_factory=EscalationSettings)


GROUPS: dict[str, type[BaseSettings]] = {
    "TEMPORAL": TemporalSettings,
    "WORKER": WorkerSettings,
    "INTAKE": IntakeSettings,
    "SIGNALS": SignalSettings,
    "PROMETHEUS": PrometheusSettings,
    "DETECTION": DetectionSettings,
    "SWEEP": SweepSettings,
    "POLICY": PolicySettings,
    "GIT": GitSettings,
    "ARGOCD": ArgoCDSettings,
    "VERIFY": VerifySettings,
    "BUDGET": BudgetSettings,
    "REMEDIATION": RemediationSettings,
    "ESCALATION": EscalationSettings,
}


def describe_settings() -> str:
    """Render every setting's variable, default and description for `--help`."""
    lines = ["settings (environment variables):"]
    for prefix, group in GROUPS.items():
        for name, field in group.model_fields.items():
            default = field.get_default(call_default_factory=True)
            if isinstance(default, SecretStr) or name.endswith("token"):
                shown = "unset" if default is None else "***"
            else:
                shown = "unset" if default is None else str(default)
            variable = f"REMEDIATOR_{prefix}_{name.upper()}"
            lines.append(f"  {variable} (default: {shown})")
            if field.description:
                lines.append(f"      {field.description}")
    return "\n".join(lines)


class SettingsError(ValueError):
    """An environment variable contains a value that its setting rejects."""


def load_settings() -> Settings:
    """Read the settings from the environment.

    Raises SettingsError naming each environment variable whose value is
    invalid, with the value and what the setting accepts.
    """
    try:
        return Settings()
    except ValidationError as error:
        prefixes = {group.__name__: prefix for prefix, group in GROUPS.items()}
        prefix = prefixes.get(error.title)
        problems = []
        for problem in error.errors():
            field = "_".join(str(part) for part in problem["loc"]).upper()
            name = f"REMEDIATOR_{prefix}_{field}" if prefix else field
            problems.append(f"{name} is {problem.get('input')!r}: {problem['msg']}")
        raise SettingsError("; ".join(problems)) from None
