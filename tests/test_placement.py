"""Models placed by an accelerate device map: hooks, tracing and edits give the unsplit results.

This machine has one CPU and no GPU, so the honest stand-in for "blocks on several devices" is
accelerate's dispatch with disk offload: later blocks live on the meta device and accelerate's
hooks load them for each forward pass, exactly the hook machinery that moves activations
between GPUs when a model is split over several (docs/scaling.md).
"""

from __future__ import annotations

import pytest
import torch
from concepts import CITY, SUBJECTS

from rome_edit.cli.common import parse_max_memory
from rome_edit.evaluation.evaluate import evaluate_edits
from rome_edit.models.architectures import out_proj_weight
from rome_edit.models.loading import load_model
from rome_edit.models.scoring import next_token_logprobs
from rome_edit.rome.compute import compute_edits
from rome_edit.rome.hparams import ROMEHyperParams
from rome_edit.tracing.trace import trace
from rome_edit.weights.write import applied

CTX = ["{}", "It was a long day. {}"]
REQUESTS = [CITY.request("Brittany", 1), CITY.request("Christopher", 0)]
EDIT_PROMPT = CITY.prompt
SPLIT = {"transformer.wte": "cpu", "transformer.h.0": "cpu", "transformer.h.1": "cpu",
         "transformer.h.2": "disk", "transformer.h.3": "disk", "transformer.ln_f": "cpu",
         "lm_head": "cpu"}


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory, tokenizer):
    from conftest import make_tiny

    path = tmp_path_factory.mktemp("tiny-gptj")
    lm = make_tiny("gptj", tokenizer)
    lm.model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def whole(saved_tiny):
    return load_model(saved_tiny)


@pytest.fixture(scope="module")
def split(saved_tiny, tmp_path_factory):
    lm = load_model(saved_tiny, device_map=SPLIT,
                    offload_folder=tmp_path_factory.mktemp("offload"))
    assert out_proj_weight(lm.model, lm.arch, 2).device.type == "meta"  # really dispatched
    assert hasattr(lm.model.transformer.h[2], "_hf_hook")
    return lm


def hp(layer: int = 1) -> ROMEHyperParams:
    return ROMEHyperParams(layers=(layer,), v_loss_layer=3, v_num_grad_steps=5,
                           mom2_adjustment=False)


@pytest.mark.parametrize("engine", ["simple", "batched"])
def test_edits_on_a_dispatched_model_equal_the_whole_model(whole, split, engine):
    a = compute_edits(whole, REQUESTS, hp(), CTX, engine=engine, progress=False)
    b = compute_edits(split, REQUESTS, hp(), CTX, engine=engine, progress=False)
    assert whole.identity == split.identity
    # the whole model's batched engine runs the GPT-J suffix kernel, the dispatched one the
    # generic path: the same arithmetic in another order, so equal to float rounding
    tol = 1e-6 if engine == "simple" else 1e-5
    for x, y in zip(a, b):
        torch.testing.assert_close(x.delta, y.delta, rtol=tol, atol=tol)
        torch.testing.assert_close(x.lam, y.lam, rtol=tol, atol=tol)
    texts = [EDIT_PROMPT.format(r.subject) for r in REQUESTS]
    before = out_proj_weight(split.model, split.arch, 1).clone()
    with applied(whole, a), applied(split, b):
        torch.testing.assert_close(next_token_logprobs(split.model, split.tokenizer, texts),
                                   next_token_logprobs(whole.model, whole.tokenizer, texts),
                                   rtol=1e-5, atol=1e-5)
    assert torch.equal(out_proj_weight(split.model, split.arch, 1), before)
    # the batched evaluation (each row sees its own edit through a hook at layer 1)
    pool = list(SUBJECTS[:12])
    for x, y in zip(evaluate_edits(whole, a, pool, progress=False),
                    evaluate_edits(split, b, pool, progress=False)):
        dx, dy = x.to_dict(), y.to_dict()
        probabilities = [k for k in dx if k.startswith("p_")]
        assert [dx[k] for k in probabilities] == pytest.approx([dy[k] for k in probabilities],
                                                              rel=1e-5)
        assert {k: v for k, v in dx.items() if k not in probabilities} == \
            {k: v for k, v in dy.items() if k not in probabilities}


def test_tracing_on_a_dispatched_model_equals_the_whole_model(whole, split):
    kwargs = {"noise_std": 0.5, "samples": 3, "window": 1}
    a = trace(whole, EDIT_PROMPT, "Brittany", **kwargs)
    b = trace(split, EDIT_PROMPT, "Brittany", **kwargs)
    assert a.p_clean == pytest.approx(b.p_clean, abs=1e-6)
    for kind in a.effects:
        torch.testing.assert_close(a.effects[kind], b.effects[kind], rtol=1e-5, atol=1e-6)


def test_offloaded_layer_is_refused_and_nothing_changes(split):
    before = {n: p.clone() for n, p in split.model.named_parameters() if p.device.type != "meta"}
    with pytest.raises(ValueError, match="offloaded by the device map"):
        compute_edits(split, REQUESTS, hp(layer=2), CTX, progress=False)
    after = dict(split.model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in before.items())


def test_device_map_auto_with_max_memory_splits(saved_tiny, tmp_path, whole):
    # 300 KB of "cpu" holds the embeddings; accelerate sends the blocks (too big for the rest) to
    # disk -- the same placement logic that fills GPU 0, then GPU 1, ... for a large model.
    lm = load_model(saved_tiny, device_map="auto", max_memory={"cpu": "300KB"},
                    offload_folder=tmp_path)
    placed = set(lm.model.hf_device_map.values())
    assert "disk" in placed and "cpu" in placed
    texts = [EDIT_PROMPT.format("Ani")]
    torch.testing.assert_close(next_token_logprobs(lm.model, lm.tokenizer, texts),
                               next_token_logprobs(whole.model, whole.tokenizer, texts))


def test_max_memory_argument():
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=60GiB") == {0: "20GiB", 1: "20GiB",
                                                              "cpu": "60GiB"}
    with pytest.raises(ValueError, match="DEVICE=SIZE"):
        parse_max_memory("20GiB")


def test_device_and_device_map_together_are_refused_before_loading(monkeypatch):
    from rome_edit.models import loading

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", no_loading)
    with pytest.raises(ValueError, match="either device or device_map"):
        loading.load_model(device="cpu", device_map="auto")
