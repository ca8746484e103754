"""Prometheus metrics of one gateway instance (its own registry, so tests can run several).

Every per-adapter series carries an ``adapter`` label (the ``[adapters.NAME]`` name) next to
``channel``; adapters report through the ``AdapterMetrics`` in their ``AdapterContext``. The
names are listed in docs/operations.md; deploy/grafana and deploy/prometheus use them.
"""

from __future__ import annotations

import bisect
import time
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from gateway import __version__

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
SLA_BUCKETS = (5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0)
"""Edge-to-stamp times: 15 s is the answer-rate mark, the rest spans GB/T 33358 deadlines."""
SESSION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The gateway's counters, gauges and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._deferred = _Flush()
        r.register(self._deferred)  # first: a read of the registry adds what they hold first
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes...
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        build = Gauge("gateway_build_info", "Always 1: the version", ["version"], registry=r)
        build.labels(__version__).set(1)
        per_adapter = ["channel", "adapter"]
        self.received = Counter(
            "gateway_contacts_received", "Contacts handed to Intake", per_adapter, registry=r
        )
        self.enqueued = Counter(
            "gateway_contacts_enqueued", "Contacts written to the stream", per_adapter, registry=r
        )
        self.duplicate = Counter(
            "gateway_contacts_duplicate",
            "Redeliveries answered with the first id",
            per_adapter,
            registry=r,
        )
        self.spooled = Counter(
            "gateway_contacts_spooled",
            "Contacts written to the local spool",
            per_adapter,
            registry=r,
        )
        self.refused = Counter(
            "gateway_contacts_refused",
            "Contacts neither Redis nor the spool could take",
            per_adapter,
            registry=r,
        )
        self.replayed = Counter(
            "gateway_spool_replayed", "Contacts moved from the spool to Redis", registry=r
        )
        self.edge_to_enqueue = Histogram(
            "gateway_edge_to_enqueue_seconds",
            "From the adapter's edge stamp to the stream write",
            per_adapter,
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
        self.stream_backlog = Gauge(
            "gateway_stream_backlog",
            "Entries kept for the slowest consumer group of a stream (0: no group reads it)",
            ["stream"],
            registry=r,
        )
        self.intake_refusing = Gauge(
            "gateway_intake_refusing",
            "1 while new contacts are refused: backlog or Redis memory past its bound",
            registry=r,
        )
        self.overload_refused = Counter(
            "gateway_overload_refused",
            "Contacts refused because the process was overloaded ([limits] in_flight, loop_lag)",
            registry=r,
        )
        self.in_flight = Gauge(
            "gateway_contacts_in_flight", "Contacts submitted and not yet answered", registry=r
        )
        self.dashboard_behind = Gauge(
            "gateway_dashboard_behind_seconds",
            "How late the wallboard is: the age of the oldest event its reader has not read"
            " (0: none waits)",
            registry=r,
        )
        self.loop_lag = Gauge(
            "gateway_loop_lag_seconds", "How late the event loop ran at its last probe",
            registry=r,
        )
        self.replies_waiting = Gauge(
            "gateway_replies_waiting",
            "Replies routed to an adapter and not yet sent (fleet-wide)",
            ["adapter"],
            registry=r,
        )
        self.replies_held = Gauge(
            "gateway_replies_held",
            "Replies waiting for an adapter that no live instance runs (fleet-wide)",
            ["adapter"],
            registry=r,
        )
        self.replies = Counter(
            "gateway_replies",
            "Replies handled, by outcome (sent, failed, retried)",
            ["channel", "adapter", "outcome"],
            registry=r,
        )
        self.http_requests = Counter(
            "gateway_http_requests",
            "HTTP requests to the shared server, by route pattern, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_fast = Counter(
            "gateway_http_fast_requests",
            "Requests answered from the connection without aiohttp (taken), and those whose "
            "fast handler failed (aiohttp answered them)",
            ["route", "outcome"],
            registry=r,
        )
        self.http_duration = Histogram(
            "gateway_http_request_duration_seconds",
            "HTTP request handling time, by route pattern",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        per_session = ["adapter", "protocol"]
        self.sessions = Counter(
            "gateway_sessions",
            "Protocol sessions accepted (agi: FastAGI, smtp: SMTP connections)",
            per_session,
            registry=r,
        )
        self.sessions_active = Gauge(
            "gateway_sessions_active", "Protocol sessions open now", per_session, registry=r
        )
        self.session_duration = Histogram(
            "gateway_session_duration_seconds",
            "From accepting a session to its end",
            per_session,
            buckets=SESSION_BUCKETS,
            registry=r,
        )
        self._sessions: dict[tuple[str, str], SessionCounts] = {}
        self.smtp_replies = Counter(
            "gateway_smtp_replies", "SMTP replies sent, by reply code", ["adapter", "code"],
            registry=r,
        )
        self.ami_connected = Gauge(
            "gateway_ami_connected", "1 while the AMI link is logged in", ["adapter"], registry=r
        )
        self.ami_reconnects = Counter(
            "gateway_ami_reconnects", "AMI connection attempts after the first", ["adapter"],
            registry=r,
        )
        self.ami_event_lag = Histogram(
            "gateway_ami_event_lag_seconds",
            "From an AMI event's Timestamp (timestampevents = yes) to its handling",
            ["adapter"],
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.outbound_wait = Histogram(
            "gateway_outbound_rate_wait_seconds",
            "Time an outbound send waited for the adapter's send rate",
            ["adapter"],
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.stamps = Histogram(
            "gateway_deadline_stamp_seconds",
            "From the edge stamp to the answered, abandoned, responded or acknowledged stamp",
            ["type", "met"],
            buckets=SLA_BUCKETS,
            registry=r,
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
            ["type", "channel", "policy"],
            registry=r,
        )
        self.dashboard_steps_failed = Counter(
            "gateway_dashboard_steps_failed",
            "Events written whose wallboard step failed in Redis (the wallboard does not count"
            " them; the Redis server's log says why), by writer: stamp, emit, watcher",
            ["writer"],
            registry=r,
        )
        for writer in ("stamp", "emit", "watcher"):  # scraped as 0 before the first
            self.dashboard_steps_failed.labels(writer)
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
        # supervised background loops (gateway/server/supervise.py)
        self.loop_up = Gauge(
            "gateway_loop_up", "1 while a supervised background loop runs", ["loop"], registry=r
        )
        self.loop_restarts = Counter(
            "gateway_loop_restarts",
            "Restarts of a supervised background loop after an error",
            ["loop"],
            registry=r,
        )

        self._intake: dict[tuple[str, str], IntakeMetrics] = {}

    def intake(self, channel: str, adapter: str) -> IntakeMetrics:
        """The intake series of one adapter, made once: ``labels()`` costs a lookup per call."""
        found = self._intake.get((channel, adapter))
        if found is None:
            found = self._intake[(channel, adapter)] = IntakeMetrics(self, channel, adapter)
        return found

    def deferred_counter(self, child: Any) -> DeferredCounter:
        """A counter's labelled series, counted on the hot path in a plain number."""
        made = DeferredCounter(child)
        self._deferred.series.append(made)
        return made

    def deferred_histogram(self, child: Any) -> DeferredHistogram:
        """A histogram's labelled series, observed on the hot path in plain numbers."""
        made = DeferredHistogram(child)
        self._deferred.series.append(made)
        return made

    def session_counts(self, adapter: str, protocol: str) -> SessionCounts:
        """The session series of one adapter and protocol, made once."""
        found = self._sessions.get((adapter, protocol))
        if found is None:
            found = self._sessions[(adapter, protocol)] = SessionCounts(self, adapter, protocol)
        return found

    def adapter(self, name: str) -> AdapterMetrics:
        """The view an adapter reports through (its ``AdapterContext.metrics``)."""
        return AdapterMetrics(self, name)

    def render(self) -> bytes:
        """Return the text exposition format."""
        return generate_latest(self.registry)


class _Flush:
    """A collector of no series of its own, registered first: a read of the registry
    (``render``, ``get_sample_value``) first adds what the deferred series hold to their
    prometheus series, so every read sees every count."""

    def __init__(self) -> None:
        self.series: list[DeferredCounter | DeferredHistogram] = []

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        for series in self.series:
            series.flush()
        return []


class DeferredCounter:
    """A counter's series counted in a plain number on the hot path (prometheus_client's
    ``inc`` takes a lock and checks its arguments: about 0.7 µs, three of them a contact) and
    added to the series when the registry is read (``_Flush``). The event loop's thread only:
    the metrics are rendered there too."""

    __slots__ = ("child", "count")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.count = 0.0

    def inc(self, amount: float = 1) -> None:
        self.count += amount

    def flush(self) -> None:
        count = self.count
        if count:
            self.count = 0.0
            self.child.inc(count)


class DeferredHistogram:
    """A histogram's series observed in plain numbers on the hot path (its bucket by one
    ``bisect``, not prometheus_client's locked loop over the bounds: about 1.5 µs) and added
    to the series' buckets and sum when the registry is read (``_Flush``). The event loop's
    thread only, as ``DeferredCounter``."""

    __slots__ = ("bounds", "child", "counts", "total")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.bounds = tuple(child._upper_bounds)  # the last one is +Inf
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, amount: float) -> None:
        # the first bound at or above the amount: prometheus_client's ``amount <= bound``
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1
        self.total += amount

    def flush(self) -> None:
        counts = self.counts
        if not any(counts):
            return
        self.counts = [0] * len(self.bounds)
        total, self.total = self.total, 0.0
        child = self.child
        child._sum.inc(total)
        for bucket, count in zip(child._buckets, counts, strict=True):
            if count:
                bucket.inc(count)


class IntakeMetrics:
    """The intake counters of one adapter, resolved once; the ones every contact moves
    deferred (``Metrics.deferred_counter``)."""

    __slots__ = ("duplicate", "edge_to_enqueue", "enqueued", "received", "refused", "spooled")

    def __init__(self, metrics: Metrics, channel: str, adapter: str) -> None:
        self.received = metrics.deferred_counter(metrics.received.labels(channel, adapter))
        self.enqueued = metrics.deferred_counter(metrics.enqueued.labels(channel, adapter))
        self.duplicate = metrics.duplicate.labels(channel, adapter)
        self.spooled = metrics.spooled.labels(channel, adapter)
        self.refused = metrics.refused.labels(channel, adapter)
        self.edge_to_enqueue = metrics.deferred_histogram(
            metrics.edge_to_enqueue.labels(channel, adapter)
        )


class SessionCounts:
    """The session series of one adapter and protocol (``gateway_sessions_total``,
    ``gateway_sessions_active``, ``gateway_session_duration_seconds``), resolved once: the
    total and the durations deferred (``DeferredCounter``, ``DeferredHistogram``), the open
    sessions a plain number the gauge reads when the metrics are rendered. A session costs a
    few additions instead of four prometheus updates (each a lock and two or three Python
    calls: about 2 us a FastAGI call)."""

    __slots__ = ("active", "duration", "total")

    def __init__(self, metrics: Metrics, adapter: str, protocol: str) -> None:
        self.total = metrics.deferred_counter(metrics.sessions.labels(adapter, protocol))
        self.duration = metrics.deferred_histogram(
            metrics.session_duration.labels(adapter, protocol)
        )
        self.active = 0
        metrics.sessions_active.labels(adapter, protocol).set_function(lambda: self.active)

    def opened(self) -> float:
        """Count a session; return its start for ``closed``."""
        self.total.inc()
        self.active += 1
        return time.monotonic()

    def closed(self, started: float) -> None:
        self.active -= 1
        self.duration.observe(time.monotonic() - started)


class AdapterMetrics:
    """What one adapter's listeners and links report, labelled ``adapter=<name>``."""

    def __init__(self, metrics: Metrics, adapter: str) -> None:
        self.metrics = metrics
        self.adapter = adapter
        self._replies: dict[str, DeferredCounter] = {}
        self._event_lag: DeferredHistogram | None = None

    @classmethod
    def detached(cls) -> AdapterMetrics:
        """Series on a registry of their own (an adapter made outside a ``Gateway``)."""
        return cls(Metrics(), "detached")

    def sessions(self, protocol: str) -> SessionCounts:
        """This adapter's counts of ``protocol`` sessions (``opened`` and ``closed`` each)."""
        return self.metrics.session_counts(self.adapter, protocol)

    def session_opened(self, protocol: str) -> float:
        """Count a session; return its start for ``session_closed``."""
        return self.sessions(protocol).opened()

    def session_closed(self, protocol: str, started: float) -> None:
        self.sessions(protocol).closed(started)

    def smtp_reply(self, code: str) -> None:
        counter = self._replies.get(code)
        if counter is None:
            if len(self._replies) >= 64:  # codes come from our own replies; bounded all the same
                self.metrics.smtp_replies.labels(self.adapter, code).inc()
                return
            counter = self._replies[code] = self.metrics.deferred_counter(
                self.metrics.smtp_replies.labels(self.adapter, code)
            )
        counter.inc()  # a plain number (four replies a mail); the series has it when read

    def ami_link(self, up: bool) -> None:
        self.metrics.ami_connected.labels(self.adapter).set(1 if up else 0)

    def ami_reconnect(self) -> None:
        self.metrics.ami_reconnects.labels(self.adapter).inc()

    def ami_event_lag(self, seconds: float) -> None:
        # every AMI event (tens a call): the series resolved once, observed in plain numbers
        lag = self._event_lag
        if lag is None:
            lag = self._event_lag = self.metrics.deferred_histogram(
                self.metrics.ami_event_lag.labels(self.adapter))
        lag.observe(max(0.0, seconds))

    def rate_wait(self, seconds: float) -> None:
        self.metrics.outbound_wait.labels(self.adapter).observe(seconds)
