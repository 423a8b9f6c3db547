"""Bundled data: the names list and the synthetic corpus of the toy model."""

from rome_edit.data.names import GENDERS, NameEntry, NamesFileError, load_names

__all__ = ["GENDERS", "NameEntry", "NamesFileError", "load_names"]
