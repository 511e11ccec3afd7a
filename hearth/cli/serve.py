"""`hearth serve`: start the HTTP server and say how to reach it."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import socket
import sys

import uvicorn

from hearth.api.protocol import HTTPProtocol
from hearth.app import create_app
from hearth.settings import Settings

log = logging.getLogger("hearth.serve")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def banner(settings: Settings, port: int) -> str:
    """What a person needs to start using the server."""
    host = settings.host if settings.host not in ("0.0.0.0", "::") else "127.0.0.1"
    url = f"http://{host}:{port}"
    model = settings.default_model if not settings.fake else "fake:latest"
    return (
        f"hearth is ready at {url}  (OpenAI API: {url}/v1, Ollama API: {url}/api)\n"
        f"default model: {model}\n"
        f"try it:\n"
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        f"    -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'"
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


async def _run(settings: Settings, sock: socket.socket) -> int:
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
    server = uvicorn.Server(config)

    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.05)
        port = settings.port
        for s in server.servers:
            for sock in s.sockets:
                port = sock.getsockname()[1]
        print(banner(settings, port), flush=True)

    async with app.router.lifespan_context(app):
        # what startup built lives as long as the server: out of the collector's way, so a full
        # collection walks only what requests made (shorter pauses, less of the cache swept)
        gc.freeze()
        watcher = asyncio.ensure_future(announce())
        try:
            await server.serve(sockets=[sock])
        finally:
            watcher.cancel()
    return 0 if server.started else 1


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
            return asyncio.run(_run(settings, sock))
        return uvloop.run(_run(settings, sock))
