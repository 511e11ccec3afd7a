"""The real `ollama` client's pull/delete/copy, and hearth's /admin/models/*, against `hearth serve --fake`.

The server's store is real (its home's models/); pulls go to a local fake Ollama registry.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest

from tests.conftest import Server, start_server, stop_server
from tests.fake_sources import FakeSources, make_gguf, serve


@pytest.fixture
def src(tmp_path: Path) -> Iterator[FakeSources]:
    state = FakeSources(data=make_gguf(tmp_path / "tiny.gguf").read_bytes())
    server = serve(state)
    yield state
    server.shutdown()


@pytest.fixture
def server(tmp_path: Path, src: FakeSources) -> Iterator[Server]:
    s = start_server(tmp_path / "home", "--fake", timeout=30, env={
        "HEARTH_ALLOW_NETWORK": "1", "HEARTH_OLLAMA_REGISTRY": src.url, "HEARTH_HF_ENDPOINT": src.url})
    yield s
    stop_server(s)


def stored(server: Server) -> list[str]:
    return [m["name"] for m in httpx.get(server.url + "/admin/models").json()["models"]]


def test_ollama_client_pull_copy_delete(server: Server, src: FakeSources) -> None:
    client = ollama.Client(host=server.url)
    events = list(client.pull("tiny:1b", stream=True))
    statuses = [e.status for e in events]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert "verifying sha256 digest" in statuses
    progress = [e for e in events if e.completed is not None]
    assert progress and progress[-1].completed == progress[-1].total == len(src.data)
    assert progress[-1].digest == f"sha256:{src.sha256}"
    assert stored(server) == ["tiny:1b"]

    assert client.copy("tiny:1b", "tiny-copy").status == "success"
    assert stored(server) == ["tiny-copy:latest", "tiny:1b"]
    assert client.delete("tiny:1b").status == "success"
    assert stored(server) == ["tiny-copy:latest"]
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("tiny:1b")
    assert err.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as err:
        client.copy("nope", "x")
    assert err.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as err:  # stored under an alias's name, it would never be served
        client.copy("tiny-copy", "fast")
    assert err.value.status_code == 400 and "choose another name" in err.value.error
    for act in (lambda: client.copy("main", "x"), lambda: client.delete("main")):  # an alias of hearth.toml
        with pytest.raises(ollama.ResponseError) as err:
            act()
        assert err.value.status_code == 400 and "alias of" in err.value.error and "hearth.toml" in err.value.error


def test_pull_stream_false_and_errors(server: Server, src: FakeSources) -> None:
    src.faults.corrupt = True
    r = httpx.post(server.url + "/api/pull", json={"model": "hf.co/owner/repo:Q8_0"}, timeout=30)
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert lines[0] == {"status": "pulling manifest"}
    assert "expected" in lines[-1]["error"] and stored(server) == []
    src.faults.corrupt = False
    client = ollama.Client(host=server.url)
    assert client.pull("tiny:1b", stream=False).status == "success"
    assert stored(server) == ["tiny:1b"]
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("missing:7b", stream=False)
    assert err.value.status_code == 404


def test_admin_fit_catalog_hardware(server: Server) -> None:
    fit = httpx.get(server.url + "/admin/models/fit", params={"model": "llama3.1:8b", "ctx": 8192}).json()
    assert fit["from"] == "catalog" and fit["estimate"]["kv_cache"] == 8192 * 131072
    assert isinstance(fit["fits"], bool) and fit["need"] > fit["estimate"]["weights"]
    cat = httpx.get(server.url + "/admin/models/catalog").json()["models"]
    assert {"gemma3-270m:latest", "llama3.1:8b"} <= {m["name"] for m in cat}
    assert httpx.get(server.url + "/admin/hardware").json()["ram_total"] > 0


def test_pull_without_consent_names_host(tmp_path: Path, src: FakeSources) -> None:
    s = start_server(tmp_path / "home2", "--fake", timeout=30, env={"HEARTH_OLLAMA_REGISTRY": src.url})
    try:
        r = httpx.post(s.url + "/api/pull", json={"model": "tiny:1b", "stream": False})
        assert r.status_code == 403
        assert src.url.removeprefix("http://") in r.json()["error"]
        assert src.requests == []
    finally:
        stop_server(s)


@pytest.mark.model
def test_real_engine_serves_store_models_after_pull_and_delete(tmp_path: Path, models_cache: Path,
                                                                src: FakeSources) -> None:
    from tests.conftest import share_models

    home = tmp_path / "real"
    share_models(home, models_cache)
    s = start_server(home, env={"HEARTH_ALLOW_NETWORK": "1", "HEARTH_OLLAMA_REGISTRY": src.url,
                                "HEARTH_SLOTS": "2"})
    try:
        client = ollama.Client(host=s.url)
        assert client.pull("tiny:1b", stream=False).status == "success"
        ids = [m["id"] for m in httpx.get(s.v1 + "/models").json()["data"]]
        assert "tiny:1b" in ids and "gemma3-270m:latest" in ids
        with pytest.raises(ollama.ResponseError) as err:
            client.delete("gemma3-270m")  # alias target (main/fast/embed) and loaded
        assert err.value.status_code == 409
        assert client.delete("tiny:1b").status == "success"
        ids = [m["id"] for m in httpx.get(s.v1 + "/models").json()["data"]]
        assert "tiny:1b" not in ids
    finally:
        stop_server(s)
        for p in [*(models_cache / "manifests").rglob("*.json"), *(models_cache / "blobs").glob("*.adopted")]:
            p.unlink()  # leave the shared cache as other tests expect it (the bundled model adopted afresh)
