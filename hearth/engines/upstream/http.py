"""A small HTTP/1.1 client for talking to upstreams, with keep-alive pools.

hearth only ever sends JSON requests to servers it was configured with and
reads JSON, SSE or NDJSON back, so it needs far less than a general client:
requests with a body of known length; responses framed by Content-Length,
chunked encoding, or the end of the connection. Doing just that on an
asyncio protocol costs a fraction of aiohttp's per-request overhead (and of
asyncio's streams), which is most of what hearth adds as a proxy.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import defaultdict, deque
from collections.abc import Coroutine, Mapping
from typing import Any
from urllib.parse import urlsplit

READ_SIZE = 65536
MAX_HEAD = 65536
END_WAIT = 2.0  # seconds a stream's end framing is awaited before its connection is dropped
HIGH_WATER = 4 * READ_SIZE  # bytes buffered before the socket is paused (a slow consumer)


RETRYABLE = (OSError, EOFError, TimeoutError)  # transport failures (HTTPProtocolError is a ConnectionError)


class HTTPProtocolError(ConnectionError):
    """The server's answer is not valid HTTP/1.1 (or the connection broke mid-answer)."""


class Connection(asyncio.Protocol):
    """One open connection to an origin: received bytes in a buffer, read by the one request using it.

    A protocol rather than asyncio's streams: a response arriving is one
    `data_received` call and, usually, no wait at all to read it.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()  # once per connection, not per wait

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _more(self) -> None:
        """Wait for more bytes (or the end)."""
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        self._waiter = (self._loop or asyncio.get_running_loop()).create_future()
        await self._waiter

    def usable(self) -> bool:
        return self.transport is not None and not self.eof and not self.transport.is_closing()

    def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise BrokenPipeError("the connection is closed")
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def take(self, n: int) -> bytes:
        """Up to n buffered bytes, without waiting (b"" if none)."""
        buf = self.buffer
        if not buf:
            return b""
        if len(buf) <= n:
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:n])
            del buf[:n]
        return data

    async def read(self, n: int) -> bytes:
        """Up to n bytes, waiting for some; b"" at the end; the connection's error once the buffer is empty."""
        while not self.buffer:
            if self.eof:
                if self.error is not None:
                    raise self.error
                return b""
            await self._more()
        return self.take(n)

    async def read_until(self, sep: bytes, limit: int) -> bytes:
        """Bytes up to and including `sep`; HTTPProtocolError past `limit` or at the end (`partial` says
        whether any bytes had come)."""
        start = 0
        while True:
            i = self.buffer.find(sep, start)
            if i >= 0:
                return self.take(i + len(sep))
            if len(self.buffer) > limit:
                raise HTTPProtocolError(f"the response head is larger than {limit} bytes")
            if self.eof:
                err = HTTPProtocolError("the connection closed in the middle of an answer")
                err.partial = bool(self.buffer)  # type: ignore[attr-defined]
                raise err
            start = max(0, len(self.buffer) - len(sep) + 1)
            await self._more()

    async def read_exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if self.eof:
                raise HTTPProtocolError("the connection closed in the middle of a chunk")
            await self._more()
        return self.take(n)


class Response:
    """Status, headers and a body read piece by piece (`readany`) or whole (`read`).

    Call `release()` after the body was read (the connection goes back to the
    pool) or `close()` to drop it (the server sees the client leave).
    """

    def __init__(self, pool: Pool, origin: tuple[str, int, bool], conn: Connection, status: int,
                 headers: dict[str, str], no_body: bool) -> None:
        self.pool = pool
        self.origin = origin
        self.conn: Connection | None = conn
        self.status = status
        self.headers = headers
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self.left = 0 if no_body else (content_length(length) if length is not None and not self.chunked else -1)
        self.keep = headers.get("connection", "").lower() != "close" and (self.chunked or self.left >= 0)
        self.chunk_left = 0
        self.done = self.left == 0

    def ready(self) -> bytes:
        """Body bytes that are here already, without waiting (b"" if none); framing as `readany`."""
        conn = self.conn
        if self.done or conn is None or not conn.buffer or self.chunked:
            return b""  # chunked pieces go through readany (a chunk may be half here)
        if self.left < 0:
            return conn.take(READ_SIZE)
        data = conn.take(min(self.left, READ_SIZE))
        self.left -= len(data)
        self.done = self.left == 0
        return data

    async def readany(self) -> bytes:
        """The next piece of the body; b"" once it is complete."""
        if self.done or self.conn is None:
            return b""
        conn = self.conn
        if self.chunked:
            return await self._read_chunk(conn)
        if self.left < 0:  # until the server closes
            data = await conn.read(READ_SIZE)
            if not data:
                self.done = True
            return data
        data = await conn.read(min(self.left, READ_SIZE))
        if not data:
            raise HTTPProtocolError(f"the connection closed with {self.left} bytes of the body missing")
        self.left -= len(data)
        self.done = self.left == 0
        return data

    async def _read_chunk(self, conn: Connection) -> bytes:
        try:
            while self.chunk_left == 0:
                line = await conn.read_until(b"\r\n", MAX_HEAD)
                size = int(line.split(b";", 1)[0].strip() or b"x", 16)
                if size == 0:
                    while (await conn.read_until(b"\r\n", MAX_HEAD)) != b"\r\n":  # trailers
                        pass
                    self.done = True
                    return b""
                self.chunk_left = size
            data = await conn.read(min(self.chunk_left, READ_SIZE))
            if not data:
                raise HTTPProtocolError("the connection closed in the middle of a chunk")
            self.chunk_left -= len(data)
            if self.chunk_left == 0:
                await conn.read_exactly(2)  # CRLF after the chunk
            return data
        except ValueError as exc:
            raise HTTPProtocolError(f"bad chunk size in the response: {exc}") from None

    async def read(self) -> bytes:
        """The whole (rest of the) body."""
        parts = []
        while data := await self.readany():
            parts.append(data)
        return b"".join(parts)

    def release(self) -> None:
        """Done with the response: keep the connection if the body was read whole."""
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if self.done and self.keep:
            self.pool.put(self.origin, conn)
        else:
            conn.close()

    def close(self) -> None:
        """Drop the connection now (an unfinished stream stops at the server)."""
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    def release_after_end(self, wait: float = END_WAIT) -> None:
        """The stream's end event came: keep the connection once the rest of the body (a chunked
        body's last chunk, llama-server's and vLLM's framing) is read. Usually it is here already;
        else it is awaited in the background for up to `wait` seconds, then the connection dropped."""
        conn = self.conn
        if self.done or conn is None:
            self.release()
            return
        if self.chunked and self.chunk_left == 0 and conn.buffer[:5] == b"0\r\n\r\n":
            del conn.buffer[:5]
            self.done = True
            self.release()
            return
        self.pool.later(self._finish(wait))

    async def _finish(self, wait: float) -> None:
        try:
            async with asyncio.timeout(wait):
                while await self.readany():  # what follows the end event (framing, a late usage event):
                    pass  # read and dropped, never held
        except (TimeoutError, OSError, HTTPProtocolError):
            self.close()
            return
        self.release()


class Pool:
    """Keep-alive connections per origin; `request` sends one request and reads the head."""

    def __init__(self, connect_timeout: float, max_idle: int = 64) -> None:
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._idle: defaultdict[tuple[str, int, bool], deque[Connection]] = defaultdict(deque)
        self._urls: dict[str, tuple[tuple[str, int, bool], str, bytes]] = {}
        self._heads: dict[tuple[str, str], tuple[Mapping[str, str] | None, tuple[str, int, bool], bytes]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # background ends of streams (`release_after_end`)

    def later(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` in the background, held until it ends."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _split(self, url: str) -> tuple[tuple[str, int, bool], str, bytes]:
        """(origin, path with query, Host header) of a URL, cached."""
        hit = self._urls.get(url)
        if hit is None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"not an http(s) URL: {url!r}")
            tls = parts.scheme == "https"
            port = parts.port or (443 if tls else 80)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
            if ":" in parts.hostname:  # IPv6 literal
                host = f"[{parts.hostname}]" + (f":{parts.port}" if parts.port else "")
            hit = ((parts.hostname, port, tls), path, host.encode("idna"))
            if len(self._urls) < 4096:
                self._urls[url] = hit
        return hit

    def _head_start(self, method: str, url: str,
                    headers: Mapping[str, str] | None) -> tuple[tuple[str, int, bool], bytes]:
        """The origin and the request head up to Content-Length, cached while the same headers
        object comes again (engines pass one dict they never change)."""
        key = (method, url)
        hit = self._heads.get(key)
        if hit is not None and hit[0] is headers:
            return hit[1], hit[2]
        origin, path, host = self._split(url)
        head = [f"{method} {path} HTTP/1.1\r\n".encode("latin-1"), b"Host: ", host, b"\r\n"]
        for name, value in (headers or {}).items():
            head.append(f"{name}: {value}\r\n".encode("latin-1"))
        start = b"".join(head)
        if len(self._heads) < 4096:
            self._heads[key] = (headers, origin, start)
        return origin, start

    async def _connect(self, origin: tuple[str, int, bool]) -> Connection:
        host, port, tls = origin
        context = None
        if tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        async with asyncio.timeout(self.connect_timeout):
            _, conn = await asyncio.get_running_loop().create_connection(Connection, host, port, ssl=context)
        return conn

    def put(self, origin: tuple[str, int, bool], conn: Connection) -> None:
        idle = self._idle[origin]
        if conn.usable() and len(idle) < self.max_idle:
            idle.append(conn)
        else:
            conn.close()

    def _take(self, origin: tuple[str, int, bool]) -> Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.usable():
                return conn
            conn.close()
        return None

    async def request(self, method: str, url: str, body: bytes = b"",
                      headers: Mapping[str, str] | None = None, extra: bytes = b"") -> Response:
        """Send a request and read the response head (the body is read from the Response).

        `extra` is header lines of this request alone (`Name: value\\r\\n`), after the cached ones.
        """
        origin, start = self._head_start(method, url, headers)
        if body or method in ("POST", "PUT", "PATCH"):
            payload = b"%s%sContent-Length: %d\r\n\r\n%s" % (start, extra, len(body), body)
        else:
            payload = start + extra + b"\r\n"
        conn = self._take(origin)
        if conn is not None:
            try:
                return await self._exchange(origin, conn, method, payload)
            except (HTTPProtocolError, ConnectionResetError, BrokenPipeError) as exc:
                # A reused connection the server had closed before reading this
                # request: nothing was processed, so send it on a fresh connection.
                if not getattr(exc, "before_answer", True):
                    raise
        return await self._exchange(origin, await self._connect(origin), method, payload)

    async def _exchange(self, origin: tuple[str, int, bool], conn: Connection, method: str,
                        payload: bytes) -> Response:
        try:
            conn.write(payload)
            try:
                raw = await conn.read_until(b"\r\n\r\n", MAX_HEAD)
            except HTTPProtocolError as exc:
                if not hasattr(exc, "partial"):
                    raise
                err = HTTPProtocolError("the server closed the connection without answering")
                err.before_answer = not exc.partial  # type: ignore[attr-defined]
                raise err from None
            status, headers = parse_head(raw)
            while 100 <= status < 200:  # 100 Continue and friends: the real answer follows
                status, headers = parse_head(await conn.read_until(b"\r\n\r\n", MAX_HEAD))
            no_body = method == "HEAD" or status in (204, 304)
            return Response(self, origin, conn, status, headers, no_body)
        except BaseException:
            conn.close()
            raise

    async def close(self) -> None:
        """Close every idle connection (and stop waiting for the ends of streams)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
        self._idle.clear()


def content_length(value: str) -> int:
    """A Content-Length value; repeats that agree ("12, 12", as RFC 9110 allows) count once."""
    values = {v.strip() for v in value.split(",")}
    if len(values) != 1 or not (only := values.pop()).isdigit():
        raise HTTPProtocolError(f"bad Content-Length in the response: {value[:80]!r}")
    return int(only)


def parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
    """Status code and lower-cased headers of a response head."""
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HTTPProtocolError(f"not an HTTP/1.1 response: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise HTTPProtocolError(f"bad header line in the response: {line[:80]!r}")
        key = name.strip().lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return int(parts[1]), headers
