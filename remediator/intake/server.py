"""Serve the intake with uvicorn: `remediator serve`."""

from __future__ import annotations

import logging

import uvicorn

from remediator.intake.app import TemporalStarter, create_app
from remediator.settings import Settings
from remediator.temporal import connect

logger = logging.getLogger(__name__)


async def serve(settings: Settings, host: str, port: int) -> None:
    """Connect lazily to Temporal and serve the intake until a stop signal."""
    client = await connect(settings.temporal, lazy=True)
    app = create_app(settings, TemporalStarter(client, settings))
    logger.info("Intake listens on http://%s:%s.", host, port)
    config = uvicorn.Config(app, host=host, port=port, log_level="info")
    await uvicorn.Server(config).serve()
