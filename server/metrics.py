"""Prometheus metrics of one gateway, in a registry of its own (several apps may share a
process in tests). Token and latency metrics are observed by the gateway as tokens pass
through it; engine state (queue, KV cache) is read from each replica's ModelInfo."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from protos import mii_pb2 as pb

disable_created_metrics()  # the *_created series only add noise to every scrape
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("mii_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.replica_requests = Counter("mii_replica_requests", "Generations by replica and outcome "
                                        "(ok, error, retried)", ["replica", "outcome"], registry=r)
        self.prompt_tokens = Counter("mii_prompt_tokens", "Prompt tokens processed", ["replica"], registry=r)
        self.generation_tokens = Counter("mii_generation_tokens", "Tokens generated", ["replica"], registry=r)
        self.ttft = Histogram("mii_time_to_first_token_seconds", "Request arrival to first token",
                              ["replica"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("mii_inter_token_latency_seconds", "Time between consecutive tokens of a request",
                             ["replica"], buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("mii_gateway_requests_in_flight", "HTTP requests admitted and not yet done",
                               registry=r)
        self.rejected = Counter("mii_gateway_rejected", "Requests refused with 429 (queue full)", registry=r)
        self.outstanding = Gauge("mii_replica_outstanding_requests", "Generations the gateway has open on "
                                 "the replica", ["replica"], registry=r)
        self.up = Gauge("mii_replica_up", "1 if the replica answers health checks", ["replica"], registry=r)
        self.queue_depth = Gauge("mii_queue_depth", "Requests waiting in the replica's scheduler",
                                 ["replica"], registry=r)
        self.running = Gauge("mii_num_requests_running", "Requests running in the replica's engine",
                             ["replica"], registry=r)
        self.kv_usage = Gauge("mii_kv_cache_usage_ratio", "Share of KV-cache blocks in use", ["replica"], registry=r)
        self.kv_free = Gauge("mii_kv_blocks_free", "Free KV-cache blocks", ["replica"], registry=r)
        self.kv_total = Gauge("mii_kv_blocks_total", "KV-cache blocks", ["replica"], registry=r)
        self.preemptions = Gauge("mii_num_preemptions", "Preemptions since start", ["replica"], registry=r)
        self.aborted = Gauge("mii_num_aborted", "Requests aborted by their caller since start",
                             ["replica"], registry=r)
        self.prefix_hits = Gauge("mii_prefix_cache_hit_tokens", "Prompt tokens whose K/V came from the "
                                 "prefix cache, since start", ["replica"], registry=r)
        self.prefix_queries = Gauge("mii_prefix_cache_query_tokens", "Prompt tokens admitted (the hit "
                                    "rate's denominator), since start", ["replica"], registry=r)

    def observe_replica(self, replica_id: int, up: bool, outstanding: int,
                        info: pb.ModelInfoResponse | None) -> None:
        label = str(replica_id)
        self.up.labels(label).set(1 if up else 0)
        self.outstanding.labels(label).set(outstanding)
        if info is None or not up:
            return
        self.queue_depth.labels(label).set(info.num_waiting)
        self.running.labels(label).set(info.num_running)
        self.kv_usage.labels(label).set(info.kv_cache_usage)
        self.kv_free.labels(label).set(info.kv_blocks_free)
        self.kv_total.labels(label).set(info.kv_blocks_total)
        self.preemptions.labels(label).set(info.num_preemptions)
        self.aborted.labels(label).set(info.num_aborted)
        self.prefix_hits.labels(label).set(info.prefix_cache_hit_tokens)
        self.prefix_queries.labels(label).set(info.prefix_cache_query_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
