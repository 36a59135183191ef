"""Fixtures shared by the chaos tests: a PostgreSQL engine for the audits and a pool of
real server processes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from chatbot_api.testing.fake_llm import FakeLLM
from tests.chaos import ServerPool, postgres_engine


@pytest.fixture
async def engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    async with postgres_engine(postgres_url) as engine:
        yield engine


@pytest.fixture
async def servers(fake_llm: FakeLLM, tmp_path: Path) -> AsyncIterator[ServerPool]:
    pool = ServerPool(tmp_path, fake_llm.base_url)
    try:
        yield pool
    finally:
        await pool.aclose()
