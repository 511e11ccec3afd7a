"""`GET /metrics` in Prometheus format, on a registry owned by one app.

Engines may expose an optional `stats()` (plain or async) returning a dict
with any of: `queue_depth` (int), `active_sequences` (int), `restarts`
(int, since start), `replicas` (list of `{"url": str, "healthy": bool}`).
Engines without it simply have no per-engine series.
"""

from __future__ import annotations

import bisect
import inspect
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from hearth.core.record import RequestRecord

log = logging.getLogger("hearth.metrics")
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class EngineCollector(Collector):
    """Per-engine gauges from the last `stats()` snapshot (taken just before a scrape)."""

    def __init__(self) -> None:
        self.snapshot: dict[str, dict[str, Any]] = {}

    def collect(self) -> Iterator[Metric]:
        queue = GaugeMetricFamily("hearth_engine_queue_depth", "Requests waiting for a slot", labels=["engine"])
        active = GaugeMetricFamily("hearth_engine_active_sequences", "Sequences being decoded", labels=["engine"])
        restarts = CounterMetricFamily("hearth_engine_restarts", "Engine worker restarts", labels=["engine"])
        up = GaugeMetricFamily("hearth_upstream_replica_up", "1 if an upstream replica is healthy",
                               labels=["engine", "replica"])
        for name, stats in self.snapshot.items():
            if "queue_depth" in stats:
                queue.add_metric([name], float(stats["queue_depth"]))
            if "active_sequences" in stats:
                active.add_metric([name], float(stats["active_sequences"]))
            if "restarts" in stats:
                restarts.add_metric([name], float(stats["restarts"]))
            for replica in stats.get("replicas") or []:
                up.add_metric([name, str(replica.get("url"))], 1.0 if replica.get("healthy") else 0.0)
        yield from (queue, active, restarts, up)


class Histogram:
    """Bucket counts and a sum, kept as plain numbers."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # first bucket with le >= value
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs, +Inf last."""
        out, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts):
            running += count
            out.append((bound, float(running)))
        return out


class RequestCollector(Collector):
    """Request counts, tokens and latency histograms.

    Updated on the event loop for every request, so they are plain dicts and
    numbers (no locks, no label lookups: about a tenth of prometheus_client's
    cost per request) turned into metric families at scrape time.
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.tokens: dict[tuple[str, str], int] = {}
        self.ttft: dict[str, Histogram] = {}
        self.duration: dict[str, Histogram] = {}

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("hearth_requests", "HTTP requests", labels=["route", "model", "status"])
        for labels, n in self.requests.items():
            requests.add_metric(list(labels), float(n))
        tokens = CounterMetricFamily("hearth_tokens", "Tokens processed", labels=["model", "direction"])
        for pair, n in self.tokens.items():
            tokens.add_metric(list(pair), float(n))
        ttft = HistogramMetricFamily("hearth_time_to_first_token_seconds", "Time to first token", labels=["model"])
        for model, h in self.ttft.items():
            ttft.add_metric([model], h.buckets(), h.total)
        duration = HistogramMetricFamily("hearth_request_duration_seconds", "Request duration", labels=["route"])
        for route, h in self.duration.items():
            duration.add_metric([route], h.buckets(), h.total)
        yield from (requests, tokens, ttft, duration)


class Metrics:
    """The app's Prometheus series (a registry of its own: no module globals)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.series = RequestCollector()
        self.registry.register(self.series)
        self.engines = EngineCollector()
        self.registry.register(self.engines)

    def observe(self, rec: RequestRecord, route: str, ttft_ms: float | None = None,
                duration_ms: float | None = None) -> None:
        """Count one finished request (its timings if already computed)."""
        s = self.series
        model = rec.model or ""
        key = (route, model, str(rec.status))
        s.requests[key] = s.requests.get(key, 0) + 1
        if rec.prompt_tokens:
            s.tokens[(model, "in")] = s.tokens.get((model, "in"), 0) + rec.prompt_tokens
        if rec.completion_tokens:
            s.tokens[(model, "out")] = s.tokens.get((model, "out"), 0) + rec.completion_tokens
        ttft = rec.ttft_ms if ttft_ms is None else ttft_ms
        if ttft is not None:
            hist = s.ttft.get(model)
            if hist is None:
                hist = s.ttft[model] = Histogram(TTFT_BUCKETS)
            hist.observe(ttft / 1000)
        hist = s.duration.get(route)
        if hist is None:
            hist = s.duration[route] = Histogram(DURATION_BUCKETS)
        hist.observe((rec.duration_ms if duration_ms is None else duration_ms) / 1000)

    async def refresh_engines(self, engines: Iterable[Any]) -> None:
        """Ask each engine with a `stats()` hook for its current figures."""
        snapshot: dict[str, dict[str, Any]] = {}
        for engine in engines:
            hook = getattr(engine, "stats", None)
            if hook is None:
                continue
            stats = hook()
            if inspect.isawaitable(stats):
                stats = await stats
            if isinstance(stats, dict):
                snapshot[str(getattr(engine, "name", type(engine).__name__))] = stats
            else:
                log.warning("engine %s: stats() returned %s, not a dict; ignored", engine, type(stats).__name__)
        self.engines.snapshot = snapshot

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)


async def metrics_endpoint(request: Request) -> Response:
    """GET /metrics (the auth middleware makes it admin-only when keys are on)."""
    state = request.app.state.hearth
    metrics: Metrics = state.extras["security"].metrics
    await metrics.refresh_engines(state.engines)
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
