"""Key lifecycle end to end: `hearth serve --fake`, the `hearth keys` CLI, the real openai and ollama clients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from tests.conftest import Server, start_server, stop_server

ASK = [{"role": "user", "content": "hello there"}]


def hearth(server_home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the `hearth` CLI on a server's home (the same database)."""
    env = {**os.environ, "HEARTH_HOME": str(server_home), "HEARTH_CONFIG": str(server_home / "hearth.toml")}
    proc = subprocess.run([sys.executable, "-m", "hearth", *args], env=env, capture_output=True, text=True,
                          timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def new_key(home: Path, name: str, *opts: str) -> str:
    """Create a key with the CLI; returns its secret."""
    out = hearth(home, "keys", "create", name, *opts, "--json").stdout
    return json.loads(out)["secret"]


def oai(server: Server, key: str | None) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=key or "none", max_retries=0, timeout=30)


def oll(server: Server, key: str | None) -> ollama.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return ollama.Client(host=server.url, headers=headers, timeout=30)


def chat(server: Server, key: str | None, model: str = "fake") -> str:
    resp = oai(server, key).chat.completions.create(model=model, messages=ASK, max_tokens=3)
    return resp.choices[0].message.content or ""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """A fake server whose quota windows are seconds long (HEARTH_RATE_WINDOW / HEARTH_TOKEN_WINDOW)."""
    srv = start_server(tmp_path / "home", "--fake", timeout=30,
                       env={"HEARTH_RATE_WINDOW": "2", "HEARTH_TOKEN_WINDOW": "2"})
    yield srv
    stop_server(srv)


def test_keyless_until_the_first_key_then_401_in_both_envelopes(server: Server) -> None:
    assert chat(server, None)
    assert oll(server, None).chat(model="fake", messages=ASK, options={"num_predict": 2}).message.content
    secret = new_key(server.home, "first")
    with pytest.raises(openai.AuthenticationError) as exc:
        chat(server, None)
    assert exc.value.status_code == 401 and exc.value.code == "invalid_api_key"
    r = httpx.post(server.v1 + "/chat/completions", json={"model": "fake", "messages": ASK})
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert "hearth keys create" in r.json()["error"]["message"]
    with pytest.raises(ollama.ResponseError) as oexc:
        oll(server, None).chat(model="fake", messages=ASK)
    assert oexc.value.status_code == 401 and "API key" in oexc.value.error
    assert chat(server, secret)
    assert oll(server, secret).chat(model="fake", messages=ASK, options={"num_predict": 2}).message.content
    r = httpx.get(server.v1 + "/models", headers={"x-api-key": secret})
    assert r.status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200


def test_401_never_says_whether_a_key_exists(server: Server) -> None:
    live = new_key(server.home, "live")
    revoked = new_key(server.home, "gone")
    hearth(server.home, "keys", "revoke", "gone")
    bodies = []
    for bad in (revoked, "hk-" + "A" * 43, live[:11] + "B" * 35, "not-a-key"):
        r = httpx.post(server.v1 + "/chat/completions", headers={"Authorization": f"Bearer {bad}"},
                       json={"model": "fake", "messages": ASK})
        assert r.status_code == 401
        bodies.append(r.json())
    assert all(b == bodies[0] for b in bodies)
    assert "gone" not in json.dumps(bodies[0]) and "live" not in json.dumps(bodies[0])


def test_revoke_takes_effect_on_the_next_request(server: Server) -> None:
    secret = new_key(server.home, "voice")
    assert chat(server, secret)
    hearth(server.home, "keys", "revoke", "voice")
    with pytest.raises(openai.AuthenticationError):
        chat(server, secret)


def test_rotate_with_overlap_then_only_the_new_secret(server: Server) -> None:
    old = new_key(server.home, "tagger")
    new = json.loads(hearth(server.home, "keys", "rotate", "tagger", "--overlap", "2s", "--json").stdout)["secret"]
    assert chat(server, old) and chat(server, new)
    time.sleep(2.2)
    with pytest.raises(openai.AuthenticationError):
        chat(server, old)
    assert chat(server, new)


def test_expired_key_is_refused(server: Server) -> None:
    secret = new_key(server.home, "temp", "--expires", "2s")
    assert chat(server, secret)
    time.sleep(2.2)
    with pytest.raises(openai.AuthenticationError):
        chat(server, secret)


def test_model_patterns_give_403_naming_the_model(server: Server) -> None:
    secret = new_key(server.home, "narrow", "--models", "qwen*")
    with pytest.raises(openai.PermissionDeniedError) as exc:
        chat(server, secret, model="fake")
    assert exc.value.status_code == 403 and "'fake'" in exc.value.message
    with pytest.raises(openai.PermissionDeniedError):
        oai(server, secret).embeddings.create(model="fake", input="x")
    with pytest.raises(ollama.ResponseError) as oexc:
        oll(server, secret).chat(model="fake", messages=ASK)
    assert oexc.value.status_code == 403 and "fake" in oexc.value.error
    # a `name` beside no `model`: the route serves the default model, so that is what is checked
    for path in ("/v1/chat/completions", "/v1/embeddings"):
        r = httpx.post(server.url + path, headers={"Authorization": f"Bearer {secret}"},
                       json={"name": "qwen2", "messages": ASK, "input": "x"})
        assert r.status_code == 403 and "'fake:latest'" in r.json()["error"]["message"], (path, r.text)
    wide = new_key(server.home, "wide", "--models", "fake*")
    assert chat(server, wide, model="fake")
    assert chat(server, wide, model="main")  # an alias counts by its target (fake:latest here)
    assert oai(server, wide).models.retrieve("fake").id


def test_model_lists_show_a_restricted_key_only_its_models(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "hearth.toml").write_text(
        '[upstreams.lan]\nkind = "openai"\nurls = ["http://127.0.0.1:9"]\nmodels = ["llama3:8b", "nomic-embed"]\n')
    server = start_server(home, "--fake", timeout=30)
    try:
        admin = new_key(server.home, "root", "--role", "admin")
        assert {m.id for m in oai(server, admin).models.list()} == {"fake:latest", "llama3:8b", "nomic-embed"}
        narrow = new_key(server.home, "embedder", "--models", "nomic*")
        assert {m.id for m in oai(server, narrow).models.list()} == {"nomic-embed"}
        assert {m.model for m in oll(server, narrow).list().models} == {"nomic-embed"}
        oll(server, admin).generate(model="fake", prompt="", keep_alive="5m")  # loaded: /api/ps shows it
        assert "fake:latest" in {m.model for m in oll(server, admin).ps().models}
        assert "fake:latest" not in {m.model for m in oll(server, narrow).ps().models}
        by_alias = new_key(server.home, "by-alias", "--models", "main")  # an alias allows its target
        assert {m.id for m in oai(server, by_alias).models.list()} == {"fake:latest"}
        assert chat(server, by_alias, "fake:latest")  # the id it was shown works too (was a 403)
        assert chat(server, by_alias, "fast")  # as does another alias of the same model
        with pytest.raises(openai.PermissionDeniedError):
            chat(server, by_alias, "llama3:8b")
    finally:
        stop_server(server)


def test_roles_guard_admin_endpoints_and_metrics(server: Server) -> None:
    user = new_key(server.home, "user1")
    admin = new_key(server.home, "root", "--role", "admin")
    for path in ("/admin/keys", "/metrics", "/admin/usage"):
        r = httpx.get(server.url + path, headers={"Authorization": f"Bearer {user}"})
        assert r.status_code == 403, path
        assert "admin key" in r.json()["error"]["message"]
        assert httpx.get(server.url + path, headers={"Authorization": f"Bearer {admin}"}).status_code == 200
    r = httpx.post(server.url + "/api/pull", headers={"Authorization": f"Bearer {user}"}, json={"model": "x"})
    assert r.status_code == 403 and "admin key" in r.json()["error"]


def test_rpm_429_with_retry_after_then_recovery(server: Server) -> None:
    secret = new_key(server.home, "bursty", "--rpm", "2")
    client = oai(server, secret)
    chat(server, secret)
    chat(server, secret)
    with pytest.raises(openai.RateLimitError) as exc:
        client.chat.completions.create(model="fake", messages=ASK, max_tokens=2)
    assert exc.value.code == "rate_limit_exceeded"
    assert 1 <= int(exc.value.response.headers["retry-after"]) <= 2
    with pytest.raises(ollama.ResponseError) as oexc:
        oll(server, secret).chat(model="fake", messages=ASK)
    assert oexc.value.status_code == 429
    time.sleep(2.1)
    assert chat(server, secret)


def test_tokens_per_day_429_then_recovery_and_counters_survive_restart(tmp_path: Path) -> None:
    env = {"HEARTH_RATE_WINDOW": "3", "HEARTH_TOKEN_WINDOW": "3"}
    srv = start_server(tmp_path / "home", "--fake", timeout=30, env=env)
    try:
        secret = new_key(srv.home, "budget", "--tokens-per-day", "5")
        capped = new_key(srv.home, "capped", "--rpm", "1")
        resp = oai(srv, secret).chat.completions.create(model="fake", messages=ASK, max_tokens=8)
        assert resp.usage.total_tokens > 5
        assert chat(srv, capped)
    finally:
        stop_server(srv)
    srv = start_server(tmp_path / "home", "--fake", timeout=30, env=env)
    try:
        with pytest.raises(openai.RateLimitError) as exc:  # restored from the usage table
            chat(srv, secret)
        assert "tokens" in exc.value.message and exc.value.code == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError):
            chat(srv, capped)
        time.sleep(3.1)
        assert chat(srv, secret) and chat(srv, capped)
    finally:
        stop_server(srv)


def test_admin_http_key_lifecycle_usage_and_privacy(server: Server) -> None:
    admin = new_key(server.home, "root", "--role", "admin")
    h = {"Authorization": f"Bearer {admin}"}
    r = httpx.post(server.url + "/admin/keys", headers=h, json={"name": "app", "models": ["fake*"], "rpm": 100})
    assert r.status_code == 201
    secret = r.json()["secret"]
    assert chat(server, secret)
    listed = httpx.get(server.url + "/admin/keys", headers=h).json()["keys"]
    app = next(k for k in listed if k["name"] == "app")
    assert "secret" not in app and app["last_used_at"] and app["prefixes"] == [secret[:11]]
    r = httpx.post(server.url + "/admin/keys/app/rotate", headers=h, json={"overlap": "1h"})
    new = r.json()["secret"]
    assert chat(server, secret) and chat(server, new)
    r = httpx.post(server.url + "/admin/keys/app/rotate", headers=h)  # no body: no overlap
    assert r.status_code == 200, r.text
    newest = r.json()["secret"]
    with pytest.raises(openai.AuthenticationError):
        chat(server, new)
    assert httpx.post(server.url + "/admin/keys/app/revoke", headers=h).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        chat(server, newest)
    assert httpx.post(server.url + "/admin/keys/nope/revoke", headers=h).status_code == 404
    usage = httpx.get(server.url + "/admin/usage", params={"by": "key", "since": "1h"}, headers=h).json()
    row = next(r for r in usage["rows"] if r["key"] == "app")
    assert row["requests"] == 3 and row["completion_tokens"] == 9
    privacy = httpx.get(server.url + "/admin/privacy", headers=h).json()
    assert privacy["cloud_calls"] == [] and privacy["cloud_keys"] == []
    assert all(not h["url"] or "upstream" not in h["purpose"] for h in privacy["outbound"])


def test_stream_idle_bound_ends_a_silent_stream(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "home", "--fake", timeout=30, env={"HEARTH_STREAM_IDLE_TIMEOUT": "0.003"})
    try:
        with httpx.stream("POST", srv.v1 + "/chat/completions", timeout=30,
                          json={"model": "fake", "messages": ASK, "stream": True, "max_tokens": 50}) as r:
            text = r.read().decode()
        assert "stream_idle_timeout" in text and "[DONE]" not in text
        out = hearth(srv.home, "usage", "--by", "model", "--json", "--url", srv.url).stdout
        assert json.loads(out)["rows"][0]["errors"] == 1
    finally:
        stop_server(srv)


def test_header_size_bound(server: Server) -> None:
    r = httpx.get(server.v1 + "/models", headers={"x-padding": "a" * 20000})
    assert r.status_code == 431 and "max_header_bytes" in r.json()["error"]["message"]


def test_cors_is_off_by_default(server: Server) -> None:
    r = httpx.options(server.v1 + "/chat/completions",
                      headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(server.v1 + "/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_origins_setting(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "home", "--fake", timeout=30,
                       env={"HEARTH_CORS_ORIGINS": '["http://localhost:3000"]'})
    try:
        r = httpx.options(srv.v1 + "/chat/completions",
                          headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"})
        assert r.headers.get("access-control-allow-origin") == "http://localhost:3000"
        r = httpx.options(srv.v1 + "/chat/completions",
                          headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert r.headers.get("access-control-allow-origin") != "https://evil.example"
    finally:
        stop_server(srv)


def test_admin_key_fields_are_checked_not_coerced(server: Server) -> None:
    admin = new_key(server.home, "root", "--role", "admin")
    h = {"Authorization": f"Bearer {admin}"}
    for body, param in (({"name": "a", "allow_cloud": "false"}, "allow_cloud"),
                        ({"name": "b", "models": []}, "models"),
                        ({"name": "c", "expires": "2020-01-01"}, None),
                        ({"name": "d", "expires": "0001-01-01"}, None)):
        r = httpx.post(server.url + "/admin/keys", headers=h, json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param
    assert httpx.get(server.url + "/admin/keys", headers=h).json()["keys"][-1]["name"] == "root"
    r = httpx.post(server.url + "/admin/keys/root/rotate", headers=h, json=[1, 2])
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    for path in ("/admin/privacy", "/admin/usage"):
        r = httpx.get(server.url + path, headers=h, params={"since": "0001-01-01"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "since", r.text


def test_head_requests_get_the_model_check(server: Server) -> None:
    secret = new_key(server.home, "narrow", "--models", "other*")
    h = {"Authorization": f"Bearer {secret}"}
    assert httpx.get(server.v1 + "/models/fake", headers=h).status_code == 403
    assert httpx.head(server.v1 + "/models/fake", headers=h).status_code == 403


def test_refusals_after_the_key_is_known_are_recorded_against_it(server: Server) -> None:
    admin = new_key(server.home, "root", "--role", "admin")
    secret = new_key(server.home, "lim", "--rpm", "1")
    # a refusal after admission costs a request, as it counts when the server restores the window
    assert httpx.get(server.url + "/admin/keys", headers={"Authorization": f"Bearer {secret}"}).status_code == 403
    for _ in range(2):
        with pytest.raises(openai.RateLimitError):
            chat(server, secret)
    chat_ok = httpx.get(server.url + "/admin/keys", headers={"Authorization": f"Bearer {secret}"})
    assert chat_ok.status_code == 429
    rows = httpx.get(server.url + "/admin/usage", params={"by": "key"},
                     headers={"Authorization": f"Bearer {admin}"}).json()["rows"]
    lim = next(r for r in rows if r["key"] == "lim")
    assert lim["requests"] == 4 and lim["errors"] == 4
    assert not any(r["key"] == "(no key)" for r in rows), rows


def test_keys_list_survives_a_far_expiry(server: Server) -> None:
    from hearth.cli.keys import when

    assert when(8.64e26) == "after 9999"  # a row written before durations were capped
    refused = hearth(server.home, "keys", "create", "far", "--expires", "4000000d", check=False)
    assert refused.returncode == 2 and "100 years" in refused.stderr
