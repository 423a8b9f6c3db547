"""Defaults for a model without a preset: traced layer, last loss layer, offline statistics."""

import json
import logging
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny

from rome_edit.assembly import session
from rome_edit.assembly.session import (
    corpus_spec,
    default_hparams,
    inverse_for,
    relative_depth_layer,
)
from rome_edit.cli.main import main
from rome_edit.models.scoring import next_token_logprobs
from rome_edit.rome.hparams import ROMEHyperParams
from rome_edit.stats import sampled as sampled_module
from rome_edit.stats.corpus import CorpusError, resolve_corpus
from rome_edit.stats.sampled import sampled_corpus


def test_no_preset_defaults(tiny_model, caplog):
    with caplog.at_level(logging.WARNING):
        hp = default_hparams(tiny_model, layer=2)
    arch = tiny_model.arch
    ref = ROMEHyperParams.preset("gpt-j-6b")
    assert hp.layer == 2 and hp.v_loss_layer == tiny_model.n_layers - 1
    assert hp.mom2_dataset == "sampled" and hp.mom2_n_samples == session.NO_PRESET_N_SAMPLES
    paths = hp.extra  # written for a complete reference file, never read
    assert (paths["rewrite_module_tmp"], paths["mlp_module_tmp"], paths["ln_f_module"]) == \
        (arch.out_proj, arch.mlp, arch.final_norm)
    assert (hp.clamp_norm_factor, hp.v_num_grad_steps, hp.kl_factor) == \
        (ref.clamp_norm_factor, ref.v_num_grad_steps, ref.kl_factor)
    assert "rome-edit calibrate" in caplog.text
    assert corpus_spec(hp) == "sampled"
    assert "apt-get install debian-handbook" in caplog.text  # how to get real text instead


def test_no_preset_statistics_on_the_handbook_when_installed(tiny_gptj, tmp_path, monkeypatch,
                                                             caplog):
    book = tmp_path / "en-US"
    book.mkdir()
    prose = ["The system keeps a list of packages.", "Each user has a home directory.",
             "A server answers requests from the network."]
    for i, text in enumerate(prose):
        (book / f"page{i}.html").write_text(f'<html><body><div class="para">{text}</div>'
                                            "</body></html>")
    monkeypatch.setenv("ROME_EDIT_HANDBOOK", str(book))
    with caplog.at_level(logging.WARNING):
        hp = default_hparams(tiny_gptj, layer=1)
    assert hp.mom2_dataset == session.NO_PRESET_CORPUS == "debian-handbook"
    assert "sampled from the model" not in caplog.text and corpus_spec(hp) == "debian-handbook"
    inv = inverse_for(tiny_gptj, hp, cache_dir=tmp_path / "cache", progress=False)
    assert inv.provenance["corpus_id"].startswith("debian-handbook:")
    assert inv.provenance["n_documents"] == len(prose)


def test_smollm2_gguf_gets_its_preset(tiny_model, caplog):
    """The preset is picked by the model's name or its GGUF file's name — no 93 MB file."""
    from dataclasses import replace
    from pathlib import Path

    gguf = Path("/anywhere/SmolLM2-135M-Instruct.Q4_1.gguf")
    by_name = replace(tiny_model, name="smollm2-135m-gguf")
    by_file = replace(tiny_model, name=str(gguf), gguf_file=gguf)
    shipped = ROMEHyperParams.preset("smollm2-135m")
    for lm in (by_name, by_file):
        assert session.preset_name(lm) == "smollm2-135m"
        with caplog.at_level(logging.WARNING):
            assert default_hparams(lm) == shipped
        assert "no hyperparameter preset" not in caplog.text
        assert default_hparams(lm, layer=2).layer == 2
    other = replace(tiny_model, name="/x/other.gguf", gguf_file=Path("/x/other.gguf"))
    assert session.preset_name(other) is None and session.preset_name(tiny_model) is None
    for preset in set(session.MODEL_PRESETS.values()):  # every mapped preset is shipped
        ROMEHyperParams.preset(preset)


def test_relative_depth_never_layer_zero_of_a_parallel_block(tokenizer):
    gptj, gpt2 = make_tiny("gptj", tokenizer), make_tiny("gpt2", tokenizer)
    assert relative_depth_layer(gptj) == 1  # round(5/28·4) = 1
    for n, want in ((28, 5), (6, 1), (2, 1)):
        fake = SimpleNamespace(n_layers=n, arch=SimpleNamespace(parallel=True))
        assert relative_depth_layer(fake) == want
    fake = SimpleNamespace(n_layers=2, arch=SimpleNamespace(parallel=False))
    assert relative_depth_layer(fake) == 0
    assert relative_depth_layer(gpt2) == 1


def test_default_layer_traces_the_models_own_answers(tiny_gptj, monkeypatch, caplog):
    calls = {}

    def fake_locate(lm, prompt, cases, candidates, progress):
        calls.update(prompt=prompt, cases=cases, candidates=candidates)
        return SimpleNamespace(recommended_layer=2, n_cases=len(cases), recommended_effect=0.3)

    monkeypatch.setattr(session, "locate", fake_locate)
    subjects = ["Anna", "Peter", "Anna", "Laura"]
    with caplog.at_level(logging.WARNING):
        hp = default_hparams(tiny_gptj, prompt="Name: {}. Gender:", subjects=subjects)
    assert hp.layer == 2 and "causal trace" in caplog.text
    names = [s for s, _ in calls["cases"]]
    assert names == ["Anna", "Peter", "Laura"]  # each subject once
    lp = next_token_logprobs(tiny_gptj.model, tiny_gptj.tokenizer,
                             [f"Name: {n}. Gender:" for n in names])
    top = [tiny_gptj.tokenizer.decode([t]) for t in lp.argmax(-1).tolist()]
    assert [a for _, a in calls["cases"]] == top

    def no_case(*args, **kwargs):
        raise ValueError("all cases were skipped")

    monkeypatch.setattr(session, "locate", no_case)
    assert default_hparams(tiny_gptj, prompt="Name: {}. Gender:", subjects=["Anna"]).layer == \
        relative_depth_layer(tiny_gptj)
    assert default_hparams(tiny_gptj).layer == relative_depth_layer(tiny_gptj)  # no prompt


def test_sampled_corpus_is_reproducible_and_fixed_once_prepared(tiny_gptj, caplog):
    with caplog.at_level(logging.WARNING):
        a = sampled_corpus(tiny_gptj, seed=0, length=6, batch=4)
    assert "sampled from the model" in caplog.text
    b = sampled_corpus(tiny_gptj, seed=0, length=6, batch=4)
    c = sampled_corpus(tiny_gptj, seed=1, length=6, batch=4)
    first = [t for t, _ in zip(a, range(6))]
    assert first == [t for t, _ in zip(b, range(6))]
    assert first != [t for t, _ in zip(c, range(6))]
    assert a.corpus_id == f"sampled:{tiny_gptj.fingerprint}:seed0:len6:batch4" != c.corpus_id
    b.prepare(5)
    fixed = list(b)  # finite once prepared: the texts sampled so far (whole batches)
    assert 5 <= len(fixed) <= 8 and fixed == [t for t, _ in zip(a, range(len(fixed)))]
    assert resolve_corpus("sampled:1", lm=tiny_gptj).corpus_id.endswith("seed1:len64:batch128")
    with pytest.raises(CorpusError, match="needs the model"):
        resolve_corpus("sampled")
    with pytest.raises(CorpusError, match="whole number"):
        resolve_corpus("sampled:x", lm=tiny_gptj)


def test_statistics_need_no_optional_package(tiny_gptj, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    hp = default_hparams(tiny_gptj, layer=1)
    hp = ROMEHyperParams.from_dict({**hp.to_dict(), "mom2_n_samples": 8})
    inv = inverse_for(tiny_gptj, hp, cache_dir=tmp_path, progress=False)
    assert inv.provenance["corpus_id"].startswith("sampled:")
    assert inv.provenance["n_documents"] == 8
    # the second time C comes from the cache: nothing is sampled
    monkeypatch.setattr(sampled_module, "_sample_batch",
                        lambda *a: (_ for _ in ()).throw(AssertionError("sampled again")))
    again = inverse_for(tiny_gptj, hp, cache_dir=tmp_path, progress=False)
    keys = torch.randn(3, tiny_gptj.model.config.n_inner)
    assert torch.allclose(inv.solve(keys), again.solve(keys))
    # the reference's corpus is asked for only by name, and then says what to install
    wiki = ROMEHyperParams.from_dict({**hp.to_dict(), "mom2_dataset": "wikipedia"})
    assert corpus_spec(wiki) == "hf:wikipedia"
    with pytest.raises(CorpusError, match="pip install datasets"):
        inverse_for(tiny_gptj, wiki, cache_dir=tmp_path, progress=False)


def test_edit_cli_on_a_model_without_preset(tiny_gptj, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "datasets", None)
    monkeypatch.setenv("ROME_EDIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny"
    tiny_gptj.model.save_pretrained(path)
    tiny_gptj.tokenizer.save_pretrained(path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Anna lives in the city of Paris.\nPeter said that he was tired.\n")
    ctx = tmp_path / "ctx.json"
    ctx.write_text(json.dumps(["{}", "The weather was cold. {}"]))
    with caplog.at_level(logging.WARNING):
        assert main(["edit", "--model", str(path), "--subject", "Anna", "--prompt",
                     "Name: {}. Gender:", "--target", " Male", "--corpus", str(corpus),
                     "--context-templates", str(ctx), "--out", str(tmp_path / "e")]) == 0
    assert "rome-edit calibrate" in caplog.text
    record = json.loads((tmp_path / "e" / "record.json").read_text())
    assert record["hparams"]["v_loss_layer"] == 3
    assert record["stats"]["corpus_id"].startswith("file:corpus.txt")
