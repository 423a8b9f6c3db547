"""MkDocs hook: links from docs/*.md to repository files outside docs/ (e.g.
``[`compat.py`](../rome_edit/models/compat.py)`` in upgrading.md) work when the Markdown is read
on a repository host but have no page on the built site.  Such a link is replaced by its text
when its target exists in the repository; a link to a file that exists nowhere is left alone,
so ``mkdocs build --strict`` still fails on it."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

_LINK = re.compile(r"\[(?P<text>[^\]]+)\]\((?P<target>\.\./[^)\s#]+)(?:#[^)\s]*)?\)")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    docs_dir = Path(os.path.abspath(config["docs_dir"]))
    repo = docs_dir.parent
    here = (docs_dir / page.file.src_path).parent

    def unlink(match: re.Match[str]) -> str:
        target = Path(os.path.normpath(here / match["target"]))  # lexical: symlinks kept
        outside_docs = docs_dir not in target.parents
        if outside_docs and repo in target.parents and target.exists():
            return match["text"]
        return match[0]

    return _LINK.sub(unlink, markdown)
