"""Resuming a stream with `Last-Event-ID`: the text received before the cut plus the text
after the resume is the stored reply, with no gap and no duplicate."""

from __future__ import annotations

import asyncio
import uuid

import httpx
from hypothesis import given
from hypothesis import strategies as st

from chatbot_api.chat.events import parse_last_event_id, still_needed
from chatbot_api.chat.outcomes import DELTA, TurnEvent, TurnIds, created_event, terminal_event
from chatbot_api.conversations.models import MessageStatus
from chatbot_api.testing.fake_llm import FakeLLM, Script
from tests.chat.helpers import SSEEvent, messages, parse_sse, send, upstream_called
from tests.conftest import create_conversation

DELTAS = ("Érase ", "una ", "vez ", "un ", "dragón ", "🐉 ", "que ", "hablaba.")


def _resume_url(conversation_id: str, message_id: str) -> str:
    return f"/api/v1/conversations/{conversation_id}/messages/{message_id}/stream"


def _text(events: list[SSEEvent]) -> str:
    return "".join(e.data["delta"] for e in events if e.event == "message.delta")


def _log(deltas: list[str]) -> list[TurnEvent]:
    ids = TurnIds(uuid.uuid4(), uuid.uuid4(), uuid.uuid4())
    log = [created_event(ids, "m")]
    offset = 0
    for delta in deltas:
        offset += len(delta)
        log.append(TurnEvent(DELTA, delta, offset))
    text = "".join(deltas)
    log.append(
        terminal_event(
            ids,
            text=text,
            status=MessageStatus.COMPLETED,
            model_used="m",
            finish_reason="stop",
            usage=None,
            error=None,
        )
    )
    return log


class TestResumeProperty:
    @given(
        deltas=st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=30),
        data=st.data(),
    )
    def test_any_cut_point_resumes_without_gap_or_duplicate(
        self, deltas: list[str], data: st.DataObject
    ) -> None:
        log = _log(deltas)
        cut = data.draw(st.integers(min_value=0, max_value=len(log) - 1))
        before = "".join(e.data for e in log[: cut + 1] if isinstance(e.data, str))

        have = parse_last_event_id(str(log[cut].offset))
        resumed = [r for r in (still_needed(e, have) for e in log) if r is not None]
        after = "".join(e.data for e in resumed if isinstance(e.data, str))

        assert before + after == "".join(deltas)
        assert resumed[-1].name == "message.completed"
        assert all(e.name != "message.created" for e in resumed)

    @given(deltas=st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=10))
    def test_an_offset_inside_a_delta_gets_the_rest_of_it(self, deltas: list[str]) -> None:
        text = "".join(deltas)
        for have in range(len(text) + 1):
            resumed = [r for r in (still_needed(e, have) for e in _log(deltas)) if r is not None]
            after = "".join(e.data for e in resumed if isinstance(e.data, str))
            assert text[:have] + after == text

    def test_garbled_last_event_id_replays_everything(self) -> None:
        assert parse_last_event_id(None) is None
        assert parse_last_event_id("abc") is None
        assert parse_last_event_id(" 12 ") == 12


class TestResumeEndpoint:
    async def test_finished_reply_resumes_with_the_missing_text_only(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        fake_llm.enqueue(Script(deltas=DELTAS))
        conversation_id = await create_conversation(client)
        reply = (await send(client, conversation_id, "story")).json()

        for cut in (0, 3, len("".join(DELTAS[:3])), len(reply["response"])):
            response = await client.get(
                _resume_url(conversation_id, reply["assistant_message_id"]),
                headers={"Last-Event-ID": str(cut)},
            )
            events = parse_sse(response.text)
            assert response.headers["content-type"].startswith("text/event-stream")
            assert reply["response"][:cut] + _text(events) == reply["response"]
            assert events[-1].event == "message.completed"
            assert events[-1].data["response"] == reply["response"]

    async def test_without_last_event_id_the_whole_stream_is_replayed(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        fake_llm.enqueue(Script(deltas=DELTAS))
        conversation_id = await create_conversation(client)
        reply = (await send(client, conversation_id, "story")).json()

        response = await client.get(_resume_url(conversation_id, reply["assistant_message_id"]))

        events = parse_sse(response.text)
        assert events[0].event == "message.created"
        assert events[0].data["user_message_id"] == reply["user_message_id"]
        assert _text(events) == reply["response"]

    async def test_live_stream_resumes_with_the_tail(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        fake_llm.enqueue(Script(deltas=DELTAS, token_delay=0.1))
        conversation_id = await create_conversation(client)
        first = asyncio.create_task(send(client, conversation_id, "story"))
        # Stored and streaming from here on (a fixed delay was sometimes too short on SQLite).
        await upstream_called(fake_llm)
        stored = await messages(client, conversation_id)

        response = await client.get(
            _resume_url(conversation_id, stored[1]["id"]), headers={"Last-Event-ID": "6"}
        )

        reply = (await first).json()
        events = parse_sse(response.text)
        assert reply["response"][:6] + _text(events) == reply["response"]
        assert events[-1].event == "message.completed"

    async def test_failed_reply_resumes_to_its_failure(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        fake_llm.enqueue(Script(status=503))
        conversation_id = await create_conversation(client)
        failed = (await send(client, conversation_id, "story")).json()
        message_id = failed["error"]["details"][0]["assistant_message_id"]

        events = parse_sse((await client.get(_resume_url(conversation_id, message_id))).text)

        assert [e.event for e in events] == ["message.created", "message.failed"]
        assert events[-1].data["error"]["code"] == "upstream_unavailable"

    async def test_unknown_reply_is_404(self, client: httpx.AsyncClient, fake_llm: FakeLLM) -> None:
        conversation_id = await create_conversation(client)
        reply = (await send(client, conversation_id, "hi")).json()

        for message_id in (str(uuid.uuid4()), reply["user_message_id"]):
            response = await client.get(_resume_url(conversation_id, message_id))
            assert response.status_code == 404
