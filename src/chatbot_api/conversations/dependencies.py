"""Dependencies that load rows also validate them: a conversation that does not exist is a 404
before the endpoint runs."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends, Query

from chatbot_api.conversations import service
from chatbot_api.conversations.models import Conversation
from chatbot_api.db import SessionDep


def parse_conversation_id(conversation_id: str) -> uuid.UUID:
    """A malformed id names no conversation: 404, the same answer as an unknown one."""
    try:
        return uuid.UUID(conversation_id)
    except ValueError:
        raise service.conversation_not_found() from None


ConversationIdDep = Annotated[uuid.UUID, Depends(parse_conversation_id)]


async def _load_conversation(
    session: SessionDep, conversation_id: ConversationIdDep
) -> Conversation:
    return await service.get_conversation(session, conversation_id)


ConversationDep = Annotated[Conversation, Depends(_load_conversation)]


class PageParams:
    def __init__(
        self,
        limit: Annotated[int, Query(ge=1, le=100, description="Items per page.")] = 20,
        after: Annotated[
            str | None, Query(max_length=200, description="`next_cursor` of the previous page.")
        ] = None,
    ) -> None:
        self.limit = limit
        self.after = after


PageDep = Annotated[PageParams, Depends()]
