"""Pulls against local servers imitating Hugging Face and the Ollama registry (no other network)."""

from __future__ import annotations

import concurrent.futures
import errno
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hearth.core.errors import UpstreamError
from hearth.models.download import InsufficientStorage, PullCancelled
from hearth.models.pull import ConsentRequired, DigestMismatch, Puller, PullOptions
from hearth.models.sources import Endpoints
from hearth.models.store import ModelStore
from tests.fake_sources import FakeSources, make_gguf, serve


@pytest.fixture
def src(tmp_path: Path) -> Iterator[FakeSources]:
    data = make_gguf(tmp_path / "tiny.gguf").read_bytes()
    state = FakeSources(data=data)
    server = serve(state)
    yield state
    server.shutdown()


def puller(tmp_path: Path, src: FakeSources, **kw: object) -> tuple[Puller, ModelStore, list[dict[str, object]]]:
    events: list[dict[str, object]] = []
    store = ModelStore(tmp_path / "models")
    opts = PullOptions(allow_network=True, endpoints=Endpoints(hf=src.url, ollama=src.url),
                       progress=events.append, retries=kw.pop("retries", 3))  # type: ignore[arg-type]
    for key, value in kw.items():
        setattr(opts, key, value)
    return Puller(store, opts), store, events


def assert_nothing_stored(store: ModelStore) -> None:
    assert store.list() == []
    leftovers = [p for p in store.blobs.rglob("*") if p.is_file()] if store.blobs.exists() else []
    assert leftovers == []


def test_hf_pull_verifies_and_registers(tmp_path: Path, src: FakeSources) -> None:
    p, store, events = puller(tmp_path, src)
    m = p.pull("hf.co/owner/repo:Q4_K_M")
    assert m.name == "hf.co/owner/repo:Q4_K_M"
    assert m.sha256 == src.sha256 and m.size == len(src.data)
    assert m.architecture == "llama" and m.block_count == 2
    assert store.blob_path(m.sha256).read_bytes() == src.data
    assert ("GET", "/owner/repo/resolve/main/tiny-Q4_K_M.gguf", None) in src.requests
    statuses = [e["status"] for e in events]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert "verifying sha256 digest" in statuses
    last_progress = [e for e in events if "completed" in e][-1]
    assert last_progress["completed"] == last_progress["total"] == len(src.data)
    assert [x.name for x in store.list()] == ["hf.co/owner/repo:Q4_K_M"]


def test_ollama_registry_pull(tmp_path: Path, src: FakeSources) -> None:
    p, store, _ = puller(tmp_path, src)
    m = p.pull("library/tiny:1b")
    assert m.name == "tiny:1b" and m.source == "ollama:library/tiny:1b"
    assert store.path("tiny:1b").read_bytes() == src.data


def test_consent_refusal_names_the_host_and_contacts_nothing(tmp_path: Path, src: FakeSources) -> None:
    p, store, _ = puller(tmp_path, src, allow_network=False)
    with pytest.raises(ConsentRequired) as err:
        p.pull("hf.co/owner/repo:Q4_K_M")
    host = src.url.removeprefix("http://")
    assert host in err.value.message and "--allow-network" in err.value.message
    assert "HEARTH_ALLOW_NETWORK=1" in err.value.message
    assert src.requests == []
    assert_nothing_stored(store)


def test_resume_after_cut_connection_within_one_pull(tmp_path: Path, src: FakeSources) -> None:
    half = len(src.data) // 2
    src.faults.cut_after = half
    p, store, _ = puller(tmp_path, src)
    m = p.pull("library/tiny:1b")
    assert store.path(m.name).read_bytes() == src.data
    blob_gets = [r for r in src.requests if "/blobs/" in r[1]]
    assert blob_gets[0][2] is None and blob_gets[-1][2] == f"bytes={half}-"


def test_interrupted_pull_is_not_a_model_and_next_pull_resumes(tmp_path: Path, src: FakeSources) -> None:
    half = len(src.data) // 3
    src.faults.cut_after = half
    p, store, _ = puller(tmp_path, src, retries=0)
    with pytest.raises(UpstreamError, match="pull again to resume"):
        p.pull("hf.co/owner/repo:Q4_K_M")
    assert store.list() == [] and not store.blob_path(src.sha256).exists()
    assert (store.partials / f"sha256-{src.sha256}.partial").stat().st_size == half
    m = p.pull("hf.co/owner/repo:Q4_K_M")
    assert store.path(m.name).read_bytes() == src.data
    assert src.requests[-1][2] == f"bytes={half}-"
    assert not any(store.partials.iterdir())


def test_corrupt_blob_rejected_and_cleaned_up(tmp_path: Path, src: FakeSources) -> None:
    src.faults.corrupt = True
    p, store, _ = puller(tmp_path, src)
    with pytest.raises(DigestMismatch, match="corrupt file was deleted"):
        p.pull("library/tiny:1b")
    assert_nothing_stored(store)


def test_wrong_sha256_rejected(tmp_path: Path, src: FakeSources) -> None:
    p, store, _ = puller(tmp_path, src)
    with pytest.raises(DigestMismatch):
        p.pull(src.url + "/files/tiny.gguf", sha256="ab" * 32)
    assert_nothing_stored(store)


def test_plain_url_without_digest_records_the_computed_one(tmp_path: Path, src: FakeSources) -> None:
    p, store, _ = puller(tmp_path, src)
    m = p.pull(src.url + "/files/tiny.gguf", name="mine:v1")
    assert m.name == "mine:v1" and m.sha256 == src.sha256


def test_not_a_gguf_is_rejected(tmp_path: Path, src: FakeSources) -> None:
    src.files["/files/page.gguf"] = b"<html>not a model</html>" * 10
    p, store, _ = puller(tmp_path, src)
    with pytest.raises(UpstreamError, match="not a GGUF"):
        p.pull(src.url + "/files/page.gguf")
    assert_nothing_stored(store)


def test_disk_space_refusal_before_download(tmp_path: Path, src: FakeSources) -> None:
    p, store, _ = puller(tmp_path, src, free_space=lambda path: 10_000_000)
    with pytest.raises(InsufficientStorage, match="free some space"):
        p.pull("library/tiny:1b")
    assert_nothing_stored(store)


def test_missing_quant_lists_what_exists(tmp_path: Path, src: FakeSources) -> None:
    p, store, _ = puller(tmp_path, src)
    with pytest.raises(Exception, match="tiny-Q8_0.gguf"):
        p.pull("hf.co/owner/repo:Q2_K")


def test_pull_of_present_blob_needs_no_network(tmp_path: Path, src: FakeSources) -> None:
    p, store, _ = puller(tmp_path, src)
    p.pull("library/tiny:1b")
    offline, _, _ = puller(tmp_path, src, allow_network=False)
    m = offline.pull(src.url + "/files/x.gguf", name="again", sha256=src.sha256)
    assert m.name == "again:latest"


def test_two_pulls_of_the_same_file_download_it_once(tmp_path: Path, src: FakeSources) -> None:
    """A second pull of a file being downloaded waits, then finds it in place (no interleaved writes)."""
    src.faults.slow = 0.6
    (a, store, _), (b, _, events_b) = puller(tmp_path, src), puller(tmp_path, src)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(a.pull, "hf.co/owner/repo:Q4_K_M")
        time.sleep(0.15)  # the first is downloading
        second = pool.submit(b.pull, "hf.co/owner/repo:Q4_K_M")
        ma, mb = first.result(30), second.result(30)
    assert ma.sha256 == mb.sha256 == src.sha256
    assert store.blob_path(src.sha256).read_bytes() == src.data
    blob_gets = [r for r in src.requests if r[1] == "/owner/repo/resolve/main/tiny-Q4_K_M.gguf"]
    assert len(blob_gets) == 1
    assert "waiting for another pull of the same file" in [e["status"] for e in events_b]
    assert list(store.partials.iterdir()) == []  # no partial or lock file left behind


def test_a_pull_waiting_for_another_can_be_cancelled(tmp_path: Path, src: FakeSources) -> None:
    src.faults.slow = 0.8
    a, store, _ = puller(tmp_path, src)
    stop = threading.Event()
    b, _, events_b = puller(tmp_path, src, cancel=stop)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(a.pull, "hf.co/owner/repo:Q4_K_M")
        time.sleep(0.15)
        second = pool.submit(b.pull, "hf.co/owner/repo:Q4_K_M")
        time.sleep(0.2)
        stop.set()
        with pytest.raises(PullCancelled, match="waiting for another pull"):
            second.result(5)
        assert first.result(30).sha256 == src.sha256  # the first one is undisturbed
    assert "waiting for another pull of the same file" in [e["status"] for e in events_b]


def test_a_cut_download_without_length_or_digest_is_not_a_model(tmp_path: Path, src: FakeSources) -> None:
    """A plain URL gives no sha256 and this server no Content-Length: only the tensor table shows the cut."""
    src.faults.unsized_cut = len(src.data) // 2
    p, store, _ = puller(tmp_path, src)
    with pytest.raises(UpstreamError, match="ended early.*cut short.*pull again"):
        p.pull(src.url + "/files/tiny.gguf", name="cut")
    assert_nothing_stored(store)


def test_resume_onto_a_changed_file_starts_over(tmp_path: Path, src: FakeSources) -> None:
    """The partial's ETag goes along as If-Range, so a new version of the file is not spliced onto the old."""
    src.faults.cut_after = len(src.data) // 2
    p, store, _ = puller(tmp_path, src, retries=0)
    with pytest.raises(UpstreamError, match="pull again to resume"):
        p.pull(src.url + "/files/tiny.gguf", name="x")
    newer = make_gguf(tmp_path / "newer.gguf", seed=1).read_bytes()
    src.files["/files/tiny.gguf"] = newer
    m = p.pull(src.url + "/files/tiny.gguf", name="x")
    assert store.path(m.name).read_bytes() == newer
    assert src.if_ranges[-1] is not None  # it asked for the remembered version
    assert list(store.partials.iterdir()) == []


def test_a_full_disk_is_a_507_at_once_not_a_retried_network_fault(tmp_path: Path, src: FakeSources,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = Path.open

    class Full:  # fault injection: every write to the partial fails as a full disk does
        def __init__(self, fh: Any) -> None:
            self.fh = fh

        def write(self, block: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *exc: object) -> None:
            self.fh.close()

    def open_full(self: Path, mode: str = "r", *args: Any, **kw: Any) -> Any:
        fh = real_open(self, mode, *args, **kw)
        return Full(fh) if mode == "ab" else fh

    monkeypatch.setattr(Path, "open", open_full)
    p, store, _ = puller(tmp_path, src)
    with pytest.raises(InsufficientStorage, match="full.*free some space"):
        p.pull("library/tiny:1b")
    assert len([r for r in src.requests if "/blobs/" in r[1]]) == 1
    assert store.list() == []


def test_the_finished_progress_line_comes_once(tmp_path: Path, src: FakeSources) -> None:
    p, _, events = puller(tmp_path, src)
    p.pull("library/tiny:1b")
    complete = [e for e in events if e.get("completed") == len(src.data)]
    assert len(complete) == 1 and complete[0]["total"] == len(src.data)
