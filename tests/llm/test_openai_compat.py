"""The OpenAI-compatible client against the real fake server, over loopback sockets."""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing

import pytest

from chatbot_api.llm import errors, openai_compat
from chatbot_api.llm.base import (
    Finish,
    GenerationOptions,
    Provider,
    StreamEvent,
    TextDelta,
    Timeouts,
    Usage,
    complete,
)
from chatbot_api.llm.openai_compat import OpenAICompatProvider
from chatbot_api.llm.tokens import TokenEstimator
from chatbot_api.testing.fake_llm import Script, unreachable_url
from tests.llm.conftest import API_KEY, MESSAGES, OPTIONS, Upstream

FAST = Timeouts(connect=2.0, first_token=0.3, idle=0.3, total=5.0)
ErrorClass = type[errors.ProviderError]
NOT_JSON = "an error body that is not JSON"


def texts(events: list[StreamEvent]) -> list[str]:
    return [event.text for event in events if isinstance(event, TextDelta)]


async def was_cancelled(up: Upstream, index: int = 0) -> bool:
    """Whether the fake saw request `index` abandoned by the client (waits up to 1 s)."""
    await asyncio.wait_for(up.fake.requests[index].finished.wait(), timeout=1.0)
    return up.fake.requests[index].cancelled


class TestStreaming:
    async def test_deltas_then_usage_then_finish(self, upstream: Upstream) -> None:
        upstream.enqueue(Script(deltas=("Hi", " there", "", " friend"), prompt_tokens=21))
        assert await upstream.collect() == [
            TextDelta("Hi"),
            TextDelta(" there"),
            TextDelta(" friend"),
            Usage(prompt_tokens=21, completion_tokens=4, total_tokens=25),
            Finish("stop"),
        ]

    async def test_groq_usage_arrives_in_x_groq(self, upstream: Upstream) -> None:
        upstream.enqueue(Script(reply="one two", usage_style="groq", prompt_tokens=9))
        assert (await upstream.collect())[-2:] == [Usage(9, 2, 11), Finish("stop")]

    @pytest.mark.parametrize(
        ("script", "ending"),
        [
            (Script(reply="a b", finish_reason="length", usage_style="none"), [Finish("length")]),
            # No finish_reason: the iterator just ends, and the caller stores "incomplete".
            (Script(reply="a b", finish_reason=None, prompt_tokens=3), [Usage(3, 2, 5)]),
            (Script(reply="a b c", after_tokens=2, then="eof"), []),  # EOF, no [DONE]
        ],
        ids=["length", "no-finish-reason", "clean-eof"],
    )
    async def test_how_a_stream_ends(
        self, upstream: Upstream, script: Script, ending: list[StreamEvent]
    ) -> None:
        upstream.enqueue(script)
        assert await upstream.collect() == [TextDelta("a"), TextDelta(" b"), *ending]

    async def test_complete_gathers_the_stream(self, upstream: Upstream) -> None:
        upstream.enqueue(Script(reply="Hello there, friend.", prompt_tokens=12))
        result = await complete(upstream.provider, MESSAGES, OPTIONS)
        assert result.text == "Hello there, friend."
        assert result.finish_reason == "stop"
        assert result.usage == Usage(12, 3, 15)

    async def test_unicode_text_survives(self, upstream: Upstream) -> None:
        upstream.enqueue(Script(deltas=("¡Hola", ", señor", " 😀", "\n\nmulti\nline")))
        result = await complete(upstream.provider, MESSAGES, OPTIONS)
        assert result.text == "¡Hola, señor 😀\n\nmulti\nline"

    async def test_connection_is_reused_between_calls(self, upstream: Upstream) -> None:
        await upstream.collect()
        await upstream.collect()
        assert upstream.fake.requests[0].client_port == upstream.fake.requests[1].client_port

    async def test_a_body_that_ends_after_done_still_leaves_its_connection_for_reuse(
        self, upstream: Upstream
    ) -> None:
        """A server that ends its body in a write of its own after [DONE] (most do): aiohttp
        only reuses a connection whose body was read to the end."""
        upstream.enqueue(Script(reply="a b", end_delay=0.05))
        assert texts(await upstream.collect()) == ["a", " b"]
        await asyncio.wait_for(upstream.fake.requests[0].finished.wait(), timeout=2.0)
        await asyncio.sleep(0.1)  # the end reaches the client, which reads it
        await upstream.collect()
        assert upstream.fake.requests[0].client_port == upstream.fake.requests[1].client_port

    async def test_the_reply_ends_at_done_without_waiting_for_the_body(
        self, upstream: Upstream
    ) -> None:
        upstream.enqueue(Script(reply="a b", end_delay=30.0))
        # Well within END_TIMEOUT (5 s): the iterator does not wait for the body to end.
        events = await asyncio.wait_for(upstream.collect(), timeout=1.0)
        assert events[-1] == Finish("stop")
        assert not upstream.fake.requests[0].finished.is_set()  # its body is still open

    async def test_a_body_that_does_not_end_in_time_costs_its_connection(
        self, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(openai_compat, "END_TIMEOUT", 0.05)
        upstream.enqueue(Script(reply="a b", end_delay=30.0))
        await upstream.collect()
        await asyncio.sleep(0.2)
        await upstream.collect()
        assert upstream.fake.requests[0].client_port != upstream.fake.requests[1].client_port

    async def test_closing_the_provider_does_not_wait_for_a_body_to_end(
        self, upstream: Upstream
    ) -> None:
        provider = await upstream.make()
        upstream.enqueue(Script(reply="a b", end_delay=30.0))
        await upstream.collect(provider)
        await asyncio.wait_for(provider.aclose(), timeout=2.0)
        assert not provider.is_ready()

    async def test_concurrent_streams_are_not_capped_by_the_pool(self, upstream: Upstream) -> None:
        upstream.fake.default = Script(reply="w " * 20, token_delay=0.005)
        calls = (complete(upstream.provider, MESSAGES, OPTIONS) for _ in range(150))
        results = await asyncio.gather(*calls)
        assert {result.text for result in results} == {"w " * 20}
        assert len({request.client_port for request in upstream.fake.requests}) == 150


class TestRequest:
    async def test_body_carries_model_messages_and_options(self, upstream: Upstream) -> None:
        provider = await upstream.make(model="llama-3.3-70b")
        options = GenerationOptions(max_tokens=77, temperature=0.25)
        await complete(provider, MESSAGES, options)
        await upstream.collect(provider)
        body = upstream.fake.requests[0].body
        assert upstream.fake.messages(0) == [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hello in three words"},
        ]
        assert body["model"] == "llama-3.3-70b"
        assert (body["max_tokens"], body["temperature"]) == (77, 0.25)
        assert (body["stream"], body["stream_options"]) == (True, {"include_usage": True})
        assert "temperature" not in upstream.fake.requests[1].body  # unset: the server's default

    async def test_bearer_key_and_extra_headers_are_sent(self, upstream: Upstream) -> None:
        provider = await upstream.make(extra_headers={"X-Title": "chatbot-api"})
        await upstream.collect(provider)
        request = upstream.fake.requests[0]
        assert request.headers["Authorization"] == f"Bearer {API_KEY}"
        assert request.headers["X-Title"] == "chatbot-api"
        assert request.path == "/v1/chat/completions"

    async def test_no_authorization_header_without_a_key(self, upstream: Upstream) -> None:
        provider = await upstream.make(api_key=None, base_url=upstream.fake.base_url + "/")
        _, error = await upstream.fail(provider)
        assert type(error) is errors.ProviderAuthError
        assert "Authorization" not in upstream.fake.requests[0].headers


class TestHttpErrors:
    @pytest.mark.parametrize(
        ("status", "error_class"),
        [
            (400, errors.ProviderRequestRejected),
            (401, errors.ProviderAuthError),
            (403, errors.ProviderAuthError),
            (404, errors.ProviderRequestRejected),
            (408, errors.ProviderTimeout),
            (409, errors.ProviderUnavailable),
            (413, errors.ProviderRequestRejected),
            (422, errors.ProviderRequestRejected),
            (429, errors.ProviderRateLimited),
            (500, errors.ProviderUnavailable),
            (502, errors.ProviderUnavailable),
            (503, errors.ProviderUnavailable),
            (504, errors.ProviderTimeout),
            (302, errors.ProviderBadResponse),
        ],
    )
    async def test_status_maps_to_error_class(
        self, upstream: Upstream, status: int, error_class: ErrorClass
    ) -> None:
        upstream.enqueue(Script(status=status))
        events, error = await upstream.fail()
        assert (type(error), error.status, events) == (error_class, status, [])

    async def test_rate_limit_carries_retry_after(self, upstream: Upstream) -> None:
        upstream.enqueue(Script(status=429, retry_after=2.5))
        _, error = await upstream.fail()
        assert isinstance(error, errors.ProviderRateLimited)
        assert error.retry_after == 2.5
        assert error.retryable

    @pytest.mark.parametrize(
        ("status", "body", "detail"),
        [
            (400, '{"error": {"message": "context\\n  too long"}}', "context too long"),
            (400, '{"error": "context too long"}', "context too long"),
            (400, '{"message": "context too long", "object": "error"}', "context too long"),
            (400, '{"detail": "context too long"}', "context too long"),
            (422, '{"error": "' + "x" * 5000 + '"}', "x" * 199 + "…"),
            (500, "Internal Server Error", NOT_JSON),
            (500, '{"error": {"message": "' + "x" * 200_000 + '"}}', NOT_JSON),  # read to a cap
            # A gateway's HTML page says nothing about the model: its status decides the class,
            # and a 502 is transient, so the error is retryable rather than a "bad response".
            (502, "<html><h1>502 Bad Gateway</h1>cloudflare</html>", "an HTML error page"),
        ],
    )
    async def test_error_detail_comes_from_the_body(
        self, upstream: Upstream, status: int, body: str, detail: str
    ) -> None:
        upstream.enqueue(Script(status=status, error_body=body))
        _, error = await upstream.fail()
        assert str(error) == f"upstream returned HTTP {status}: {detail}"

    async def test_html_page_with_status_200_is_a_bad_response(self, upstream: Upstream) -> None:
        upstream.enqueue(Script(status=200, error_body="<html>Please log in to the Wi-Fi</html>"))
        _, error = await upstream.fail()
        assert type(error) is errors.ProviderBadResponse
        assert "text/html" in str(error)

    async def test_wrong_key_is_an_auth_error(self, upstream: Upstream) -> None:
        _, error = await upstream.fail(await upstream.make(api_key="sk-wrong-key-000000"))
        assert (type(error), error.status) == (errors.ProviderAuthError, 401)


class TestBrokenStreams:
    async def test_connection_refused_is_unavailable(self, upstream: Upstream) -> None:
        provider = await upstream.make(base_url=unreachable_url())
        events, error = await upstream.fail(provider)
        assert (type(error), events) == (errors.ProviderUnavailable, [])

    async def test_reset_mid_stream_raises_after_the_deltas(self, upstream: Upstream) -> None:
        upstream.enqueue(Script(reply="a b c d e", after_tokens=3, then="reset"))
        events, error = await upstream.fail()
        assert texts(events) == ["a", " b", " c"]
        assert type(error) is errors.ProviderUnavailable

    @pytest.mark.parametrize(
        ("chunk", "error_class", "message"),
        [
            (None, errors.ProviderBadResponse, "error mid-stream: The model crashed mid-stream."),
            ('{"error": {"message": "busy", "code": 503}}', errors.ProviderUnavailable, "busy"),
            ('{"error": {"message": "slow", "status": 429}}', errors.ProviderRateLimited, "slow"),
            ('{"error": "worker died"}', errors.ProviderBadResponse, "mid-stream: worker died"),
            ('{"error": {"code": "x"}}', errors.ProviderBadResponse, "an error mid-stream"),
        ],
    )
    async def test_in_band_error_chunk(
        self, upstream: Upstream, chunk: str | None, error_class: ErrorClass, message: str
    ) -> None:
        # A status in the error decides the class, as it would for an HTTP status.
        upstream.enqueue(Script(reply="a b", after_tokens=1, then="error_chunk", error_chunk=chunk))
        events, error = await upstream.fail()
        assert texts(events) == ["a"]
        assert type(error) is error_class
        assert str(error).endswith(message)

    async def test_malformed_chunk_is_a_bad_response(self, upstream: Upstream) -> None:
        upstream.enqueue(Script(reply="a b c", after_tokens=2, then="malformed"))
        events, error = await upstream.fail()
        assert texts(events) == ["a", " b"]
        assert type(error) is errors.ProviderBadResponse

    async def test_stream_before_start_is_unavailable(self) -> None:
        with pytest.raises(errors.ProviderUnavailable, match="not started"):
            await anext(make("http://127.0.0.1:9/v1", None).stream(MESSAGES, OPTIONS))


class TestDeadlines:
    @pytest.mark.parametrize(
        "script", [Script(ttft=3.0), Script(headers_then_silence=True)], ids=["slow", "silent"]
    )
    async def test_first_token_deadline(self, upstream: Upstream, script: Script) -> None:
        # The fake sends the role chunk at once (as vLLM does): an empty delta is not a token.
        upstream.enqueue(script)
        started = time.monotonic()
        events, error = await upstream.fail(await upstream.make(timeouts=FAST))
        assert (type(error), events) == (errors.ProviderTimeout, [])
        assert str(error) == "no text from upstream within 0.3s"
        assert time.monotonic() - started < 1.5

    async def test_idle_deadline_fires_despite_keep_alive_pings(self, upstream: Upstream) -> None:
        # The fake pings every 0.1 s, three times per idle period: the pings must not count.
        upstream.enqueue(Script(reply="a b c", after_tokens=2, then="ping"))
        started = time.monotonic()
        events, error = await upstream.fail(await upstream.make(timeouts=FAST))
        assert texts(events) == ["a", " b"]
        assert type(error) is errors.ProviderTimeout
        assert str(error) == "upstream sent no text for 0.3s"
        assert time.monotonic() - started < 1.5

    async def test_total_deadline(self, upstream: Upstream) -> None:
        timeouts = Timeouts(connect=2.0, first_token=1.0, idle=1.0, total=0.5)
        upstream.enqueue(Script(reply="w " * 50, token_delay=0.1))
        events, error = await upstream.fail(await upstream.make(timeouts=timeouts))
        assert type(error) is errors.ProviderTimeout
        assert str(error) == "upstream did not finish within 0.5s"
        assert 2 <= len(texts(events)) <= 7

    @pytest.mark.parametrize(
        ("gap", "hold", "idle"),
        [
            # Upstream gaps longer than `idle`, but the consumer takes part of each gap:
            # counted from a delta's arrival rather than from the next read, this would time out.
            (0.5, 0.3, 0.35),
            # A consumer slower than the upstream holds the stream past the idle deadline.
            (0.2, 0.3, 0.2),
        ],
    )
    async def test_time_spent_by_a_slow_consumer_is_not_idleness(
        self, upstream: Upstream, gap: float, hold: float, idle: float
    ) -> None:
        timeouts = Timeouts(connect=2.0, first_token=1.0, idle=idle, total=5.0)
        provider = await upstream.make(timeouts=timeouts)
        upstream.enqueue(Script(reply="a b c", token_delay=gap))
        events: list[StreamEvent] = []
        async for event in provider.stream(MESSAGES, OPTIONS):
            events.append(event)
            if isinstance(event, TextDelta):
                await asyncio.sleep(hold)
        assert texts(events) == ["a", " b", " c"]
        assert events[-1] == Finish("stop")

    async def test_a_steady_stream_outlasts_the_first_token_and_idle_limits(
        self, upstream: Upstream
    ) -> None:
        upstream.enqueue(Script(reply="w " * 8, token_delay=0.1))  # 0.7 s, limits of 0.3 s
        events = await upstream.collect(await upstream.make(timeouts=FAST))
        assert "".join(texts(events)) == "w " * 8
        assert events[-1] == Finish("stop")

    async def test_short_idle_after_a_long_first_token_deadline(self, upstream: Upstream) -> None:
        # The deadline moves earlier at the first token (3 s -> 0.3 s), and the upstream call
        # is closed when it fires.
        timeouts = Timeouts(connect=2.0, first_token=3.0, idle=0.3, total=5.0)
        upstream.enqueue(Script(reply="a b", after_tokens=1, then="silence"))
        started = time.monotonic()
        _, error = await upstream.fail(await upstream.make(timeouts=timeouts))
        assert str(error) == "upstream sent no text for 0.3s"
        assert time.monotonic() - started < 1.5
        assert await was_cancelled(upstream)

    async def test_total_deadline_passed_while_the_consumer_held_the_stream(
        self, upstream: Upstream
    ) -> None:
        timeouts = Timeouts(connect=2.0, first_token=1.0, idle=1.0, total=0.5)
        provider = await upstream.make(timeouts=timeouts)
        upstream.enqueue(Script(reply="a b c", token_delay=0.2))
        events: list[StreamEvent] = []

        async def hold_each_event() -> None:
            async for event in provider.stream(MESSAGES, OPTIONS):
                events.append(event)
                await asyncio.sleep(0.6)

        with pytest.raises(errors.ProviderTimeout, match=r"did not finish within 0\.5s"):
            await hold_each_event()
        assert texts(events) == ["a"]

    async def test_server_that_never_answers_hits_the_first_token_deadline(
        self, upstream: Upstream
    ) -> None:
        held: list[asyncio.StreamWriter] = []

        def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)  # keep the connection open, never write a byte

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        provider = await upstream.make(base_url=f"http://127.0.0.1:{port}/v1", timeouts=FAST)
        async with server:
            _, error = await upstream.fail(provider)
            for writer in held:
                writer.close()
        assert str(error) == "no text from upstream within 0.3s"


class TestEarlyClose:
    async def test_aclose_after_first_delta_cancels_upstream(self, upstream: Upstream) -> None:
        upstream.enqueue(Script(reply="w " * 100, token_delay=0.05))
        async with aclosing(upstream.provider.stream(MESSAGES, OPTIONS)) as stream:
            async for event in stream:
                assert event == TextDelta("w")
                break
        assert await was_cancelled(upstream)

    async def test_cancelling_the_consumer_cancels_upstream(self, upstream: Upstream) -> None:
        upstream.enqueue(Script(reply="w " * 100, token_delay=0.05))
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in upstream.provider.stream(MESSAGES, OPTIONS):
                first.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), timeout=1.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await was_cancelled(upstream)

    async def test_a_finished_stream_is_not_cancelled(self, upstream: Upstream) -> None:
        await upstream.collect()
        assert not await was_cancelled(upstream)


class TestSecrets:
    async def test_key_never_appears_in_errors(self, upstream: Upstream) -> None:
        leaky = '{"error": {"message": "Incorrect API key provided: %s. Or sk-proj-abc123xyz"}}'
        upstream.enqueue(
            Script(status=400, error_body=leaky % API_KEY),
            Script(status=401, error_body=leaky % API_KEY),
            Script(status=500, error_body=f"<html>{API_KEY}</html>"),
            Script(after_tokens=0, then="error_chunk", error_chunk=leaky % API_KEY),
        )
        messages = []
        for _ in range(4):
            _, error = await upstream.fail()
            messages.append(f"{error!s} {error!r}")
        assert all(API_KEY not in message for message in messages)
        assert all("sk-proj-abc123xyz" not in message for message in messages)
        assert "[redacted]" in messages[0]
        assert "[redacted]" in messages[3]
        assert API_KEY not in repr(upstream.provider)


def make(base_url: str, api_key: str | None) -> OpenAICompatProvider:
    return OpenAICompatProvider(
        name="groq", base_url=base_url, api_key=api_key, model="m", context_window=1, timeouts=FAST
    )


class TestLifecycle:
    @pytest.mark.parametrize(
        ("base_url", "api_key", "ready"),
        [
            ("https://api.groq.com/openai/v1", None, False),
            ("https://api.groq.com/openai/v1", "", False),
            ("https://api.groq.com/openai/v1", "gsk_x", True),
            ("https://api.openai.com/v1", None, False),
            ("http://localhost:11434/v1", None, True),  # Ollama
            ("http://vllm:8000/v1", None, True),
        ],
    )
    async def test_readiness(self, base_url: str, api_key: str | None, ready: bool) -> None:
        provider = make(base_url, api_key)
        assert not provider.is_ready()
        await provider.start()
        await provider.start()  # idempotent
        assert provider.is_ready() is ready
        await provider.aclose()
        await provider.aclose()
        assert not provider.is_ready()

    def test_is_a_provider_with_its_capabilities(self) -> None:
        provider = make("http://localhost:11434/v1", None)
        assert isinstance(provider, Provider)
        assert (provider.name, provider.model, provider.context_window) == ("groq", "m", 1)
        assert provider.supports_streaming
        assert provider.message_overhead() == 4

    def test_token_counting_delegates_to_the_estimator(self) -> None:
        provider = make("http://localhost:11434/v1", None)
        text = "Cuántos tokens cuesta este mensaje?"
        estimated = provider.count_tokens(text)
        assert estimated == TokenEstimator().count(text)
        for _ in range(30):
            provider.observe_usage(estimated, Usage(3 * estimated, 1, 3 * estimated + 1))
        assert provider.estimator.ratio > 2
        assert provider.count_tokens(text) > 2 * estimated
