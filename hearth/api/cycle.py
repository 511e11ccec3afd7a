"""One request and its response on a connection of hearth's HTTP/1.1 server (`protocol.py`).

`Cycle` is the ASGI `receive` and `send` an app is given for one request:
the body as it arrives, and the response framed (sized, chunked, or sized
after all for a stream that ended before any of it left) with its writes
joined. `protocol.py` parses the requests and owns the connection.
"""

from __future__ import annotations

import asyncio
import http
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hearth.api.protocol import HTTPProtocol

HEADER_NAME_BAD = re.compile(b'[\x00-\x1f\x7f()<>@,;:\\[\\]={} \t\\\\"]')
HEADER_VALUE_BAD = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")
KNOWN_NAMES = frozenset({b"content-type", b"content-length", b"cache-control", b"x-accel-buffering",
                         b"retry-after", b"www-authenticate", b"transfer-encoding", b"connection", b"location"})
CHUNKED_END = b"0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

access = logging.getLogger("uvicorn.access")


def _status_line(code: int) -> bytes:
    try:
        phrase = http.HTTPStatus(code).phrase.encode()
    except ValueError:
        phrase = b""
    return b"HTTP/1.1 %d %s\r\n" % (code, phrase)


STATUS_LINES = {code: _status_line(code) for code in range(100, 600)}


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
            self.started = True  # (expect_continue stays: true at the end means `100 Continue` never went)
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
