"""The bundled model's files and the script that trained it."""

import importlib.util
import json
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from rome_edit.models.loading import bundled_model_path

ROOT = Path(__file__).resolve().parents[1]


def test_bundled_model_is_a_standard_hf_directory():
    path = bundled_model_path()
    assert (path / "model.safetensors").stat().st_size <= 25 * 2**20
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "gptj" and model.config.n_layer == 6
    for word in (" Male", " Female", " male", " female", " he", " she"):
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1


def test_training_script_trains_a_miniature(tmp_path):
    spec = importlib.util.spec_from_file_location("train_toy_model",
                                                  ROOT / "scripts" / "train_toy_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summary = module.main(["--out", str(tmp_path / "mini"), "--names", "40", "--steps", "20",
                           "--width", "64", "--layers", "2", "--heads", "4",
                           "--eval-every", "10", "--docs-per-name", "10"])
    assert summary["steps"] == 20 and summary["history"][-1]["step"] == 20
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "mini")
    assert model.config.n_layer == 2
    assert json.loads((tmp_path / "mini" / "training.json").read_text())["n_names"] == 40
