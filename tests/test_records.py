"""Records: JSON round trips, and real output validated against the shipped JSON Schemas."""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any

import jsonschema
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.contact import clock
from gateway.contact.clock import format_time, parse_time
from gateway.contact.ids import uuid7, uuid7_time_ms
from gateway.records import Contact, Event, clean_text


def schema(name: str) -> dict[str, Any]:
    return json.loads(files("gateway.schemas").joinpath(name).read_text())


CONTACT_SCHEMA = schema("contact.schema.json")
EVENT_SCHEMA = schema("event.schema.json")


async def test_real_output_validates_against_schemas(start_gateway, aiohttp_client_session):
    gw = await start_gateway()
    url = f"http://127.0.0.1:{gw.http_port}/v1/intake"
    bodies = [
        {
            "sender": {"address": "+8613800138000", "name": "张三"},
            "text": "路灯坏了",
            "external_id": "a",
        },
        {
            "channel": "sms",
            "sender": "+8613900139000",
            "text": "",
            "origin_at": "2026-11-25T08:00:00+08:00",
        },
        {
            "channel": "voice",
            "sender": {"address": ""},
            "meta": {"agi": {"x": 1}},
            "confidential": True,
        },
        {"channel": "email", "subject": "Re: 投诉", "text": "x" * 1000, "thread": "t1"},
    ]
    for body in bodies:
        async with aiohttp_client_session.post(url, json=body) as resp:
            assert resp.status == 202, await resp.text()
    entries = await gw.redis.xrange(gw.keys.contacts)
    assert len(entries) == 4
    for _, fields in entries:
        jsonschema.validate(json.loads(fields[b"contact"]), CONTACT_SCHEMA)
    events = await gw.redis.xrange(gw.keys.events)
    assert len(events) == 4
    for _, fields in events:
        jsonschema.validate(json.loads(fields[b"event"]), EVENT_SCHEMA)


def test_schema_rejects_a_contact_with_an_unknown_field():
    record = {
        "schema": 1,
        "id": uuid7(),
        "channel": "web",
        "adapter": "api",
        "external_id": "",
        "sender": {"address": "", "name": None},
        "recipient": "",
        "subject": None,
        "text": "",
        "language": None,
        "attachments": [],
        "thread": None,
        "received_at": "2026-11-25T08:00:00.000000Z",
        "origin_at": None,
        "enqueued_at": "2026-11-25T08:00:00.000100Z",
        "deadline": {"kind": "response", "due_at": "2026-11-25T08:03:00.000000Z", "policy": "web"},
        "repeat": {"count": 0, "window": 2592000},
        "confidential": False,
        "meta": {},
    }
    jsonschema.validate(record, CONTACT_SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**record, "extra": 1}, CONTACT_SCHEMA)
    contact = Contact.from_dict(record)
    assert Contact.from_json(contact.to_json()) == contact
    assert contact.to_dict() == record


def test_event_round_trip_and_schema():
    event = Event(
        "c1", "answered", 1_795_594_483_000_001, "asterisk", 1_795_594_498_000_000, 1200, True
    )
    jsonschema.validate(event.to_dict(), EVENT_SCHEMA)
    assert Event.from_json(event.to_json()) == event


def test_uuid7_sorts_by_time_and_is_unique():
    base = 4_000_000_000_000  # ms, far ahead of any id made before in this process
    ids = [uuid7(base + i // 10) for i in range(1000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 1000
    assert uuid7_time_ms(ids[-1]) == base + 99
    assert uuid7(base) > ids[-1]  # an earlier clock reading never sorts before a later id
    for text in ids[::97]:  # the canonical form of an RFC 9562 version 7 UUID
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 7
        assert parsed.variant == uuid.RFC_4122


def test_uuid7_random_bits_differ_between_a_forked_worker_and_its_parent():
    """The random bits come from a pool of ``os.urandom`` bytes: a forked child (a worker of
    ``serve --workers N``) must not make the ids its parent makes next."""
    uuid7()  # the pool is filled in the parent
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, " ".join(uuid7() for _ in range(5)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        child = pipe.read().split()
    parent = [uuid7() for _ in range(5)]
    assert len(child) == 5
    assert not {c[-12:] for c in child} & {p[-12:] for p in parent}


@given(st.integers(min_value=0, max_value=253_402_300_799_999_999))
def test_time_format_round_trips(us):
    text = format_time(us)
    assert text.endswith("Z") and len(text) == 27
    assert parse_time(text) == us


@given(st.lists(st.integers(min_value=0, max_value=253_402_300_799_999_999), min_size=1))
def test_time_format_with_cached_seconds_matches_datetime(stamps):
    for us in stamps + stamps[::-1]:  # seconds apart and back: the prefix cache is per second
        expected = datetime.fromtimestamp(us // 1_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        assert format_time(us) == f"{expected}.{us % 1_000_000:06d}Z"


def _mutated(us: int, at: int, char: str) -> str:
    text = format_time(us)
    return text[:at] + char + text[at + 1 :]


@given(
    st.builds(
        _mutated,
        st.integers(min_value=0, max_value=253_402_300_799_999_999),
        st.integers(min_value=0, max_value=26),
        st.sampled_from("0123456789-T:.Z+z _\u0661"),
    )
)
@example("2026-11-25T08:00:00.12\u0661456Z")  # a digit, but not an ASCII one
@example("2026-11-25T08:00:00.+12345Z")
@example("2026-11-25T08:00:00.1_2345Z")
@example("1970-01-01T00:00.00.000000Z")  # the head alone reads as HH:MM with a fraction
def test_parse_time_fast_path_agrees_with_the_general_parser(text):
    """Our own form (and every one-character change of it) parses as the general parser does:
    the same value, or the same refusal."""
    def parse(fn):
        try:
            return fn(text)
        except ValueError:
            return "ValueError"

    assert parse(parse_time) == parse(clock._parse_time)


@given(st.binary())
def test_clean_text_always_gives_valid_utf8_without_nul(data):
    text = clean_text(data)
    assert "\x00" not in text
    text.encode("utf-8")
