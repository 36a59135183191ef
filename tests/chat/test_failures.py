"""Failures lose nothing: provider errors before and during the stream, on both databases."""

from __future__ import annotations

import httpx
import pytest

from chatbot_api.testing.fake_llm import FakeLLM, Script
from tests.chat.helpers import messages, send, send_stream
from tests.conftest import create_conversation


class TestProviderFailsBeforeAnyText:
    @pytest.mark.parametrize(
        ("script", "status", "code"),
        [
            (Script(status=503), 503, "upstream_unavailable"),
            (Script(status=500), 503, "upstream_unavailable"),
            (Script(status=429, retry_after=7), 503, "upstream_rate_limited"),
            (Script(status=400), 502, "upstream_rejected"),
            (Script(status=401), 502, "upstream_auth_failed"),
            (Script(after_tokens=0, then="malformed"), 502, "upstream_bad_response"),
        ],
    )
    async def test_client_gets_a_mapped_error_and_both_rows_are_kept(
        self,
        client: httpx.AsyncClient,
        fake_llm: FakeLLM,
        script: Script,
        status: int,
        code: str,
    ) -> None:
        fake_llm.enqueue(script)
        conversation_id = await create_conversation(client)

        response = await send(client, conversation_id, "hello?")

        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == code
        assert "Traceback" not in response.text
        user, reply = await messages(client, conversation_id)
        assert (user["content"], user["status"]) == ("hello?", "completed")
        assert (reply["status"], reply["content"]) == ("failed", "")
        assert reply["error"]["code"] == code
        assert error["details"][0]["assistant_message_id"] == reply["id"]

    async def test_rate_limit_passes_retry_after_on(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        fake_llm.enqueue(Script(status=429, retry_after=7))
        conversation_id = await create_conversation(client)

        response = await send(client, conversation_id, "hello?")

        assert response.headers["Retry-After"] == "7"

    async def test_first_token_timeout_is_504(self, app_factory: object, fake_llm: FakeLLM) -> None:
        from tests.conftest import client_for

        app = await app_factory(llm={"first_token_timeout": 0.3})  # type: ignore[operator]
        fake_llm.enqueue(Script(headers_then_silence=True))
        async with client_for(app) as client:
            conversation_id = await create_conversation(client)
            response = await send(client, conversation_id, "hello?")
            assert response.status_code == 504
            assert response.json()["error"]["code"] == "upstream_timeout"
            assert (await messages(client, conversation_id))[1]["status"] == "failed"

    async def test_failed_stream_ends_with_message_failed_event(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        fake_llm.enqueue(Script(status=503))
        conversation_id = await create_conversation(client)

        _, events = await send_stream(client, conversation_id, "hello?")

        assert [e.event for e in events] == ["message.created", "message.failed"]
        failed = events[-1].data
        assert failed["error"]["code"] == "upstream_unavailable"
        assert failed["error"]["status"] == 503
        assert failed["status"] == "failed"
        assert failed["assistant_message_id"] == events[0].data["assistant_message_id"]

    async def test_failed_replies_are_left_out_of_the_next_context(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        fake_llm.enqueue(Script(status=503))
        fake_llm.enqueue(Script(reply="now it works"))
        conversation_id = await create_conversation(client)

        await send(client, conversation_id, "first try")
        await send(client, conversation_id, "second try")

        sent = fake_llm.messages(1)
        assert [m["role"] for m in sent] == ["system", "user", "user"]
        assert [m["content"] for m in sent[1:]] == ["first try", "second try"]


class TestStreamBreaksMidway:
    async def test_reset_after_some_text_stores_the_partial_as_incomplete(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        fake_llm.enqueue(
            Script(deltas=("one ", "two ", "three ", "four"), after_tokens=2, then="reset")
        )
        conversation_id = await create_conversation(client)

        _, events = await send_stream(client, conversation_id, "count")

        assert events[-1].event == "message.incomplete"
        deltas = "".join(e.data["delta"] for e in events if e.event == "message.delta")
        assert deltas == "one two "
        assert events[-1].data["partial_response"] == deltas
        reply = (await messages(client, conversation_id))[1]
        assert (reply["status"], reply["content"]) == ("incomplete", "one two ")
        assert reply["finish_reason"] == "error"  # the upstream never gave one

    async def test_stream_without_finish_reason_counts_as_incomplete(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        fake_llm.enqueue(Script(reply="cut short here", finish_reason=None))
        conversation_id = await create_conversation(client)

        response = await send(client, conversation_id, "count")

        assert response.status_code == 503
        reply = (await messages(client, conversation_id))[1]
        assert (reply["status"], reply["content"]) == ("incomplete", "cut short here")

    async def test_clean_eof_without_done_counts_as_incomplete(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        fake_llm.enqueue(Script(deltas=("a ", "b ", "c"), after_tokens=2, then="eof"))
        conversation_id = await create_conversation(client)

        _, events = await send_stream(client, conversation_id, "count")

        assert events[-1].event == "message.incomplete"
        reply = (await messages(client, conversation_id))[1]
        assert (reply["status"], reply["content"]) == ("incomplete", "a b ")

    async def test_incomplete_partial_is_kept_in_the_next_context(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        fake_llm.enqueue(Script(deltas=("par", "tial", "!"), after_tokens=2, then="reset"))
        conversation_id = await create_conversation(client)

        await send(client, conversation_id, "first")
        await send(client, conversation_id, "second")

        sent = fake_llm.messages(1)
        assert sent[2] == {"role": "assistant", "content": "partial"}
