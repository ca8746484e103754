"""Charsets and header fields of an e-mail: lenient, superset-aware decoding (gb2312 mail that
holds GBK, Big5 with HKSCS, Shift_JIS as cp932, EUC-KR as cp949), RFC 2047 encoded words and
RFC 2231 parameters, message ids. Pure: nothing here raises on a peer's bytes."""

from __future__ import annotations

import base64
import binascii
import codecs
import encodings
import encodings.aliases
import functools
import pkgutil
import re
from typing import Final

from gateway.records import clean_text, repair_text

MAX_HEADER_CHARS: Final = 4000


_SUPERSETS: Final[dict[str, tuple[str, ...]]] = {
    "gb2312": ("gb18030",),
    "gbk": ("gb18030",),
    "gb18030": ("gb18030",),
    "hz": ("hz", "gb18030"),
    "big5": ("cp950", "big5hkscs"),
    "big5hkscs": ("big5hkscs", "cp950"),
    "cp950": ("cp950", "big5hkscs"),
    "iso2022_jp": ("iso2022_jp", "iso2022_jp_ext", "iso2022_jp_2", "iso2022_jp_2004"),
    "iso2022_jp_2": ("iso2022_jp_2", "iso2022_jp_ext", "iso2022_jp_2004"),
    "shift_jis": ("cp932", "shift_jis_2004"),
    "cp932": ("cp932", "shift_jis_2004"),
    "euc_jp": ("euc_jp", "euc_jis_2004"),
    "euc_kr": ("cp949",),
    "cp949": ("cp949",),
    "iso2022_kr": ("iso2022_kr", "cp949"),
    "iso8859_1": ("cp1252", "iso8859_1"),
    "ascii": (),
}
"""Codec (by Python's canonical name) -> the decoders to try, widest real-world superset first."""

_SEVEN_BIT: Final = ("iso2022", "hz", "utf_7")
"""Stateful encodings whose bytes are all ASCII."""

_ALIASES: Final[dict[str, str]] = {
    "x-gbk": "gbk",
    "cp936": "gbk",
    "ms936": "gbk",
    "windows-936": "gbk",
    "gb_2312-80": "gb2312",
    "csgb2312": "gb2312",
    "euc-cn": "gb2312",
    "x-euc-cn": "gb2312",
    "chinese": "gb2312",
    "x-big5": "big5",
    "big5-hkscs": "big5hkscs",
    "windows-950": "cp950",
    "x-sjis": "shift_jis",
    "windows-31j": "cp932",
    "ks_c_5601-1987": "euc_kr",
    "ks_c_5601": "euc_kr",
    "ksc5601": "euc_kr",
    "windows-949": "cp949",
    "unicode-1-1-utf-7": "utf-7",
    "x-unknown": "",
    "unknown-8bit": "",
    "default": "",
}

_LANGUAGES: Final[dict[str, str]] = {
    "gb2312": "zh-Hans",
    "gbk": "zh-Hans",
    "gb18030": "zh-Hans",
    "hz": "zh-Hans",
    "big5": "zh-Hant",
    "big5hkscs": "zh-Hant",
    "cp950": "zh-Hant",
    "iso2022_jp": "ja",
    "iso2022_jp_2": "ja",
    "shift_jis": "ja",
    "cp932": "ja",
    "euc_jp": "ja",
    "euc_kr": "ko",
    "cp949": "ko",
    "iso2022_kr": "ko",
}


def _codec_names() -> frozenset[str]:
    names = set(encodings.aliases.aliases) | set(encodings.aliases.aliases.values())
    names.update(m.name for m in pkgutil.iter_modules(encodings.__path__))
    return frozenset(names)


_CODECS: Final = _codec_names()


def _known_codec(name: str) -> bool:
    """True for a name the standard codecs know. ``codecs.lookup`` remembers every name it
    was asked for, found or not, for the life of the process (``encodings._cache``): each
    distinct made-up charset in a mail grew the gateway for good, so only known names are
    looked up."""
    norm = encodings.normalize_encoding(name).lower()
    return norm in _CODECS or norm.replace(".", "_") in _CODECS


@functools.lru_cache(maxsize=256)
def canonical_charset(label: str | None) -> str | None:
    """Return Python's codec name for a MIME charset label, or None if unknown or absent."""
    if not label:
        return None
    name = label.strip().strip("\"'").split("*", 1)[0].lower()
    name = _ALIASES.get(name, name)
    if not name or len(name) > 40 or not _known_codec(name):
        return None
    try:
        return codecs.lookup(name).name.replace("-", "_")
    except (LookupError, ValueError):
        return None


def decode_bytes(data: bytes, charset: str | None, fallback: str) -> str:
    """Decode text bytes: the declared charset's superset, else UTF-8, else ``fallback``."""
    name = canonical_charset(charset)
    if data.isascii() and not (name and name.startswith(_SEVEN_BIT)):
        return data.decode("ascii")
    candidates: list[str] = []
    if name is None or name == "utf_8" or name == "ascii":  # UTF-8 comes first: try it alone
        try:
            return data.decode("utf_8")
        except UnicodeDecodeError:
            pass
        last = "utf_8"  # what is left: UTF-8 with replacements
    else:
        candidates += [*_SUPERSETS.get(name, (name,)), "utf_8"]
        last = candidates[0]
    fb = canonical_charset(fallback)
    if fb:
        candidates.extend(_SUPERSETS.get(fb, (fb,)))
    for codec in candidates:
        try:
            return data.decode(codec)
        except (UnicodeDecodeError, LookupError):
            continue
    return data.decode(last, errors="replace")


def language_of(charset: str | None) -> str | None:
    """Return a BCP 47 hint implied by a regional charset, or None."""
    name = canonical_charset(charset)
    return _LANGUAGES.get(name) if name else None


# ---------------------------------------------------------------- headers

ENCODED_WORD: Final = re.compile(
    r"=\?([^?\s]{1,60})\?([bBqQ])\?(?:([^?]{0,2000}?)\?=|([^?\s]{0,2000}))",
)
_HEX2: Final = re.compile(rb"[0-9A-Fa-f]{2}")
_FOLD: Final = re.compile(r"\r?\n(?=[ \t])|\r?\n")
SPACES: Final = re.compile(r"[ \t\r\n]+")


def unfold(value: str) -> str:
    return _FOLD.sub("", value) if "\n" in value else value  # every fold holds a LF


def _q_decode(text: str) -> bytes:
    # UTF-8: a word may hold characters already decoded (an RFC 2231 parameter's value); the
    # 8-bit bytes of a raw header come back as they arrived
    try:
        raw = text.replace("_", " ").encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        raw = text.replace("_", " ").encode("utf-8", "replace")
    out = bytearray()
    i = 0
    while i < len(raw):
        c = raw[i]
        if c == 0x3D and _HEX2.fullmatch(raw[i + 1 : i + 3]):
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
            continue
        out.append(c)
        i += 1
    return bytes(out)


_NOT_BASE64: Final = re.compile(r"[^A-Za-z0-9+/]")


def _b_decode(text: str) -> bytes:
    cleaned = _NOT_BASE64.sub("", text)
    cleaned = cleaned[: len(cleaned) - len(cleaned) % 4] if len(cleaned) % 4 == 1 else cleaned
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        return base64.b64decode(cleaned)
    except (binascii.Error, ValueError):
        return b""


def raw_text(value: str, fallback: str) -> str:
    """Decode a header string whose 8-bit bytes arrived as surrogate escapes."""
    try:
        data = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return clean_text(value)
    return decode_bytes(data, None, fallback)


def decode_header(value: str, fallback: str = "gb18030") -> str:
    """Decode RFC 2047 encoded words leniently and raw 8-bit text; unfold; never raise.

    Adjacent encoded words in one charset are joined as bytes before decoding, so a character
    split across two words (a common fault of CJK mailers) comes out whole.
    """
    value = unfold(value[: MAX_HEADER_CHARS * 4])
    whole = ENCODED_WORD.fullmatch(value)
    if whole is not None:  # one encoded word and nothing else (a common subject, a name)
        text = whole.group(3) if whole.group(3) is not None else (whole.group(4) or "")
        data = _b_decode(text) if whole.group(2) in "Bb" else _q_decode(text)
        return clean_text(decode_bytes(data, whole.group(1), fallback))
    return _decode_words(value, fallback)


def _decode_words(value: str, fallback: str) -> str:
    """``decode_header`` of an unfolded value: its encoded words and the text between."""
    pieces: list[str] = []
    pending: bytearray = bytearray()
    pending_charset: str | None = None
    pos = 0

    def flush() -> None:
        nonlocal pending_charset
        if pending_charset is not None:
            pieces.append(decode_bytes(bytes(pending), pending_charset, fallback))
            pending.clear()
            pending_charset = None

    for m in ENCODED_WORD.finditer(value):
        between = value[pos : m.start()]
        charset, enc = m.group(1), m.group(2).upper()
        text = m.group(3) if m.group(3) is not None else (m.group(4) or "")
        data = _b_decode(text) if enc == "B" else _q_decode(text)
        if (between and not between.isspace()) or pending_charset is None:
            flush()
            if between:
                pieces.append(raw_text(between, fallback))
        elif pending_charset.lower() != charset.lower():
            flush()
        pending_charset = pending_charset or charset
        pending.extend(data)
        pos = m.end()
    flush()
    if pos < len(value):
        pieces.append(raw_text(value[pos:], fallback))
    return clean_text("".join(pieces))


def clean_line(value: str, limit: int = MAX_HEADER_CHARS) -> str:
    if "  " in value or "\t" in value or "\r" in value or "\n" in value:
        value = SPACES.sub(" ", value)  # else it has nothing to replace
    return value.strip()[:limit]


_RFC2231_NAME: Final = re.compile(r"([^*]+)\*(\d+)?(\*)?")
_QUOTED_PAIR: Final = re.compile(r"\\(.)")
_TOKEN_PARAM: Final = re.compile(
    r';\s*([^\s=;"]+)\s*=\s*("(?:[^"\\]|\\.)*"?|[^;]*)',
)


def header_params(value: str, fallback: str = "gb18030") -> tuple[str, dict[str, str]]:
    """Split a MIME header (Content-Type, Content-Disposition) into its value and parameters.

    Handles quoted strings, RFC 2231 continuations and charsets, and RFC 2047 words inside
    parameter values (common in file names although not allowed there).
    """
    if not value:  # no such header
        return "", {}
    value = unfold(value)
    main, _, rest = value.partition(";")
    params: dict[str, str] = {}
    extended: dict[str, dict[int, tuple[str, bool]]] = {}
    for m in _TOKEN_PARAM.finditer(";" + rest):
        name = m.group(1).lower()
        raw = m.group(2).strip()
        if raw.startswith('"'):
            inner = raw[1:-1] if raw.endswith('"') and len(raw) > 1 else raw[1:]
            raw = _QUOTED_PAIR.sub(r"\1", inner) if "\\" in inner else inner
        cm = _RFC2231_NAME.fullmatch(name) if "*" in name else None
        if cm:
            base, index, star = cm.group(1), cm.group(2), cm.group(3)
            if index is None:
                extended.setdefault(base, {})[0] = (raw, True)
            else:
                extended.setdefault(base, {})[int(index)] = (raw, star is not None)
            continue
        params.setdefault(name, raw)
    for base, chunks in extended.items():
        first = chunks.get(0)
        charset: str | None = None
        buf = bytearray()
        for i in sorted(chunks):
            text, encoded = chunks[i]
            if encoded:
                if i == 0 and first is not None and text.count("'") >= 2:
                    charset, _, text = text.split("'", 2)
                buf.extend(_percent_decode(text))
            else:
                buf.extend(text.encode("utf-8", "surrogateescape"))
        params[base] = decode_bytes(bytes(buf), charset, fallback)
    for key, val in params.items():
        params[key] = decode_header(val, fallback) if ("=?" in val or not val.isascii()) else val
    return main.strip().lower(), params


def _percent_decode(text: str) -> bytes:
    out = bytearray()
    data = text.encode("utf-8", "surrogateescape")
    i = 0
    while i < len(data):
        if data[i] == 0x25 and _HEX2.fullmatch(data[i + 1 : i + 3]):
            out.append(int(data[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(data[i])
            i += 1
    return bytes(out)


_MSGID: Final = re.compile(r"<([^<>\s]{1,900})>")


def message_ids(value: str) -> list[str]:
    """Return the ``<id>`` tokens of a Message-ID, In-Reply-To or References value."""
    if not value:  # no such header
        return []
    return [repair_text(f"<{m.group(1)}>") for m in _MSGID.finditer(unfold(value))][:100]
