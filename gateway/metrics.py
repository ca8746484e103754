"""Prometheus metrics of one gateway instance (its own registry, so tests can run several)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # type: ignore[no-untyped-call]

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
    60.0,
)


class Metrics:
    """The gateway's counters, gauges and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "gateway_contacts_received", "Contacts handed to Intake", ["channel"], registry=r
        )
        self.enqueued = Counter(
            "gateway_contacts_enqueued", "Contacts written to the stream", ["channel"], registry=r
        )
        self.duplicate = Counter(
            "gateway_contacts_duplicate",
            "Redeliveries answered with the first id",
            ["channel"],
            registry=r,
        )
        self.spooled = Counter(
            "gateway_contacts_spooled",
            "Contacts written to the local spool",
            ["channel"],
            registry=r,
        )
        self.refused = Counter(
            "gateway_contacts_refused",
            "Contacts neither Redis nor the spool could take",
            ["channel"],
            registry=r,
        )
        self.replayed = Counter(
            "gateway_spool_replayed", "Contacts moved from the spool to Redis", registry=r
        )
        self.edge_to_enqueue = Histogram(
            "gateway_edge_to_enqueue_seconds",
            "From the adapter's edge stamp to the stream write",
            ["channel"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.spool_depth = Gauge("gateway_spool_depth", "Contacts waiting in the spool", registry=r)
        self.spool_oldest = Gauge(
            "gateway_spool_oldest_age_seconds", "Age of the oldest spooled contact", registry=r
        )
        self.stream_length = Gauge(
            "gateway_stream_length", "Entries in the contacts stream", registry=r
        )
        self.redis_up = Gauge("gateway_redis_up", "1 when Redis answers", registry=r)
        self.replies = Counter(
            "gateway_replies", "Replies handled, by outcome", ["channel", "outcome"], registry=r
        )

    def render(self) -> bytes:
        """Return the text exposition format."""
        return generate_latest(self.registry)
