"""/metrics: the engine loop's snapshot in Prometheus text format (prometheus-client).

A custom collector reads the snapshot at scrape time, so the server keeps no second copy of any
counter and the engine thread is never touched by the scrape.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class LoopCollector:
    def __init__(self, pipe) -> None:
        self.pipe = pipe

    def collect(self):
        m = self.pipe.get_metrics()
        e = m.engine
        gauges = [
            ("kvcrush_requests_running", "Requests holding KV blocks (prefilling or decoding)", e.running),
            ("kvcrush_requests_waiting", "Requests queued or preempted, waiting for KV blocks", e.waiting),
            ("kvcrush_kv_blocks_used", "KV blocks in use (fullest layer)", e.kv_blocks_used),
            ("kvcrush_kv_blocks_free", "KV blocks free (fullest layer)", e.kv_blocks_total - e.kv_blocks_used),
            ("kvcrush_kv_bytes_used", "Bytes of the KV blocks in use, all layers", e.kv_bytes_used),
            ("kvcrush_kv_blocks_total", "KV blocks in the pool (per layer)", e.kv_blocks_total),
            ("kvcrush_prompt_tokens_per_second", "Prompt tokens processed per second (last 10 s)",
             m.prompt_tokens_per_s),
            ("kvcrush_generation_tokens_per_second", "Tokens generated per second (last 10 s)",
             m.generation_tokens_per_s),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = [
            ("kvcrush_evictions", "Eviction passes", e.evictions),
            ("kvcrush_tokens_evicted", "KV slots freed by eviction (per layer)", e.tokens_evicted),
            ("kvcrush_preemptions", "Sequences preempted to free KV blocks (recomputed later)", e.preemptions),
            ("kvcrush_prompt_tokens", "Prompt tokens processed", m.prompt_tokens),
            ("kvcrush_generation_tokens", "Tokens generated", m.generation_tokens),
            ("kvcrush_engine_steps", "Engine steps", m.steps),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)
        finished = CounterMetricFamily("kvcrush_requests_finished", "Requests ended, by status", labels=["status"])
        for status, n in sorted(m.requests_finished.items()):
            finished.add_metric([status], n)
        yield finished
        modes = CounterMetricFamily("kvcrush_requests_by_eviction_mode",
                                    "Requests ended, by eviction path (none, after_prompt, memory_bounded)",
                                    labels=["mode"])
        for mode, n in sorted(m.requests_by_eviction_mode.items()):
            modes.add_metric([mode], n)
        yield modes


def metrics_registry(pipe) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LoopCollector(pipe))
    return registry


def render_metrics(registry: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE_LATEST
