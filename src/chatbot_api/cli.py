"""The `chatbot-api` command: `serve`, `migrate` and `keys`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from chatbot_api.auth import cli as auth_cli
from chatbot_api.config import Settings, default_workers


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Alembic announces each of its plugins at INFO; the migrations it runs are what matter.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def _migrate(settings: Settings) -> None:
    from chatbot_api import migrate

    migrate.upgrade(settings.db.url)


# Connections PostgreSQL keeps for superusers and for the operator's own psql sessions.
RESERVED_CONNECTIONS = 5


def connection_budget_warning(
    max_connections: int, *, workers: int, pool_size: int, max_overflow: int
) -> str | None:
    """Why the workers' pools could exhaust PostgreSQL's `max_connections`, or None."""
    wanted = workers * (pool_size + max_overflow)
    room = max_connections - RESERVED_CONNECTIONS
    if wanted <= room:
        return None
    fit = max(1, room // workers)
    return (
        f"{workers} workers x (DB_POOL_SIZE={pool_size} + DB_MAX_OVERFLOW={max_overflow}) = "
        f"{wanted} connections, but PostgreSQL allows {max_connections} "
        f"({RESERVED_CONNECTIONS} kept for others): under load some requests would fail. "
        f"Lower DB_POOL_SIZE + DB_MAX_OVERFLOW to {fit} per worker, or raise max_connections."
    )


async def _max_connections(url: str, connect_timeout: float) -> int | None:
    import asyncpg
    from sqlalchemy.engine import make_url

    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        connection = await asyncpg.connect(dsn, timeout=connect_timeout)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return None  # serving will report the database itself
    try:
        return int(await connection.fetchval("SHOW max_connections"))
    finally:
        await connection.close()


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = Settings()
    _configure_logging(settings.log_level)
    refusal = auth_cli.refuse_public_without_auth(settings, args.host)
    if refusal is not None:
        sys.stderr.write(f"chatbot-api: {refusal}\n")
        return 2
    if "public_url" not in settings.auth.model_fields_set:
        # The workers read it for the first-start curl line.
        os.environ["AUTH_PUBLIC_URL"] = auth_cli.display_url(args.host, args.port)
    if args.migrate:
        _migrate(settings)
    workers = args.workers
    if workers is None:
        # SQLite has one writer: more processes only add lock contention.
        workers = 1 if settings.db.is_sqlite else default_workers()
    if not settings.db.is_sqlite:
        limit = asyncio.run(_max_connections(settings.db.url, settings.db.connect_timeout))
        warning = limit and connection_budget_warning(
            limit,
            workers=workers,
            pool_size=settings.db.pool_size,
            max_overflow=settings.db.max_overflow,
        )
        if warning:
            logging.getLogger(__name__).warning("%s", warning)
    uvicorn.run(
        "chatbot_api.main:app_factory",
        factory=True,
        host=args.host,
        port=args.port,
        workers=workers,
        # No WebSocket routes: not loading a WebSocket implementation saves about 1 MB.
        ws="none",
        log_level=settings.log_level.lower(),
        proxy_headers=args.proxy_headers,
        timeout_graceful_shutdown=args.graceful_timeout,
    )
    return 0


def cmd_migrate(_args: argparse.Namespace) -> int:
    settings = Settings()
    _configure_logging(settings.log_level)
    _migrate(settings)
    logging.getLogger(__name__).info("database schema is up to date")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatbot-api", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the API (applies pending migrations first)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--workers", type=int, default=None, help="processes (default: 1 on SQLite, else cores)"
    )
    serve.add_argument(
        "--migrate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="apply pending migrations before serving (--no-migrate for multi-replica deploys)",
    )
    serve.add_argument("--proxy-headers", action="store_true", help="trust X-Forwarded-* headers")
    serve.add_argument(
        "--graceful-timeout", type=int, default=30, help="seconds to let open streams finish"
    )
    serve.set_defaults(handler=cmd_serve)

    migrate = sub.add_parser("migrate", help="upgrade the database schema to the latest version")
    migrate.set_defaults(handler=cmd_migrate)
    auth_cli.add_keys_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = args.handler
    result: int = handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
