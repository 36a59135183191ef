"""Dependencies that load rows also validate them: a conversation that does not exist, or that
the caller does not own, is a 404 before the endpoint runs, with the same body either way.

`OwnedConversation` loads the row in the request's session. `ConversationIdDep` checks
ownership in a short session of its own and yields only the id, for the routes that must not
hold a connection while a reply is generated or streamed (`chat/`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request

from chatbot_api.auth.dependencies import CurrentPrincipal
from chatbot_api.conversations import service
from chatbot_api.conversations.models import Conversation
from chatbot_api.db import SessionDep


def conversation_uuid(conversation_id: str) -> uuid.UUID:
    """A malformed id names no conversation: 404, the same answer as an unknown one."""
    try:
        return uuid.UUID(conversation_id)
    except ValueError:
        raise service.conversation_not_found() from None


async def parse_conversation_id(conversation_id: str) -> uuid.UUID:
    return conversation_uuid(conversation_id)


ParsedConversationId = Annotated[uuid.UUID, Depends(parse_conversation_id)]


async def _owned_conversation_id(
    request: Request, caller: CurrentPrincipal, conversation_id: ParsedConversationId
) -> uuid.UUID:
    async with request.app.state.sessionmaker() as session:
        await service.get_conversation(session, conversation_id, owner_id=caller.principal_id)
    return conversation_id


ConversationIdDep = Annotated[uuid.UUID, Depends(_owned_conversation_id)]


async def _load_owned_conversation(
    session: SessionDep, caller: CurrentPrincipal, conversation_id: ParsedConversationId
) -> Conversation:
    return await service.get_conversation(session, conversation_id, owner_id=caller.principal_id)


OwnedConversation = Annotated[Conversation, Depends(_load_owned_conversation)]
# The name the routes were first written with: it validates the owner too.
ConversationDep = OwnedConversation


@dataclass(frozen=True, slots=True)
class PageParams:
    limit: int
    after: str | None


# A function, not the class itself: FastAPI would call a class in a worker thread.
async def _page(
    limit: Annotated[int, Query(ge=1, le=100, description="Items per page.")] = 20,
    after: Annotated[
        str | None, Query(max_length=200, description="`next_cursor` of the previous page.")
    ] = None,
) -> PageParams:
    return PageParams(limit, after)


PageDep = Annotated[PageParams, Depends(_page)]
