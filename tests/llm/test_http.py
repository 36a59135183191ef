"""The HTTP/1.1 client against scripted servers on loopback: each test's server reads a
request and answers with the exact bytes the test gives it."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvloop

from chatbot_api.llm import errors, http

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


@dataclass
class Server:
    """A loopback server; `handler(reader, writer, n)` answers the n-th request (from 0)."""

    handler: Handler
    port: int = 0
    requests: list[bytes] = field(default_factory=list)
    peers: list[int] = field(default_factory=list)  # the client port of each request
    connections: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                self.peers.append(writer.get_extra_info("peername")[1])
                await self.handler(reader, writer, len(self.requests) - 1)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


Serve = Callable[[Handler], Awaitable[Server]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[asyncio.Server] = []
    scripted: list[Server] = []

    async def start(handler: Handler) -> Server:
        server = Server(handler)
        listening = await asyncio.start_server(server.serve, "127.0.0.1", 0)
        server.port = listening.sockets[0].getsockname()[1]
        servers.append(listening)
        scripted.append(server)
        return server

    yield start
    for s in scripted:
        for writer in s.writers:
            writer.close()
    for listening in servers:
        listening.close()
        await listening.wait_closed()


def answer(*parts: bytes, close: bool = False) -> Handler:
    """A handler that writes `parts` in turn (letting the loop run between them)."""

    async def handler(_r: asyncio.StreamReader, writer: asyncio.StreamWriter, _n: int) -> None:
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.01)
        if close:
            writer.close()

    return handler


def client(
    server: Server, *, keepalive: float = http.KEEPALIVE, max_connections: int = 0
) -> http.Client:
    return http.Client(
        server.url,
        headers={"Accept": "x/y"},
        connect_timeout=2.0,
        keepalive=keepalive,
        max_connections=max_connections,
    )


async def body_of(response: http.Response) -> bytes:
    out = b""
    while chunk := await response.read():
        out += chunk
    return out


OK_LENGTH = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


class TestResponses:
    async def test_a_body_with_a_length(self, serve: Serve) -> None:
        server = await serve(answer(OK_LENGTH))
        c = client(server)
        response = await c.post(server.url, b"{}", {"Content-Type": "application/json"})
        assert (response.status, response.content_type) == (200, "text/plain")
        assert await body_of(response) == b"hello"
        assert response.is_eof()
        await c.aclose()

    async def test_a_chunked_body_arrives_as_it_is_sent(self, serve: Serve) -> None:
        gate = asyncio.Event()

        async def handler(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _n: int) -> None:
            w.write(CHUNKED_HEAD + b"5\r\nfirst\r\n")
            await gate.wait()
            w.write(b"6\r\nsecond\r\n0\r\n\r\n")

        server = await serve(handler)
        c = client(server)
        response = await c.post(server.url, b"", {})
        assert await response.read() == b"first"  # before the rest is even written
        gate.set()
        assert await body_of(response) == b"second"
        await c.aclose()

    async def test_a_body_that_ends_with_the_connection(self, serve: Serve) -> None:
        server = await serve(answer(b"HTTP/1.1 200 OK\r\n\r\nall of it", close=True))
        c = client(server)
        response = await c.post(server.url, b"", {})
        assert await body_of(response) == b"all of it"
        response.release()
        assert c.connections == 0  # such a connection is never reused
        await c.aclose()

    async def test_the_request_carries_its_head_and_body(self, serve: Serve) -> None:
        server = await serve(answer(OK_LENGTH))
        c = http.Client(
            f"http://127.0.0.1:{server.port}/base",
            headers={"Authorization": "Bearer k"},
            connect_timeout=2.0,
        )
        await body_of(await c.post(f"http://127.0.0.1:{server.port}/base/x?y=1", b"abc", {}))
        head, body = server.requests[0].split(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"POST /base/x?y=1 HTTP/1.1"
        assert f"Host: 127.0.0.1:{server.port}".encode() in lines
        assert b"Authorization: Bearer k" in lines
        assert b"Accept-Encoding: identity" in lines
        assert b"Content-Length: 3" in lines
        assert body == b"abc"
        await c.aclose()

    async def test_informational_responses_are_skipped(self, serve: Serve) -> None:
        server = await serve(answer(b"HTTP/1.1 100 Continue\r\n\r\n" + OK_LENGTH))
        c = client(server)
        response = await c.post(server.url, b"", {})
        assert (response.status, await body_of(response)) == (200, b"hello")
        await c.aclose()

    async def test_header_names_are_lower_case_and_the_last_repeat_wins(self, serve: Serve) -> None:
        raw = b"HTTP/1.1 429 Slow\r\nRetry-After: 1\r\nRETRY-AFTER: 2\r\nContent-Length: 0\r\n\r\n"
        server = await serve(answer(raw))
        c = client(server)
        response = await c.post(server.url, b"", {})
        assert (response.status, response.headers["retry-after"]) == (429, "2")
        assert response.content_type == "application/octet-stream"
        await c.aclose()


class TestReuse:
    async def test_a_finished_connection_is_reused(self, serve: Serve) -> None:
        server = await serve(answer(OK_LENGTH))
        c = client(server)
        for _ in range(3):
            response = await c.post(server.url, b"", {})
            await body_of(response)
            response.release()
        assert (server.connections, len(set(server.peers))) == (1, 1)
        await c.aclose()

    async def test_connection_close_is_honoured(self, serve: Serve) -> None:
        raw = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
        server = await serve(answer(raw))
        c = client(server)
        for _ in range(2):
            response = await c.post(server.url, b"", {})
            await body_of(response)
            response.release()
        assert server.connections == 2
        await c.aclose()

    async def test_a_connection_the_server_closed_while_idle_is_not_handed_out(
        self, serve: Serve
    ) -> None:
        server = await serve(answer(OK_LENGTH, close=True))
        c = client(server)
        response = await c.post(server.url, b"", {})
        await body_of(response)
        response.release()  # kept: the server said nothing of closing
        await asyncio.sleep(0.1)  # ... and then it closes
        response = await c.post(server.url, b"", {})
        assert await body_of(response) == b"hello"
        assert server.connections == 2
        await c.aclose()

    async def test_bytes_on_an_idle_connection_close_it(self, serve: Serve) -> None:
        server = await serve(answer(OK_LENGTH, b"HTTP/1.1 200 OK\r\n"))  # one head too many
        c = client(server)
        response = await c.post(server.url, b"", {})
        await body_of(response)
        response.release()
        await asyncio.sleep(0.1)
        assert c.connections == 0
        response = await c.post(server.url, b"", {})
        assert await body_of(response) == b"hello"
        assert server.connections == 2
        await c.aclose()

    async def test_what_a_reader_left_unread_does_not_reach_the_next(self, serve: Serve) -> None:
        server = await serve(answer(OK_LENGTH))
        c = client(server)
        response = await c.post(server.url, b"", {})
        await asyncio.sleep(0.05)  # "hello" is in, unread
        response.release()
        with pytest.raises(http.ConnectionBroken, match="released"):
            await response.read()
        response = await c.post(server.url, b"", {})
        assert await body_of(response) == b"hello"
        assert server.connections == 1
        await c.aclose()

    async def test_idle_connections_are_closed_after_the_keepalive(self, serve: Serve) -> None:
        server = await serve(answer(OK_LENGTH))
        c = client(server, keepalive=0.1)
        response = await c.post(server.url, b"", {})
        await body_of(response)
        response.release()
        assert c.connections == 1
        await asyncio.sleep(0.3)
        assert c.connections == 0
        await c.aclose()

    async def test_a_body_released_early_is_read_to_its_end_then_reused(self, serve: Serve) -> None:
        server = await serve(answer(CHUNKED_HEAD + b"4\r\ndone\r\n", b"3\r\nend\r\n0\r\n\r\n"))
        c = client(server)
        response = await c.post(server.url, b"", {})
        assert await response.read() == b"done"
        response.release(drop_limit=1024, drop_timeout=2.0)
        await asyncio.sleep(0.1)
        response = await c.post(server.url, b"", {})
        await body_of(response)
        assert server.connections == 1
        await c.aclose()

    @pytest.mark.parametrize(("limit", "within"), [(2, 2.0), (1024, 0.001)])
    async def test_a_body_that_goes_on_too_long_or_too_far_costs_its_connection(
        self, serve: Serve, limit: int, within: float
    ) -> None:
        server = await serve(answer(CHUNKED_HEAD + b"4\r\ndone\r\n", b"3\r\nend\r\n0\r\n\r\n"))
        c = client(server)
        response = await c.post(server.url, b"", {})
        await response.read()
        response.release(drop_limit=limit, drop_timeout=within)
        await asyncio.sleep(0.1)
        assert c.connections == 0
        await c.aclose()

    async def test_closing_a_response_drops_its_connection(self, serve: Serve) -> None:
        server = await serve(answer(CHUNKED_HEAD + b"4\r\ndone\r\n"))
        c = client(server)
        response = await c.post(server.url, b"", {})
        await response.read()
        response.close()
        assert c.connections == 0
        await asyncio.sleep(0.05)
        assert server.writers[0].is_closing()  # the server saw the connection end
        await c.aclose()


class TestLimits:
    async def test_requests_wait_for_a_place_under_max_connections(self, serve: Serve) -> None:
        server = await serve(answer(OK_LENGTH))
        c = client(server, max_connections=1)
        first = await c.post(server.url, b"", {})
        second = asyncio.ensure_future(c.post(server.url, b"", {}))
        await asyncio.sleep(0.1)
        assert not second.done()  # the only place is taken
        await body_of(first)
        first.release()
        response = await asyncio.wait_for(second, 1.0)
        assert await body_of(response) == b"hello"
        assert server.connections == 1
        await c.aclose()

    async def test_a_waiter_that_gives_up_leaves_the_place_to_the_next(self, serve: Serve) -> None:
        server = await serve(answer(OK_LENGTH))
        c = client(server, max_connections=1)
        first = await c.post(server.url, b"", {})
        gives_up = asyncio.ensure_future(c.post(server.url, b"", {}))
        waits = asyncio.ensure_future(c.post(server.url, b"", {}))
        await asyncio.sleep(0.05)
        gives_up.cancel()
        first.close()
        response = await asyncio.wait_for(waits, 1.0)
        assert await body_of(response) == b"hello"
        await c.aclose()

    async def test_a_head_over_the_limit_is_a_bad_response(self, serve: Serve) -> None:
        big = b"X-Big: " + b"a" * (http.MAX_HEAD_BYTES + 1) + b"\r\n"
        server = await serve(answer(b"HTTP/1.1 200 OK\r\n" + big + b"\r\n"))
        c = client(server)
        with pytest.raises(http.BadResponse, match="too large"):
            await c.post(server.url, b"", {})
        assert c.connections == 0
        await c.aclose()

    @pytest.mark.parametrize("name", ["X-A\r\nX-B", "X:Y", ""])
    def test_a_header_that_could_split_the_request_is_refused(self, name: str) -> None:
        with pytest.raises(ValueError, match="does not allow"):
            http.Client("http://127.0.0.1:9/", headers={name: "v"}, connect_timeout=1.0)
        with pytest.raises(ValueError, match="does not allow"):
            http.Client("http://127.0.0.1:9/", headers={"X": "a\r\nb"}, connect_timeout=1.0)

    def test_only_http_urls(self) -> None:
        with pytest.raises(ValueError, match="not an http"):
            http.Client("ftp://example.com/", headers={}, connect_timeout=1.0)


class TestResolver:
    async def test_a_burst_of_connections_looks_the_name_up_once(
        self, serve: Serve, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        server = await serve(answer(OK_LENGTH))
        loop = asyncio.get_running_loop()
        real = loop.getaddrinfo
        lookups: list[str] = []

        async def counting(host: str, *args: object, **kwargs: object) -> object:
            lookups.append(host)
            await asyncio.sleep(0.02)  # a resolver takes a while: the burst arrives meanwhile
            return await real(host, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(loop, "getaddrinfo", counting)
        url = f"http://localhost:{server.port}/v1"
        c = http.Client(url, headers={}, connect_timeout=2.0)
        responses = await asyncio.gather(*(c.post(url, b"", {}) for _ in range(10)))
        assert [await body_of(r) for r in responses] == [b"hello"] * 10
        assert (lookups, server.connections) == (["localhost"], 10)
        for response in responses:
            response.close()
        await body_of(await c.post(url, b"", {}))  # a new connection, the addresses cached
        assert lookups == ["localhost"]
        await c.aclose()

    async def test_the_cache_expires(self, serve: Serve, monkeypatch: pytest.MonkeyPatch) -> None:
        server = await serve(answer(OK_LENGTH, close=True))
        monkeypatch.setattr(http, "DNS_TTL", 0.0)
        loop = asyncio.get_running_loop()
        real = loop.getaddrinfo
        lookups: list[str] = []

        async def counting(host: str, *args: object, **kwargs: object) -> object:
            lookups.append(host)
            return await real(host, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(loop, "getaddrinfo", counting)
        url = f"http://localhost:{server.port}/v1"
        c = http.Client(url, headers={}, connect_timeout=2.0)
        for _ in range(2):
            await body_of(await c.post(url, b"", {}))
        assert lookups == ["localhost", "localhost"]
        await c.aclose()

    async def test_a_name_that_does_not_resolve_is_a_connect_error(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        async def unknown(*_args: object, **_kwargs: object) -> object:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

        monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", unknown)
        url = "http://name-that-does-not-resolve.invalid/v1"
        c = http.Client(url, headers={}, connect_timeout=5.0)
        with pytest.raises(http.ConnectError, match="cannot resolve"):
            await c.post(url, b"", {})
        await c.aclose()


class TestFailures:
    async def test_refused_is_a_connect_error(self) -> None:
        listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        listener.close()
        await listener.wait_closed()
        c = http.Client(f"http://127.0.0.1:{port}/", headers={}, connect_timeout=2.0)
        with pytest.raises(http.ConnectError):
            await c.post(f"http://127.0.0.1:{port}/", b"", {})
        assert c.connections == 0
        await c.aclose()

    async def test_not_http_is_a_bad_response(self, serve: Serve) -> None:
        server = await serve(answer(b"SSH-2.0-OpenSSH\r\n\r\n"))
        c = client(server)
        with pytest.raises(http.BadResponse):
            await c.post(server.url, b"", {})
        await c.aclose()

    async def test_a_cut_body_raises_after_what_arrived(self, serve: Serve) -> None:
        server = await serve(answer(CHUNKED_HEAD + b"4\r\npart\r\n", close=True))
        c = client(server)
        response = await c.post(server.url, b"", {})
        assert await response.read() == b"part"
        with pytest.raises(http.ConnectionBroken):
            await response.read()
        await c.aclose()

    async def test_a_connection_closed_before_the_head_is_broken(self, serve: Serve) -> None:
        server = await serve(answer(close=True))
        c = client(server)
        with pytest.raises(http.ConnectionBroken):
            await c.post(server.url, b"", {})
        await c.aclose()

    async def test_set_exception_fails_the_next_read_even_with_data_buffered(
        self, serve: Serve
    ) -> None:
        server = await serve(answer(OK_LENGTH))
        c = client(server)
        response = await c.post(server.url, b"", {})
        await asyncio.sleep(0.05)  # the body is in
        response.set_exception(TimeoutError("deadline"))
        with pytest.raises(TimeoutError, match="deadline"):
            await response.read()
        response.release()
        assert c.connections == 0  # not reused after a forced failure
        await c.aclose()

    async def test_set_exception_wakes_a_pending_read(self, serve: Serve) -> None:
        server = await serve(answer(CHUNKED_HEAD))
        c = client(server)
        response = await c.post(server.url, b"", {})
        reading = asyncio.ensure_future(response.read())
        await asyncio.sleep(0.05)
        response.set_exception(TimeoutError("deadline"))
        with pytest.raises(TimeoutError):
            await reading
        await c.aclose()

    async def test_aclose_closes_everything_and_refuses_more(self, serve: Serve) -> None:
        server = await serve(answer(CHUNKED_HEAD + b"4\r\npart\r\n"))  # a body still open
        c = client(server, max_connections=1)
        busy = await c.post(server.url, b"", {})
        waiting = asyncio.ensure_future(c.post(server.url, b"", {}))
        await asyncio.sleep(0.05)
        await c.aclose()
        assert c.connections == 0
        with pytest.raises(http.ConnectError):
            await waiting
        with pytest.raises(http.ConnectionBroken):
            await body_of(busy)
        with pytest.raises(http.ConnectError, match="closed"):
            await c.post(server.url, b"", {})


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made by the openssl command."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


class TestTLS:
    async def test_https_with_a_trusted_certificate(
        self, certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        cert, key = certificate
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(cert, key)
        server = Server(answer(OK_LENGTH))
        listening = await asyncio.start_server(server.serve, "127.0.0.1", 0, ssl=server_ctx)
        port = listening.sockets[0].getsockname()[1]
        url = f"https://127.0.0.1:{port}/v1"
        trusting = ssl.create_default_context(cafile=str(cert))
        monkeypatch.setattr(ssl, "create_default_context", lambda: trusting)
        c = http.Client(url, headers={}, connect_timeout=2.0)
        response = await c.post(url, b"", {})
        assert await body_of(response) == b"hello"
        await c.aclose()
        listening.close()
        await listening.wait_closed()

    async def test_an_untrusted_certificate_is_a_connect_error(
        self, certificate: tuple[Path, Path]
    ) -> None:
        cert, key = certificate
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(cert, key)
        server = Server(answer(OK_LENGTH))
        listening = await asyncio.start_server(server.serve, "127.0.0.1", 0, ssl=server_ctx)
        port = listening.sockets[0].getsockname()[1]
        c = http.Client(f"https://127.0.0.1:{port}/", headers={}, connect_timeout=2.0)
        with pytest.raises(http.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await c.post(f"https://127.0.0.1:{port}/", b"", {})
        await c.aclose()
        listening.close()
        await listening.wait_closed()


def test_the_same_on_uvloop() -> None:
    """Servers run on uvloop, whose transports are classes of its own."""

    async def exchange() -> tuple[bytes, int]:
        server = Server(answer(OK_LENGTH))
        listening = await asyncio.start_server(server.serve, "127.0.0.1", 0)
        server.port = listening.sockets[0].getsockname()[1]
        c = client(server)
        try:
            for _ in range(2):
                response = await c.post(server.url, b"", {})
                body = await body_of(response)
                response.release()
            return body, server.connections
        finally:
            await c.aclose()
            listening.close()
            await listening.wait_closed()

    assert uvloop.run(exchange()) == (b"hello", 1)


@pytest.mark.parametrize(
    ("raised", "mapped", "message"),
    [
        (http.ConnectError("refused"), errors.ProviderUnavailable, "cannot reach upstream"),
        (http.ConnectionBroken("cut"), errors.ProviderUnavailable, "broke mid-response"),
        (http.BadResponse("SSH-2.0"), errors.ProviderBadResponse, "malformed"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "x"), errors.ProviderBadResponse, "malformed"),
        (TimeoutError(), errors.ProviderTimeout, "timed out"),
        (ConnectionResetError(), errors.ProviderUnavailable, "ConnectionResetError"),
        (RuntimeError("?"), errors.ProviderError, "provider failed: RuntimeError"),
    ],
)
def test_the_clients_errors_map_onto_the_provider_tree(
    raised: BaseException, mapped: type[errors.ProviderError], message: str
) -> None:
    error = errors.map_exception(raised)
    assert type(error) is mapped
    assert message in str(error)
