"""Prometheus metrics of the OpenAI-compatible server (NanoFlow §4 serving front end), under vLLM's metric names where
vLLM has one (so its Grafana dashboards read them), lwjax's own otherwise. One registry per app.
"""

from __future__ import annotations

import prometheus_client as prom

# Latency buckets (seconds) as vLLM's: TTFT from 1 ms, inter-token from 10 ms, requests up to minutes.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)


class ServerMetrics:
  """The server's counters, gauges and histograms; `exposition()` is the /metrics body."""

  def __init__(self, model_name: str):
    self.registry = prom.CollectorRegistry()
    self.model_name = model_name
    r, m = self.registry, ["model_name"]
    self.running = prom.Gauge("vllm:num_requests_running", "Requests in the engine's running batch", m, registry=r)
    self.waiting = prom.Gauge("vllm:num_requests_waiting", "Requests waiting for admission", m, registry=r)
    self.kv_usage = prom.Gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache pages in use (1 = full)", m,
                               registry=r)
    self.prompt_tokens = prom.Counter("vllm:prompt_tokens", "Prompt tokens admitted", m, registry=r)
    self.generation_tokens = prom.Counter("vllm:generation_tokens", "Tokens generated", m, registry=r)
    self.success = prom.Counter("vllm:request_success", "Requests finished, by finish reason",
                                m + ["finished_reason"], registry=r)
    self.ttft = prom.Histogram("vllm:time_to_first_token_seconds", "From admission to the first token", m,
                               buckets=TTFT_BUCKETS, registry=r)
    self.itl = prom.Histogram("vllm:inter_token_latency_seconds", "Between consecutive tokens of a request", m,
                              buckets=ITL_BUCKETS, registry=r)
    self.e2e = prom.Histogram("vllm:e2e_request_latency_seconds", "From admission to the answer", m,
                              buckets=E2E_BUCKETS, registry=r)
    self.requests = prom.Counter("lwjax_requests", "Requests admitted (each of n choices, each WiM document)", m,
                                 registry=r)
    self.rejected = prom.Counter("lwjax_requests_rejected", "API calls refused with 429 (queue full)", m, registry=r)
    self.failed = prom.Counter("lwjax_requests_failed", "Requests answered with an error after admission", m,
                               registry=r)
    self.outstanding = prom.Gauge("lwjax_requests_outstanding", "Admitted requests not answered yet", m, registry=r)
    self.kv_pages_free = prom.Gauge("lwjax_kv_pages_free", "KV-cache pages free (cached prefix blocks included)", m,
                                    registry=r)
    self.preemptions = prom.Gauge("lwjax_preemptions", "Preemptions by recomputation so far", m, registry=r)
    self.prefix_hit_tokens = prom.Gauge("lwjax_prefix_hit_tokens", "Prompt tokens served from the prefix cache", m,
                                        registry=r)
    self.failed_iterations = prom.Gauge("lwjax_engine_failed_iterations", "Engine iterations that raised", m,
                                        registry=r)

  def exposition(self, engine, outstanding: int) -> bytes:
    """The Prometheus text format, with the gauges read from the engine now (summed over its data-parallel
    replicas, `engine.replicas`)."""
    name = self.model_name
    replicas = engine.replicas
    pages = sum(e.kv.allocator.num_pages for e in replicas)
    free = sum(e.kv.allocator.num_free for e in replicas)
    self.running.labels(name).set(sum(len(e.scheduler.running) for e in replicas))
    self.waiting.labels(name).set(sum(len(e.scheduler.waiting) for e in replicas))
    self.kv_usage.labels(name).set(1.0 - free / pages)
    self.kv_pages_free.labels(name).set(free)
    self.outstanding.labels(name).set(outstanding)
    self.preemptions.labels(name).set(sum(e.scheduler.num_preemptions for e in replicas))
    self.prefix_hit_tokens.labels(name).set(sum(e.scheduler.num_prefix_hit_tokens for e in replicas))
    self.failed_iterations.labels(name).set(sum(e.num_failed_iterations for e in replicas))
    return prom.generate_latest(self.registry)
