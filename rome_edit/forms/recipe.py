"""A protected update form as a setting that travels in an hparams file (``"protect"``).

``rome-edit calibrate`` may choose a protected update (docs/beyond-rome.md, "Protected keys")
instead of ROME's plain one.  The reference's flat hparams JSON has no key for that, so the
choice is written as one companion key, ``"protect"``, whose value is a
:class:`ProtectRecipe`::

    "protect": {"source": "other-names", "form": "soft", "weight": 0.01,
                "threshold": 0.01, "positions": "last"}

:class:`~rome_edit.rome.hparams.ROMEHyperParams` keeps unknown keys in ``extra`` and writes them
back, so the file still loads everywhere and round-trips.  ``rome-edit edit`` and
``rome-edit sweep`` read it (:func:`rome_edit.cli.protect_args.protection_from_args`) when
``--protect`` is not given; ``--protect none`` or another ``--protect`` overrides it.  The
recipe names *which* subjects to protect (a source), not their keys: the keys are computed at
the edit layer, on the command's prompt and names, as ``--protect`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from rome_edit.forms.protect import PROTECT_FORMS, ProtectForm, ProtectSettings
from rome_edit.forms.protected_keys import POSITIONS, SOURCES, Protection, build_bank
from rome_edit.models.loading import LoadedModel
from rome_edit.rome.hparams import ROMEHyperParams

__all__ = ["HPARAMS_KEY", "ProtectRecipe", "with_recipe"]

HPARAMS_KEY = "protect"


@dataclass(frozen=True)
class ProtectRecipe:
    """Which subjects an edit protects (``source``: other-names or same-last-token) and how
    (``form``, ``weight``, ``threshold``, ``positions``: as ``--protect-form`` etc.)."""

    source: str
    form: ProtectForm = "auto"
    weight: float = ProtectSettings().weight
    threshold: float = ProtectSettings().threshold
    positions: str = "last"

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"protection source {self.source!r} cannot travel in an hparams "
                             f"file; use one of {list(SOURCES)}.")
        if self.positions not in POSITIONS:
            raise ValueError(f"unknown protected positions {self.positions!r}; use one of "
                             f"{list(POSITIONS)}.")
        ProtectSettings(self.form, self.weight, self.threshold)  # refuses bad values now

    @property
    def settings(self) -> ProtectSettings:
        return ProtectSettings(self.form, self.weight, self.threshold)

    def label(self) -> str:
        """Short description, e.g. ``other-names, soft, weight 0.01``."""
        out = f"{self.source}, {self.form}"
        if self.form in ("auto", "soft"):
            out += f", weight {self.weight:g}"
        if self.form == "null-space":
            out += f", threshold {self.threshold:g}"
        return out if self.positions == "last" else out + f", {self.positions} positions"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "form": self.form, "weight": self.weight,
                "threshold": self.threshold, "positions": self.positions}

    @classmethod
    def from_dict(cls, data: Any) -> ProtectRecipe:
        if not isinstance(data, dict) or "source" not in data:
            raise ValueError(f"the hparams key {HPARAMS_KEY!r} must be an object with at least "
                             f"'source' (one of {list(SOURCES)}), e.g. "
                             '{"source": "other-names", "form": "soft", "weight": 0.01}; '
                             f"got {data!r}.")
        unknown = sorted(set(data) - {"source", "form", "weight", "threshold", "positions"})
        if unknown:
            raise ValueError(f"the hparams key {HPARAMS_KEY!r} has unknown fields {unknown}; "
                             "allowed: source, form, weight, threshold, positions.")
        if data.get("form", "auto") not in PROTECT_FORMS:
            raise ValueError(f"the hparams key {HPARAMS_KEY!r} has form {data.get('form')!r}; "
                             f"use one of {list(PROTECT_FORMS)}.")
        return cls(**data)

    @classmethod
    def from_hparams(cls, hparams: ROMEHyperParams) -> ProtectRecipe | None:
        """The recipe an hparams file carries, or ``None`` (plain ROME, the reference)."""
        data = hparams.extra.get(HPARAMS_KEY)
        return None if data is None else cls.from_dict(data)

    def build(self, lm: LoadedModel, layer: int, prompt: str, names: Sequence[str],
              context_templates: Sequence[str], forms: Sequence[str] = ()) -> Protection:
        """The protected keys of ``names`` at ``layer`` on ``prompt`` (as ``--protect``), in
        each of the edit's subject ``forms`` too."""
        bank = build_bank(lm, layer, prompt, list(names), context_templates, self.source,
                          self.positions, forms)
        return Protection(bank, self.settings)


def with_recipe(hparams: ROMEHyperParams, recipe: ProtectRecipe | None) -> ROMEHyperParams:
    """``hparams`` carrying ``recipe`` (``None``: without any ``"protect"`` key)."""
    extra = {k: v for k, v in hparams.extra.items() if k != HPARAMS_KEY}
    if recipe is not None:
        extra[HPARAMS_KEY] = recipe.to_dict()
    return replace(hparams, extra=extra)

