"""Statistics that stop when u = C⁻¹k settles (stats.stability), checked against ground truth."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict

import pytest
import torch
from conftest import make_tiny

from rome_edit.cli.main import main
from rome_edit.stats.cache import StatsKey, cached_second_moment
from rome_edit.stats.corpus import resolve_corpus
from rome_edit.stats.second_moment import SecondMoment, compute_second_moment
from rome_edit.stats.stability import Stability, StabilityMonitor

WORDS = ("the", "city", "name", "she", "he", "river", "old", "baker", "Paris", "Oslo", "Ani",
         "said", "that", "works", "as", "a", "in", "lives", "record", "for")


@pytest.fixture
def long_corpus(tmp_path):
    """600 seeded documents of 4–14 words, one per line."""
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(600)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(docs) + "\n")
    return path


def test_stops_once_stable_and_equals_a_fixed_pass_over_what_it_read(tiny_gptj, long_corpus):
    corpus = resolve_corpus(long_corpus)
    monitor = StabilityMonitor(Stability(min_cosine=0.9, first_check=40))
    early = compute_second_moment(tiny_gptj, 1, corpus, n_samples=600, batch_size=8,
                                  progress=False, until_stable=monitor)
    # checks at 40, 80, 160, ... documents; it stopped at the first that met the rule
    assert [c.n_documents for c in monitor.checks] == [40 * 2**i for i in range(len(
        monitor.checks))]
    assert early.n_documents == monitor.checks[-1].n_documents < 600
    assert "stable at" in early.stopping and monitor.stopped_at is not None
    lows = [c.min_cosine for c in monitor.checks]
    assert lows[0] is None and lows[-1] >= 0.9
    assert all(x is None or x < 0.9 for x in lows[:-1])
    # the documents read are exactly the first n_documents: a fixed pass over them is the same C
    fixed = compute_second_moment(tiny_gptj, 1, corpus, n_samples=early.n_documents,
                                  batch_size=8, progress=False)
    assert fixed.n_tokens == early.n_tokens
    torch.testing.assert_close(early.matrix, fixed.matrix, rtol=1e-5, atol=1e-6)
    # the probes came from the first batch; their directions agree with the final C's
    u = early.inverse().solve(monitor.probes.double())
    assert u.shape == monitor.probes.shape


def test_a_rule_never_met_reads_up_to_the_cap(tiny_gptj, long_corpus, caplog):
    rule = Stability(min_cosine=0.9, first_check=40, patience=1000)
    stats = compute_second_moment(tiny_gptj, 1, resolve_corpus(long_corpus), n_samples=200,
                                  batch_size=8, progress=False, until_stable=rule)
    assert stats.n_documents == 200 and "not stable by 200" in stats.stopping
    assert "did not meet the stability rule" in caplog.text


def test_probe_keys_given_and_validated(tiny_gptj, long_corpus):
    with pytest.raises(ValueError, match="min_cosine"):
        Stability(min_cosine=1.5)
    with pytest.raises(ValueError, match="patience"):
        Stability(patience=0)
    with pytest.raises(ValueError, match=r"\(p, d_mlp\)"):
        Stability(torch.zeros(5))
    monitor = StabilityMonitor(Stability(torch.randn(4, 7)))
    with pytest.raises(ValueError, match="7 wide"):
        monitor.stable(torch.eye(9), 10, 100)
    # singular C (fewer tokens than its width) counts as unstable, it does not raise
    monitor = StabilityMonitor(Stability(torch.randn(3, 4), patience=1))
    assert not monitor.stable(torch.zeros(4, 4), 1, 1)
    assert monitor.checks[-1].min_cosine is None


def test_cache_keys_of_fixed_passes_are_unchanged_and_stable_passes_differ(
        tiny_gptj, long_corpus, tmp_path):
    key = StatsKey("f" * 16, 1, "corpus:abc", "float32", 100, 64)
    legacy = {k: v for k, v in asdict(key).items() if k != "until_stable"}
    digest = hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()
    assert key.filename() == f"mom2-layer1-float32-{digest[:16]}.safetensors"
    rule = Stability(min_cosine=0.9, first_check=40)
    corpus = resolve_corpus(long_corpus)
    fixed = cached_second_moment(tiny_gptj, 1, corpus, 120, batch_size=8, cache_dir=tmp_path,
                                 progress=False)
    early = cached_second_moment(tiny_gptj, 1, corpus, 120, batch_size=8, cache_dir=tmp_path,
                                 progress=False, until_stable=rule)
    assert early.path != fixed.path and not early.cache_hit and early.checks
    again = cached_second_moment(tiny_gptj, 1, corpus, 120, batch_size=8, cache_dir=tmp_path,
                                 progress=False, until_stable=rule)
    assert again.cache_hit and again.stats.stopping == early.stats.stopping
    assert SecondMoment.load(early.path).stopping == early.stats.stopping


def test_cli_until_stable(tmp_path, tokenizer, long_corpus, capsys):
    lm = make_tiny("llama", tokenizer)
    model_dir = tmp_path / "model"
    lm.model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    subjects = tmp_path / "subjects.txt"
    subjects.write_text("Ani\nBrittany\nDavid\nOslo\n")
    out = tmp_path / "c.safetensors"
    argv = ["stats", "--model", str(model_dir), "--layer", "1", "--out", str(out), "--corpus",
            str(long_corpus), "--batch-size", "8", "--n-samples", "600", "--cache-dir",
            str(tmp_path / "cache"), "--until-stable", "--first-check", "40", "--min-cosine",
            "0.9", "--probe-subjects", str(subjects), "--probe-prompt", "Name: {}."]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "stable at" in printed and "min cos(u)" in printed
    assert SecondMoment.load(out).n_documents < 600
    bad = [*argv[:-1], "no placeholder"]
    assert main(bad) == 2 and "has no {}" in capsys.readouterr().err
    assert main([*argv[:-4], "--probe-subjects", str(tmp_path / "none.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_key_weighted_cosine_is_the_correlation_of_the_edits_responses():
    """⟨a, b⟩_C with C = KᵀK/N is the mean over the keys of (aᵀk)(bᵀk): the cosine is how alike
    two update directions respond to the keys the layer sees."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(500, 6, generator=g, dtype=torch.float64) * torch.tensor(
        [5.0, 2, 1, 0.5, 0.1, 0.01], dtype=torch.float64)
    c = keys.T @ keys / len(keys)
    a, b = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(
        3, 6, generator=g, dtype=torch.float64)
    ra, rb = keys @ a.T, keys @ b.T  # responses (N, 3)
    expected = (ra * rb).mean(0) / ((ra**2).mean(0) * (rb**2).mean(0)).sqrt()
    weighted = StabilityMonitor(Stability(torch.zeros(1, 6)))
    torch.testing.assert_close(weighted._cosine(a, b, c), expected)
    plain = StabilityMonitor(Stability(torch.zeros(1, 6), measure="euclidean"))
    torch.testing.assert_close(plain._cosine(a, b, c),
                               torch.nn.functional.cosine_similarity(a, b, dim=-1))
    with pytest.raises(ValueError, match="measure"):
        Stability(measure="l1")
