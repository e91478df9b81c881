"""Replay the recorded histories of every demo scenario against today's code.

A change to a workflow that alters the commands it issues for a recorded
history (an added activity, a reordered timer) fails here before it can break
incidents that are running in production. `make histories` records the
histories again after an intended, versioned change.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer
from temporalio.workflow import NondeterminismError

from remediator.cli import SCENARIOS
from tests.replay.changed_workflow import IncidentWorkflowWithExtraActivity
from workflows.budget import RollbackBudgetWorkflow
from workflows.incident import IncidentWorkflow
from workflows.sweep import DetectionSweepWorkflow

HISTORIES = Path(__file__).resolve().parents[1] / "histories"
HISTORY_FILES = sorted(HISTORIES.glob("*.json"))


def load(path: Path) -> WorkflowHistory:
    return WorkflowHistory.from_json(path.stem, path.read_text(encoding="utf-8"))


def test_every_scenario_has_a_history() -> None:
    recorded = {path.name.split("-incident-")[0] for path in HISTORY_FILES}
    assert recorded >= set(SCENARIOS)


@pytest.mark.parametrize("path", HISTORY_FILES, ids=lambda path: path.stem)
async def test_history_replays(path: Path) -> None:
    replayer = Replayer(
        workflows=[IncidentWorkflow, RollbackBudgetWorkflow, DetectionSweepWorkflow],
        data_converter=pydantic_data_converter,
    )
    await replayer.replay_workflow(load(path))


async def test_added_activity_fails_replay() -> None:
    incident_history = next(p for p in HISTORY_FILES if "-incident-" in p.name)
    replayer = Replayer(
        workflows=[IncidentWorkflowWithExtraActivity],
        data_converter=pydantic_data_converter,
    )
    with pytest.raises(NondeterminismError):
        await replayer.replay_workflow(load(incident_history))
