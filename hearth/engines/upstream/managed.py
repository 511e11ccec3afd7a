"""Managed upstreams: a child server hearth starts on first use and watches.

The command (e.g. `llama-cpp-server -m {model_path} --port {port}` or
`vllm serve ... --port {port}`) runs on a free loopback port; its output goes
to hearth's log; it is restarted if it dies (its idle time still counting from the last
request) and stopped after its keep-alive of idleness.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable

from hearth.core.errors import EngineUnavailable
from hearth.settings import ManagedUpstream


def die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when hearth dies, however
    hearth dies (even SIGKILL), so no managed server outlives its gateway."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

log = logging.getLogger("hearth.upstream.managed")
MAX_RESTARTS = 5  # within RESTART_WINDOW seconds; then wait for the next request
RESTART_WINDOW = 600.0  # wide enough to catch a server that crashes minutes after loading its model
MAX_LOG_LINE = 8192  # characters of one child log line kept

ReadyProbe = Callable[[str], Awaitable[bool]]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def substitute(command: list[str], port: int, model_path: str) -> list[str]:
    """Fill `{port}`, `{host}` and `{model_path}` into each argument."""
    values = {"{port}": str(port), "{host}": "127.0.0.1", "{model_path}": model_path}
    out = []
    for arg in command:
        for key, value in values.items():
            arg = arg.replace(key, value)
        out.append(arg)
    return out


class ManagedServer:
    """One child server process for an upstream."""

    def __init__(self, name: str, cfg: ManagedUpstream, ready_path: str, probe: ReadyProbe) -> None:
        self.name = name
        self.cfg = cfg
        self.ready_path = cfg.ready_path or ready_path
        self.probe = probe
        self.proc: asyncio.subprocess.Process | None = None
        self.url: str | None = None
        self.port = 0
        self.started_at = 0.0
        self.last_used = 0.0
        self.busy = 0  # requests in flight
        self.keep_alive = cfg.keep_alive  # the last request's keep_alive, as Ollama counts it
        self._poke = asyncio.Event()  # a request ended: the reaper looks again now
        self.tail: deque[str] = deque(maxlen=20)
        self._lock = asyncio.Lock()
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._restarts: deque[float] = deque()
        self.last_error: str | None = None  # why it last failed to start or died (for `hearth upstreams`)

    @property
    def running(self) -> bool:
        """True while the child is up and was ready."""
        return self.proc is not None and self.proc.returncode is None and self.url is not None

    def expires_at(self) -> float | None:
        """Unix time the server will be stopped if still idle (None = never)."""
        if self.keep_alive < 0:
            return None
        if self.busy:
            return time.time() + self.keep_alive
        return time.time() + max(0.0, self.last_used + self.keep_alive - time.monotonic())

    def keep(self, keep_alive: float | None) -> None:
        """A request's keep_alive (seconds, <0 forever) rules from now on; None = the configured one."""
        self.keep_alive = self.cfg.keep_alive if keep_alive is None else keep_alive

    def hold(self, keep_alive: float | None) -> None:
        """A request starts: the child stays up until it ends, then for its keep_alive."""
        self.busy += 1
        self.keep(keep_alive)

    def release(self) -> None:
        """A request ended: the idle time counts from now."""
        self.busy -= 1
        self.last_used = time.monotonic()
        self._poke.set()

    async def ensure(self, touch: bool = True) -> str:
        """The base URL of the running server, starting it first if needed (`touch`: a request
        wants it, so its idle time starts over; a restart after a crash does not)."""
        if touch:
            self.last_used = time.monotonic()
        if self.running:
            return self.url  # type: ignore[return-value]
        async with self._lock:
            if not self.running:
                try:
                    await self._start()
                except EngineUnavailable:
                    if not self._port_taken():
                        raise
                    # the free port was taken between our check and the child's bind: once more
                    log.info("managed upstream %s: port %d was taken meanwhile; trying another", self.name,
                             self.port)
                    await self._start()
        if touch:
            self.last_used = time.monotonic()
        return self.url  # type: ignore[return-value]

    async def _start(self) -> None:
        self.port = free_port()
        model_path = str(self.cfg.model_path.expanduser()) if self.cfg.model_path else ""
        argv = substitute(self.cfg.command, self.port, model_path)
        log.info("starting managed upstream %s: %s", self.name, " ".join(argv))
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env={**os.environ, **self.cfg.env}, start_new_session=True,
                preexec_fn=die_with_parent,
            )
        except OSError as exc:
            self.last_error = f"could not start {argv[0]!r}: {exc.strerror or exc}"
            raise EngineUnavailable(
                f"managed upstream {self.name!r} {self.last_error}; check managed.command in hearth.toml"
            ) from None
        self._stopping = False
        self.tail.clear()
        self._spawn(self._pump_log(self.proc))
        try:
            await self._wait_ready(self.proc, f"http://127.0.0.1:{self.port}")
        except BaseException:  # cancelled (the client left) or failed: no child may outlive its start
            await asyncio.shield(self._kill(self.proc))
            raise
        self.started_at = time.time()
        self._spawn(self._watch(self.proc))
        self._spawn(self._reaper(self.proc))

    async def _wait_ready(self, proc: asyncio.subprocess.Process, url: str) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                break
            if await self.probe(url + self.ready_path):
                self.url = url
                self.last_error = None
                log.info("managed upstream %s is ready at %s (pid %d)", self.name, url, proc.pid)
                return
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.1)  # let the log pump catch the last lines
        code = proc.returncode
        await self._kill(proc)
        why = f"exited with code {code}" if code is not None else \
            f"was not ready within {self.cfg.startup_timeout:g}s (managed.startup_timeout)"
        last = " | ".join(list(self.tail)[-3:]) or "no output"
        self.last_error = f"{why}; last output: {last}"
        raise EngineUnavailable(f"managed upstream {self.name!r} {self.last_error}", retry_after=5)

    def _port_taken(self) -> bool:
        """True when the child's last words say its port was in use (llama-server, vLLM, Ollama)."""
        said = " ".join(self.tail).lower()
        return any(s in said for s in ("address already in use", "couldn't bind", "address in use"))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pump_log(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        child_log = logging.getLogger(f"hearth.upstream.{self.name}")
        rest = b""
        while True:
            data = await proc.stdout.read(65536)  # not readline(): a progress bar redrawn with \r never ends
            lines = (rest + data).replace(b"\r", b"\n").split(b"\n")
            rest = lines.pop() if data else b""
            if len(rest) > MAX_LOG_LINE:  # a line without an end: logged in pieces, never held whole
                lines.append(rest)
                rest = b""
            for line in lines:
                text = line.decode(errors="replace").rstrip()
                if text:
                    self.tail.append(text[:MAX_LOG_LINE])
                    child_log.info("%s", text[:MAX_LOG_LINE])
            if not data:
                return

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        await self._kill(proc)  # its children (e.g. a wrapper's server) must not linger
        if self._stopping or proc is not self.proc:
            return
        self.url = None
        self.last_error = f"exited with code {code} while serving"
        log.warning("managed upstream %s (pid %d) exited with code %s", self.name, proc.pid, code)
        now = time.monotonic()
        self._restarts.append(now)
        while self._restarts and now - self._restarts[0] > RESTART_WINDOW:
            self._restarts.popleft()
        if len(self._restarts) > MAX_RESTARTS:
            log.error("managed upstream %s died %d times in %gs; not restarting until the next request",
                      self.name, len(self._restarts), RESTART_WINDOW)
            return
        await asyncio.sleep(min(2 ** (len(self._restarts) - 1), 30))
        if self.url is None and not self._stopping:
            log.info("restarting managed upstream %s", self.name)
            try:
                await self.ensure(touch=False)
            except EngineUnavailable as exc:
                log.error("%s", exc.message)

    async def _reaper(self, proc: asyncio.subprocess.Process) -> None:
        while proc is self.proc and proc.returncode is None:
            wait = 5.0 if self.keep_alive < 0 else min(max(self.keep_alive / 4, 0.1), 5.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), wait)
            self._poke.clear()
            idle = time.monotonic() - self.last_used
            if self.keep_alive >= 0 and self.busy == 0 and idle >= self.keep_alive and proc is self.proc:
                log.info("managed upstream %s idle for %.0fs (keep_alive); stopping it", self.name, idle)
                await self.stop()
                return

    async def stop_when_idle(self) -> None:
        """Stop the child once the requests it is serving end (an unload with keep_alive 0)."""
        if self.busy == 0:
            await self.stop()
            return
        self.keep(0.0)  # the reaper stops it when the last request ends
        self._poke.set()

    async def stop(self) -> None:
        """Stop the child now (it starts again on the next request)."""
        self._stopping = True
        self.url = None
        if self.proc is not None:
            await self._kill(self.proc)

    async def close(self) -> None:
        """Stop the child and every helper task."""
        await self.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        """Stop the child's whole process group, stragglers included (a wrapper that
        died may leave its server behind)."""
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        if proc.returncode is None:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                log.warning("managed upstream %s did not stop on SIGTERM; killing it", self.name)
        await asyncio.sleep(0.2)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if proc.returncode is None:
            await proc.wait()
