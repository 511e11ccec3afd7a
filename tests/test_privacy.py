"""Secure defaults and privacy you can check: bind refusal, `hearth privacy`, and a no-egress guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from hearth.cli.keys import require_admin_key
from hearth.settings import Settings
from hearth.store.db import open_database
from hearth.store.keys import KeyStore
from hearth.store.usage import UsageRow, UsageStore
from tests.conftest import free_port, share_models, start_server, stop_server

# Loaded into every Python process of the server (PYTHONPATH): logs each outbound connection and
# refuses any that is not loopback or a Unix socket, before a packet can leave.
GUARD = textwrap.dedent('''
    import ipaddress, os, socket

    LOG = os.environ["HEARTH_EGRESS_LOG"]

    def _note(kind, where):
        with open(LOG, "a") as fh:
            fh.write(f"{os.getpid()} {kind} {where!r}\\n")

    def _loopback(host):
        host = str(host).strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            return False

    def _check(address, family=None):
        if isinstance(address, (str, bytes)) or family == socket.AF_UNIX:
            return  # Unix socket: stays on this machine
        if not _loopback(address[0]):
            _note("BLOCKED", address)
            raise PermissionError(f"egress guard: connection to {address!r} refused")
        _note("allowed", address)

    _connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex

    def connect(self, address):
        _check(address, self.family)
        return _connect(self, address)

    def connect_ex(self, address):
        _check(address, self.family)
        return _connect_ex(self, address)

    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
    _getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and not _loopback(host if isinstance(host, str) else host.decode()):
            _note("BLOCKED-dns", host)
            raise PermissionError(f"egress guard: name lookup of {host!r} refused")
        return _getaddrinfo(host, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo
    try:  # uvloop connects in libuv, not through socket.connect: guard its entry points too
        import uvloop

        _cc, _sc = uvloop.Loop.create_connection, uvloop.Loop.sock_connect

        async def create_connection(self, protocol_factory, host=None, port=None, **kw):
            if host is not None:
                _check((host, port))
            return await _cc(self, protocol_factory, host, port, **kw)

        async def sock_connect(self, sock, address):
            _check(address, sock.family)
            return await _sc(self, sock, address)

        uvloop.Loop.create_connection, uvloop.Loop.sock_connect = create_connection, sock_connect
    except ImportError:
        pass  # no uvloop: asyncio goes through socket.connect, guarded above
''')


def guard_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """Environment that loads the guard into Python processes; returns it and the log path."""
    site = tmp_path / "guard"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "egress.log"
    log.write_text("")
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "HEARTH_EGRESS_LOG": str(log)}, log


def cli_env(home: Path) -> dict[str, str]:
    """The CLI on `home` with no server to ask (a port nothing listens on): it reads the home itself."""
    return {**os.environ, "HEARTH_HOME": str(home), "HEARTH_CONFIG": str(home / "hearth.toml"),
            "HEARTH_PORT": str(free_port())}


def test_guard_catches_what_it_should(tmp_path: Path) -> None:
    env, log = guard_env(tmp_path)
    port = free_port()
    script = textwrap.dedent(f'''
        import asyncio, socket
        srv = socket.socket(); srv.bind(("127.0.0.1", {port})); srv.listen()
        socket.create_connection(("127.0.0.1", {port})).close()
        for target in [("192.0.2.1", 80), ("2001:db8::1", 80)]:
            try:
                socket.create_connection(target, timeout=1)
            except PermissionError:
                print("refused", target[0])
        try:
            socket.getaddrinfo("example.com", 443)
        except PermissionError:
            print("refused dns")
        import uvloop
        async def main():
            try:
                await asyncio.open_connection("192.0.2.1", 80)
            except PermissionError:
                print("refused uvloop")
        uvloop.run(main())
    ''')
    out = subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:4] == ["refused 192.0.2.1", "refused 2001:db8::1", "refused dns", "refused uvloop"]
    text = log.read_text()
    assert f"allowed ('127.0.0.1', {port})" in text and text.count("BLOCKED") == 4


@pytest.mark.model
def test_default_server_connects_to_nothing_outside_loopback(tmp_path: Path, models_cache: Path) -> None:
    env, log = guard_env(tmp_path)
    home = tmp_path / "home"
    share_models(home, models_cache)
    server = start_server(home, env={**env, "HEARTH_SLOTS": "2"}, timeout=300)
    try:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                     "max_tokens": 8})
            assert r.status_code == 200, r.text
            assert c.post("/v1/embeddings", json={"model": "embed", "input": "hello"}).status_code == 200
            assert c.get("/v1/models").status_code == 200
            assert c.get("/api/tags").status_code == 200
            assert c.post("/api/chat", json={"model": "main", "stream": False, "options": {"num_predict": 4},
                                             "messages": [{"role": "user", "content": "Hi"}]}).status_code == 200
            for path in ("/", "/ui/", "/health", "/metrics"):
                assert c.get(path).status_code < 500, path
    finally:
        stop_server(server)
    text = log.read_text()
    assert "BLOCKED" not in text, text
    assert "allowed" in text or text == ""  # only loopback (or nothing at all) was contacted


def test_non_loopback_bind_without_admin_key_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "hearth.toml").write_text("")
    out = subprocess.run([sys.executable, "-m", "hearth", "serve", "--fake", "--host", "0.0.0.0", "--port",
                          str(free_port())], env=cli_env(home), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "refusing to listen on 0.0.0.0" in out.stderr and "--create-admin-key" in out.stderr
    assert not KeyStore(open_database(home / "hearth.db")).any_keys()
    # a user key is not enough
    subprocess.run([sys.executable, "-m", "hearth", "keys", "create", "u"], env=cli_env(home), check=True,
                   capture_output=True, timeout=60)
    out = subprocess.run([sys.executable, "-m", "hearth", "serve", "--fake", "--host", "0.0.0.0", "--port",
                          str(free_port())], env=cli_env(home), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no admin key exists" in out.stderr


def test_create_admin_key_prints_it_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(home=tmp_path / "h", host="0.0.0.0")
    assert require_admin_key(settings, create=True) is None
    secret = next(line.strip() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("hk-"))
    store = KeyStore(open_database(settings.db_path))
    key = store.verify(secret)
    assert key is not None and key.role == "admin"
    assert require_admin_key(settings, create=True) is None  # already there: nothing new
    assert "hk-" not in capsys.readouterr().out and len(store.list()) == 1
    assert require_admin_key(Settings(home=tmp_path / "other", host="127.0.0.1"), create=False) is None


def test_admin_key_created_at_start_is_required_over_http(tmp_path: Path) -> None:
    server = start_server(tmp_path / "home", "--fake", timeout=30)
    try:
        assert httpx.get(server.v1 + "/models").status_code == 200
        out = subprocess.run([sys.executable, "-m", "hearth", "keys", "create", "root", "--role", "admin", "--json"],
                             env=cli_env(server.home), capture_output=True, text=True, check=True, timeout=60)
        secret = json.loads(out.stdout)["secret"]
        assert httpx.get(server.v1 + "/models").status_code == 401
        assert httpx.get(server.v1 + "/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    finally:
        stop_server(server)


CLOUD_TOML = '[upstreams.openai]\nkind = "openai"\nurls = ["https://api.openai.com"]\ncloud = true\nmodels = ["g"]\n'


def privacy_json(home: Path) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-m", "hearth", "privacy", "--json"], env=cli_env(home),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize(("extra", "keys", "who"), [
    ("", [], ["(no keys: anyone on this machine)"]),  # nothing is checked: the cloud is open here too
    ("loopback_needs_key = false\n", ["app"],
     ["(without a key: anyone on this machine, loopback_needs_key = false)"]),
    ("", ["app"], []),
])
def test_privacy_report_says_who_on_this_machine_reaches_a_cloud_without_a_key(
        tmp_path: Path, extra: str, keys: list[str], who: list[str]) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "hearth.toml").write_text(extra + CLOUD_TOML)
    for name in keys:
        subprocess.run([sys.executable, "-m", "hearth", "keys", "create", name], env=cli_env(home), check=True,
                       capture_output=True, timeout=60)
    report = privacy_json(home)
    [cloud] = [h for h in report["outbound"] if h["host"] == "api.openai.com"]  # type: ignore[attr-defined]
    assert cloud["keys"] == who and report["local_open"] is bool(who)
    table = subprocess.run([sys.executable, "-m", "hearth", "privacy"], env=cli_env(home), capture_output=True,
                           text=True, timeout=60).stdout
    assert ("any client on this machine may, without a key" in table) is bool(who), table


def test_a_declared_cloud_on_a_loopback_url_is_reported_as_cloud(tmp_path: Path) -> None:
    # e.g. a LiteLLM proxy on this machine in front of a cloud API: the owner said cloud, so it is one
    home = tmp_path / "home"
    home.mkdir()
    (home / "hearth.toml").write_text('[upstreams.proxy]\nkind = "openai"\nurls = ["http://127.0.0.1:4000"]\n'
                                      'cloud = true\nmodels = ["g"]\n')
    subprocess.run([sys.executable, "-m", "hearth", "keys", "create", "app"], env=cli_env(home), check=True,
                   capture_output=True, timeout=60)
    [proxy] = [h for h in privacy_json(home)["outbound"] if "proxy" in h["purpose"]]  # type: ignore[attr-defined]
    assert proxy["cloud"] is True and proxy["keys"] == []  # no --allow-cloud key exists


def test_privacy_report_lists_hosts_cloud_keys_and_cloud_calls(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "hearth.toml").write_text(textwrap.dedent('''
        [upstreams.lan]
        kind = "openai"
        urls = ["http://192.168.1.20:8000"]

        [upstreams.openai]
        kind = "openai"
        urls = ["https://api.openai.com"]
        cloud = true
        models = ["gpt-4o-mini"]
    '''))
    env = cli_env(home)
    for args in (["keys", "create", "local"], ["keys", "create", "roam", "--allow-cloud"]):
        subprocess.run([sys.executable, "-m", "hearth", *args], env=env, check=True, capture_output=True, timeout=60)
    UsageStore(open_database(home / "hearth.db")).record(UsageRow(
        ts=1.0e9, key_id=2, key_name="roam", model="gpt-4o-mini@openai", engine="openai", cloud=True,
        dialect="openai", route="/v1/chat/completions", status=200, prompt_tokens=12, completion_tokens=30,
        cached_tokens=0, ttft_ms=300.0, duration_ms=900.0))
    out = subprocess.run([sys.executable, "-m", "hearth", "privacy", "--json"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    hosts = {h["host"]: h for h in report["outbound"]}
    assert hosts["192.168.1.20"]["cloud"] is False and hosts["192.168.1.20"]["keys"] == ["local", "roam"]
    assert hosts["api.openai.com"]["cloud"] is True and hosts["api.openai.com"]["keys"] == ["roam"]
    assert report["cloud_keys"] == ["roam"] and report["allow_network"] is False
    assert report["cloud_calls"] == [{"key": "roam", "engine": "openai", "requests": 1, "prompt_tokens": 12,
                                      "completion_tokens": 30, "first": 1.0e9, "last": 1.0e9}]
    table = subprocess.run([sys.executable, "-m", "hearth", "privacy"], env=env, capture_output=True, text=True,
                           timeout=60)
    assert "api.openai.com" in table.stdout and "no telemetry" in table.stdout
