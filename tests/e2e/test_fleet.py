"""A fleet of real ``gateway serve`` processes on one Redis, with different adapter sets,
killed with SIGKILL and restarted at random under mixed load (the short run of
``bench/fleet_soak.py``; docs/reliability.md has the long one)."""

from __future__ import annotations

from bench.fleet_soak import TELEGRAM_LEASE, soak


async def test_three_instances_killed_at_random_lose_and_repeat_nothing(tmp_path):
    report = await soak(tmp_path, instances=3, cycles=2, redis_restarts=1, lease_ttl_s=4)
    assert report.lost == []
    assert report.duplicated == []
    assert all(report.acknowledged[kind] > 0 for kind in ("intake", "sms", "telegram"))
    # every lease held by exactly one instance at a time, whoever was killed
    assert report.most_holders[TELEGRAM_LEASE] == 1
    assert report.most_holders["watcher"] == 1
    assert max(report.most_holders.values()) == 1
    # Telegram saw one poller at a time, and every killed poller was replaced
    assert report.most_polling == 1 and report.conflicts == 0
    assert report.holder_kills >= 1
    assert len(report.takeovers_s) == report.holder_kills


async def test_on_sentinel_a_failover_under_a_killed_fleet_loses_nothing(tmp_path):
    """The same on a master, two replicas and three Sentinels with ``min_replicas = 1``: the
    master is killed with SIGKILL and a replica promoted while instances are killed too."""
    report = await soak(
        tmp_path, instances=3, cycles=1, redis_restarts=1, lease_ttl_s=4, sentinel=True
    )
    assert report.lost == [] and report.duplicated == []
    assert sum(report.acknowledged.values()) > 0
    assert max(report.most_holders.values()) == 1
    assert report.most_polling == 1
    assert len(report.takeovers_s) == report.holder_kills == 1
