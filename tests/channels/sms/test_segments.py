"""GSM-7 / UCS-2 detection and segment splitting (3GPP TS 23.038 alphabet, 160/153, 70/67)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.channels.sms.segments import (
    GSM7_BASIC,
    GSM7_EXTENSION,
    encoding_for,
    is_gsm7,
    split,
    substitute,
    units,
)

CASES = [
    # label, text, encoding, part lengths in characters
    ("empty", "", "gsm7", [0]),
    ("160 GSM chars: one part", "a" * 160, "gsm7", [160]),
    ("161 GSM chars: 153 + 8", "a" * 161, "gsm7", [153, 8]),
    ("306 GSM chars: two full parts", "b" * 306, "gsm7", [153, 153]),
    ("80 euro signs count double: one part", "€" * 80, "gsm7", [80]),
    ("81 euro signs: 76 + 5, escape never split", "€" * 81, "gsm7", [76, 5]),
    ("escape pair pushed to the next part", "a" * 152 + "{" + "a" * 8, "gsm7", [152, 9]),
    ("GSM accents stay 7-bit", "Ça va? Über 5€ ¿Año?", "gsm7", [20]),
    ("accents outside GSM need UCS-2", "Ça coûte 5€", "ucs2", [11]),
    ("70 Chinese chars: one part", "中" * 70, "ucs2", [70]),
    ("71 Chinese chars: 67 + 4", "中" * 71, "ucs2", [67, 4]),
    ("emoji takes two units", "🙂" * 35, "ucs2", [35]),
    ("surrogate pair never split", "a" * 66 + "🙂" + "b" * 10, "ucs2", [66, 11]),
    ("one Chinese char makes all UCS-2", "Hello 你", "ucs2", [7]),
]


@pytest.mark.parametrize(("label", "text", "encoding", "lengths"), CASES,
                         ids=[c[0] for c in CASES])
def test_split_table(label: str, text: str, encoding: str, lengths: list[int]) -> None:
    segments = split(text)
    assert segments.encoding == encoding
    assert [len(p) for p in segments.parts] == lengths
    assert "".join(segments.parts) == text


def test_alphabet_sizes() -> None:
    assert len(GSM7_BASIC) == 127  # 128 code points minus the escape
    assert len(GSM7_EXTENSION) == 10
    assert encoding_for("^{}\\[~]|€\f") == "gsm7"
    assert units("^{}\\[~]|€\f") == 20
    assert not is_gsm7("`")  # the backtick is not in GSM 03.38


def test_substitutions_keep_gsm() -> None:
    assert substitute("“Don’t” – wait…") == '"Don\'t" - wait...'
    assert is_gsm7(substitute("“Don’t” – wait…"))


def test_gsm_refused_when_not_representable() -> None:
    with pytest.raises(ValueError):
        split("你好", "gsm7")


@given(st.text(max_size=600))
def test_split_properties(text: str) -> None:
    segments = split(text)
    assert "".join(segments.parts) == text
    single, per_part = (160, 153) if segments.encoding == "gsm7" else (70, 67)
    costs = [units(p, segments.encoding) for p in segments.parts]
    assert sum(costs) == segments.units
    if segments.count == 1:
        assert costs[0] <= single
    else:
        assert segments.units > single
        assert all(c <= per_part for c in costs)
        assert all(p for p in segments.parts)
    if segments.encoding == "ucs2":
        for p in segments.parts:
            p.encode("utf-16-be")  # no half surrogate pair at a boundary


@given(st.text(alphabet=sorted(GSM7_BASIC | GSM7_EXTENSION), max_size=500))
def test_gsm_alphabet_always_gsm7(text: str) -> None:
    assert split(text).encoding == "gsm7"
