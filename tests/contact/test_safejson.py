"""Bounded JSON: the shortcut that skips walking a small body answers as the walk does."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.contact import safejson

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)


@given(_json, st.integers(1, 8), st.integers(1, 40), st.booleans())
def test_loads_refuses_exactly_what_the_full_check_refuses(value, depth, string, as_text):
    raw = orjson.dumps(value)
    try:
        safejson.check(value, max_depth=depth, max_string=string)
        expected = None
    except safejson.BadJson as exc:
        expected = str(exc)
    source = raw.decode() if as_text else raw
    if expected is None:
        assert safejson.loads(source, max_depth=depth, max_string=string) == value
    else:
        with pytest.raises(safejson.BadJson) as caught:
            safejson.loads(source, max_depth=depth, max_string=string)
        assert str(caught.value) == expected
