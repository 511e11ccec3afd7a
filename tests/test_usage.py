"""Usage records: durable across SIGKILL, never content, summaries; quota windows with an injected clock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from hearth.api.quota import Limiter
from hearth.core.errors import RateLimited
from hearth.store.db import open_database
from hearth.store.usage import UsageRow, UsageStore
from tests.conftest import start_server

SECRET_PROMPT = "the-plum-tree-is-behind-the-shed"


def usage_json(home: Path, *args: str) -> dict:
    env = {**os.environ, "HEARTH_HOME": str(home), "HEARTH_CONFIG": str(home / "hearth.toml")}
    out = subprocess.run([sys.executable, "-m", "hearth", "usage", *args, "--json"], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return json.loads(out)


def test_sigkill_right_after_responses_loses_nothing(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "home", "--fake", timeout=30)
    msgs = [{"role": "user", "content": SECRET_PROMPT}]
    with httpx.Client(timeout=30) as client:
        for i in range(5):
            r = client.post(srv.v1 + "/chat/completions", json={"model": "fake", "messages": msgs, "max_tokens": 4})
            assert r.status_code == 200
        with client.stream("POST", srv.v1 + "/chat/completions",
                           json={"model": "fake", "messages": msgs, "max_tokens": 4, "stream": True}) as r:
            body = r.read()
        assert body.endswith(b"data: [DONE]\n\n")
        r = client.post(srv.v1 + "/embeddings", json={"model": "fake", "input": SECRET_PROMPT})
        assert r.status_code == 200
        os.killpg(srv.proc.pid, signal.SIGKILL)  # no shutdown, no flush: straight after the last byte
    srv.proc.wait(10)
    by_model = usage_json(srv.home, "--by", "model")["rows"]
    assert by_model[0]["model"] == "fake:latest"
    assert by_model[0]["requests"] == 7 and by_model[0]["errors"] == 0
    assert by_model[0]["completion_tokens"] == 6 * 4
    rows = open_database(srv.home / "hearth.db").query(
        "SELECT route, dialect, status, prompt_tokens, completion_tokens, ttft_ms, duration_ms FROM usage ORDER BY id")
    assert [r[0] for r in rows] == ["/v1/chat/completions"] * 6 + ["/v1/embeddings"]
    assert all(r[1] == "openai" and r[2] == 200 and r[3] > 0 and r[6] > 0 for r in rows)
    assert all(r[5] is not None and 0 < r[5] <= r[6] for r in rows[:6])
    raw = b"".join(p.read_bytes() for p in srv.home.glob("hearth.db*"))
    assert SECRET_PROMPT.encode() not in raw  # counts, never content


def test_sigterm_shuts_down_in_full_then_ends_the_process_by_the_signal(tmp_path: Path) -> None:
    """uvicorn raises a caught SIGTERM as soon as its server stops; hearth's own shutdown (engines,
    the usage journal) must run first."""
    srv = start_server(tmp_path / "home", "--fake", timeout=30)
    r = httpx.post(srv.v1 + "/chat/completions", timeout=30,
                   json={"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200
    journal = srv.home / "hearth.db-usage.journal"
    assert journal.exists()  # the server owns it while it runs
    os.kill(srv.proc.pid, signal.SIGTERM)
    assert srv.proc.wait(20) == -signal.SIGTERM  # what a supervisor expects of a stopped server
    assert not journal.exists()  # folded and removed by the shutdown, not left for the next opener
    rows = open_database(srv.home / "hearth.db").query("SELECT route, completion_tokens FROM usage")
    assert rows == [("/v1/chat/completions", 3)]


def test_usage_cli_groups_and_since(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "hearth.toml").write_text("")
    store = UsageStore(open_database(home / "hearth.db"))
    from hearth.store.usage import UsageRow

    import time

    now = time.time()
    for ts, key, model, status, p, c in [(now - 3 * 86400, "old", "m1", 200, 10, 10), (now - 60, "a", "m1", 200, 3, 4),
                                         (now - 30, "a", "m2", 500, 2, 0), (now - 10, None, "m1", 200, 1, 1)]:
        store.record(UsageRow(ts=ts, key_id=None, key_name=key, model=model, engine="e", cloud=False,
                              dialect="openai", route="/v1/chat/completions", status=status, prompt_tokens=p,
                              completion_tokens=c, cached_tokens=0, ttft_ms=1.0, duration_ms=2.0))
    by_key = {r["key"]: r for r in usage_json(home, "--by", "key", "--since", "1d")["rows"]}
    assert set(by_key) == {"a", "(no key)"}
    assert by_key["a"]["requests"] == 2 and by_key["a"]["errors"] == 1 and by_key["a"]["prompt_tokens"] == 5
    by_model = {r["model"]: r["requests"] for r in usage_json(home, "--by", "model")["rows"]}
    assert by_model == {"m1": 3, "m2": 1}
    days = usage_json(home, "--by", "day")["rows"]
    assert len(days) == 2 and days[0]["day"] > days[1]["day"]
    env = {**os.environ, "HEARTH_HOME": str(home), "HEARTH_CONFIG": str(home / "hearth.toml")}
    table = subprocess.run([sys.executable, "-m", "hearth", "usage", "--by", "model"], env=env, capture_output=True,
                           text=True, timeout=60)
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:3] == ["MODEL", "REQUESTS", "ERRORS"]
    bad = subprocess.run([sys.executable, "-m", "hearth", "usage", "--since", "yesterdayish"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not understood" in bad.stderr


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_rpm_window_and_retry_after() -> None:
    clock = Clock()
    lim = Limiter(rate_window=60, token_window=86400, clock=clock)
    lim.admit(1, rpm=2, tokens_per_day=None)
    clock.t += 10
    lim.admit(1, rpm=2, tokens_per_day=None)
    lim.admit(2, rpm=2, tokens_per_day=None)  # other keys have their own window
    with pytest.raises(RateLimited) as exc:
        lim.admit(1, rpm=2, tokens_per_day=None)
    assert exc.value.retry_after == 50 and exc.value.code == "rate_limit_exceeded"
    assert "2 requests per minute" in exc.value.message
    clock.t += 50
    lim.admit(1, rpm=2, tokens_per_day=None)
    lim.admit(1, rpm=None, tokens_per_day=None)  # no limit: never refused


def test_token_window_and_restore() -> None:
    clock = Clock()
    lim = Limiter(rate_window=60, token_window=100, clock=clock)
    lim.admit(7, None, 50)
    lim.add_tokens(7, 30)
    clock.t += 20
    lim.add_tokens(7, 30)
    with pytest.raises(RateLimited) as exc:
        lim.admit(7, None, 50)
    assert exc.value.retry_after == 80  # when the first 30 tokens leave the window
    again = Limiter(rate_window=60, token_window=100, clock=clock)
    again.restore([(7, 1000.0, 30), (7, 1020.0, 30)])
    with pytest.raises(RateLimited):
        again.admit(7, None, 50)
    clock.t += 81
    again.admit(7, None, 50)


def _row(i: int) -> UsageRow:
    return UsageRow(ts=float(i), key_id=None, key_name=None, model="m", engine="e", cloud=False, dialect="openai",
                    route="/v1/chat/completions", status=200, prompt_tokens=1, completion_tokens=1, cached_tokens=0,
                    ttft_ms=1.0, duration_ms=1.0)


@pytest.mark.parametrize("background", [True, False])
def test_wal_checkpoints_run_in_the_background(tmp_path: Path, background: bool) -> None:
    """The server's database copies its WAL into the main file on a thread of its own
    (commits never pay for it); without that thread nothing would (autocheckpoint off)."""
    import time

    db = open_database(tmp_path / "h.db", background_checkpoints=background)
    if not background:
        db.conn.execute("PRAGMA wal_autocheckpoint=0")
    usage = UsageStore(db)
    start = (tmp_path / "h.db").stat().st_size
    for i in range(3000):
        usage.record(_row(i))
    deadline = time.time() + 4
    while time.time() < deadline and (tmp_path / "h.db").stat().st_size == start:
        time.sleep(0.1)
    grown = (tmp_path / "h.db").stat().st_size > start
    assert grown == background
    assert len(db.query("SELECT id FROM usage")) == 3000
    db.close()
