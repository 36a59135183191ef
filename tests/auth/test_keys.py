"""Key material and storage: high-entropy keys with a scannable prefix, only an HMAC of each
stored, lookups by that hash, and keys that expire or are revoked."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from chatbot_api.auth import keys, service
from chatbot_api.auth.models import KeyScope
from chatbot_api.db import utcnow
from chatbot_api.errors import InvalidApiKey
from chatbot_api.sql import run_transaction
from tests.conftest import TEST_SERVER_SECRET


async def new_key(
    app: FastAPI, user: str, *, scope: KeyScope = KeyScope.USER, name: str = "k", **options: Any
) -> service.IssuedKey:
    """A key for `user`, committed (`service.create_key` in a transaction of its own)."""
    async with app.state.sessionmaker.begin() as session:
        return await service.create_key(
            session,
            user=user,
            name=name,
            scope=scope,
            server_secret=TEST_SERVER_SECRET,
            **options,
        )


async def authenticate(
    app: FastAPI, secret: str, server_secret: str, *, now: datetime | None = None
) -> service.KeyHolder:
    """`service.authenticate` as the auth dependency runs it: one statement on the pool."""
    return await run_transaction(
        app.state.engine,
        lambda tx: service.authenticate(tx, secret=secret, server_secret=server_secret, now=now),
        single_statement=True,
    )


class TestKeyMaterial:
    def test_keys_are_prefixed_base62_with_256_bits(self) -> None:
        generated = {keys.generate_key() for _ in range(200)}

        assert len(generated) == 200
        for key in generated:
            assert re.fullmatch(r"cbk_[0-9A-Za-z]{43}", key)
            assert keys.looks_like_key(key)
        # 62**43 > 2**256: the body can hold every value of 32 random bytes.
        assert 62**keys.BODY_LENGTH > 2**256

    def test_hash_is_an_hmac_under_the_server_secret(self) -> None:
        key = keys.generate_key()

        digest = keys.hash_key(key, "secret-one")

        assert re.fullmatch(r"[0-9a-f]{64}", digest)
        assert digest == keys.hash_key(key, "secret-one")
        assert digest != keys.hash_key(key, "secret-two")
        assert key not in digest

    def test_hint_reveals_a_few_characters_only(self) -> None:
        key = keys.generate_key()

        assert keys.hint(key) == key[4:10]
        assert keys.display_hint(keys.hint(key)) == key[:10] + "…"

    @pytest.mark.parametrize(
        "value",
        ["", "cbk_", "cbk_short", "sk-" + "a" * 43, "cbk_" + "a" * 42 + "!", " cbk_" + "a" * 43],
    )
    def test_malformed_keys_are_recognised(self, value: str) -> None:
        assert not keys.looks_like_key(value)

    @pytest.mark.parametrize(
        ("text", "expected"),
        [("30d", timedelta(days=30)), ("12h", timedelta(hours=12)), ("45m", timedelta(minutes=45))],
    )
    def test_lifetimes_parse(self, text: str, expected: timedelta) -> None:
        assert service.parse_expires_in(text) == expected

    @pytest.mark.parametrize("text", ["", "30", "0d", "-1d", "1y", "10000d", "30 d", "٣d"])
    def test_bad_lifetimes_are_refused(self, text: str) -> None:
        with pytest.raises(ValueError, match="number followed by"):
            service.parse_expires_in(text)


class TestStorage:
    async def test_only_the_hash_is_stored(self, app: FastAPI, engine: AsyncEngine) -> None:
        issued = await new_key(app, "alice", name="laptop")
        async with engine.connect() as connection:
            rows = (await connection.execute(text("SELECT * FROM api_keys"))).mappings().all()

        dumped = repr([dict(r) for r in rows])
        assert issued.secret not in dumped
        assert issued.secret[4:] not in dumped
        assert keys.hash_key(issued.secret, TEST_SERVER_SECRET) in dumped

    async def test_authenticate_finds_the_key_and_its_principal(self, app: FastAPI) -> None:
        issued = await new_key(app, "bob", name="cli", scope=KeyScope.ADMIN)
        holder = await authenticate(app, issued.secret, TEST_SERVER_SECRET)

        assert holder == service.KeyHolder(
            key_id=issued.key.id,
            principal_id=issued.principal.id,
            principal_name="bob",
            scope=KeyScope.ADMIN,
            requests_per_minute=None,
            concurrent_streams=None,
            tokens_per_day=None,
        )

    async def test_authenticate_reads_the_keys_own_limits(self, app: FastAPI) -> None:
        issued = await new_key(
            app, "erin", requests_per_minute=7, concurrent_streams=2, tokens_per_day=9000
        )

        holder = await authenticate(app, issued.secret, TEST_SERVER_SECRET)

        assert (holder.scope, holder.principal_name) == (KeyScope.USER, "erin")
        assert (holder.requests_per_minute, holder.concurrent_streams) == (7, 2)
        assert holder.tokens_per_day == 9000

    async def test_the_same_user_gets_one_principal_for_many_keys(self, app: FastAPI) -> None:
        first = await new_key(app, "carol", name="a")
        second = await new_key(app, "carol", name="b")

        assert first.principal.id == second.principal.id
        assert first.secret != second.secret

    @pytest.mark.parametrize(
        ("change", "message"),
        [("revoke", "revoked"), ("expire", "expired"), ("other-secret", "not valid")],
    )
    async def test_dead_keys_are_refused(self, app: FastAPI, change: str, message: str) -> None:
        issued = await new_key(app, "dave", expires_in=timedelta(minutes=5))
        if change == "revoke":
            async with app.state.sessionmaker.begin() as session:
                await service.revoke_key(session, issued.key.id)
        now = utcnow() + (timedelta(minutes=6) if change == "expire" else timedelta())
        secret = "another-server-secret" if change == "other-secret" else TEST_SERVER_SECRET
        with pytest.raises(InvalidApiKey, match=message):
            await authenticate(app, issued.secret, secret, now=now)

    async def test_a_key_is_live_until_it_expires(self, app: FastAPI) -> None:
        issued = await new_key(app, "frank", expires_in=timedelta(minutes=5))
        soon = utcnow() + timedelta(minutes=4)
        holder = await authenticate(app, issued.secret, TEST_SERVER_SECRET, now=soon)

        assert holder.key_id == issued.key.id
