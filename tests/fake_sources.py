"""A local HTTP server imitating the Hugging Face file endpoints and the Ollama registry.

Serves real (small) GGUF files the tests make with gguf.GGUFWriter, honours
Range requests, and can be told to cut a connection, corrupt bytes or lie about
a digest. Every request is recorded so tests can check what was (not) asked.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np


def make_gguf(path: Path, n_layer: int = 2, n_embd: int = 64, vocab: int = 32, seed: int = 0) -> Path:
    """A small but real llama-architecture GGUF (about 100 KB of F32 tensors)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layer)
    w.add_embedding_length(n_embd)
    w.add_context_length(512)
    w.add_feed_forward_length(n_embd * 2)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_file_type(0)
    w.add_token_list([f"t{i}".encode() for i in range(vocab)])
    rng = np.random.default_rng(seed)
    w.add_tensor("token_embd.weight", rng.standard_normal((vocab, n_embd), dtype=np.float32))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_q.weight", rng.standard_normal((n_embd, n_embd), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@dataclass
class Faults:
    """What the server does wrong (each applies once unless noted)."""

    cut_after: int | None = None  # close the connection after this many body bytes (first GET of a blob)
    corrupt: bool = False  # flip a byte in every blob body
    ignore_range: bool = False
    slow: float = 0.0  # seconds to spread every blob body over (8 KB pieces)
    unsized_cut: int | None = None  # send no Content-Length and close after this many bytes (first GET)


@dataclass
class FakeSources:
    """State of the fake server: files by repo/model and the requests seen."""

    data: bytes
    files: dict[str, bytes] = field(default_factory=dict)
    faults: Faults = field(default_factory=Faults)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Range
    if_ranges: list[str | None] = field(default_factory=list)  # the If-Range header of each blob GET
    url: str = ""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def _handler(state: FakeSources) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            return

        def _json(self, obj: Any, code: int = 200) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            state.requests.append(("GET", self.path, self.headers.get("Range")))
            digest = f"sha256:{state.sha256}"
            if self.path.startswith("/api/models/owner/repo/tree/main"):
                self._json([
                    {"type": "file", "path": "README.md", "size": 10},
                    {"type": "file", "path": "tiny-Q8_0.gguf", "size": len(state.data),
                     "lfs": {"oid": state.sha256, "size": len(state.data)}},
                    {"type": "file", "path": "tiny-Q4_K_M.gguf", "size": len(state.data),
                     "lfs": {"oid": state.sha256, "size": len(state.data)}},
                ])
            elif self.path == "/v2/library/tiny/manifests/1b":
                self._json({"schemaVersion": 2, "layers": [
                    {"mediaType": "application/vnd.ollama.image.model", "digest": digest, "size": len(state.data)},
                    {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64,
                     "size": 10}]})
            elif self.path.startswith(("/owner/repo/resolve/main/", f"/v2/library/tiny/blobs/{digest}", "/files/")):
                self._blob(state.files.get(self.path, state.data))
            else:
                self._json({"error": "not found"}, 404)

        def _blob(self, data: bytes) -> None:
            if state.faults.corrupt:
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
            start = 0
            rng = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            state.if_ranges.append(if_range)
            if rng and not state.faults.ignore_range and if_range in (None, etag):  # RFC 9110 13.1.5
                start = int(rng.removeprefix("bytes=").split("-")[0])
            body = data[start:]
            if state.faults.unsized_cut is not None:
                cut, state.faults.unsized_cut = state.faults.unsized_cut, None
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body[:cut])
                self.close_connection = True
                return
            self.send_response(206 if start else 200)
            self.send_header("ETag", etag)
            self.send_header("Content-Length", str(len(body)))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            cut = state.faults.cut_after
            if cut is not None:
                state.faults.cut_after = None
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if state.faults.slow:
                pieces = [body[i:i + 8192] for i in range(0, len(body), 8192)]
                for piece in pieces:
                    self.wfile.write(piece)
                    self.wfile.flush()
                    time.sleep(state.faults.slow / len(pieces))
                return
            self.wfile.write(body)

    return Handler


def serve(state: FakeSources) -> ThreadingHTTPServer:
    """Start the fake server on 127.0.0.1 (a daemon thread); sets `state.url`."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
