"""Fewer sends per response: uvicorn's protocol over a transport that joins writes.

uvicorn writes a response head and each body message with a separate
`transport.write`, and on loopback every write is a send() syscall that also
wakes the reader: for a small JSON answer that is two sends, for a short SSE
stream five or six. The transport here holds writes and sends them together:

- a response head is held until the body that follows it (or the end of the
  event-loop step, whichever comes first);
- a body with a Content-Length, or the last piece of a chunked body, goes out
  at once together with whatever is held;
- other chunked pieces are held until the end of the current step, so pieces
  produced in one step (an upstream's whole answer arriving in one read) leave
  in one send.

Holding is never longer than the current step, so a stream still leaves token
by token. Everything except `write`/`close` goes to the real transport.
"""

from __future__ import annotations

import asyncio
from typing import Any

CHUNKED_END = b"0\r\n\r\n"


class CorkedTransport:
    """Wraps an asyncio transport; see the module docstring."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._held: list[bytes] = []
        self._chunked = False  # the held head announced a chunked body

    def write(self, data: bytes) -> None:
        """Hold or send `data` (in order, always)."""
        if data.startswith(b"HTTP/1."):  # a response head (or an interim 100 Continue)
            self._chunked = b"transfer-encoding: chunked" in data
            self._hold(data)
            return
        if self._chunked and not data.endswith(CHUNKED_END):
            self._hold(data)
            return
        if self._held:
            self._held.append(data)
            data = b"".join(self._held)
            self._held.clear()
        self._transport.write(data)

    def _hold(self, data: bytes) -> None:
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(data)

    def flush(self) -> None:
        """Send whatever is held (called at the end of the step that wrote it)."""
        if not self._held:
            return
        data = b"".join(self._held)
        self._held.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        """Send what is held, then close."""
        self.flush()
        self._transport.close()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(d) for d in self._held)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def corked_protocol() -> type:
    """uvicorn's httptools protocol class, writing through a CorkedTransport."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class CorkedHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(CorkedTransport(transport))  # type: ignore[arg-type]

    return CorkedHttpToolsProtocol
