"""A fake OpenAI-compatible Chat Completions server (aiohttp.web) for tests and benchmarks.

In process, on 127.0.0.1 and a free port:

    async with FakeLLM() as fake:                  # FakeLLM(api_key="k") demands "Bearer k"
        fake.enqueue(Script(reply="Hi there"))      # the next request gets this script
        provider = OpenAICompatProvider(base_url=fake.base_url, ...)  # ends in "/v1"
        ...
        fake.requests[0].body["max_tokens"]; fake.messages(0); fake.requests[0].cancelled

As a separate process (prints its base URL on one line, then serves until SIGINT/SIGTERM):

    python -m chatbot_api.testing.fake_llm --port 8001 --ttft 0.05 --tokens 200 --token-delay 0.05

Endpoints: `POST /v1/chat/completions` and `GET /v1/models`. A streamed reply is real SSE in
OpenAI's format: a role chunk, a `chat.completion.chunk` per delta, a chunk with `finish_reason`,
a usage chunk if `stream_options.include_usage`, `data: [DONE]`. Else one `chat.completion`.

Scripting: each request takes the next `Script` from a FIFO queue (`enqueue`), or `fake.default`
when the queue is empty. The defaults give a normal, fast reply. Fields:

    reply / deltas      the text, split into word-sized deltas, or the deltas given explicitly
    ttft, token_delay   delays: headers (and role chunk) to first delta, between two deltas
    nonstream_delay     delay before a non-streamed reply
    finish_reason       "stop" by default; None: never sent, yet the stream still ends in [DONE]
    usage_style         "openai" (a usage chunk), "groq" (`x_groq.usage` on the last chunk), "none"
    prompt_tokens       reported prompt tokens; default: words + 4 per request message
    status, error_body, retry_after
                        a non-2xx status answers with an OpenAI-style JSON error (or error_body,
                        raw: an HTML page is served as text/html) and a Retry-After header.
                        error_body with status 200 serves that body instead of a completion.
    fail_times          how many requests a non-2xx script answers before it is used up, so
                        "503 twice, then success" is enqueue(Script(status=503, fail_times=2),
                        Script())
    after_tokens, then  (streams) after that many deltas: "finish" normally, "eof" (end the body:
                        no finish, no [DONE]), "reset" (TCP RST), "silence" (send nothing),
                        "ping" (`: ping` every 0.1 s, forever), "error_chunk" (an in-band
                        `{"error": ...}` event: `error_chunk`, or a server_error), "malformed"
    headers_then_silence  send the 200 headers, then nothing at all
    end_delay           (streams) wait this long after the last event before ending the body,
                        so its end (the chunked body's last chunk) comes in a segment of its own

Every request is recorded in `fake.requests` (`RecordedRequest`: method, path, headers, parsed
JSON body, the client's port, `cancelled` if the client went away before the response was
complete, and a `finished` event), unless `FakeLLM(record=False)`: the standalone server keeps
none, so its heap stays flat under a benchmark's hundreds of thousands of requests (with every
request kept, its full collections grew to 130 ms, a stall of every stream it served).
`unreachable_url()` gives a base URL where nothing listens.

Built for 1,000+ concurrent streams: delta frames are pre-encoded per script and per-token work
is one bytes concatenation and one write.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import re
import signal
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from chatbot_api.memory import freeze_startup_heap

Then = Literal["finish", "eof", "reset", "silence", "ping", "error_chunk", "malformed"]
UsageStyle = Literal["openai", "groq", "none"]

DEFAULT_REPLY = "Hello! This is a scripted reply from the fake model."
PING_INTERVAL = 0.1
_DONE = b"data: [DONE]\n\n"
_PING = b": ping\n\n"
_ERROR_CHUNK = '{"error": {"message": "The model crashed mid-stream.", "type": "server_error"}}'
_MALFORMED = b'data: {"id": "chatcmpl-broken", "choices": [\n\n'
_ERROR_MESSAGES = {401: "Incorrect API key provided.", 429: "Rate limit reached. Try again later."}


@dataclass(frozen=True, slots=True)
class Script:
    """How the fake answers one request. See the module docstring for each field."""

    reply: str = DEFAULT_REPLY
    deltas: tuple[str, ...] | None = None
    ttft: float = 0.0
    token_delay: float = 0.0
    nonstream_delay: float = 0.0
    finish_reason: str | None = "stop"
    usage_style: UsageStyle = "openai"
    status: int = 200
    error_body: str | None = None
    retry_after: float | None = None
    fail_times: int = 1
    after_tokens: int | None = None
    then: Then = "finish"
    headers_then_silence: bool = False
    prompt_tokens: int | None = None
    error_chunk: str | None = None
    end_delay: float = 0.0

    def pieces(self) -> tuple[str, ...]:
        return self.deltas if self.deltas is not None else split_words(self.reply)


@dataclass(slots=True, eq=False)
class RecordedRequest:
    method: str
    path: str
    headers: CIMultiDictProxy[str]
    body: dict[str, Any]
    client_port: int | None = None
    script: Script | None = None
    cancelled: bool = False
    finished: asyncio.Event = field(default_factory=asyncio.Event)


def split_words(text: str) -> tuple[str, ...]:
    """Word-sized deltas that join back to `text`: each carries the whitespace before it."""
    return tuple(re.findall(r"\s*\S+|\s+", text))


def unreachable_url() -> str:
    """A base URL on a loopback port that was free a moment ago: connections are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@functools.lru_cache(maxsize=256)
def _encode_deltas(pieces: tuple[str, ...]) -> tuple[bytes, ...]:
    return tuple(json.dumps({"content": p}, separators=(",", ":")).encode() for p in pieces)


def _usage(prompt: int, completion: int, style: UsageStyle) -> dict[str, Any]:
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion}
    usage["total_tokens"] = prompt + completion
    if style == "groq":  # Groq adds timings: unknown fields a client must ignore.
        usage |= {"queue_time": 0.01, "prompt_time": 0.002, "completion_time": 0.05}
    return usage


def _error_response(status: int, body: str | None, retry_after: float | None) -> web.Response:
    headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
    if body is None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        message = _ERROR_MESSAGES.get(status, f"Scripted failure: HTTP {status}.")
        envelope = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        return web.json_response(envelope, status=status, headers=headers)
    start = body.lstrip()[:1]
    ctype = "text/html" if start == "<" else "application/json" if start in "{[" else "text/plain"
    return web.Response(status=status, text=body, content_type=ctype, headers=headers)


class FakeLLM:
    """The server. Use `async with FakeLLM() as fake`, or `start()` and `aclose()`."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        model: str | None = None,
        default: Script | None = None,
        record: bool = True,
    ) -> None:
        self.default = default or Script()
        self.requests: list[RecordedRequest] = []
        self._keep_requests = record
        self._host = host
        self._port = port
        self._api_key = api_key
        self._model = model
        self._queue: deque[Script] = deque()
        self._ids = itertools.count(1)
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL, ending in `/v1`."""
        if self._runner is None:
            raise RuntimeError("FakeLLM is not started")
        return f"http://{self._host}:{self._port}/v1"

    @property
    def pending(self) -> int:
        """Requests still scripted by the queue (a failing script counts `fail_times`)."""
        return len(self._queue)

    def enqueue(self, *scripts: Script) -> None:
        for script in scripts:
            failing = not 200 <= script.status < 300
            self._queue.extend([script] * (max(1, script.fail_times) if failing else 1))

    def messages(self, index: int) -> list[dict[str, Any]]:
        """The `messages` list sent in request `index`."""
        return cast(list[dict[str, Any]], self.requests[index].body["messages"])

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        # handler_cancellation: a client that goes away cancels its handler, which is how
        # `cancelled` is noticed even while the script is silent.
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port, backlog=4096, reuse_address=True)
        await site.start()
        self._runner = runner
        self._port = runner.addresses[0][1]

    async def aclose(self) -> None:
        # Release held connections (silence, ping) first, so that shutdown does not wait on them.
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeLLM:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _models(self, request: web.Request) -> web.Response:
        self._record(request, {}).finished.set()
        model = {"id": self._model or "fake-model", "object": "model", "owned_by": "fake"}
        return web.json_response({"object": "list", "data": [model | {"created": 0}]})

    def _record(self, request: web.Request, body: dict[str, Any]) -> RecordedRequest:
        headers = CIMultiDictProxy(CIMultiDict(request.headers))
        peer = request.transport.get_extra_info("peername") if request.transport else None
        port = peer[1] if isinstance(peer, tuple) else None
        record = RecordedRequest(request.method, request.path, headers, body, port)
        if self._keep_requests:
            self.requests.append(record)
        return record

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            body = None
        record = self._record(request, body if isinstance(body, dict) else {})
        try:
            if self._api_key is not None and (
                request.headers.get("Authorization") != f"Bearer {self._api_key}"
            ):
                return _error_response(401, None, None)
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                return _error_response(400, None, None)
            script = record.script = self._queue.popleft() if self._queue else self.default
            if not 200 <= script.status < 300 or script.error_body is not None:
                return _error_response(script.status, script.error_body, script.retry_after)
            if body.get("stream"):
                return await self._stream(request, body, script, record)
            return await self._complete(body, script)
        except asyncio.CancelledError:
            record.cancelled = True
            raise
        finally:
            record.finished.set()

    def _prompt_tokens(self, body: dict[str, Any], script: Script) -> int:
        if script.prompt_tokens is not None:
            return script.prompt_tokens
        return sum(len(str(m.get("content", "")).split()) + 4 for m in body["messages"])

    async def _complete(self, body: dict[str, Any], script: Script) -> web.StreamResponse:
        if script.nonstream_delay:
            await asyncio.sleep(script.nonstream_delay)
        pieces = script.pieces()[: script.after_tokens]
        usage = _usage(self._prompt_tokens(body, script), len(pieces), script.usage_style)
        message = {"role": "assistant", "content": "".join(pieces)}
        choice = {"index": 0, "message": message, "finish_reason": script.finish_reason}
        reply: dict[str, Any] = {
            "id": f"chatcmpl-fake{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self._model or body.get("model") or "fake-model",
            "choices": [choice],
        }
        if script.usage_style != "none":
            reply["usage"] = usage
        if script.usage_style == "groq":
            reply["x_groq"] = {"id": "req_fake"}
        return web.json_response(reply)

    async def _stream(
        self, request: web.Request, body: dict[str, Any], script: Script, record: RecordedRequest
    ) -> web.StreamResponse:
        model = self._model or body.get("model") or "fake-model"
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        head = (
            f'data: {{"id":"chatcmpl-fake{next(self._ids)}","object":"chat.completion.chunk",'
            f'"created":{int(time.time())},"model":{json.dumps(model)},'
            f'"system_fingerprint":"fp_fake","choices":['
        ).encode()
        usage_null = b',"usage":null' if include_usage else b""
        tail = b',"logprobs":null,"finish_reason":null}]' + usage_null + b"}\n\n"
        delta_head = head + b'{"index":0,"delta":'  # per token: delta_head + delta + tail
        parts = _encode_deltas(script.pieces())
        count = len(parts) if script.after_tokens is None else min(script.after_tokens, len(parts))
        then = script.then if script.after_tokens is not None else "finish"

        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        try:
            if script.headers_then_silence:
                await self._stopping.wait()  # hold until the server stops
                return response
            await response.write(delta_head + b'{"role":"assistant","content":""}' + tail)
            if script.ttft:
                await asyncio.sleep(script.ttft)
            for i in range(count):
                if i and script.token_delay:
                    await asyncio.sleep(script.token_delay)
                await response.write(delta_head + parts[i] + tail)
            if then == "finish":
                usage = _usage(self._prompt_tokens(body, script), count, script.usage_style)
                await response.write(self._ending(head, usage_null, script, usage, include_usage))
            elif then == "reset":
                await asyncio.sleep(0.02)  # let the deltas reach the client before the RST
                _reset(request)
                return response
            elif then == "silence":
                await self._stopping.wait()  # hold until the server stops
            elif then == "ping":
                while not self._stopping.is_set():
                    await response.write(_PING)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(PING_INTERVAL):
                            await self._stopping.wait()
            elif then == "error_chunk":
                data = script.error_chunk or _ERROR_CHUNK
                await response.write(b"data: " + data.encode() + b"\n\n")
            elif then == "malformed":
                await response.write(_MALFORMED)
            if script.end_delay:
                with contextlib.suppress(TimeoutError):  # or until the server stops
                    await asyncio.wait_for(self._stopping.wait(), script.end_delay)
            await response.write_eof()
        except ConnectionError:
            record.cancelled = True
        return response

    @staticmethod
    def _ending(
        head: bytes, usage_null: bytes, script: Script, usage: dict[str, Any], include: bool
    ) -> bytes:
        frames: list[bytes] = []
        if script.finish_reason is not None or script.usage_style == "groq":
            extra = usage_null
            if script.usage_style == "groq":
                extra = b',"x_groq":' + json.dumps({"id": "req_fake", "usage": usage}).encode()
            last = b'{"index":0,"delta":{},"logprobs":null,"finish_reason":%s}]%s}\n\n'
            frames.append(head + last % (json.dumps(script.finish_reason).encode(), extra))
        if script.usage_style == "openai" and include:
            frames.append(head + b'],"usage":' + json.dumps(usage).encode() + b"}\n\n")
        frames.append(_DONE)
        return b"".join(frames)


def _reset(request: web.Request) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0), as a crashing upstream would."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A fake OpenAI-compatible LLM server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--reply", default=DEFAULT_REPLY)
    parser.add_argument("--tokens", type=int, default=None, help="reply with N word deltas")
    for delay in ("--ttft", "--token-delay", "--nonstream-delay"):
        parser.add_argument(delay, type=float, default=0.0)
    parser.add_argument("--finish-reason", default="stop")
    parser.add_argument("--usage-style", choices=["openai", "groq", "none"], default="openai")
    return parser.parse_args(argv)


_SCRIPT_OPTIONS = ("reply", "ttft", "token_delay", "nonstream_delay", "usage_style")


def script_from_args(args: argparse.Namespace) -> Script:
    fields = {name: getattr(args, name) for name in _SCRIPT_OPTIONS}
    fields["finish_reason"] = args.finish_reason or None  # --finish-reason "" sends none
    if args.tokens is not None:
        words = DEFAULT_REPLY.split()
        fields["deltas"] = tuple(
            (" " if i else "") + words[i % len(words)] for i in range(args.tokens)
        )
    return Script(**fields)


def _print_url(url: str) -> None:
    sys.stdout.write(url + "\n")
    sys.stdout.flush()


async def serve(
    args: argparse.Namespace,
    stop: asyncio.Event,
    announce: Callable[[str], None] = _print_url,
) -> None:
    """Run a FakeLLM, which keeps no record of its requests, until `stop` is set; announce
    (print) its base URL once it listens."""
    server = FakeLLM(
        host=args.host, port=args.port, api_key=args.api_key, model=args.model, record=False
    )
    server.default = script_from_args(args)
    async with server:
        announce(server.base_url)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        # Its own process: what the imports left is never walked by the collector again.
        freeze_startup_heap()
        await serve(args, stop)

    try:
        import uvloop  # Optional: faster under benchmark load.
    except ImportError:  # pragma: no cover
        asyncio.run(run())
    else:
        uvloop.run(run())


if __name__ == "__main__":
    main()
