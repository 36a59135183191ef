"""First start: with no API key in the database, create an admin key and print it once, with
a ready-to-paste curl line, as Jupyter prints its token.

Runs in the app's lifespan, in one short transaction. With several workers starting at
once, each tries; the principal insert can only succeed once (unique name), so the others
roll back and print nothing. The key goes to stdout only, never to the logs.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chatbot_api.auth import service
from chatbot_api.errors import is_transient_db_error

logger = logging.getLogger(__name__)


def banner(secret: str, base_url: str) -> str:
    rule = "=" * 78
    return "\n".join(
        [
            rule,
            "No API key existed, so an admin key was created. It is shown only this once:",
            "",
            f"    {secret}",
            "",
            "Try it:",
            f'    curl -H "Authorization: Bearer {secret}" {base_url}/api/v1/conversations',
            "",
            f"Swagger UI: {base_url}/docs (Authorize, then paste the key)",
            "More keys:  chatbot-api keys create --name NAME [--user USER] [--admin]",
            rule,
            "",
        ]
    )


async def bootstrap(
    sessionmaker: async_sessionmaker[AsyncSession],
    *,
    server_secret: str,
    base_url: str,
    create_admin_key: bool,
    out: TextIO | None = None,
) -> bool:
    """Make sure the local principal exists and, on a first start, create and print the
    admin key. Returns whether this process created it."""
    try:
        async with sessionmaker.begin() as session:
            await service.ensure_local_principal(session)
            issued = (
                await service.create_bootstrap_key(session, server_secret=server_secret)
                if create_admin_key
                else None
            )
    except (IntegrityError, OperationalError) as exc:
        # Another process got there first (unique principal name, or SQLite's write lock),
        # or the database is away: the server still starts, and readiness reports it.
        logger.info("no first key created here (%s)", type(exc).__name__)
        return False
    except Exception as exc:
        if not is_transient_db_error(exc):
            raise
        logger.warning("could not check for API keys: %s", type(exc).__name__)
        return False
    if issued is None:
        return False
    stream = out or sys.stdout
    stream.write(banner(issued.secret, base_url.rstrip("/")))
    stream.flush()
    logger.warning("created the first admin key (id %s); it was printed once", issued.key.id)
    return True
