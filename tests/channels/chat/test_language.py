"""Language hints by script (and a few Latin cues)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.contact.language import guess_language

CASES = [
    ("zh", "路灯坏了，请尽快修理"),
    ("zh", "我的iPhone坏了"),
    ("ja", "こんにちは、道路が壊れています"),
    ("ja", "カタカナだけ"),
    ("ko", "안녕하세요, 가로등이 고장났어요"),
    ("ru", "Привет, у нас нет воды"),
    ("uk", "Привіт, у нас немає води"),
    ("ar", "مرحبا، لا يوجد ماء"),
    ("fa", "سلام، آب نداریم چون لوله شکسته"),
    ("ug", "سالام، سۇ يوق"),
    ("bo", "ཁྱེད་རང་སྐུ་གཟུགས་བདེ་པོ་ཡིན་པས།"),
    ("en", "The street light is broken"),
    ("en", "ok"),
    # English SMS once tagged "es" or "pt" by the words they share ("no", "a")
    ("en", "No water since yesterday"),
    ("en", "No heat, please help"),
    ("en", "No bus today"),
    ("en", "A tree fell on a car"),
    ("en", "Noise from a bar at 2am"),
    ("es", "No hay agua en mi casa"),
    ("es", "Una farola rota"),
    ("pt", "A rua está sem luz e não tem água"),
    ("es", "La farola está rota y no funciona"),
    ("fr", "Le lampadaire est cassé dans la rue"),
    ("de", "Die Straßenlaterne ist kaputt und das ist nicht gut"),
    ("vi", "Đèn đường bị hỏng"),
    ("el", "Καλημέρα"),
    ("he", "שלום"),
    ("th", "สวัสดีครับ"),
]


@pytest.mark.parametrize(
    ("expected", "text"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_script_decides(expected: str, text: str) -> None:
    assert guess_language(text) == expected


@pytest.mark.parametrize("text", ["", "   ", "12345 !!", "☎️📞", "\x00\x01"])
def test_no_letters_no_hint(text: str) -> None:
    assert guess_language(text) is None


@settings(deadline=None)
@given(st.text())
def test_any_text_gives_a_tag_or_none(text: str) -> None:
    result = guess_language(text)
    assert result is None or (result.isalpha() and 2 <= len(result) <= 3)


def test_long_text_is_sampled() -> None:
    assert guess_language("路" * 10_000 + "a" * 1_000_000) == "zh"
