"""What a turn costs the database on PostgreSQL, counted in statements sent: each one is a
round trip, and under load a round trip is how long a connection stays checked out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import event

from chatbot_api.testing.fake_llm import FakeLLM, Script
from tests.chat.helpers import send
from tests.conftest import client_for, create_conversation


def record_statements(engine: Any) -> list[str]:
    """Every statement asyncpg sends on the engine's connections from now on."""
    sent: list[str] = []
    watched: set[int] = set()

    @event.listens_for(engine.sync_engine, "checkout")
    def watch(_dbapi: Any, record: Any, _proxy: Any) -> None:
        driver = record.driver_connection
        if id(driver) not in watched:
            watched.add(id(driver))
            driver.add_query_logger(lambda logged: sent.append(logged.query))

    return sent


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_a_turn_is_four_statements_on_postgresql(
    app_factory: Callable[..., Any], fake_llm: FakeLLM
) -> None:
    # Keys off (their lookup is one statement more) and no checkpoint during the turn.
    app = await app_factory(
        auth={"mode": "disabled"}, reliability={"stream_checkpoint_interval": 60}
    )
    fake_llm.default = Script(reply="Hello, Felipe.")
    async with client_for(app) as client:
        conversation_id = await create_conversation(client)
        await send(client, conversation_id, "Hola, soy Felipe")  # history from now on
        sent = record_statements(app.state.engine)

        response = await send(client, conversation_id, "What is my name?")

    assert response.status_code == 200, response.text
    assert "Felipe" in fake_llm.messages(1)[1]["content"]
    kinds = [" ".join(statement.rstrip(";").split()[:2]) for statement in sent]
    assert kinds == [
        "BEGIN",
        "WITH claimed",  # the claim, both messages and the first page of history
        "COMMIT",
        "WITH finished",  # the reply stored and the claim released, no transaction
    ], sent
