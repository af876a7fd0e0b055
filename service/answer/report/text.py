"""HTML to text, and a message's text cut to an excerpt: what the reader sees of a message's
body (an HTML part is turned into text, never rendered)."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from service.answer.report.caps import EXCERPT_CHARS
from service.answer.report.cells import clean

_SPACE = re.compile(r"\s+")


def squeeze(text: str) -> str:
    """Every run of white space as one space, none at either end."""
    return _SPACE.sub(" ", text).strip()


class _HTMLText(HTMLParser):
    """The visible text of an HTML part: no head, styles, scripts or tags."""

    _HIDDEN = frozenset({"head", "style", "script", "title", "noscript", "template", "svg"})
    _BLOCKS = frozenset({"p", "br", "div", "li", "tr", "td", "h1", "h2", "h3", "h4", "table"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.size = 0
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._HIDDEN:
            self._hidden += 1
        elif tag in self._BLOCKS:
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN and self._hidden:
            self._hidden -= 1
        elif tag in self._BLOCKS:
            self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.parts.append(data)
            self.size += len(data)


def html_text(html: str) -> str:
    """The visible text of `html`, read only as far as an excerpt needs."""
    reader = _HTMLText()
    for start in range(0, len(html), 4096):  # stop as soon as there is enough text
        reader.feed(html[start : start + 4096])
        if reader.size > EXCERPT_CHARS * 4:
            break
    return squeeze("".join(reader.parts))


def excerpt(text: str) -> str:
    """The start of `text`, cut at a word near EXCERPT_CHARS, with an ellipsis when cut."""
    text = squeeze(text[: EXCERPT_CHARS * 4])
    if len(text) <= EXCERPT_CHARS:
        return clean(text)
    start = text[:EXCERPT_CHARS]
    space = start.rfind(" ")
    return clean((start[:space] if space > EXCERPT_CHARS // 2 else start).rstrip(" ,.;:")) + " …"
