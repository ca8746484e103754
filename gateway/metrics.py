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

from gateway.records import CHANNELS

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
        # case systems: consumer API, push webhooks, deadline watcher
        self.api_requests = Counter(
            "gateway_api_requests",
            "Consumer API requests, by operation and status",
            ["operation", "status"],
            registry=r,
        )
        self.api_delivered = Counter(
            "gateway_api_delivered",
            "Entries handed out by the consumer API",
            ["stream"],
            registry=r,
        )
        self.api_acked = Counter(
            "gateway_api_acked",
            "Entries acknowledged through the consumer API",
            ["stream"],
            registry=r,
        )
        self.push_deliveries = Counter(
            "gateway_push_deliveries",
            "Webhook POSTs, by subscriber and outcome (delivered, failed, parked, replayed)",
            ["subscriber", "outcome"],
            registry=r,
        )
        self.push_latency = Histogram(
            "gateway_push_latency_seconds",
            "From the stream entry's time to its successful delivery",
            ["subscriber"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.push_deadletter = Gauge(
            "gateway_push_deadletter",
            "Entries parked in a dead-letter stream",
            ["subscriber"],
            registry=r,
        )
        self.deadline_events = Counter(
            "gateway_deadline_events",
            "warning and breached events emitted by this instance's watcher",
            ["type", "channel"],
            registry=r,
        )
        self.deadline_lag = Histogram(
            "gateway_deadline_lag_seconds",
            "From the moment a warning or deadline was due to its event",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.deadlines_open = Gauge(
            "gateway_deadlines_open",
            "Contacts whose deadline is neither met nor passed",
            registry=r,
        )
        # supervised background loops (gateway/supervise.py)
        self.loop_up = Gauge(
            "gateway_loop_up", "1 while a supervised background loop runs", ["loop"], registry=r
        )
        self.loop_restarts = Counter(
            "gateway_loop_restarts",
            "Restarts of a supervised background loop after an error",
            ["loop"],
            registry=r,
        )

        self.per_channel = {c: ChannelMetrics(self, c) for c in CHANNELS}
        """Label children made once per channel: ``labels()`` costs a lookup per call."""

    def render(self) -> bytes:
        """Return the text exposition format."""
        return generate_latest(self.registry)


class ChannelMetrics:
    """The intake counters of one channel, resolved once."""

    __slots__ = ("duplicate", "edge_to_enqueue", "enqueued", "received", "refused", "spooled")

    def __init__(self, metrics: Metrics, channel: str) -> None:
        self.received = metrics.received.labels(channel)
        self.enqueued = metrics.enqueued.labels(channel)
        self.duplicate = metrics.duplicate.labels(channel)
        self.spooled = metrics.spooled.labels(channel)
        self.refused = metrics.refused.labels(channel)
        self.edge_to_enqueue = metrics.edge_to_enqueue.labels(channel)
