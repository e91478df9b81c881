"""The orchestrator worker: incident, budget and sweep workflows, every I/O activity.

It polls the `remediation` task queue and may run on any node. `remediator
worker orchestrator` and the demo stack start it through `build_worker`.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import Worker

from activities.argocd import ArgoCDActivities
from activities.budget import BudgetActivities
from activities.escalation import EscalationActivities
from activities.gitops.activities import GitOpsActivities
from activities.incidents import IncidentActivities
from activities.policy import PolicyActivities
from activities.prometheus import signal_activities_for
from remediator.settings import Settings
from workflows.budget import RollbackBudgetWorkflow
from workflows.incident import IncidentWorkflow
from workflows.sweep import DetectionSweepWorkflow

# Longer than the longest heartbeat interval, so a running sync wait can record
# its progress before the worker leaves.
GRACEFUL_SHUTDOWN = timedelta(seconds=20)


def _argocd_activities(settings: Settings):
    """Return the Argo CD backend that the settings choose."""
    if settings.argocd.backend == "kubernetes":
        from activities.argocd_kubernetes import KubernetesArgoCDActivities

        return KubernetesArgoCDActivities(settings.argocd)
    return ArgoCDActivities(settings.argocd)


def build_worker(client: Client, settings: Settings) -> Worker:
    """Create the orchestrator worker for the settings' task queue."""
    argocd = _argocd_activities(settings)
    gitops = GitOpsActivities(settings.git, argocd.get_application)
    signals = signal_activities_for(settings)
    policy = PolicyActivities(settings.policy)
    budget = BudgetActivities(client, settings.temporal.task_queue)
    incidents = IncidentActivities(client, settings)
    escalation = EscalationActivities(
        settings.escalation.webhook_url, settings.escalation.timeout_seconds
    )
    return Worker(
        client,
        task_queue=settings.temporal.task_queue,
        workflows=[IncidentWorkflow, RollbackBudgetWorkflow, DetectionSweepWorkflow],
        activities=[
            signals.collect_evidence,
            signals.verify_interval,
            gitops.find_change,
            gitops.open_pull_request,
            gitops.merge_pull_request,
            gitops.close_pull_request,
            argocd.wait_for_sync,
            policy.decide,
            budget.read_budget,
            budget.reserve_budget,
            budget.release_budget,
            escalation.escalate,
            signals.discover_applications,
            incidents.open_incident,
        ],
        graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
    )
