"""Tests of Alertmanager webhook parsing and per-application planning."""

from __future__ import annotations

import hashlib
import json

import pytest
from pydantic import ValidationError

from remediator.intake.alertmanager import (
    alert_fingerprint,
    incident_workflow_id,
    is_dns1123_label,
    parse_webhook,
    plan_incidents,
)
from remediator.settings import IntakeSettings, Settings

# Group status "firing" with one resolved member, empty alertnames and no
# envelope fields beyond receiver and status (Alertmanager 0.9 as reported).
MIXED_STATUS_BODY = {
    "receiver": "def-recv",
    "status": "firing",
    "alerts": [
        {"status": "firing", "labels": {"alertname": ""}},
        {"status": "resolved", "labels": {"alertname": ""}},
    ],
}


def ha_body(group_key: str, receiver: str) -> dict:
    """One alert as two HA Alertmanager peers send it: same fingerprint,
    group keys that differ only in the order of the route matchers."""
    labels = {
        "alertname": "CheckoutErrors",
        "namespace": "shop",
        "app": "checkout",
        "severity": "page",
    }
    return {
        "version": "4",
        "groupKey": group_key,
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": receiver,
        "groupLabels": {"alertname": "CheckoutErrors"},
        "commonLabels": labels,
        "commonAnnotations": {},
        "externalURL": "http://alertmanager-1.example:9093",
        "alerts": [
            {
                "status": "firing",
                "labels": labels,
                "annotations": {},
                "startsAt": "2017-06-21T16:10:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "",
                "fingerprint": "3f8a9c0d2b7e4a61",
            }
        ],
    }


HA_BODIES = [
    ha_body(
        '{}/{perimeter=~"^(?:obs)$"}/{severity=~"^(?:page)$",alertname=~"^(?:C.*)$"}'
        ':{alertname="CheckoutErrors"}',
        "web\\.hook",
    ),
    ha_body(
        '{}/{perimeter=~"^(?:obs)$"}/{alertname=~"^(?:C.*)$",severity=~"^(?:page)$"}'
        ':{alertname="CheckoutErrors"}',
        "example-ns/example-config/team\\.webhook",
    ),
]

EMPTY_ALERTS_BODY = {
    "version": "4",
    "groupKey": '{}/{severity="ticket"}:{group="production"}',
    "truncatedAlerts": 0,
    "status": "firing",
    "receiver": "jira",
    "groupLabels": {"group": "production"},
    "commonLabels": {"group": "production", "severity": "ticket"},
    "commonAnnotations": {},
    "externalURL": "http://alertmanager-1.example:9093",
    "alerts": [],
}

# A Grafana-managed contact point: Alertmanager's shape with version "1",
# extra fields, a timestamped groupKey and one truncated alert.
GRAFANA_BODY = {
    "receiver": "",
    "status": "resolved",
    "alerts": [
        {
            "status": "resolved",
            "labels": {"alertname": "TestAlert", "instance": "Grafana"},
            "annotations": {"summary": "Notification test"},
            "startsAt": "2022-08-31T05:54:04.52289368Z",
            "endsAt": "2022-08-31T10:30:00.52288431Z",
            "generatorURL": "",
            "fingerprint": "57c6d9296de2ad39",
            "silenceURL": "https://grafana.example/alerting/silence/new",
            "valueString": "[ metric='foo' labels={instance=bar} value=10 ]",
        }
    ],
    "groupLabels": {},
    "commonLabels": {"alertname": "TestAlert", "instance": "Grafana"},
    "externalURL": "https://grafana.example/",
    "version": "1",
    "groupKey": '{alertname="TestAlert"}2022-08-31 05:54:04 +0000 UTC m=+42208.25',
    "truncatedAlerts": 1,
    "orgId": 1,
    "title": "[RESOLVED:1]  (TestAlert Grafana)",
    "state": "alerting",
}


def storm_body(alerts: int) -> dict:
    """A grouped CrashLoopBackOff storm in one namespace, long labels repeated."""
    common = {
        "alertname": "pod_alert_stuck_waiting",
        "app": "prometheus",
        "chart": "prometheus-7.0.2",
        "component": "kube-state-metrics",
        "heritage": "Tiller",
        "instance": "192.0.2.64:8080",
        "job": "kubernetes-service-endpoints",
        "kubernetes_name": "mon-prometheus-kube-state-metrics",
        "namespace": "default",
        "reason": "CrashLoopBackOff",
        "release": "mon-prometheus",
        "severity": "alert",
    }
    return {
        "version": "4",
        "groupKey": '{}:{alertname="pod_alert_stuck_waiting"}',
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "remediation",
        "groupLabels": {"alertname": "pod_alert_stuck_waiting"},
        "commonLabels": common,
        "commonAnnotations": {"description": "Pod stuck in non-running state."},
        "externalURL": "http://alertmanager.example:9093",
        "alerts": [
            {
                "status": "firing",
                "labels": {
                    **common,
                    "container": f"example-storage-{index:04d}",
                    "pod": f"example-storage-{index:04d}-6796975jf8zd",
                },
                "annotations": {
                    "description": "Pod stuck in non-running state.",
                    "summary": f"Pod example-storage-{index:04d}-6796975jf8zd is "
                    "stuck in CrashLoopBackOff state.",
                },
                "startsAt": "2019-02-11T14:03:45.888Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus.example:9090/graph?g0.expr="
                "kube_pod_container_status_waiting_reason%7Breason%3D%22"
                "CrashLoopBackOff%22%7D+%3D%3D+1&g0.tab=1",
                "fingerprint": f"5a17c0de{index:08x}",
            }
            for index in range(alerts)
        ],
    }


def alert(status: str = "firing", **labels: str) -> dict:
    return {"status": status, "labels": {"alertname": "HighErrorRate", **labels}}


def body_of(*alerts: dict) -> dict:
    return {"version": "4", "status": "firing", "alerts": list(alerts)}


def error_locations(error: ValidationError) -> list[tuple]:
    return [tuple(detail["loc"]) for detail in error.errors()]


# --- parsing ---


def test_mixed_status_body_without_envelope_parses():
    message = parse_webhook(MIXED_STATUS_BODY)
    assert message.version is None
    assert [a.status for a in message.alerts] == ["firing", "resolved"]


def test_mixed_status_alerts_without_alertname_are_unroutable():
    # Both alerts have the same labels and no fingerprint, so they share one
    # identity: the later (resolved) one is kept and the other is a duplicate.
    plan = plan_incidents(MIXED_STATUS_BODY, Settings())
    assert plan.entries == []
    assert plan.duplicates == 1
    assert len(plan.unroutable) == 1
    assert plan.unroutable[0].status == "resolved"
    assert "alertname" in plan.unroutable[0].reason


def test_alerts_without_alertname_are_unroutable():
    body = body_of(
        {"status": "firing", "labels": {"alertname": "", "namespace": "a", "app": "b"}},
        {"status": "firing", "labels": {"namespace": "a", "app": "c"}},
    )
    plan = plan_incidents(body, Settings())
    assert plan.entries == []
    assert len(plan.unroutable) == 2
    assert all("alertname" in u.reason for u in plan.unroutable)


def test_per_alert_status_decides_not_group_status():
    body = body_of(
        alert("firing", namespace="shop", app="cart"),
        alert("resolved", namespace="shop", app="checkout"),
    )
    plan = plan_incidents(body, Settings())
    by_key = {entry.key: entry for entry in plan.entries}
    assert [a.status for a in by_key["shop/cart"].alerts] == ["firing"]
    assert by_key["shop/checkout"].firing == []
    assert len(by_key["shop/checkout"].resolved) == 1


def test_unknown_fields_are_accepted():
    body = body_of(alert(namespace="shop", app="cart"))
    body["orgId"] = 7
    body["alerts"][0]["silenceURL"] = "https://grafana.example/silence"
    plan = plan_incidents(body, Settings())
    assert [entry.key for entry in plan.entries] == ["shop/cart"]


def test_empty_alerts_list_plans_nothing():
    plan = plan_incidents(EMPTY_ALERTS_BODY, Settings())
    assert plan.entries == []
    assert plan.unroutable == []


def test_grafana_version_1_is_rejected_on_version():
    with pytest.raises(ValidationError) as caught:
        plan_incidents(GRAFANA_BODY, Settings())
    assert error_locations(caught.value) == [("version",)]
    message = caught.value.errors()[0]["msg"]
    assert "'1'" in message
    assert "Alertmanager" in message


def test_version_4_as_json_bytes_parses():
    raw = json.dumps(HA_BODIES[0]).encode()
    assert parse_webhook(raw).version == "4"


def test_missing_alerts_is_rejected():
    with pytest.raises(ValidationError) as caught:
        parse_webhook({"version": "4", "status": "firing"})
    assert error_locations(caught.value) == [("alerts",)]


def test_unknown_alert_status_is_rejected():
    with pytest.raises(ValidationError) as caught:
        parse_webhook(body_of(alert("pending", namespace="shop", app="cart")))
    assert error_locations(caught.value) == [("alerts", 0, "status")]


def test_invalid_json_is_rejected():
    with pytest.raises(ValidationError) as caught:
        parse_webhook(b'{"version": "4", "alerts": [')
    assert caught.value.errors()[0]["type"] == "json_invalid"


# --- routing ---


def test_app_label_order_is_app_service_job():
    body = body_of(
        alert(namespace="shop", app="cart", service="svc", job="jb"),
        alert(namespace="shop", service="payments", job="jb"),
        alert(namespace="shop", job="search"),
    )
    plan = plan_incidents(body, Settings())
    assert [entry.key for entry in plan.entries] == [
        "shop/cart",
        "shop/payments",
        "shop/search",
    ]


def test_namespace_labels_tried_in_order():
    settings = IntakeSettings(namespace_labels="kubernetes_namespace, namespace")
    body = body_of(
        alert(kubernetes_namespace="web", namespace="other", app="cart"),
        alert(namespace="shop", app="cart"),
    )
    plan = plan_incidents(body, settings)
    assert sorted(entry.key for entry in plan.entries) == ["shop/cart", "web/cart"]


def test_default_namespace_applies_without_label():
    plan = plan_incidents(
        body_of(alert(app="cart")), IntakeSettings(default_namespace="shop")
    )
    assert [entry.key for entry in plan.entries] == ["shop/cart"]


def test_missing_namespace_is_unroutable():
    plan = plan_incidents(body_of(alert(app="cart")), Settings())
    assert plan.entries == []
    assert "no namespace label" in plan.unroutable[0].reason


def test_missing_app_is_unroutable():
    plan = plan_incidents(body_of(alert(namespace="shop")), Settings())
    assert plan.entries == []
    assert "no app label" in plan.unroutable[0].reason


@pytest.mark.parametrize(
    "value",
    [
        "Cart",
        "cart_v2",
        "-cart",
        "cart-",
        "a" * 64,
        "../etc",
        "cart;rm -rf /",
        "shop/cart",
        "cart\n",
        "ca rt",
    ],
)
def test_invalid_app_label_is_unroutable(value):
    plan = plan_incidents(body_of(alert(namespace="shop", app=value)), Settings())
    assert plan.entries == []
    assert "not a valid Kubernetes name" in plan.unroutable[0].reason


def test_invalid_app_label_does_not_fall_through():
    body = body_of(alert(namespace="shop", app="Cart", job="search"))
    plan = plan_incidents(body, Settings())
    assert plan.entries == []
    assert len(plan.unroutable) == 1


def test_invalid_namespace_label_is_unroutable():
    plan = plan_incidents(body_of(alert(namespace="Shop", app="cart")), Settings())
    assert plan.entries == []
    assert "namespace" in plan.unroutable[0].reason


def test_dns1123_label_accepts_63_characters():
    assert is_dns1123_label("a" * 63)
    assert is_dns1123_label("0cart-9")
    assert not is_dns1123_label("")


def test_workflow_id_joins_namespace_and_app():
    assert incident_workflow_id("shop", "cart") == "incident-shop-cart"
    plan = plan_incidents(body_of(alert(namespace="shop", app="cart")), Settings())
    assert plan.entries[0].workflow_id == "incident-shop-cart"


# --- identity and grouping ---


def test_fingerprint_from_body_is_kept():
    plan = plan_incidents(HA_BODIES[0], Settings())
    assert plan.entries[0].alerts[0].fingerprint == "3f8a9c0d2b7e4a61"


def test_fingerprint_without_field_hashes_sorted_labels():
    first = parse_webhook(body_of(alert(namespace="shop", app="cart"))).alerts[0]
    reordered = parse_webhook(
        body_of(
            {
                "status": "firing",
                "labels": {
                    "app": "cart",
                    "namespace": "shop",
                    "alertname": "HighErrorRate",
                },
            }
        )
    ).alerts[0]
    expected = hashlib.sha256(
        json.dumps(sorted(first.labels.items()), separators=(",", ":")).encode()
    ).hexdigest()[:16]
    assert alert_fingerprint(first) == expected
    assert alert_fingerprint(reordered) == expected


def test_ha_duplicates_plan_one_incident():
    plans = [plan_incidents(body, Settings()) for body in HA_BODIES]
    workflow_ids = {entry.workflow_id for plan in plans for entry in plan.entries}
    fingerprints = {
        a.fingerprint for plan in plans for entry in plan.entries for a in entry.alerts
    }
    assert workflow_ids == {"incident-shop-checkout"}
    assert fingerprints == {"3f8a9c0d2b7e4a61"}


def test_group_key_never_reaches_the_plan():
    plan = plan_incidents(HA_BODIES[0], Settings())
    dumped = plan.model_dump_json()
    assert "perimeter" not in dumped
    assert "web\\\\.hook" not in dumped


def test_repeated_fingerprint_keeps_last_occurrence():
    first = {**alert("firing", namespace="shop", app="cart"), "fingerprint": "abc"}
    second = {**alert("resolved", namespace="shop", app="cart"), "fingerprint": "abc"}
    plan = plan_incidents(body_of(first, second), Settings())
    assert plan.duplicates == 1
    assert [a.status for a in plan.entries[0].alerts] == ["resolved"]


def test_truncated_alerts_is_reported():
    body = body_of(alert(namespace="shop", app="cart"))
    body["truncatedAlerts"] = 12
    plan = plan_incidents(body, Settings())
    assert plan.truncated_alerts == 12


def test_alert_signal_carries_alert_fields():
    body = body_of(
        {
            "status": "firing",
            "labels": {
                "alertname": "HighErrorRate",
                "namespace": "shop",
                "app": "cart",
            },
            "annotations": {"summary": "5xx above 5%"},
            "startsAt": "2024-05-01T10:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus.example/graph",
            "fingerprint": "f00d",
        }
    )
    signal = plan_incidents(body, Settings()).entries[0].alerts[0]
    assert signal.alertname == "HighErrorRate"
    assert signal.annotations == {"summary": "5xx above 5%"}
    assert signal.starts_at == "2024-05-01T10:00:00Z"
    assert signal.generator_url == "http://prometheus.example/graph"
    assert signal.fingerprint == "f00d"


def test_alert_storm_collapses_to_one_entry():
    body = storm_body(2200)
    raw = json.dumps(body).encode()
    assert len(raw) > 2_000_000
    plan = plan_incidents(raw, Settings())
    assert len(plan.entries) == 1
    assert plan.entries[0].key == "default/prometheus"
    assert len(plan.entries[0].alerts) == 2200
    assert plan.unroutable == []
