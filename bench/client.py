"""A minimal HTTP/1.1 client for load generation: keep-alive connections on asyncio (uvloop in
the load generator), with httptools, the C parser uvicorn uses, parsing the responses.

It costs a fraction of aiohttp's client per request, so the load generator stays well under
its 80%-of-a-core budget while it measures the server. It does only what the bench needs:
one request at a time per connection, Content-Length or chunked bodies, an optional sink
that sees body bytes as they arrive (SSE streams), and loopback addresses only.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import deque
from typing import Any, Protocol, cast

import httptools

LOOPBACK = "127.0.0.1"


class BodySink(Protocol):
    def feed(self, data: bytes, now: float) -> None: ...


class Response:
    __slots__ = ("body", "status")

    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def build_request(
    method: str,
    host: str,
    port: int,
    path: str,
    body: bytes | None = None,
    *,
    bearer: str | None = None,
    accept: str | None = None,
    idempotency_key: str | None = None,
) -> bytes:
    """The bytes of one request. Every request may carry a bearer key (API-key auth) and an
    `Idempotency-Key`."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    if bearer:
        lines.append(f"Authorization: Bearer {bearer}")
    if idempotency_key:
        lines.append(f"Idempotency-Key: {idempotency_key}")
    if accept:
        lines.append(f"Accept: {accept}")
    if body is not None:
        lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    return head + body if body is not None else head


class Connection(asyncio.Protocol):
    """One keep-alive connection. `send()` one request, await its response, repeat."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._future: asyncio.Future[Response] | None = None
        self._sink: BodySink | None = None
        self._body: list[bytes] = []
        self._status = 0
        self._keep_alive = True
        self.closed = False

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        if host != LOOPBACK:
            raise ValueError("the bench only sends traffic to 127.0.0.1")
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: cls(loop), host, port)
        return conn

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionError("connection closed by the server"))

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"bad HTTP response: {exc}"))
            self.close()

    # httptools callbacks

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self._keep_alive = self._parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if self._sink is not None:
            self._sink.feed(body, time.monotonic())
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        future, self._future = self._future, None
        body = b"".join(self._body)
        self._body = []
        if not self._keep_alive:
            self.close()
        if future is not None and not future.done():
            future.set_result(Response(self._status, body))

    # API

    def send(self, data: bytes, sink: BodySink | None = None) -> asyncio.Future[Response]:
        if self.closed or self._transport is None:
            raise ConnectionError("connection is closed")
        if self._future is not None:
            raise RuntimeError("one request at a time per connection")
        future: asyncio.Future[Response] = self._loop.create_future()
        self._future = future
        self._sink = sink
        self._body = []
        self._transport.write(data)
        return future

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def _fail(self, exc: Exception) -> None:
        future, self._future = self._future, None
        if future is not None and not future.done():
            future.set_exception(exc)


class Pool:
    """Keep-alive connections for an open-loop run: idle ones are reused, new ones are opened
    up to `limit`, and beyond that a request waits (its latency keeps counting)."""

    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host = host
        self.port = port
        self.limit = limit
        self.opened = 0
        self._idle: deque[Connection] = deque()
        self._waiters: deque[asyncio.Future[Connection]] = deque()
        self._count = 0

    async def prefill(self, n: int) -> None:
        n = min(n, self.limit)
        conns = await asyncio.gather(*(self._open() for _ in range(n)))
        self._idle.extend(conns)

    async def _open(self) -> Connection:
        self._count += 1
        self.opened += 1
        try:
            return await Connection.open(self.host, self.port)
        except BaseException:
            self._count -= 1
            raise

    async def acquire(self) -> Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
            self._count -= 1
        if self._count < self.limit:
            return await self._open()
        waiter: asyncio.Future[Connection] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return await waiter

    def release(self, conn: Connection) -> None:
        if conn.closed:
            self._count -= 1
            if self._waiters and self._count < self.limit:
                waiter = self._waiters.popleft()
                task = asyncio.ensure_future(self._open())
                task.add_done_callback(lambda t: _settle(waiter, t))
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


def _settle(waiter: asyncio.Future[Connection], task: asyncio.Task[Connection]) -> None:
    if waiter.done():
        if not task.cancelled() and task.exception() is None:
            task.result().close()
        return
    if task.cancelled():
        waiter.cancel()
    elif (exc := task.exception()) is not None:
        waiter.set_exception(exc)
    else:
        waiter.set_result(task.result())


async def fetch(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    *,
    bearer: str | None = None,
    within: float = 30.0,
) -> Response:
    """One request on a fresh connection (set-up and checks, not load)."""
    data = None if body is None else json.dumps(body).encode()
    conn = await Connection.open(LOOPBACK, port)
    try:
        async with asyncio.timeout(within):
            return await conn.send(build_request(method, LOOPBACK, port, path, data, bearer=bearer))
    finally:
        conn.close()
