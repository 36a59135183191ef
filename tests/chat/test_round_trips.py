"""What a turn costs the database on PostgreSQL, counted in statements sent: each one is a
round trip, and under load a round trip is how long a connection stays checked out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from chatbot_api.testing.fake_llm import FakeLLM, Script
from tests.chat.helpers import send
from tests.conftest import client_for, create_conversation


def record_sent(engine: Any) -> list[Any]:
    """Every statement asyncpg sends on the engine's connections from now on, as asyncpg's
    `LoggedQuery` (its `query` and `args`)."""
    sent: list[Any] = []
    watched: set[int] = set()

    @event.listens_for(engine.sync_engine, "checkout")
    def watch(_dbapi: Any, record: Any, _proxy: Any) -> None:
        driver = record.driver_connection
        if id(driver) not in watched:
            watched.add(id(driver))
            driver.add_query_logger(sent.append)

    return sent


async def quiet_app(app_factory: Callable[..., Any], **overrides: Any) -> Any:
    """An app whose turns send nothing but their own statements: keys off (their lookup is
    one statement more) and no checkpoint during a turn."""
    return await app_factory(
        auth={"mode": "disabled"}, reliability={"stream_checkpoint_interval": 60}, **overrides
    )


def kinds(sent: list[Any]) -> list[str]:
    """The first two words of each statement `record_sent` recorded."""
    return [" ".join(logged.query.rstrip(";").split()[:2]) for logged in sent]


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
@pytest.mark.parametrize("system_prompt", [None, "Be brief."])
async def test_a_turn_is_two_statements_on_postgresql(
    app_factory: Callable[..., Any], fake_llm: FakeLLM, system_prompt: str | None
) -> None:
    app = await quiet_app(app_factory)
    fake_llm.default = Script(reply="Hello, Felipe.")
    async with client_for(app) as client:
        conversation_id = await create_conversation(client, system_prompt=system_prompt)
        await send(client, conversation_id, "Hola, soy Felipe")  # history from now on
        sent = record_sent(app.state.engine)

        response = await send(client, conversation_id, "What is my name?")

    assert response.status_code == 200, response.text
    assert "Felipe" in fake_llm.messages(1)[1]["content"]
    assert kinds(sent) == [
        "WITH claimed",  # the claim, both messages and the first page of history
        "WITH finished",  # the reply stored and the claim released
    ], sent


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_a_prompt_not_known_to_fit_is_counted_in_a_transaction(
    app_factory: Callable[..., Any], fake_llm: FakeLLM
) -> None:
    # 100 bytes of prompt in a 300-token window: it fits, but its size alone does not say so.
    app = await quiet_app(app_factory, llm={"context_window": 300, "max_tokens": 100})
    fake_llm.default = Script(reply="ok")
    async with client_for(app) as client:
        conversation_id = await create_conversation(client, system_prompt="Be brief. " * 10)
        await send(client, conversation_id, "hello")  # and the reaper's first pass is over
        sent = record_sent(app.state.engine)

        response = await send(client, conversation_id, "hi")

    assert response.status_code == 200, response.text
    assert kinds(sent) == [
        "WITH claimed",  # no row: the guard refused the prompt, and nothing was stored
        "SELECT conversations.busy_until",  # found, and free
        "BEGIN",
        "WITH claimed",
        "COMMIT",
        "WITH finished",
    ], sent


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_a_turn_with_a_new_idempotency_key_is_two_statements_and_a_retry_is_replayed(
    app_factory: Callable[..., Any], fake_llm: FakeLLM
) -> None:
    app = await quiet_app(app_factory)
    fake_llm.default = Script(reply="ok")

    async def keyed(client: httpx.AsyncClient, conversation_id: str) -> httpx.Response:
        return await client.post(
            f"/api/v1/conversations/{conversation_id}/messages",
            json={"message": "hi"},
            headers={"Idempotency-Key": "k-1"},
        )

    async with client_for(app) as client:
        conversation_id = await create_conversation(client)
        await send(client, conversation_id, "hello")  # and the reaper's first pass is over
        sent = record_sent(app.state.engine)

        response = await keyed(client, conversation_id)
        first = kinds(sent)
        sent.clear()
        retry = await keyed(client, conversation_id)

    assert response.status_code == retry.status_code == 200, response.text
    assert retry.json() == response.json()
    assert len(fake_llm.requests) == 2
    assert first == [
        "WITH claimed",  # the claim, both messages, the key and the first page of history
        "WITH finished",
    ], sent
    assert kinds(sent)[:4] == [
        "WITH claimed",  # no row: the key is taken
        "BEGIN",
        "SELECT idempotency_keys.id,",  # found: the earlier request is replayed
        "COMMIT",
    ], sent
