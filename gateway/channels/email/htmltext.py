"""The text of an HTML body: blocks to lines, scripts and styles left out, links kept."""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser
from typing import Final

from gateway.channels.email.headers import SPACES

_BLOCK: Final = frozenset(
    "address article aside blockquote div dl dt dd fieldset figcaption figure footer form "
    "h1 h2 h3 h4 h5 h6 header hr li main nav ol p pre section table tr ul center".split()
)
_SKIP: Final = frozenset(("script", "style", "head", "title", "template", "noscript", "xml"))


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0
        self.pre = 0
        self.href: list[str | None] = []

    def _newline(self, count: int = 1) -> None:
        self.out.append("\n" * count)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            self.skip += 1
        elif tag == "br":
            self._newline()
        elif tag == "pre":
            self.pre += 1
            self._newline()
        elif tag == "li":
            self._newline()
            self.out.append("- ")
        elif tag in ("td", "th"):
            self.out.append("\t")
        elif tag == "img":
            alt = dict(attrs).get("alt")
            if alt and not self.skip:
                self.out.append(f"[{alt}]")
        elif tag == "a":
            self.href.append(dict(attrs).get("href"))
        elif tag in _BLOCK:
            self._newline()

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            return
        self.handle_starttag(tag, attrs)
        if tag in _SKIP:
            self.skip -= 1

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag == "pre":
            self.pre = max(0, self.pre - 1)
            self._newline()
        elif tag == "a":
            href = self.href.pop() if self.href else None
            if href and not self.skip and href.startswith(("http://", "https://", "mailto:")):
                target = href.removeprefix("mailto:")
                if target not in "".join(self.out[-3:]):
                    self.out.append(f" <{target}>")
        elif tag in _BLOCK or tag == "p":
            self._newline()

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        self.out.append(data if self.pre else SPACES.sub(" ", data))


_BLANK_LINES: Final = re.compile(r"\n[ \t]*(?:\n[ \t]*){2,}")
_TRAILING: Final = re.compile(r"[ \t]+\n")
_TAG: Final = re.compile(r"<[^>]*>")


def html_to_text(markup: str) -> str:
    """Render HTML as readable plain text (paragraphs, line breaks, list items, link targets)."""
    parser = _TextExtractor()
    try:
        parser.feed(markup)
        parser.close()
        text = "".join(parser.out)
    except Exception:  # html.parser is lenient, but a fallback costs nothing
        text = html.unescape(_TAG.sub(" ", markup))
    lines = (line.strip(" ") for line in text.replace("\xa0", " ").split("\n"))
    text = "\n".join(lines)
    text = _BLANK_LINES.sub("\n\n", _TRAILING.sub("\n", text))
    return text.strip()
