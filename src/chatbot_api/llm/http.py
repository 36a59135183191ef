"""A small HTTP/1.1 client for one origin, on asyncio's transports (TLS from `ssl`) and
httptools (llhttp, the parser uvicorn serves with).

It does what the OpenAI-compatible provider needs and no more: a request with a body, a
response whose body is read as it arrives, and keep-alive connections kept for the next
request. There are no redirects, proxies, cookies or compression (requests ask for
`Accept-Encoding: identity`).

It replaces aiohttp, which the provider used before. Importing aiohttp and its dependencies
added 8.5 MB to every worker's RSS. It also put a stream reader and a task's wake-up between
each chunk of the upstream body and its parser.

    ClientError (OSError)
    ├── ConnectError          no connection: DNS, refused, unreachable, TLS handshake
    ├── ConnectionBroken      the connection ended before the response did
    └── BadResponse           what came back is not an HTTP/1.x response within limits

A timeout is `TimeoutError`: connecting past `connect_timeout`, or a deadline the caller set
on a response's reads (`Response.set_exception`).

A connection goes back to the pool only once its response has ended, the server kept it
alive, and nothing went wrong. A caller that stops reading before the end either closes the
response (the server sees the disconnect) or hands it back with `Response.release()`. In
that case the rest of the body is read and dropped, within a limit of size and time, and the
connection then goes back to the pool. Idle connections are closed after `keepalive`
seconds, and a connection the server closed is never handed out.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections import deque
from typing import cast
from urllib.parse import urlsplit

import httptools

MAX_HEAD_BYTES = 64 * 1024
# A body buffered past this stops the socket being read until the reader catches up.
HIGH_WATER = 256 * 1024
KEEPALIVE = 15.0
# Where to connect: the family, the host's address, the port.
Address = tuple[socket.AddressFamily, str, int]
# How long a host name's addresses are reused for new connections, as aiohttp's cache did.
DNS_TTL = 10.0
USER_AGENT = "chatbot-api"


class ClientError(OSError):
    pass


class ConnectError(ClientError):
    pass


class ConnectionBroken(ClientError):
    pass


class BadResponse(ClientError):
    pass


class _Connection(asyncio.Protocol):
    """One connection and the response it is reading. The parser's callbacks fill it."""

    __slots__ = (
        "_buffer",
        "_buffered",
        "_drop_left",
        "_drop_timer",
        "_dropping",
        "_error",
        "_forced",
        "_head_bytes",
        "_informational",
        "_length_known",
        "_loop",
        "_parser",
        "_paused",
        "_pool",
        "_waiter",
        "closed",
        "complete",
        "head",
        "headers",
        "idle_since",
        "keep_alive",
        "status",
        "transport",
    )

    def __init__(self, pool: Client) -> None:
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._head_bytes = 0
        self.status = 0
        self.headers: dict[str, str] = {}
        self.keep_alive = False
        self._informational = False
        self._length_known = False
        self.head: asyncio.Future[None] | None = None
        self.complete = False
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        # What failed the connection: raised once what arrived before it has been read.
        self._error: BaseException | None = None
        # What the caller set (a deadline): raised at once, whatever is buffered.
        self._forced: BaseException | None = None
        # Set once the reader has let go before the end: the rest is dropped (`Response.release`).
        self._dropping = False
        self._drop_left = 0
        self._drop_timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio's classes (not even registered), so no isinstance.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.head is None or self.complete:
            # Bytes after the response ended, or on an idle connection: nobody asked for them,
            # and the connection cannot be reused.
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # A callback's own error (a head over the limit) comes wrapped in the parser's.
            cause = exc.__context__
            self._fail(cause if isinstance(cause, ClientError) else BadResponse(str(exc)))
            self.close()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.head is not None and not self.complete:
            if self.head.done() and not self._length_known and exc is None:
                # Neither Content-Length nor chunked: the body ends with the connection.
                self.on_message_complete()
            else:
                self._fail(ConnectionBroken("the connection closed before the response ended"))
        self._pool._forget(self)

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise BadResponse("the response's head is too large")
        # httptools joins a header split across reads before calling; a repeated one: the last.
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._informational = True  # 100 Continue and friends: the real head follows
            self.headers = {}
            return
        self.status = status
        self.keep_alive = self._parser.should_keep_alive()
        self._length_known = (
            "content-length" in self.headers
            or "chunked" in self.headers.get("transfer-encoding", "").lower()
            or status in (204, 304)
        )
        if self.head is not None and not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._dropping:
            self._drop_left -= len(body)
            if self._drop_left < 0:
                self.close()
            return
        self._buffer.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self.complete = True
        self._wake()
        if self._dropping:
            self._dropping = False
            self.recycle()

    # for Response

    async def read(self) -> bytes:
        if self._forced is not None:
            raise self._forced
        while not self._buffer:
            if self._error is not None:
                raise self._error
            if self.complete:
                return b""
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
            if self._forced is not None:
                raise self._forced
        data = self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer)
        self._buffer.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def set_exception(self, exc: BaseException) -> None:
        self._forced = exc
        self._wake()

    def drop_rest(self, limit: int, timeout: float) -> None:
        """Read the rest of the body into nothing, then go back to the pool; close instead if
        more than `limit` bytes or `timeout` seconds pass first."""
        self._drop_left = limit - self._buffered
        self._buffer.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        if self._drop_left < 0:
            self.close()
            return
        self._dropping = True
        self._drop_timer = self._loop.call_later(timeout, self.close)

    def recycle(self) -> None:
        """The reader is done with a response that ended: reuse the connection or close it."""
        if self._drop_timer is not None:
            self._drop_timer.cancel()
            self._drop_timer = None
        if self.closed or not self.keep_alive or self._error or self._forced:
            self.close()
            return
        self._reset()
        self._pool._put_back(self)

    def close(self) -> None:
        if self._drop_timer is not None:
            self._drop_timer.cancel()
            self._drop_timer = None
        self._dropping = False
        if self.transport is not None:
            self.transport.close()
        if not self.closed:
            self.closed = True
            self._fail(ConnectionBroken("the connection was closed"))
            self._pool._forget(self)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.head = self._loop.create_future()
        self.transport.write(data)

    def _reset(self) -> None:
        # What the last reader left unread (the end of a body it let go of) is not the next's.
        self._buffer.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        self._parser = httptools.HttpResponseParser(self)
        self._head_bytes = 0
        self.status = 0
        self.headers = {}
        self.head = None
        self.complete = False

    def _fail(self, exc: BaseException) -> None:
        if self._error is None and not self.complete:
            self._error = exc
        if self.head is not None and not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()  # retrieved: nobody may be waiting for it any more
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Response:
    """A response whose head has arrived: its `status` and `headers` (names in lower case; of
    a repeated header, the last). Read its body with `read()`, then `release()` it (or
    `close()` it to drop the connection)."""

    __slots__ = ("_conn", "_done", "headers", "status")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._done = False
        self.status = conn.status
        self.headers = conn.headers

    @property
    def content_type(self) -> str:
        value = self.headers.get("content-type", "application/octet-stream")
        return value.split(";", 1)[0].strip().lower()

    async def read(self) -> bytes:
        """What has arrived of the body since the last read (waiting for some if nothing
        has); b"" once the body has ended."""
        if self._done:
            raise ConnectionBroken("the response was already released or closed")
        return await self._conn.read()

    def is_eof(self) -> bool:
        return self._conn.complete and not self._conn._buffer

    def set_exception(self, exc: BaseException) -> None:
        """Fail the pending read, and every later one, with `exc` (a deadline)."""
        self._conn.set_exception(exc)

    def release(self, *, drop_limit: int = 0, drop_timeout: float = 0.0) -> None:
        """Hand the connection back. If the body has not ended yet, up to `drop_limit` more
        bytes are read into nothing for up to `drop_timeout` seconds first."""
        if self._done:
            return
        self._done = True
        if self._conn.complete:
            self._conn.recycle()
        else:
            self._conn.drop_rest(drop_limit, drop_timeout)

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._conn.close()


class Client:
    """Connections to one origin (`scheme://host:port`), kept alive between requests."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: dict[str, str],
        connect_timeout: float,
        max_connections: int = 0,
        keepalive: float = KEEPALIVE,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._tls = url.scheme == "https"
        host = f"[{self._host}]" if ":" in self._host else self._host
        default_port = self._port == (443 if self._tls else 80)
        authority = host if default_port else f"{host}:{self._port}"
        fixed = {
            "Host": authority,
            "User-Agent": USER_AGENT,
            "Accept-Encoding": "identity",
            **headers,
        }
        _check_headers(fixed)
        self._head_lines = "".join(f"{n}: {v}\r\n" for n, v in fixed.items())
        self._connect_timeout = connect_timeout
        self._max = max_connections
        self._keepalive = keepalive
        self._ssl: ssl.SSLContext | None = None
        self._idle: deque[_Connection] = deque()
        self._all: set[_Connection] = set()
        self._busy = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._addresses: list[Address] = []
        self._addresses_until = 0.0
        self._resolving: asyncio.Future[list[Address]] | None = None
        self.closed = False

    def same_origin(self, url: str) -> bool:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return (parts.scheme == "https") == self._tls and (parts.hostname, port) == (
            self._host,
            self._port,
        )

    @property
    def connections(self) -> int:
        """Connections open now, busy or idle."""
        return len(self._all)

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Response:
        """Send `POST url` with `body`; return once the response's head has arrived."""
        if self.closed:
            raise ConnectError("the client is closed")
        if not self.same_origin(url):
            raise ValueError(f"{url!r} is not this client's origin")
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        _check_headers(headers)
        extra = "".join(f"{n}: {v}\r\n" for n, v in headers.items())
        head = f"POST {target} HTTP/1.1\r\n{self._head_lines}{extra}Content-Length: {len(body)}"
        conn = await self._acquire()
        try:
            conn.send(head.encode("latin-1") + b"\r\n\r\n" + body)
            assert conn.head is not None
            await conn.head
        except BaseException:
            conn.close()  # frees its place in the pool
            raise
        return Response(conn)

    async def aclose(self) -> None:
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._all):
            conn.close()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ConnectError("the client is closed"))
        self._waiters.clear()

    async def _acquire(self) -> _Connection:
        loop = asyncio.get_running_loop()
        while self._idle:
            conn = self._idle.pop()  # the most recently used: the likeliest to be alive
            self._busy += 1
            if not conn.closed and loop.time() - conn.idle_since < self._keepalive:
                return conn
            conn.close()  # frees the place just taken
        while self._max and self._busy >= self._max:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._wake_one()  # pass the turn this waiter got on
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            if self._idle:
                return await self._acquire()
        self._busy += 1
        try:
            return await self._connect()
        except BaseException:
            self._busy -= 1
            self._wake_one()
            raise

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        if self._tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        failure: OSError | None = None
        protocol: asyncio.BaseProtocol | None = None
        async with asyncio.timeout(self._connect_timeout):
            try:
                addresses = await self._resolve()
            except OSError as exc:  # socket.gaierror: the name does not resolve
                raise ConnectError(f"cannot resolve {self._host}: {exc}") from exc
            for family, host, port in addresses:  # in the resolver's order, the first that works
                try:
                    _, protocol = await loop.create_connection(
                        lambda: _Connection(self),
                        host,
                        port,
                        family=family,
                        ssl=self._ssl if self._tls else None,
                        server_hostname=self._host if self._tls else None,
                    )
                    break
                except OSError as exc:  # ssl.SSLError too
                    failure = exc
        if protocol is None:
            raise ConnectError(f"cannot connect to {self._host}:{self._port}: {failure}")
        assert isinstance(protocol, _Connection)
        if self.closed:
            protocol.close()
            raise ConnectError("the client is closed")
        self._all.add(protocol)
        return protocol

    async def _resolve(self) -> list[Address]:
        """The host's addresses, looked up at most once per `DNS_TTL` however many connections
        open at once (a burst of streams would otherwise send the resolver a query each)."""
        loop = asyncio.get_running_loop()
        if self._addresses and loop.time() < self._addresses_until:
            return self._addresses
        try:
            ip = ipaddress.ip_address(self._host)
        except ValueError:
            pass
        else:
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            return [(family, self._host, self._port)]
        if self._resolving is None:
            self._resolving = asyncio.ensure_future(self._lookup())
            self._resolving.add_done_callback(self._resolved)
        # Shielded: one caller giving up (its deadline) does not cancel the others' lookup.
        return await asyncio.shield(self._resolving)

    async def _lookup(self) -> list[Address]:
        infos = await asyncio.get_running_loop().getaddrinfo(
            self._host, self._port, type=socket.SOCK_STREAM
        )
        return [(family, str(address[0]), int(address[1])) for family, *_, address in infos]

    def _resolved(self, lookup: asyncio.Future[list[Address]]) -> None:
        self._resolving = None
        if not lookup.cancelled() and lookup.exception() is None and lookup.result():
            self._addresses = lookup.result()
            self._addresses_until = asyncio.get_running_loop().time() + DNS_TTL

    def _put_back(self, conn: _Connection) -> None:
        self._busy -= 1
        if self.closed:
            conn.close()
            return
        conn.idle_since = asyncio.get_running_loop().time()
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self._keepalive, self._sweep)
        self._wake_one()

    def _forget(self, conn: _Connection) -> None:
        """A connection closed: drop it, and if it was busy, free its place."""
        if conn in self._all:
            self._all.discard(conn)
            if conn in self._idle:
                self._idle.remove(conn)
            else:
                self._busy -= 1
                self._wake_one()

    def _sweep(self) -> None:
        """Close the connections idle for `keepalive` seconds; come back while any are left."""
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        for conn in [c for c in self._idle if now - c.idle_since >= self._keepalive]:
            conn.close()
        if self._idle:
            oldest = min(c.idle_since for c in self._idle)
            delay = max(0.0, oldest + self._keepalive - now)
            self._sweeper = asyncio.get_running_loop().call_later(delay, self._sweep)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def _check_headers(headers: dict[str, str]) -> None:
    for name, value in headers.items():
        if not name or ":" in name or any(c in name or c in value for c in "\r\n\0"):
            raise ValueError(f"header {name!r} has a character HTTP does not allow")
