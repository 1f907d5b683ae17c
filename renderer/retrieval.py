"""Passages of documents and their BM25 ranking, for the `write` stage (renderer/write.py).

A document is split into passages by heading and paragraph, each remembering its file and line range (its page, for
a PDF), so a script's citations point a reviewer at the lines it was written from. Markup is removed: a passage's
text is what a presenter could say. Ranking is BM25 (bm25s) over Snowball-stemmed words without English stop words,
so "refunds" in a brief finds "refund" in a document; a passage's heading counts as part of its text.

Reading a document only reads that file: links, includes and scripts in it are text or dropped, never followed.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable, Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from renderer.base import BadInputError

#: A paragraph longer than this (words) is cut into passages of about this length, at line ends.
MAX_PASSAGE_WORDS = 120

_ATX = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)\s*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)|\[([^\]]+)\]\[[^\]]*\]")
_TAG = re.compile(r"<[^>\n]+>")
_EMPHASIS = re.compile(r"(\*\*|__|\*|_|`|~~)(?=\S)(.+?)(?<=\S)\1")
_BULLET = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+(?:\[[ xX]\]\s+)?")
_QUOTE = re.compile(r"^\s*>\s?")
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'”’)]))\s+(?=[\"“(]?[A-Z0-9])")


@dataclasses.dataclass(frozen=True)
class Passage:
    """A paragraph (or a piece of a long one) of a source document."""

    #: The document's path relative to the manifest's folder, with '/'.
    file: str
    #: First and last line (1-based) of the passage in the file; for a PDF, the page, twice.
    start: int
    end: int
    #: The heading it sits under ("" for none).
    section: str
    #: Plain text, markup removed, one space between words.
    text: str
    #: True for a PDF, whose passages are located by page.
    paged: bool = False

    @property
    def where(self) -> str:
        """`docs/refunds.md:12-18`, `docs/refunds.md:12`, or `manual.pdf:page 3`."""
        if self.paged:
            return f"{self.file}:page {self.start}"
        return f"{self.file}:{self.start}" + (f"-{self.end}" if self.end != self.start else "")

    @property
    def anchor(self) -> str:
        """A link fragment to the lines (GitHub's `#L12-L18`) or the page (`#page=3`)."""
        if self.paged:
            return f"#page={self.start}"
        return f"#L{self.start}" + (f"-L{self.end}" if self.end != self.start else "")

    def as_dict(self) -> dict[str, object]:
        return {
            "file": self.file,
            "lines": [self.start, self.end],
            "page": self.start if self.paged else None,
            "where": self.where,
            "anchor": self.anchor,
            "section": self.section,
            "text": self.text,
        }


# --- reading ------------------------------------------------------------------------------------------------------


def read_passages(path: Path, name: str) -> list[Passage]:
    """The passages of one document (`name`: how citations name it). A file that cannot be read as its kind is a
    BadInputError naming it."""
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        return _pdf(path, name)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadInputError(
            f"source {name} is not UTF-8 text ({exc.reason} at byte {exc.start})", "save it as UTF-8"
        ) from exc
    if suffix in (".html", ".htm"):
        return _html(text, name)
    if suffix in (".md", ".markdown"):
        return _markdown(text, name)
    return _paragraphs(name, "", list(enumerate(text.splitlines(), start=1)), blank_splits=True, markdown=False)


def _markdown(text: str, name: str) -> list[Passage]:
    out: list[Passage] = []
    section = ""
    block: list[tuple[int, str]] = []
    fenced = False
    lines = text.splitlines()
    start = 0
    if lines and lines[0].strip() == "---":  # YAML front matter: metadata, not prose
        end = next((i for i, line in enumerate(lines[1:], start=1) if line.strip() in ("---", "...")), None)
        start = end + 1 if end is not None else 0
    for number, line in enumerate(lines[start:], start=start + 1):
        if _FENCE.match(line):
            fenced = not fenced
            out += _paragraphs(name, section, block)
            block = []
            continue
        if fenced:  # code is not something to say
            continue
        heading = _ATX.match(line)
        if heading:
            out += _paragraphs(name, section, block)
            block, section = [], _inline(heading.group(2))
            continue
        if _SETEXT.match(line) and len(block) == 1 and line.strip()[0] in "=-" and block[0][1].strip():
            section, block = _inline(block[0][1]), []
            continue
        if not line.strip():
            out += _paragraphs(name, section, block)
            block = []
            continue
        block.append((number, line))
    out += _paragraphs(name, section, block)
    return out


def _inline(line: str) -> str:
    """A Markdown line as plain text: images by their alt text, links by their text, no emphasis, tags or bullets."""
    line = _QUOTE.sub("", line)
    line = _BULLET.sub("", line)
    line = _IMAGE.sub(lambda m: m.group(1), line)
    line = _LINK.sub(lambda m: m.group(1) or m.group(2), line)
    line = _TAG.sub(" ", line)
    previous = None
    while previous != line:
        previous, line = line, _EMPHASIS.sub(lambda m: m.group(2), line)
    return " ".join(line.replace("|", " ").split())


def _paragraphs(
    name: str, section: str, lines: Sequence[tuple[int, str]], blank_splits: bool = False, markdown: bool = True
) -> list[Passage]:
    """Passages from numbered lines: one per paragraph (blank lines split when `blank_splits`), long ones cut at
    line ends into pieces of about MAX_PASSAGE_WORDS words."""
    out: list[Passage] = []
    piece: list[tuple[int, str]] = []
    words = 0

    def flush() -> None:
        nonlocal piece, words
        text = " ".join(t for _, t in piece if t)
        if text:
            out.append(Passage(name, piece[0][0], piece[-1][0], section, text))
        piece, words = [], 0

    for number, raw in lines:
        if blank_splits and not raw.strip():
            flush()
            continue
        text = _inline(raw) if markdown else " ".join(raw.split())
        count = len(text.split())
        if piece and words + count > MAX_PASSAGE_WORDS:
            flush()
        if text or piece:
            piece.append((number, text))
            words += count
    flush()
    return out


#: Elements whose text is not prose.
_SKIP = {"script", "style", "noscript", "template", "head", "svg", "math", "iframe", "object"}
#: Elements that end a passage (a list or table is one passage; its items are not).
_BLOCKS = {
    "p", "div", "section", "article", "main", "header", "footer", "aside", "nav", "pre", "blockquote", "ul", "ol",
    "dl", "table", "figure", "figcaption", "form", "fieldset", "details", "summary", "hr", "br", "body",
}  # fmt: skip
_HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
_VOID = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed", "source", "track", "wbr"}


class _HTMLText(HTMLParser):
    """Collects (first line, last line, text, is_heading) blocks of an HTML page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[tuple[int, int, str, bool]] = []
        self._parts: list[str] = []
        self._first = self._last = 0
        self._skip = 0
        self._heading = False

    def _flush(self) -> None:
        text = " ".join("".join(self._parts).split())
        if text:
            self.blocks.append((self._first, self._last, text, self._heading))
        self._parts = []
        self._first = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            self._skip += tag not in _VOID
            return
        if tag in _BLOCKS or tag in _HEADINGS:
            self._flush()
            self._heading = tag in _HEADINGS
        elif tag in ("li", "td", "th", "dt", "dd", "tr"):
            self._parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self._skip = max(0, self._skip - 1)
            return
        if tag in _BLOCKS or tag in _HEADINGS:
            self._flush()
            self._heading = False

    def handle_data(self, data: str) -> None:
        if self._skip or not data.strip():
            if data and self._parts:
                self._parts.append(" ")
            return
        line = self.getpos()[0]
        if not self._first:
            self._first = line + data[: len(data) - len(data.lstrip())].count("\n")
        self._last = line + data.rstrip().count("\n")
        self._parts.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def _html(text: str, name: str) -> list[Passage]:
    parser = _HTMLText()
    parser.feed(text)
    parser.close()
    out: list[Passage] = []
    section = ""
    for first, last, block, heading in parser.blocks:
        if heading:
            section = block
            continue
        # Long blocks are cut like paragraphs; their words are spread over the block's lines.
        out += _split_long(Passage(name, first, last, section, block))
    return out


def _split_long(passage: Passage) -> list[Passage]:
    """A passage of more than MAX_PASSAGE_WORDS words cut into pieces at sentence ends (all keeping its lines)."""
    if len(passage.text.split()) <= MAX_PASSAGE_WORDS:
        return [passage]
    out: list[Passage] = []
    piece: list[str] = []
    for sentence in split_sentences(passage.text):
        if piece and len(" ".join(piece).split()) + len(sentence.split()) > MAX_PASSAGE_WORDS:
            out.append(dataclasses.replace(passage, text=" ".join(piece)))
            piece = []
        piece.append(sentence)
    if piece:
        out.append(dataclasses.replace(passage, text=" ".join(piece)))
    return out


def _pdf(path: Path, name: str) -> list[Passage]:
    """A PDF's text, page by page, with pypdf; paragraphs where the extracted text has blank lines."""
    import pypdf
    from pypdf.errors import PyPdfError

    try:
        reader = pypdf.PdfReader(path)
        if reader.is_encrypted:
            raise BadInputError(f"source {name} is an encrypted PDF", "give an unencrypted copy")
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as exc:
        raise BadInputError(f"source {name} is not a readable PDF ({exc})", "check the file, or give its text") from exc
    out: list[Passage] = []
    for number, text in enumerate(pages, start=1):
        lines = [(number, line) for line in text.splitlines()]
        for passage in _paragraphs(name, "", lines, blank_splits=True, markdown=False):
            out += _split_long(dataclasses.replace(passage, paged=True))
    return out


# --- ranking ------------------------------------------------------------------------------------------------------


def split_sentences(text: str) -> list[str]:
    """Sentences of plain text (a full stop, question or exclamation mark followed by a capital or a digit)."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def _bm25s() -> Any:
    import bm25s

    # bm25s sets its own logger to DEBUG when imported, so every index it builds would be logged under -q: give the
    # level back to the application's logging configuration.
    logging.getLogger("bm25s").setLevel(logging.NOTSET)
    return bm25s


def _tokens(texts: Iterable[str]) -> list[list[str]]:
    import Stemmer

    bm25s = _bm25s()

    stemmer = Stemmer.Stemmer("english")
    return bm25s.tokenize(list(texts), stopwords="en_plus", stemmer=stemmer, return_ids=False, show_progress=False)


def bm25_scores(texts: Sequence[str], query: str) -> list[float]:
    """The BM25 score of each text for `query` (0 where they share no word but stop words)."""
    bm25s = _bm25s()

    corpus = _tokens(texts)
    query_tokens = _tokens([query])[0]
    if not any(corpus) or not query_tokens:
        return [0.0] * len(texts)
    retriever = bm25s.BM25()
    retriever.index(corpus, show_progress=False)
    return [float(s) for s in retriever.get_scores(query_tokens)]


def rank(passages: Sequence[Passage], query: str, k: int) -> list[tuple[Passage, float]]:
    """The `k` passages that best match `query`, best first, each with its score; passages sharing no word with the
    query (score 0) are left out. Ties keep the documents' order."""
    scores = bm25_scores([f"{p.section} {p.text}" for p in passages], query)
    order = sorted(range(len(passages)), key=lambda i: (-scores[i], i))
    return [(passages[i], scores[i]) for i in order[:k] if scores[i] > 0]
