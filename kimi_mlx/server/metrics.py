"""/metrics: Prometheus text format (prometheus-client), one registry per server.

HTTP side: requests by endpoint and status, time to first token, request latency, tokens.
Engine side (read at scrape time): requests waiting / prefilling / decoding, the engine's
counters, and the state cache's size, entries, hits and misses.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        e = self.engine
        g = GaugeMetricFamily("kimi_mlx_requests", "Requests in the engine by state", labels=["state"])
        for state, n in e.load.items():
            g.add_metric([state], n)
        yield g
        for name, value in e.stats.items():
            yield CounterMetricFamily(f"kimi_mlx_engine_{name}", f"Engine counter: {name}", value=value)
        sc = e.state_cache
        if sc is not None:
            yield GaugeMetricFamily("kimi_mlx_state_cache_bytes", "Bytes of state snapshots in memory", value=sc.nbytes)
            yield GaugeMetricFamily("kimi_mlx_state_cache_spilled_bytes", "Bytes of snapshots on disk",
                                    value=sc.spilled_nbytes)
            yield GaugeMetricFamily("kimi_mlx_state_cache_entries", "Snapshots in memory", value=len(sc))
            yield CounterMetricFamily("kimi_mlx_state_cache_hits", "Lookups that found a snapshot", value=sc.hits)
            yield CounterMetricFamily("kimi_mlx_state_cache_misses", "Lookups that found none", value=sc.misses)


class Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.requests = Counter("kimi_mlx_http_requests", "HTTP completion requests", ["endpoint", "status"],
                                registry=self.registry)
        self.ttft = Histogram("kimi_mlx_time_to_first_token_seconds", "Time to first token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.latency = Histogram("kimi_mlx_request_seconds", "Request latency (whole response)",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("kimi_mlx_tokens", "Tokens of finished requests", ["kind"], registry=self.registry)
        self.registry.register(_EngineCollector(engine))

    def request(self, endpoint: str, status: int, seconds: float | None = None, usage: dict | None = None) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if seconds is not None and status == 200:
            self.latency.observe(seconds)
        if usage:
            self.tokens.labels("prompt").inc(usage["prompt_tokens"])
            self.tokens.labels("cached").inc(usage["cached_tokens"])
            self.tokens.labels("completion").inc(usage["completion_tokens"])

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
