"""Framing for the gateway <-> worker socket: 4-byte length + pickle.

Both ends are hearth's own processes (the worker is started by the gateway on
a socketpair), so pickle of plain tuples/dicts is safe and fast here.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from typing import Any

HEADER = struct.Struct("!I")


def pack(msg: Any) -> bytes:
    """Frame one message."""
    body = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


async def read_message(reader: asyncio.StreamReader) -> Any:
    """Read one framed message; raises `asyncio.IncompleteReadError` on EOF."""
    head = await reader.readexactly(HEADER.size)
    (size,) = HEADER.unpack(head)
    return pickle.loads(await reader.readexactly(size))


class BlockingChannel:
    """The worker's end: blocking send/recv on a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")

    def send(self, msg: Any) -> None:
        self.sock.sendall(pack(msg))

    def recv(self) -> Any:
        """One message, or None at EOF (the gateway went away)."""
        head = self.file.read(HEADER.size)
        if len(head) < HEADER.size:
            return None
        (size,) = HEADER.unpack(head)
        body = self.file.read(size)
        if len(body) < size:
            return None
        return pickle.loads(body)
