"""Serving metrics, exposed by prometheus-client: counters and latency histograms kept by the
request handlers, the engine's state read when scraped. Each server has a registry of its own, so
several in one process do not collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from hybrid.engine import Engine

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self, engine: Engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("hybrid_requests", "Finished requests, by finish reason.", ["finish_reason"],
                                registry=r)
        self.prompt_tokens = Counter("hybrid_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("hybrid_generation_tokens", "Generated tokens.", registry=r)
        self.cached_tokens = Counter("hybrid_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.",
                                     registry=r)
        self.ttft = Histogram("hybrid_time_to_first_token_seconds", "From request arrival to its first token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("hybrid_inter_token_latency_seconds", "Between consecutive tokens of a request.",
                             buckets=ITL_BUCKETS, registry=r)
        r.register(EngineState(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples `hybrid_{name}` whose labels include `labels`."""
        return sum(s.value for family in self.registry.collect() for s in family.samples
                   if s.name == f"hybrid_{name}" and labels.items() <= s.labels.items())


class EngineState:
    """The engine's KV pages, queues and time, read when scraped."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        engine, pages = self.engine, self.engine.pages
        for name, doc, value in (
                ("kv_pages_used", "KV cache pages held by requests.", pages.num_used),
                ("kv_pages_cached", "KV cache pages kept only for the prefix cache.", pages.num_cached),
                ("prefix_cache_pages", "KV cache pages the prefix cache can hand out, held or not.", len(pages.cached)),
                ("kv_pages_total", "KV cache pages.", pages.num_pages),
                ("requests_running", "Requests holding KV pages.", len(engine.scheduler.running)),
                ("requests_waiting", "Requests queued for KV pages.", len(engine.scheduler.waiting))):
            yield GaugeMetricFamily(f"hybrid_{name}", doc, value=value)
        yield CounterMetricFamily("hybrid_forward_seconds", "Time in forward passes.", value=engine.forward_seconds)
        yield CounterMetricFamily("hybrid_expert_wait_seconds", "Time forward passes waited for routed experts.",
                                  value=engine.expert_wait_s())
