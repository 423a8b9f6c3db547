"""The gender study's own data helpers: its names list and the balanced order ``locate`` traces
names in."""

import pytest

from rome_edit.study.names import NameEntry, balanced_names, load_names


def test_names_data_is_balanced_and_split():
    names = load_names()
    assert sum(e.gender == "female" for e in names) >= 500
    assert sum(e.gender == "male" for e in names) >= 500
    assert len(load_names(split="heldout")) >= 100
    assert len({e.name.lower() for e in names}) == len(names)


def test_balanced_names_alternate():
    entries = [NameEntry(f"f{i}", "female") for i in range(3)] + \
        [NameEntry(f"m{i}", "male") for i in range(5)]
    assert [e.name for e in balanced_names(entries, 6)] == ["f0", "m0", "f1", "m1", "f2", "m2"]
    assert [e.name for e in balanced_names(entries, None)][-2:] == ["m3", "m4"]


def test_gender_cases_answer_each_name_by_its_gender():
    from rome_edit.study.task import gender_cases

    entries = [NameEntry("Emma", "female"), NameEntry("Liam", "male")]
    assert gender_cases(entries) == [("Emma", " Female"), ("Liam", " Male")]
    assert gender_cases(entries, {"female": " she", "male": " he"})[1] == ("Liam", " he")
    with pytest.raises(ValueError, match="no answer"):
        gender_cases(entries, {"female": " she"})
