"""The conversation routes, on both databases: create, list, get, update, delete, and the stored
messages of a conversation. Messages are added by chatting through the API (fake LLM)."""

from __future__ import annotations

import base64
import uuid
from datetime import datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from chatbot_api.conversations.models import Message
from chatbot_api.testing.fake_llm import FakeLLM, Script
from tests.conftest import count_rows, create_conversation

BASE = "/api/v1/conversations"
UNKNOWN_ID = "5b6f0f0e-8a51-4c4e-9d3a-0c1f2b7e9a11"


def cursor(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def assert_utc_timestamp(value: str) -> None:
    assert value.endswith(("Z", "+00:00")), value
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() is not None


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert error["message"]
    return error


async def create_many(client: httpx.AsyncClient, count: int) -> list[str]:
    """Conversations titled "c0", "c1", ... in creation order."""
    return [await create_conversation(client, title=f"c{n}") for n in range(count)]


async def chat(client: httpx.AsyncClient, conversation_id: str, message: str) -> None:
    response = await client.post(f"{BASE}/{conversation_id}/messages", json={"message": message})
    assert response.status_code == 200, response.text


async def walk(client: httpx.AsyncClient, path: str, limit: int) -> list[dict[str, Any]]:
    """Follow `next_cursor` to the end; every page is checked for its shape."""
    items: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": limit}
    while True:
        response = await client.get(path, params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        assert set(page) == {"data", "has_more", "next_cursor"}
        assert len(page["data"]) <= limit
        # An empty page after a cursor means the previous page claimed more than there was.
        assert page["data"] or "after" not in params
        items += page["data"]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            return items
        assert len(page["data"]) == limit
        params["after"] = page["next_cursor"]


async def messages_in(engine: AsyncEngine, conversation_id: str) -> int:
    async with engine.connect() as connection:
        value = await connection.scalar(
            select(func.count())
            .select_from(Message)
            .where(Message.conversation_id == uuid.UUID(conversation_id))
        )
    return int(value or 0)


class TestCreateConversation:
    async def test_returns_201_with_uuid_string_id_and_fields(
        self, client: httpx.AsyncClient, engine: AsyncEngine
    ) -> None:
        response = await client.post(
            BASE,
            json={"title": "Viaje", "system_prompt": "Be brief.", "metadata": {"user": "felipe"}},
        )

        assert response.status_code == 201, response.text
        body = response.json()
        assert isinstance(body["id"], str)
        assert str(uuid.UUID(body["id"])) == body["id"]
        assert body["title"] == "Viaje"
        assert body["system_prompt"] == "Be brief."
        assert body["metadata"] == {"user": "felipe"}
        assert_utc_timestamp(body["created_at"])
        assert_utc_timestamp(body["updated_at"])
        assert await count_rows(engine, "conversations") == 1

    @pytest.mark.parametrize("kwargs", [{}, {"json": {}}], ids=["no-body", "empty-object"])
    async def test_body_is_optional(
        self, client: httpx.AsyncClient, kwargs: dict[str, Any]
    ) -> None:
        response = await client.post(BASE, **kwargs)

        assert response.status_code == 201, response.text
        body = response.json()
        assert (body["title"], body["system_prompt"], body["metadata"]) == (None, None, None)

    async def test_get_returns_what_was_created(self, client: httpx.AsyncClient) -> None:
        metadata = {"tags": ["a", "b"], "score": 1.5, "nested": {"ok": True}, "name": "ñandú 🦜"}
        created = await client.post(BASE, json={"title": "t", "metadata": metadata})

        response = await client.get(f"{BASE}/{created.json()['id']}")

        assert response.status_code == 200
        assert response.json() == created.json()
        assert response.json()["metadata"] == metadata

    @pytest.mark.parametrize(
        "body",
        [{"role": "system"}, {"id": UNKNOWN_ID}, {"created_at": "2026-01-01T00:00:00Z"}],
        ids=["role", "id", "created_at"],
    )
    async def test_unknown_field_is_refused_and_nothing_stored(
        self, client: httpx.AsyncClient, engine: AsyncEngine, body: dict[str, Any]
    ) -> None:
        response = await client.post(BASE, json={"title": "t", **body})

        error = assert_error(response, 422, "validation_error")
        assert error["details"][0]["loc"] == ["body", next(iter(body))]
        assert error["details"][0]["type"] == "extra_forbidden"
        assert await count_rows(engine, "conversations") == 0

    @pytest.mark.parametrize(
        "body",
        [{"title": "bad\x00title"}, {"system_prompt": "nul\x00"}, {"title": "x" * 201}],
        ids=["nul-title", "nul-prompt", "long-title"],
    )
    async def test_unstorable_text_is_refused(
        self, client: httpx.AsyncClient, engine: AsyncEngine, body: dict[str, Any]
    ) -> None:
        response = await client.post(BASE, json=body)

        assert_error(response, 422, "validation_error")
        assert await count_rows(engine, "conversations") == 0


class TestListConversations:
    async def test_empty_list_is_one_final_page(self, client: httpx.AsyncClient) -> None:
        response = await client.get(BASE)

        assert response.json() == {"data": [], "has_more": False, "next_cursor": None}

    async def test_newest_first_twenty_by_default(self, client: httpx.AsyncClient) -> None:
        created = await create_many(client, 21)

        page = (await client.get(BASE)).json()

        assert [c["id"] for c in page["data"]] == created[:0:-1]
        assert page["has_more"] is True
        assert isinstance(page["next_cursor"], str)

    async def test_second_page_continues_after_first(self, client: httpx.AsyncClient) -> None:
        # Six in pages of three: the second page is full and must still be the last.
        created = await create_many(client, 6)

        listed = await walk(client, BASE, limit=3)

        assert [c["id"] for c in listed] == created[::-1]

    async def test_conversation_created_mid_walk_does_not_shift_pages(
        self, client: httpx.AsyncClient
    ) -> None:
        created = await create_many(client, 4)
        first = (await client.get(BASE, params={"limit": 2})).json()
        await create_conversation(client, title="newer")

        second = await client.get(BASE, params={"limit": 2, "after": first["next_cursor"]})

        assert [c["id"] for c in second.json()["data"]] == created[1::-1]

    @pytest.mark.parametrize("limit", ["101", "0", "-1", "ten"])
    async def test_limit_out_of_range_is_refused(
        self, client: httpx.AsyncClient, limit: str
    ) -> None:
        response = await client.get(BASE, params={"limit": limit})

        error = assert_error(response, 422, "validation_error")
        assert error["details"][0]["loc"] == ["query", "limit"]

    @pytest.mark.parametrize(
        "after",
        [
            "garbage!",
            "ñ",
            cursor("one-part-only"),
            cursor(f"yesterday|{UNKNOWN_ID}"),
            cursor("2026-01-01T00:00:00+00:00|not-a-uuid"),
            cursor("2026-01-01T00:00:00+00:00|x|y"),
        ],
    )
    async def test_garbage_cursor_is_an_invalid_request(
        self, client: httpx.AsyncClient, after: str
    ) -> None:
        response = await client.get(BASE, params={"after": after})

        assert_error(response, 422, "invalid_request")

    async def test_cursor_with_naive_timestamp_is_an_invalid_request(
        self, client: httpx.AsyncClient
    ) -> None:
        response = await client.get(BASE, params={"after": cursor(f"2026-01-01|{UNKNOWN_ID}")})

        assert_error(response, 422, "invalid_request")


class TestUpdateConversation:
    async def create_full(self, client: httpx.AsyncClient) -> str:
        return await create_conversation(
            client, title="old", system_prompt="Be brief.", metadata={"k": 1}
        )

    async def test_changes_only_the_given_fields(self, client: httpx.AsyncClient) -> None:
        conversation_id = await self.create_full(client)
        before = (await client.get(f"{BASE}/{conversation_id}")).json()

        response = await client.patch(f"{BASE}/{conversation_id}", json={"title": "new"})

        assert response.status_code == 200, response.text
        after = (await client.get(f"{BASE}/{conversation_id}")).json()
        assert after == response.json()
        assert after["title"] == "new"
        assert (after["system_prompt"], after["metadata"]) == ("Be brief.", {"k": 1})
        assert after["created_at"] == before["created_at"]
        updated_at = datetime.fromisoformat(after["updated_at"])
        assert updated_at > datetime.fromisoformat(before["updated_at"])
        assert_utc_timestamp(after["updated_at"])

    async def test_null_clears_a_field(self, client: httpx.AsyncClient) -> None:
        conversation_id = await self.create_full(client)

        await client.patch(
            f"{BASE}/{conversation_id}", json={"system_prompt": None, "metadata": None}
        )

        after = (await client.get(f"{BASE}/{conversation_id}")).json()
        assert (after["title"], after["system_prompt"], after["metadata"]) == ("old", None, None)

    @pytest.mark.parametrize(
        "body",
        [{"title": "new", "next_seq": 9}, {"title": "bad\x00"}],
        ids=["unknown-field", "nul-title"],
    )
    async def test_invalid_patch_is_refused_and_changes_nothing(
        self, client: httpx.AsyncClient, body: dict[str, Any]
    ) -> None:
        conversation_id = await self.create_full(client)

        response = await client.patch(f"{BASE}/{conversation_id}", json=body)

        assert_error(response, 422, "validation_error")
        assert (await client.get(f"{BASE}/{conversation_id}")).json()["title"] == "old"


class TestDeleteConversation:
    async def test_returns_204_and_then_404(self, client: httpx.AsyncClient) -> None:
        conversation_id = await create_conversation(client)

        response = await client.delete(f"{BASE}/{conversation_id}")

        assert response.status_code == 204
        assert response.content == b""
        assert_error(await client.get(f"{BASE}/{conversation_id}"), 404, "not_found")
        assert_error(await client.delete(f"{BASE}/{conversation_id}"), 404, "not_found")

    async def test_removes_its_messages_and_only_its_own(
        self, client: httpx.AsyncClient, engine: AsyncEngine
    ) -> None:
        doomed, kept = await create_many(client, 2)
        await chat(client, doomed, "hi")
        await chat(client, kept, "hello")
        assert await messages_in(engine, doomed) == 2

        await client.delete(f"{BASE}/{doomed}")

        assert await messages_in(engine, doomed) == 0
        assert await messages_in(engine, kept) == 2
        assert await count_rows(engine, "conversations") == 1


Route = tuple[str, str, dict[str, Any] | None]
ROUTES: list[Route] = [
    ("GET", "", None),
    ("PATCH", "", {"title": "x"}),
    ("DELETE", "", None),
    ("GET", "/messages", None),
    ("POST", "/messages", {"message": "hi"}),
]


class TestMissingConversation:
    @pytest.mark.parametrize(
        "conversation_id", [UNKNOWN_ID, "not-a-uuid", "12345"], ids=["unknown", "bad", "int"]
    )
    @pytest.mark.parametrize("route", ROUTES, ids=[f"{m}{s}" for m, s, _ in ROUTES])
    async def test_is_a_404_envelope(
        self,
        client: httpx.AsyncClient,
        engine: AsyncEngine,
        fake_llm: FakeLLM,
        conversation_id: str,
        route: Route,
    ) -> None:
        method, suffix, body = route

        response = await client.request(method, f"{BASE}/{conversation_id}{suffix}", json=body)

        assert_error(response, 404, "not_found")
        assert await count_rows(engine, "messages") == 0
        assert fake_llm.requests == []


class TestListMessages:
    async def test_new_conversation_has_no_messages(self, client: httpx.AsyncClient) -> None:
        conversation_id = await create_conversation(client)

        response = await client.get(f"{BASE}/{conversation_id}/messages")

        assert response.json() == {"data": [], "has_more": False, "next_cursor": None}

    async def test_oldest_first_with_reply_details(
        self, client: httpx.AsyncClient, fake_llm: FakeLLM
    ) -> None:
        fake_llm.enqueue(Script(reply="first reply"))
        fake_llm.enqueue(Script(reply="second reply"))
        conversation_id = await create_conversation(client)
        await chat(client, conversation_id, "first question")
        await chat(client, conversation_id, "second question")

        data = (await client.get(f"{BASE}/{conversation_id}/messages")).json()["data"]

        assert [(m["role"], m["content"]) for m in data] == [
            ("user", "first question"),
            ("assistant", "first reply"),
            ("user", "second question"),
            ("assistant", "second reply"),
        ]
        assert [m["seq"] for m in data] == sorted({m["seq"] for m in data})
        for message in data:
            uuid.UUID(message["id"])
            assert message["status"] == "completed"
            assert_utc_timestamp(message["created_at"])
        for reply in data[1::2]:
            assert reply["model_used"] == "fake-model"
            assert reply["finish_reason"] == "stop"
            usage = reply["usage"]
            assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens"}
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            assert usage["completion_tokens"] > 0

    async def test_pages_walk_every_message_once_in_order(self, client: httpx.AsyncClient) -> None:
        conversation_id = await create_conversation(client)
        for n in range(3):
            await chat(client, conversation_id, f"question {n}")
        path = f"{BASE}/{conversation_id}/messages"
        everything = (await client.get(path, params={"limit": 100})).json()["data"]

        walked = await walk(client, path, limit=4)

        assert len(everything) == 6
        assert [m["id"] for m in walked] == [m["id"] for m in everything]

    async def messages_after(self, client: httpx.AsyncClient, after: str) -> httpx.Response:
        conversation_id = await create_conversation(client)
        return await client.get(f"{BASE}/{conversation_id}/messages", params={"after": after})

    @pytest.mark.parametrize(
        "after",
        ["garbage!", cursor("seven"), cursor("1|2"), cursor(f"2026-01-01T00:00:00Z|{UNKNOWN_ID}")],
    )
    async def test_garbage_cursor_is_an_invalid_request(
        self, client: httpx.AsyncClient, after: str
    ) -> None:
        response = await self.messages_after(client, after)

        assert_error(response, 422, "invalid_request")

    async def test_cursor_with_a_superscript_digit_is_an_invalid_request(
        self, client: httpx.AsyncClient
    ) -> None:
        response = await self.messages_after(client, cursor("²"))

        assert_error(response, 422, "invalid_request")

    async def test_cursor_with_a_huge_number_is_an_invalid_request(
        self, client: httpx.AsyncClient
    ) -> None:
        response = await self.messages_after(client, cursor("9" * 30))

        assert_error(response, 422, "invalid_request")
