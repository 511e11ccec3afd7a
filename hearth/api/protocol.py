"""hearth's HTTP/1.1 server protocol: uvicorn runs the server, this serves each connection.

uvicorn's own httptools protocol is general; on a proxied request it was a
fifth of what hearth adds. This one does what hearth needs with less work per
request, and keeps uvicorn's server loop (sockets, signals, graceful shutdown,
the `date` header) and middleware (proxy headers). A request's `receive` and
`send` are a `Cycle` (`cycle.py`); this module parses and owns the connection:

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
import logging
from collections import deque
from typing import Any
from urllib.parse import unquote

import httptools
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from hearth.api.cycle import Cycle, access, plain_response

HIGH_WATER = 65536  # request body bytes buffered before the socket is paused
DISCARD_MAX = 1 << 20  # unread body bytes dropped to keep a connection; more and it is closed
LINGER_SECONDS = 2.0  # how long a closing connection still takes (and drops) what the client sends
METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")}
ASGI = {"version": "3.0", "spec_version": "2.3"}

log = logging.getLogger("hearth.http")


class HeadTooLarge(Exception):
    """The request line and headers are over the limit."""


class MissingHost(Exception):
    """An HTTP/1.1 request without a Host header."""


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
        self.lingering = False  # answered and half-closed: what still comes is dropped
        self.body_seen = 0  # body bytes of the request being parsed, kept or dropped
        self.refusal = b""  # a 400/431 to send, then close, once the request being answered is done

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
        if self.lingering:
            return  # the rest of a body nobody reads, on a connection about to close
        self._idle_since = self.loop.time()
        if self.parsing is None:  # between requests or inside a head: bound what a head may take
            self.head_size += len(data)
            if self.head_size > self.max_head:  # before parsing: a head that never ends is refused too
                self._refuse(431, f"request head over {self.max_head} bytes")
                return
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
            elif isinstance(exc.__context__, MissingHost):
                self._refuse(400, "An HTTP/1.1 request needs a Host header.")
            else:
                log.exception("error while parsing a request")
                self._refuse(400, "Invalid HTTP request received.")
        except httptools.HttpParserError:
            self._refuse(400, "Invalid HTTP request received.")

    def _refuse(self, status: int, text: str) -> None:
        """Answer a request that never reached the app, and close.

        Requests before it that were read whole get their answers first; the
        refusal follows them and nothing after it is read.
        """
        if self.transport.is_closing():
            return
        broken = self.parsing  # a request whose body the error cut, if any: it cannot be served
        if broken is not None and broken in self.queue:
            self.queue.remove(broken)
        active = self.active
        if active is not None and not active.complete:
            if active is broken:
                if not active.started:
                    self.flush()
                    self.transport.write(plain_response(status, text))
                self.transport.close()
                return
            self.refusal = plain_response(status, text)
            self.pause_reading()
            return
        self.flush()
        self.transport.write(plain_response(status, text))
        self._linger()

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
        if version == "1.1" and b"host" not in names:  # RFC 9112 3.2: a MUST, and smuggling defence
            raise MissingHost()
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
        if self.expect_continue:  # lets the app refuse a declared oversize body before `100 Continue`
            scope["hearth.expect_continue"] = True
        cycle = Cycle(self, scope, version != "1.0" and parser.should_keep_alive(), self.expect_continue)
        cycle.app = self.app if self.forwarded else self.plain_app
        self.parsing = self.latest = cycle
        self.head_size = self.body_seen = 0
        if self.active is None:
            self._start(cycle)
        else:  # pipelined: its turn comes when the one before has answered
            self.queue.append(cycle)
            self.pause_reading()

    def on_body(self, body: bytes) -> None:
        cycle = self.parsing
        self.body_seen += len(body)
        if cycle is None or cycle.disconnected or cycle.complete:
            return  # answered already (a 404, 401 or 413 before reading it): the rest is dropped
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
        if any(k == b"transfer-encoding" for k, _ in cycle.scope["headers"]) and not cycle.started:
            # its chunked body would have to be parsed by hand: refuse rather than serve it without one
            if self.active is cycle:
                self.active = None
            cycle.disconnected = True
            self.flush()
            self.transport.write(plain_response(400, "A chunked body with an Upgrade header is not supported; "
                                                     "send it with a Content-Length or without Upgrade."))
            self.transport.close()
            return
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
        except asyncio.CancelledError:  # the server's graceful shutdown ran out of time
            log.info("%s %s cut short: the server is stopping", cycle.scope["method"], cycle.scope["path"])
            if not cycle.disconnected:
                self._end_broken(cycle, 503, "Service Unavailable: the server is stopping; retry shortly")
            raise
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

    def _end_broken(self, cycle: Cycle, status: int = 500, text: str = "Internal Server Error") -> None:
        """After an app failed: a 500 if it had not started answering, else cut the connection."""
        if not cycle.started:
            self.write(plain_response(status, text))
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
        if cycle is self.parsing and (cycle.expect_continue or self._unread_body(cycle) > DISCARD_MAX):
            # a big body it never read: closing beats reading it all to drop it; and a client told no
            # `100 Continue` may never send its body, so the next bytes could be a request or that body
            self._linger()
            return
        if self.refusal and not self.queue:
            self.flush()
            self.transport.write(self.refusal)
            self._linger()
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

    def _linger(self) -> None:
        """End the connection while the client may still be sending: stop our side, drop what comes
        for a moment, then close. Closing at once with unread bytes makes the kernel reset the
        connection, and a client still sending may lose the answer it was sent."""
        self.flush()
        self.lingering = True
        try:
            self.transport.write_eof()
        except (NotImplementedError, OSError, RuntimeError):
            self.transport.close()
            return
        self.read_paused = False
        self.transport.resume_reading()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def _unread_body(self, cycle: Cycle) -> int:
        """Request body bytes still to come (a chunked body counts as unbounded)."""
        length = next((v for k, v in cycle.scope["headers"] if k == b"content-length"), None)
        if length is None or not length.isdigit():
            return DISCARD_MAX + 1
        return int(length) - self.body_seen

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
        if self.active is not None:
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
        if self.read_paused and not self.queue and not self.refusal:  # after a refusal nothing more is read
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
