"""Escalation activity: tell humans that an incident needs them.

The incident workflow calls `escalate` for every outcome that a person has to
act on. Notifiers are pluggable: the log notifier always runs, and a generic
JSON webhook runs when `REMEDIATOR_ESCALATION_WEBHOOK_URL` is set. The webhook
receives the `EscalationInput` model as JSON: incident id, application,
outcome, reasons and the Web UI link.
"""

from __future__ import annotations

import logging

import httpx
from temporalio import activity

from workflows.models import EscalationInput

logger = logging.getLogger(__name__)


class EscalationActivities:
    """Send an escalation to every configured notifier."""

    def __init__(
        self,
        webhook_url: str = "",
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._webhook_url = webhook_url
        self._timeout = timeout
        self._transport = transport

    @activity.defn(name="escalate")
    async def escalate(self, request: EscalationInput) -> None:
        logger.warning(
            "Incident %s for %s/%s needs a human (%s): %s. See %s",
            request.incident_id,
            request.namespace,
            request.app,
            request.outcome,
            "; ".join(request.reasons) or "no reason given",
            request.web_ui_url or "the Temporal Web UI",
        )
        if not self._webhook_url:
            return
        async with httpx.AsyncClient(
            timeout=self._timeout, transport=self._transport
        ) as client:
            response = await client.post(
                self._webhook_url, json=request.model_dump(mode="json")
            )
            # A 4xx will not get better on retry; a 5xx or a timeout may.
            if response.status_code >= 500:
                response.raise_for_status()
            if response.status_code >= 400:
                logger.error(
                    "Escalation webhook rejected incident %s with HTTP %s.",
                    request.incident_id,
                    response.status_code,
                )
