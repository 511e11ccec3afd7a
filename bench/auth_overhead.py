"""What auth + usage recording cost per request, against the instant fake engine.

Three servers in one run, requests interleaved so that machine noise hits all alike:

    bare     create_app with the security middleware taken out (no record, no metrics)
    keyless  the default: no key exists, every request still recorded (usage row + metrics)
    keys     a key with --models, --rpm and --tokens-per-day: lookup, hash, constant-time
             compare, body peek for the model pattern, quota check, usage row + last-used

Each request is a non-streamed chat completion (4 tokens) on a keep-alive connection.
Target: keys - keyless <= 0.3 ms at p50.

    python bench/auth_overhead.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("bare", "keyless", "keys")
BODY = json.dumps({"model": "fake", "messages": [{"role": "user", "content": "hello there"}],
                   "max_tokens": 4}).encode()


def run_server(mode: str, port: int, home: str) -> None:
    """Child process: serve the fake engine (no per-token delay) in one of the modes."""
    import uvicorn
    import uvloop

    from hearth.api.auth import SecurityMiddleware
    from hearth.app import create_app
    from hearth.engines.fake import FakeEngine
    from hearth.settings import Settings

    settings = Settings(home=Path(home), fake=True, port=port)
    app = create_app(settings, [FakeEngine(delay=0.0)])
    if mode == "bare":
        app.user_middleware = [m for m in app.user_middleware if m.cls is not SecurityMiddleware]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, loop="none", http="httptools", log_level="warning",
                            access_log=False)
    uvloop.run(uvicorn.Server(config).serve())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(mode: str, root: Path) -> tuple[subprocess.Popen[bytes], int, dict[str, str]]:
    """Start one server; returns it, its port and the headers to send."""
    home = root / mode
    home.mkdir()
    headers = {"Content-Type": "application/json"}
    if mode == "keys":
        from hearth.store.db import open_database
        from hearth.store.keys import KeyStore

        db = open_database(home / "hearth.db")
        _, secret = KeyStore(db).create("bench", models=["fake*"], rpm=10_000_000, tokens_per_day=10**12)
        db.close()
        headers["Authorization"] = f"Bearer {secret}"
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", mode, "--port", str(port), "--home", str(home)],
                            start_new_session=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port, headers
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the {mode} server did not start")


def one(conn: http.client.HTTPConnection, headers: dict[str, str]) -> float:
    """One request; seconds taken."""
    t = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=BODY, headers=headers)
    resp = conn.getresponse()
    resp.read()
    if resp.status != 200:
        raise SystemExit(f"request failed: {resp.status}")
    return time.perf_counter() - t


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def measure(n: int) -> dict[str, list[float]]:
    """Run the three servers and time `n` interleaved requests on each."""
    root = Path(tempfile.mkdtemp(prefix="hearth-bench-"))
    servers = {m: start(m, root) for m in MODES}
    try:
        conns = {m: http.client.HTTPConnection("127.0.0.1", servers[m][1], timeout=10) for m in MODES}
        times: dict[str, list[float]] = {m: [] for m in MODES}
        for i in range(n + 200):
            for m in (MODES if i % 2 else MODES[::-1]):
                dt = one(conns[m], servers[m][2])
                if i >= 200:  # warm-up
                    times[m].append(dt)
        return times
    finally:
        for proc, _, _ in servers.values():
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()


def build_app(mode: str, home: Path) -> tuple[object, dict[str, str]]:
    """An in-process app in `mode` and the headers its requests carry."""
    from hearth.api.auth import SecurityMiddleware
    from hearth.app import create_app
    from hearth.engines.fake import FakeEngine
    from hearth.settings import Settings

    home.mkdir()
    headers = {"content-type": "application/json"}
    if mode == "keys":
        from hearth.store.db import open_database
        from hearth.store.keys import KeyStore

        db = open_database(home / "hearth.db")
        _, secret = KeyStore(db).create("bench", models=["fake*"], rpm=10_000_000, tokens_per_day=10**12)
        db.close()
        headers["authorization"] = f"Bearer {secret}"
    app = create_app(Settings(home=home, fake=True), [FakeEngine(delay=0.0)])
    if mode == "bare":
        app.user_middleware = [m for m in app.user_middleware if m.cls is not SecurityMiddleware]
    return app, headers


async def asgi_once(app: object, headers: dict[str, str]) -> float:
    """One chat completion straight through the ASGI app (no sockets); seconds taken."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 1),
             "headers": [(k.encode(), v.encode()) for k, v in headers.items()]
             + [(b"content-length", str(len(BODY)).encode())]}
    sent = False
    status = 0

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    t = time.perf_counter()
    await app(scope, receive, send)  # type: ignore[operator]
    dt = time.perf_counter() - t
    if status != 200:
        raise SystemExit(f"in-process request failed: {status}")
    return dt


def measure_in_process(n: int) -> dict[str, list[float]]:
    """The middleware's own cost, without sockets or another process's scheduling."""
    root = Path(tempfile.mkdtemp(prefix="hearth-bench-asgi-"))
    apps = {m: build_app(m, root / m) for m in MODES}
    times: dict[str, list[float]] = {m: [] for m in MODES}

    async def run() -> None:
        for i in range(n + 200):
            for m in (MODES if i % 2 else MODES[::-1]):
                dt = await asgi_once(*apps[m])
                if i >= 200:
                    times[m].append(dt)

    uvloop_run(run())
    return times


def uvloop_run(coro: object) -> None:
    import uvloop

    uvloop.run(coro)  # type: ignore[arg-type]


def report(title: str, times: dict[str, list[float]]) -> None:
    from hearth.cli.table import print_table

    ms = {m: (pct(t, 0.5) * 1e3, pct(t, 0.99) * 1e3, sum(t) / len(t) * 1e3) for m, t in times.items()}
    rows = [[m, f"{p50:.3f}", f"{p99:.3f}", f"{mean:.3f}"] for m, (p50, p99, mean) in ms.items()]
    for a, b in (("keys", "keyless"), ("keyless", "bare"), ("keys", "bare")):
        rows.append([f"{a} - {b}", f"{ms[a][0] - ms[b][0]:+.3f}", f"{ms[a][1] - ms[b][1]:+.3f}",
                     f"{ms[a][2] - ms[b][2]:+.3f}"])
    print(f"{title}: {len(times['keys'])} requests per mode, interleaved; milliseconds per request")
    print_table(["MODE", "P50 MS", "P99 MS", "MEAN MS"], rows)
    verdict = "meets" if ms["keys"][0] - ms["keyless"][0] <= 0.3 else "MISSES"
    print(f"auth + usage over keyless at p50: {ms['keys'][0] - ms['keyless'][0]:+.3f} ms ({verdict} the 0.3 ms target)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--home", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        run_server(args.serve, args.port, args.home)
        return
    report("over HTTP (uvicorn + httptools, keep-alive)", measure(args.requests))
    print()
    report("in process (ASGI app called directly: the middleware's own cost)", measure_in_process(args.requests))


if __name__ == "__main__":
    main()
