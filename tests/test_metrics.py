"""GET /metrics: requests by route/model/status, tokens, TTFT and duration histograms, engine gauges."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from hearth.api.metrics import Metrics
from hearth.core.record import RequestRecord
from tests.conftest import Server

ASK = [{"role": "user", "content": "one two three"}]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(all_: dict, name: str, **labels: str) -> float:
    return all_[(name, tuple(sorted(labels.items())))]


def test_metrics_count_requests_tokens_and_latency(fake_server: Server) -> None:
    with httpx.Client(base_url=fake_server.url, timeout=30) as c:
        prompt_in = 0
        for stream in (False, True):
            r = c.post("/v1/chat/completions", json={"model": "fake", "messages": ASK, "max_tokens": 5,
                                                     "stream": stream, "stream_options": {"include_usage": True}})
            assert r.status_code == 200
            usage = r.json()["usage"] if not stream else json.loads(r.text.split("data: ")[-2])["usage"]
            prompt_in += usage["prompt_tokens"]
        r = c.post("/v1/embeddings", json={"model": "fake", "input": "a b"})
        prompt_in += r.json()["usage"]["prompt_tokens"]
        assert c.post("/v1/chat/completions", json={"model": "nope", "messages": ASK}).status_code == 404
        text = c.get("/metrics").text
    s = samples(text)
    chat = "/v1/chat/completions"
    assert value(s, "hearth_requests_total", route=chat, model="fake:latest", status="200") == 2
    assert value(s, "hearth_requests_total", route=chat, model="", status="404") == 1
    assert value(s, "hearth_requests_total", route="/v1/embeddings", model="fake:latest", status="200") == 1
    assert value(s, "hearth_tokens_total", model="fake:latest", direction="out") == 10
    assert value(s, "hearth_tokens_total", model="fake:latest", direction="in") == prompt_in > 0
    assert value(s, "hearth_time_to_first_token_seconds_count", model="fake:latest") == 2
    assert value(s, "hearth_request_duration_seconds_count", route=chat) == 3
    assert 0 < value(s, "hearth_request_duration_seconds_sum", route=chat) < 30


class StatsEngine:
    """An engine that reports figures through the optional stats() hook."""

    def __init__(self, name: str, stats: Any) -> None:
        self.name = name
        self._stats = stats

    def stats(self) -> Any:
        return self._stats


class AsyncStatsEngine(StatsEngine):
    async def stats(self) -> Any:  # type: ignore[override]
        return self._stats


def test_engine_gauges_come_from_stats_hooks() -> None:
    m = Metrics()
    engines = [
        StatsEngine("llamacpp", {"queue_depth": 3, "active_sequences": 5, "restarts": 1}),
        AsyncStatsEngine("vllm", {"replicas": [{"url": "http://10.0.0.2:8000", "healthy": True},
                                               {"url": "http://10.0.0.3:8000", "healthy": False}]}),
        object(),  # no hook: no series
    ]
    asyncio.run(m.refresh_engines(engines))
    s = samples(m.render().decode())
    assert value(s, "hearth_engine_queue_depth", engine="llamacpp") == 3
    assert value(s, "hearth_engine_active_sequences", engine="llamacpp") == 5
    assert value(s, "hearth_engine_restarts_total", engine="llamacpp") == 1
    assert value(s, "hearth_upstream_replica_up", engine="vllm", replica="http://10.0.0.2:8000") == 1
    assert value(s, "hearth_upstream_replica_up", engine="vllm", replica="http://10.0.0.3:8000") == 0
    assert not any(dict(k[1]).get("engine") == "vllm" and k[0] == "hearth_engine_queue_depth" for k in s)


def test_two_apps_do_not_share_series() -> None:
    a, b = Metrics(), Metrics()
    a.observe(RequestRecord(route="/x", model="m", status=200), "/x")
    key = ("hearth_requests_total", (("model", "m"), ("route", "/x"), ("status", "200")))
    assert samples(a.render().decode())[key] == 1
    assert key not in samples(b.render().decode())


def test_histogram_buckets_are_cumulative_with_le_inclusive() -> None:
    m = Metrics()
    for ttft_ms in (10, 30, 30, 99_000):  # 0.01 s sits in le=0.01; 99 s only in +Inf
        rec = RequestRecord(route="/v1/chat/completions", model="m", status=200, prompt_tokens=2, completion_tokens=3)
        rec.first_token_ns = rec.started_ns + ttft_ms * 1_000_000
        rec.finished_ns = rec.started_ns + 2_000_000_000
        m.observe(rec, "/v1/chat/completions")
    s = samples(m.render().decode())
    bucket = "hearth_time_to_first_token_seconds_bucket"
    assert value(s, bucket, model="m", le="0.01") == 1
    assert value(s, bucket, model="m", le="0.025") == 1
    assert value(s, bucket, model="m", le="0.05") == 3
    assert value(s, bucket, model="m", le="30.0") == 3
    assert value(s, bucket, model="m", le="+Inf") == 4
    assert value(s, "hearth_time_to_first_token_seconds_count", model="m") == 4
    assert abs(value(s, "hearth_time_to_first_token_seconds_sum", model="m") - 99.07) < 1e-6
    assert value(s, "hearth_request_duration_seconds_bucket", route="/v1/chat/completions", le="2.5") == 4
    assert value(s, "hearth_tokens_total", model="m", direction="out") == 12
