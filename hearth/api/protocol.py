"""hearth's HTTP/1.1 server protocol: uvicorn runs the server, this serves each connection.

uvicorn's own httptools protocol is general; on a proxied request it was a
fifth of what hearth adds. This one does what hearth needs with less work per
request, and keeps uvicorn's server loop (sockets, signals, graceful shutdown,
the `date` header) and middleware (proxy headers):

- a request is parsed by httptools into an ASGI scope; the app runs in a task
  of its own, and `receive` hands over the body as it arrives, pausing the
  socket while more than `HIGH_WATER` bytes wait (with `100 Continue` when the
  client asked for it);
- pipelined requests wait their turn; `Connection: close`, HTTP/1.0 and
  keep-alive work as in RFC 9112; a connection idle for the keep-alive timeout
  is closed by one timer per connection (not one per request);
- writes are joined: a sized response's head waits for its body, a stream's
  head for its first piece or the end of the event-loop step; chunked pieces
  written in one step leave in one send, and the end of a response goes out
  at once. A stream that ends within the step it began in (a short answer
  from an instant upstream) leaves as one response with a Content-Length. On loopback every
  send is a system call that also wakes the reader: a small JSON answer
  leaves in one send instead of two, a short SSE stream in one instead of six;
- a head larger than `max_head` is a 431, a malformed request a 400; after a
  disconnect `receive` says `http.disconnect` and `send` does nothing (ASGI
  spec 2.3, as uvicorn), so a streaming app is told and stops;
- the scope extension `hearth.on_disconnect` takes a callback for the moment
  the client leaves, so watching for that needs no timer or task;
- uvicorn's proxy-headers middleware runs only for requests that carry
  `X-Forwarded-For` or `X-Forwarded-Proto` (without them it changes nothing).
"""

from __future__ import annotations

import asyncio
import http
import logging
import re
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import httptools
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

HIGH_WATER = 65536  # request body bytes buffered before the socket is paused
HEADER_NAME_BAD = re.compile(b'[\x00-\x1f\x7f()<>@,;:\\[\\]={} \t\\\\"]')
HEADER_VALUE_BAD = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")
KNOWN_NAMES = frozenset({b"content-type", b"content-length", b"cache-control", b"x-accel-buffering",
                         b"retry-after", b"www-authenticate", b"transfer-encoding", b"connection", b"location"})
CHUNKED_END = b"0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")}
ASGI = {"version": "3.0", "spec_version": "2.3"}

log = logging.getLogger("hearth.http")
access = logging.getLogger("uvicorn.access")


def _status_line(code: int) -> bytes:
    try:
        phrase = http.HTTPStatus(code).phrase.encode()
    except ValueError:
        phrase = b""
    return b"HTTP/1.1 %d %s\r\n" % (code, phrase)


STATUS_LINES = {code: _status_line(code) for code in range(100, 600)}


class HeadTooLarge(Exception):
    """The request line and headers are over the limit."""


def plain_response(status: int, text: str) -> bytes:
    """A whole `Connection: close` response with a text body (for errors outside any app)."""
    body = text.encode()
    return (STATUS_LINES[status] + b"content-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body))


class Cycle:
    """One request and its response: the `receive` and `send` the app is given."""

    __slots__ = ("conn", "scope", "keep_alive", "body", "buffered", "body_done", "delivered", "waiter", "expect_continue",
                 "disconnected", "started", "complete", "chunked", "left", "head_only", "on_disconnect",
                 "head", "head_parts", "te_at", "pieces", "app")

    def __init__(self, conn: HTTPProtocol, scope: dict[str, Any], keep_alive: bool, expect_continue: bool) -> None:
        self.conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self.body: list[bytes] = []
        self.buffered = 0
        self.body_done = False  # the parser has seen the end of the body
        self.delivered = False  # ... and the app has been given all of it
        self.waiter: asyncio.Future[None] | None = None
        self.expect_continue = expect_continue
        self.disconnected = False
        self.started = False
        self.complete = False
        self.chunked = False
        self.left = -1  # bytes the Content-Length still promises; -1 without one
        self.head_only = scope["method"] == "HEAD"
        self.on_disconnect: Callable[[], None] | None = None
        self.head = b""
        self.head_parts: list[bytes] | None = None  # a head hearth chose chunked for, as parts ...
        self.te_at = 0  # ... with its transfer-encoding line here
        self.pieces: list[bytes] = []  # the body so far while none of the response has left
        self.app: Any = conn.app  # the ASGI app that serves it
        scope["extensions"] = {"hearth.on_disconnect": self.notify}

    def notify(self, callback: Callable[[], None] | None) -> None:
        """The `hearth.on_disconnect` extension: `callback` is called if the client leaves before the
        answer is complete (None: no longer); at once if it has left already."""
        if callback is not None and self.disconnected and not self.complete:
            callback()
            return
        self.on_disconnect = callback

    def wake(self) -> None:
        """Wake a `receive` that waits for body or the end."""
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def receive(self) -> dict[str, Any]:
        """ASGI receive: the body as it arrives, then `http.disconnect` once the client left or the answer is done."""
        while True:
            if self.disconnected or self.complete:
                return {"type": "http.disconnect"}
            if not self.delivered and (self.body or self.body_done):
                body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
                self.body = []
                self.buffered = 0
                self.delivered = self.body_done
                self.conn.resume_reading()
                return {"type": "http.request", "body": body, "more_body": not self.delivered}
            if not self.delivered:
                if self.expect_continue and not self.started:
                    self.expect_continue = False
                    self.conn.transport.write(CONTINUE)
                self.conn.resume_reading()
            self.waiter = self.conn.loop.create_future()
            await self.waiter

    async def send(self, message: dict[str, Any]) -> None:
        """ASGI send: the head is held for the body; see the module docstring for when bytes leave."""
        conn = self.conn
        if conn.write_paused and not self.disconnected:
            await conn.drain()
        if self.disconnected:
            return
        kind = message["type"]
        if not self.started:
            if kind != "http.response.start":
                raise RuntimeError(f"expected ASGI message 'http.response.start', got {kind!r}")
            self.started = True
            self.expect_continue = False
            head = self.head = self._head(message["status"], message.get("headers") or ())
            if self.chunked:
                conn.hold(head)  # a stream: its head leaves by the end of this step, body or not
            else:
                conn.held.append(head)  # a sized (or no) body follows: its write takes the head along
            return
        if self.complete:
            raise RuntimeError(f"unexpected ASGI message {kind!r} after the response was complete")
        if kind != "http.response.body":
            raise RuntimeError(f"expected ASGI message 'http.response.body', got {kind!r}")
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if self.head_only:
            data = b""
        elif self.chunked:
            data = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
            if not more:
                data += CHUNKED_END
        else:
            if self.left >= 0:
                self.left -= len(body)
                if self.left < 0:
                    raise RuntimeError("response content is longer than its Content-Length")
            data = body
        if more:
            if self.chunked:
                if self.head_parts is not None:
                    if conn.held and conn.held[0] is self.head:
                        self.pieces.append(body)
                    else:  # something has left already: a chunked answer to the end, nothing kept
                        self.head_parts = None
                        self.pieces = []
                conn.hold(data)  # joined with what else this step writes
            else:
                conn.write(data)
            return
        if self.left > 0 and not self.head_only:
            raise RuntimeError("response content is shorter than its Content-Length")
        self.complete = True
        if self.head_parts is not None and conn.held and conn.held[0] is self.head:
            data = self._sized(body)  # the whole answer is still here: it leaves with a Content-Length
            conn.held.clear()
        conn.write(data)
        self.wake()
        conn.response_done(self)

    def _sized(self, last: bytes) -> bytes:
        """A stream that ended before any of it left, as one response with a Content-Length (no chunk
        framing for the client to take apart)."""
        parts = self.head_parts
        assert parts is not None
        self.pieces.append(last)
        body = b"".join(self.pieces)
        parts[self.te_at] = b"content-length: %d\r\n" % len(body)
        return b"".join(parts) + body

    def _head(self, status: int, headers: Any) -> bytes:
        conn = self.conn
        parts = [STATUS_LINES.get(status) or _status_line(status), conn.default_head()]
        close_sent = False
        for name, value in headers:
            if (name not in KNOWN_NAMES and HEADER_NAME_BAD.search(name)) or HEADER_VALUE_BAD.search(value):
                raise RuntimeError(f"invalid response header {name!r}: {value!r}")
            name = name.lower()
            if name == b"content-length":
                self.left = int(value)
            elif name == b"transfer-encoding":
                self.chunked = b"chunked" in value.lower()
            elif name == b"connection" and b"close" in value.lower():
                self.keep_alive = False
                close_sent = True
            parts += (name, b": ", value, b"\r\n")
        if self.left < 0 and not self.chunked and not self.head_only and status not in (204, 304) and status >= 200:
            if self.scope["http_version"] == "1.0":  # no chunked encoding in 1.0: the close ends the body
                self.keep_alive = False
            else:
                self.chunked = True
                self.head_parts, self.te_at = parts, len(parts)
                parts.append(b"transfer-encoding: chunked\r\n")
        if not self.keep_alive and not close_sent:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        if conn.access_log:
            access.info('%s - "%s %s HTTP/%s" %d', "%s:%d" % self.scope["client"] if self.scope["client"] else "-",
                        self.scope["method"], self.scope["path"], self.scope["http_version"], status)
        return b"".join(parts)


class HTTPProtocol(asyncio.Protocol):
    """One client connection (constructed by uvicorn's server: `Config(http=HTTPProtocol)`)."""

    max_head = 1 << 20  # bytes of request line and headers; more is a 431 (see `with_limits`)

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        if not config.loaded:
            config.load()
        self.app = config.loaded_app
        # uvicorn's proxy-headers middleware changes nothing without X-Forwarded-For/-Proto: skip it then
        inner = getattr(self.app, "app", None) if isinstance(self.app, ProxyHeadersMiddleware) else None
        self.plain_app = inner or self.app
        self.loop = _loop or asyncio.get_event_loop()
        self.server_state = server_state
        self.app_state = app_state
        self.root_path = config.root_path
        self.keep_alive_timeout = float(config.timeout_keep_alive)
        self.access_log = bool(config.access_log) and access.hasHandlers()
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.server: tuple[str, int] | None = None
        self.client: tuple[str, int] | None = None
        self.scheme = "http"
        # request being parsed
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0
        self.expect_continue = False
        self.forwarded = False  # X-Forwarded-For/-Proto came (the proxy-headers middleware is needed)
        self.parsing: Cycle | None = None  # headers seen, body not complete yet
        self.latest: Cycle | None = None  # the last request whose headers were seen
        self.upgraded = False  # the parser stopped at an Upgrade request: no more requests on this connection
        self.upgraded_left = 0  # body bytes of that request still to come
        # requests being served or waiting their turn
        self.active: Cycle | None = None
        self.queue: deque[Cycle] = deque()
        # output
        self.held: list[bytes] = []
        self.write_paused = False
        self.read_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._default_src: object = None
        self._default_head = b""
        self._idle_since = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None

    @classmethod
    def with_limits(cls, max_head: int) -> type[HTTPProtocol]:
        """This protocol with another head size limit (hearth's `max_header_bytes` decides the 431 itself;
        this one only bounds memory)."""
        return type(cls.__name__, (cls,), {"max_head": max_head})

    # -- connection ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio's classes
        self.server_state.connections.add(self)
        self.server = _address(transport.get_extra_info("sockname"))
        self.client = _address(transport.get_extra_info("peername"))
        if transport.get_extra_info("sslcontext"):
            self.scheme = "https"
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        for cycle in (self.active, self.parsing):
            if cycle is not None and not cycle.complete and not cycle.disconnected:
                cycle.disconnected = True
                cycle.wake()
                callback, cycle.on_disconnect = cycle.on_disconnect, None
                if callback is not None:
                    callback()
        self.queue.clear()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self.write_paused = False
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self.held.clear()

    def eof_received(self) -> None:
        return None  # the transport closes; a request in flight sees a disconnect

    def data_received(self, data: bytes) -> None:
        self._idle_since = self.loop.time()
        if self.parsing is None:  # between requests or inside a head: bound what a head may take
            self.head_size += len(data)
        if self.upgraded:
            self._upgraded_body(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:  # no upgrades here: the request is served as it is
            self._after_upgrade(data[exc.args[0]:] if exc.args and isinstance(exc.args[0], int) else b"")
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, HeadTooLarge):
                self._refuse(431, f"request head over {self.max_head} bytes")
            else:
                log.exception("error while parsing a request")
                self._refuse(400, "Invalid HTTP request received.")
        except httptools.HttpParserError:
            self._refuse(400, "Invalid HTTP request received.")

    def _refuse(self, status: int, text: str) -> None:
        """Answer a request that never reached the app, and close."""
        if self.active is not None and not self.active.complete:
            self.transport.close()  # mid-answer: no second response can follow
            return
        self.flush()
        self.transport.write(plain_response(status, text))
        self.transport.close()

    # -- parser callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_size > self.max_head:  # counted per read in data_received; checked here, mid-head
            raise HeadTooLarge()
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        names = dict(self.headers)  # one lookup per header of interest, not a test per header
        self.expect_continue = b"expect" in names and any(
            v.lower() == b"100-continue" for n, v in self.headers if n == b"expect")
        # uvicorn's proxy-headers middleware reads these two; without them it changes nothing
        self.forwarded = b"x-forwarded-for" in names or b"x-forwarded-proto" in names
        version = parser.get_http_version()
        raw_method = parser.get_method()
        method = METHODS.get(raw_method) or raw_method.decode("ascii")
        url = self.url
        if url[:1] == b"/" and b"?" not in url and b"%" not in url:
            raw_path, query = url, b""  # the usual case, without parse_url
        else:
            parsed = httptools.parse_url(url)
            raw_path, query = parsed.path, parsed.query or b""
        path = raw_path.decode("ascii", "replace")
        if "%" in path:
            path = unquote(path)
        scope = {
            "type": "http", "asgi": ASGI, "http_version": version, "server": self.server, "client": self.client,
            "scheme": self.scheme, "method": method, "root_path": self.root_path, "path": self.root_path + path,
            "raw_path": self.root_path.encode() + raw_path, "query_string": query, "headers": self.headers,
            "state": self.app_state.copy(),
        }
        cycle = Cycle(self, scope, version != "1.0" and parser.should_keep_alive(), self.expect_continue)
        cycle.app = self.app if self.forwarded else self.plain_app
        self.parsing = self.latest = cycle
        self.head_size = 0
        if self.active is None:
            self._start(cycle)
        else:  # pipelined: its turn comes when the one before has answered
            self.queue.append(cycle)
            self.pause_reading()

    def on_body(self, body: bytes) -> None:
        cycle = self.parsing
        if cycle is None or cycle.disconnected:
            return
        cycle.body.append(body)
        cycle.buffered += len(body)
        if cycle.buffered > HIGH_WATER:
            self.pause_reading()
        cycle.wake()

    def on_message_complete(self) -> None:
        cycle = self.parsing
        if cycle is None:
            return
        self.parsing = None
        cycle.body_done = True
        cycle.wake()

    def _after_upgrade(self, rest: bytes) -> None:
        """httptools stops at a request with `Upgrade` (its body unread): serve it as plain HTTP, take its
        body by Content-Length, and close the connection after the answer (the parser cannot go on)."""
        cycle = self.latest
        self.upgraded = True
        if cycle is None:
            self.transport.close()
            return
        cycle.keep_alive = False
        length = next((v for k, v in cycle.scope["headers"] if k == b"content-length"), b"0")
        self.upgraded_left = int(length) if length.isdigit() else 0
        if self.upgraded_left and not cycle.delivered:
            cycle.body_done = False
            self.parsing = cycle
            self._upgraded_body(rest)

    def _upgraded_body(self, data: bytes) -> None:
        """Body bytes of an Upgrade request (what follows them is dropped: the connection ends)."""
        cycle = self.parsing
        if cycle is None or not self.upgraded_left:
            return
        take = data[: self.upgraded_left]
        self.upgraded_left -= len(take)
        cycle.body.append(take)
        cycle.buffered += len(take)
        if not self.upgraded_left:
            cycle.body_done = True
            self.parsing = None
        cycle.wake()

    # -- serving ---------------------------------------------------------------------

    def _start(self, cycle: Cycle) -> None:
        self.active = cycle
        task = self.loop.create_task(self._run(cycle))
        tasks = self.server_state.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _run(self, cycle: Cycle) -> None:
        try:
            await cycle.app(cycle.scope, cycle.receive, cycle.send)
        except BaseException as exc:  # the app failed: answer 500 if nothing went out yet, else cut
            log.error("Exception in ASGI application", exc_info=exc)
            if not cycle.disconnected:
                self._end_broken(cycle)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            return
        if cycle.disconnected or cycle.complete:
            return
        log.error("ASGI callable returned without %s the response", "completing" if cycle.started else "starting")
        self._end_broken(cycle)

    def _end_broken(self, cycle: Cycle) -> None:
        """After an app failed: a 500 if it had not started answering, else cut the connection."""
        if not cycle.started:
            self.write(plain_response(500, "Internal Server Error"))
            cycle.complete = True
            cycle.keep_alive = False
            self.response_done(cycle)
        elif not cycle.complete:
            self.flush()
            self.transport.close()

    def response_done(self, cycle: Cycle) -> None:
        """The response went out whole: close, start the next pipelined request, or wait idle."""
        self.server_state.total_requests += 1
        if cycle is not self.active:
            return
        self.active = None
        if self.transport.is_closing():
            return
        if not cycle.keep_alive:
            self.flush()
            self.transport.close()
            return
        if self.queue:
            self._start(self.queue.popleft())
            if not self.queue:
                self.resume_reading()
            return
        self.resume_reading()
        self._idle_since = self.loop.time()
        self._arm_idle()

    def shutdown(self) -> None:
        """The server stops: close now if idle, else after the current answer."""
        if self.active is None or self.active.complete:
            self.flush()
            self.transport.close()
        else:
            self.active.keep_alive = False
            self.queue.clear()

    def _arm_idle(self) -> None:
        if self._idle_timer is None and self.keep_alive_timeout > 0:
            self._idle_since = self.loop.time()
            self._idle_timer = self.loop.call_later(self.keep_alive_timeout, self._check_idle)

    def _check_idle(self) -> None:
        """One timer per connection: closes it once idle for the keep-alive timeout."""
        self._idle_timer = None
        if self.transport.is_closing():
            return
        if self.active is not None or self.parsing is not None:
            self._arm_idle()  # busy: look again later
            return
        quiet = self.loop.time() - self._idle_since
        if quiet >= self.keep_alive_timeout:
            self.transport.close()
        else:
            self._idle_timer = self.loop.call_later(self.keep_alive_timeout - quiet, self._check_idle)

    # -- output ----------------------------------------------------------------------

    def default_head(self) -> bytes:
        """uvicorn's default headers (`date`, refreshed each second), as bytes."""
        src = self.server_state.default_headers
        if src is not self._default_src:
            self._default_src = src
            self._default_head = b"".join(b"%s: %s\r\n" % (k, v) for k, v in src)
        return self._default_head

    def hold(self, data: bytes) -> None:
        """Keep `data` until the next write or the end of this event-loop step."""
        if not self.held:
            self.loop.call_soon(self.flush)
        self.held.append(data)

    def write(self, data: bytes) -> None:
        """Send `data` now, after whatever is held."""
        if self.held:
            self.held.append(data)
            data = b"".join(self.held)
            self.held.clear()
        if data and not self.transport.is_closing():
            self.transport.write(data)

    def flush(self) -> None:
        """Send what is held."""
        if self.held:
            data = b"".join(self.held)
            self.held.clear()
            if not self.transport.is_closing():
                self.transport.write(data)

    def pause_reading(self) -> None:
        if not self.read_paused and not self.transport.is_closing():
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and not self.queue:
            self.read_paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its low-water mark again (or the client left)."""
        if self._drained is None:
            self._drained = self.loop.create_future()
        await self._drained


def _address(info: Any) -> tuple[str, int] | None:
    """(host, port) of a socket address (None for Unix sockets and unknowns)."""
    if isinstance(info, (tuple, list)) and len(info) >= 2:
        return str(info[0]), int(info[1])
    return None
