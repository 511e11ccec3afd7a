"""`GET /metrics` in Prometheus format, on a registry owned by one app.

Engines may expose an optional `stats()` (plain or async) returning a dict
with any of: `queue_depth` (int), `active_sequences` (int), `restarts`
(int, since start), `replicas` (list of `{"url": str, "healthy": bool}`).
Engines without it simply have no per-engine series.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
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


class Metrics:
    """The app's Prometheus series (a registry of its own: no module globals)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("hearth_requests", "HTTP requests", ["route", "model", "status"],
                                registry=self.registry)
        self.tokens = Counter("hearth_tokens", "Tokens processed", ["model", "direction"], registry=self.registry)
        self.ttft = Histogram("hearth_time_to_first_token_seconds", "Time to first token", ["model"],
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.duration = Histogram("hearth_request_duration_seconds", "Request duration", ["route"],
                                  buckets=DURATION_BUCKETS, registry=self.registry)
        self.engines = EngineCollector()
        self.registry.register(self.engines)
        self._children: dict[tuple[Any, ...], Any] = {}

    def observe(self, rec: RequestRecord, route: str) -> None:
        """Count one finished request."""
        model = rec.model or ""
        self._child(self.requests, route, model, str(rec.status)).inc()
        if rec.prompt_tokens:
            self._child(self.tokens, model, "in").inc(rec.prompt_tokens)
        if rec.completion_tokens:
            self._child(self.tokens, model, "out").inc(rec.completion_tokens)
        ttft = rec.ttft_ms
        if ttft is not None:
            self._child(self.ttft, model).observe(ttft / 1000)
        self._child(self.duration, route).observe(rec.duration_ms / 1000)

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered: the lookup is on every request's path."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*labels)
            if len(self._children) < 10_000:  # bounded: labels come from routes and model names
                self._children[key] = child
        return child

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
