"""Limiters on both backends. The Redis one talks to the real Redis at `TEST_REDIS_URL`
(default 127.0.0.1:6379) under a key prefix of its own, deleted afterwards."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from chatbot_api.limits.base import Limiter
from chatbot_api.limits.memory import MemoryLimiter
from chatbot_api.limits.redis_store import RedisLimiter

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


async def delete_prefix(prefix: str) -> None:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A Redis key prefix no other test uses; its keys are deleted after the test."""
    prefix = f"chatbot-test:{uuid.uuid4().hex}:"
    yield prefix
    await delete_prefix(prefix)


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest, redis_prefix: str) -> AsyncIterator[Limiter]:
    created: Limiter = (
        MemoryLimiter()
        if request.param == "memory"
        else RedisLimiter(REDIS_URL, prefix=redis_prefix)
    )
    yield created
    await created.aclose()
