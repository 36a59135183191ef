"""Resuming a stream with `Last-Event-ID`: the text received before the cut plus the text
after the resume is the stored reply, with no gap and no duplicate."""

from __future__ import annotations

import asyncio
import itertools
import uuid

import httpx
from hypothesis import given
from hypothesis import strategies as st

from chatbot_api.chat.events import frames, parse_last_event_id
from chatbot_api.chat.outcomes import LogEntry, TurnIds, created_event, terminal_event
from chatbot_api.conversations.models import MessageStatus
from chatbot_api.testing.fake_llm import FakeLLM, Script
from tests.chat.helpers import SSEEvent, messages, parse_sse, send, upstream_called
from tests.conftest import create_conversation

DELTAS = ("Érase ", "una ", "vez ", "un ", "dragón ", "🐉 ", "que ", "hablaba.")


def _resume_url(conversation_id: str, message_id: str) -> str:
    return f"/api/v1/conversations/{conversation_id}/messages/{message_id}/stream"


def _text(events: list[SSEEvent]) -> str:
    return "".join(e.data["delta"] for e in events if e.event == "message.delta")


def _log(deltas: list[str]) -> list[LogEntry]:
    ids = TurnIds(uuid.uuid4(), uuid.uuid4(), uuid.uuid4())
    text = "".join(deltas)
    done = terminal_event(
        ids,
        text=text,
        status=MessageStatus.COMPLETED,
        model_used="m",
        finish_reason="stop",
        usage=None,
        error=None,
    )
    return [created_event(ids, "m"), *deltas, done]


def _stream(log: list[LogEntry], have: int | None, cuts: list[int] | None = None) -> list[SSEEvent]:
    """The events a client holding `have` characters gets, the log read in the runs between
    `cuts` (as a reader woken at those points would), the offset carried from run to run."""
    bounds = [0, *sorted(cuts or []), len(log)]
    out: list[bytes] = []
    offset = 0
    for start, stop in itertools.pairwise(bounds):
        run, offset = frames(log[start:stop], offset, have)
        out += run
    return parse_sse(b"".join(out).decode())


class TestResumeProperty:
    @given(
        deltas=st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=30),
        data=st.data(),
    )
    def test_any_cut_point_resumes_without_gap_or_duplicate(
        self, deltas: list[str], data: st.DataObject
    ) -> None:
        log = _log(deltas)
        events = _stream(log, None)
        cut = data.draw(st.integers(min_value=0, max_value=len(events) - 1))
        before = _text(events[: cut + 1])
        have = parse_last_event_id(events[cut].id)

        resumed = _stream(log, have)

        assert before + _text(resumed) == "".join(deltas)
        assert resumed[-1].event == "message.completed"
        assert all(e.event != "message.created" for e in resumed)

    @given(
        deltas=st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=30),
        cuts=st.lists(st.integers(min_value=0, max_value=32), max_size=6),
        have=st.none() | st.integers(min_value=0, max_value=200),
    )
    def test_reading_the_log_in_runs_gives_the_same_frames(
        self, deltas: list[str], cuts: list[int], have: int | None
    ) -> None:
        log = _log(deltas)
        cuts = [min(c, len(log)) for c in cuts]
        assert _stream(log, have, cuts) == _stream(log, have)

    @given(deltas=st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=10))
    def test_each_id_is_the_length_of_the_reply_so_far(self, deltas: list[str]) -> None:
        events = _stream(_log(deltas), None)
        received = ""
        for event in events:
            if event.event == "message.delta":
                received += event.data["delta"]
                assert event.id == str(len(received))
        assert events[0].id == "0"
        assert events[-1].id == str(len(received))
        assert received == "".join(deltas)

    @given(deltas=st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=10))
    def test_an_offset_inside_a_delta_gets_the_rest_of_it(self, deltas: list[str]) -> None:
        text = "".join(deltas)
        for have in range(len(text) + 1):
            resumed = _stream(_log(deltas), have)
            assert text[:have] + _text(resumed) == text
            assert all(e.data["delta"] for e in resumed if e.event == "message.delta")

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
