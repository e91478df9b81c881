"""Serve the intake with uvicorn: `remediator serve`."""

from __future__ import annotations

import logging

import uvicorn

from remediator.intake.app import connect_temporal_starter, create_app
from remediator.settings import Settings

logger = logging.getLogger(__name__)


async def serve(settings: Settings, host: str, port: int) -> None:
    """Connect lazily to Temporal and serve the intake until a stop signal."""
    app = create_app(settings, await connect_temporal_starter(settings))
    logger.info("Intake listens on http://%s:%s.", host, port)
    config = uvicorn.Config(app, host=host, port=port, log_level="info")
    await uvicorn.Server(config).serve()
