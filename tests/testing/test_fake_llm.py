"""The fake OpenAI-compatible server, checked on the wire with a plain aiohttp client."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

import chatbot_api.testing
from chatbot_api.llm.sse import SSEEvent, SSEParser
from chatbot_api.testing import FakeLLM as ReExported
from chatbot_api.testing.fake_llm import (
    DEFAULT_REPLY,
    FakeLLM,
    Script,
    parse_args,
    script_from_args,
    serve,
    split_words,
    unreachable_url,
)

KEY = "sk-fake-server-key-42"
BODY: dict[str, Any] = {
    "model": "requested-model",
    "messages": [
        {"role": "system", "content": "x"},
        {"role": "user", "content": "one two three"},
    ],
    "stream": True,
    "stream_options": {"include_usage": True},
}
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass
class Wire:
    """A fake server and a plain HTTP client for it."""

    fake: FakeLLM
    http: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"{self.fake.base_url}/chat/completions"

    async def post(self, body: dict[str, Any] | None = None, **extra: Any) -> tuple[int, str, str]:
        """POST a chat completion; return the status, the content type and the whole body."""
        payload = (BODY if body is None else body) | extra
        async with self.http.post(self.url, json=payload, headers=AUTH) as response:
            return response.status, response.content_type, await response.text()

    async def was_cancelled(self, index: int = 0) -> bool:
        await asyncio.wait_for(self.fake.requests[index].finished.wait(), timeout=1.0)
        return self.fake.requests[index].cancelled


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        yield session


@pytest.fixture
async def wire(http: aiohttp.ClientSession) -> AsyncIterator[Wire]:
    async with FakeLLM(api_key=KEY) as fake:
        yield Wire(fake, http)


def chunks(raw: str) -> list[dict[str, Any]]:
    """The JSON chunks of an SSE body (everything but [DONE])."""
    events = [item for item in SSEParser().feed(raw.encode()) if isinstance(item, SSEEvent)]
    return [json.loads(event.data) for event in events if event.data != "[DONE]"]


def content(raw: str) -> str:
    return "".join(
        choice["delta"].get("content") or "" for chunk in chunks(raw) for choice in chunk["choices"]
    )


class TestStreamingReplies:
    async def test_frames_follow_the_openai_chunk_format(self, wire: Wire) -> None:
        status, ctype, raw = await wire.post()
        assert (status, ctype) == (200, "text/event-stream")
        assert raw.endswith("data: [DONE]\n\n")
        assert all(frame.startswith("data: ") for frame in raw.split("\n\n") if frame)
        parsed = chunks(raw)
        assert {c["object"] for c in parsed} == {"chat.completion.chunk"}
        assert len({c["id"] for c in parsed}) == 1
        assert {c["model"] for c in parsed} == {"requested-model"}
        assert all(isinstance(c["created"], int) for c in parsed)
        assert parsed[0]["choices"] == [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ]
        assert parsed[-2]["choices"][0]["delta"] == {}
        assert parsed[-2]["choices"][0]["finish_reason"] == "stop"
        assert parsed[-1]["choices"] == []
        assert parsed[-1]["usage"] == {
            "prompt_tokens": 12,  # words + 4 per message
            "completion_tokens": len(split_words(DEFAULT_REPLY)),
            "total_tokens": 12 + len(split_words(DEFAULT_REPLY)),
        }
        assert content(raw) == DEFAULT_REPLY

    async def test_no_usage_chunk_unless_asked(self, wire: Wire) -> None:
        _, _, raw = await wire.post(stream_options=None)
        assert all("usage" not in chunk for chunk in chunks(raw))
        assert chunks(raw)[-1]["choices"][0]["finish_reason"] == "stop"

    async def test_groq_usage_rides_on_the_final_chunk(self, wire: Wire) -> None:
        wire.fake.enqueue(Script(reply="a b", usage_style="groq", prompt_tokens=5))
        _, _, raw = await wire.post()
        last = chunks(raw)[-1]
        assert last["choices"][0]["finish_reason"] == "stop"
        assert last["x_groq"]["usage"]["prompt_tokens"] == 5
        assert last["x_groq"]["usage"]["completion_tokens"] == 2
        assert all(chunk.get("usage") is None for chunk in chunks(raw))

    async def test_no_finish_reason_still_ends_with_done(self, wire: Wire) -> None:
        wire.fake.enqueue(Script(reply="a b", finish_reason=None, usage_style="none"))
        _, _, raw = await wire.post()
        assert raw.endswith("data: [DONE]\n\n")
        assert all(c["finish_reason"] is None for chunk in chunks(raw) for c in chunk["choices"])
        assert content(raw) == "a b"

    async def test_explicit_deltas_and_a_fixed_model(self, http: aiohttp.ClientSession) -> None:
        async with FakeLLM(model="fixed") as fake:
            fake.enqueue(Script(deltas=("¡Ho", "la!", "\n")))
            url = f"{fake.base_url}/chat/completions"
            async with http.post(url, json=BODY) as response:
                raw = await response.text()
        deltas = [c["choices"][0]["delta"].get("content") for c in chunks(raw)[1:4]]
        assert deltas == ["¡Ho", "la!", "\n"]
        assert {c["model"] for c in chunks(raw)} == {"fixed"}

    def test_reply_is_split_into_word_deltas_that_join_back(self) -> None:
        assert split_words("Hi  there,\nfriend ") == ("Hi", "  there,", "\nfriend", " ")
        assert "".join(split_words(DEFAULT_REPLY)) == DEFAULT_REPLY

    async def test_first_token_and_token_delays(self, wire: Wire) -> None:
        wire.fake.enqueue(Script(reply="a b c", ttft=0.3, token_delay=0.15))
        stamps: list[float] = []
        async with wire.http.post(wire.url, json=BODY, headers=AUTH) as r:
            start = time.monotonic()
            parser = SSEParser()
            async for data in r.content.iter_any():
                for item in parser.feed(data):
                    if isinstance(item, SSEEvent) and content(f"data: {item.data}\n\n"):
                        stamps.append(time.monotonic() - start)
        assert len(stamps) == 3
        assert stamps[0] >= 0.25
        assert stamps[2] - stamps[0] >= 0.25

    async def test_reported_prompt_tokens_can_be_scripted(self, wire: Wire) -> None:
        wire.fake.enqueue(Script(prompt_tokens=1234))
        _, _, raw = await wire.post()
        assert chunks(raw)[-1]["usage"]["prompt_tokens"] == 1234


class TestBrokenReplies:
    async def test_eof_ends_the_body_without_finish_or_done(self, wire: Wire) -> None:
        wire.fake.enqueue(Script(reply="a b c", after_tokens=2, then="eof"))
        _, _, raw = await wire.post()
        assert "[DONE]" not in raw
        assert content(raw) == "a b"
        assert all(c["finish_reason"] is None for chunk in chunks(raw) for c in chunk["choices"])

    async def test_after_tokens_with_finish_truncates_normally(self, wire: Wire) -> None:
        wire.fake.enqueue(Script(reply="a b c", after_tokens=1))
        _, _, raw = await wire.post()
        assert content(raw) == "a"
        assert raw.endswith("data: [DONE]\n\n")

    async def test_error_chunk(self, wire: Wire) -> None:
        wire.fake.enqueue(Script(after_tokens=1, then="error_chunk"))
        _, _, raw = await wire.post()
        assert chunks(raw)[-1]["error"]["type"] == "server_error"
        assert "[DONE]" not in raw

    async def test_malformed_data_line(self, wire: Wire) -> None:
        wire.fake.enqueue(Script(after_tokens=1, then="malformed"))
        _, _, raw = await wire.post()
        with pytest.raises(json.JSONDecodeError):
            chunks(raw)

    async def test_reset_breaks_the_connection(self, wire: Wire) -> None:
        wire.fake.enqueue(Script(after_tokens=2, then="reset"))
        with pytest.raises(aiohttp.ClientError):
            await wire.post()
        assert not wire.fake.requests[0].cancelled

    async def test_ping_sends_comments_until_the_client_leaves(self, wire: Wire) -> None:
        wire.fake.enqueue(Script(after_tokens=1, then="ping"))
        async with wire.http.post(wire.url, json=BODY, headers=AUTH) as r:
            parser, pings = SSEParser(), 0
            async for data in r.content.iter_any():
                pings += sum(1 for item in parser.feed(data) if not isinstance(item, SSEEvent))
                if pings == 3:
                    break
        assert await wire.was_cancelled()

    @pytest.mark.parametrize(
        "script", [Script(after_tokens=1, then="silence"), Script(headers_then_silence=True)]
    )
    async def test_silence_holds_the_connection(self, wire: Wire, script: Script) -> None:
        wire.fake.enqueue(script)
        async with wire.http.post(wire.url, json=BODY, headers=AUTH) as r:
            assert r.status == 200
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await r.read()
        assert await wire.was_cancelled()

    async def test_silence_ends_when_the_server_stops(self, http: aiohttp.ClientSession) -> None:
        fake = FakeLLM(default=Script(headers_then_silence=True))
        await fake.start()
        async with http.post(f"{fake.base_url}/chat/completions", json=BODY) as response:
            closing = asyncio.create_task(fake.aclose())
            assert await response.text() == ""
            await asyncio.wait_for(closing, timeout=2.0)
        assert not fake.requests[0].cancelled


class TestErrors:
    async def test_status_with_openai_envelope_and_retry_after(self, wire: Wire) -> None:
        wire.fake.enqueue(Script(status=429, retry_after=1.5))
        async with wire.http.post(wire.url, json=BODY, headers=AUTH) as r:
            assert r.status == 429
            assert r.headers["Retry-After"] == "1.5"
            error = (await r.json())["error"]
        assert error["message"].startswith("Rate limit reached")
        assert set(error) == {"message", "type", "param", "code"}

    async def test_fail_times_answers_that_many_requests(self, wire: Wire) -> None:
        wire.fake.enqueue(Script(status=503, fail_times=2), Script(reply="ok"))
        assert wire.fake.pending == 3
        statuses = [(await wire.post())[0] for _ in range(2)]
        assert statuses == [503, 503]
        assert wire.fake.pending == 1
        _, _, raw = await wire.post()
        assert content(raw) == "ok"
        assert wire.fake.pending == 0
        _, _, raw = await wire.post()
        assert content(raw) == DEFAULT_REPLY  # the default script

    async def test_default_script_is_settable(self, wire: Wire) -> None:
        wire.fake.default = Script(reply="always this")
        for _ in range(2):
            assert content((await wire.post())[2]) == "always this"

    @pytest.mark.parametrize(
        ("status", "body", "ctype"),
        [
            (502, "<html><h1>Bad gateway</h1></html>", "text/html"),
            (500, "Internal Server Error", "text/plain"),
            (400, '{"detail": "nope"}', "application/json"),
            (200, "<html>captive portal</html>", "text/html"),
        ],
    )
    async def test_raw_error_bodies(self, wire: Wire, status: int, body: str, ctype: str) -> None:
        wire.fake.enqueue(Script(status=status, error_body=body))
        assert await wire.post() == (status, ctype, body)

    async def test_a_wrong_key_gets_401_and_does_not_use_a_script(self, wire: Wire) -> None:
        wire.fake.enqueue(Script(reply="scripted"))
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            async with wire.http.post(wire.url, json=BODY, headers=headers) as response:
                assert response.status == 401
                assert "API key" in (await response.json())["error"]["message"]
        assert wire.fake.pending == 1
        assert content((await wire.post())[2]) == "scripted"

    @pytest.mark.parametrize("data", [b"not json", b'{"model": "m"}', b"[1, 2]"])
    async def test_a_bad_request_body_gets_400(self, wire: Wire, data: bytes) -> None:
        async with wire.http.post(wire.url, data=data, headers=AUTH) as response:
            assert response.status == 400


class TestNonStreaming:
    async def test_completion_object_with_usage(self, wire: Wire) -> None:
        wire.fake.enqueue(Script(reply="a b c", finish_reason="length"))
        status, ctype, raw = await wire.post(stream=False)
        reply = json.loads(raw)
        assert (status, ctype, reply["object"]) == (200, "application/json", "chat.completion")
        assert reply["choices"][0]["message"] == {"role": "assistant", "content": "a b c"}
        assert reply["choices"][0]["finish_reason"] == "length"
        assert reply["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}

    @pytest.mark.parametrize(("style", "keys"), [("groq", {"usage", "x_groq"}), ("none", set())])
    async def test_usage_styles(self, wire: Wire, style: Any, keys: set[str]) -> None:
        wire.fake.enqueue(Script(usage_style=style, after_tokens=1))
        reply = json.loads((await wire.post(stream=False))[2])
        assert {"usage", "x_groq"} & set(reply) == keys
        assert reply["choices"][0]["message"]["content"] == "Hello!"

    async def test_delay(self, wire: Wire) -> None:
        wire.fake.enqueue(Script(nonstream_delay=0.3))
        started = time.monotonic()
        await wire.post(stream=False)
        assert time.monotonic() - started >= 0.25


class TestRecording:
    async def test_requests_are_recorded(self, wire: Wire) -> None:
        await wire.post()
        record = wire.fake.requests[0]
        assert (record.method, record.path) == ("POST", "/v1/chat/completions")
        assert record.body["model"] == "requested-model"
        assert record.headers["authorization"] == f"Bearer {KEY}"
        assert wire.fake.messages(0) == BODY["messages"]
        assert record.script == wire.fake.default
        assert isinstance(record.client_port, int)
        assert record.finished.is_set()
        assert not record.cancelled

    async def test_disconnect_mid_stream_is_recorded_as_cancelled(self, wire: Wire) -> None:
        wire.fake.enqueue(Script(reply="w " * 100, token_delay=0.05))
        async with wire.http.post(wire.url, json=BODY, headers=AUTH) as r:
            await r.content.readany()
            r.close()
        assert await wire.was_cancelled()

    async def test_models_endpoint(self, wire: Wire) -> None:
        async with wire.http.get(f"{wire.fake.base_url}/models") as response:
            listing = await response.json()
        assert [model["id"] for model in listing["data"]] == ["fake-model"]
        assert wire.fake.requests[0].path == "/v1/models"

    async def test_base_url(self) -> None:
        fake = FakeLLM()
        with pytest.raises(RuntimeError):
            _ = fake.base_url
        async with fake:
            assert fake.base_url.startswith("http://127.0.0.1:")
            assert fake.base_url.endswith("/v1")
        assert ReExported is FakeLLM
        with pytest.raises(AttributeError):
            _ = chatbot_api.testing.NotAThing  # type: ignore[attr-defined]

    async def test_unreachable_url_refuses_connections(self, http: aiohttp.ClientSession) -> None:
        with pytest.raises(aiohttp.ClientConnectorError):
            await http.get(unreachable_url() + "/models")


class TestConcurrency:
    async def test_hundreds_of_concurrent_streams(self, wire: Wire) -> None:
        wire.fake.default = Script(reply="tok " * 20, token_delay=0.01)
        results = await asyncio.gather(*(wire.post() for _ in range(300)))
        assert {content(raw) for _, _, raw in results} == {"tok " * 20}
        assert len(wire.fake.requests) == 300

    async def test_a_fake_that_records_nothing_keeps_no_request(self) -> None:
        async with FakeLLM(record=False) as fake, aiohttp.ClientSession() as http:
            for _ in range(3):
                async with http.post(f"{fake.base_url}/chat/completions", json=BODY) as response:
                    assert content(await response.text()) == DEFAULT_REPLY
        assert fake.requests == []


class TestCommandLine:
    def test_arguments_make_the_default_script(self) -> None:
        args = parse_args(
            ["--port", "0", "--ttft", "0.05", "--tokens", "5", "--token-delay", "0.1"]
        )
        script = script_from_args(args)
        assert script.deltas is not None
        assert len(script.deltas) == 5
        assert (script.ttft, script.token_delay, script.finish_reason) == (0.05, 0.1, "stop")
        assert script_from_args(parse_args(["--finish-reason", ""])).finish_reason is None

    async def test_serve_announces_its_url_and_stops_on_request(
        self, http: aiohttp.ClientSession
    ) -> None:
        stop = asyncio.Event()
        announced: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        args = parse_args(["--port", "0", "--reply", "x"])
        task = asyncio.create_task(serve(args, stop, announced.set_result))
        url = await asyncio.wait_for(announced, timeout=5.0)
        async with http.post(f"{url}/chat/completions", json=BODY) as response:
            assert content(await response.text()) == "x"
        stop.set()
        await asyncio.wait_for(task, timeout=2.0)

    async def test_runs_as_a_module(self, http: aiohttp.ClientSession) -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "chatbot_api.testing.fake_llm",
            "--port",
            "0",
            "--tokens",
            "3",
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), timeout=10.0)
            url = line.decode().strip()
            async with http.post(f"{url}/chat/completions", json=BODY) as response:
                assert len(chunks(await response.text())) == 1 + 3 + 2
        finally:
            process.terminate()
            assert await asyncio.wait_for(process.wait(), timeout=5.0) == 0
