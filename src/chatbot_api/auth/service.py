"""Principals and API keys: create, authenticate, list, revoke. Functions take the session
first and never commit; the caller's unit of work does (`SessionDep`, the CLI, the lifespan).
"""

from __future__ import annotations

import hmac
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import Table, bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from chatbot_api.auth import keys
from chatbot_api.auth.models import (
    LOCAL_PRINCIPAL_ID,
    LOCAL_PRINCIPAL_NAME,
    ApiKey,
    KeyScope,
    Principal,
)
from chatbot_api.db import utcnow
from chatbot_api.errors import InvalidApiKey, NotFound
from chatbot_api.sql import Prepared, Tx

BOOTSTRAP_PRINCIPAL = "admin"
# `30d`, `12h`, `45m`; the digit counts keep every lifetime under 10,000 days, so the schema
# alone says what is valid.
EXPIRES_IN_PATTERN = r"^([1-9][0-9]{0,3}d|[1-9][0-9]{0,4}h|[1-9][0-9]{0,5}m)$"
_UNITS = {"m": "minutes", "h": "hours", "d": "days"}


def parse_expires_in(text: str) -> timedelta:
    """A key's lifetime from `30d`, `12h` or `45m`."""
    if re.fullmatch(EXPIRES_IN_PATTERN, text) is None:
        raise ValueError("use a number followed by m, h or d, for example 30d")
    return timedelta(**{_UNITS[text[-1]]: int(text[:-1])})


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A new key: the row, its owner, and the secret, which exists only here."""

    key: ApiKey
    principal: Principal
    secret: str


async def get_or_create_principal(session: AsyncSession, name: str) -> Principal:
    principal = await session.scalar(select(Principal).where(Principal.name == name))
    if principal is None:
        principal = Principal(name=name)
        session.add(principal)
        await session.flush()
    return principal


async def ensure_local_principal(session: AsyncSession) -> Principal:
    """The single user of `AUTH_MODE=disabled` (the migration creates it; this re-creates
    it if someone deleted it)."""
    principal = await session.get(Principal, LOCAL_PRINCIPAL_ID)
    if principal is None:
        principal = Principal(id=LOCAL_PRINCIPAL_ID, name=LOCAL_PRINCIPAL_NAME)
        session.add(principal)
        await session.flush()
    return principal


async def issue_key(
    session: AsyncSession,
    *,
    principal: Principal,
    name: str,
    scope: KeyScope,
    server_secret: str,
    expires_in: timedelta | None = None,
    requests_per_minute: int | None = None,
    concurrent_streams: int | None = None,
    tokens_per_day: int | None = None,
) -> IssuedKey:
    """Create a key for `principal`. The secret is returned once and never stored."""
    secret = keys.generate_key()
    now = utcnow()
    key = ApiKey(
        principal_id=principal.id,
        name=name,
        hint=keys.hint(secret),
        secret_hash=keys.hash_key(secret, server_secret),
        scope=scope,
        created_at=now,
        expires_at=None if expires_in is None else now + expires_in,
        requests_per_minute=requests_per_minute,
        concurrent_streams=concurrent_streams,
        tokens_per_day=tokens_per_day,
    )
    session.add(key)
    await session.flush()
    return IssuedKey(key=key, principal=principal, secret=secret)


async def create_key(
    session: AsyncSession,
    *,
    user: str,
    name: str,
    scope: KeyScope,
    server_secret: str,
    expires_in: timedelta | None = None,
    requests_per_minute: int | None = None,
    concurrent_streams: int | None = None,
    tokens_per_day: int | None = None,
) -> IssuedKey:
    """Create a key for the principal called `user`, creating the principal if it is new."""
    principal = await get_or_create_principal(session, user)
    return await issue_key(
        session,
        principal=principal,
        name=name,
        scope=scope,
        server_secret=server_secret,
        expires_in=expires_in,
        requests_per_minute=requests_per_minute,
        concurrent_streams=concurrent_streams,
        tokens_per_day=tokens_per_day,
    )


@dataclass(frozen=True, slots=True)
class KeyHolder:
    """What a request needs of a live key: who holds it, its scope and its own limits."""

    key_id: uuid.UUID
    principal_id: uuid.UUID
    principal_name: str
    scope: KeyScope
    requests_per_minute: int | None
    concurrent_streams: int | None
    tokens_per_day: int | None


_keys_t, _principals_t = cast(Table, ApiKey.__table__), cast(Table, Principal.__table__)
# Every authenticated request runs this: a prepared statement (`chatbot_api.sql`), one round
# trip with no ORM entities, on a connection returned to the pool before the route runs.
KEY_BY_HASH = Prepared(
    select(
        _keys_t.c.id,
        _keys_t.c.secret_hash,
        _keys_t.c.scope,
        _keys_t.c.expires_at,
        _keys_t.c.revoked_at,
        _keys_t.c.requests_per_minute,
        _keys_t.c.concurrent_streams,
        _keys_t.c.tokens_per_day,
        _principals_t.c.id,
        _principals_t.c.name,
    )
    .join_from(_keys_t, _principals_t, _principals_t.c.id == _keys_t.c.principal_id)
    .where(_keys_t.c.secret_hash == bindparam("p_hash"))
)


async def authenticate(
    tx: Tx, *, secret: str, server_secret: str, now: datetime | None = None
) -> KeyHolder:
    """The holder of the live key whose secret this is; `InvalidApiKey` otherwise. Read fresh
    on every call: a key revoked in any process is refused at its next request."""
    if not keys.looks_like_key(secret):
        raise InvalidApiKey("The API key is not valid.")
    digest = keys.hash_key(secret, server_secret)
    row = await tx.first(KEY_BY_HASH, {"p_hash": digest})
    if row is None or not hmac.compare_digest(row[1], digest):
        raise InvalidApiKey("The API key is not valid.")
    key_id, _, scope, expires_at, revoked_at, per_minute, streams, per_day, owner, name = row
    if revoked_at is not None:
        raise InvalidApiKey("The API key has been revoked.")
    if expires_at is not None and expires_at <= (now or utcnow()):
        raise InvalidApiKey("The API key has expired.")
    return KeyHolder(key_id, owner, name, KeyScope(scope), per_minute, streams, per_day)


async def list_keys(session: AsyncSession) -> Sequence[tuple[ApiKey, Principal]]:
    """Every key, oldest first, with its principal. Secrets are not stored, so not listed."""
    rows = await session.execute(
        select(ApiKey, Principal)
        .join(Principal, Principal.id == ApiKey.principal_id)
        .order_by(ApiKey.created_at, ApiKey.id)
    )
    return [(key, principal) for key, principal in rows]


def key_not_found() -> NotFound:
    return NotFound("API key not found.")


async def get_key(session: AsyncSession, key_id: uuid.UUID) -> tuple[ApiKey, Principal]:
    row = (
        await session.execute(
            select(ApiKey, Principal)
            .join(Principal, Principal.id == ApiKey.principal_id)
            .where(ApiKey.id == key_id)
        )
    ).first()
    if row is None:
        raise key_not_found()
    key, principal = row
    return key, principal


async def revoke_key(session: AsyncSession, key_id: uuid.UUID) -> tuple[ApiKey, Principal]:
    """Revoke a key (idempotent: revoking it again keeps the first time)."""
    key, principal = await get_key(session, key_id)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        await session.flush()
    return key, principal


async def any_key_exists(session: AsyncSession) -> bool:
    return await session.scalar(select(ApiKey.id).limit(1)) is not None


async def create_bootstrap_key(session: AsyncSession, *, server_secret: str) -> IssuedKey | None:
    """The first admin key, when no key has ever been created. Its principal is inserted,
    never looked up, so when several processes start at once only one insert can succeed:
    the others fail on the unique name and roll back (see `auth.bootstrap`)."""
    if await any_key_exists(session):
        return None
    principal = Principal(name=BOOTSTRAP_PRINCIPAL)
    session.add(principal)
    await session.flush()
    return await issue_key(
        session,
        principal=principal,
        name="bootstrap admin key",
        scope=KeyScope.ADMIN,
        server_secret=server_secret,
    )
