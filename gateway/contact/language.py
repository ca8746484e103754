"""Language hint for text contacts: by writing system, refined by a few cheap cues.

``guess_language`` is pure and fast: it reads at most the first 512 characters, and the common
cases take a few C-speed scans each (ASCII text: one byte translation and a split; text in one
script: one search per class, no per-match work). It gives a
BCP 47 primary tag that case systems can use to pick a language seat, or None when the text has
no letters. Scripts decide first (Han ``zh``, kana ``ja``, hangul ``ko``, Cyrillic ``ru``,
Arabic ``ar``, ...); Latin text is told apart by common function words and diacritics,
defaulting to ``en``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

_SAMPLE: Final = 512

# Character classes per script, counted with compiled patterns (C speed, no per-char Python).
_SCRIPTS: Final[dict[str, re.Pattern[str]]] = {
    "han": re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]"),
    "latin": re.compile("[A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff]"),
    "cyrillic": re.compile("[\u0400-\u052f]"),
    "arabic": re.compile("[\u0600-\u06ff\u0750-\u077f\ufb50-\ufdff\ufe70-\ufeff]"),
    "greek": re.compile("[\u0370-\u03ff]"),
    "hebrew": re.compile("[\u0590-\u05ff]"),
    "devanagari": re.compile("[\u0900-\u097f]"),
    "thai": re.compile("[\u0e00-\u0e7f]"),
    "tibetan": re.compile("[\u0f00-\u0fff]"),
    "mongolian": re.compile("[\u1800-\u18af]"),
}
_KANA: Final = re.compile("[\u3040-\u309f\u30a0-\u30fa\u30fd-\u30ff\u31f0-\u31ff\uff66-\uff9f]")
_HANGUL: Final = re.compile("[\u1100-\u11ff\u3130-\u318f\uac00-\ud7af]")
_ASCII_LETTER: Final = re.compile("[A-Za-z]")
_HAN: Final = _SCRIPTS["han"]
# Kana or hangul: one scan tells that neither is there (the usual case).
_KANA_OR_HANGUL: Final = re.compile(f"{_KANA.pattern}|{_HANGUL.pattern}")
# Any letter of a script other than Han: when there is none, Han alone can win.
_NOT_HAN: Final = re.compile(
    "|".join(pattern.pattern for script, pattern in _SCRIPTS.items() if script != "han")
)

# One Han character carries about as much as a short Latin word.
_WEIGHT: Final = {"han": 3}

_SIMPLE: Final = {
    "greek": "el",
    "hebrew": "he",
    "devanagari": "hi",
    "thai": "th",
    "tibetan": "bo",
    "mongolian": "mn",
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
    # English words that other lists share ("no", "a", "me") are English too: a tie is "en"
    "en": frozenset(
        "the and is are was to of in it you my i that this have not for on "
        "no a me at be we our has from with please help since all there can will".split()
    ),
    "es": frozenset("el la los las es está de que y en un una por para con mi no se".split()),
    "fr": frozenset("le la les est et de des que un une pour dans je ne pas sur avec mon".split()),
    "de": frozenset("der die das ist und nicht ich ein eine mit für auf zu den sie wir es".split()),
    "pt": frozenset("o a os as é de que e em um uma para com não meu minha por está".split()),
    "it": frozenset("il lo la gli le è di che e un una per con non mio sono della".split()),
    "id": frozenset("yang dan di ini itu tidak saya dengan untuk ada ke dari".split()),
}


_WORD_LANGS: Final[dict[str, tuple[str, ...]]] = {
    word: tuple(lang for lang, words in _STOPWORDS.items() if word in words)
    for word in set().union(*_STOPWORDS.values())
}


# ASCII text in words: letters lower-cased, everything else a space (the same words as _WORDS
# finds in ASCII text), so one bytes.translate and a split do what a regex loop did.
_ASCII_WORDS: Final = bytes(
    (c | 0x20) if chr(c).isascii() and chr(c).isalpha() else 0x20 for c in range(256)
)
_ASCII_WORD_LANGS: Final[dict[bytes, tuple[str, ...]]] = {
    word.encode(): langs for word, langs in _WORD_LANGS.items() if word.isascii()
}


def _latin(text: str) -> str:
    hits: Iterable[tuple[str, ...] | None]
    if text.isascii():
        words = text.encode().translate(_ASCII_WORDS).split()
        hits = map(_ASCII_WORD_LANGS.get, words)  # the lookups at C speed
    else:
        if any(ch in _VIETNAMESE for ch in text):
            return "vi"
        hits = map(_WORD_LANGS.get, _WORDS.findall(text.lower()))
    scores = dict.fromkeys(_STOPWORDS, 0)
    for langs in filter(None, hits):
        for lang in langs:
            scores[lang] += 1
    best = max(scores, key=scores.__getitem__)
    return best if scores[best] > scores["en"] else "en"


def guess_language(text: str) -> str | None:
    """Return a BCP 47 language hint for ``text`` from its script, or None without letters."""
    sample = text[:_SAMPLE]
    if sample.isascii():
        return _latin(sample) if _ASCII_LETTER.search(sample) else None
    if _KANA_OR_HANGUL.search(sample):
        if _KANA.search(sample):
            return "ja"
        if _HANGUL.search(sample):
            return "ko"
    if not _NOT_HAN.search(sample):  # Han or no letters at all: no counting needed
        return "zh" if _HAN.search(sample) else None
    best, best_count = "", 0
    left = len(sample)  # characters not yet counted: a bound on any later script's count
    for script, pattern in _SCRIPTS.items():
        found = pattern.subn("", sample)[1]
        left -= found
        count = found * _WEIGHT.get(script, 1)
        if count > best_count:
            best, best_count = script, count
        if best_count >= left:  # no later script can count more (a tie keeps the earlier)
            break
    if not best_count:
        return None
    if best == "han":
        return "zh"
    if best == "latin":
        return _latin(sample)
    letters = set(sample)
    if best == "cyrillic":
        if letters & _UKRAINIAN and not letters & _RUSSIAN_ONLY:
            return "uk"
        return "ru"
    if best == "arabic":
        if letters & _UYGHUR:
            return "ug"
        if letters & _PERSIAN:
            return "fa"
        return "ar"
    return _SIMPLE.get(best)
