"""hearth's HTTP front: joined writes (CorkedTransport), fixed-path routing, raw HTTP/1.1 on a real server."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from hearth.api.corked import CorkedTransport
from hearth.api.routing import PathRouter, direct
from tests.conftest import Server, start_server, stop_server

HEAD_LEN = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
HEAD_CHUNKED = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"


class Recorder(asyncio.Transport):
    """A transport that records each write (what reached the socket, in order)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0


def run(test: Callable[[Recorder, CorkedTransport], Awaitable[None]]) -> None:
    """Run `test` with a recording transport and a CorkedTransport over it (inside a loop)."""
    async def main() -> None:
        rec = Recorder()
        await test(rec, CorkedTransport(rec))
    asyncio.run(main())


def test_head_and_sized_body_leave_in_one_send() -> None:
    async def body(rec: Recorder, t: CorkedTransport) -> None:
        t.write(HEAD_LEN)
        assert rec.writes == []  # held for the body
        t.write(b"ok")
        assert rec.writes == [HEAD_LEN + b"ok"]
    run(body)


def test_chunked_pieces_of_one_step_are_joined_and_the_end_flushes() -> None:
    async def body(rec: Recorder, t: CorkedTransport) -> None:
        t.write(HEAD_CHUNKED)
        t.write(b"5\r\nhello\r\n")
        t.write(b"1\r\n!\r\n")
        assert rec.writes == []
        await asyncio.sleep(0)  # end of the step: what is held goes out, in order
        assert rec.writes == [HEAD_CHUNKED + b"5\r\nhello\r\n1\r\n!\r\n"]
        t.write(b"3\r\nbye\r\n")
        t.write(b"0\r\n\r\n")  # the last piece: sent at once with what is held
        assert rec.writes[1:] == [b"3\r\nbye\r\n0\r\n\r\n"]
        await asyncio.sleep(0)
        assert len(rec.writes) == 2  # the scheduled flush finds nothing left
    run(body)


def test_a_held_head_goes_out_by_itself_at_the_end_of_the_step() -> None:
    async def body(rec: Recorder, t: CorkedTransport) -> None:
        t.write(HEAD_CHUNKED)  # a stream whose first token is not ready yet
        await asyncio.sleep(0)
        assert rec.writes == [HEAD_CHUNKED]
    run(body)


def test_close_sends_what_is_held_first_and_nothing_goes_to_a_closed_transport() -> None:
    async def body(rec: Recorder, t: CorkedTransport) -> None:
        t.write(HEAD_CHUNKED)
        t.close()
        assert rec.writes == [HEAD_CHUNKED] and rec.closed
        rec2 = Recorder()
        t2 = CorkedTransport(rec2)
        t2.write(HEAD_CHUNKED)
        rec2.closed = True  # the peer went away before the flush
        await asyncio.sleep(0)
        assert rec2.writes == []
        assert t2.get_write_buffer_size() == 0
    run(body)


async def _ok(request: object) -> PlainTextResponse:
    return PlainTextResponse("fixed")


async def _param(request: object) -> PlainTextResponse:
    return PlainTextResponse("param")


def test_path_router_gives_the_same_answers_as_starlette() -> None:
    from starlette.applications import Starlette

    routes = [
        Route("/a/{x}", _param, methods=["GET"]),  # earlier and matching /a/b: must still win
        Route("/a/b", _ok, methods=["GET"]),
        Route("/c", _ok, methods=["POST"]),
    ]
    app = Starlette()
    app.router = PathRouter(direct(routes))
    client = TestClient(app)
    assert client.get("/a/b").text == "param"
    assert client.post("/c").text == "fixed"
    assert client.get("/c").status_code == 405
    assert client.get("/nothing").status_code == 404


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home: Path = tmp_path_factory.mktemp("front-home")
    srv = start_server(home, "--fake", timeout=60)
    yield srv
    stop_server(srv)


def _read_response(f: object) -> tuple[bytes, dict[str, str], bytes]:
    """Status line, headers and (de-chunked) body of one HTTP/1.1 response from a socket file."""
    status = f.readline()  # type: ignore[attr-defined]
    headers: dict[str, str] = {}
    while (line := f.readline()) not in (b"\r\n", b""):  # type: ignore[attr-defined]
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while (size := int(f.readline().strip(), 16)) > 0:  # type: ignore[attr-defined]
            body += f.read(size)  # type: ignore[attr-defined]
            assert f.read(2) == b"\r\n"  # type: ignore[attr-defined]
        assert f.readline() == b"\r\n"  # type: ignore[attr-defined]
    else:
        body = f.read(int(headers["content-length"]))  # type: ignore[attr-defined]
    return status, headers, body


def test_keep_alive_connection_serves_json_and_streams_in_turn(server: Server) -> None:
    """Several answers of both framings on one connection arrive whole and in order."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock, sock.makefile("rb") as f:
        for stream in (False, True, False, True):
            payload = json.dumps({"model": "fake:latest", "messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": 3, "stream": stream}).encode()
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
            status, headers, body = _read_response(f)
            assert status.startswith(b"HTTP/1.1 200"), status
            if stream:
                events = [e for e in body.decode().split("\n\n") if e]
                assert events[-1] == "data: [DONE]"
                text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events[:-1])
                assert len(text.split()) == 3
            else:
                assert json.loads(body)["usage"]["completion_tokens"] == 3


def test_second_server_on_a_busy_port_says_so_in_one_line(fake_server: Server, tmp_path: Path) -> None:
    port = fake_server.url.rsplit(":", 1)[1]
    env = {**os.environ, "HEARTH_HOME": str(tmp_path), "HEARTH_CONFIG": str(tmp_path / "hearth.toml")}
    (tmp_path / "hearth.toml").write_text("")
    out = subprocess.run([sys.executable, "-m", "hearth", "serve", "--fake", "--port", port],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[-2].startswith(f"hearth: error: cannot listen on 127.0.0.1:{port}") and "in use" in lines[-2]
    assert lines[-1].startswith("hint:") and "Traceback" not in out.stderr
    assert httpx.get(fake_server.url + "/health").status_code == 200  # the first one is untouched
