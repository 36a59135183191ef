"""A `Provider` for any OpenAI-compatible Chat Completions endpoint: Groq, OpenAI, vLLM,
Ollama, the llama.cpp server...

This module speaks HTTP itself (`llm.http`, not the `openai` SDK), through one pool of
keep-alive connections per provider that `start()` opens and `aclose()` closes. Every call is a
streaming `POST {base_url}/chat/completions`. Its SSE body is parsed by `llm.sse`, and each
`data:` chunk is validated with the small TypedDicts below:

    choices[].delta.content  -> TextDelta (non-empty only, yielded as it arrives)
    choices[].finish_reason  -> kept, yielded as the last event, Finish(reason)
    usage | x_groq.usage     -> kept, yielded as Usage just before Finish
    {"error": {...}}         -> ProviderBadResponse, or the class its status code implies
    data: [DONE] / clean EOF -> end: Usage and Finish if seen; with no finish_reason the
                                iterator just stops, so the caller stores the reply as incomplete

Deadlines are our own, from `Timeouts`: `connect` bounds opening a connection. `first_token`
runs from the start of the request to the first TextDelta. `idle` is the longest gap between
TextDeltas, counted from when the consumer asks for more, so its own time is not idleness.
`total` covers the whole call, and a consumer that holds the stream past it gets the error at
the next read. Keep-alive comments (`: ping`) reset none of them. One timer per call enforces
them on the reads (`_ReadDeadline`); a timeout per read would cost more than the token it guards.

A non-2xx status becomes `errors.error_for_status()`, with the message of a JSON error body
(secret-free, at most 200 characters). An HTML error page gives a generic detail, and the
status decides the class: a 502 page from a gateway is `ProviderUnavailable`, which is
retryable. A 2xx that is not `text/event-stream` is `ProviderBadResponse`. Foreign exceptions
are mapped in one place, the `except` around the request and read loop. Closing the iterator
early closes the HTTP response, so the upstream sees the disconnect and stops generating.

A finished call hands its connection back to the pool for the next one, which then needs no
new TCP (or TLS) handshake. A connection is only reused once its body has ended, and a server
usually ends its body (the last chunk of a chunked response) in a write of its own after
`[DONE]`; so if that end has not arrived yet, the connection reads it on its own
(`http.Response.release`), and the iterator does not wait for it. A body that goes on past
`[DONE]` for more than `MAX_AFTER_DONE` bytes, or does not end within `END_TIMEOUT`, costs its
connection instead.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncGenerator, Mapping
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import to_json
from typing_extensions import TypedDict

from chatbot_api.llm import errors, http
from chatbot_api.llm.base import (
    ChatMessage,
    Finish,
    GenerationOptions,
    StreamEvent,
    TextDelta,
    Timeouts,
    Usage,
)
from chatbot_api.llm.sse import SSEEvent, SSEParser
from chatbot_api.llm.tokens import TokenEstimator

logger = logging.getLogger(__name__)

# Hosted services that refuse calls without a key; self-hosted servers usually need none.
KEYED_HOSTS = frozenset({"api.groq.com", "api.openai.com"})
MESSAGE_OVERHEAD = 4
MAX_DETAIL = 200
MAX_ERROR_BODY = 64 * 1024
# How long, and how much, a body is read after `[DONE]` for its connection to be reused.
END_TIMEOUT = 5.0
MAX_AFTER_DONE = 64 * 1024
_JSON_BODY = {"Content-Type": "application/json"}
_KEY_LIKE = re.compile(r"\b(?:sk|gsk|xai|key)[-_][A-Za-z0-9_\-*.]{6,}")


# A chunk is validated into plain dicts (TypedDicts), not models: pydantic-core checks the
# same types at about half the cost per chunk (1.7-1.8 against 3.4-4.7 µs here), and it runs for
# every token relayed.
class _Delta(TypedDict, total=False):
    content: str | None


class _Choice(TypedDict, total=False):
    delta: _Delta | None
    finish_reason: str | None


class _UsageBody(TypedDict, total=False):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _XGroq(TypedDict, total=False):
    usage: _UsageBody | None


class _ErrorFields(TypedDict, total=False):
    message: str | None
    code: int | str | None
    status: int | None


class _Chunk(TypedDict, total=False):
    choices: list[_Choice]
    usage: _UsageBody | None
    x_groq: _XGroq | None
    error: _ErrorFields | str | None


_CHUNK = TypeAdapter(_Chunk)


def _usage_event(body: _UsageBody) -> Usage:
    prompt, completion = body.get("prompt_tokens", 0), body.get("completion_tokens", 0)
    return Usage(prompt, completion, body.get("total_tokens", 0) or prompt + completion)


class _ErrorEnvelope(BaseModel):
    """Error bodies: OpenAI/Groq `{"error": {...}}`, `{"error": "..."}`, vLLM's older
    `{"object": "error", "message": ...}` and FastAPI-style `{"detail": "..."}`."""

    error: _ErrorFields | str | None = None
    message: str | None = None
    detail: str | None = None

    def text(self) -> str:
        if isinstance(self.error, str):
            return self.error
        if self.error is not None and (message := self.error.get("message")):
            return message
        return self.message or self.detail or ""


class _ReadDeadline:
    """The deadline on the reads of one call, kept by one timer rather than a timeout per read
    (which cost more than parsing the token it guarded).

    Moving the deadline later costs nothing: a timer that fires early re-arms itself at the
    current deadline. On expiry it fails the pending read with `TimeoutError`. While the consumer
    holds the stream between two reads the timer stands down, as the consumer's time is not the
    upstream's; the next `arm()` re-checks the deadline.
    """

    __slots__ = ("_armed_for", "_handle", "_loop", "_reader", "expired", "reading", "when")

    def __init__(self, loop: asyncio.AbstractEventLoop, reader: http.Response, when: float) -> None:
        self._loop = loop
        self._reader = reader
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for = when
        self.when = when
        self.reading = False
        self.expired = False

    def arm(self) -> None:
        """Call before each read."""
        self.reading = True
        if self._handle is None:
            if self._loop.time() >= self.when:
                self._expire()
            else:
                self._schedule()

    def move(self, when: float) -> None:
        if self._handle is not None and when < self._armed_for:
            self._handle.cancel()  # earlier (first token -> idle): re-arm now
            self.when = when
            self._schedule()
        self.when = when

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self) -> None:
        self._armed_for = self.when
        self._handle = self._loop.call_at(self.when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        if not self.reading:
            return
        if self._loop.time() < self.when:
            self._schedule()
        else:
            self._expire()

    def _expire(self) -> None:
        self.expired = True
        self._reader.set_exception(TimeoutError("read deadline"))


class OpenAICompatProvider:
    """A remote chat model behind an OpenAI-compatible API. Create once, `start()`, `aclose()`."""

    def __init__(
        self,
        *,
        name: str,
        base_url: str,
        api_key: str | None,
        model: str,
        context_window: int,
        timeouts: Timeouts,
        max_connections: int = 0,
        extra_headers: Mapping[str, str] | None = None,
    ) -> None:
        self._name = name
        self._base_url = base_url.rstrip("/")
        self._url = f"{self._base_url}/chat/completions"
        self._api_key = api_key or None
        self._model = model
        self._context_window = context_window
        self._timeouts = timeouts
        self._max_connections = max_connections
        self._extra_headers = dict(extra_headers or {})
        self._estimator = TokenEstimator()
        self._client: http.Client | None = None

    def __repr__(self) -> str:
        return f"OpenAICompatProvider(name={self._name!r}, base_url={self._base_url!r})"

    @property
    def name(self) -> str:
        return self._name

    @property
    def model(self) -> str:
        return self._model

    @property
    def context_window(self) -> int:
        return self._context_window

    @property
    def supports_streaming(self) -> bool:
        return True

    @property
    def estimator(self) -> TokenEstimator:
        return self._estimator

    def count_tokens(self, text: str) -> int:
        return self._estimator.count(text)

    def message_overhead(self) -> int:
        return MESSAGE_OVERHEAD

    def max_tokens_per_byte(self) -> float:
        return self._estimator.max_tokens_per_byte()

    def observe_usage(self, estimated_prompt_tokens: int, usage: Usage) -> None:
        self._estimator.observe(estimated_prompt_tokens, usage.prompt_tokens)

    async def start(self) -> None:
        if self._client is not None:
            return
        headers = {"Accept": "text/event-stream", **self._extra_headers}
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key}"
        # Only connecting is timed there: the read deadlines are enforced in stream(), where
        # keep-alive comments cannot extend them.
        self._client = http.Client(
            self._url,
            headers=headers,
            connect_timeout=self._timeouts.connect,
            max_connections=self._max_connections,
        )

    def is_ready(self) -> bool:
        if self._client is None or self._client.closed:
            return False
        host = urlsplit(self._base_url).hostname or ""
        return self._api_key is not None or host not in KEYED_HOSTS

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def stream(
        self, messages: list[ChatMessage], options: GenerationOptions
    ) -> AsyncGenerator[StreamEvent, None]:
        client = self._client
        if client is None:
            raise errors.ProviderUnavailable(f"provider {self._name} is not started")
        loop = asyncio.get_running_loop()
        t = self._timeouts
        started = loop.time()
        total_at = started + t.total
        # Until the first TextDelta the deadline is the first-token one; after, the idle one.
        first_at = min(started + t.first_token, total_at)
        phase = "first_token"
        timer: asyncio.Timeout | None = None
        deadline: _ReadDeadline | None = None
        response: http.Response | None = None
        finished = False
        usage: Usage | None = None
        finish: str | None = None
        try:
            async with asyncio.timeout_at(first_at) as timer:
                response = await client.post(
                    self._url, self._payload(messages, options), _JSON_BODY
                )
                # Sent: a long stream keeps no reference to the prompt (a long history).
                del messages
                if not 200 <= response.status < 300:
                    raise await self._status_error(response)
                if response.content_type != "text/event-stream":
                    raise errors.ProviderBadResponse(
                        f"upstream answered with {response.content_type}, not an event stream",
                        status=response.status,
                    )
            parser = SSEParser()
            deadline = _ReadDeadline(loop, response, first_at)
            while True:
                deadline.arm()
                chunk = await response.read()
                deadline.reading = False
                if not chunk:
                    break  # clean EOF
                for item in parser.feed(chunk):
                    if type(item) is not SSEEvent:
                        continue  # a comment (keep-alive): it must not move any deadline
                    if item.data == "[DONE]":
                        finished = True
                        break
                    parsed = _CHUNK.validate_json(item.data)
                    error = parsed.get("error")
                    if error is not None:
                        raise self._inband_error(error)
                    for choice in parsed.get("choices", ()):
                        if reason := choice.get("finish_reason"):
                            finish = reason
                        delta = choice.get("delta")
                        text = delta.get("content") if delta is not None else None
                        if text:
                            yield TextDelta(text)
                            # Measured after the consumer resumes us: its time is not idleness.
                            phase = "idle"
                            deadline.move(min(loop.time() + t.idle, total_at))
                    found = parsed.get("usage")
                    if found is None and (groq := parsed.get("x_groq")) is not None:
                        found = groq.get("usage")
                    if found is not None:
                        usage = _usage_event(found)
                if finished:
                    break
            finished = True
        except errors.ProviderError:
            raise
        except Exception as exc:
            if isinstance(exc, TimeoutError):
                if deadline is not None and deadline.expired:
                    raise self._deadline_error(phase, total_at, deadline.when) from None
                if timer is not None and timer.expired():
                    raise self._deadline_error(phase, total_at, first_at) from None
            raise errors.map_exception(exc) from exc
        finally:
            if deadline is not None:
                deadline.cancel()
            # Normal end: hand the connection back to the pool. Anything else, including the
            # consumer closing us early or being cancelled: close the socket so the upstream
            # stops generating.
            if response is not None:
                if finished:
                    response.release(drop_limit=MAX_AFTER_DONE, drop_timeout=END_TIMEOUT)
                else:
                    response.close()
        if usage is not None:
            yield usage
        if finish is not None:
            yield Finish(finish)

    def _payload(self, messages: list[ChatMessage], options: GenerationOptions) -> bytes:
        body: dict[str, Any] = {
            "model": options.model or self._model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": options.max_tokens,
        }
        if options.temperature is not None:
            body["temperature"] = options.temperature
        # pydantic-core's serialiser: UTF-8 as is, about a quarter of `json.dumps`'s CPU.
        return to_json(body)

    def _deadline_error(
        self, phase: str, total_at: float, deadline: float
    ) -> errors.ProviderTimeout:
        t = self._timeouts
        if deadline >= total_at:
            return errors.ProviderTimeout(f"upstream did not finish within {t.total:g}s")
        if phase == "first_token":
            return errors.ProviderTimeout(f"no text from upstream within {t.first_token:g}s")
        return errors.ProviderTimeout(f"upstream sent no text for {t.idle:g}s")

    async def _status_error(self, response: http.Response) -> errors.ProviderError:
        body = bytearray()
        while len(body) < MAX_ERROR_BODY:
            chunk = await response.read()
            if not chunk:
                break
            body += chunk
        if response.content_type == "text/html":
            detail = "an HTML error page"
        else:
            try:
                detail = self._scrub(_ErrorEnvelope.model_validate_json(body).text())
            except ValidationError:
                detail = "an error body that is not JSON"
        retry_after = errors.parse_retry_after(response.headers.get("retry-after"))
        logger.info("provider %s: upstream returned HTTP %d", self._name, response.status)
        return errors.error_for_status(response.status, detail, retry_after=retry_after)

    def _inband_error(self, error: _ErrorFields | str) -> errors.ProviderError:
        fields: _ErrorFields = {"message": error} if isinstance(error, str) else error
        detail = self._scrub(fields.get("message") or "")
        status: int | str | None = fields.get("status")
        if status is None:
            status = fields.get("code")
        if isinstance(status, int) and 400 <= status < 600:
            return errors.error_for_status(status, detail)
        message = "upstream reported an error mid-stream"
        return errors.ProviderBadResponse(f"{message}: {detail}" if detail else message)

    def _scrub(self, text: str) -> str:
        """Make an upstream message safe to show: no key (even a masked one), one line, short."""
        if self._api_key:
            text = text.replace(self._api_key, "[redacted]")
        text = " ".join(_KEY_LIKE.sub("[redacted]", text).split())
        return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 1] + "…"
