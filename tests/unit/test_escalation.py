"""The escalate activity: log line always, JSON webhook when configured."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from temporalio.testing import ActivityEnvironment

from activities.escalation import EscalationActivities
from workflows.models import EscalationInput

REQUEST = EscalationInput(
    incident_id="incident-shop-cart-1a2b3c4d",
    namespace="shop",
    app="cart",
    outcome="budget-exhausted",
    reasons=["rollback budget exhausted; next slot frees at 12:30"],
    web_ui_url="http://127.0.0.1:8233/namespaces/default/workflows/incident-shop-cart",
)


async def test_escalation_logs_without_webhook(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="activities.escalation")
    await ActivityEnvironment().run(EscalationActivities().escalate, REQUEST)
    assert "incident-shop-cart-1a2b3c4d" in caplog.text
    assert "budget-exhausted" in caplog.text


async def test_escalation_posts_json_to_webhook() -> None:
    received: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        received.append(json.loads(request.content))
        return httpx.Response(204)

    activities = EscalationActivities(
        "http://127.0.0.1:9/hook", transport=httpx.MockTransport(handler)
    )
    await ActivityEnvironment().run(activities.escalate, REQUEST)
    assert received[0]["outcome"] == "budget-exhausted"
    assert received[0]["web_ui_url"].endswith("/incident-shop-cart")


async def test_escalation_webhook_5xx_is_retried() -> None:
    activities = EscalationActivities(
        "http://127.0.0.1:9/hook",
        transport=httpx.MockTransport(lambda request: httpx.Response(503)),
    )
    with pytest.raises(httpx.HTTPStatusError):
        await ActivityEnvironment().run(activities.escalate, REQUEST)
