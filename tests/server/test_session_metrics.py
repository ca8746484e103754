"""The session series (``gateway/server/metrics.py``, ``SessionCounts``): counted as plain
numbers, rendered exactly as a prometheus ``Counter``, ``Gauge`` and ``Histogram`` would render
them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway.server.metrics import SESSION_BUCKETS, Metrics


def _session_lines(text: bytes) -> list[str]:
    return [line for line in text.decode().splitlines() if "session" in line]


def test_sessions_render_as_the_prometheus_series_would() -> None:
    durations = {  # bounds themselves fall in their own bucket (le), as in a Histogram
        ("pbx", "agi"): [0.05, 0.1, 0.1000001, 2.5, 4000.0, 0.0],
        ("mail", "smtp"): [30.0, 0.7],
    }
    still_open = {("pbx", "agi"): 2, ("mail", "smtp"): 0}

    metrics = Metrics()
    for (adapter, protocol), taken in durations.items():
        counts = metrics.adapter(adapter).sessions(protocol)
        for seconds in taken:  # what opened() and closed() do, with exact durations
            counts.total.inc()
            counts.duration.observe(seconds)
        for _ in range(still_open[(adapter, protocol)]):
            counts.opened()

    registry = CollectorRegistry()
    labels = ["adapter", "protocol"]
    total = Counter("gateway_sessions", "Protocol sessions accepted (agi: FastAGI, smtp: SMTP "
                    "connections)", labels, registry=registry)
    active = Gauge("gateway_sessions_active", "Protocol sessions open now", labels,
                   registry=registry)
    duration = Histogram("gateway_session_duration_seconds", "From accepting a session to "
                         "its end", labels, buckets=SESSION_BUCKETS, registry=registry)
    for (adapter, protocol), taken in durations.items():
        for seconds in taken:
            total.labels(adapter, protocol).inc()
            duration.labels(adapter, protocol).observe(seconds)
        for _ in range(still_open[(adapter, protocol)]):
            total.labels(adapter, protocol).inc()
        active.labels(adapter, protocol).set(still_open[(adapter, protocol)])

    assert _session_lines(metrics.render()) == _session_lines(generate_latest(registry))


def test_a_closed_session_lands_in_the_bucket_of_its_duration() -> None:
    metrics = Metrics()
    counts = metrics.adapter("pbx").sessions("agi")
    started = counts.opened()
    assert (counts.total.count, counts.active) == (1, 1)
    counts.closed(started - 0.3)  # took 0.3 s and a little
    assert (counts.total.count, counts.active) == (1, 0)
    assert counts.duration.counts[SESSION_BUCKETS.index(0.5)] == 1
    assert sum(counts.duration.counts) == 1
    assert 0.3 <= counts.duration.total < 1.0
    text = metrics.render().decode()
    assert 'gateway_session_duration_seconds_bucket{adapter="pbx",le="0.1",protocol="agi"} 0.0' \
        in text
    assert 'gateway_session_duration_seconds_bucket{adapter="pbx",le="0.5",protocol="agi"} 1.0' \
        in text
    assert 'gateway_sessions_total{adapter="pbx",protocol="agi"} 1.0' in text
