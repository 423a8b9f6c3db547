"""Eager and sdpa attention give the same edits and traces (the implementation is stated and
recorded: transformers 5.24 switched GPT-J's default from eager to sdpa)."""

import pytest
import torch
from conftest import make_tiny

from rome_edit.models.compat import TRANSFORMERS_VERSION, supports_attention
from rome_edit.models.loading import load_model, wrap_model
from rome_edit.rome.compute import compute_edits
from rome_edit.rome.hparams import ROMEHyperParams
from rome_edit.rome.request import EditRequest
from rome_edit.tracing.trace import trace

CTX = ["{}", "The weather was cold. {}", "Record. {}"]
REQS = [EditRequest(s, "Name: {}. Gender:", t) for s, t in
        (("Brittany", " Male"), ("David", " Female"), ("Christopher", " Female"))]
# largest relative δ difference and largest absolute trace-effect difference accepted
TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-2, 1e-2),
             torch.bfloat16: (1e-1, 5e-2)}


def _pair(tokenizer, family, dtype):
    if not supports_attention(make_tiny(family, tokenizer).model, "sdpa"):
        pytest.skip(f"{family} has no sdpa attention under transformers {TRANSFORMERS_VERSION}")
    models = []
    for implementation in ("eager", "sdpa"):
        tiny = make_tiny(family, tokenizer)
        models.append(wrap_model(tiny.model.to(dtype), tokenizer, f"tiny-{family}",
                                 attn_implementation=implementation))
    return models


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", ["gptj", "llama"])
def test_eager_and_sdpa_give_the_same_edits_and_traces(tokenizer, family, dtype):
    eager, sdpa = _pair(tokenizer, family, dtype)
    assert (eager.attn_implementation, sdpa.attn_implementation) == ("eager", "sdpa")
    assert eager.fingerprint == sdpa.fingerprint  # the same model
    hp = ROMEHyperParams(layers=(1,), v_loss_layer=eager.n_layers - 1, v_num_grad_steps=6,
                         clamp_norm_factor=4.0, mom2_adjustment=False)
    delta_tol, trace_tol = TOLERANCE[dtype]
    a, b = (compute_edits(lm, REQS, hp, CTX, progress=False) for lm in (eager, sdpa))
    for x, y in zip(a, b):
        assert (x.attn_implementation, y.attn_implementation) == ("eager", "sdpa")
        assert ((x.delta - y.delta).norm() / x.delta.norm()).item() < delta_tol
    ta, tb = (trace(lm, "Name: {}. Gender:", "Emma", noise_std=0.5, window=3, samples=4)
              for lm in (eager, sdpa))
    for kind in ta.effects:
        assert (ta.effects[kind].float() - tb.effects[kind].float()).abs().max() < trace_tol


def test_the_implementation_is_stated_when_loading(tokenizer):
    assert load_model().attn_implementation == "eager"
    if supports_attention(make_tiny("gptj", tokenizer).model, "sdpa"):
        assert load_model(attn_implementation="sdpa").attn_implementation == "sdpa"
    else:  # GPT-J before transformers 5.24: refused with the fix named, nothing loaded
        with pytest.raises(ValueError, match="use attn_implementation='eager'") as err:
            load_model(attn_implementation="sdpa")
        assert err.value.parameters == ("attn_implementation",)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        load_model(attn_implementation="flash")
