"""Neuron importance: each cell is the indirect effect of restoring one key coordinate (checked
against a hand-written restoration), fast == plain, the causal zeros, the gradients, the
agreement maths, and the CLI."""

from __future__ import annotations

import json

import pytest
import scipy.stats
import torch
from conftest import make_tiny

from rome_edit.cli.main import main
from rome_edit.inspection.neuron_overlap import (
    key_preimage,
    rank_agreement,
    spearman,
    top_k_overlap,
)
from rome_edit.inspection.neurons import _gradients, trace_neurons
from rome_edit.models.architectures import get_module
from rome_edit.tracing.core import prepare_prompt
from rome_edit.tracing.noise import corrupt_subject, subject_noise

TEMPLATE, SUBJECT = "Name: {}. Gender:", "Brittany"


def _trace(lm, **kw):
    return trace_neurons(lm, TEMPLATE, SUBJECT, noise_std=1.0, samples=2, progress=False, **kw)


@pytest.fixture(scope="module")
def gptj_trace(tokenizer):
    lm = make_tiny("gptj", tokenizer)
    return lm, _trace(lm)


def _restore_by_hand(lm, layer, token, neuron, samples=2, std=1.0, seed=1):
    """p_restored − p_corrupt for one neuron, written independently of the library."""
    tp = prepare_prompt(lm, TEMPLATE.format(SUBJECT), SUBJECT)
    d = lm.model.config.hidden_size
    noise = subject_noise(samples, tp.end - tp.start, d, std, seed)
    proj = get_module(lm.model, lm.arch.out_proj.format(layer))
    keys = {}
    h = proj.register_forward_pre_hook(lambda m, a: keys.__setitem__("k", a[0].clone()))
    with torch.no_grad():
        lm.model(input_ids=tp.input_ids)
    h.remove()
    clean_value = keys["k"][0, token, neuron]

    def setter(module, args):
        k = args[0].clone()
        k[:, token, neuron] = clean_value
        return (k,)

    def p_answer(restore):
        handle = proj.register_forward_pre_hook(setter) if restore else None
        try:
            with torch.no_grad(), corrupt_subject(lm, tp.start, tp.end, noise):
                logits = lm.model(input_ids=tp.input_ids.repeat(samples, 1)).logits
        finally:
            if handle:
                handle.remove()
        return torch.softmax(logits[:, -1], -1)[:, tp.answer_id].mean().item()

    return p_answer(True) - p_answer(False)


def test_cells_are_single_neuron_restorations(gptj_trace):
    lm, result = gptj_trace
    effects = result.effects
    # the three most important cells and a random one
    flat = effects.abs().flatten().topk(3).indices.tolist() + [777]
    for index in flat:
        layer, token, neuron = torch.unravel_index(torch.tensor(index), effects.shape)
        if not result.traced_mask()[layer, token]:
            continue
        expected = _restore_by_hand(lm, int(layer), int(token), int(neuron))
        assert effects[layer, token, neuron].item() == pytest.approx(expected, abs=2e-6)
    assert effects.abs().max() > 1e-5


def test_causal_zeros(gptj_trace):
    lm, result = gptj_trace
    assert torch.all(result.effects[:, : result.subject_start] == 0)
    assert torch.all(result.effects[-1, :-1] == 0)
    assert torch.all(result.attribution[:, : result.subject_start] == 0)
    assert torch.all(result.attribution[-1, :-1] == 0)
    assert result.layer_means.shape == result.effects.shape[:2]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fast_equals_plain(family, tokenizer):
    lm = make_tiny(family, tokenizer)
    # one noised copy keeps the plain reference cheap; the batching over copies is covered above
    kw = dict(layers=[1, lm.n_layers - 1], noise_std=1.0, samples=1, progress=False)
    fast = trace_neurons(lm, TEMPLATE, SUBJECT, **kw)
    plain = trace_neurons(lm, TEMPLATE, SUBJECT, method="plain", **kw)
    torch.testing.assert_close(fast.effects, plain.effects, rtol=0, atol=1e-7)
    assert fast.effects.abs().max() > 1e-6
    assert torch.all(fast.effects[0] == 0)  # a layer not asked for


def test_gradients_match_finite_differences(tiny_gptj):
    lm = tiny_gptj
    tp = prepare_prompt(lm, TEMPLATE.format(SUBJECT), SUBJECT)
    grads = _gradients(lm, tp, None)[:, 0]  # clean run
    proj = get_module(lm.model, lm.arch.out_proj.format(1))
    token, neuron, eps = tp.n_tokens - 2, 5, 1e-3

    def p_with(shift):
        def hook(module, args):
            k = args[0].clone()
            k[:, token, neuron] += shift
            return (k,)

        handle = proj.register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                logits = lm.model(input_ids=tp.input_ids).logits.double()
        finally:
            handle.remove()
        return torch.softmax(logits[0, -1], -1)[tp.answer_id].item()

    numeric = (p_with(eps) - p_with(-eps)) / (2 * eps)
    assert grads[1, token, neuron].item() == pytest.approx(numeric, rel=2e-2, abs=1e-7)


def test_attribution_tracks_the_indirect_effect(gptj_trace):
    _, result = gptj_trace
    mask = result.traced_mask()
    agreement = rank_agreement(result.effects[mask], result.attribution[mask], 50)
    # First-order Taylor estimate of the same quantity: strongly but not perfectly related.
    assert agreement.pearson > 0.5 and agreement.top_k_overlap_abs > agreement.chance


def test_refusals(tiny_gptj):
    with pytest.raises(ValueError, match="out of range"):
        _trace(tiny_gptj, layers=[99])
    with pytest.raises(ValueError, match="unknown method"):
        _trace(tiny_gptj, method="fastest")


def test_spearman_and_overlap_against_references():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, generator=g)
    b = a + 0.7 * torch.randn(200, generator=g)
    assert spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b).statistic, abs=1e-12)
    ties = torch.tensor([1.0, 1.0, 2.0, 3.0, 3.0, 3.0])
    other = torch.tensor([0.5, 0.1, 0.2, 0.9, 0.3, 0.4])
    assert spearman(ties, other) == pytest.approx(
        scipy.stats.spearmanr(ties, other).statistic, abs=1e-12)
    assert top_k_overlap(a, a, 10) == 1.0
    assert top_k_overlap(a, -a, 10) == 0.0
    x = torch.arange(10.0)
    y = torch.tensor([9.0, 8.0, 0, 1, 2, 3, 4, 5, 6, 7.5])
    assert top_k_overlap(x, y, 3) == pytest.approx(1 / 3)  # only index 9 in both top 3


def test_key_preimage_is_the_minimum_norm_solution():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 32, generator=g)  # d_model × d_mlp, full row rank
    target = torch.randn(8, generator=g)
    k = key_preimage(w, target)
    torch.testing.assert_close(w.double() @ k, target.double())
    # minimum norm: k lies in the row space of W (any null-space component would add norm)
    null = torch.linalg.svd(w.double(), full_matrices=True).Vh[8:]
    assert (null @ k).abs().max() < 1e-10
    with pytest.raises(ValueError, match="d_model"):
        key_preimage(w, torch.randn(9))


def test_cli_neurons(tiny_gptj, tmp_path, capsys):
    path = tmp_path / "tiny"
    tiny_gptj.model.save_pretrained(path)
    tiny_gptj.tokenizer.save_pretrained(path)
    hp = {"layers": [1], "v_loss_layer": 3, "v_num_grad_steps": 2, "mom2_adjustment": False,
          "context_template_length_params": [[3, 1]]}
    (tmp_path / "hp.json").write_text(json.dumps(hp))
    (tmp_path / "ctx.json").write_text(json.dumps(["{}"]))
    out = tmp_path / "n"
    assert main(["neurons", "--model", str(path), "--prompt", TEMPLATE, "--subject", SUBJECT,
                 "--samples", "2", "--layers", "1,3", "--top-k", "10", "--hparams",
                 str(tmp_path / "hp.json"), "--context-templates", str(tmp_path / "ctx.json"),
                 "--out", str(out)]) == 0
    report = json.loads((out / "neurons.json").read_text())
    assert report["edit_layer"] == 1
    assert -1 <= report["agreement"]["attribution_patching"]["spearman"] <= 1
    (name, row), = report["edit_relation"]["overlaps"].items()
    assert name.startswith("k*") and 0 <= row["top_k_overlap"] <= 1
    for png in ("neurons_mean.png", "neurons_all.png", "neurons_mean_attribution.png"):
        assert (out / png).exists()
    assert (out / "neurons.safetensors").exists()
    code = main(["neurons", "--model", str(path), "--prompt", TEMPLATE, "--subject", SUBJECT,
                 "--layers", "one", "--out", str(tmp_path / "bad")])
    assert code == 2 and "comma-separated" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
