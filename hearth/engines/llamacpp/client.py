"""The gateway's handle on one worker process: spawn, talk, notice death.

If the worker dies (segfault, kill -9), every request in flight gets an
`EngineUnavailable` error and the handle is marked dead; the engine starts a
new worker for the next request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hearth.core.errors import EngineUnavailable
from hearth.engines.llamacpp.ipc import pack, read_message

log = logging.getLogger("hearth.engine.llamacpp")


@dataclass(slots=True)
class WorkerArgs:
    """How to start a worker."""

    model_path: str
    slots: int
    ctx: int
    batch: int
    threads: int
    prefill_chunk: int = 256
    deterministic: bool = True


class WorkerClient:
    """One running worker process and the requests waiting on it."""

    def __init__(self, name: str, args: WorkerArgs) -> None:
        self.name = name
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reader_task: asyncio.Task[None] | None = None
        self.log_task: asyncio.Task[None] | None = None
        self.inboxes: dict[str, asyncio.Queue[tuple[Any, ...]]] = {}
        self.info: dict[str, Any] = {}
        self.alive = False
        self.ids = itertools.count()
        self.load_seconds = 0.0
        self.stopping = False
        self.on_death: Callable[[], None] | None = None
        self.restarts = 0

    async def start(self) -> dict[str, Any]:
        """Spawn the worker and wait until its model is loaded."""
        t0 = time.perf_counter()
        ours, theirs = socket.socketpair()
        a = self.args
        cmd = [
            sys.executable, "-m", "hearth.engines.llamacpp.worker",
            "--fd", str(theirs.fileno()), "--model", a.model_path, "--slots", str(a.slots),
            "--ctx", str(a.ctx), "--batch", str(a.batch), "--threads", str(a.threads),
            "--prefill-chunk", str(a.prefill_chunk),
        ]
        if not a.deterministic:
            cmd.append("--fast")
        self.proc = await asyncio.create_subprocess_exec(
            *cmd, pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        theirs.close()
        reader, self.writer = await asyncio.open_unix_connection(sock=ours)
        self.log_task = asyncio.ensure_future(self._pipe_log())
        try:
            first = await read_message(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            await self.proc.wait()
            raise EngineUnavailable(
                f"engine worker for {self.name} exited while loading (code {self.proc.returncode}); see the log"
            ) from None
        if first[0] != "ready":
            raise EngineUnavailable(f"engine worker for {self.name} could not load the model: {first[1]}")
        self.info = first[1]
        self.alive = True
        self.load_seconds = time.perf_counter() - t0
        self.reader_task = asyncio.ensure_future(self._read(reader))
        log.info("engine worker for %s ready in %.2fs (pid %d)", self.name, self.load_seconds, self.proc.pid)
        return self.info

    async def _pipe_log(self) -> None:
        assert self.proc and self.proc.stdout
        async for line in self.proc.stdout:
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                log.warning("[worker %s] %s", self.name, text)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                msg = await read_message(reader)
                box = self.inboxes.get(msg[1])
                if box is not None:
                    box.put_nowait(msg)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.alive = False
            code = await self.proc.wait() if self.proc else None
            if self.inboxes:
                log.error("engine worker for %s died (exit %s); failing %d request(s)",
                          self.name, code, len(self.inboxes))
            for rid, box in list(self.inboxes.items()):
                box.put_nowait(("dead", rid, code))
            if not self.stopping and self.on_death is not None:
                self.on_death()

    def new_id(self) -> str:
        return f"r{next(self.ids)}"

    def open(self, rid: str) -> asyncio.Queue[tuple[Any, ...]]:
        box: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.inboxes[rid] = box
        return box

    def close_box(self, rid: str) -> None:
        self.inboxes.pop(rid, None)

    def send(self, *msg: Any) -> None:
        if not self.alive or self.writer is None:
            raise EngineUnavailable(f"engine worker for {self.name} is not running; retry shortly", retry_after=1)
        self.writer.write(pack(msg))

    @property
    def outstanding(self) -> int:
        return len(self.inboxes)

    async def stop(self) -> None:
        """Ask the worker to exit; kill it if it does not."""
        self.stopping = True
        if self.proc is None:
            return
        if self.alive and self.writer is not None:
            try:
                self.writer.write(pack(("quit",)))
                await self.writer.drain()
            except ConnectionError:
                pass
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        for task in (self.reader_task, self.log_task):
            if task:
                task.cancel()
        if self.writer is not None:
            self.writer.close()
        self.alive = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def kill(self) -> None:
        """Hard kill (tests of the crash contract use os.kill directly too)."""
        if self.proc and self.proc.returncode is None:
            os.kill(self.proc.pid, 9)
