"""Dependencies of the chat routes: the turn manager and the provider built in the lifespan.

They are `async def` although they never await: FastAPI runs a plain `def` dependency in a
worker thread, a thread switch on every request for nothing."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends, Request

from chatbot_api.chat.turns import TurnManager
from chatbot_api.errors import NotFound
from chatbot_api.llm.base import Provider


async def _turns(request: Request) -> TurnManager:
    turns: TurnManager = request.app.state.turns
    return turns


async def _provider(request: Request) -> Provider:
    provider: Provider = request.app.state.provider
    return provider


TurnsDep = Annotated[TurnManager, Depends(_turns)]
ProviderDep = Annotated[Provider, Depends(_provider)]


async def parse_message_id(message_id: str) -> uuid.UUID:
    """A malformed id names no message: 404, like an unknown one."""
    try:
        return uuid.UUID(message_id)
    except ValueError:
        raise NotFound("Message not found.") from None


MessageIdDep = Annotated[uuid.UUID, Depends(parse_message_id)]
