"""Prometheus metrics of one app (its own registry: several apps can live in one process)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import get_args

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guard.config import PolicyKind

GENERATION_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
ENDPOINTS = (*GENERATION_ENDPOINTS, "/v1/models", "/health", "/metrics")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """Request, token, guard and latency metrics.

    Args:
        registry: where to register (default: a fresh ``CollectorRegistry``).
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, *, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "trajguard_requests",
            "HTTP requests by endpoint and status.",
            ["endpoint", "status"],
            registry=r,
        )
        self.running = Gauge(
            "trajguard_num_requests_running",
            "Generation requests being served (streams count until done).",
            registry=r,
        )
        self.waiting = Gauge(
            "trajguard_num_requests_waiting",
            "Generation requests queued for a slot (none: over the limit the answer is 429).",
            registry=r,
        )
        self.prompt_tokens = Counter(
            "trajguard_prompt_tokens", "Prompt tokens (incl. prefill).", registry=r
        )
        self.generation_tokens = Counter(
            "trajguard_generation_tokens", "Completion tokens released.", registry=r
        )
        self.finished = Counter(
            "trajguard_choices_finished",
            "Finished choices by finish reason.",
            ["finish_reason"],
            registry=r,
        )
        self.triggers = Counter(
            "trajguard_guard_triggers",
            "Choices the guard intervened on, by action.",
            ["action"],
            registry=r,
        )
        self.aborted = Counter(
            "trajguard_requests_aborted",
            "Requests aborted before finishing, by reason.",
            ["reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "trajguard_time_to_first_token_seconds",
            "Arrival to first released text.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "trajguard_inter_token_latency_seconds",
            "Gap between released outputs per token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_TriggerRate(self.requests, self.triggers))

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


def _totals(counter: Counter, *labels: str) -> dict[tuple[str, ...], float]:
    """A labelled counter's totals by the values of ``labels``."""
    return {
        tuple(sample.labels[name] for name in labels): sample.value
        for family in counter.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    }


class _TriggerRate(Collector):
    """``trajguard_guard_triggers_per_1k_requests{action}``, computed at exposition.

    Guard triggers (per choice) per 1,000 generation requests answered 200.
    """

    def __init__(self, requests: Counter, triggers: Counter) -> None:
        self.requests = requests
        self.triggers = triggers

    def collect(self) -> Iterator[GaugeMetricFamily]:
        served = sum(
            value
            for (endpoint, status), value in _totals(self.requests, "endpoint", "status").items()
            if endpoint in GENERATION_ENDPOINTS and status == "200"
        )
        triggered = _totals(self.triggers, "action")
        family = GaugeMetricFamily(
            "trajguard_guard_triggers_per_1k_requests",
            "Guard triggers per 1,000 generation requests answered 200, by action.",
            labels=["action"],
        )
        for action in get_args(PolicyKind):
            count = triggered.get((action,), 0.0)
            family.add_metric([action], 1000.0 * count / served if served else 0.0)
        yield family


class MetricsMiddleware:
    """Pure ASGI: count every HTTP request by endpoint and final status."""

    def __init__(self, app: ASGIApp, *, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # if the app dies before starting a response

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()


class LatencyTracker:
    """TTFT and inter-token latency of one choice."""

    __slots__ = ("last", "metrics", "start")

    def __init__(self, metrics: ServerMetrics | None, start: float) -> None:
        self.metrics = metrics
        self.start = start
        self.last: float | None = None

    def observe(self, n_tokens: int) -> None:
        """Record an output that released ``n_tokens`` tokens."""
        if self.metrics is None or n_tokens <= 0:
            return
        now = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            self.metrics.itl.observe((now - self.last) / n_tokens)
        self.last = now
