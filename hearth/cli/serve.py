"""`hearth serve`: start the HTTP server and say how to reach it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from types import FrameType

import uvicorn
from uvicorn.server import HANDLED_SIGNALS

from hearth.api.protocol import HTTPProtocol
from hearth.app import create_app
from hearth.cli.ps import url_host_part
from hearth.settings import BUNDLED_MODEL, Settings

log = logging.getLogger("hearth.serve")


class Server(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM or SIGINT it caught is raised again only once hearth's
    own shutdown (engines, managed upstreams, the usage journal) has run. uvicorn raises it when
    `serve` returns, which for SIGTERM ended the process before that shutdown could run."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.caught: list[int] = []

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.caught.append(sig)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # signals are the main thread's
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def banner(settings: Settings, port: int, needs_key: bool = False) -> str:
    """What a person needs to start using the server (`needs_key`: keys exist, so the example sends one)."""
    host = settings.host if settings.host not in ("0.0.0.0", "::") else "127.0.0.1"
    url = f"http://{url_host_part(host)}:{port}"
    model = settings.default_model
    if settings.fake and model == BUNDLED_MODEL:  # as create_app swaps it
        model = "fake:latest"
    auth = "    -H \"Authorization: Bearer $HEARTH_API_KEY\" \\\n" if needs_key else ""
    # max_tokens: a base model without it writes until its context is full (minutes on a CPU)
    return (
        f"hearth is ready at {url}  (OpenAI API: {url}/v1, Ollama API: {url}/api)\n"
        f"default model: {model}\n"
        + ("this server wants an API key: export HEARTH_API_KEY=hk-... (see `hearth keys`)\n" if needs_key else "")
        + f"try it:\n"
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n{auth}"
        f"    -d '{{\"model\": \"{model}\", \"max_tokens\": 64, "
        f"\"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'"
    )


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound now: a port in use fails here, before any model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


async def _run(settings: Settings, sock: socket.socket) -> tuple[int, list[int]]:
    """Serve until told to stop; the exit code and the signals that stopped it."""
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        loop="none",
        # hearth's own per-connection protocol (less work per request, joined writes); its head
        # limit only bounds memory: the middleware answers 431 at max_header_bytes in the dialect's envelope
        http=HTTPProtocol.with_limits(max(1 << 20, 4 * settings.max_header_bytes)),
        server_header=False,
        access_log=settings.log_level == "debug",
        timeout_graceful_shutdown=5,
        lifespan="off",  # run below, so that a startup SettingsError is one readable line
    )
    server = Server(config)

    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.05)
        port = settings.port
        for s in server.servers:
            for sock in s.sockets:
                port = sock.getsockname()[1]
        security = app.state.hearth.extras.get("security")
        needs_key = security is not None and settings.loopback_needs_key and security.keys_on()
        print(banner(settings, port, needs_key), flush=True)

    async with app.router.lifespan_context(app):
        # what startup built lives as long as the server: out of the collector's way, so a full
        # collection walks only what requests made (shorter pauses, less of the cache swept)
        gc.freeze()
        watcher = asyncio.ensure_future(announce())
        try:
            await server.serve(sockets=[sock])
        finally:
            watcher.cancel()
            # uvicorn cancels what outlived the graceful timeout but does not wait: let those requests
            # record their usage before the lifespan closes the engines and the database
            pending = [t for t in server.server_state.tasks if not t.done()]
            if pending:
                await asyncio.wait(pending, timeout=2)
    return (0 if server.started else 1), server.caught


def serve(settings: Settings, create_admin_key: bool = False) -> int:
    """Run the server until interrupted. Returns the exit code."""
    logging.getLogger().setLevel(settings.log_level.upper())
    settings.home.mkdir(parents=True, exist_ok=True)
    from hearth.cli.keys import require_admin_key

    refused = require_admin_key(settings, create_admin_key)
    if refused is not None:
        return refused
    try:
        sock = listen(settings.host, settings.port)
    except OSError as exc:
        print(f"hearth: error: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}",
              file=sys.stderr)
        print("hint: choose another port with --port or HEARTH_PORT (is another hearth already running?)",
              file=sys.stderr)
        return 2
    with sock:
        try:
            import uvloop
        except ImportError:
            code, caught = asyncio.run(_run(settings, sock))
        else:
            code, caught = uvloop.run(_run(settings, sock))
    for sig in reversed(caught):  # shut down in full: now the signal ends the process as it would have
        signal.raise_signal(sig)
    return code
