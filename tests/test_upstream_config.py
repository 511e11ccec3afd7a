"""Upstream and alias configuration: each mistake stops startup with one readable line.

No test here contacts a cloud address: cloud upstreams are only validated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from hearth.core.privacy import is_cloud_url
from tests.conftest import Server, free_port, start_server, stop_server

LOCAL = "http://127.0.0.1:9"  # discard port: nothing answers, nothing leaves the box


def serve_with(tmp_path: Path, toml: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `hearth serve --fake` with `toml`; it must exit (not serve)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    (home / "hearth.toml").write_text(toml)
    full_env = {**os.environ, "HEARTH_HOME": str(home), "HEARTH_CONFIG": str(home / "hearth.toml"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "hearth", "serve", "--fake", "--port", str(free_port())],
        capture_output=True, text=True, env=full_env, timeout=60,
    )


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single `hearth: error:` line of a refused startup (and no traceback)."""
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hearth: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_unknown_kind(tmp_path: Path) -> None:
    line = one_error_line(serve_with(tmp_path, f'[upstreams.gpu]\nkind = "vllm"\nurls = ["{LOCAL}"]\n'))
    assert "upstreams.gpu.kind" in line and "'openai' or 'ollama'" in line and "vllm" in line


@pytest.mark.parametrize(("table", "where", "meant"), [
    (f'[upstreams.gpu]\nkind = "openai"\nurl = "{LOCAL}"\n', "upstreams.gpu.url", "urls"),
    (f'[upstreams.gpu]\nkind = "openai"\nurls = ["{LOCAL}"]\ntimeouts = {{ conect = 3 }}\n',
     "upstreams.gpu.timeouts.conect", "connect"),
    (f'[upstreams.gpu]\nkind = "openai"\nurls = ["{LOCAL}"]\nmodels = [{{ nam = "x" }}]\n',
     "upstreams.gpu.models.0.nam", "name"),
    ('[upstreams.ls]\nkind = "openai"\nmodels = ["m"]\n[upstreams.ls.managed]\ncomand = ["x"]\n',
     "upstreams.ls.managed.comand", "command"),  # not the "command: field required" it causes
])
def test_a_misspelt_key_names_the_key_it_resembles(tmp_path: Path, table: str, where: str, meant: str) -> None:
    line = one_error_line(serve_with(tmp_path, table))
    assert f"'{where}'" in line and f"did you mean '{meant}'?" in line, line


@pytest.mark.parametrize("url", ["http://[::1:8000", "http://127.0.0.1:99999", "http://:8000"])
def test_a_malformed_url_is_one_line(tmp_path: Path, url: str) -> None:
    line = one_error_line(serve_with(tmp_path, f'[upstreams.gpu]\nkind = "openai"\nurls = ["{url}"]\n'))
    assert "[upstreams.gpu]" in line and "http://host:port" in line, line


def test_cloud_url_needs_cloud_true(tmp_path: Path) -> None:
    toml = '[upstreams.oa]\nkind = "openai"\nurls = ["https://api.openai.com"]\napi_key_env = "X"\n'
    line = one_error_line(serve_with(tmp_path, toml, env={"X": "sk-test"}))
    assert "[upstreams.oa]" in line and "api.openai.com" in line and "cloud = true" in line


@pytest.mark.parametrize("url", ["https://api\u3002openai\u3002com", "http://\uff18\u3002\uff18\u3002\uff18\u3002\uff18"])
def test_a_host_in_unicode_dots_is_refused_not_taken_for_a_lan_name(tmp_path: Path, url: str) -> None:
    # the resolver folds these to api.openai.com and 8.8.8.8: no dot seen here must not mean "LAN name"
    assert is_cloud_url(url)
    line = one_error_line(serve_with(tmp_path, f'[upstreams.oa]\nkind = "openai"\nurls = ["{url}"]\nmodels = ["m"]\n'))
    assert "[upstreams.oa]" in line and "not plain ASCII" in line, line
    assert "api.openai.com" in line or "8.8.8.8" in line, line


@pytest.mark.parametrize("url", ["http://bob:hunter2@127.0.0.1:9", "http://bob:hunter2@127.0.0.1:99999",
                                 "htttp://bob:hunter2@10.0.0.1", "http://bob:hunter2@:8000"])
def test_a_url_with_credentials_is_refused_without_echoing_them(tmp_path: Path, url: str) -> None:
    toml = f'[upstreams.nas]\nkind = "openai"\nurls = ["{url}"]\nmodels = ["m"]\n'
    line = one_error_line(serve_with(tmp_path, toml))
    assert "[upstreams.nas]" in line and "hunter2" not in line, line


@pytest.mark.parametrize("toml", [
    '[upstreams.x]\nkind = "openai"\nmodels = ["m"]\n[upstreams.x.managed]\nenv = { HF_TOKEN = "hf_SECRET5" }\n',
    '[upstreams.x]\nurls = ["http://127.0.0.1:9"]\ntoken = "hf_SECRET5"\n',  # no kind: "Field required"
    '[upstreams.x]\nkind = "openai"\nurls = ["http://127.0.0.1:9"]\napi_key_env = "hf_SECRET5-x"\n',
])
def test_secrets_around_a_config_error_are_not_echoed(tmp_path: Path, toml: str) -> None:
    proc = serve_with(tmp_path, toml)
    one_error_line(proc)
    assert "SECRET5" not in proc.stderr + proc.stdout, proc.stderr


def test_a_key_written_in_the_config_is_not_echoed(tmp_path: Path) -> None:
    toml = f'[upstreams.a]\nkind = "openai"\nurls = ["{LOCAL}"]\napi_key = "sk-live-SECRET123"\n'
    proc = serve_with(tmp_path, toml)
    line = one_error_line(proc)
    assert "upstreams.a.api_key" in line and "api_key_env" in line, line
    assert "SECRET123" not in proc.stderr + proc.stdout


def test_a_key_that_cannot_go_in_a_header_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("sk-test\u200bkey\n")  # a zero-width space pasted with it
    toml = f'[upstreams.a]\nkind = "openai"\nurls = ["{LOCAL}"]\nmodels = ["m"]\napi_key_file = "{tmp_path / "key"}"\n'
    proc = serve_with(tmp_path, toml)
    line = one_error_line(proc)
    assert "api_key_file" in line and "0x200b" in line and "position 8" in line, line
    assert "sk-test" not in proc.stderr


def test_a_key_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "key").write_bytes("sk-test-key".encode("utf-16"))  # as some editors save it
    toml = f'[upstreams.a]\nkind = "openai"\nurls = ["{LOCAL}"]\nmodels = ["m"]\napi_key_file = "{tmp_path / "key"}"\n'
    line = one_error_line(serve_with(tmp_path, toml))
    assert "not UTF-8" in line and "plain text" in line, line


@pytest.mark.parametrize(("toml", "env"), [('default_model = "nope"\n', {}), ("", {"HEARTH_DEFAULT_MODEL": ""})])
def test_a_default_model_pointing_nowhere_stops_startup(tmp_path: Path, toml: str, env: dict[str, str]) -> None:
    line = one_error_line(serve_with(tmp_path, toml, env=env))
    assert "default_model" in line, line


def test_alias_to_an_undeclared_upstream(tmp_path: Path) -> None:
    line = one_error_line(serve_with(tmp_path, '[aliases]\nmain = "llama3.1:70b@gpu-box"\n'))
    assert "alias 'main'" in line and "no upstream 'gpu-box'" in line


def test_alias_pointing_nowhere(tmp_path: Path) -> None:
    line = one_error_line(serve_with(tmp_path, '[aliases]\nfast = "no-such-model"\n'))
    assert "alias 'fast'" in line and "no-such-model" in line and "no engine serves" in line


def test_alias_to_a_model_the_upstream_does_not_list(tmp_path: Path) -> None:
    toml = f'[upstreams.box]\nkind = "openai"\nurls = ["{LOCAL}"]\nmodels = ["a"]\n[aliases]\nmain = "b@box"\n'
    line = one_error_line(serve_with(tmp_path, toml))
    assert "lists only a" in line


def test_embedding_dimension_mismatch(tmp_path: Path) -> None:
    line = one_error_line(serve_with(tmp_path, '[aliases.embed]\ntarget = "fake"\ndimension = 1024\n'))
    assert "requires 1024-dimensional" in line and "gives 16" in line and "dimension = 16" in line


def test_missing_api_key_env(tmp_path: Path) -> None:
    toml = f'[upstreams.box]\nkind = "openai"\nurls = ["{LOCAL}"]\napi_key_env = "HEARTH_TEST_NO_SUCH_KEY"\n'
    line = one_error_line(serve_with(tmp_path, toml))
    assert "HEARTH_TEST_NO_SUCH_KEY" in line and "not set" in line


def test_managed_needs_models(tmp_path: Path) -> None:
    toml = '[upstreams.ls]\nkind = "openai"\nmanaged = { command = ["llama-server", "--port", "{port}"] }\n'
    line = one_error_line(serve_with(tmp_path, toml))
    assert "managed but lists no models" in line


@pytest.mark.parametrize(
    ("url", "cloud"),
    [
        ("http://127.0.0.1:8080", False), ("http://localhost:11434", False), ("http://[::1]:8000", False),
        ("http://10.1.2.3", False), ("http://192.168.1.20:8000", False), ("http://169.254.1.1", False),
        ("http://gpu-box:8000", False), ("http://gpu.lan", False), ("http://nas.local:8080", False),
        ("https://api.openai.com", True), ("http://8.8.8.8", True), ("https://example.com:443", True),
        ("http://[2001:4860::1]", True),
        # numbers the resolver reads as IPv4 (8.8.8.8, 127.0.0.1, 10.0.0.1 as 8.0.0.1 in octal)
        ("http://134744072", True), ("http://0x08080808", True), ("http://8.8.2056", True),
        ("http://2130706433", False), ("http://010.0.0.1", True), ("http://10.1", False),
        # private by Python's table, yet public: Teredo tunnels to the internet; documentation ranges
        ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]", True), ("http://192.0.2.1", True),
        ("http://[fd12::1]", False), ("http://[fe80::1]", False), ("http://[::ffff:10.0.0.1]", False),
        ("http://[::ffff:8.8.8.8]", True), ("http://172.31.0.1", False), ("http://172.32.0.1", True),
    ],
)
def test_cloud_classification(url: str, cloud: bool) -> None:
    assert is_cloud_url(url) is cloud


def test_cloud_upstream_allowed_only_by_qualified_name(tmp_path: Path) -> None:
    """Declared models, no health checks: starting does not contact the cloud address."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "hearth.toml").write_text(
        '[upstreams.cloudy]\nkind = "openai"\nurls = ["https://api.example.com"]\ncloud = true\n'
        'api_key_file = "' + str(tmp_path / "key") + '"\nmodels = ["fake"]\n'
    )
    (tmp_path / "key").write_text("sk-secret-value\n")
    server = start_server(home, "--fake", timeout=30)
    try:
        ids = [m["id"] for m in httpx.get(server.v1 + "/models").json()["data"]]
        assert "fake@cloudy" in ids
        # The bare name is the local fake model, never the cloud one of the same name.
        r = httpx.post(server.v1 + "/chat/completions",
                       json={"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "fake"
        assert "sk-secret-value" not in server.log()
    finally:
        stop_server(server)


def managed_server(tmp_path: Path, command: list[str], extra: str = "") -> Server:
    """`hearth serve --fake` with a managed upstream `ls` (model "x") running `command`, ready at "/"."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    argv = ", ".join(json.dumps(a) for a in command)  # TOML basic strings
    (home / "hearth.toml").write_text(f'[upstreams.ls]\nkind = "openai"\nmodels = ["x"]\n'
                                      f'managed = {{ command = [{argv}], ready_path = "/"{extra} }}\n')
    return start_server(home, "--fake", timeout=30)


def script_server(tmp_path: Path, script: str, extra: str = "") -> Server:
    """`managed_server` whose child is a Python `script` (argv[1]: its port)."""
    return managed_server(tmp_path, [sys.executable, "-c", script, "{port}"], extra)


def chat_x(server: Server) -> httpx.Response:
    return httpx.post(server.v1 + "/chat/completions", timeout=40,
                      json={"model": "x", "messages": [{"role": "user", "content": "hi"}]})


@pytest.mark.parametrize(("command", "said"), [
    ([sys.executable, "-c", "import sys; print('error: model file not found'); sys.exit(3)", "{port}"],
     "exited with code 3; last output: error: model file not found"),
    (["/nonexistent/llama-server", "--port", "{port}"], "could not start '/nonexistent/llama-server'"),
])
def test_a_managed_upstream_that_fails_to_start_says_why(tmp_path: Path, command: list[str], said: str) -> None:
    """The request gets a 503 with the reason, and `hearth upstreams` keeps showing it."""
    server = managed_server(tmp_path, command)
    try:
        r = chat_x(server)
        assert r.status_code == 503 and said in r.json()["error"]["message"], r.text
        out = subprocess.run([sys.executable, "-m", "hearth", "upstreams", "--url", server.url, "--json"],
                             capture_output=True, text=True, timeout=30)
        [ls] = json.loads(out.stdout)["upstreams"]
        assert [(rep["healthy"], said in (rep["last_error"] or "")) for rep in ls["replicas"]] == [(False, True)], ls
    finally:
        stop_server(server)


def test_a_managed_upstream_whose_port_was_taken_meanwhile_starts_on_another(tmp_path: Path) -> None:
    """The free port is picked before the child binds it; another process may take it in between."""
    marker = tmp_path / "tried"
    script = (f"import sys, pathlib, http.server\nm = pathlib.Path({str(marker)!r})\n"
              "if not m.exists():\n    m.write_text('x')\n"
              "    print('start: couldn\\'t bind HTTP server socket, hostname: 127.0.0.1', flush=True)\n"
              "    sys.exit(1)\n"
              "http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), "
              "http.server.SimpleHTTPRequestHandler).serve_forever()\n")
    server = script_server(tmp_path, script)
    try:
        r = chat_x(server)  # the child answers no chat (a plain file server), but it was started: not a 503
        assert r.status_code != 503, r.text
        assert "was taken meanwhile; trying another" in server.log() and "is ready at" in server.log()
    finally:
        stop_server(server)


@pytest.mark.parametrize(("table", "said"), [
    ('[upstreams.ls]\nkind = "openai"\nmodels = ["m"]\nmanaged = { command = ["llama-server", "--port", "8080"] }\n',
     "command has no {port}"),
    ('[upstreams.ls]\nkind = "openai"\nmodels = ["m"]\n'
     'managed = { command = ["llama-server", "-m", "{model_path}", "--port", "{port}"] }\n',
     "model_path is not set"),
    ('[upstreams.ls]\nkind = "openai"\nmodels = ["m"]\n'
     'managed = { command = ["llama-server", "--port", "{port}"], ready_path = "health" }\n',
     "must start with '/'"),
    (f'[upstreams.local]\nkind = "openai"\nurls = ["{LOCAL}"]\n', "the in-box engine's name"),
])
def test_a_managed_or_named_upstream_that_cannot_work_is_refused_at_startup(
        tmp_path: Path, table: str, said: str) -> None:
    line = one_error_line(serve_with(tmp_path, table))
    assert said in line, line


def test_an_alias_may_name_the_in_box_engine(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "hearth.toml").write_text('[aliases]\nfast = "fake@fake"\n')
    server = start_server(home, "--fake", timeout=30)
    try:
        r = httpx.post(server.v1 + "/chat/completions", timeout=30,
                       json={"model": "fast", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200, r.text
    finally:
        stop_server(server)


def test_a_client_leaving_while_the_child_starts_leaves_no_child_behind(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(600)\n"
    server = script_server(tmp_path, script)
    try:
        with pytest.raises(httpx.ReadTimeout):  # the child never gets ready; the client gives up
            httpx.post(server.v1 + "/embeddings", json={"model": "x", "input": "a"}, timeout=1.5)
        deadline = time.monotonic() + 10
        while not pid_file.exists() and time.monotonic() < deadline:  # a loaded machine starts it late
            time.sleep(0.1)
        pid = int(pid_file.read_text())
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.1)
        assert not alive(pid), "the child of an abandoned start is still running"
    finally:
        stop_server(server)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:  # a zombie is dead
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_a_child_log_line_without_an_end_does_not_stall_it(tmp_path: Path) -> None:
    # a progress bar redrawn with \r never prints a newline; the pipe must keep being read
    script = ("import sys, http.server\nfor i in range(4000):\n    sys.stdout.write(f'\\rloading {i:06d} ' + 'x' * 40)\n"
              "sys.stdout.flush()\nprint('listening', flush=True)\n"
              "http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), "
              "http.server.SimpleHTTPRequestHandler).serve_forever()\n")
    server = script_server(tmp_path, script, ', startup_timeout = 20')
    try:
        r = chat_x(server)
        assert r.status_code != 503, r.text  # it became ready (it answers no chat: a plain file server)
        assert "loading 003999" in server.log() and "listening" in server.log()
    finally:
        stop_server(server)


SLOW_SSE = '''import sys, time, json, http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200); self.send_header("Content-Type", "text/event-stream"); self.end_headers()
        for word in ["slow", " and", " steady"]:
            time.sleep(0.7)
            delta = {"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
            self.wfile.write(b"data: " + json.dumps(delta).encode() + b"\\n\\n"); self.wfile.flush()
        end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        self.wfile.write(b"data: " + json.dumps(end).encode() + b"\\n\\ndata: [DONE]\\n\\n")
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''


def test_an_unload_waits_for_the_requests_the_child_is_serving(tmp_path: Path) -> None:
    import concurrent.futures

    server = script_server(tmp_path, SLOW_SSE)
    try:
        ask = {"model": "x", "messages": [{"role": "user", "content": "hi"}]}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(httpx.post, server.v1 + "/chat/completions", json=ask, timeout=30)
            deadline = time.monotonic() + 20
            while "is ready at" not in server.log() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.3)  # the stream has begun
            unload = httpx.post(server.url + "/api/generate", json={"model": "x", "keep_alive": 0}, timeout=30)
            assert unload.status_code == 200 and unload.json()["done_reason"] == "unload", unload.text
            r = answer.result()
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "slow and steady", r.text
        deadline = time.monotonic() + 10  # and then it is stopped
        while time.monotonic() < deadline and "x" in [m["name"] for m in httpx.get(server.url + "/api/ps").json()["models"]]:
            time.sleep(0.1)
        assert "x" not in [m["name"] for m in httpx.get(server.url + "/api/ps").json()["models"]]
    finally:
        stop_server(server)
