"""`chat.turn.Turn`: what a running turn keeps in memory."""

from __future__ import annotations

import uuid

from chatbot_api.chat.outcomes import TurnIds
from chatbot_api.chat.service import BegunTurn
from chatbot_api.chat.turn import Turn
from chatbot_api.llm.base import ChatMessage


def test_the_prompt_is_handed_over_once_and_not_kept() -> None:
    ids = TurnIds(uuid.uuid4(), uuid.uuid4(), uuid.uuid4())
    context = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")]
    begun = BegunTurn(
        conversation_id=ids.conversation_id,
        user_message_id=ids.user_message_id,
        assistant_message_id=ids.assistant_message_id,
        claim_seq=3,
        context=context,
        prompt_tokens=12,
        history_messages=0,
    )
    turn = Turn(ids=ids, model_used="m", begun=begun)

    assert turn.take_context() is context

    assert turn.begun is not None
    assert turn.begun.context == []
    # What the rest of the turn needs is still there.
    assert (turn.begun.claim_seq, turn.begun.prompt_tokens) == (3, 12)
    assert turn.begun.assistant_message_id == ids.assistant_message_id
