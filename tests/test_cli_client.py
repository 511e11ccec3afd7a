"""The CLI as a client of the server: one-line errors for bad URLs, foreign servers and keys; usage and
privacy from the running server; tables; the serve banner; the home setting."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import Server, free_port, start_server, stop_server


def run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "HEARTH_HOME": str(tmp_path / "cli-home"), "HEARTH_CONFIG": str(tmp_path / "cli.toml"),
            **env}
    (tmp_path / "cli.toml").write_text("")
    return subprocess.run([sys.executable, "-m", "hearth", *args], env=full, capture_output=True, text=True,
                          timeout=60)


def one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "hearth: error: " in proc.stderr, proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr


@pytest.fixture
def html_server() -> Iterator[str]:
    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = b"<html>a router's admin page</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def banner_service() -> Iterator[str]:
    """Not HTTP at all: greets with an SSH banner."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            conn.sendall(b"SSH-2.0-OpenSSH_8.9\r\n")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def test_bad_urls_and_foreign_servers_are_one_line(tmp_path: Path, html_server: str, banner_service: str) -> None:
    one_line_error(run(tmp_path, "ps", "--url", "foo"), "is not a URL")
    one_line_error(run(tmp_path, "ps", "--url", html_server), "did not answer like a hearth server")
    one_line_error(run(tmp_path, "upstreams", "--url", banner_service), "hearth server")
    one_line_error(run(tmp_path, "ps", "--url", html_server, "--api-key", "hk-abc\u2026"), "paste the whole key")


@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[tuple[Server, str]]:
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "hearth.toml").write_text("loopback_needs_key = true\n")
    server = start_server(tmp_path / "srv", "--fake", timeout=30)
    env = {**os.environ, "HEARTH_HOME": str(server.home), "HEARTH_CONFIG": str(server.home / "hearth.toml")}
    out = subprocess.run([sys.executable, "-m", "hearth", "keys", "create", "app", "--json"], env=env,
                         capture_output=True, text=True, check=True).stdout
    yield server, json.loads(out)["secret"]
    stop_server(server)


def test_a_missing_or_weak_key_gets_the_envelope_message_and_a_key_hint(tmp_path: Path,
                                                                        keyed: tuple[Server, str]) -> None:
    server, user_key = keyed
    missing = run(tmp_path, "upstreams", "--url", server.url)
    one_line_error(missing, "answered HTTP 401: this server needs an API key", "hint: pass an admin key")
    assert '{"error"' not in missing.stderr
    weak = run(tmp_path, "usage", "--url", server.url, "--api-key", user_key)
    one_line_error(weak, "HTTP 403", "needs an admin key")
    port = server.url.rsplit(":", 1)[1]  # the owner on this machine, no --url: the database itself
    own = run(tmp_path, "usage", "--json", HEARTH_PORT=port, HEARTH_HOME=str(server.home))
    assert own.returncode == 0 and "wants a key" in own.stderr
    assert {r["key"] for r in json.loads(own.stdout)["rows"]} == {"app"}  # the 403 above, read locally
    env = {**os.environ, "HEARTH_HOME": str(server.home), "HEARTH_CONFIG": str(server.home / "hearth.toml")}
    slow = json.loads(subprocess.run([sys.executable, "-m", "hearth", "keys", "create", "slow", "--rpm", "1",
                                      "--json"], env=env, capture_output=True, text=True, check=True).stdout)
    assert run(tmp_path, "ps", "--url", server.url, "--api-key", slow["secret"]).returncode == 0
    over = run(tmp_path, "ps", "--url", server.url, "--api-key", slow["secret"])  # the second in a minute
    one_line_error(over, "HTTP 429", "over its request or token limit")


def test_usage_and_privacy_come_from_the_running_server(tmp_path: Path) -> None:
    """The server's config is what counts: here it has an upstream the CLI's own config does not."""
    home = tmp_path / "srv"
    home.mkdir()
    (home / "hearth.toml").write_text('[upstreams.box]\nkind = "openai"\nurls = ["http://127.0.0.1:9"]\n'
                                      'models = ["m"]\n')
    server = start_server(home, "--fake", timeout=30)
    try:
        privacy = run(tmp_path, "privacy", "--url", server.url, "--json")
        assert privacy.returncode == 0, privacy.stderr
        assert any(h["url"] == "http://127.0.0.1:9" for h in json.loads(privacy.stdout)["outbound"])
        usage = run(tmp_path, "usage", "--url", server.url, "--by", "model", "--since", "1h", "--json")
        assert usage.returncode == 0 and json.loads(usage.stdout)["by"] == "model", usage.stderr
    finally:
        stop_server(server)
    alone = run(tmp_path, "privacy", "--json", HEARTH_PORT=str(free_port()))  # no server: this machine's database
    assert alone.returncode == 0 and "read this machine's database" in alone.stderr
    assert not any(h["url"] == "http://127.0.0.1:9" for h in json.loads(alone.stdout)["outbound"])


def test_an_unusable_home_or_database_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a folder")
    one_line_error(run(tmp_path, "usage", HEARTH_HOME=str(tmp_path / "afile"), HEARTH_PORT=str(free_port())),
                   "afile")
    home = tmp_path / "garbage"
    home.mkdir()
    (home / "hearth.db").write_bytes(b"this is not sqlite at all" * 100)
    one_line_error(run(tmp_path, "keys", "list", HEARTH_HOME=str(home)), "database cannot be used")
    with pytest.raises(sqlite3.DatabaseError):  # the premise: it really is not a database
        sqlite3.connect(str(home / "hearth.db")).execute("SELECT 1 FROM sqlite_master")


def test_home_expands_tilde_and_an_empty_value_is_the_default(tmp_path: Path) -> None:
    shown = run(tmp_path, "config", "--json", HOME=str(tmp_path), HEARTH_HOME="~/hh")
    home = next(r for r in json.loads(shown.stdout)["settings"] if r["setting"] == "home")
    assert home["value"] == str(tmp_path / "hh"), home
    empty = run(tmp_path, "config", "--json", HOME=str(tmp_path), HEARTH_HOME="")
    assert next(r for r in json.loads(empty.stdout)["settings"] if r["setting"] == "home")["value"] not in ("", ".")


def test_tables_pad_wide_characters_and_pipes_get_whole_lines(capsys: pytest.CaptureFixture[str]) -> None:
    from hearth.cli.table import print_table, width

    print_table(["NAME", "N"], [["fake:latest", "3"], ["模型-one", "1"], ["x" * 250, "2"]])
    lines = capsys.readouterr().out.splitlines()
    assert width("模型-one") == 8
    assert width(lines[1][:lines[1].index("3")]) == width(lines[2][:lines[2].index("1")])  # aligned on screen
    assert lines[3].endswith("…  2")  # a long cell is cut with a mark, the line itself is not cut


def test_banner_and_ps_sizes() -> None:
    from hearth.cli.ps import megabytes
    from hearth.cli.serve import banner
    from hearth.settings import Settings

    text = banner(Settings(fake=True, default_model="fake-embed:latest", host="::1"), 8080)
    assert "http://[::1]:8080/v1" in text and '"model": "fake-embed:latest"' in text
    assert '"model": "fake:latest"' in banner(Settings(fake=True), 8080)
    assert '"max_tokens": 64' in text and "Authorization" not in text  # a base model would fill its context
    assert 'Authorization: Bearer $HEARTH_API_KEY' in banner(Settings(fake=True), 8080, needs_key=True)
    assert [megabytes(n) for n in (0, 1024, 291_000_000, 5_400_000_000)] == ["-", "<1 MB", "291 MB", "5.4 GB"]


def test_keys_cli_takes_comma_separated_models_and_says_when_all_were_revoked(tmp_path: Path) -> None:
    made = run(tmp_path, "keys", "create", "t1", "--models", "llama*,embed", "--json")
    assert json.loads(made.stdout)["key"]["models"] == ["llama*", "embed"], made.stderr
    assert json.loads(run(tmp_path, "keys", "create", "t2", "--models", "a*", "b", "--json").stdout)["key"][
        "models"] == ["a*", "b"]
    for name in ("t1", "t2"):
        assert run(tmp_path, "keys", "revoke", name).returncode == 0
    listed = run(tmp_path, "keys", "list")
    assert "no live keys" in listed.stdout and "still asks for one" in listed.stdout, listed.stdout
