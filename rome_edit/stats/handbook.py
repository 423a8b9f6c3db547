"""Real English prose from a package registry: *The Debian Administrator's Handbook*.

ROME estimates ``C = E[k kᵀ]`` on Wikipedia.  Offline, the nearest thing a package registry
serves is a book: Debian's ``debian-handbook`` package (Raphaël Hertzog and Roland Mas; licence
GPL-2.0+ or CC-BY-SA-3.0, either at the user's choice; Debian 12 "bookworm" version
11.20220922) installs the English edition as 127 XHTML pages under
``/usr/share/doc/debian-handbook/html/en-US``: about 2.5 MB of HTML, 1.5 MB of paragraph text
(≈ 330,000 SmolLM2 tokens).  It is ordinary, edited English prose about computing: closer to
Wikipedia than text a model samples from itself, though narrower in topic.

Only the book's paragraphs (``<div class="para">``) are read, with their inline markup (command
names, file names, emphasis) kept as text; headings, navigation, tables of contents, code
listings and screen captures (``<pre>``) are left out, as the reference's Wikipedia text has
none of them.  Each page's paragraphs are packed, in order, into documents of at least
:data:`DOCUMENT_CHARS` characters (the last of a page may be shorter), about 450 tokens each,
the length of a typical Wikipedia article's opening; pages are read in sorted file-name order.
Install: ``apt-get install debian-handbook`` (Debian and derivatives).  Elsewhere, unpack the
package (``dpkg-deb -x debian-handbook_11.20220922_all.deb DIR``, or ``ar x`` and ``tar``) and set
``ROME_EDIT_HANDBOOK`` to its ``usr/share/doc/debian-handbook/html/en-US`` folder.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

from rome_edit.stats.text_corpus import CorpusError, TextCorpus

__all__ = ["DOCUMENT_CHARS", "HANDBOOK_ENV", "HANDBOOK_ROOT", "INSTALL", "handbook_corpus",
           "handbook_installed", "handbook_root", "page_paragraphs"]

HANDBOOK_ROOT = Path("/usr/share/doc/debian-handbook/html/en-US")
HANDBOOK_ENV = "ROME_EDIT_HANDBOOK"  # another folder holding the same pages
INSTALL = "apt-get install debian-handbook"
DOCUMENT_CHARS = 2000
# Elements whose text is not prose: code listings and screen captures, scripts, styles.
_SKIPPED = {"pre", "script", "style"}


class _Paragraphs(HTMLParser):
    """Collects the text of ``<div class="para">`` elements; a paragraph nested in another
    (a list inside a paragraph) ends the outer one's current run of text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._open: list[bool] = []  # for each open div: is it a paragraph?
        self._skip = 0
        self._text: list[str] = []

    def _flush(self) -> None:
        text = " ".join("".join(self._text).split())
        if text:
            self.paragraphs.append(text)
        self._text = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIPPED:
            self._skip += 1
        elif tag == "div":
            para = "para" in (dict(attrs).get("class") or "").split()
            if para:
                self._flush()
            self._open.append(para)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED:
            self._skip = max(0, self._skip - 1)
        elif tag == "div" and self._open and self._open.pop():
            self._flush()

    def handle_data(self, data: str) -> None:
        if self._skip == 0 and any(self._open):
            self._text.append(data)


def page_paragraphs(html: str) -> list[str]:
    """The prose paragraphs of one handbook page, whitespace collapsed."""
    parser = _Paragraphs()
    parser.feed(html)
    parser.close()
    parser._flush()
    return parser.paragraphs


def _pack(paragraphs: list[str], size: int) -> Iterator[str]:
    """Consecutive paragraphs joined by blank lines into documents of at least ``size`` chars."""
    run: list[str] = []
    length = 0
    for paragraph in paragraphs:
        run.append(paragraph)
        length += len(paragraph)
        if length >= size:
            yield "\n\n".join(run)
            run, length = [], 0
    if run:
        yield "\n\n".join(run)


def handbook_root() -> Path:
    """Where the English pages are: ``$ROME_EDIT_HANDBOOK``, else where Debian installs them."""
    env = os.environ.get(HANDBOOK_ENV)
    return Path(env) if env else HANDBOOK_ROOT


def handbook_installed() -> bool:
    """Whether :func:`handbook_root` holds the handbook's pages."""
    return any(handbook_root().glob("*.html"))


def handbook_corpus(root: str | Path | None = None,
                    document_chars: int = DOCUMENT_CHARS) -> TextCorpus:
    """The handbook's English prose as documents (module docstring), from ``root`` (default
    :func:`handbook_root`); id ``debian-handbook:<sha256[:12]>`` over the page names and bytes
    and the document size, so the same pages give the same id wherever they lie."""
    root = Path(root) if root is not None else handbook_root()
    pages = sorted(root.glob("*.html"))
    if not pages:
        raise CorpusError(f"the 'debian-handbook' corpus reads the Debian Administrator's "
                          f"Handbook from {root}, which holds no .html pages: install it with "
                          f"'{INSTALL}' (Debian/Ubuntu) or set {HANDBOOK_ENV} to a folder of "
                          "its en-US pages, or pass another corpus (corpus='DIR', a folder "
                          "of .txt files, or 'sampled').", parameters=("corpus",))
    if document_chars < 1:
        raise CorpusError(f"document_chars must be >= 1, got {document_chars}.")
    digest = hashlib.sha256(f"chars{document_chars}".encode())
    for page in pages:
        digest.update(page.name.encode() + b"\0" + hashlib.sha256(page.read_bytes()).digest())

    def documents() -> Iterator[str]:
        for page in pages:
            html = page.read_text(encoding="utf-8", errors="replace")
            yield from _pack(page_paragraphs(html), document_chars)

    return TextCorpus(f"debian-handbook:{digest.hexdigest()[:12]}", documents)
