"""The study's names list: ``name,gender,split`` rows typed by hand (no download).

``split`` is ``edit`` for the names whose edits the sweep records and ``heldout`` for names the
model knows but the delta analysis never sees.  The split is fixed in the file, so every run and
every machine uses the same one.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

Gender = Literal["female", "male"]
GENDERS: tuple[Gender, ...] = ("female", "male")
SPLITS = ("edit", "heldout")


@dataclass(frozen=True)
class NameEntry:
    name: str
    gender: Gender
    split: str = "edit"


class NamesFileError(ValueError):
    """A names file that cannot be used; the message says what to fix."""


def bundled_names_path() -> Path:
    return Path(str(resources.files("rome_edit.study").joinpath("names.csv")))


def parse_names(text: str, source: str = "<names>") -> list[NameEntry]:
    """Parse CSV text with at least ``name`` and ``gender`` columns (``split`` optional).

    Rejects duplicates, empty names or lines and gender labels other than female/male, naming
    the line.
    """
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()  # blank lines at the very end are just how the file was saved
    for line_no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            # csv silently skips blank rows; a gap inside the table usually means a row was
            # deleted or pasted wrongly, so it is reported rather than guessed around.
            raise NamesFileError(f"{source}:{line_no}: empty line; delete it (one 'name,gender' "
                                 "row per line, no gaps).")
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip().lower() for f in reader.fieldnames or []]
    if "name" not in fields or "gender" not in fields:
        raise NamesFileError(
            f"{source}: the header must name the columns 'name' and 'gender' (found {fields}); "
            "write a first line such as 'name,gender'."
        )
    entries: list[NameEntry] = []
    seen: dict[str, int] = {}
    for line_no, row in enumerate(reader, start=2):
        row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
        name, gender = row.get("name", ""), row.get("gender", "").lower()
        if not name and not gender:
            raise NamesFileError(f"{source}:{line_no}: row with neither name nor gender; "
                                 "delete it.")
        if not name:
            raise NamesFileError(f"{source}:{line_no}: empty name; remove the line or fill it in.")
        if gender not in GENDERS:
            raise NamesFileError(
                f"{source}:{line_no}: gender {row.get('gender')!r} for {name!r} is not one of "
                f"{list(GENDERS)}; fix the label."
            )
        key = name.lower()
        if key in seen:
            raise NamesFileError(
                f"{source}:{line_no}: {name!r} already appears on line {seen[key]}; "
                "keep one row per name."
            )
        seen[key] = line_no
        split = row.get("split") or "edit"
        entries.append(NameEntry(name, gender, split))  # type: ignore[arg-type]
    if not entries:
        raise NamesFileError(f"{source}: no names found; add rows of 'name,gender'.")
    return entries


def load_names(path: str | Path | None = None, split: str | None = None) -> list[NameEntry]:
    """Load a names CSV (default: the bundled list), optionally only one split."""
    path = Path(path) if path is not None else bundled_names_path()
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise NamesFileError(f"names file {path} does not exist; pass an existing CSV.") from None
    except UnicodeDecodeError as err:
        raise NamesFileError(
            f"{path} is not UTF-8 text (byte {err.start}); re-save it as UTF-8."
        ) from None
    entries = parse_names(text, str(path))
    if split is not None:
        if split not in SPLITS:
            raise NamesFileError(f"unknown split {split!r}; use one of {list(SPLITS)}.")
        entries = [e for e in entries if e.split == split]
    return entries


def balanced_names(entries: Sequence[NameEntry], n: int | None) -> list[NameEntry]:
    """The first ``n`` names alternating female, male, female, … in list order (the rest of
    the longer gender once the other runs out), so any prefix is as balanced as it can be."""
    by_gender = [[e for e in entries if e.gender == g] for g in GENDERS]
    mixed: list[NameEntry] = []
    for i in range(max(map(len, by_gender), default=0)):
        mixed.extend(group[i] for group in by_gender if i < len(group))
    return mixed if n is None else mixed[:n]
