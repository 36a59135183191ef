"""`chatbot-api keys create|list|revoke`, and the check that keeps `AUTH_MODE=disabled` off
public addresses. `cli.py` wires these in.

`keys create` prints the new key as the last line of its output, so scripts can take it with
`tail -n 1`; it is never printed again.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from chatbot_api.auth import keys, service
from chatbot_api.auth.models import KeyScope
from chatbot_api.config import Settings
from chatbot_api.db import create_engine, create_sessionmaker
from chatbot_api.errors import NotFound

T = TypeVar("T")


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def display_url(host: str, port: int) -> str:
    """Where a client on this machine reaches the server: a wildcard bind is shown as
    loopback."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def refuse_public_without_auth(settings: Settings, host: str) -> str | None:
    """Why `serve` must not start, or None. With auth disabled anyone who can reach the port
    is the local user, so only a loopback bind is allowed unless it is forced explicitly."""
    auth = settings.auth
    if auth.mode != "disabled" or is_loopback(host) or auth.allow_disabled_on_public:
        return None
    return (
        f"refusing to serve on {host} with AUTH_MODE=disabled: anyone who can reach it would "
        "have full access. Bind 127.0.0.1, turn auth on, or set "
        "AUTH_ALLOW_DISABLED_ON_PUBLIC=true if something in front of it authenticates."
    )


def _in_transaction(settings: Settings, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    async def run() -> T:
        engine = create_engine(settings.db)
        try:
            async with create_sessionmaker(engine).begin() as session:
                return await work(session)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _secret(settings: Settings) -> str:
    return settings.auth.server_secret.get_secret_value()


def cmd_create(args: argparse.Namespace, settings: Settings) -> int:
    try:
        expires_in = None if args.expires_in is None else service.parse_expires_in(args.expires_in)
    except ValueError as exc:
        sys.stderr.write(f"--expires-in: {exc}\n")
        return 2

    async def work(session: AsyncSession) -> service.IssuedKey:
        return await service.create_key(
            session,
            user=args.user or args.name,
            name=args.name,
            scope=KeyScope.ADMIN if args.admin else KeyScope.USER,
            server_secret=_secret(settings),
            expires_in=expires_in,
            requests_per_minute=args.rpm,
            concurrent_streams=args.concurrent_streams,
            tokens_per_day=args.tokens_per_day,
        )

    issued = _in_transaction(settings, work)
    key = issued.key
    expires = key.expires_at.isoformat() if key.expires_at else "never"
    sys.stdout.write(
        f"Created {key.scope} key {key.id} ({key.name!r}) for {issued.principal.name!r}, "
        f"expires {expires}.\nStore it now; it is not shown again:\n{issued.secret}\n"
    )
    return 0


def cmd_list(_args: argparse.Namespace, settings: Settings) -> int:
    rows = _in_transaction(settings, service.list_keys)
    header = ("ID", "NAME", "USER", "SCOPE", "HINT", "CREATED", "EXPIRES", "STATUS")
    lines = [header]
    for key, principal in rows:
        status = "revoked" if key.revoked_at else "active"
        lines.append(
            (
                str(key.id),
                key.name,
                principal.name,
                key.scope,
                keys.display_hint(key.hint),
                key.created_at.strftime("%Y-%m-%d %H:%M"),
                key.expires_at.strftime("%Y-%m-%d %H:%M") if key.expires_at else "never",
                status,
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    for row in lines:
        sys.stdout.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        sys.stdout.write("\n")
    return 0


def cmd_revoke(args: argparse.Namespace, settings: Settings) -> int:
    try:
        key_id = uuid.UUID(args.id)
    except ValueError:
        sys.stderr.write(f"no such key: {args.id}\n")
        return 1

    async def work(session: AsyncSession) -> None:
        await service.revoke_key(session, key_id)

    try:
        _in_transaction(settings, work)
    except NotFound:
        sys.stderr.write(f"no such key: {args.id}\n")
        return 1
    sys.stdout.write(f"Revoked key {key_id}.\n")
    return 0


def _run(handler: Callable[[argparse.Namespace, Settings], int]) -> Callable[..., int]:
    """Settings from the environment, and the schema brought up to date, before `handler`."""

    def run(args: argparse.Namespace) -> int:
        from chatbot_api import migrate

        settings = Settings()
        migrate.upgrade(settings.db.url)
        return handler(args, settings)

    return run


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def add_keys_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `keys create|list|revoke` to the `chatbot-api` parser."""
    run = _run
    group = sub.add_parser("keys", help="create, list and revoke API keys")
    actions = group.add_subparsers(dest="action", required=True)

    create = actions.add_parser("create", help="create a key; prints it once, as the last line")
    create.add_argument("--name", required=True, help="what the key is for")
    create.add_argument("--user", help="the principal that owns it (default: --name)")
    create.add_argument("--admin", action="store_true", help="admin scope (manages keys)")
    create.add_argument("--expires-in", help="lifetime such as 30d, 12h or 45m (default: never)")
    create.add_argument("--rpm", type=_positive, help="requests per minute (default: server's)")
    create.add_argument("--concurrent-streams", type=_positive, help="generations at once")
    create.add_argument(
        "--tokens-per-day", type=_positive, help="prompt + completion tokens per day"
    )
    create.set_defaults(handler=run(cmd_create))

    listing = actions.add_parser("list", help="list keys (never their secrets)")
    listing.set_defaults(handler=run(cmd_list))

    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("id")
    revoke.set_defaults(handler=run(cmd_revoke))
