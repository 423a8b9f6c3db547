"""Sweeps: resumable with nothing lost or duplicated, and a store that refuses mixing."""

import json

import pytest
import torch
from safetensors.torch import load_file

import rome_edit.editing.sweep as sweep_mod
from rome_edit.data.names import NameEntry
from rome_edit.editing.hparams import ROMEHyperParams
from rome_edit.editing.sweep import run_sweep

CTX = ["{}", "The weather was cold. {}"]
NAMES = [NameEntry(n, g) for n, g in [("Brittany", "female"), ("David", "male"),
                                      ("Christopher", "male"), ("Ani", "female"),
                                      ("Margaret", "female"), ("Robert", "male")]]


def hp(lm):
    return ROMEHyperParams(layers=(1,), v_loss_layer=lm.n_layers - 1, v_num_grad_steps=4,
                           mom2_adjustment=False)


def test_sweep_resumes_after_interruption(tiny_gptj, tmp_path, monkeypatch):
    lm = tiny_gptj
    full = run_sweep(lm, NAMES, hp(lm), CTX, tmp_path / "full", batch_size=2, progress=False)
    real = sweep_mod.compute_edits
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if Ctrl-C arrived during the second batch
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_mod, "compute_edits", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(lm, NAMES, hp(lm), CTX, tmp_path / "resumed", batch_size=2, progress=False)
    assert len(list((tmp_path / "resumed" / "shards").glob("*.jsonl"))) == 1
    monkeypatch.setattr(sweep_mod, "compute_edits", real)
    resumed = run_sweep(lm, NAMES, hp(lm), CTX, tmp_path / "resumed", batch_size=2,
                        progress=False)
    assert resumed["n_edits"] == full["n_edits"] == len(NAMES)
    rows = [json.loads(x) for x in (tmp_path / "resumed" / "records.jsonl").read_text().split(
        "\n") if x]
    assert sorted(r["subject"] for r in rows) == sorted(n.name for n in NAMES)
    a = load_file(str(tmp_path / "full" / "deltas.safetensors"))["delta"]
    b = load_file(str(tmp_path / "resumed" / "deltas.safetensors"))["delta"]
    torch.testing.assert_close(a, b)
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    for key in ("n_edits", "layer", "efficacy", "paraphrase", "specificity", "seconds",
                "seconds_per_edit"):
        assert key in summary
    assert {"subject", "gender", "target"} <= set(rows[0])
    assert all(r["target"] == (" Male" if r["gender"] == "female" else " Female") for r in rows)


def test_sweep_refuses_to_mix(tiny_gptj, tmp_path):
    lm = tiny_gptj
    run_sweep(lm, NAMES[:2], hp(lm), CTX, tmp_path / "s", batch_size=2, progress=False)
    other = ROMEHyperParams(layers=(2,), v_loss_layer=lm.n_layers - 1, v_num_grad_steps=4,
                            mom2_adjustment=False)
    before = (tmp_path / "s" / "records.jsonl").read_text()
    with pytest.raises(ValueError, match="different"):
        run_sweep(lm, NAMES, other, CTX, tmp_path / "s", batch_size=2, progress=False)
    assert (tmp_path / "s" / "records.jsonl").read_text() == before
