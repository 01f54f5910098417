"""Serving metrics in Prometheus' text format: counters and latency histograms kept by the
request handlers, gauges read from the engine when scraped."""

from __future__ import annotations

import bisect
from collections import Counter

from hybrid.engine import Engine

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def render(self, name: str) -> list[str]:
        lines, total = [], 0
        for bound, n in zip((*map(str, self.buckets), "+Inf"), self.counts):
            total += n
            lines.append(f'{name}_bucket{{le="{bound}"}} {total}')
        return lines + [f"{name}_sum {self.sum}", f"{name}_count {total}"]


class Metrics:
    def __init__(self):
        self.requests: Counter[str] = Counter()  # by finish reason
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.cached_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)

    def render(self, engine: Engine) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, doc: str, samples: list[str]) -> None:
            out.extend([f"# HELP hybrid_{name} {doc}", f"# TYPE hybrid_{name} {kind}"])
            out.extend(f"hybrid_{s}" for s in samples)

        metric("requests_total", "counter", "Finished requests, by finish reason.",
               [f'requests_total{{finish_reason="{r}"}} {n}' for r, n in sorted(self.requests.items())])
        metric("prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
               [f"prompt_tokens_total {self.prompt_tokens}"])
        metric("generation_tokens_total", "counter", "Generated tokens.",
               [f"generation_tokens_total {self.generation_tokens}"])
        metric("prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
               [f"prefix_cache_hit_tokens_total {self.cached_tokens}"])
        metric("time_to_first_token_seconds", "histogram", "From request arrival to its first token.",
               self.ttft.render("time_to_first_token_seconds"))
        metric("inter_token_latency_seconds", "histogram", "Between consecutive tokens of a request.",
               self.itl.render("inter_token_latency_seconds"))
        pages = engine.pages
        metric("kv_pages_used", "gauge", "KV cache pages held by requests.", [f"kv_pages_used {pages.num_used}"])
        metric("kv_pages_cached", "gauge", "KV cache pages kept only for the prefix cache.",
               [f"kv_pages_cached {pages.num_cached}"])
        metric("prefix_cache_pages", "gauge", "KV cache pages the prefix cache can hand out, held or not.",
               [f"prefix_cache_pages {len(pages.cached)}"])
        metric("kv_pages_total", "gauge", "KV cache pages.", [f"kv_pages_total {pages.num_pages}"])
        metric("requests_running", "gauge", "Requests holding KV pages.",
               [f"requests_running {len(engine.scheduler.running)}"])
        metric("requests_waiting", "gauge", "Requests queued for KV pages.",
               [f"requests_waiting {len(engine.scheduler.waiting)}"])
        metric("forward_seconds_total", "counter", "Time in forward passes.",
               [f"forward_seconds_total {engine.forward_seconds}"])
        metric("expert_wait_seconds_total", "counter", "Time forward passes waited for routed experts.",
               [f"expert_wait_seconds_total {engine.expert_wait_s()}"])
        return "\n".join(out) + "\n"
