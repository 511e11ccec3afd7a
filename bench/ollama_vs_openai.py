"""Ollama dialect vs OpenAI dialect: same requests, same engine, compare speed.

Starts `hearth serve` on the bundled model, then streams the same 128-token
chat requests through `/api/chat` and `/v1/chat/completions`, interleaved
(the dialect that goes first alternates every round, and both get the same
seed and temperature in a round), and prints per dialect: median time to
first token, median decode tokens/s (tokens after the first / time from the
first to the last token), end-to-end tokens/s, and the Ollama/OpenAI ratio.

    /work/venv/bin/python bench/ollama_vs_openai.py --rounds 6

Target: the Ollama dialect within 2% of the OpenAI dialect.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

MODEL = "gemma3-270m:latest"
PROMPT = [{"role": "system", "content": "You are a storyteller who writes long, detailed stories."},
          {"role": "user", "content": "Tell a long story about a lighthouse keeper and a storm."}]


@dataclass
class Run:
    """One streamed request: when its first and last token came, how many tokens."""

    ttft_s: float
    decode_s: float
    total_s: float
    tokens: int

    @property
    def decode_tps(self) -> float:
        return (self.tokens - 1) / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def e2e_tps(self) -> float:
        return self.tokens / self.total_s


@dataclass
class Dialect:
    name: str
    runs: list[Run] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(home: Path, slots: int) -> tuple[subprocess.Popen[bytes], str]:
    """`hearth serve` on a free loopback port; waits for /ready."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "hearth.toml").touch()
    port = free_port()
    env = {**os.environ, "HEARTH_HOME": str(home), "HEARTH_CONFIG": str(home / "hearth.toml"),
           "HEARTH_SLOTS": str(slots)}
    log = (home / "bench-serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "hearth", "serve", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"hearth serve exited; see {home / 'bench-serve.log'}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop(proc)
    raise SystemExit("hearth serve did not become ready in 10 minutes")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def ollama_run(client: httpx.Client, seed: int, temperature: float, tokens: int) -> Run:
    """Stream one /api/chat request."""
    body = {"model": MODEL, "messages": PROMPT, "stream": True,
            "options": {"seed": seed, "temperature": temperature, "num_predict": tokens}}
    t0 = time.perf_counter()
    first = last = 0.0
    count = 0
    with client.stream("POST", "/api/chat", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line:
                continue
            event = json.loads(line)
            if "error" in event:
                raise RuntimeError(event["error"])
            if event["message"]["content"]:
                last = time.perf_counter()
                first = first or last
            if event["done"]:
                count = event["eval_count"]
    return Run(first - t0, last - first, time.perf_counter() - t0, count)


def openai_run(client: httpx.Client, seed: int, temperature: float, tokens: int) -> Run:
    """Stream one /v1/chat/completions request (usage in the last chunk)."""
    body = {"model": MODEL, "messages": PROMPT, "stream": True, "stream_options": {"include_usage": True},
            "seed": seed, "temperature": temperature, "max_tokens": tokens}
    t0 = time.perf_counter()
    first = last = 0.0
    count = 0
    with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
            if event.get("usage"):
                count = event["usage"]["completion_tokens"]
    return Run(first - t0, last - first, time.perf_counter() - t0, count)


def bench(url: str, rounds: int, tokens: int, temperature: float) -> tuple[Dialect, Dialect]:
    """Interleaved rounds; the dialect that goes first alternates."""
    ollama, openai = Dialect("ollama /api/chat"), Dialect("openai /v1/chat/completions")
    runners = [(ollama, ollama_run), (openai, openai_run)]
    with httpx.Client(base_url=url, timeout=600) as client:
        for fn in (ollama_run, openai_run):  # warm-up: load, prefix cache, connections
            fn(client, 0, temperature, 8)
        for r in range(rounds):
            order = runners if r % 2 == 0 else runners[::-1]
            for dialect, fn in order:
                run = fn(client, 1000 + r, temperature, tokens)
                dialect.runs.append(run)
                print(f"  round {r + 1}/{rounds} {dialect.name:<28} {run.tokens:4d} tok  "
                      f"ttft {run.ttft_s * 1000:7.1f} ms  {run.decode_tps:6.1f} tok/s", file=sys.stderr)
    return ollama, openai


def summary(d: Dialect) -> tuple[float, float, float, int]:
    """(median ttft ms, median decode tok/s, median end-to-end tok/s, tokens)."""
    return (statistics.median(r.ttft_s for r in d.runs) * 1000,
            statistics.median(r.decode_tps for r in d.runs),
            statistics.median(r.e2e_tps for r in d.runs),
            sum(r.tokens for r in d.runs))


def table(ollama: Dialect, openai: Dialect) -> str:
    """Markdown table of both dialects and the Ollama/OpenAI ratio."""
    rows = ["| dialect | requests | tokens | median TTFT (ms) | decode tok/s (median) | end-to-end tok/s (median) |",
            "|---|---|---|---|---|---|"]
    for d in (ollama, openai):
        ttft, tps, e2e, n = summary(d)
        rows.append(f"| {d.name} | {len(d.runs)} | {n} | {ttft:.1f} | {tps:.2f} | {e2e:.2f} |")
    o, a = summary(ollama), summary(openai)
    rows.append(f"| ratio of medians ollama/openai | | | {o[0] / a[0]:.3f} | {o[1] / a[1]:.3f} | {o[2] / a[2]:.3f} |")
    pairs = list(zip(ollama.runs, openai.runs))  # same round, same seed, back to back
    ttft = statistics.median(x.ttft_s / y.ttft_s for x, y in pairs)
    tps = statistics.median(x.decode_tps / y.decode_tps for x, y in pairs)
    e2e = statistics.median(x.e2e_tps / y.e2e_tps for x, y in pairs)
    rows.append(f"| median of per-round ratios | | | {ttft:.3f} | {tps:.3f} | {e2e:.3f} |")
    return "\n".join(rows)


def main() -> int:
    """Run the benchmark and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds (one request per dialect each)")
    p.add_argument("--tokens", type=int, default=128, help="tokens per request (num_predict / max_tokens)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--slots", type=int, default=8, help="HEARTH_SLOTS for the server")
    p.add_argument("--home", type=Path, default=Path("/tmp/hearth-bench-home"),
                   help="HEARTH_HOME (the bundled model is assembled there once)")
    p.add_argument("--url", help="use a running hearth at this URL instead of starting one")
    args = p.parse_args()
    proc = None
    url = args.url
    if url is None:
        proc, url = start(args.home, args.slots)
    try:
        ollama, openai = bench(url, args.rounds, args.tokens, args.temperature)
    finally:
        if proc is not None:
            stop(proc)
    print(f"\n{args.rounds} interleaved rounds, {args.tokens}-token streams, model {MODEL}, "
          f"seed 1000+round, temperature {args.temperature}\n")
    print(table(ollama, openai))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
