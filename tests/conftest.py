"""Shared fixtures: live `hearth serve` subprocesses (fake and real model)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import ollama
import openai
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running `hearth serve` subprocess."""

    url: str
    proc: subprocess.Popen[str]
    home: Path
    log_path: Path

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(home: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Server:
    """Start `hearth serve` and wait for /ready."""
    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / f"serve-{port}.log"
    full_env = {**os.environ, "HEARTH_HOME": str(home), "HEARTH_CONFIG": str(home / "hearth.toml"),
                **(env or {})}
    if not (home / "hearth.toml").exists():
        (home / "hearth.toml").write_text("")
    fh = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hearth", "serve", "--port", str(port), *args],
        stdout=fh, stderr=subprocess.STDOUT, env=full_env, text=True, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"hearth serve exited early:\n{log_path.read_text()}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return Server(url, proc, home, log_path)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(Server(url, proc, home, log_path))
    raise RuntimeError(f"hearth serve did not become ready:\n{log_path.read_text()}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()


@pytest.fixture(scope="session")
def models_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models dir shared by every real-model server of the session (assembled once)."""
    return tmp_path_factory.mktemp("models-cache")


def share_models(home: Path, cache: Path) -> None:
    """Point a server home's models/ at the session cache."""
    home.mkdir(parents=True, exist_ok=True)
    link = home / "models"
    if not link.exists():
        link.symlink_to(cache, target_is_directory=True)


def model_server(tmp_path_factory: pytest.TempPathFactory, cache: Path, name: str,
                 env: dict[str, str]) -> Iterator[Server]:
    """For fixtures: `hearth serve` on the real bundled model with `env`, in a fresh home."""
    home = tmp_path_factory.mktemp(name)
    share_models(home, cache)
    server = start_server(home, env=env)
    yield server
    stop_server(server)


def config_server(tmp_path_factory: pytest.TempPathFactory, name: str, config: str) -> Iterator[Server]:
    """For fixtures: `hearth serve --fake` with `config` as its hearth.toml, in a fresh home."""
    home = tmp_path_factory.mktemp(name)
    (home / "hearth.toml").write_text(config)
    server = start_server(home, "--fake", timeout=60)
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def real_server(tmp_path_factory: pytest.TempPathFactory, models_cache: Path) -> Iterator[Server]:
    """`hearth serve` on the real bundled model (session-wide)."""
    yield from model_server(tmp_path_factory, models_cache, "real-home", {"HEARTH_SLOTS": "8"})


@pytest.fixture(scope="session")
def openai_real(real_server: Server) -> openai.OpenAI:
    """The real openai client on the real-model server (no retries, a slow-machine timeout)."""
    return openai.OpenAI(base_url=real_server.v1, api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def ollama_real(real_server: Server) -> ollama.Client:
    """The real ollama client on the real-model server."""
    return ollama.Client(host=real_server.url, timeout=120)


@pytest.fixture
def fake_server(tmp_path: Path) -> Iterator[Server]:
    """`hearth serve --fake` (instant scripted engine)."""
    server = start_server(tmp_path / "home", "--fake", timeout=30)
    yield server
    stop_server(server)
