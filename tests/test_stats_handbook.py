"""The 'debian-handbook' corpus: paragraphs of the book's XHTML pages, packed into documents."""

import pytest

from rome_edit.stats import handbook
from rome_edit.stats.corpus import CorpusError, resolve_corpus
from rome_edit.stats.handbook import (
    HANDBOOK_ENV,
    HANDBOOK_ROOT,
    handbook_corpus,
    handbook_installed,
    page_paragraphs,
)

# A page in the shape the handbook's publican XHTML has: navigation, headings, paragraphs with
# inline markup, a list of paragraphs nested in a paragraph, a screen capture, entities.
PAGE = """<?xml version="1.0" encoding="UTF-8"?>
<html xmlns="http://www.w3.org/1999/xhtml"><head><title>6.2. APT</title></head><body>
<ul class="docnav top"><li class="previous"><a href="apt.html"><strong>Prev</strong></a></li></ul>
<div class="section"><div class="titlepage"><h2 class="title">6.2. The <code>apt</code> tools</h2>
</div><div class="para">
    <acronym class="acronym">APT</acronym> is a vast project,   whose plans
    included a <em>graphical</em> interface.
</div><div class="para">Several tools exist:<div class="itemizedlist"><ul>
<li><div class="para">aptitude &amp; synaptic;</div></li></ul></div>and more.</div>
<pre class="screen"><code>$ apt update</code></pre>
<div class="para">Both tools share “one library”.</div></div></body></html>
"""


def test_paragraphs_keep_prose_and_drop_markup_navigation_and_code():
    assert page_paragraphs(PAGE) == [
        "APT is a vast project, whose plans included a graphical interface.",
        "Several tools exist:", "aptitude & synaptic;", "and more.",
        "Both tools share “one library”.",
    ]


def write_book(folder, pages):
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in pages.items():
        (folder / name).write_text(body, encoding="utf-8")
    return folder


def para(text):
    return f'<div class="para">{text}</div>'


def test_documents_pack_paragraphs_per_page_in_name_order(tmp_path):
    book = write_book(tmp_path / "en-US", {
        "b.html": para("a" * 30) + para("b" * 30) + para("c" * 10),
        "a.html": para("x" * 5),
        "index.html": "<html><body><p>contents</p></body></html>",  # no paragraph: no document
    })
    corpus = handbook_corpus(book, document_chars=50)
    assert list(corpus) == ["x" * 5, "a" * 30 + "\n\n" + "b" * 30, "c" * 10]
    assert list(corpus) == list(corpus)  # re-iterable
    assert corpus.corpus_id.startswith("debian-handbook:")
    # the id names the exact text: the same pages elsewhere share it, a change alters it
    same = write_book(tmp_path / "copy", {p.name: p.read_text() for p in book.iterdir()})
    assert handbook_corpus(same, document_chars=50).corpus_id == corpus.corpus_id
    assert handbook_corpus(book, document_chars=40).corpus_id != corpus.corpus_id
    (book / "a.html").write_text(para("y" * 5))
    assert handbook_corpus(book, document_chars=50).corpus_id != corpus.corpus_id


def test_missing_handbook_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv(HANDBOOK_ENV, str(tmp_path / "nowhere"))
    assert not handbook_installed()
    with pytest.raises(CorpusError, match="apt-get install debian-handbook"):
        resolve_corpus("debian-handbook")
    with pytest.raises(CorpusError, match=HANDBOOK_ENV):
        handbook_corpus(tmp_path)
    with pytest.raises(CorpusError, match="document_chars"):
        handbook_corpus(write_book(tmp_path / "b", {"a.html": para("x")}), document_chars=0)


def test_the_environment_variable_points_at_another_copy(tmp_path, monkeypatch):
    book = write_book(tmp_path / "en-US", {"a.html": para("Some prose here.")})
    monkeypatch.setenv(HANDBOOK_ENV, str(book))
    assert handbook_installed()
    corpus = resolve_corpus("debian-handbook")
    assert list(corpus) == ["Some prose here."]
    assert corpus.corpus_id == handbook_corpus(book).corpus_id


@pytest.mark.skipif(not any(HANDBOOK_ROOT.glob("*.html")),
                    reason="needs the Debian package: apt-get install debian-handbook")
def test_installed_handbook_is_about_a_megabyte_of_english_prose(monkeypatch):
    monkeypatch.delenv(HANDBOOK_ENV, raising=False)
    documents = list(resolve_corpus("debian-handbook"))
    chars = sum(map(len, documents))
    assert len(documents) > 400 and chars > 900_000
    assert sorted(map(len, documents))[len(documents) // 2] >= handbook.DOCUMENT_CHARS
    text = " ".join(documents)
    assert "<div" not in text and "class=" not in text and "&amp;" not in text  # no markup
    for word in (" the ", " package ", " Debian "):
        assert text.count(word) > 100
