"""The hot path's deferred series (``Metrics.deferred_counter``, ``deferred_histogram``): what a
read of the registry shows is exactly what prometheus_client's own series would show."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from gateway.server.metrics import LATENCY_BUCKETS, Metrics

amounts = st.one_of(
    st.sampled_from([*LATENCY_BUCKETS, 0.0, -1.0, 1e9]),  # on a bound: that bucket (le)
    st.floats(min_value=-1.0, max_value=1e4, allow_nan=False),
)


def samples(metrics: Metrics, name: str) -> dict[str, float]:
    out = {}
    for line in metrics.render().decode().splitlines():
        if line.startswith(name):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


def same(ours: dict[str, float], theirs: dict[str, float]) -> bool:
    """Equal; a sum may differ in its last digits (added in another order)."""
    return ours.keys() == theirs.keys() and all(
        ours[k] == theirs[k]
        or ("_sum" in k and math.isclose(ours[k], theirs[k], rel_tol=1e-9, abs_tol=1e-9))
        for k in ours
    )


@given(st.lists(st.lists(amounts, max_size=30), max_size=4))
def test_deferred_series_render_as_prometheus_clients_own(rounds: list[list[float]]) -> None:
    deferred, direct = Metrics(), Metrics()
    ours = deferred.intake("web", "api")
    theirs = (direct.received.labels("web", "api"),
              direct.edge_to_enqueue.labels("web", "api"))
    for amounts in rounds:  # reads between the rounds: each read sees every count so far
        for amount in amounts:
            ours.received.inc()
            ours.edge_to_enqueue.observe(amount)
            theirs[0].inc()
            theirs[1].observe(amount)
        for name in ("gateway_contacts_received", "gateway_edge_to_enqueue_seconds"):
            assert same(samples(deferred, name), samples(direct, name))
    assert deferred.registry.get_sample_value(
        "gateway_contacts_received_total", {"channel": "web", "adapter": "api"}
    ) == sum(len(a) for a in rounds)
