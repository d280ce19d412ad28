"""What `disco serve` reports at /metrics (Prometheus text format, prometheus-client), in a registry of its own."""
from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class BytesSent:
    """Every rank's bytes sent per destination and category, as rank 0 last gathered them (they restart from 0
    when the ranks restart, as a counter of a restarted process does)."""

    def __init__(self):
        self.sent: dict[str, list[list[int]]] = {}
        self.lock = threading.Lock()

    def update(self, sent: dict[str, list[list[int]]]) -> None:
        with self.lock:
            self.sent = sent

    def collect(self):
        family = CounterMetricFamily("disco_bytes_sent", "bytes each rank sent to each other rank, by category",
                                     labels=["src", "dst", "category"])
        with self.lock:
            for category, table in self.sent.items():
                for src, row in enumerate(table):
                    for dst, count in enumerate(row):
                        if src != dst:
                            family.add_metric([str(src), str(dst), category], count)
        yield family


class ServiceMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("disco_requests", "HTTP requests answered, by path and status",
                                ["path", "status"], registry=self.registry)
        self.errors = Counter("disco_errors", "requests refused or failed, by kind", ["kind"], registry=self.registry)
        self.latency = Histogram("disco_predict_latency_seconds", "time to answer /v1/predict (successes)",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("disco_batch_size", "images per batch sent to the ranks", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.images_by_budget = Counter("disco_images_by_budget", "images run, by the budget they ran at (a "
                                        "deployment carrying several: ?budget=)", ["budget"], registry=self.registry)
        self.budget_level = Gauge("disco_budget_level", "the budget level of requests that name none (0: the "
                                  "largest; --latency-target-ms moves it)", registry=self.registry)
        self.queue_depth = Gauge("disco_queue_depth", "requests waiting for a batch", registry=self.registry)
        self.ready = Gauge("disco_ready", "1 when every rank has joined and verified its shard", registry=self.registry)
        self.restarts = Counter("disco_rank_restarts", "times the ranks were started again after a failure",
                                registry=self.registry)
        self.bytes_sent = BytesSent()
        self.registry.register(self.bytes_sent)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
