"""Code and docs cite papers and docs/method.md sections, not files outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["rome_edit", "docs", "scripts", "benchmarks", "notebooks", "README.md"]
# "seed 001" named a source document kept outside the repository; METHOD.md likewise.
OUTSIDE = re.compile(r"\b[Ss]eeds? 0\d\d\b|seeds/|METHOD\.md")
CITED_SECTION = re.compile(r'docs/method\.md,\s+"([^"]+)"')


def files() -> list[Path]:
    found = []
    for name in SOURCES:
        path = ROOT / name
        found += [path] if path.is_file() else [
            p for p in sorted(path.rglob("*")) if p.suffix in {".py", ".md", ".ipynb", ".yml"}]
    return found


def test_no_reference_to_documents_outside_the_repository():
    bad = [f"{p.relative_to(ROOT)}:{n}: {line.strip()[:80]}" for p in files()
           for n, line in enumerate(p.read_text().splitlines(), 1) if OUTSIDE.search(line)]
    assert not bad, "cite the paper or docs/method.md instead:\n" + "\n".join(bad)


def test_cited_method_sections_exist():
    headings = {m.group(1).strip() for m in
                re.finditer(r"^#+ (.+)$", (ROOT / "docs" / "method.md").read_text(), re.M)}
    cited = [(p, m.group(1)) for p in files()
             for m in CITED_SECTION.finditer(re.sub(r"\s+", " ", p.read_text()))]
    assert cited, "the scan finds the docstrings' citations"
    missing = [f"{p.relative_to(ROOT)}: {s!r}" for p, s in cited if s not in headings]
    assert not missing, "no such section in docs/method.md:\n" + "\n".join(missing)
