"""Proxy overhead: hearth vs LiteLLM in front of the same instant OpenAI upstream.

One run: a fake OpenAI server on loopback (raw asyncio, answers instantly) is
called directly, through `hearth serve` (upstream kind openai) and through
LiteLLM's proxy. For non-streamed and streamed chat requests it reports the
latency each proxy adds (p50/p99 of sequential requests, minus the direct
call; the targets take turns in ten slices so drift hits them alike) and the request rate at concurrency 32 (with the error count).

    python bench/proxy_overhead.py [--litellm /path/to/litellm] [--requests 1000] [--seconds 5] [--json]

After the table come the ratios of each proxy to hearth (same run), the
issue's targets met or missed, and the share of CPU time the hypervisor stole
during the run: on a busy host every row is slower, the direct baseline too.

LiteLLM belongs in its own venv (`pip install 'litellm[proxy]'`); without it
that column is skipped with a message. `floor` is a bare Starlette + aiohttp
pass-through proxy: what any Python proxy pays on this machine right now (it
streams an upstream stream on with Starlette's StreamingResponse, as hearth
streams it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
CHAT = json.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
}).encode()


def _sse_chunk(delta: dict[str, object], finish: str | None) -> bytes:
    obj = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


SSE = b"".join([
    _sse_chunk({"role": "assistant", "content": ""}, None), _sse_chunk({"content": "Hello"}, None),
    _sse_chunk({"content": " there"}, None), _sse_chunk({}, "stop"),
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":0,"model":"m","choices":[],'
    b'"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}\n\n',
    b"data: [DONE]\n\n",
])
MASTER_KEY = "sk-bench-" + os.urandom(8).hex()  # LiteLLM refuses to start without one
HEADERS = {"Authorization": f"Bearer {MASTER_KEY}"}
MODELS = b'{"object":"list","data":[{"id":"m","object":"model","owned_by":"bench"}]}'


# -- the instant upstream (runs in its own process) ---------------------------------


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            path = lines[0].split(b" ")[1]
            length = 0
            for line in lines[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length) if length else b""
            if path.startswith(b"/v1/models") or path.startswith(b"/health"):
                ctype, payload = b"application/json", MODELS
            elif b'"stream":true' in body.replace(b" ", b""):
                ctype, payload = b"text/event-stream", SSE
            else:
                ctype, payload = b"application/json", CHAT
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
                         % (ctype, len(payload), payload))
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the client closed its connection: nothing to answer
    finally:
        writer.close()


def serve_upstream(port: int) -> None:
    """Run the instant OpenAI upstream on 127.0.0.1:port forever."""
    async def main() -> None:
        server = await asyncio.start_server(_handle, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()
    try:
        import uvloop
        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def serve_floor(port: int, upstream: str) -> None:
    """A bare Starlette + aiohttp pass-through proxy: the floor any Python proxy pays here."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    state: dict[str, aiohttp.ClientSession] = {}

    async def chat(request: Request) -> Response:
        if "s" not in state:
            state["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        r = await state["s"].post(upstream + "/v1/chat/completions", data=await request.body(),
                                  headers={"Content-Type": "application/json"})
        ctype = r.headers.get("Content-Type", "")
        if not ctype.startswith("text/event-stream"):
            async with r:
                return Response(await r.read(), status_code=r.status, media_type=ctype)

        async def pieces() -> AsyncIterator[bytes]:
            async with r:
                async for piece in r.content.iter_any():
                    yield piece
        return StreamingResponse(pieces(), status_code=r.status, media_type=ctype)

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", loop="uvloop", http="httptools",
                lifespan="off", access_log=False)


# -- processes ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """Wait until GET url answers (any status below 500)."""
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up in {timeout}s")


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def start_hearth(tmp: Path, upstream: str) -> tuple[str, subprocess.Popen[bytes]]:
    home = tmp / "hearth"
    home.mkdir()
    (home / "hearth.toml").write_text(
        f'log_level = "warning"\n[upstreams.bench]\nkind = "openai"\nurls = ["{upstream}"]\nmodels = ["m"]\n')
    port = free_port()
    proc = spawn([sys.executable, "-m", "hearth", "serve", "--fake", "--port", str(port)], tmp / "hearth.log",
                 {"HEARTH_HOME": str(home), "HEARTH_CONFIG": str(home / "hearth.toml")})
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/ready", proc)
    return url, proc


def hearth_source() -> str:
    """Where the measured `python -m hearth` comes from (a stale installed copy shadows a checkout
    unless the bench runs from the checkout's root)."""
    out = subprocess.run([sys.executable, "-c", "import hearth; print(hearth.__file__)"], capture_output=True,
                         text=True, check=False)
    return str(Path(out.stdout.strip()).parent.parent) if out.returncode == 0 else f"unknown ({out.stderr.strip()[-200:]})"


def start_litellm(tmp: Path, binary: str, upstream: str) -> tuple[str, subprocess.Popen[bytes]]:
    cfg = tmp / "litellm.yaml"
    cfg.write_text(
        "model_list:\n  - model_name: m\n    litellm_params:\n      model: openai/m\n"
        f"      api_base: {upstream}/v1\n      api_key: none\n"
        "litellm_settings:\n  telemetry: false\n  set_verbose: false\n"
    )
    port = free_port()
    proc = spawn([binary, "--config", str(cfg), "--port", str(port), "--host", "127.0.0.1", "--num_workers", "1"],
                 tmp / "litellm.log", {"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "LITELLM_MASTER_KEY": MASTER_KEY,
                                       "DISABLE_SCHEMA_UPDATE": "true"})
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health/liveliness", proc, timeout=240)
    return url, proc


# -- load ---------------------------------------------------------------------------


async def one(session: aiohttp.ClientSession, url: str, stream: bool) -> bool:
    body = {**BODY, "stream": True} if stream else BODY
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        data = await resp.read()
        return resp.status == 200 and (b"[DONE]" in data if stream else b'"choices"' in data)


async def sequential(targets: dict[str, str], stream: bool, n: int, rounds: int = 10) -> dict[str, list[float]]:
    """Latencies (ms) of n sequential requests per target, each on one keep-alive connection.

    The targets take turns in `rounds` slices of n/rounds requests, so that the
    machine's drift during the run hits the direct baseline and every proxy alike.
    """
    sessions = {name: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), headers=HEADERS)
                for name in targets}
    out: dict[str, list[float]] = {name: [] for name in targets}
    try:
        for name, url in targets.items():
            for _ in range(max(20, n // 10)):  # warm up
                await one(sessions[name], url, stream)
        for _ in range(rounds):
            for name, url in targets.items():
                for _ in range(max(1, n // rounds)):
                    t0 = time.perf_counter()
                    if not await one(sessions[name], url, stream):
                        raise RuntimeError(f"{url}: a request failed")
                    out[name].append((time.perf_counter() - t0) * 1000)
    finally:
        for session in sessions.values():
            await session.close()
    return out


async def rate(url: str, stream: bool, seconds: float, concurrency: int = 32) -> tuple[float, int]:
    """Requests/s at `concurrency` for `seconds`, and the number of errors."""
    ok = errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), headers=HEADERS) as s:
        await asyncio.gather(*(one(s, url, stream) for _ in range(concurrency)))
        end = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal ok, errors
            while time.perf_counter() < end:
                try:
                    good = await one(s, url, stream)
                except aiohttp.ClientError:
                    good = False
                ok, errors = (ok + 1, errors) if good else (ok, errors + 1)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return ok / (time.perf_counter() - t0), errors


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


@dataclass
class Row:
    name: str
    mode: str
    p50: float
    p99: float
    added50: float
    added99: float
    rps: float
    errors: int


class Progress:
    """Step lines on stderr (`[3/12] hearth json req/s@32`): the run takes minutes."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def step(self, what: str) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total}] {what}", file=sys.stderr, flush=True)


def cpu_ticks() -> tuple[int, int]:
    """(steal, total) CPU ticks since boot, from /proc/stat; (0, 0) where there is none."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields)


async def measure(targets: dict[str, str], n: int, seconds: float, progress: Progress) -> list[Row]:
    rows = []
    for stream in (False, True):
        mode = "stream" if stream else "json"
        progress.step(f"{mode} latency, {n} sequential requests each: {', '.join(targets)}")
        lat = await sequential(targets, stream, n)
        b50, b99 = pct(lat["direct"], 0.5), pct(lat["direct"], 0.99)
        for name, url in targets.items():
            progress.step(f"{name} {mode} req/s at concurrency 32 for {seconds:g} s")
            rps, errors = await rate(url, stream, seconds)
            p50, p99 = pct(lat[name], 0.5), pct(lat[name], 0.99)
            rows.append(Row(name, mode, p50, p99, p50 - b50, p99 - b99, rps, errors))
    return rows


def print_table(rows: list[Row]) -> None:
    head = f"{'target':<10}{'mode':<8}{'p50 ms':>9}{'p99 ms':>9}{'+p50 ms':>9}{'+p99 ms':>9}{'req/s@32':>10}{'errors':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        add50 = "" if r.name == "direct" else f"{r.added50:.2f}"
        add99 = "" if r.name == "direct" else f"{r.added99:.2f}"
        print(f"{r.name:<10}{r.mode:<8}{r.p50:>9.2f}{r.p99:>9.2f}{add50:>9}{add99:>9}{r.rps:>10.0f}{r.errors:>8}")


def ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def verdicts(rows: list[Row]) -> list[dict[str, object]]:
    """The issue's targets, per mode: hearth's value, the limit, met or not."""
    by = {(r.name, r.mode): r for r in rows}
    out: list[dict[str, object]] = []
    for mode in ("json", "stream"):
        h, lite = by[("hearth", mode)], by.get(("litellm", mode))
        out += [
            {"mode": mode, "target": "hearth adds <= 0.5 ms at p50", "value": h.added50,
             "met": h.added50 <= 0.5 and h.errors == 0},
            {"mode": mode, "target": "hearth adds <= 3 ms at p99", "value": h.added99, "met": h.added99 <= 3.0},
        ]
        if lite is not None:
            less = ratio(lite.added50, h.added50)
            more = ratio(h.rps, lite.rps)
            out += [
                {"mode": mode, "target": "LiteLLM adds >= 5x more at p50", "value": less,
                 "met": less is not None and less >= 5},
                {"mode": mode, "target": "hearth sustains more req/s than LiteLLM", "value": more,
                 "met": more is not None and more > 1 and h.errors == 0},
            ]
    return out


def print_ratios(rows: list[Row]) -> None:
    """Each proxy against hearth, same run: added latency and request rate as ratios."""
    by = {(r.name, r.mode): r for r in rows}
    print()
    print(f"{'ratio (same run)':<34}{'json':>10}{'stream':>10}")
    for peer in ("floor", "litellm"):
        if (peer, "json") not in by:
            continue
        for label, get, flip in ((f"{peer} / hearth, +p50", lambda r: r.added50, False),
                                 (f"{peer} / hearth, +p99", lambda r: r.added99, False),
                                 (f"hearth / {peer}, req/s@32", lambda r: r.rps, True)):
            cells = []
            for mode in ("json", "stream"):
                h, o = get(by[("hearth", mode)]), get(by[(peer, mode)])
                x = ratio(h, o) if flip else ratio(o, h)
                cells.append("-" if x is None else f"{x:.2f}x")
            print(f"{label:<34}{cells[0]:>10}{cells[1]:>10}")


def print_verdicts(checks: list[dict[str, object]], steal: float | None) -> None:
    print()
    print(f"{'target':<42}{'mode':<8}{'hearth':>9}  result")
    for c in checks:
        value = c["value"]
        shown = "-" if value is None else (f"{value:.2f}x" if "LiteLLM" in str(c["target"]) else f"{value:.2f}")
        print(f"{c['target']!s:<42}{c['mode']!s:<8}{shown:>9}  {'met' if c['met'] else 'MISSED'}")
    if steal is not None:
        # a busy host slows the direct baseline and every proxy alike, but the target is absolute
        note = ": the host was busy, and every row (the direct baseline too) is slower for it" if steal >= 1 else ""
        print(f"host: {steal:.1f}% of CPU time stolen by the hypervisor during the run{note}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--litellm", default=shutil.which("litellm") or "/work/litellm-venv/bin/litellm",
                    help="path to LiteLLM's `litellm` binary (separate venv)")
    ap.add_argument("--requests", type=int, default=1000, help="sequential requests per target and mode")
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of the concurrency-32 run")
    ap.add_argument("--no-floor", action="store_true", help="skip the bare Starlette+aiohttp reference proxy")
    ap.add_argument("--json", action="store_true", help="print the rows, ratios and verdicts as JSON")
    ap.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--serve-floor", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return 0
    if args.serve_floor:
        serve_floor(int(args.serve_floor[0]), args.serve_floor[1])
        return 0
    procs: list[subprocess.Popen[bytes]] = []
    lite = Path(args.litellm).exists()
    # each measure(): 2 latency steps, and one rate step per target and mode
    progress = Progress(2 + 2 * (2 + (not args.no_floor)) + (6 if lite else 0))
    steal0, total0 = cpu_ticks()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        try:
            up_port = free_port()
            up = spawn([sys.executable, __file__, "--serve-upstream", str(up_port)], tmp / "upstream.log")
            procs.append(up)
            upstream = f"http://127.0.0.1:{up_port}"
            wait_http(upstream + "/v1/models", up)
            targets = {"direct": upstream}
            if not args.no_floor:
                floor_port = free_port()
                fp = spawn([sys.executable, __file__, "--serve-floor", str(floor_port), upstream], tmp / "floor.log")
                procs.append(fp)
                targets["floor"] = f"http://127.0.0.1:{floor_port}"
                wait_http(targets["floor"] + "/", fp)
            hearth_url, hp = start_hearth(tmp, upstream)
            procs.append(hp)
            targets["hearth"] = hearth_url
            rows = asyncio.run(measure(targets, args.requests, args.seconds, progress))
            # LiteLLM keeps busy in the background even when idle, so it runs only
            # while it is measured (against a fresh direct baseline).
            if lite:
                lite_url, lp = start_litellm(tmp, args.litellm, upstream)
                procs.append(lp)
                more = asyncio.run(measure({"direct": upstream, "litellm": lite_url}, args.requests, args.seconds,
                                           progress))
                rows += [r for r in more if r.name == "litellm"]
                rows.sort(key=lambda r: r.mode != "json")
            else:
                print(f"LiteLLM not found at {args.litellm}; skipping it "
                      "(python -m venv /work/litellm-venv && /work/litellm-venv/bin/pip install 'litellm[proxy]')",
                      file=sys.stderr)
        finally:
            for p in reversed(procs):
                stop(p)
    steal1, total1 = cpu_ticks()
    steal = 100 * (steal1 - steal0) / (total1 - total0) if total1 > total0 else None
    checks = verdicts(rows)
    if args.json:
        print(json.dumps({"rows": [r.__dict__ for r in rows], "targets": checks, "steal_percent": steal,
                          "hearth": hearth_source()}, indent=2))
        return 0
    print_table(rows)
    print_ratios(rows)
    print_verdicts(checks, steal)
    print(f"hearth measured: {hearth_source()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
