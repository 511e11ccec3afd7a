"""The README's complete `hearth.toml` example starts hearth and every part of it works.

The example's addresses are replaced by fake upstreams on 127.0.0.1 (its cloud
API too, still declared `cloud = true`), so nothing leaves the box; everything
else is the README's text. A change to the example that breaks startup, or a
replacement below that no longer matches it, fails here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from tests.conftest import Server, share_models, start_server, stop_server
from tests.fake_upstream import FakeUpstream

README = Path(__file__).resolve().parent.parent / "README.md"
GPU_MODEL = "meta-llama/Llama-3.1-70B-Instruct"


def readme_example() -> str:
    """The toml block of the README's Upstreams section."""
    section = README.read_text().split("\n## Upstreams\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```toml\n(.*?)```", section, re.S)
    assert match, "README's Upstreams section has no toml example"
    return match.group(1)


def answer(up: FakeUpstream) -> str:
    """What a fake upstream answers (it signs with its port)."""
    return f"Hello from upstream {up.port}"


def localised(toml: str, swaps: dict[str, str]) -> str:
    """`toml` with each key of `swaps` replaced; each must occur in it."""
    for old, new in swaps.items():
        assert old in toml, f"the README example no longer contains {old!r}: update this test"
        toml = toml.replace(old, new)
    return toml


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeUpstream]]:
    ups = {
        "gpu1": FakeUpstream(models=(GPU_MODEL,)).start(),
        "gpu2": FakeUpstream(models=(GPU_MODEL,)).start(),
        "nas": FakeUpstream(kind="ollama", models=("llama3.1:8b", "bge-m3:latest"), dimension=1024).start(),
        "cloud": FakeUpstream(models=("gpt-4o-mini",)).start(),
    }
    yield ups
    for up in ups.values():
        up.stop()


@pytest.fixture(scope="module")
def example_server(tmp_path_factory: pytest.TempPathFactory, models_cache: Path,
                   fakes: dict[str, FakeUpstream]) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("readme-example")
    share_models(home, models_cache)
    key_file = home / "gpu-box.key"
    key_file.write_text("sk-gpu-box-secret\n")
    toml = localised(readme_example(), {
        '"http://10.0.0.5:8000", "http://10.0.0.6:8000"': f'"{fakes["gpu1"].url}", "{fakes["gpu2"].url}"',
        '"~/.config/hearth/gpu-box.key"': f'"{key_file}"',
        '"http://nas.local:11434"': f'"{fakes["nas"].url}"',
        '"https://api.openai.com"': f'"{fakes["cloud"].url}"',
    })
    (home / "hearth.toml").write_text(toml)
    server = start_server(home, env={"OPENAI_API_KEY": "sk-cloud-secret"})
    yield server
    stop_server(server)


def test_every_declared_model_and_role_is_listed(example_server: Server) -> None:
    models = {m["id"]: m for m in httpx.get(example_server.v1 + "/models").json()["data"]}
    assert {GPU_MODEL, "llama3.1:8b", "bge-m3:latest", "qwen2.5-7b", "gpt-4o-mini@openai"} <= set(models)
    assert "gpt-4o-mini" not in models  # a cloud model is only ever named with its upstream
    # Roles are shown on the models they name.
    assert models[GPU_MODEL]["aliases"] == ["main"] and models["gemma3-270m:latest"]["aliases"] == ["fast"]
    assert models["gpt-4o-mini@openai"]["aliases"] == ["smart"] and models["bge-m3:latest"]["aliases"] == ["embed"]


def test_roles_reach_their_engines(example_server: Server, fakes: dict[str, FakeUpstream]) -> None:
    client = openai.OpenAI(base_url=example_server.v1, api_key="x", max_retries=0, timeout=120)
    msgs: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]
    main = client.chat.completions.create(model="main", messages=msgs, max_tokens=8)
    assert main.choices[0].message.content in {answer(fakes["gpu1"]), answer(fakes["gpu2"])}
    fast = client.chat.completions.create(model="fast", messages=msgs, max_tokens=4)
    assert fast.usage is not None and fast.usage.completion_tokens >= 1  # the bundled model itself
    before = fakes["cloud"].requests
    smart = client.chat.completions.create(model="smart", messages=msgs, max_tokens=8)
    assert smart.choices[0].message.content == answer(fakes["cloud"]) and fakes["cloud"].requests == before + 1
    vectors = client.embeddings.create(model="embed", input=["a", "b"])
    assert [len(d.embedding) for d in vectors.data] == [1024, 1024]
    assert "sk-gpu-box-secret" not in example_server.log() and "sk-cloud-secret" not in example_server.log()


def test_the_ollama_dialect_serves_the_same_roles(example_server: Server, fakes: dict[str, FakeUpstream]) -> None:
    client = ollama.Client(host=example_server.url, timeout=120)
    reply = client.chat(model="main", messages=[{"role": "user", "content": "Hi"}])
    assert reply.message.content in {answer(fakes["gpu1"]), answer(fakes["gpu2"])}
    assert "llama3.1:8b" in {m.model for m in client.list().models}
    assert len(client.embed(model="embed", input="a").embeddings[0]) == 1024


def test_upstreams_are_as_declared(example_server: Server, fakes: dict[str, FakeUpstream]) -> None:
    status = {u["name"]: u for u in httpx.get(example_server.url + "/admin/upstreams").json()["upstreams"]}
    assert set(status) == {"gpu-box", "nas", "ls", "openai"}
    assert [r["url"] for r in status["gpu-box"]["replicas"]] == [fakes["gpu1"].url, fakes["gpu2"].url]
    assert status["openai"]["cloud"] and not status["nas"]["cloud"]
    # The managed llama-server is started by its first request, not by hearth's start.
    assert status["ls"]["managed"] and not any(r["healthy"] for r in status["ls"]["replicas"]), status["ls"]
