"""Parse Alertmanager webhook bodies and plan one incident per application.

The intake route in `remediator.intake.app` calls `plan_incidents` on every
`POST /v1/alerts` body. Planning is pure: it validates the body, maps each
alert's labels to an application key `namespace/app` and groups the alerts per
key, so the caller sends one signal-with-start per application no matter how
many alerts a group contains.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from remediator.settings import IntakeSettings, Settings
from workflows.models import AlertSignal

SUPPORTED_VERSION = "4"

# Kubernetes namespace and Service names are DNS-1123 labels.
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS1123_LABEL_MAX_LENGTH = 63


class WebhookAlert(BaseModel):
    """One alert of an Alertmanager webhook body; unknown fields are accepted."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    status: Literal["firing", "resolved"]
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    starts_at: str = Field("", alias="startsAt")
    ends_at: str = Field("", alias="endsAt")
    generator_url: str = Field("", alias="generatorURL")
    fingerprint: str = ""


class WebhookMessage(BaseModel):
    """An Alertmanager webhook body (version 4).

    Only `alerts` is required: older Alertmanager releases and hand-written
    senders omit the envelope fields. `group_key` is kept as an opaque string and
    never used as an identity, because HA peers send the same alert under
    different group keys.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    version: str | None = None
    group_key: str = Field("", alias="groupKey")
    truncated_alerts: int = Field(0, alias="truncatedAlerts", ge=0)
    status: str = ""
    receiver: str = ""
    group_labels: dict[str, str] = Field(default_factory=dict, alias="groupLabels")
    common_labels: dict[str, str] = Field(default_factory=dict, alias="commonLabels")
    common_annotations: dict[str, str] = Field(
        default_factory=dict, alias="commonAnnotations"
    )
    external_url: str = Field("", alias="externalURL")
    alerts: list[WebhookAlert]

    @field_validator("version")
    @classmethod
    def _check_version(cls, version: str | None) -> str | None:
        if version is None or version == SUPPORTED_VERSION:
            return version
        raise ValueError(
            f"unsupported webhook version {version!r}: this endpoint accepts "
            f"Alertmanager webhook version {SUPPORTED_VERSION}. Send alerts through "
            "an Alertmanager webhook_configs receiver; Grafana-managed contact "
            "points send version 1, so route them through an Alertmanager"
        )


class PlanEntry(BaseModel):
    """The alerts of one application in one webhook body, in body order."""

    namespace: str
    app: str
    alerts: list[AlertSignal]
    trace_id: str = Field(
        default="", description="set by the intake route before the entry is started"
    )

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.app}"

    @property
    def workflow_id(self) -> str:
        return incident_workflow_id(self.namespace, self.app)

    @property
    def firing(self) -> list[AlertSignal]:
        return [alert for alert in self.alerts if alert.status == "firing"]

    @property
    def resolved(self) -> list[AlertSignal]:
        return [alert for alert in self.alerts if alert.status == "resolved"]


class UnroutableAlert(BaseModel):
    """An alert that maps to no application and so starts nothing."""

    fingerprint: str
    alertname: str = ""
    status: str
    reason: str


class IntakePlan(BaseModel):
    """The incidents that one webhook body requests, one entry per application key."""

    entries: list[PlanEntry] = Field(default_factory=list)
    unroutable: list[UnroutableAlert] = Field(default_factory=list)
    duplicates: int = Field(
        default=0, description="alerts dropped because their fingerprint repeated"
    )
    truncated_alerts: int = Field(
        default=0,
        description="alerts Alertmanager left out of the body (max_alerts); the "
        "plan covers only the listed alerts",
    )


class LabelMap(BaseModel):
    """The alert labels that name the namespace and the app, tried in order."""

    namespace_labels: tuple[str, ...] = ("namespace",)
    app_labels: tuple[str, ...] = ("app", "service", "job")
    default_namespace: str = ""

    @classmethod
    def from_settings(cls, settings: IntakeSettings) -> LabelMap:
        return cls(
            namespace_labels=_split_names(settings.namespace_labels),
            app_labels=_split_names(settings.app_labels),
            default_namespace=settings.default_namespace.strip(),
        )


def _split_names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def is_dns1123_label(value: str) -> bool:
    """Check a Kubernetes name: lower-case alphanumerics and '-', at most 63."""
    return (
        len(value) <= DNS1123_LABEL_MAX_LENGTH
        and _DNS1123_LABEL.fullmatch(value) is not None
    )


def incident_workflow_id(namespace: str, app: str) -> str:
    """Build the incident workflow id `incident-<namespace>-<app>`.

    NOTE: the id format joins two names that may contain '-', so namespace
    `team-a` with app `api` and namespace `team` with app `a-api` share one id.
    """
    return f"incident-{namespace}-{app}"


def alert_fingerprint(alert: WebhookAlert) -> str:
    """Return the alert's own fingerprint, or a sha256 of its sorted labels.

    The computed form keeps the first 16 hex digits, the width of Alertmanager's
    own fingerprints.
    """
    if alert.fingerprint:
        return alert.fingerprint
    canonical = json.dumps(sorted(alert.labels.items()), separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def parse_webhook(
    body: bytes | str | Mapping[str, Any] | WebhookMessage,
) -> WebhookMessage:
    """Validate a webhook body, raising `pydantic.ValidationError` naming the field."""
    if isinstance(body, WebhookMessage):
        return body
    if isinstance(body, bytes | str):
        return WebhookMessage.model_validate_json(body)
    return WebhookMessage.model_validate(body)


def route_alert(alert: WebhookAlert, label_map: LabelMap) -> tuple[str, str] | str:
    """Map an alert to `(namespace, app)`, or return why it cannot be routed.

    The first label of each list that is present and non-empty wins. An invalid
    value makes the alert unroutable instead of falling through to the next
    label, so a malformed `app` never routes an alert by its `job`.
    """
    alertname = alert.labels.get("alertname", "")
    if not alertname:
        return "missing or empty label alertname"

    found = _first_label(alert.labels, label_map.namespace_labels)
    if found is None:
        namespace_source, namespace = "default namespace", label_map.default_namespace
    else:
        label, namespace = found
        namespace_source = f"label {label}"
    if not namespace:
        labels = ", ".join(label_map.namespace_labels) or "(none)"
        return f"no namespace label ({labels}) and no default namespace is set"
    if not is_dns1123_label(namespace):
        return (
            f"{namespace_source} value {namespace[:80]!r} is not a valid Kubernetes "
            "namespace (DNS-1123 label)"
        )

    app = _first_label(alert.labels, label_map.app_labels)
    if app is None:
        labels = ", ".join(label_map.app_labels) or "(none)"
        return f"no app label ({labels})"
    app_source, app_name = app
    if not is_dns1123_label(app_name):
        return (
            f"label {app_source} value {app_name[:80]!r} is not a valid Kubernetes "
            "name (DNS-1123 label)"
        )
    return namespace, app_name


def _first_label(
    labels: Mapping[str, str], names: tuple[str, ...]
) -> tuple[str, str] | None:
    for name in names:
        value = labels.get(name, "")
        if value:
            return name, value
    return None


def to_alert_signal(alert: WebhookAlert, fingerprint: str) -> AlertSignal:
    return AlertSignal(
        fingerprint=fingerprint,
        status=alert.status,
        alertname=alert.labels.get("alertname", ""),
        labels=alert.labels,
        annotations=alert.annotations,
        starts_at=alert.starts_at,
        ends_at=alert.ends_at,
        generator_url=alert.generator_url,
    )


def plan_incidents(
    body: bytes | str | Mapping[str, Any] | WebhookMessage,
    settings: Settings | IntakeSettings,
) -> IntakePlan:
    """Validate a webhook body and group its alerts per application key.

    Each alert is judged by its own `status`, never by the group's. Alerts that
    repeat a fingerprint within the body keep only the last occurrence, because
    Alertmanager keeps one alert per fingerprint and a repeat carries no news.
    Raises `pydantic.ValidationError` for a body that is not a version 4 webhook.
    """
    message = parse_webhook(body)
    intake = settings.intake if isinstance(settings, Settings) else settings
    label_map = LabelMap.from_settings(intake)

    # The last occurrence of a fingerprint wins, in the position of the first one.
    latest: dict[str, tuple[WebhookAlert, int]] = {}
    for index, alert in enumerate(message.alerts):
        latest[alert_fingerprint(alert)] = (alert, index)
    duplicates = len(message.alerts) - len(latest)

    entries: dict[tuple[str, str], list[tuple[int, AlertSignal]]] = {}
    unroutable: list[UnroutableAlert] = []
    for fingerprint, (alert, index) in latest.items():
        route = route_alert(alert, label_map)
        if isinstance(route, str):
            unroutable.append(
                UnroutableAlert(
                    fingerprint=fingerprint,
                    alertname=alert.labels.get("alertname", ""),
                    status=alert.status,
                    reason=route,
                )
            )
            continue
        entries.setdefault(route, []).append(
            (index, to_alert_signal(alert, fingerprint))
        )

    plan_entries = [
        PlanEntry(
            namespace=namespace,
            app=app,
            alerts=[signal for _, signal in sorted(indexed, key=lambda pair: pair[0])],
        )
        for (namespace, app), indexed in entries.items()
    ]
    return IntakePlan(
        entries=plan_entries,
        unroutable=unroutable,
        duplicates=duplicates,
        truncated_alerts=message.truncated_alerts,
    )
