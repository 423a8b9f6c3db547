import pytest
import torch

from rome_edit.models.architectures import (
    UnsupportedModelError,
    detect_architecture,
    get_module,
    mlp_widths,
    out_proj_weight,
)
from rome_edit.models.hooks import capture, edit_output, run_until
from rome_edit.models.subject import SubjectNotFoundError, locate_subject


def test_architecture_points_at_the_mlp_output_projection(tiny_model):
    lm = tiny_model
    d_model, d_mlp = mlp_widths(lm.model, lm.arch)
    ids = lm.tokenizer("Name: Brittany. Gender:", return_tensors="pt")["input_ids"]
    out_proj = lm.arch.out_proj.format(1)
    with capture(lm.model, [out_proj, lm.arch.mlp.format(1)], inputs=True) as rec:
        lm.model(input_ids=ids)
    # The key is the out-projection's input (d_mlp wide); the value is the MLP's output.
    assert rec.inputs[out_proj].shape[-1] == d_mlp
    assert rec.outputs[out_proj].shape[-1] == d_model
    torch.testing.assert_close(rec.outputs[out_proj], rec.outputs[lm.arch.mlp.format(1)])


def test_parallel_flag(tiny_model):
    assert tiny_model.arch.parallel == (tiny_model.arch.family in {"gptj", "gpt_neox"})


def test_gpt2_weight_is_stored_transposed(tokenizer):
    from conftest import make_tiny

    lm = make_tiny("gpt2", tokenizer)
    d_model, d_mlp = mlp_widths(lm.model, lm.arch)
    assert out_proj_weight(lm.model, lm.arch, 0).shape == (d_mlp, d_model)
    assert lm.arch.out_proj_transposed


def test_unknown_family_names_the_supported_ones(tiny_gptj):
    model = tiny_gptj.model
    model.config.model_type = "mystery"
    try:
        with pytest.raises(UnsupportedModelError, match="supported families are"):
            detect_architecture(model)
        # With every template given, an unknown family works.
        arch = detect_architecture(model, **{k: getattr(tiny_gptj.arch, k) for k in (
            "layers", "block", "mlp", "out_proj", "attn", "embed", "final_norm", "lm_head")})
        assert arch.family == "mystery"
    finally:
        model.config.model_type = "gptj"


def test_hooks_are_removed_even_on_error(tiny_gptj):
    model = tiny_gptj.model
    module = get_module(model, tiny_gptj.arch.mlp.format(0))
    with pytest.raises(RuntimeError):
        with edit_output(model, {tiny_gptj.arch.mlp.format(0): lambda h, n: h * 0}):
            raise RuntimeError("boom")
    assert not module._forward_hooks


def test_edit_output_changes_logits_and_stop_after(tiny_model):
    lm = tiny_model
    ids = lm.tokenizer("Name: Brittany. Gender:", return_tensors="pt")["input_ids"]
    base = lm.model(input_ids=ids).logits
    with edit_output(lm.model, {lm.arch.mlp.format(1): lambda h, n: h + 1.0}):
        edited = lm.model(input_ids=ids).logits
    assert not torch.allclose(base, edited)
    torch.testing.assert_close(lm.model(input_ids=ids).logits, base)
    with capture(lm.model, [lm.arch.mlp.format(0)], stop_after=lm.arch.block.format(0)) as rec:
        run_until(lm.model, input_ids=ids)
    assert lm.arch.mlp.format(0) in rec.outputs


@pytest.mark.parametrize("template, subject", [
    ("Name: {}. Gender:", "Brittany"),
    ("{} said that", "Christopher"),
    ("Brittany met her friend. Name: {}. Gender:", "Brittany"),
    ("A {{literal}} brace, then {}", "Ani"),
])
def test_locate_subject(tokenizer, template, subject):
    span = locate_subject(tokenizer, template, subject)
    decoded = tokenizer.decode(list(span.input_ids[span.start : span.end]))
    assert decoded.strip() == subject
    prefix = template.split("{}")[0].replace("{{", "{").replace("}}", "}")
    assert span.start == len(tokenizer(prefix.rstrip(" "), add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("template, subject, match", [
    ("Name: Brittany. Gender:", "Brittany", "exactly one"),
    ("{} and {}", "Ani", "exactly one"),
    ("Name: {}.", "", "empty"),
    ("Name: {.", "Ani", "braces"),
])
def test_locate_subject_errors(tokenizer, template, subject, match):
    with pytest.raises(SubjectNotFoundError, match=match):
        locate_subject(tokenizer, template, subject)
