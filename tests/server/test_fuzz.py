"""Hypothesis: the core parsers answer hostile input with their own error, never a crash."""

from __future__ import annotations

import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.queueing.spool import Spool
from gateway.server.config import ConfigError, parse_settings
from gateway.server.intake_api import BadRequest, parse_intake

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
intake_fields = st.sampled_from(
    [
        "channel",
        "sender",
        "recipient",
        "subject",
        "text",
        "external_id",
        "language",
        "confidential",
        "meta",
        "thread",
        "origin_at",
        "other",
    ]
)


@given(st.dictionaries(intake_fields, json_values, max_size=8) | json_values)
def test_parse_intake_accepts_or_rejects_cleanly(body):
    try:
        inbound = parse_intake(body, 1_795_594_483_000_000, "api")
    except BadRequest as exc:
        assert str(exc)
    else:
        assert inbound.channel in ("voice", "sms", "email", "chat", "web")
        assert "\x00" not in inbound.text


@given(
    st.dictionaries(st.sampled_from(["redis", "sla", "http", "api", "adapters", "x"]), json_values)
)
def test_config_loader_reports_errors_never_crashes(raw):
    try:
        parse_settings(raw)
    except ConfigError as exc:
        assert all(key is not None for key, _ in exc.errors)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=50)
@given(st.lists(st.binary(max_size=200), max_size=10))
def test_spool_reader_quarantines_any_garbage(tmp_path, lines):
    spool = Spool(tmp_path / "spool")
    spool.check_writable()
    segment = spool.dir / "segment-00000000000000000001.log"
    body = b"\n".join(b"%08x %s" % (zlib.crc32(line), line) for line in lines)
    segment.write_bytes(body)
    records = spool._read_segment(segment)
    assert records == []  # none of these is a valid record, all are set aside


# ---------------------------------------------------------------- the campaign, briefly
# tools/fuzz_campaign.py runs these for minutes (figures in docs/reliability.md); here each
# parser and each listener gets a short run so a regression shows in `make test`.


def test_campaign_short_run_of_every_parser() -> None:
    import random

    from tools.fuzz_campaign import _targets, run_inprocess

    for name, (seeds, parse, expected) in _targets().items():
        result = run_inprocess(name, seeds, parse, expected, 0.3, 400, 5.0, random.Random(7))
        assert result["inputs"] > 0
        assert result["crashes"] == 0 and result["hangs"] == 0, result


async def test_campaign_short_run_of_smtp_commands_and_data_in_process() -> None:
    import random

    from tools.fuzz_campaign import run_smtp_protocol

    result = await run_smtp_protocol(0.5, 600, 10.0, random.Random(7))
    assert result["inputs"] > 0 and result["messages"] > 0, result
    assert result["crashes"] == 0 and result["hangs"] == 0, result
    assert result["still_serving"], result


async def test_campaign_short_run_of_every_listener(redis_url, prefix) -> None:
    import random

    from tools.fuzz_campaign import run_sockets

    results = await run_sockets(0.3, 10.0, random.Random(7), 4, redis_url=redis_url,
                                prefix=prefix)
    assert len(results) == 8
    for result in results:
        assert result["inputs"] > 0, result
        assert result["hangs"] == 0 and not result.get("status_500"), result
