"""Dependencies of the chat routes: the turn manager and the provider built in the lifespan,
and `ChatDep`, everything sending a message needs in one dependency.

They are `async def` although they never await: FastAPI runs a plain `def` dependency in a
worker thread, a thread switch on every request for nothing. And they are few: FastAPI's
dependency solving costs tens of microseconds per dependency on every request, more than
anything else in the send route but the database and the provider."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from chatbot_api.auth.dependencies import Caller, CurrentPrincipal
from chatbot_api.chat.turns import TurnManager
from chatbot_api.errors import NotFound
from chatbot_api.limits.dependencies import TurnGuard, turn_guard
from chatbot_api.llm.base import Provider


async def _turns(request: Request) -> TurnManager:
    turns: TurnManager = request.app.state.turns
    return turns


async def _provider(request: Request) -> Provider:
    provider: Provider = request.app.state.provider
    return provider


TurnsDep = Annotated[TurnManager, Depends(_turns)]
ProviderDep = Annotated[Provider, Depends(_provider)]


@dataclass(frozen=True, slots=True)
class Chat:
    caller: Caller
    turns: TurnManager
    guard: TurnGuard


def chat_for(request: Request, caller: Caller) -> Chat:
    """`ChatDep` for a known caller (also used by `fast_routes`)."""
    return Chat(caller, request.app.state.turns, turn_guard(request, caller))


async def _chat(request: Request, caller: CurrentPrincipal) -> Chat:
    return chat_for(request, caller)


ChatDep = Annotated[Chat, Depends(_chat)]


async def parse_message_id(message_id: str) -> uuid.UUID:
    """A malformed id names no message: 404, like an unknown one."""
    try:
        return uuid.UUID(message_id)
    except ValueError:
        raise NotFound("Message not found.") from None


MessageIdDep = Annotated[uuid.UUID, Depends(parse_message_id)]
