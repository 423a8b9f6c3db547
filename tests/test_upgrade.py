"""Upgrade-proofing: the GPT-J kernel's self-check and fallback, identities that survive a
transformers upgrade, and saved work of rome-edit 0.1.0 (the shipped vectors) still loading."""

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import make_tiny

from rome_edit.analysis.concept_vector import load_concept_vector as load_gender_vector
from rome_edit.analysis.deltas import load_delta_set
from rome_edit.models import gptj_suffix
from rome_edit.models.identity import fingerprint, fingerprint_of
from rome_edit.models.loading import load_model, wrap_model
from rome_edit.rome.compute import compute_edits
from rome_edit.rome.request import EditRequest
from rome_edit.stats.cache import StatsKey, cached_second_moment
from rome_edit.stats.corpus import TextCorpus
from rome_edit.stats.second_moment import SecondMoment
from rome_edit.weights.write import apply_records

SHIPPED = Path(__file__).resolve().parents[1] / "vectors" / "bundled-sweep"
CTX = ["{}", "The weather was cold. {}", "Record. {}"]
REQS = [EditRequest(s, "Name: {}. Gender:", t) for s, t in
        (("Brittany", " Male"), ("David", " Female"), ("Christopher", " Female"))]


def _hp(lm):
    from rome_edit.rome.hparams import ROMEHyperParams

    return ROMEHyperParams(layers=(1,), v_loss_layer=lm.n_layers - 1, v_num_grad_steps=6,
                           clamp_norm_factor=4.0, mom2_adjustment=False)


def _deltas(lm, engine, chunk_size=64):
    records = compute_edits(lm, REQS, _hp(lm), CTX, engine=engine, chunk_size=chunk_size,
                            progress=False)
    return torch.stack([r.delta for r in records]), {r.timings["step"] for r in records}


def _assert_same_deltas(got: torch.Tensor, want: torch.Tensor) -> None:
    # Both paths do the same float32 arithmetic in another order: each δ's normwise relative
    # difference is a few ε32 (measured 1.8 ε32 ≈ 2.2e-7); 1e-5 (≈ 84 ε32) leaves room for the
    # Adam steps to amplify it.  Normwise, not per entry: entries near 0 have no relative bound.
    rel = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert rel.max().item() < 1e-5, rel


def test_kernel_is_checked_and_used(tokenizer):
    lm = make_tiny("gptj", tokenizer)
    fast, steps = _deltas(lm, "batched")
    generic, generic_steps = _deltas(make_tiny("gptj", tokenizer), "batched-generic")
    assert steps == {"gptj-kernel"} and generic_steps == {"generic"}
    _assert_same_deltas(fast, generic)


@pytest.mark.parametrize("fault", ["wrong numbers", "cannot run"])
def test_kernel_fallback_gives_the_right_result_with_one_warning(tokenizer, monkeypatch, caplog,
                                                                 fault):
    want, _ = _deltas(make_tiny("gptj", tokenizer), "batched-generic")
    if fault == "wrong numbers":  # e.g. a release changed the attention's arithmetic
        original = gptj_suffix.SuffixGroups.logits
        monkeypatch.setattr(gptj_suffix.SuffixGroups, "logits",
                            lambda self, d, rows: original(self, d, rows) + 0.5)
    else:  # e.g. a release moved what the kernel reads
        def moved(*args, **kwargs):
            raise AttributeError("'GPTJAttention' object has no attribute 'embed_positions'")

        monkeypatch.setattr(gptj_suffix, "gptj_sin_cos", moved)
    lm = make_tiny("gptj", tokenizer)
    with caplog.at_level(logging.WARNING, logger="rome_edit.rome.suffix_step"):
        got, steps = _deltas(lm, "batched", chunk_size=1)  # three chunks, one check
    assert steps == {"generic"}
    _assert_same_deltas(got, want)
    warnings = [r for r in caplog.records if "not used for this model" in r.getMessage()]
    assert len(warnings) == 1


def _scheme1(lm, release):
    """rome-edit 0.1.0's fingerprint, written out independently of the library code."""
    config = lm.model.config.to_dict()
    config.pop("_name_or_path", None)
    config["transformers_version"] = release
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    embed = lm.model.get_input_embeddings().weight.detach()
    digest.update(embed.flatten()[:: max(1, embed.numel() // 65_536)].float().numpy().tobytes())
    return digest.hexdigest()[:12]


def test_fingerprint_ignores_library_versions_but_not_the_model(tokenizer, monkeypatch):
    lm = make_tiny("gptj", tokenizer)
    config = lm.model.config
    real = type(config).to_dict

    def upgraded(self):  # what a later release writes: another version, a new unset default
        return {**real(self), "transformers_version": "9.99.0", "some_new_option": None}

    monkeypatch.setattr(type(config), "to_dict", upgraded)
    embed = lm.model.get_input_embeddings().weight
    assert fingerprint(lm.model, embed) == lm.fingerprint
    monkeypatch.setattr(config, "rotary_dim", 2)  # an architectural change
    assert fingerprint(lm.model, embed) != lm.fingerprint
    monkeypatch.undo()
    other = make_tiny("gptj", tokenizer, seed=1)  # same config, other weights
    assert other.fingerprint != lm.fingerprint and len(lm.fingerprint) == 16


def test_record_written_the_old_way_loads_and_another_model_is_refused(tokenizer):
    lm = make_tiny("gptj", tokenizer)
    (record,) = compute_edits(lm, REQS[:1], _hp(lm), CTX, progress=False)
    from dataclasses import replace

    old = replace(record, model_identity=f"tiny-gptj@{_scheme1(lm, '5.23.0')}",
                  attn_implementation=None)
    before = lm.model.transformer.h[1].mlp.fc_out.weight.clone()
    apply_records(lm, [old])
    assert not torch.equal(lm.model.transformer.h[1].mlp.fc_out.weight, before)
    other = make_tiny("gptj", tokenizer, seed=1)
    untouched = other.model.transformer.h[1].mlp.fc_out.weight.clone()
    for identity in (old.model_identity, lm.identity):
        assert not other.same_model(identity)  # other weights: refused in either scheme
    assert other.same_model(f"tiny-gptj@{_scheme1(other, '5.0.0')}")
    with pytest.raises(ValueError, match="was made on"):
        apply_records(other, [old])
    assert torch.equal(other.model.transformer.h[1].mlp.fc_out.weight, untouched)


def test_shipped_vector_and_sweep_load_on_the_bundled_model():
    lm = load_model()
    vector = load_gender_vector(SHIPPED / "analysis" / "gender_vector.safetensors")
    deltas = load_delta_set(SHIPPED)
    assert len(fingerprint_of(vector.model_identity)) == 12  # written by rome-edit 0.1.0
    assert lm.same_model(vector.model_identity) and lm.same_model(deltas.model_identity)
    assert fingerprint_of(vector.model_identity) != lm.fingerprint
    tiny = wrap_model(make_tiny("gptj", lm.tokenizer).model, lm.tokenizer, "bundled:toy-gptj")
    assert not tiny.same_model(vector.model_identity)


def test_statistics_cached_under_the_old_identity_are_found(tokenizer, tmp_path):
    lm = make_tiny("gptj", tokenizer)
    texts = ["Name: Ann. Gender: Female.", "Brittany lives in the city of Paris."] * 2
    corpus = TextCorpus("tiny-corpus", lambda: iter(texts))
    fresh = cached_second_moment(lm, 1, corpus, n_samples=4, cache_dir=tmp_path / "a",
                                 progress=False)
    old_fp = _scheme1(lm, "5.20.0")
    key = StatsKey(old_fp, 1, corpus.corpus_id, "float32", 4, 128)
    from dataclasses import replace

    legacy = replace(fresh.stats, model_identity=f"tiny-gptj@{old_fp}")
    legacy.save(tmp_path / "b" / key.filename())
    hit = cached_second_moment(lm, 1, corpus, n_samples=4, cache_dir=tmp_path / "b",
                               progress=False)
    assert hit.cache_hit
    torch.testing.assert_close(hit.stats.matrix, fresh.stats.matrix)
    copied = SecondMoment.load(hit.path, lm, 1)  # now stored under the current identity
    assert copied.model_identity == lm.identity
