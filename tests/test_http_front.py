"""hearth's HTTP front: its HTTP/1.1 protocol (framing, joined writes, pipelining, flow control,
errors), fixed-path routing, and raw HTTP/1.1 on a real server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from hearth.api.protocol import HTTPProtocol
from hearth.api.routing import PathRouter, direct
from tests.conftest import Server, start_server, stop_server

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
POST = b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%s"


class Recorder:
    """A transport that records each write (what reached the socket, in order) and reading pauses."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.ended = False  # write_eof: our side is done (a lingering close)
        self.paused = False

    def write(self, data: bytes) -> None:
        assert not self.closed and not self.ended, "write after close"
        self.writes.append(bytes(data))

    def write_eof(self) -> None:
        self.ended = True

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 80), "peername": ("127.0.0.1", 5000)}.get(name, default)

    @property
    def output(self) -> bytes:
        return b"".join(self.writes)


class Config:
    """The parts of uvicorn's Config the protocol reads."""

    loaded = True
    root_path = ""
    access_log = False

    def __init__(self, app: App, keep_alive: float) -> None:
        self.loaded_app = app
        self.timeout_keep_alive = keep_alive


class State:
    """uvicorn's ServerState, as far as the protocol uses it."""

    def __init__(self) -> None:
        self.connections: set[Any] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.default_headers = [(b"date", b"Tue, 01 Dec 2026 00:00:00 GMT")]
        self.total_requests = 0


def run(app: App, test: Callable[[HTTPProtocol, Recorder], Awaitable[None]], keep_alive: float = 5,
        max_head: int | None = None) -> None:
    """Run `test` on a protocol connected to a Recorder, serving `app`."""
    async def main() -> None:
        cls = HTTPProtocol.with_limits(max_head) if max_head else HTTPProtocol
        proto = cls(Config(app, keep_alive), State(), {})
        rec = Recorder()
        proto.connection_made(rec)  # type: ignore[arg-type]
        await test(proto, rec)
    asyncio.run(main())


async def steps(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def answer(body: bytes = b"ok", headers: list[tuple[bytes, bytes]] | None = None) -> App:
    """An app that reads the whole request body and answers `body` with a Content-Length."""
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200,
                    "headers": headers if headers is not None else [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})
    return app


def pieces(headers: list[tuple[bytes, bytes]], *bodies: bytes) -> App:
    """An app that answers 200 with `headers` and sends `bodies` in turn (the last one ends the body)."""
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for i, piece in enumerate(bodies):
            await send({"type": "http.response.body", "body": piece, "more_body": i < len(bodies) - 1})
    return app


def test_head_and_sized_body_leave_in_one_send() -> None:
    async def body(proto: HTTPProtocol, rec: Recorder) -> None:
        proto.data_received(POST % (2, b"hi"))
        await steps()
        assert len(rec.writes) == 1
        head, _, rest = rec.writes[0].partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\ndate: ") and b"content-length: 2" in head and rest == b"ok"
        assert not rec.closed  # keep-alive
    run(answer(), body)


def test_chunked_pieces_of_one_step_are_joined_and_the_end_flushes() -> None:
    gate = asyncio.Event()

    cycle: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        cycle.append(send.__self__)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"hello", "more_body": True})
        await send({"type": "http.response.body", "body": b"!", "more_body": True})
        await gate.wait()
        await send({"type": "http.response.body", "body": b"bye", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def body(proto: HTTPProtocol, rec: Recorder) -> None:
        proto.data_received(POST % (0, b""))
        await steps()
        assert len(rec.writes) == 1  # head and both pieces of the step, once the step ended
        assert b"transfer-encoding: chunked" in rec.writes[0]
        assert rec.writes[0].endswith(b"\r\n\r\n5\r\nhello\r\n1\r\n!\r\n")
        gate.set()
        await steps()
        assert rec.writes[1:] == [b"3\r\nbye\r\n0\r\n\r\n"]  # the last piece goes at once with what was held
        assert cycle[0].pieces == []  # once pieces have left, a long stream keeps none of its body
    run(app, body)


def test_a_stream_that_ends_in_its_first_step_leaves_sized_in_one_send() -> None:
    app = pieces([(b"content-type", b"text/event-stream")], b"data: 1\n\n", b"data: [DONE]\n\n")

    async def body(proto: HTTPProtocol, rec: Recorder) -> None:
        proto.data_received(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        await steps()
        assert len(rec.writes) == 1
        head, _, rest = rec.writes[0].partition(b"\r\n\r\n")
        assert b"transfer-encoding" not in head and b"content-length: 23" in head
        assert rest == b"data: 1\n\ndata: [DONE]\n\n"
    run(app, body)


def test_a_held_head_goes_out_by_itself_at_the_end_of_the_step() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(3600)  # a stream whose first token is not ready yet

    async def body(proto: HTTPProtocol, rec: Recorder) -> None:
        proto.data_received(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        await steps()
        assert len(rec.writes) == 1 and rec.writes[0].endswith(b"transfer-encoding: chunked\r\n\r\n")
        proto.connection_lost(None)
    run(app, body)


def test_pipelined_requests_are_answered_in_order() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        msg = await receive()
        if scope["path"] == "/slow":
            await asyncio.sleep(0.01)  # the first answer takes longer: the second must still come after it
        out = scope["path"].encode() + b":" + msg["body"]
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(out))]})
        await send({"type": "http.response.body", "body": out})

    async def body(proto: HTTPProtocol, rec: Recorder) -> None:
        proto.data_received(b"POST /slow HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\na"
                            b"POST /fast HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nb")
        assert rec.paused  # no more reading while a request waits its turn
        await asyncio.sleep(0.05)
        out = rec.output
        assert out.index(b"/slow:a") < out.index(b"/fast:b") and out.count(b"HTTP/1.1 200") == 2
        assert not rec.paused and not rec.closed
    run(app, body)


def test_body_in_pieces_pauses_reading_over_the_high_water_mark_and_100_continue_is_sent() -> None:
    got: list[tuple[int, bool]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while True:
            msg = await receive()
            got.append((len(msg["body"]), msg["more_body"]))
            if not msg["more_body"]:
                break
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def body(proto: HTTPProtocol, rec: Recorder) -> None:
        size = 200_000
        proto.data_received(b"POST /u HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % size)
        await steps()
        assert rec.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]  # the app asked for the body
        proto.data_received(b"x" * 100_000)
        assert rec.paused  # over 64 KiB waiting: the socket is paused until the app reads
        await steps()
        assert not rec.paused
        proto.data_received(b"x" * 100_000)
        await steps()
        assert sum(n for n, _ in got) == size and got[-1] == (got[-1][0], False)
        assert all(more for _, more in got[:-1])
        assert rec.writes[-1].startswith(b"HTTP/1.1 204 No Content") and b"transfer-encoding" not in rec.writes[-1]
    run(app, body)


def test_a_client_that_leaves_is_a_disconnect_and_later_sends_do_nothing() -> None:
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        seen.append((await receive())["type"])  # waits until the client leaves
        await send({"type": "http.response.body", "body": b"late", "more_body": False})
        seen.append("sent")

    async def body(proto: HTTPProtocol, rec: Recorder) -> None:
        proto.data_received(POST % (0, b""))
        await steps()
        before = len(rec.writes)
        rec.closed = True
        proto.connection_lost(ConnectionResetError())
        await steps()
        assert seen == ["http.disconnect", "sent"] and len(rec.writes) == before
    run(app, body)


def test_the_disconnect_extension_calls_back_only_while_the_answer_is_open() -> None:
    calls: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        notify = scope["extensions"]["hearth.on_disconnect"]
        notify(lambda: calls.append(scope["path"]))
        if scope["path"] == "/done":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        await asyncio.sleep(3600)

    async def body(proto: HTTPProtocol, rec: Recorder) -> None:
        proto.data_received(b"GET /done HTTP/1.1\r\nHost: h\r\n\r\n")
        await steps()
        proto.data_received(b"GET /open HTTP/1.1\r\nHost: h\r\n\r\n")
        await steps()
        cycle = proto.active
        assert cycle is not None
        proto.connection_lost(None)
        assert calls == ["/open"]  # the finished answer's callback is never called
        late: list[str] = []
        cycle.notify(lambda: late.append("late"))  # registered after the client left: called at once
        assert late == ["late"]
    run(app, body)


def test_http_10_without_length_ends_with_the_connection_and_head_has_no_body() -> None:
    app = pieces([(b"content-type", b"text/plain")], b"stream", b"")

    async def old(proto: HTTPProtocol, rec: Recorder) -> None:
        proto.data_received(b"GET / HTTP/1.0\r\n\r\n")
        await steps()
        out = rec.output
        assert b"transfer-encoding" not in out and b"connection: close" in out and out.endswith(b"\r\n\r\nstream")
        assert rec.closed
    run(app, old)

    async def head(proto: HTTPProtocol, rec: Recorder) -> None:
        proto.data_received(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n")
        await steps()
        assert rec.output.endswith(b"\r\n\r\n") and b"stream" not in rec.output and not rec.closed
    run(app, head)


def test_malformed_and_oversized_requests_are_refused_and_closed() -> None:
    async def bad(proto: HTTPProtocol, rec: Recorder) -> None:
        proto.data_received(b"NOT HTTP AT ALL\r\n\r\n")
        assert rec.output.startswith(b"HTTP/1.1 400 Bad Request") and rec.ended
        proto.data_received(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")  # lingering: dropped, not parsed
        assert rec.output.count(b"HTTP/1.1") == 1
    run(answer(), bad)

    async def big(proto: HTTPProtocol, rec: Recorder) -> None:
        proto.data_received(b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n")
        assert rec.output.startswith(b"HTTP/1.1 431 ") and b"over 4096 bytes" in rec.output and rec.ended
    run(answer(), big, max_head=4096)

    async def endless(proto: HTTPProtocol, rec: Recorder) -> None:  # a head that never ends is bounded too
        proto.data_received(b"GET /?")
        for _ in range(3):
            proto.data_received(b"a" * 2000)
        assert rec.output.startswith(b"HTTP/1.1 431 ") and rec.ended
    run(answer(), endless, max_head=4096)

    async def hostless(proto: HTTPProtocol, rec: Recorder) -> None:
        proto.data_received(b"GET / HTTP/1.1\r\n\r\n")
        assert rec.output.startswith(b"HTTP/1.1 400 ") and b"Host header" in rec.output
    run(answer(), hostless)

    async def chunked_upgrade(proto: HTTPProtocol, rec: Recorder) -> None:
        proto.data_received(b"POST / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
        await steps()
        assert rec.output.startswith(b"HTTP/1.1 400 ") and b"Upgrade" in rec.output and rec.closed
    run(answer(), chunked_upgrade)


def test_a_request_before_a_malformed_one_gets_its_answer_then_the_400() -> None:
    async def body(proto: HTTPProtocol, rec: Recorder) -> None:
        proto.data_received(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nBAD REQUEST\r\n\r\n")
        await steps()
        out = rec.output
        assert out.startswith(b"HTTP/1.1 200 OK")
        assert out.index(b"ok") < out.index(b"HTTP/1.1 400 ") and rec.ended
    run(answer(), body)


def test_a_body_the_app_never_read_is_dropped_and_the_connection_goes_on() -> None:
    async def early(scope: dict[str, Any], receive: Any, send: Any) -> None:  # a 404 before reading the body
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    async def small(proto: HTTPProtocol, rec: Recorder) -> None:
        proto.data_received(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 300000\r\n\r\n" + b"x" * 100_000)
        await steps()
        for _ in range(2):
            proto.data_received(b"x" * 100_000)  # over the high-water mark: must not stall the connection
        assert not rec.paused
        proto.data_received(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
        await steps()
        assert rec.output.count(b"HTTP/1.1 404") == 2 and not rec.closed and not rec.ended
    run(early, small)

    async def huge(proto: HTTPProtocol, rec: Recorder) -> None:
        proto.data_received(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 12000000\r\n\r\n" + b"x" * 1000)
        await steps()
        assert rec.output.startswith(b"HTTP/1.1 404") and rec.ended  # answered, then a lingering close
        proto.data_received(b"x" * 100_000)
        assert not rec.paused
    run(early, huge)

    async def unsent(proto: HTTPProtocol, rec: Recorder) -> None:  # told no `100 Continue`: may never send it
        proto.data_received(b"POST /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n")
        await steps()
        assert rec.output.startswith(b"HTTP/1.1 404") and b"100 Continue" not in rec.output and rec.ended
    run(early, unsent)


def test_an_app_that_fails_gets_a_500_before_its_answer_and_a_cut_after() -> None:
    async def early(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise ValueError("boom")

    async def late(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        raise ValueError("boom")

    async def check_500(proto: HTTPProtocol, rec: Recorder) -> None:
        proto.data_received(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        await steps()
        assert rec.output.startswith(b"HTTP/1.1 500 Internal Server Error") and rec.closed
    run(early, check_500)

    async def check_cut(proto: HTTPProtocol, rec: Recorder) -> None:
        proto.data_received(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        await steps()
        assert b"4\r\npart\r\n" in rec.output and not rec.output.endswith(b"0\r\n\r\n") and rec.closed
    run(late, check_cut)


def test_an_idle_keep_alive_connection_is_closed_after_the_timeout() -> None:
    async def body(proto: HTTPProtocol, rec: Recorder) -> None:
        proto.data_received(POST % (1, b"a"))
        await asyncio.sleep(0.05)
        assert b"ok" in rec.output and not rec.closed
        await asyncio.sleep(0.3)
        assert rec.closed
    run(answer(), body, keep_alive=0.2)


def test_an_upgrade_request_is_served_as_plain_http_with_its_body() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        msg = await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(msg["body"]))]})
        await send({"type": "http.response.body", "body": msg["body"]})

    async def body(proto: HTTPProtocol, rec: Recorder) -> None:
        proto.data_received(b"POST / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                            b"Content-Length: 6\r\n\r\nabc")
        proto.data_received(b"def")
        await steps()
        assert rec.output.endswith(b"\r\n\r\nabcdef") and b"connection: close" in rec.output and rec.closed
    run(app, body)


async def _ok(request: object) -> PlainTextResponse:
    return PlainTextResponse("fixed")


async def _param(request: object) -> PlainTextResponse:
    return PlainTextResponse("param")


def test_forwarded_headers_go_through_uvicorns_proxy_middleware_and_others_skip_it() -> None:
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    seen: list[tuple[Any, str]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append((scope["client"], scope["scheme"]))
        await answer()(scope, receive, send)

    wrapped = ProxyHeadersMiddleware(app, trusted_hosts="127.0.0.1")  # type: ignore[arg-type]

    async def body(proto: HTTPProtocol, rec: Recorder) -> None:
        proto.data_received(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
        await steps()
        proto.data_received(b"GET /b HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 203.0.113.7\r\n"
                            b"X-Forwarded-Proto: https\r\n\r\n")
        await steps()
        proto.data_received(b"GET /c HTTP/1.1\r\nHost: h\r\nx-forwarded-proto: https\r\n\r\n")
        await steps()
    run(wrapped, body)  # type: ignore[arg-type]
    assert seen == [(("127.0.0.1", 5000), "http"), (("203.0.113.7", 0), "https"), (("127.0.0.1", 5000), "https")]


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


def test_one_error_boundary_answers_in_the_dialect_envelope_and_records_the_status(tmp_path: Path) -> None:
    """hearth's app without Starlette's two error layers still answers every failure, inside the usage record."""
    from hearth.app import create_app
    from hearth.core.errors import NotFound
    from hearth.engines.fake import FakeEngine
    from hearth.settings import Settings

    async def boom(request: object) -> PlainTextResponse:
        raise ValueError("a bug")

    async def gone(request: object) -> PlainTextResponse:
        raise NotFound("no such thing; try another")

    async def half(request: object) -> Any:
        async def body() -> Any:
            yield b"data: 1\n\n"
            raise ValueError("mid-stream")
        from starlette.responses import StreamingResponse
        return StreamingResponse(body(), media_type="text/event-stream")

    settings = Settings(home=tmp_path / "h", fake=True)
    app = create_app(settings, [FakeEngine()], extra_routes=[
        Route("/v1/boom", boom), Route("/api/gone", gone), Route("/v1/half", half)])
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/v1/boom")
        assert r.status_code == 500 and r.json()["error"]["message"].startswith("internal error (ValueError)")
        r = client.get("/api/gone")
        assert r.status_code == 404 and r.json() == {"error": "no such thing; try another"}  # Ollama's envelope
        r = client.get("/v1/nowhere")
        assert r.status_code == 404 and "no route GET /v1/nowhere" in r.json()["error"]["message"]
        r = client.post("/health")
        assert r.status_code == 405
        r = client.get("/v1/half")  # started, then failed: what went out stays, no second answer follows
        assert r.status_code == 200 and r.text == "data: 1\n\n"
        usage = app.state.hearth.extras["security"]
        usage.journal.fold()
        statuses = sorted(row[0] for row in usage.db.query("SELECT status FROM usage"))
    assert statuses[:3] == [404, 404, 500]


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


def _conn(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def test_real_server_edges_405_allow_early_413_and_a_client_leaving_mid_upload(server: Server) -> None:
    r = httpx.delete(server.v1 + "/models")
    assert r.status_code == 405 and "GET" in r.headers["allow"]
    with _conn(server) as sock, sock.makefile("rb") as f:  # curl's Expect: 100-continue for a big upload
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 900000000\r\n\r\n")
        status, headers, body = _read_response(f)
        assert status.startswith(b"HTTP/1.1 413"), status  # at once, not after `100 Continue`
        assert json.loads(body)["error"]["code"]
    with _conn(server) as sock:  # leaves after part of the body
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"model\"")
        time.sleep(0.3)
    time.sleep(0.3)
    assert "unexpected error" not in server.log() and "ClientDisconnect" not in server.log()
    with _conn(server) as sock, sock.makefile("rb") as f:  # a 404 before the body: the connection goes on
        sock.sendall(b"POST /v1/nothere HTTP/1.1\r\nHost: x\r\nContent-Length: 400000\r\n\r\n" + b"x" * 400000)
        assert _read_response(f)[0].startswith(b"HTTP/1.1 404")
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(f)[0].startswith(b"HTTP/1.1 200")


def test_a_request_cut_by_shutdown_gets_a_503_and_its_usage_is_kept(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "home", "--fake", timeout=60)
    try:
        with _conn(srv) as sock, sock.makefile("rb") as f:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\":")
            time.sleep(0.3)
            os.killpg(srv.proc.pid, signal.SIGTERM)  # the graceful timeout (5 s) runs out on this request
            status = f.readline()
            assert status.startswith(b"HTTP/1.1 503"), status
        srv.proc.wait(20)
    finally:
        stop_server(srv)
    log = srv.log()
    assert "closed database" not in log and "Exception in ASGI application" not in log, log
