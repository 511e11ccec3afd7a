"""The upstream HTTP/1.1 client against scripted raw servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from hearth.engines.upstream.http import HTTPProtocolError, Pool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


async def serve(handler: Handler) -> tuple[asyncio.AbstractServer, str, list[bytes]]:
    """A server calling handler(reader, writer, connection number); returns (server, url, heads)."""
    heads: list[bytes] = []
    count = 0

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        count += 1
        try:
            await handler(reader, writer, count)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client left: nothing more to answer
        finally:
            writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}", heads


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]


def test_content_length_keep_alive_and_request_shape() -> None:
    seen: list[tuple[bytes, bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            seen.append(await read_request(reader))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
                         b'{"ok": "y"}')
            await writer.drain()

    async def main() -> None:
        server, url, _ = await serve(handler)
        pool = Pool(connect_timeout=5)
        for _ in range(3):
            resp = await pool.request("POST", url + "/v1/chat/completions?x=1", b'{"a":1}',
                                      {"Content-Type": "application/json", "Authorization": "Bearer k"})
            assert resp.status == 200 and resp.headers["content-type"] == "application/json"
            assert await resp.read() == b'{"ok": "y"}'
            resp.release()
        head, body = seen[0]
        assert head.startswith(b"POST /v1/chat/completions?x=1 HTTP/1.1\r\n")
        assert b"Host: 127.0.0.1:" in head and b"Authorization: Bearer k" in head and body == b'{"a":1}'
        assert len(seen) == 3 and len(pool._idle[next(iter(pool._idle))]) == 1  # one connection reused
        await pool.close()
        server.close()
    run(main())


def test_chunked_body_is_decoded_piece_by_piece() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b'data: {"a":1}\n\n', b"data: [DONE]\n\n"):
            writer.write(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(b"0\r\nX-Trailer: 1\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def main() -> None:
        server, url, _ = await serve(handler)
        pool = Pool(connect_timeout=5)
        resp = await pool.request("POST", url + "/s", b"{}")
        pieces = []
        while data := await resp.readany():
            pieces.append(data)
        assert pieces == [b'data: {"a":1}\n\n', b"data: [DONE]\n\n"]
        assert resp.done and resp.keep
        resp.release()
        await pool.close()
        server.close()
    run(main())


@pytest.mark.parametrize(("gap", "kept"), [(None, True), (0.05, True), (1.0, False)])
def test_a_stream_ended_before_its_last_chunk_keeps_the_connection_once_it_arrives(
        gap: float | None, kept: bool) -> None:
    """The end event is read; the chunked body's terminator is already there, comes soon, or never
    comes within the wait (then the connection is dropped, not reused half-read)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_request(reader)
            piece = b"data: [DONE]\n\n"
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(piece), piece))
            if gap is not None:
                await writer.drain()
                await asyncio.sleep(gap)
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    async def main() -> None:
        server, url, _ = await serve(handler)
        pool = Pool(connect_timeout=5)
        resp = await pool.request("POST", url + "/s", b"{}")
        assert await resp.readany() == b"data: [DONE]\n\n"  # what the stream parser stops at
        first = resp.conn
        resp.release_after_end(wait=0.3)
        await asyncio.sleep(0.5)
        again = await pool.request("POST", url + "/s", b"{}")
        assert (again.conn is first) is kept
        again.close()
        await pool.close()
        server.close()
    run(main())


def test_body_until_close_and_cut_bodies() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if n == 1:  # no length: the body ends with the connection
            writer.write(b"HTTP/1.1 200 OK\r\n\r\nline1\nline2\n")
        elif n == 2:  # promises 100 bytes, sends 5
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
        else:  # a chunk cut in the middle
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n20\r\nhalf")
        await writer.drain()

    async def main() -> None:
        server, url, _ = await serve(handler)
        pool = Pool(connect_timeout=5)
        resp = await pool.request("GET", url + "/a")
        assert await resp.read() == b"line1\nline2\n" and not resp.keep
        resp.release()
        for _ in range(2):
            resp = await pool.request("GET", url + "/b")
            with pytest.raises(HTTPProtocolError):
                await resp.read()
            resp.close()
        await pool.close()
        server.close()
    run(main())


def test_repeated_content_length_counts_once_and_a_conflicting_one_is_a_protocol_error() -> None:
    closed: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        second = b"2" if n == 1 else b"3"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: %s\r\n\r\nok" % second)
        await writer.drain()
        if not await reader.read():  # hearth hung up
            closed.append(n)

    async def main() -> None:
        server, url, _ = await serve(handler)
        pool = Pool(connect_timeout=5)
        resp = await pool.request("POST", url + "/x", b"{}")
        assert await resp.read() == b"ok"  # "2, 2": RFC 9110 allows identical repeats
        resp.close()
        with pytest.raises(HTTPProtocolError, match="bad Content-Length"):
            await pool.request("POST", url + "/x", b"{}")
        await asyncio.sleep(0.1)
        assert 2 in closed  # the connection is not left open
        await pool.close()
        server.close()
    run(main())


def test_stale_keep_alive_connection_is_retried_on_a_fresh_one() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        if n == 1:  # the idle connection is closed just as the next request comes in
            await reader.readuntil(b"\r\n\r\n")
            return
        if n == 2:  # closed while idle: the pool sees it before reuse
            await asyncio.sleep(0.01)
            return
        await read_request(reader)

    async def main() -> None:
        server, url, _ = await serve(handler)
        pool = Pool(connect_timeout=5)
        for pause in (0.0, 0.1, 0.0):
            resp = await pool.request("POST", url + "/x", b"{}")
            assert await resp.read() == b"ok"
            resp.release()
            await asyncio.sleep(pause)
        await pool.close()
        server.close()
    run(main())


def test_interim_100_and_garbage_heads() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if n == 1:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Busy\r\nContent-Length: 4\r\n"
                         b"Retry-After: 7\r\nConnection: close\r\n\r\nbusy")
        else:
            writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def main() -> None:
        server, url, _ = await serve(handler)
        pool = Pool(connect_timeout=5)
        resp = await pool.request("POST", url + "/x", b"{}")
        assert resp.status == 503 and resp.headers["retry-after"] == "7" and await resp.read() == b"busy"
        assert not resp.keep  # Connection: close is honoured
        resp.release()
        with pytest.raises(HTTPProtocolError, match="not an HTTP/1.1 response"):
            await pool.request("POST", url + "/x", b"{}")
        await pool.close()
        server.close()
    run(main())


def test_refused_connection_is_an_oserror() -> None:
    async def main() -> None:
        server, url, _ = await serve(lambda r, w, n: asyncio.sleep(0))
        server.close()
        await server.wait_closed()
        with pytest.raises(OSError):
            await Pool(connect_timeout=5).request("GET", url + "/")
    run(main())


def test_a_large_answer_read_slowly_pauses_the_socket_and_bytes_before_a_reset_still_arrive() -> None:
    size = 2_000_000

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size)
        await writer.drain()

    async def main() -> None:
        server, url, _ = await serve(handler)
        pool = Pool(connect_timeout=5)
        resp = await pool.request("GET", url + "/big")
        await asyncio.sleep(0.3)  # a slow reader: the buffer stops near its high-water mark
        assert resp.conn is not None and len(resp.conn.buffer) < size // 2
        got = 0
        while piece := await resp.readany():
            got += len(piece)
        assert got == size and resp.done
        resp.release()
        await pool.close()
        server.close()
    run(main())

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        writer.transport.abort()  # a reset, not a clean close

    async def cut() -> None:
        server, url, _ = await serve(reset)
        pool = Pool(connect_timeout=5)
        resp = await pool.request("GET", url + "/cut")
        assert await resp.readany() == b"partial"  # what came before the reset is not thrown away
        with pytest.raises(OSError):
            await resp.readany()
        resp.close()
        await pool.close()
        server.close()
    run(cut())
