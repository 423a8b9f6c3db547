"""The logit lens: the last layer is the model's own output (exactly), lower layers equal a
truncated model's output, before/after comparisons and their first-win layers, the CLI."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch

from rome_edit.cli.main import main
from rome_edit.inspection.lens import LensComparison, LensResult, lens_logits, logit_lens
from rome_edit.models.architectures import out_proj_weight
from rome_edit.models.layers import logits_at_layer
from rome_edit.weights.write import add_rank_one, preserved

PROMPT = "Name: Brittany. Gender:"


def _ids(lm, text=PROMPT):
    return torch.tensor([lm.tokenizer(text, add_special_tokens=False)["input_ids"]])


def test_last_layer_is_the_models_own_logits_exactly(tiny_model):
    lens, logits = lens_logits(tiny_model, _ids(tiny_model))
    assert lens.shape[0] == tiny_model.n_layers
    # Not just close: the same modules on the same tensor.
    assert torch.equal(lens[-1], logits)
    with torch.no_grad():
        fresh = tiny_model.model(input_ids=_ids(tiny_model)).logits[0]
    assert torch.equal(lens[-1], fresh)


@pytest.mark.parametrize("family", ["gptj", "llama", "gpt2"])
def test_lower_layers_equal_a_truncated_model(family, tokenizer):
    from conftest import make_tiny

    lm = make_tiny(family, tokenizer)
    ids = _ids(lm)
    lens, _ = lens_logits(lm, ids)
    for layer in range(lm.n_layers - 1):
        with torch.no_grad():
            truncated = logits_at_layer(lm, layer, input_ids=ids)[0]
        torch.testing.assert_close(lens[layer], truncated, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(lens[layer], lens[-1])  # the layers really differ


def test_probabilities_ranks_and_top_tokens_agree(tiny_gptj):
    lm = tiny_gptj
    result = logit_lens(lm, PROMPT, [" Female", " Male"])
    lens, _ = lens_logits(lm, _ids(lm))
    probs = torch.softmax(lens.float(), -1)
    fid = lm.tokenizer(" Female", add_special_tokens=False)["input_ids"][0]
    torch.testing.assert_close(result.target_prob[" Female"], probs[..., fid])
    assert result.tokens == tuple(lm.tokenizer.decode([i]) for i in _ids(lm)[0])
    assert len(result.top_token) == lm.n_layers and len(result.top_token[0]) == len(result.tokens)
    top_ids = probs.argmax(-1)
    for layer in range(lm.n_layers):
        for pos in range(len(result.tokens)):
            assert result.top_token[layer][pos] == lm.tokenizer.decode([int(top_ids[layer, pos])])
            is_top = int(top_ids[layer, pos]) == fid
            assert (result.target_rank[" Female"][layer, pos] == 0) == is_top
    payload = result.to_json()
    assert {"tokens", "layers", "top_token", "targets"} <= payload.keys()


def _synthetic(ranks_last: list[int], probs_last: list[float]) -> LensResult:
    n = len(ranks_last)
    rank = torch.tensor(ranks_last)[:, None]
    prob = torch.tensor(probs_last)[:, None]
    return LensResult("p", ("a",), tuple(range(n)), tuple(("x",) for _ in range(n)),
                      prob, {"t": prob}, {"t": rank})


def test_first_top1_is_the_start_of_the_run_that_reaches_the_output():
    r = _synthetic([0, 3, 0, 0, 0], [0.5, 0.1, 0.6, 0.7, 0.9])
    assert r.first_top1("t") == 2
    assert r.first_ever_top1("t") == 0
    assert _synthetic([0, 0, 1], [0.5, 0.5, 0.1]).first_top1("t") is None


def test_first_flip_and_first_beats():
    def lens(p_new, p_old):
        n = len(p_new)
        probs = {"new": torch.tensor(p_new)[:, None], "old": torch.tensor(p_old)[:, None]}
        ranks = {k: (v < torch.maximum(probs["new"], probs["old"])).long() for k, v in
                 probs.items()}
        return LensResult("p", ("a",), tuple(range(n)), tuple(("x",) for _ in range(n)),
                          torch.zeros(n, 1), probs, ranks)

    before = lens([0.6, 0.3, 0.1, 0.1], [0.2, 0.5, 0.8, 0.9])
    after = lens([0.6, 0.3, 0.7, 0.9], [0.2, 0.5, 0.2, 0.1])
    comp = LensComparison(before, after, "test")
    assert comp.first_beats("new", "old") == 2  # the run that reaches the output
    assert comp.first_flip("new", "old") == 2  # layer 0 was already "new" before
    assert comp.first_flip("old", "new") is None
    torch.testing.assert_close(comp.difference("new")[:, 0],
                               torch.tensor([0.0, 0.0, 0.6, 0.8]))


def test_compare_lens_sees_an_edit_only_from_its_layer_up_and_restores(tiny_gptj):
    from rome_edit.inspection.lens import compare_lens

    lm = tiny_gptj
    layer = 2
    before_w = out_proj_weight(lm.model, lm.arch, layer).detach().clone()
    u = torch.randn(before_w.shape[1], generator=torch.Generator().manual_seed(0))
    lam = torch.randn(before_w.shape[0], generator=torch.Generator().manual_seed(1)) * 5

    @contextmanager
    def edit():
        with preserved(lm, [layer]):
            add_rank_one(lm, layer, u, lam)
            yield

    comp = compare_lens(lm, PROMPT, edit(), [" Female", " Male"], "rank-one test edit")
    assert torch.equal(out_proj_weight(lm.model, lm.arch, layer), before_w)
    diff = comp.difference(" Male")
    assert torch.all(diff[:layer] == 0)  # lower layers cannot see the edit
    assert diff[layer:].abs().max() > 1e-4
    assert comp.to_json()["after"]["tokens"] == list(comp.before.tokens)


def test_bad_targets_and_prompts_are_refused(tiny_gptj):
    with pytest.raises(ValueError, match="one token is required"):
        logit_lens(tiny_gptj, PROMPT, [" Femaleness and more"])
    with pytest.raises(ValueError, match="empty"):
        logit_lens(tiny_gptj, "", [])


@pytest.fixture
def saved_tiny(tiny_gptj, tmp_path):
    path = tmp_path / "tiny"
    tiny_gptj.model.save_pretrained(path)
    tiny_gptj.tokenizer.save_pretrained(path)
    return path


def test_cli_lens_plain_and_with_a_record(saved_tiny, tmp_path, tiny_gptj, capsys):
    out = tmp_path / "lens"
    assert main(["lens", "--model", str(saved_tiny), "--prompt", PROMPT, "--target", " Male",
                 "--out", str(out)]) == 0
    data = json.loads((out / "lens.json").read_text())
    assert len(data["top_token"]) == tiny_gptj.n_layers
    assert len(data["targets"][" Male"]["prob"][0]) == len(data["tokens"])
    assert (out / "lens_top.png").exists() and (out / "lens_target0.png").exists()
    # An edit record made on this model: before/after and the difference
    hp = {"layers": [1], "v_loss_layer": 3, "v_num_grad_steps": 3, "mom2_adjustment": False,
          "context_template_length_params": [[3, 1]]}
    (tmp_path / "hp.json").write_text(json.dumps(hp))
    (tmp_path / "ctx.json").write_text(json.dumps(["{}"]))
    assert main(["edit", "--model", str(saved_tiny), "--hparams", str(tmp_path / "hp.json"),
                 "--context-templates", str(tmp_path / "ctx.json"), "--subject", "Brittany",
                 "--prompt", "Name: {}. Gender:", "--target", " Male",
                 "--out", str(tmp_path / "edit")]) == 0
    out2 = tmp_path / "lens2"
    assert main(["lens", "--model", str(saved_tiny), "--prompt", PROMPT, "--edit",
                 str(tmp_path / "edit"), "--out", str(out2)]) == 0
    data = json.loads((out2 / "lens.json").read_text())
    assert " Male" in data["difference"] and "after" in data
    assert all(v == 0 for v in data["difference"][" Male"][0])  # layer 0 is below the edit
    assert (out2 / "lens_diff_target0.png").exists()


def test_cli_lens_refusals(saved_tiny, tmp_path, capsys):
    code = main(["lens", "--model", str(saved_tiny), "--prompt", PROMPT, "--target",
                 " Femaleness and more", "--out", str(tmp_path / "o")])
    assert code == 2 and "one token" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    code = main(["lens", "--model", str(saved_tiny), "--prompt", PROMPT, "--vector",
                 str(tmp_path / "v.safetensors"), "--out", str(tmp_path / "o")])
    assert code == 2 and "--subject" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_lens_with_a_vector_written_at_the_subject(saved_tiny, tmp_path):
    from rome_edit.analysis.concept_vector import ConceptVector, save_concept_vector
    from rome_edit.models.loading import load_model

    identity = load_model(str(saved_tiny)).identity
    vector = torch.randn(32, generator=torch.Generator().manual_seed(0)) * 20
    save_concept_vector(ConceptVector(vector, "raw", 1.0, float(vector.norm()), identity, 1,
                                      1.0, float(vector.norm())), tmp_path / "v.safetensors")
    hp = {"layers": [1], "v_loss_layer": 3, "mom2_adjustment": False}
    (tmp_path / "hp.json").write_text(json.dumps(hp))
    (tmp_path / "ctx.json").write_text(json.dumps(["{}"]))
    out = tmp_path / "lv"
    assert main(["lens", "--model", str(saved_tiny), "--prompt", PROMPT, "--target", " Male",
                 "--vector", str(tmp_path / "v.safetensors"), "--subject", "Brittany",
                 "--hparams", str(tmp_path / "hp.json"), "--context-templates",
                 str(tmp_path / "ctx.json"), "--out", str(out)]) == 0
    diff = torch.tensor(json.loads((out / "lens.json").read_text())["difference"][" Male"])
    assert torch.all(diff[0] == 0)  # below the vector's layer
    assert diff[1:, -1].abs().max() > 1e-6  # the last token sees it from layer 1 up
