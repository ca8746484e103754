"""Language hint for text contacts: by writing system, refined by a few cheap cues.

``guess_language`` is pure and fast (one pass over at most ``_SAMPLE`` characters). It gives a
BCP 47 primary tag that case systems can use to pick a language seat, or None when the text has
no letters. Scripts decide first (Han ``zh``, kana ``ja``, hangul ``ko``, Cyrillic ``ru``,
Arabic ``ar``, ...); Latin text is told apart by common function words and diacritics,
defaulting to ``en``.
"""

from __future__ import annotations

import re
from typing import Final

_SAMPLE: Final = 2000

# (first code point, last code point, script)
_RANGES: Final[tuple[tuple[int, int, str], ...]] = (
    (0x0041, 0x005A, "latin"),
    (0x0061, 0x007A, "latin"),
    (0x00C0, 0x024F, "latin"),
    (0x0370, 0x03FF, "greek"),
    (0x0400, 0x052F, "cyrillic"),
    (0x0590, 0x05FF, "hebrew"),
    (0x0600, 0x06FF, "arabic"),
    (0x0750, 0x077F, "arabic"),
    (0x0900, 0x097F, "devanagari"),
    (0x0E00, 0x0E7F, "thai"),
    (0x0F00, 0x0FFF, "tibetan"),
    (0x1100, 0x11FF, "hangul"),
    (0x1800, 0x18AF, "mongolian"),
    (0x1E00, 0x1EFF, "latin"),
    (0x3040, 0x309F, "kana"),
    (0x30A0, 0x30FA, "kana"),
    (0x30FD, 0x30FF, "kana"),
    (0x3130, 0x318F, "hangul"),
    (0x31F0, 0x31FF, "kana"),
    (0x3400, 0x4DBF, "han"),
    (0x4E00, 0x9FFF, "han"),
    (0xAC00, 0xD7AF, "hangul"),
    (0xF900, 0xFAFF, "han"),
    (0xFB50, 0xFDFF, "arabic"),
    (0xFE70, 0xFEFF, "arabic"),
    (0xFF66, 0xFF9F, "kana"),
    (0x20000, 0x2FA1F, "han"),
)

# One Han character carries about as much as a short Latin word.
_WEIGHT: Final = {"han": 3, "hangul": 2}

_SIMPLE: Final = {
    "greek": "el",
    "hebrew": "he",
    "devanagari": "hi",
    "thai": "th",
    "tibetan": "bo",
    "mongolian": "mn",
    "hangul": "ko",
}

# Letters used by Uyghur and Persian but not by Arabic.
_UYGHUR: Final = frozenset("ېۆۇۈڭھ")
_PERSIAN: Final = frozenset("پچژگ")
# Letters of Ukrainian (not Russian) and of Russian (not Ukrainian).
_UKRAINIAN: Final = frozenset("їєґіЇЄҐІ")
_RUSSIAN_ONLY: Final = frozenset("ыэъЫЭЪ")
_VIETNAMESE: Final = frozenset("ăâđêôơưĂÂĐÊÔƠƯạảấầẩẫậắằẳẵặẹẻẽếềểễệỉịọỏốồổỗộớờởỡợụủứừửữựỳỵỷỹ")

_WORDS: Final = re.compile(r"[^\W\d_]+")
_STOPWORDS: Final[dict[str, frozenset[str]]] = {
    "en": frozenset("the and is are was to of in it you my i that this have not for on".split()),
    "es": frozenset("el la los las es está de que y en un una por para con mi no se".split()),
    "fr": frozenset("le la les est et de des que un une pour dans je ne pas sur avec mon".split()),
    "de": frozenset("der die das ist und nicht ich ein eine mit für auf zu den sie wir es".split()),
    "pt": frozenset("o a os as é de que e em um uma para com não meu minha por está".split()),
    "it": frozenset("il lo la gli le è di che e un una per con non mio sono della".split()),
    "id": frozenset("yang dan di ini itu tidak saya dengan untuk ada ke dari".split()),
}


def _script(cp: int) -> str | None:
    lo, hi = 0, len(_RANGES) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        first, last, name = _RANGES[mid]
        if cp < first:
            hi = mid - 1
        elif cp > last:
            lo = mid + 1
        else:
            return name
    return None


def _latin(text: str) -> str:
    if any(ch in _VIETNAMESE for ch in text):
        return "vi"
    scores = dict.fromkeys(_STOPWORDS, 0)
    for word in _WORDS.findall(text.lower()):
        for lang, words in _STOPWORDS.items():
            if word in words:
                scores[lang] += 1
    best = max(scores, key=lambda lang: scores[lang])
    return best if scores[best] > scores["en"] else "en"


def guess_language(text: str) -> str | None:
    """Return a BCP 47 language hint for ``text`` from its script, or None without letters."""
    sample = text[:_SAMPLE]
    counts: dict[str, int] = {}
    for ch in sample:
        if ch.isascii() and not ch.isalpha():
            continue
        script = _script(ord(ch))
        if script is not None:
            counts[script] = counts.get(script, 0) + _WEIGHT.get(script, 1)
    if not counts:
        return None
    if counts.get("kana"):
        return "ja"
    if counts.get("hangul"):
        return "ko"
    script = max(counts, key=lambda s: counts[s])
    if script == "han":
        return "zh"
    if script == "latin":
        return _latin(sample)
    if script == "cyrillic":
        letters = set(sample)
        if letters & _UKRAINIAN and not letters & _RUSSIAN_ONLY:
            return "uk"
        return "ru"
    if script == "arabic":
        letters = set(sample)
        if letters & _UYGHUR:
            return "ug"
        if letters & _PERSIAN:
            return "fa"
        return "ar"
    return _SIMPLE.get(script)
