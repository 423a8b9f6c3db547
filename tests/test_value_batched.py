"""The batched value engine's pieces against ground truth: the δ = 0 prefix pass, the GPT-J
suffix kernel, the generic suffix path, and layouts at their edges."""

import pytest
import torch

from rome_edit.models.gptj_suffix import GPTJSuffix, SuffixGroups, supports_gptj_suffix
from rome_edit.models.hooks import edit_output
from rome_edit.models.layers import logits_at_layer
from rome_edit.models.scoring import pad_id, right_pad
from rome_edit.rome import value_batched as vb
from rome_edit.rome.hparams import ROMEHyperParams
from rome_edit.rome.key import key_stars
from rome_edit.rome.prefix_pass import PromptBatch, prefix_pass
from rome_edit.rome.request import EditRequest, rewriting_layouts
from rome_edit.rome.suffix_step import GenericSuffix
from rome_edit.rome.value_reference import optimise_value

CTX = ["{}", "The weather was cold. {}", "Record. {}"]
REQS = [EditRequest("Brittany", "Name: {}. Gender:", " Male"),
        EditRequest("Christopher", "Name: {}. Gender:", " an astronaut"),  # 9 target tokens
        EditRequest("Ann", "Name: {}. Gender:", " Female")]


def _setup(lm, layer, loss_layer, requests=REQS, ctx=CTX):
    per = [[*a, k] for a, k in (rewriting_layouts(lm.tokenizer, r, ctx) for r in requests)]
    b = PromptBatch(lm, per, torch.device("cpu"))
    pre = prefix_pass(lm, b, layer, loss_layer)
    return [r for rows in per for r in rows], b, pre, pre.h_suffix


def _ground_truth(lm, rows, b, delta, layer, loss_layer):
    """Each prompt run whole, δ added to layer L's MLP output at its subject's last token;
    logits at the columns the batched engine reads."""
    ids, mask = right_pad([r.ids for r in rows], pad_id(lm.tokenizer), lm.device)
    lookups = torch.tensor([r.lookup for r in rows])

    def add(hidden, _name):
        hidden = hidden.clone()
        hidden[torch.arange(len(rows)), lookups] += delta
        return hidden

    with torch.no_grad(), edit_output(lm.model, {lm.arch.mlp.format(layer): add}):
        logits = logits_at_layer(lm, loss_layer, input_ids=ids, attention_mask=mask)
    cols = lookups[:, None] + b.t_cols
    return logits.gather(1, cols[..., None].expand(-1, -1, logits.shape[-1]))


@pytest.mark.parametrize("layer,loss_layer", [(1, 3), (1, 2), (2, 2), (0, 3)])
def test_gptj_kernel_and_generic_path_equal_the_whole_forward(tiny_gptj, layer, loss_layer):
    lm = tiny_gptj
    assert supports_gptj_suffix(lm.model, lm.arch)
    rows, b, pre, h_suffix = _setup(lm, layer, loss_layer)
    assert b.C > 0 and b.O > 0 and b.t_cols.shape[1] == 9
    torch.manual_seed(0)
    delta = torch.randn(len(rows), lm.model.config.hidden_size) * 3
    want = _ground_truth(lm, rows, b, delta, layer, loss_layer)
    kernel = GPTJSuffix(lm.model, lm.arch, layer, loss_layer, pre.shared_kv, pre.own_kv,
                        h_suffix, b.pos[:, b.P :], b.mask, b.t_cols)
    groups = SuffixGroups(lm.model, lm.arch, layer, loss_layer, pre.shared_kv, pre.own_kv,
                          h_suffix, b.pos[:, b.P :], b.mask, b.t_cols, b.R)
    assert len(groups.groups) == 2  # the rewriting prompts, and the KL prompt (1 column)
    generic = GenericSuffix(lm, b, pre.prefix_kv(), h_suffix, layer, loss_layer)
    every = torch.arange(len(rows))
    real = b.t_mask.bool()
    real[:, 0] = True  # a KL row reads column 0 (its subject)
    runners = (kernel, groups, generic)
    with torch.no_grad():
        for runner in runners:
            got = runner.logits(delta, every)
            torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
        R = b.R  # a request leaves with all its rows
        some = torch.cat([torch.arange(R), torch.arange(2 * R, 3 * R)])
        for runner in runners:
            torch.testing.assert_close(runner.logits(delta[some], some)[real[some]],
                                       want[some][real[some]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gptj", "gpt2", "llama"])
@pytest.mark.parametrize("case", ["no shared tokens", "one request", "nothing before s"])
def test_batched_equals_one_at_a_time_at_layout_edges(tokenizer, family, case):
    """No template shares a token across requests (``C = 0``: the subject opens every prompt),
    one request alone (every token before the subject shared, ``O = 0``), or single-token
    subjects opening every prompt (no token before ``s`` at all, ``P = 0``)."""
    from conftest import make_tiny

    lm = make_tiny(family, tokenizer)
    hp = ROMEHyperParams(layers=(1,), v_loss_layer=lm.n_layers - 1, v_num_grad_steps=5,
                         mom2_adjustment=False)
    if case == "no shared tokens":
        requests = [EditRequest(s, "{} is a", " doctor") for s in ("Brittany", "David", "Ann")]
        ctx = ["{}"]
    elif case == "one request":
        requests, ctx = REQS[1:2], CTX
    else:  # one token each at the start of a text
        requests = [EditRequest(s, "{} is a", " doctor") for s in ("The", "Name", "A")]
        ctx = ["{}"]
    per = [[*a, k] for a, k in (rewriting_layouts(lm.tokenizer, r, ctx) for r in requests)]
    b = PromptBatch(lm, per, torch.device("cpu"))
    expect = {"no shared tokens": b.C == 0 < b.O, "one request": b.O == 0 < b.C,
              "nothing before s": b.P == 0}
    assert expect[case], (b.C, b.O)
    fast = vb.optimise_values(lm, requests, hp, ctx, progress=False)
    k_star = key_stars(lm, 1, [r.prompt for r in requests], [r.subject for r in requests], ctx)
    for i, (req, f) in enumerate(zip(requests, fast)):
        ref = optimise_value(lm, req, hp, ctx)
        assert len(f.losses) == len(ref.losses)
        assert (f.delta - ref.delta).norm() / ref.delta.norm() < 1e-5
        assert (f.k_star - k_star[i]).norm() / k_star[i].norm() < 1e-5


@pytest.mark.parametrize("rot", [4, 8])
def test_rotary_matches_gptj_and_its_gradient_is_exact(rot):
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb

    from rome_edit.models.gptj_rotary import apply_rotary

    torch.manual_seed(0)
    x = torch.randn(3, 5, 2, 8, dtype=torch.float64, requires_grad=True)  # (rows, seq, heads, ·)
    sin = torch.randn(3, 5, rot // 2, dtype=torch.float64)
    cos = torch.randn(3, 5, rot // 2, dtype=torch.float64)
    want = torch.cat([apply_rotary_pos_emb(x[..., :rot], sin, cos), x[..., rot:]], dim=-1)
    rep = [torch.repeat_interleave(t[:, None], 2, 3) for t in (sin, cos)]  # (rows, 1, seq, rot)
    got = apply_rotary(x.transpose(1, 2), *rep, rot)  # heads first, as a strided view
    assert got.is_contiguous()
    torch.testing.assert_close(got, want.transpose(1, 2))
    assert torch.autograd.gradcheck(lambda t: apply_rotary(t.transpose(1, 2), *rep, rot), (x,))
