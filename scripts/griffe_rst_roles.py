"""Griffe extension for the API reference (mkdocs.yml): the docstrings use reStructuredText
roles (``:class:`Applied```, ``:func:`~rome_edit.analysis.deltas.load_delta_set```), which
Markdown would show as a stray ``:class:`` before the name.  Each role becomes a cross-reference
when its target is rendered in the reference (an object named by a ``::: path`` line under
docs/api/, or one of its own public members), else a plain code span; ``~`` keeps only the last
name, as in Sphinx."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|obj|exc):`(?P<tilde>~?)(?P<target>[^`]+)`")
_DIRECTIVE = re.compile(r"^:::\s+(\S+)", re.MULTILINE)


class RstRoles(griffe.Extension):
    def __init__(self, api_pages: str = "docs/api") -> None:
        super().__init__()
        self.rendered = {m for page in sorted(Path(api_pages).glob("*.md"))
                         for m in _DIRECTIVE.findall(page.read_text(encoding="utf-8"))}

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader,
                   **kwargs: Any) -> None:
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = _ROLE.sub(
                    lambda m, o=obj: self._replace(m, o, loader), obj.docstring.value)

    def _replace(self, match: re.Match[str], obj: griffe.Object,
                 loader: griffe.GriffeLoader) -> str:
        target = match["target"].removesuffix("()")
        shown = target.rsplit(".", 1)[-1] if match["tilde"] else target
        path = self._resolve(target, obj, loader)
        if path is not None:
            return f"[`{shown}`][{path}]"
        return f"`{shown}`"

    def _resolve(self, target: str, obj: griffe.Object, loader: griffe.GriffeLoader
                 ) -> str | None:
        """The canonical path of ``target`` if the reference renders it, else None."""
        for scope in [obj, *_parents(obj)]:
            candidate = f"{scope.path}.{target}"
            try:
                found = loader.modules_collection[candidate]
            except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
                continue
            return self._rendered_path(found)
        try:  # an absolute path
            found = loader.modules_collection[target]
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None
        return self._rendered_path(found)

    def _rendered_path(self, found: griffe.Object | griffe.Alias) -> str | None:
        try:
            final = found.final_target if found.is_alias else found
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None
        if final.path in self.rendered:
            return final.path
        # a member is rendered under its class when public and documented (mkdocs.yml filters)
        owner, _, member = final.path.rpartition(".")
        if owner in self.rendered and not member.startswith("_") and final.docstring:
            return final.path
        return None


def _parents(obj: griffe.Object) -> list[griffe.Object]:
    out = []
    parent = obj.parent
    while parent is not None:
        out.append(parent)
        parent = parent.parent
    return out


def _walk(obj: griffe.Object) -> list[griffe.Object]:
    out = [obj]
    for member in obj.members.values():
        if not member.is_alias and isinstance(member, griffe.Object):
            out += _walk(member)
    return out
