"""Keys made straight in a database, for servers that run in another process."""

from __future__ import annotations

import uuid
from typing import Any

from chatbot_api.auth import service
from chatbot_api.auth.models import KeyScope
from chatbot_api.config import DatabaseSettings
from chatbot_api.db import create_engine, create_sessionmaker
from tests.conftest import TEST_SERVER_SECRET

# What a server process needs in its environment to accept keys made by `key_in_database`,
# and limits that stay out of the way of tests that are not about them.
SERVER_ENV = {
    "AUTH_SERVER_SECRET": TEST_SERVER_SECRET,
    "RATE_LIMIT_REQUESTS_PER_MINUTE": "1000000",
    "RATE_LIMIT_CONCURRENT_STREAMS": "10000",
}


async def key_in_database(
    db_url: str, *, user: str | None = None, scope: KeyScope = KeyScope.USER, **limits: Any
) -> str:
    engine = create_engine(DatabaseSettings(_env_file=None, url=db_url))
    try:
        async with create_sessionmaker(engine).begin() as session:
            issued = await service.create_key(
                session,
                user=user or f"user-{uuid.uuid4().hex[:12]}",
                name="test key",
                scope=scope,
                server_secret=TEST_SERVER_SECRET,
                **limits,
            )
    finally:
        await engine.dispose()
    return issued.secret


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
