"""Routes for conversations and their stored messages. Sending a message is in `chat/`."""

from __future__ import annotations

import functools
from typing import Any

from fastapi import APIRouter, Response, status

from chatbot_api.auth.dependencies import CurrentPrincipal
from chatbot_api.conversations import service
from chatbot_api.conversations.dependencies import OwnedConversation, PageDep
from chatbot_api.conversations.models import Conversation, Message
from chatbot_api.conversations.schemas import (
    ConversationCreate,
    ConversationOut,
    ConversationUpdate,
    MessageOut,
    Page,
)
from chatbot_api.db import EngineDep, SessionDep, model_response
from chatbot_api.errors import error_envelope
from chatbot_api.sql import run_transaction

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {
        "description": "No such conversation.",
        "content": {
            "application/json": {"example": error_envelope("not_found", "Conversation not found.")}
        },
    }
}

router = APIRouter(prefix="/api/v1/conversations", tags=["conversations"])


def conversation_out(conversation: Conversation) -> ConversationOut:
    return ConversationOut(
        id=conversation.id,
        title=conversation.title,
        system_prompt=conversation.system_prompt,
        metadata=conversation.meta,
        created_at=conversation.created_at,
        updated_at=conversation.updated_at,
    )


def message_out(message: Message) -> MessageOut:
    return MessageOut.model_validate(message, from_attributes=True)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ConversationOut)
async def create_conversation(
    engine: EngineDep, caller: CurrentPrincipal, body: ConversationCreate | None = None
) -> Response:
    body = body or ConversationCreate()
    conversation = await run_transaction(
        engine,
        functools.partial(
            service.create_conversation,
            owner_id=caller.principal_id,
            title=body.title,
            system_prompt=body.system_prompt,
            metadata=body.metadata,
        ),
        single_statement=True,
    )
    return model_response(conversation, status.HTTP_201_CREATED)


@router.get("", response_model=Page[ConversationOut])
async def list_conversations(
    session: SessionDep, caller: CurrentPrincipal, page: PageDep
) -> Page[ConversationOut]:
    rows, cursor = await service.list_conversations(
        session, owner_id=caller.principal_id, limit=page.limit, after=page.after
    )
    return Page(
        data=[conversation_out(c) for c in rows], has_more=cursor is not None, next_cursor=cursor
    )


@router.get("/{conversation_id}", response_model=ConversationOut, responses=NOT_FOUND)
async def get_conversation(conversation: OwnedConversation) -> ConversationOut:
    return conversation_out(conversation)


@router.patch("/{conversation_id}", response_model=ConversationOut, responses=NOT_FOUND)
async def update_conversation(
    session: SessionDep, conversation: OwnedConversation, body: ConversationUpdate
) -> ConversationOut:
    changes = body.model_dump(exclude_unset=True)
    updated = await service.update_conversation(session, conversation, **changes)
    return conversation_out(updated)


@router.delete("/{conversation_id}", status_code=status.HTTP_204_NO_CONTENT, responses=NOT_FOUND)
async def delete_conversation(session: SessionDep, conversation: OwnedConversation) -> Response:
    await service.delete_conversation(session, conversation)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{conversation_id}/messages", response_model=Page[MessageOut], responses=NOT_FOUND)
async def list_messages(
    session: SessionDep, conversation: OwnedConversation, page: PageDep
) -> Page[MessageOut]:
    rows, cursor = await service.list_messages(
        session, conversation.id, limit=page.limit, after=page.after
    )
    return Page(
        data=[message_out(m) for m in rows], has_more=cursor is not None, next_cursor=cursor
    )
